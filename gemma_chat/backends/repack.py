"""Weight repacking in llama.cpp's CPU backend, made safe on CPUs where its AMX kernels fault.

llama.cpp puts quantized weights into "extra" CPU buffer types that lay them out for faster
matrix multiplies: ``AMX`` (Intel AMX tiles; built in by a native x86 build on a CPU that lists
``amx_int8``) and ``CPU_REPACK`` (AVX2/NEON interleaved blocks). On some Xeon VMs the first AMX
tile instruction of a prompt batch dies with SIGILL although the kernel grants the tile state: a
hypervisor that does not keep it. Nothing in-process can survive that, so::

    state = prepare()      # before the first llama.cpp model load of this process

finds out once, in a child process that loads a tiny generated model and evaluates a prompt
batch with each candidate, which buffer types work on this CPU and this llama.cpp build; keeps
the answer in ``GEMMA_HOME/llama-cpp-check.json`` keyed by what decides it (CPU model and flags,
llama-cpp-python version, the library file, llama.cpp's feature list); and edits this process's
list of extra buffer types to match. Where the list has no AMX (AMD, Apple, ARM, non-native
builds) there is nothing to find out and nothing changes.

Modes: ``on`` (llama.cpp's default: every extra type), ``no-amx`` (all but AMX: CPU_REPACK
stays; ``tensor_buft_overrides`` cannot say that, since an override to CPU re-selects among the
extra types and an override to CPU_REPACK skips its support check), ``off`` (none, as
``llama_model_params.use_extra_bufts = false`` or llama-bench ``--repack 0``). The setting
``repack`` (``gemma config set repack off``) or ``GEMMA_REPACK`` forces ``on`` or ``off``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, describe_exit

MODES = ("on", "no-amx", "off")
SETTINGS = ("auto", "on", "no-amx", "off")
ENV = "GEMMA_REPACK"
RECORD_NAME = "llama-cpp-check.json"
PROBE_TIMEOUT_S = 60.0
_RECORDS_KEPT = 16
_FAULTY = "AMX"  # the buffer type whose kernels fault on some VMs

#: What each mode means, for ``gemma show``, ``--verbose`` and ``gemma bench``.
DESCRIPTIONS = {
    "on": "on",
    "no-amx": "on, without AMX",
    "off": "off",
}


@dataclass
class ProbeResult:
    """How one probe child ended: ``ok``, or what went wrong in words."""

    mode: str
    ok: bool
    detail: str = ""


@dataclass
class RepackState:
    """This process's weight repacking: the mode in force and how it was decided."""

    mode: str  # "on", "no-amx" or "off"
    source: str  # "default" (no AMX here), "record", "probe", "setting", "environment"
    available: tuple[str, ...] = ()  # llama.cpp's extra buffer types before any change
    active: tuple[str, ...] = ()  # ... and after
    finding: str = ""  # what the probe found, where it found a fault
    note: str = ""  # one line for the user, the first time a fallback is decided

    def describe(self) -> str:
        text = DESCRIPTIONS[self.mode]
        kinds = ", ".join(self.active) if self.active else "none"
        why = {"setting": "set by `gemma config set repack`", "environment": f"set by {ENV}",
               "record": "checked on this machine", "probe": "checked on this machine",
               "default": "llama.cpp's default"}[self.source]
        text = f"{text} ({kinds}; {why})"
        if self.finding:
            text += f": {self.finding}"
        return text


# -- llama.cpp's list of CPU extra buffer types ----------------------------------------------

_lock = threading.Lock()
_state: RepackState | None = None
_original: list[int] | None = None  # the list's pointers as llama.cpp made it


