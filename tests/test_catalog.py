"""The model catalogue and the quantization vocabulary."""

from __future__ import annotations

import re

import pytest

from gemma_chat import catalog, quant
from gemma_chat.errors import CatalogError, InvalidArgument, ModelNotFound

FULL_NAMES = {
    "gemma-2b", "gemma-2b-it", "gemma-7b", "gemma-7b-it", "gemma-1.1-2b-it", "gemma-1.1-7b-it",
    "gemma-2-2b", "gemma-2-2b-it", "gemma-2-9b", "gemma-2-9b-it", "gemma-2-27b", "gemma-2-27b-it",
    "gemma-3-270m", "gemma-3-270m-it", "gemma-3-1b", "gemma-3-1b-it",
}


def test_every_required_model_is_in_the_catalogue():
    names = {spec.name for spec in catalog.load().specs}
    assert FULL_NAMES <= names
    assert {"gemma-3-4b-it", "gemma-3-12b-it", "gemma-3-27b-it"} <= names


def test_full_names_follow_one_scheme():
    pattern = re.compile(r"^gemma(-1\.1|-2|-3|-3n|-4)?-(e\d+b|\d+[mb](-a\d+b)?)(-it)?$")
    for spec in catalog.load().specs:
        assert pattern.match(spec.name), spec.name
        assert spec.name.endswith("-it") == (spec.tuned == "it")


@pytest.mark.parametrize("alias, name", [
    ("2b-it", "gemma-2-2b-it"),
    ("2B-IT", "gemma-2-2b-it"),
    ("gemma-2b-it", "gemma-2b-it"),
    ("gemma-1.1-7b-it", "gemma-1.1-7b-it"),
    ("270m", "gemma-3-270m"),
    ("1b-it", "gemma-3-1b-it"),
    ("gemma3:1b", "gemma-3-1b-it"),
    ("gemma-3-1b-pt", "gemma-3-1b"),
    ("27b-it", "gemma-3-27b-it"),
    # Gemma 4 is the newest generation with these labels; Gemma 3 keeps its own.
    ("e4b", "gemma-4-e4b"),
    ("e4b-it", "gemma-4-e4b-it"),
    ("gemma4:e4b", "gemma-4-e4b-it"),
    ("e2b-it", "gemma-4-e2b-it"),
    ("26b-a4b", "gemma-4-26b-a4b"),
    ("26b-it", "gemma-4-26b-a4b-it"),
    ("31b", "gemma-4-31b"),
    ("gemma4:31b", "gemma-4-31b-it"),
    ("12b-it", "gemma-4-12b-it"),
    ("gemma3:12b", "gemma-3-12b-it"),
    ("4b-it", "gemma-3-4b-it"),
    ("3n-e4b-it", "gemma-3n-e4b-it"),
    ("gemma3n:e2b", "gemma-3n-e2b-it"),
])
def test_aliases_resolve(alias, name):
    assert catalog.get(alias).name == name


def test_architectures_and_shapes_are_consistent():
    for spec in catalog.load().specs:
        expected = {"gemma-1": "gemma", "gemma-1.1": "gemma", "gemma-2": "gemma2",
                    "gemma-3": "gemma3", "gemma-3n": "gemma3n", "gemma-4": "gemma4"}[spec.family]
        assert spec.arch == expected, spec.name
        shape = spec.shape
        assert shape["heads"] % shape["kv_heads"] == 0
        vocab = {"gemma": 256000, "gemma2": 256000, "gemma3n": 262400}.get(spec.arch, 262144)
        assert shape["vocab"] == vocab
        if spec.arch in ("gemma3n", "gemma4"):
            # The last layer is global; shared-KV layers leave the first ones their caches.
            assert shape["layers"] % shape["global_layers"] == 0, spec.name
            assert 0 <= shape["kv_shared_layers"] < shape["layers"]
            assert spec.params_effective_b or spec.params_active_b or \
                spec.size_label in ("12B", "31B"), spec.name
        if spec.arch == "gemma4":
            assert not spec.gated and spec.license == "apache-2.0"
            assert shape["head_dim_global"] == 512
        if spec.arch == "gemma2":
            assert shape["attn_softcap"] == 50.0 and shape["final_softcap"] == 30.0
        if spec.arch in ("gemma2", "gemma3"):
            assert shape["sliding_window"] > 0
    # Gemma 1 2B is multi-query attention; Gemma 1 7B is full multi-head.
    assert catalog.get("gemma-2b").shape["kv_heads"] == 1
    assert catalog.get("gemma-7b").shape["kv_heads"] == catalog.get("gemma-7b").shape["heads"]


