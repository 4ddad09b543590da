"""``gemma convert``: Hugging Face checkpoints and GGUF files into the model each backend runs.

    source = locate("./gemma-2-2b-it")            # a checkpoint folder, a .gguf, or a name
    job = plan(source, to="gguf", quant="q4")      # where it goes, what it becomes, warnings
    result = run(job)                              # progress(stage, done, total, detail)

Routes (each stage with the backend's own tools):

=============  ======  =====================================================================
source         to      how
=============  ======  =====================================================================
checkpoint     gguf    gguf-py's GGUFWriter (``hf_gguf``), then llama.cpp's quantizer
checkpoint     mlx     mlx-lm's convert (cast or quantize)
GGUF           gguf    llama.cpp's quantizer (re-quantize, or dequantize with ``f16``)
GGUF           mlx     gguf-py's dequantizer (``gguf_mlx``), then mlx-lm's quantizer
=============  ======  =====================================================================

Results go into the local store under the model's name (``GEMMA_HOME/models/NAME/``) unless
``out`` is given; every file and folder is written beside its destination and renamed into
place when complete.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import quant as quantmod
from .. import store
from ..errors import InvalidArgument, InvalidModelFile, ModelNotFound
from .checkpoint import Checkpoint
from .gguf_mlx import gguf_to_mlx
from .hf_gguf import write_gguf as _write_gemma_gguf
from .mmproj import has_projector, mmproj_name, write_mlx_vision, write_mmproj
from .quantize import expected_size, quantize_gguf, quantize_mlx

__all__ = ["Checkpoint", "Job", "Result", "Source", "default_target", "gguf_to_mlx", "locate",
           "plan", "quantize_gguf", "quantize_mlx", "run", "write_gguf"]

Progress = Callable[..., object]
TARGETS = ("gguf", "mlx")
_UNQUANTIZED = ("F32", "F16", "BF16")


@dataclass
class Source:
    """What is being converted: a checkpoint folder (``hf``) or a GGUF file."""

    kind: str  # "hf" or "gguf"
    path: Path
    name: str
    note: str = ""

    @property
    def size(self) -> int:
        if self.kind == "gguf":
            return self.path.stat().st_size
        return Checkpoint.open(self.path).size_on_disk()


@dataclass
class Job:
    source: Source
    to: str
    quant: str  # our vocabulary name or a llama.cpp type name
    target: Path
    warnings: list[str] = field(default_factory=list)
    projector: Path | None = None  # the image encoder's GGUF, written beside the model


@dataclass
class Result:
    job: Job
    size: int
    seconds: float


def write_gguf(ckpt: Checkpoint, dst: Path, out_type: str = "f16", *, name: str | None = None,
               progress: Progress = lambda *a: None) -> Path:
    """An unquantized GGUF of ``ckpt``: Gemma 3n and Gemma 4 by their own writers, Gemma 1-3
    by ours."""
    if ckpt.arch == "gemma4":
        from .gemma4_gguf import write_gemma4_gguf

        return write_gemma4_gguf(ckpt.folder, dst, out_type, name=name, progress=progress)
    if ckpt.arch == "gemma3n":
        from .gemma3n import write_gemma3n_gguf

        return write_gemma3n_gguf(ckpt.folder, dst, out_type, name=name, progress=progress)
    return _write_gemma_gguf(ckpt, dst, out_type, name=name, progress=progress)


def default_target() -> str:
    """MLX on an Apple Silicon Mac with mlx-lm installed, GGUF everywhere else."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        import importlib.util

        if importlib.util.find_spec("mlx_lm") is not None:
            return "mlx"
    return "gguf"


def locate(arg: str) -> Source:
    """The source for ``arg``: a checkpoint folder, a ``.gguf`` file (or a folder holding one),
    or a catalogue name: its original checkpoint in the Hugging Face cache, else a GGUF of it on
    disk. Raises :class:`ModelNotFound` when a catalogue model has neither (pull it first)."""
    from .. import catalog
    from ..hub import original_on_disk
    from ..resolve import find_local, looks_like_path

    text = arg.strip()
    if looks_like_path(text) or Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not path.exists():
            raise InvalidModelFile(f"{path} does not exist")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise InvalidModelFile(f"{path.name} is neither a .gguf file nor a checkpoint "
                                       "folder")
            return Source("gguf", path, _name_from_gguf(path))
        if (path / "config.json").is_file():
            Checkpoint.open(path)  # refuse early: architecture, pickle, missing files
            return Source("hf", path, path.resolve().name)
        from ..resolve import model_ggufs

        ggufs = model_ggufs(path)
        if ggufs:
            return Source("gguf", ggufs[0], _name_from_gguf(ggufs[0]))
        raise InvalidModelFile(f"{path} has neither config.json nor a .gguf file")
    if catalog.load().get(text) is None:
        from ..resolve import stored

        found = stored(text, "gguf", "f16") if "/" not in text else None
        if found is not None:  # a model converted into the store earlier
            return Source("gguf", found, text)
    spec = catalog.get(text)  # unknown names: a one-line error with suggestions
    original = original_on_disk(spec)
    if original is not None:
        return Source("hf", original.path, spec.name, f"the original weights ({spec.hf_repo})")
    found = find_local(spec, "gguf")
    if found is not None:
        from ..gguf_file import read_gguf

        kind = read_gguf(found.path).quantization
        return Source("gguf", found.path, spec.name,
                      f"the {kind} GGUF on disk (the original weights are not)")
    raise ModelNotFound(f"{spec.name}'s original weights ({spec.hf_repo}) are not on disk")


