"""How much memory a model will need, before it is downloaded or loaded.

    est = estimate(spec.shape, spec.arch, weights_bytes=1.6e9, n_ctx=8192)
    est.total, est.kv_cache

The estimate is what llama.cpp really allocates and touches: the weights (memory-mapped, all
read for every token), the KV cache in f16 (global layers hold the whole context; sliding-window
layers hold their window plus one micro-batch, as gemma-chat configures llama.cpp, or the whole
context with a full-size cache), the activations of one micro-batch, and a runtime overhead.

Gemma 3n and 4 differ per layer, and the shape says so where it can (:func:`layer_plan`):
a sliding/global pattern per layer, KV heads per layer, a larger head on the global layers
(Gemma 4: 512), and KV-shared layers at the end that read an earlier layer's cache and hold
none of their own. A Gemma 4 global layer whose values are its keys (K=V) still gets a V cache
in llama.cpp, and is counted so.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .family import layer_kinds

N_UBATCH = 512
#: Positions the MLX backend's sliding-window caches keep beyond their window, so that a
#: roll-back of up to this many tokens (the last reply's thoughts, /retry) trims the cache
#: instead of re-evaluating it.
MLX_SWA_SLACK = 1024
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


def layer_plan(shape: dict, arch: str) -> list[tuple[bool, int]]:
    """Per layer: (sliding, KV bytes per cached token in f16; 0 for a KV-shared layer)."""
    layers = int(shape["layers"])
    sliding = shape.get("swa_layers")
    if not isinstance(sliding, list) or len(sliding) != layers:
        pattern = shape.get("sliding_window_pattern")
        n_global, _ = layer_kinds(arch, layers, int(pattern) if pattern else None)
        n_global = int(shape.get("global_layers", n_global))
        every = layers // n_global if n_global and n_global < layers else 0
        sliding = [bool(every) and (i + 1) % every != 0 for i in range(layers)]
    kv_heads = shape.get("kv_heads_per_layer")
    if not isinstance(kv_heads, list) or len(kv_heads) != layers:
        kv_heads = [int(shape.get("kv_heads_global", shape["kv_heads"])) if not swa
                    else int(shape["kv_heads"]) for swa in sliding]
    head_dim = int(shape["head_dim"])
    head_dim_global = int(shape.get("head_dim_global", head_dim))
    shared = int(shape.get("kv_shared_layers", 0))
    plan = []
    for i, swa in enumerate(sliding):
        dim = head_dim if swa else head_dim_global
        has_kv = i < layers - shared
        plan.append((bool(swa), int(kv_heads[i]) * dim * 2 * 2 if has_kv else 0))
    return plan


def kv_cache_bytes(shape: dict, arch: str, n_ctx: int, swa_full: bool = False,
                   n_ubatch: int = N_UBATCH) -> int:
    """The f16 KV cache llama.cpp allocates for ``n_ctx`` tokens of one sequence."""
    window = int(shape.get("sliding_window", n_ctx))
    # llama.cpp's sliding-window cache: the window plus one micro-batch, padded to 256 cells.
    swa_cells = n_ctx if swa_full else min(n_ctx, -(-(window + n_ubatch) // 256) * 256)
    return sum(per_cell * (swa_cells if swa else n_ctx)
               for swa, per_cell in layer_plan(shape, arch))


def mlx_kv_cache_bytes(shape: dict, arch: str, n_tokens: int, slack: int,
                       dtype_bytes: int = 2) -> int:
    """What mlx-lm's caches hold after ``n_tokens`` tokens of one conversation, in the model's
    dtype (``dtype_bytes`` an element): global layers grow in steps of 256 cells; the rotating
    sliding-window caches grow by up to 255 cells past what they hold, up to their window plus
    ``slack`` (the MLX backend's room for roll-backs)."""
    window = int(shape.get("sliding_window", n_tokens))
    cells = -(-n_tokens // 256) * 256
    swa_cells = min(n_tokens + 255, window + slack)
    return sum(per_cell * dtype_bytes // 2 * (swa_cells if swa else cells)
               for swa, per_cell in layer_plan(shape, arch))


def estimate(shape: dict, arch: str, weights_bytes: int, n_ctx: int,
             swa_full: bool = False, n_ubatch: int = N_UBATCH) -> Estimate:
    """Memory for a model of ``shape`` (the catalogue's [shape] table) at context ``n_ctx``."""
    kv = kv_cache_bytes(shape, arch, n_ctx, swa_full, n_ubatch)
    d_model, ffn = int(shape["d_model"]), int(shape["ffn"])
    q_dim = int(shape["heads"]) * int(shape["head_dim"])
    activations = n_ubatch * (4 * d_model + 2 * ffn + 2 * q_dim) * 4
    logits = int(shape["vocab"]) * 4
    vocab_tables = int(shape["vocab"]) * 48
    return Estimate(int(weights_bytes), kv, activations + logits, RUNTIME_OVERHEAD + vocab_tables)


#: The least context chosen by default (unless the model's own is smaller).
MIN_DEFAULT_CTX = 8192
#: The share of physical memory a default context may bring the estimate up to.
MEMORY_BUDGET = 0.5


def default_context(shape: dict, arch: str, weights_bytes: int, n_ctx_train: int,
                    ram: int | None = None) -> tuple[int, str]:
    """(context, why): the largest of the model's own context and its halvings whose estimate
    stays within :data:`MEMORY_BUDGET` of this machine's memory, never below
    :data:`MIN_DEFAULT_CTX`. Gemma 3n/4's small sliding windows and shared KV make long
    contexts cheap; a 27B at 128K is not."""
    ram = total_ram() if ram is None else ram
    floor = min(n_ctx_train, MIN_DEFAULT_CTX)
    if ram is None:
        return floor, f"context {floor:,} tokens (this machine's memory is unknown)"
    n_ctx = n_ctx_train
    while n_ctx > floor and \
            estimate(shape, arch, weights_bytes, n_ctx).total > ram * MEMORY_BUDGET:
        n_ctx //= 2
    n_ctx = max(n_ctx, floor)
    need = estimate(shape, arch, weights_bytes, n_ctx).total
    whole = " (the model's own)" if n_ctx == n_ctx_train else \
        f" (the model allows {n_ctx_train:,})"
    return n_ctx, (f"context {n_ctx:,} tokens{whole}: about {human(need)} with the weights, "
                   f"on a machine with {human(ram)}; --ctx sets another")


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
    # Gemma 3n / 4: per-layer arrays and the keys of their global layers.
    prefix = info.architecture + "."
    if prefix + "feed_forward_length" in info.arrays:  # per layer: the widest sizes the buffers
        shape["ffn"] = max(int(v) for v in info.read_array(prefix + "feed_forward_length"))
    for key, name in (("attention.sliding_window_pattern", "swa_layers"),
                      ("attention.head_count_kv", "kv_heads_per_layer")):
        if prefix + key in info.arrays:
            values = info.read_array(prefix + key)
            shape[name] = [bool(v) for v in values] if name == "swa_layers" else \
                [int(v) for v in values]
            if name == "kv_heads_per_layer":
                shape["kv_heads"] = max(shape[name])
    swa_dim = get("attention.key_length_swa")
    if isinstance(swa_dim, int):  # key_length is then the global layers' head size
        shape["head_dim_global"], shape["head_dim"] = shape["head_dim"], swa_dim
    shared = get("attention.shared_kv_layers")
    if isinstance(shared, int):
        shape["kv_shared_layers"] = shared
    return shape, info.architecture


def shape_from_config(config: dict) -> tuple[dict, str | None]:
    """The [shape] table of a Hugging Face or MLX model folder's ``config.json`` (the text
    model's part of a multimodal one), and its architecture."""
    from .family import GEMMA, architecture_of, layer_types, legacy_config_keys

    arch = architecture_of(config.get("model_type"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    text = {**text, **legacy_config_keys(text)}  # Gemma 4's global keys, Gemma 2/3's pattern
    layers, hidden = int(text["num_hidden_layers"]), int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 8)
    ffn = text.get("intermediate_size") or 0
    shape = {"layers": layers, "d_model": hidden, "heads": heads,
             "kv_heads": int(text.get("num_key_value_heads") or heads),
             "head_dim": int(text.get("head_dim") or hidden // heads),
             "ffn": max(ffn) if isinstance(ffn, list) else int(ffn),
             "vocab": int(text.get("vocab_size") or 0)}
    if arch in GEMMA and GEMMA[arch].sliding_window_pattern and text.get("sliding_window"):
        shape["sliding_window"] = int(text["sliding_window"])
        types = text.get("layer_types")
        if not isinstance(types, list) or len(types) != layers:
            types = layer_types(arch, layers)
        shape["swa_layers"] = [t == "sliding_attention" for t in types]
    for theirs, ours in (("global_head_dim", "head_dim_global"),
                         ("num_global_key_value_heads", "kv_heads_global"),
                         ("num_kv_shared_layers", "kv_shared_layers")):
        if text.get(theirs):
            shape[ours] = int(text[theirs])
    return shape, arch


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