def test_every_model_has_sources():
    for spec in catalog.load().specs:
        assert spec.hf_repo.startswith("google/")
        assert spec.gguf, spec.name
        assert spec.gguf_source("q4") or spec.gguf_source("f32") or spec.gguf_source("q4_0")


def test_q4_prefers_googles_qat_q4_0():
    key, source = catalog.get("gemma-3-1b-it").gguf_source("q4")
    assert key == "q4_0"
    assert source.repo == "google/gemma-3-1b-it-qat-q4_0-gguf"
    key, _ = catalog.get("gemma-2-2b-it").gguf_source("q4")
    assert key == "q4_k_m"
    assert catalog.get("gemma-2-2b-it").gguf_source("q8")[1].file.endswith("Q8_0.gguf")


def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelNotFound, match="did you mean .*gemma-2b-it"):
        catalog.get("gema-2b-it")


def test_card_validation_rejects_bad_cards():
    good = {"name": "x", "display": "X", "family": "gemma-2", "arch": "gemma2", "params_b": 2.0,
            "context": 8192, "tuned": "it", "hf_repo": "google/x"}
    catalog.parse_card(good, "x.toml")
    with pytest.raises(CatalogError, match="arch"):
        catalog.parse_card({**good, "arch": "llama"}, "x.toml")
    with pytest.raises(CatalogError, match="context"):
        catalog.parse_card({**good, "context": "long"}, "x.toml")
    with pytest.raises(CatalogError, match="quantization"):
        catalog.parse_card({**good, "gguf": {"q3_k": {"repo": "a/b", "file": "f.gguf"}}}, "x")
    with pytest.raises(CatalogError, match=".gguf"):
        catalog.parse_card({**good, "gguf": {"q8_0": {"repo": "a/b"}}}, "x")


def test_ambiguous_alias_is_refused():
    base = {"display": "X", "family": "gemma-2", "arch": "gemma2", "params_b": 2.0,
            "context": 8192, "tuned": "it", "hf_repo": "google/x", "aliases": ["2b-it"]}
    a = catalog.parse_card({**base, "name": "a"}, "a.toml")
    b = catalog.parse_card({**base, "name": "b"}, "b.toml")
    with pytest.raises(CatalogError, match="names both"):
        catalog.build([a, b])


@pytest.mark.parametrize("name, gguf, mlx_bits", [
    ("q4", "q4_k_m", 4), ("Q8", "q8_0", 8), ("q5", "q5_k_m", 5), ("f16", "f16", None),
    ("bf16", "bf16", None),
])
def test_quant_vocabulary(name, gguf, mlx_bits):
    key = quant.parse(name)
    assert quant.gguf_type(name) == gguf
    assert quant.QUANTS[key].mlx_bits == mlx_bits


def test_llama_cpp_type_names_are_accepted_for_gguf_only_where_mlx_has_no_match():
    assert quant.parse("q4_k_m") == "q4_k_m"
    assert quant.parse("Q6_K") == "q6_k"
    assert quant.parse("q4_k_m", "mlx") == "q4"
    with pytest.raises(InvalidArgument, match="GGUF type"):
        quant.parse("q6_k", "mlx")
    with pytest.raises(InvalidArgument, match="unknown quantization"):
        quant.parse("q3")