def _name_from_gguf(path: Path) -> str:
    from ..resolve import spec_for_file

    spec = spec_for_file(path)
    if spec is not None:
        return spec.name
    stem = path.stem
    for type_name in sorted(quantmod.GGUF_TYPES, key=len, reverse=True):
        for sep in ("-", "."):
            if stem.lower().endswith(sep + type_name):
                return stem[: -len(type_name) - 1]
    return stem


def plan(source: Source, to: str | None = None, quant: str | None = None,
         out: Path | None = None) -> Job:
    """Decide the target format, type and path; collect the warnings worth saying."""
    to = (to or default_target()).lower()
    if to not in TARGETS:
        raise InvalidArgument(f"--to {to}: use gguf or mlx")
    warnings: list[str] = []
    source_type = None
    if source.kind == "gguf":
        from ..gguf_file import check_gemma, read_gguf

        source_type = check_gemma(read_gguf(source.path)).quantization.upper()
    if quant is None:
        if source.kind == "gguf" and to == "gguf":
            raise InvalidArgument("converting a GGUF to GGUF needs --quant (q4, q5, q8, q6_k, "
                                  "q4_0, f16, ...)")
        # From a GGUF to MLX, keep its weights as they are; from a checkpoint, q4.
        quant = "bf16" if source.kind == "gguf" else "q4"
    key = quantmod.parse(quant, to)
    label = quantmod.gguf_type(key) if to == "gguf" else key
    if source_type and source_type not in _UNQUANTIZED:
        wanted = quantmod.gguf_type(key) if to == "gguf" else key
        if wanted in ("f16", "bf16", "f32"):
            warnings.append(f"the source is {source_type}: dequantizing keeps its quality (no "
                            "better) in a bigger file")
        else:
            warnings.append(f"the source is already quantized ({source_type}): quantizing it "
                            "again loses more; convert the original weights for the best result")
    if to == "gguf":
        filename = f"{source.name}-{label}.gguf"
        if out is None:
            target = store.model_dir(source.name) / filename
        else:
            out = Path(out).expanduser()
            target = out if out.suffix.lower() == ".gguf" else out / filename
    else:
        target = Path(out).expanduser() if out is not None else \
            store.model_dir(source.name) / f"mlx-{key}"
    if target.exists():
        raise InvalidArgument(f"{target} exists already; remove it or choose --out")
    if source.kind == "gguf" and to == "gguf" and target.resolve() == source.path.resolve():
        raise InvalidArgument("the output would overwrite the source")
    return Job(source, to, label, target, warnings)


def run(job: Job, progress: Progress = lambda *a: None, threads: int | None = None) -> Result:
    """Carry out ``job``; the target appears only when complete."""
    start = time.perf_counter()
    check_space(job)
    try:
        if job.to == "gguf":
            _to_gguf(job, progress, threads)
        else:
            _to_mlx(job, progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            from ..hub import NotEnoughSpace

            raise NotEnoughSpace(f"the disk filled up while writing {job.target.name}; "
                                 "nothing was kept") from None
        raise
    size = job.target.stat().st_size if job.target.is_file() else \
        sum(p.stat().st_size for p in job.target.rglob("*") if p.is_file())
    return Result(job, size, time.perf_counter() - start)


def _to_gguf(job: Job, progress: Progress, threads: int | None) -> None:
    job.target.parent.mkdir(parents=True, exist_ok=True)
    if job.source.kind == "gguf":
        from ..gguf_file import read_gguf

        n_params = read_gguf(job.source.path).n_params
        quantize_gguf(job.source.path, job.target, job.quant, n_params=n_params,
                      threads=threads, progress=progress)
        return
    ckpt = Checkpoint.open(job.source.path)
    if has_projector(ckpt):
        # Kept in F16 (F32 for an F32 model), as llama.cpp's converter does: a projector is
        # small, and quantizing it costs image quality.
        job.projector = write_mmproj(ckpt, mmproj_name(job.target),
                                     "f32" if job.quant == "f32" else "f16", progress=progress)
    if job.quant in ("f32", "f16", "bf16"):
        write_gguf(ckpt, job.target, job.quant, name=job.source.name, progress=progress)
        return
    # A lossless intermediate in the checkpoint's own precision, then llama.cpp's quantizer.
    inter = {"BF16": "bf16", "F16": "f16"}.get(ckpt.source_dtype, "f32")
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=job.target.parent) as tmp:
        full = write_gguf(ckpt, Path(tmp) / f"{job.source.name}-{inter}.gguf", inter,
                          name=job.source.name, progress=progress)
        quantize_gguf(full, job.target, job.quant, n_params=ckpt.parameter_count(),
                      threads=threads, progress=progress)


