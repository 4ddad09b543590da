"""Quality of `gemma convert` on the real Gemma 3 270M: GGUF -> MLX (bf16, 8-bit, 4-bit)
against llama.cpp on the source GGUF, teacher-forced over N positions of English text; and the
perplexity of GGUF re-quantizations (F16 dequantized, then Q8_0 and Q4_K_M from it).

    python benchmarks/convert_check.py [-n 300] [--out DIR]

Conversions run through the `gemma` CLI into DIR (default: a temporary folder). Runs unchanged
on a Mac (MLX then uses the GPU).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gemma_chat import catalog
from gemma_chat.convert.check import agreement, llama_cpp_logits, mlx_logits
from gemma_chat.resolve import bundled_path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
GEMMA = Path(sys.executable).with_name("gemma")


def convert(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(GEMMA), "convert", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logprobs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return math.exp(-logprobs[np.arange(len(ids) - 1), ids[1:]].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="teacher-forced positions")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import llama_cpp

    gguf = bundled_path(catalog.get("gemma-3-270m"))
    out = args.out or Path(tempfile.mkdtemp(prefix="convert-check-"))
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    english = vocab.tokenize((DATA / "english.txt").read_text().encode(), add_bos=True)
    public = vocab.tokenize((DATA / "public_domain.txt").read_text().encode(), add_bos=True)
    vocab.close()
    ids = english[: args.n]
    reference = llama_cpp_logits(gguf, ids)
    print(f"GGUF -> MLX, teacher-forced over {len(ids)} positions against llama.cpp "
          f"({gguf.name}):\n")
    print("| MLX | size | convert s | forward s | top-1 | mean KL |")
    print("|---|---:|---:|---:|---:|---:|")
    for quant in ("bf16", "q8", "q4"):
        folder = out / f"mlx-{quant}"
        seconds = convert(str(gguf), "--to", "mlx", "--quant", quant, "--out", str(folder))
        start = time.perf_counter()
        logits = mlx_logits(folder, ids)
        forward = time.perf_counter() - start
        top1, kl = agreement(reference, logits)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"| {quant} | {size / 1e6:.0f} MB | {seconds:.0f} | {forward:.1f} | {top1:.3f} "
              f"| {kl:.4f} |", flush=True)
    print(f"\nGGUF re-quantization, perplexity over {len(public)} tokens of "
          "tests/data/public_domain.txt:\n")
    print("| GGUF | size | convert s | perplexity |\n|---|---:|---:|---:|")
    f16 = out / "gemma-3-270m-f16.gguf"
    files = {"Q4_K_M (source)": (gguf, 0.0),
             "F16 (dequantized)": (f16, convert(str(gguf), "--to", "gguf", "-q", "f16",
                                                "--out", str(f16)))}
    for kind in ("q8_0", "q4_k_m"):
        path = out / f"gemma-3-270m-{kind}-from-f16.gguf"
        files[f"{kind.upper()} (from F16)"] = (path, convert(str(f16), "--to", "gguf", "-q",
                                                              kind, "--out", str(path)))
    for name, (path, seconds) in files.items():
        ppl = perplexity(llama_cpp_logits(path, public), public)
        print(f"| {name} | {path.stat().st_size / 1e6:.0f} MB | {seconds:.0f} | {ppl:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
