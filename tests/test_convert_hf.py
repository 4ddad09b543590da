"""`gemma convert` from Hugging Face checkpoints, checked against transformers.

Tiny Gemma, Gemma 2 and Gemma 3 checkpoints (tests/tiny_models.py) are converted through the
real CLI to GGUF (f32, f16, Q8_0, Q4_K_M) and MLX (f32, f16, 8-bit, 4-bit); the logits at every
position of a prompt four times longer than the sliding window are compared with transformers'
(eager attention, float32), and greedy continuations through gemma-chat's own backends with
transformers' ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


llama_cpp = pytest.importorskip("llama_cpp")

from conftest import run_gemma  # noqa: E402
from tiny_models import DATA, SLIDING_WINDOW, build_checkpoint, reference_logits  # noqa: E402

from gemma_chat.convert.check import llama_cpp_logits, mlx_logits  # noqa: E402
from gemma_chat.loader import LoadOptions  # noqa: E402

ARCHES = ["gemma", "gemma2", "gemma3_text"]
N_POSITIONS = 128  # four sliding windows
GGUF_TYPES = ["f32", "f16", "q8_0", "q4_k_m"]
MLX_TYPES = ["f32", "f16", "q8", "q4"]
TEXTS = ["Hello, world!", "   leading and   inner   spaces  ", "tabs\tand\ttabs\t\t",
         "new\nlines\n\n\n", "def f(x):\n    return x * 2\n", "日本語のテキスト",
         "emoji 🦙🎉 and café, naïve",
         "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
         "1234567890 3.14159 -42", "<mask> <eos> <pad>"]


@pytest.fixture(scope="module", params=ARCHES)
def tiny(request, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(f"convert-{request.param}")
    folder = build_checkpoint(request.param, root / f"tiny-{request.param}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (DATA / "english.txt").read_text() + (DATA / "public_domain.txt").read_text()
    ids = tokenizer(text[:4000]).input_ids[:N_POSITIONS]
    assert len(ids) == N_POSITIONS > 3 * SLIDING_WINDOW
    return SimpleNamespace(model_type=request.param, folder=folder, root=root, ids=ids,
                           tokenizer=tokenizer, reference=reference_logits(folder, ids),
                           converted={})


def convert(tiny, to: str, quant: str) -> Path:
    """`gemma convert FOLDER --to TO --quant QUANT --out ...` once per module."""
    key = (to, quant)
    if key not in tiny.converted:
        out = tiny.root / f"{to}-{quant}"
        result = run_gemma("convert", str(tiny.folder), "--to", to, "--quant", quant, "--out",
                           str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        assert "->" in result.stderr and "warning" not in result.stderr
        tiny.converted[key] = next(out.glob("*.gguf")) if to == "gguf" else out
    return tiny.converted[key]


def check(reference: np.ndarray, got: np.ndarray, quant: str) -> str:
    scale = np.abs(reference).max()
    diff = np.abs(got - reference).max()
    agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
    summary = f"{quant}: max|diff| {diff / scale:.2e} of max|logit| {scale:.1f}, top-1 {agree:.3f}"
    print(summary)
    if quant == "f32":
        assert diff <= 1e-3 * scale, summary
    elif quant == "f16":
        assert diff <= 5e-3 * scale, summary
    elif quant in ("q8_0", "q8"):
        assert agree >= 0.95, summary
    else:
        assert agree >= 0.80, summary
    return summary


@pytest.mark.parametrize("quant", GGUF_TYPES)
def test_gguf_logits_match_transformers(tiny, quant):
    path = convert(tiny, "gguf", quant)
    check(tiny.reference, llama_cpp_logits(path, tiny.ids), quant)


@pytest.mark.parametrize("quant", MLX_TYPES)
def test_mlx_logits_match_transformers(tiny, quant):
    pytest.importorskip("mlx_lm")
    folder = convert(tiny, "mlx", quant)
    config = json.loads((folder / "config.json").read_text())
    if quant in ("q8", "q4"):
        assert config["quantization"] == {"group_size": 64, "bits": int(quant[1]),
                                          "mode": "affine"}
    check(tiny.reference, mlx_logits(folder, tiny.ids), quant)


def test_gguf_metadata_and_tensors(tiny):
    import gguf
    from safetensors.torch import load_file

    from gemma_chat.gguf_file import read_gguf

    path = convert(tiny, "gguf", "f32")
    info = read_gguf(path)
    arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[tiny.model_type]
    assert info.architecture == arch
    get = info.get
    assert (get("block_count"), get("embedding_length"), get("attention.head_count"),
            get("attention.head_count_kv"), get("attention.key_length")) == \
        ({"gemma": 2, "gemma2": 4, "gemma3_text": 6}[tiny.model_type], 256, 2, 1, 256)
    assert get("attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert info.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert info.metadata["tokenizer.ggml.eos_token_id"] == 1
    assert info.metadata["tokenizer.ggml.add_bos_token"] is True
    assert info.metadata["tokenizer.ggml.add_space_prefix"] is False
    if arch != "gemma":
        assert get("attention.sliding_window") == SLIDING_WINDOW
    if arch == "gemma2":
        assert (get("attn_logit_softcapping"), get("final_logit_softcapping")) == (50.0, 30.0)
    if arch == "gemma3":
        assert get("rope.freq_base") == 1_000_000.0
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert "token_embd.weight" in tensors and "output.weight" not in tensors  # tied
    # Gemma's RMSNorm weight w is stored as 1 + w, in F32.
    hf = load_file(str(tiny.folder / "model.safetensors"))
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(
        np.asarray(norm.data), hf["model.layers.0.input_layernorm.weight"].float().numpy() + 1)


def test_tokenizer_ids_match_the_checkpoint(tiny):
    vocab = llama_cpp.Llama(model_path=str(convert(tiny, "gguf", "f32")), vocab_only=True,
                            verbose=False)
    try:
        for text in TEXTS:
            expected = tiny.tokenizer(text).input_ids
            assert vocab.tokenize(text.encode(), add_bos=True, special=True) == expected, text
    finally:
        vocab.close()


def test_greedy_continuation_is_identical(tiny):
    """transformers' greedy ``generate`` vs gemma-chat's llama.cpp and MLX backends on the f32
    conversions, from a prompt longer than the sliding window."""
    import torch
    from transformers import AutoModelForCausalLM

    from gemma_chat.backends import load_backend
    from gemma_chat.backends.base import SamplingParams
    from gemma_chat.resolve import resolve

    prompt, n = tiny.ids[:100], 20
    model = AutoModelForCausalLM.from_pretrained(tiny.folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=[], pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    targets = [("llama.cpp", convert(tiny, "gguf", "f32"))]
    try:
        import mlx_lm  # noqa: F401

        targets.append(("mlx", convert(tiny, "mlx", "f32")))
    except ImportError:
        pass
    for backend_name, path in targets:
        backend = load_backend(resolve(str(path)), backend_name, LoadOptions(n_ctx=256))
        try:
            chunks = list(backend.stream(prompt, SamplingParams(temperature=0, max_tokens=n),
                                         ignore_eos=True))
        finally:
            backend.close()
        assert chunks[-1].stats.token_ids == expected, backend_name
