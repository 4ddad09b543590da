"""Gemma 3n hyperparameters as the converter resolves them, and what it refuses: llama.cpp's
gemma3n fixes most of them in code, so a checkpoint that differs must not be converted into a
file that computes another model. Plain dicts, no model."""

from __future__ import annotations

import json

import pytest

from gemma_chat.convert.gemma3n import (
    check_llama_cpp_compatible,
    gemma3n_hparams,
    mlx_config,
    sparsity_scales,
)
from gemma_chat.errors import UnsupportedArchitecture


def real(layers: int, shared: int, ff: int) -> dict:
    """The text part of google/gemma-3n-E2B-it / E4B-it's config.json, as transformers 4.53
    wrote it (the keys that matter here)."""
    return {"model_type": "gemma3n", "text_config": {
        "model_type": "gemma3n_text", "num_hidden_layers": layers,
        "num_kv_shared_layers": shared, "intermediate_size": [ff] * layers,
        "hidden_size": 2048, "activation_sparsity_pattern": [0.95] * 10 +
        [0.0] * (layers - 10), "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": None, "final_logit_softcapping": 30.0, "vocab_size": 262_400,
        "vocab_size_per_layer_input": 262_144}, "tie_word_embeddings": True}


@pytest.mark.parametrize("label,layers,shared,ff", [("E2B", 30, 10, 8192),
                                                    ("E4B", 35, 15, 16384)])
def test_the_real_models_are_accepted(label, layers, shared, ff):
    hp = gemma3n_hparams(real(layers, shared, ff))
    check_llama_cpp_compatible(hp, label)
    assert hp["layer_types"][:5] == ["sliding_attention"] * 4 + ["full_attention"]
    assert hp["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert hp["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert hp["intermediate_size"] == [ff] * layers


def test_transformers_5_form_resolves_like_the_older_one():
    old = gemma3n_hparams(real(30, 10, 8192))
    text = dict(real(30, 10, 8192)["text_config"], model_type="gemma3n_text",
                intermediate_size=8192, activation_sparsity_pattern=None)
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        text.pop(key)
    text["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    new = gemma3n_hparams(text)
    for key in ("intermediate_size", "activation_sparsity_pattern", "layer_types",
                "rope_parameters", "num_kv_shared_layers"):
        assert new[key] == old[key], key


BAD = {
    "num_kv_shared_layers": (5, "25 layers with their own KV, not 20"),
    "laurel_rank": (32, "laurel_rank is 32, not 64"),
    "hidden_size_per_layer_input": (128, "hidden_size_per_layer_input is 128"),
    "altup_num_inputs": (2, "altup_num_inputs is 2"),
    "final_logit_softcapping": (None, "final_logit_softcapping is None"),
    "activation_sparsity_pattern": ([0.95] * 5 + [0.0] * 25, "activation_sparsity_pattern"),
    "layer_types": (["sliding_attention"] * 18 + ["full_attention", "sliding_attention"]
                    + ["sliding_attention"] * 9 + ["full_attention"], "layers 18 and 19"),
    "rope_scaling": ({"rope_type": "linear", "factor": 2.0}, "RoPE is 'linear'"),
    "attention_bias": (True, "biases"),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_what_llama_cpp_cannot_represent_is_refused(key):
    value, words = BAD[key]
    config = json.loads(json.dumps(real(30, 10, 8192)))
    config["text_config"][key] = value
    with pytest.raises(UnsupportedArchitecture, match="llama.cpp's gemma3n cannot represent") \
            as info:
        check_llama_cpp_compatible(gemma3n_hparams(config), "x")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_sparsity_scales_are_normal_quantiles():
    scales = sparsity_scales(gemma3n_hparams(real(30, 10, 8192)))
    assert scales[0] == pytest.approx(1.6448536, abs=1e-6) and scales[10] == float("-inf")


def test_mlx_config_is_the_multimodal_form_with_every_key_mlx_lm_requires():
    text = dict(real(30, 10, 8192)["text_config"])
    for key in ("rope_theta", "rope_local_base_freq"):
        text.pop(key)
    text["rope_parameters"] = {"full_attention": {"rope_theta": 1e6},
                               "sliding_attention": {"rope_theta": 1e4}}
    out = mlx_config(text, gemma3n_hparams(text))
    assert out["model_type"] == "gemma3n" and out["text_config"]["model_type"] == "gemma3n_text"
    cfg = out["text_config"]
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["laurel_rank"] == 64 and cfg["altup_num_inputs"] == 4
    assert len(cfg["layer_types"]) == 30
