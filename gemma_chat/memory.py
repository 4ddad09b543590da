"""How much memory a model will need, before it is downloaded or loaded.

    est = estimate(spec.shape, spec.arch, weights_bytes=1.6e9, n_ctx=8192)
    est.total, est.kv_cache

The estimate is what llama.cpp really allocates and touches: the weights (memory-mapped, all
read for every token), the KV cache in f16 (global layers hold the whole context; sliding-window
layers hold their window plus one micro-batch, as gemma-chat configures llama.cpp, or the whole
context with a full-size cache), the activations of one micro-batch, and a runtime overhead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .family import layer_kinds

N_UBATCH = 512
RUNTIME_OVERHEAD = 40 * 2**20  # the inference library, its threads and small buffers


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


def estimate(shape: dict, arch: str, weights_bytes: int, n_ctx: int,
             swa_full: bool = False, n_ubatch: int = N_UBATCH) -> Estimate:
    """Memory for a model of ``shape`` (the catalogue's [shape] table) at context ``n_ctx``."""
    layers = int(shape["layers"])
    kv_per_cell = int(shape["kv_heads"]) * int(shape["head_dim"]) * 2 * 2  # K and V, f16
    pattern = shape.get("sliding_window_pattern")
    n_global, n_swa = layer_kinds(arch, layers, int(pattern) if pattern else None)
    window = int(shape.get("sliding_window", n_ctx))
    swa_cells = n_ctx if swa_full else min(n_ctx, window + n_ubatch)
    kv = kv_per_cell * (n_global * n_ctx + n_swa * swa_cells)
    d_model, ffn = int(shape["d_model"]), int(shape["ffn"])
    q_dim = int(shape["heads"]) * int(shape["head_dim"])
    activations = n_ubatch * (4 * d_model + 2 * ffn + 2 * q_dim) * 4
    logits = int(shape["vocab"]) * 4
    vocab_tables = int(shape["vocab"]) * 48
    return Estimate(int(weights_bytes), kv, activations + logits, RUNTIME_OVERHEAD + vocab_tables)


def shape_from_gguf(info) -> tuple[dict, str]:
    """The [shape] table of a GGUF file's model, from its header."""
    get = info.get
    heads = int(get("attention.head_count") or 1)
    kv = get("attention.head_count_kv") or heads
    d_model = int(get("embedding_length") or 0)
    shape = {
        "layers": int(get("block_count") or 0), "d_model": d_model, "heads": heads,
        "kv_heads": int(kv), "head_dim": int(get("attention.key_length") or d_model // heads),
        "ffn": int(get("feed_forward_length") or 0),
        "vocab": int(get("tokenizer.ggml.tokens") or 0),
    }
    window = get("attention.sliding_window")
    if isinstance(window, int):
        shape["sliding_window"] = window
    return shape, info.architecture


def total_ram() -> int | None:
    """Physical memory (unified memory on a Mac), or None when it cannot be read."""
    try:
        if sys.platform == "darwin":
            import subprocess

            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
            return int(out.stdout.strip())
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def load_warning(path, n_ctx: int | None) -> str | None:
    """Checked again at load time: a warning when a GGUF model will not fit in memory."""
    from .gguf_file import check_gemma, read_gguf

    info = check_gemma(read_gguf(path))  # a damaged file is refused before any estimate
    shape, arch = shape_from_gguf(info)
    ctx = n_ctx or min(info.context_length or 8192, 8192)
    est = estimate(shape, arch, info.file_size, ctx)
    ram = total_ram()
    if ram is not None and est.total > ram * 0.9:
        return (f"{path.name} needs about {human(est.total)} at context {ctx} and this machine "
                f"has {human(ram)}: expect heavy swapping (a smaller --ctx or quantization "
                "helps)")
    return None