def _to_mlx(job: Job, progress: Progress) -> None:
    entry = quantmod.QUANTS[job.quant]
    job.target.parent.mkdir(parents=True, exist_ok=True)
    if job.source.kind == "hf":
        ckpt = Checkpoint.open(job.source.path)
        ckpt.require_tokenizer()
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=job.target.parent) as tmp:
            staged = stage_for_mlx(ckpt.folder, Path(tmp) / "src")
            out = quantize_mlx(staged, Path(tmp) / "out", entry.mlx_bits,
                               entry.mlx_group_size, dtype=entry.mlx_dtype, progress=progress)
            if has_projector(ckpt):  # mlx-lm drops the image encoder: kept beside, unquantized
                write_mlx_vision(ckpt, out, entry.mlx_dtype or "float16")
            os.replace(out, job.target)
        return
    if entry.mlx_bits is None:
        gguf_to_mlx(job.source.path, job.target, entry.mlx_dtype, progress=progress)
        return
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=job.target.parent) as tmp:
        full = gguf_to_mlx(job.source.path, Path(tmp) / "bf16", "bfloat16", progress=progress)
        quantize_mlx(full, job.target, entry.mlx_bits, entry.mlx_group_size, progress=progress)


def stage_for_mlx(folder: Path, staged: Path) -> Path:
    """A view of a checkpoint for mlx-lm: links to its files, and a config.json in the keys
    mlx-lm's Gemma models read (transformers 5 writes ``rope_parameters``/``layer_types``)."""
    import json

    from ..family import legacy_config_keys

    if Checkpoint.open(folder).arch == "gemma3n":
        from .gemma3n import stage_for_mlx as stage_gemma3n

        return stage_gemma3n(folder, staged)
    staged.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "config.json" and item.is_file():
            (staged / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(legacy_config_keys(config))
    if isinstance(config.get("text_config"), dict):
        config["text_config"].update(legacy_config_keys(config["text_config"]))
        # mlx-lm's Gemma 3 takes the vocabulary size from the top level (262,208 if unsaid).
        if "vocab_size" in config["text_config"]:
            config.setdefault("vocab_size", config["text_config"]["vocab_size"])
    (staged / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return staged


def check_space(job: Job) -> None:
    """Refuse before writing when the target's disk lacks room for the output (and the
    intermediate file a quantized conversion writes first)."""
    from ..hub import check_disk

    if job.source.kind == "hf":
        n_params = Checkpoint.open(job.source.path).parameter_count()
        source_bytes = job.source.size
    else:
        from ..gguf_file import read_gguf

        n_params = read_gguf(job.source.path).n_params
        source_bytes = 2 * n_params
    gguf_name = quantmod.gguf_type(job.quant) if job.to == "gguf" else \
        {"q4": "q4_k_m", "q5": "q5_k_m", "q8": "q8_0"}.get(job.quant, job.quant)
    need = expected_size(n_params, gguf_name)
    if job.to == "gguf" and job.source.kind == "hf" and job.quant not in ("f32", "f16", "bf16"):
        need += source_bytes  # the lossless intermediate
    if job.to == "mlx" and job.source.kind == "gguf" and quantmod.QUANTS[job.quant].mlx_bits:
        need += 2 * n_params  # the bf16 folder that mlx-lm then quantizes
    folder = job.target.parent
    while not folder.exists():
        folder = folder.parent
    check_disk(need, folder)


def chat_hint(result: Result) -> str:
    """The ``gemma chat`` command that opens the converted model."""
    from ..resolve import resolve

    job = result.job
    backend = "llama.cpp" if job.to == "gguf" else "mlx"
    try:
        found = resolve(job.source.name, (job.to,))
        if found.path.resolve() == job.target.resolve():
            return f"gemma chat -m {job.source.name} --backend {backend}"
    except Exception:  # noqa: BLE001 - only choosing how to print the hint
        pass
    return f"gemma chat -m {job.target} --backend {backend}"