def _ggml():
    """The ggml functions we call, from the library llama-cpp-python loaded."""
    from llama_cpp import llama_cpp as lib_module

    lib = lib_module._lib
    fns = {
        "ggml_backend_dev_by_type": (ctypes.c_void_p, [ctypes.c_int]),
        "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_backend_reg_get_proc_address": (ctypes.c_void_p, [ctypes.c_void_p,
                                                                 ctypes.c_char_p]),
        "ggml_backend_buft_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in fns.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _extra_list():
    """The CPU device's NULL-terminated array of extra buffer types, which llama.cpp reads at
    every model load (``make_cpu_buft_list``), or None where this build has none."""
    lib = _ggml()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return None
    reg = lib.ggml_backend_dev_backend_reg(dev)
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    array = get(dev)
    return array or None


def _read(array) -> list[int]:
    out, i = [], 0
    while array[i]:
        out.append(array[i])
        i += 1
    return out


def _names(pointers: Sequence[int]) -> tuple[str, ...]:
    lib = _ggml()
    return tuple(lib.ggml_backend_buft_name(p).decode() for p in pointers)


def available_types() -> tuple[str, ...]:
    """llama.cpp's CPU extra buffer types as the build made them (``("AMX", "CPU_REPACK")``)."""
    global _original
    array = _extra_list()
    if array is None:
        return ()
    if _original is None:
        _original = _read(array)
    return _names(_original)


def apply(mode: str) -> tuple[str, ...]:
    """Make every later model load in this process use the extra buffer types of ``mode``;
    returns the ones now in force."""
    if mode not in MODES:
        raise InvalidArgument(f"unknown repack mode {mode!r}; use one of: {', '.join(MODES)}")
    available_types()
    array = _extra_list()
    if array is None:
        return ()
    names = _names(_original)
    keep = [p for p, name in zip(_original, names)
            if mode == "on" or (mode == "no-amx" and name != _FAULTY)]
    # The array has room for the original entries and their NULL: we only ever shorten it.
    for i, pointer in enumerate([*keep, None]):
        array[i] = pointer
    active = _names(_read(array))
    if list(active) != [n for n, p in zip(names, _original) if p in keep]:
        raise RuntimeError(f"llama.cpp's buffer type list did not take the change: {active}")
    return active


# -- the setting ------------------------------------------------------------------------------

def setting() -> tuple[str, str]:
    """The user's choice and where it came from: ``GEMMA_REPACK`` first, then the config."""
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        if env not in SETTINGS:
            raise InvalidArgument(f"{ENV}={env!r} is not one of: {', '.join(SETTINGS)}")
        return env, "environment"
    from .. import config

    value = config.get("repack")
    return (value or "auto"), "setting"


# -- the record -------------------------------------------------------------------------------

def _cpu_identity() -> str:
    """CPU model and flags: from /proc/cpuinfo on Linux, else what the platform says."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} | {flags}"


def machine_key() -> dict[str, str]:
    """What decides whether the extra buffer types fault: the CPU, the llama.cpp build."""
    import llama_cpp
    from llama_cpp import llama_cpp as lib_module

    lib_path = Path(getattr(lib_module._lib, "_name", "") or "")
    try:
        st = lib_path.stat()
        build = f"{lib_path} {st.st_size} {int(st.st_mtime)}"
    except OSError:
        build = str(lib_path)
    system_info = llama_cpp.llama_print_system_info()
    if isinstance(system_info, bytes):
        system_info = system_info.decode("utf-8", errors="replace")
    return {"cpu": _cpu_identity(), "llama_cpp_python": llama_cpp.__version__,
            "library": build, "system_info": system_info.strip()}


def _digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def record_path() -> Path:
    from ..store import gemma_home

    return gemma_home() / RECORD_NAME


def _load_records(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: probe again and write a good one
    records = data.get("records") if isinstance(data, dict) else None
    return {k: v for k, v in records.items() if isinstance(v, dict)} \
        if isinstance(records, dict) else {}


def read_record(key: dict[str, str], path: Path | None = None) -> dict | None:
    """The stored decision for this key, if any (and well-formed)."""
    found = _load_records(path or record_path()).get(_digest(key))
    if found and found.get("mode") in MODES:
        return found
    return None


def write_record(key: dict[str, str], mode: str, finding: str, path: Path | None = None) -> None:
    """Store one decision; the file is replaced atomically and keeps the latest few keys."""
    from ..store import atomic_path

    path = path or record_path()
    records = _load_records(path)
    records[_digest(key)] = {"mode": mode, "finding": finding, "checked": time.time(),
                             "cpu": key["cpu"].split(" | ")[0],
                             "llama_cpp_python": key["llama_cpp_python"]}
    newest = sorted(records.items(), key=lambda kv: kv[1].get("checked", 0))[-_RECORDS_KEPT:]
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"records": dict(newest)}, indent=1) + "\n",
                           encoding="utf-8")
    except OSError:
        pass  # a read-only or full disk: the probe runs again next time, nothing is lost


# -- probing in a child process ---------------------------------------------------------------

def probe(mode: str, command: Sequence[str] | None = None,
          timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the check of ``mode`` in a child process (never in ours: a fault kills it)."""
    command = list(command or [sys.executable, "-m", "gemma_chat.backends.repack", mode])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(mode, False, f"hung for {timeout:.0f} s")
    except OSError as exc:
        return ProbeResult(mode, False, f"could not start ({exc})")
    if proc.returncode == 0:
        return ProbeResult(mode, True)
    if proc.returncode < 0:
        return ProbeResult(mode, False, f"crashed with {describe_exit(proc.returncode)}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1].removeprefix("error: ") if lines else describe_exit(proc.returncode)
    return ProbeResult(mode, False, f"failed: {last}")


def choose(available: Sequence[str], run_probe: Callable[[str], ProbeResult]) -> tuple[str, str]:
    """The fastest mode that works, and what was found on the way (empty when ``on`` works).

    Without AMX in ``available`` nothing is probed: the other types have no known fault.
    """
    if _FAULTY not in available:
        return "on", ""
    first = run_probe("on")
    if first.ok:
        return "on", ""
    finding = f"llama.cpp's AMX kernels {first.detail} in a test run on this CPU"
    if any(name != _FAULTY for name in available):
        second = run_probe("no-amx")
        if second.ok:
            return "no-amx", finding
        finding += f", and the other repacked kernels {second.detail}"
    return "off", finding


def _note(mode: str, finding: str) -> str:
    instead = ("using the other weight repacking (CPU_REPACK) only, which costs AMX's faster "
               "prompt processing" if mode == "no-amx" else
               "weights are not repacked, which slows prompt processing (about 1.4x on a Q4_0 "
               "model)")
    return (f"{finding}: {instead}. Checked once and remembered; GEMMA_REPACK=on (or `gemma "
            f"config set repack on`) forces repacking, GEMMA_REPACK=off turns it off")


def decide(*, run_probe: Callable[[str], ProbeResult] = probe,
           available: Sequence[str] | None = None, key: dict[str, str] | None = None,
           records: Path | None = None) -> RepackState:
    """The mode for this process, from the setting, a record, or a probe (then recorded)."""
    wanted, where = setting()
    available = tuple(available_types() if available is None else available)
    if wanted != "auto":
        return RepackState(wanted, where, available)
    if _FAULTY not in available:
        return RepackState("on", "default", available)
    key = key or machine_key()
    found = read_record(key, records)
    if found is not None:
        return RepackState(found["mode"], "record", available,
                           finding=str(found.get("finding", "")))
    mode, finding = choose(available, run_probe)
    write_record(key, mode, finding, records)
    note = _note(mode, finding) if mode != "on" else ""
    return RepackState(mode, "probe", available, finding=finding, note=note)


def prepare() -> RepackState:
    """Decide once per process and apply it before llama.cpp loads a model; idempotent.

    The first call may take a second or two (the probe) on a CPU with AMX; later processes
    read the record in milliseconds. The returned state's ``note`` is set only by the call
    that probed and fell back: show it to the user once.
    """
    global _state
    with _lock:
        if _state is not None:
            return RepackState(**{**_state.__dict__, "note": ""})
        state = decide()
        state.active = apply(state.mode) if state.available else ()
        _state = state
        return state


# -- the child --------------------------------------------------------------------------------

_PROBE_BATCH = 64  # AMX tiles are used for batches of 2 or more rows; decode uses VNNI


def probe_tensors(rng, n_vocab: int, n_embd: int, n_ff: int, n_head: int,
                  head_dim: int) -> dict:
    """Random f32 weights of a one-layer Gemma 3, by llama.cpp tensor name."""
    import numpy as np

    def weight(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    layer = {"attn_q": weight(n_head * head_dim, n_embd), "attn_k": weight(head_dim, n_embd),
             "attn_v": weight(head_dim, n_embd), "attn_output": weight(n_embd, n_head * head_dim),
             "ffn_gate": weight(n_ff, n_embd), "ffn_up": weight(n_ff, n_embd),
             "ffn_down": weight(n_embd, n_ff), "attn_norm": norm(n_embd),
             "attn_q_norm": norm(head_dim), "attn_k_norm": norm(head_dim),
             "post_attention_norm": norm(n_embd), "ffn_norm": norm(n_embd),
             "post_ffw_norm": norm(n_embd)}
    return {"token_embd.weight": weight(n_vocab, n_embd), "output_norm.weight": norm(n_embd),
            **{f"blk.0.{name}.weight": value for name, value in layer.items()}}


def build_probe_model(folder: Path) -> Path:
    """A tiny Gemma 3 GGUF (1 layer, 256 wide, 512-token vocabulary), quantized Q4_K_M by
    llama.cpp's own quantizer so its weights are the types (Q4_K, Q6_K, ...) real models use."""
    import gguf
    import llama_cpp
    import numpy as np

    rng = np.random.default_rng(0)
    n_embd, n_ff, n_head, head_dim, n_vocab = 256, 512, 2, 128, 512
    f32 = folder / "probe-f32.gguf"
    writer = gguf.GGUFWriter(str(f32), "gemma3")
    writer.add_name("gemma-chat probe")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(1)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(512)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    types = [3] * 4 + [6] * 256 + [1] * (n_vocab - 260)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)

    for name, value in probe_tensors(rng, n_vocab, n_embd, n_ff, n_head, head_dim).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = folder / "probe-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError("llama.cpp could not quantize the probe model")
    return out


def _logits(path: Path, ids: list[int], threads: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=0, logits_all=True,
                          verbose=False)
    try:
        llm.eval(ids[:-4])  # a prompt batch: the matrix-matrix kernels
        for token in ids[-4:]:  # then single tokens: the matrix-vector kernels
            llm.eval([token])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _child(mode: str) -> int:
    """Load the probe model with ``mode``'s buffer types and check a prompt batch against the
    same model without any: exits 0 when it runs and agrees."""
    import numpy as np

    from .llamacpp import _quiet_logs, default_threads

    _quiet_logs(False)
    threads = default_threads()
    ids = [2] + [int(t) for t in np.random.default_rng(1).integers(260, 512, _PROBE_BATCH + 3)]
    with tempfile.TemporaryDirectory(prefix="gemma-probe-") as tmp:
        path = build_probe_model(Path(tmp))
        apply(mode)
        got = _logits(path, ids, threads)
        apply("off")
        want = _logits(path, ids, threads)
    if not np.isfinite(got).all():
        print(f"error: {mode}: logits that are not finite", file=sys.stderr)
        return 3
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    if err > 0.05 * scale:
        print(f"error: {mode}: logits differ from unrepacked weights by {err:.3g} "
              f"(of {scale:.3g})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1] if len(sys.argv) > 1 else "on"))
