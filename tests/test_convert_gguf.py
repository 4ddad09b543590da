"""Re-quantizing the real Gemma 3 270M GGUF with `gemma convert` (llama.cpp's quantizer), and
the perplexity of each result on a fixed public-domain English text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


llama_cpp = pytest.importorskip("llama_cpp")

from conftest import run_gemma  # noqa: E402

from gemma_chat.backends import repack  # noqa: E402
from gemma_chat.gguf_file import read_gguf  # noqa: E402

TEXT = Path(__file__).parent / "data" / "public_domain.txt"


def convert(*args: str) -> tuple[Path, str]:
    out = Path(args[args.index("--out") + 1])
    result = run_gemma("convert", *args, timeout=600)
    assert result.returncode == 0, result.stderr
    return next(out.glob("*.gguf")), result.stderr


@pytest.fixture(scope="module")
def f16(gguf_path, tmp_path_factory):
    """The demo Q4_K_M dequantized to F16: the base for re-quantization."""
    path, stderr = convert("gemma-3-270m", "--to", "gguf", "--quant", "f16", "--out",
                           str(tmp_path_factory.mktemp("f16")))
    assert "dequantizing keeps its quality" in stderr
    assert read_gguf(path).quantization == "F16"
    return path


def perplexity(path: Path, ids: list[int]) -> float:
    repack.prepare()  # the weight repacking that is safe on this CPU, as gemma-chat loads it
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=2, logits_all=True,
                          verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
    finally:
        llm.close()
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]].mean()
    return math.exp(nll)


def test_requantized_sizes_and_perplexity(gguf_path, f16, tmp_path):
    vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(TEXT.read_text().encode(), add_bos=True, special=False)
    vocab.close()
    assert len(ids) > 1000
    files = {"Q4_K_M (original)": gguf_path, "F16 (dequantized)": f16}
    for kind in ("q8_0", "q4_k_m"):
        path, stderr = convert(str(f16), "--to", "gguf", "--quant", kind, "--out",
                               str(tmp_path / kind))
        assert "warning" not in stderr  # an unquantized source
        assert read_gguf(path).quantization == kind.upper()
        files[f"{kind.upper()} (from F16)"] = path
    ppl = {name: perplexity(path, ids) for name, path in files.items()}
    sizes = {name: path.stat().st_size for name, path in files.items()}
    for name in files:
        print(f"{name}: {sizes[name] / 1e6:.0f} MB, perplexity {ppl[name]:.3f} "
              f"over {len(ids)} tokens")
    base = ppl["F16 (dequantized)"]
    assert abs(ppl["Q8_0 (from F16)"] / base - 1) <= 0.01
    # The same weights, widened: no worse. (A little better, in fact: llama.cpp rounds the
    # activations to 8 bits for quantized matrix products, not for F16 ones.)
    assert base <= ppl["Q4_K_M (original)"] * 1.005
    assert ppl["Q4_K_M (from F16)"] <= base * 1.10
    assert sizes["Q4_K_M (from F16)"] < sizes["Q8_0 (from F16)"] < 0.6 * sizes["F16 (dequantized)"]


def test_requantizing_a_quantized_model_warns(gguf_path, tmp_path):
    path, stderr = convert(str(gguf_path), "--to", "gguf", "--quant", "q8", "--out",
                           str(tmp_path))
    assert "already quantized (Q4_K_M)" in stderr
    assert path.name == "gemma-3-270m-q8_0.gguf" and read_gguf(path).quantization == "Q8_0"
    run = run_gemma("run", "-m", str(path), "--raw", "--temp", "0", "-n", "5", "Water boils at")
    assert run.returncode == 0 and "100" in run.stdout, run.stderr


def test_gguf_to_gguf_needs_a_type_and_never_overwrites(gguf_path, tmp_path):
    result = run_gemma("convert", str(gguf_path), "--to", "gguf")
    assert result.returncode == 2 and "needs --quant" in result.stderr
    result = run_gemma("convert", str(gguf_path), "--to", "gguf", "--quant", "q4_k_m",
                       "--out", str(gguf_path))
    assert result.returncode == 2 and "exists already" in result.stderr
