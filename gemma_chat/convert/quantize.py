"""Quantization with the backends' own quantizers: llama.cpp's for GGUF, mlx-lm's for MLX.

    quantize_gguf(Path("model-f16.gguf"), Path("model-q4_k_m.gguf"), "q4_k_m")

llama.cpp's ``llama_model_quantize`` runs in a worker thread (ctypes releases the GIL), so the
caller can show progress, measured as the output file's growth against its expected size, and
Ctrl-C stays responsive; an interrupted or failed run leaves no output behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .. import store
from ..errors import BackendError, missing_extra

Progress = Callable[..., object]  # (stage, done, total, detail="")

#: llama.cpp file types by our GGUF type names.
LLAMA_FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "f32": "LLAMA_FTYPE_ALL_F32",
}

#: Approximate bits per weight of each type on Gemma (for progress and disk-space checks; the
#: K-quant mixes keep some tensors at higher precision, the token embedding among them).
BITS_PER_WEIGHT = {"q4_0": 4.6, "q4_k_m": 5.0, "q5_k_m": 5.8, "q6_k": 6.6, "q8_0": 8.5,
                   "f16": 16.0, "bf16": 16.0, "f32": 32.0}


def expected_size(n_params: int, type_name: str) -> int:
    return int(n_params * BITS_PER_WEIGHT[type_name] / 8) + (1 << 20)


def quantize_gguf(src: Path, dst: Path, type_name: str, *, n_params: int | None = None,
                  threads: int | None = None, progress: Progress = lambda *a: None) -> Path:
    """Write ``src`` re-encoded as ``type_name`` at ``dst`` with llama.cpp's quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise missing_extra("llama-cpp-python", "llama") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[type_name])
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True  # the caller warns when the source is already quantized
    total = expected_size(n_params, type_name) if n_params else None
    label = f"quantizing to {type_name.upper()} (llama.cpp)"
    with store.atomic_path(Path(dst)) as tmp, _llama_log() as log:
        result: dict[str, int] = {}

        def work() -> None:
            result["rc"] = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params))

        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            size = tmp.stat().st_size if tmp.exists() else 0
            progress(label, min(size, total) if total else size, total)
        if result.get("rc", 1) != 0 or not tmp.is_file():
            last = next((line for line in reversed(log) if line.strip()), "")
            raise BackendError(f"llama.cpp could not quantize {Path(src).name} to "
                               f"{type_name.upper()}: {last.strip() or 'no reason given'}")
        progress(label, total or tmp.stat().st_size, total or tmp.stat().st_size)
    return Path(dst)


@contextlib.contextmanager
def _llama_log():
    """Collect llama.cpp's log lines (per-tensor notes, errors) instead of printing them;
    GEMMA_DEBUG=1 prints them as well. The library's own handler is restored afterwards."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    debug = bool(os.environ.get("GEMMA_DEBUG"))

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        line = text.decode("utf-8", "replace")
        lines.append(line)
        if debug:
            print(line, end="", file=sys.stderr)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_mlx(src: Path, dst: Path, bits: int | None, group_size: int = 64,
                 dtype: str | None = None, progress: Progress = lambda *a: None) -> Path:
    """An MLX folder from the safetensors folder ``src`` with mlx-lm's own converter:
    quantized to ``bits`` (group size ``group_size``), or cast to ``dtype`` when ``bits`` is
    None. mlx-lm's console output is kept off stdout (shown with GEMMA_DEBUG=1)."""
    try:
        from mlx_lm import convert
    except ImportError:
        raise missing_extra("mlx-lm", "mlx") from None
    label = f"quantizing to {bits}-bit (mlx-lm)" if bits else f"converting to {dtype} (mlx-lm)"
    progress(label, 0, None)
    log = io.StringIO()
    with store.atomic_path(Path(dst)) as tmp:
        with contextlib.redirect_stdout(log):
            convert(str(src), mlx_path=str(tmp), quantize=bits is not None, q_bits=bits,
                    q_group_size=group_size if bits else None, dtype=dtype)
        if os.environ.get("GEMMA_DEBUG"):
            print(log.getvalue(), file=sys.stderr)
    progress(label, 1, 1)
    return Path(dst)
