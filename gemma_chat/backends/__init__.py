"""Backend registry and selection.

``auto`` picks MLX on an Apple Silicon Mac where mlx-lm is installed, llama.cpp otherwise.
Backend modules are imported only when a model is loaded, so ``gemma --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from dataclasses import dataclass

from ..errors import InvalidArgument, InvalidModelFile, missing_extra
from .base import Backend, Chunk, ModelInfo, SamplingParams, Stats

__all__ = ["Backend", "Chunk", "ModelInfo", "SamplingParams", "Stats", "BACKENDS", "load_backend",
           "choose", "ensure_available", "formats_for"]


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str  # our module, imported lazily
    cls: str
    library: str  # the inference library it needs (import name)
    package: str  # ... and its pip name
    extra: str  # the pip extra that installs it
    format: str  # the weights format it loads


BACKENDS: dict[str, BackendEntry] = {
    "llama.cpp": BackendEntry("llama.cpp", "gemma_chat.backends.llamacpp", "LlamaCppBackend",
                              "llama_cpp", "llama-cpp-python", "llama", "gguf"),
    "mlx": BackendEntry("mlx", "gemma_chat.backends.mlx", "MLXBackend", "mlx_lm", "mlx-lm", "mlx",
                        "mlx"),
}
#: The backend for a model on a server (OpenAI's chat-completions API): no weights here.
REMOTE = "openai"
CHOICES = ("auto", *BACKENDS, REMOTE)
_ALIASES = {"llamacpp": "llama.cpp", "llama": "llama.cpp", "llama-cpp": "llama.cpp",
            "remote": REMOTE, "openai-api": REMOTE}


def _installed(entry: BackendEntry) -> bool:
    return importlib.util.find_spec(entry.library) is not None


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def normalize(requested: str) -> str:
    name = _ALIASES.get(requested.strip().lower(), requested.strip().lower())
    if name not in CHOICES:
        raise InvalidArgument(f"unknown backend {requested!r}; use one of: {', '.join(CHOICES)}")
    return name


def ensure_available(requested: str) -> None:
    """Fail early, with the ``pip install`` that fixes it, for a named backend that is missing."""
    name = normalize(requested)
    if name == "auto":
        return
    if name == REMOTE:
        if importlib.util.find_spec("openai") is None:
            raise missing_extra("openai", "remote")
        return
    entry = BACKENDS[name]
    if not _installed(entry):
        raise missing_extra(entry.package, entry.extra)


def formats_for(requested: str) -> tuple[str, ...]:
    """The weight formats to look for, most preferred first, for a ``--backend`` value."""
    name = normalize(requested)
    if name == REMOTE:
        raise InvalidArgument("--backend openai talks to a model on a server: give its --url")
    if name != "auto":
        return (BACKENDS[name].format,)
    mlx = BACKENDS["mlx"]
    if is_apple_silicon() and _installed(mlx):
        return ("mlx", "gguf")
    return ("gguf",)


def choose(requested: str, fmt: str) -> BackendEntry:
    """The backend that runs weights of format ``fmt``; explains a mismatch with ``requested``."""
    name = normalize(requested)
    entry = BACKENDS[name] if name != "auto" else next(
        e for e in BACKENDS.values() if e.format == fmt)
    if entry.format != fmt:
        if fmt == "mlx":
            raise InvalidModelFile(
                f"the {entry.name} backend needs a GGUF file, and this is an MLX/safetensors "
                f"folder: convert it with `gemma convert PATH --to gguf`, or use --backend mlx"
            )
        raise InvalidModelFile(
            f"the {entry.name} backend needs an MLX model folder, and this is a GGUF file: "
            f"convert it with `gemma convert PATH.gguf --to mlx`, or use --backend llama.cpp"
        )
    ensure_available(entry.name)
    return entry


def load_backend(resolved, requested: str = "auto", options=None) -> Backend:
    """Load ``resolved`` (a :class:`~gemma_chat.resolve.ResolvedModel`) in the right backend,
    with :class:`~gemma_chat.loader.LoadOptions` (context, threads, GPU layers, verbose)."""
    entry = choose(requested, resolved.format)
    module = importlib.import_module(entry.module)
    return getattr(module, entry.cls)(resolved, **(options.kwargs() if options else {}))
