"""Teacher-forced comparisons of a converted model with its source: the logits at every position
of the same token ids, through each backend.

    ref = llama_cpp_logits(Path("gemma-3-270m-q4_k_m.gguf"), ids)
    got = mlx_logits(Path("mlx-q8"), ids)
    top1, kl = agreement(ref, got)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_cpp_logits(path: Path, ids: list[int], threads: int = 2) -> np.ndarray:
    """(len(ids), vocab) logits from llama.cpp for a GGUF."""
    import llama_cpp

    from ..backends import repack

    repack.prepare()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(256, len(ids) + 16),
                          n_threads=threads, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits through gemma-chat's MLX backend for an MLX folder, with a
    fresh prompt cache as generation has one (mlx-lm's Gemma 3n computes its KV-shared layers
    from their own unused K/V weights when called without a cache)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from ..backends import load_backend
    from ..loader import LoadOptions
    from ..resolve import resolve

    options = LoadOptions(n_ctx=max(256, len(ids) + 16))
    backend = load_backend(resolve(str(folder)), "mlx", options)
    try:
        cache = make_prompt_cache(backend._model)
        logits = backend._model(mx.array(ids)[None], cache=cache)
        return np.array(logits.astype(mx.float32)[0], dtype=np.float64)
    finally:
        backend.close()


def agreement(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(share of positions with the same top-1 token, mean KL(reference || got))."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
    return float((reference.argmax(-1) == got.argmax(-1)).mean()), kl
