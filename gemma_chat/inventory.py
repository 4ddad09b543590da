"""The models on disk: catalogue models wherever they are, and everything in the store.

    for model in local_models():
        print(model.name, model.format, model.quantization, model.size, model.path)
    remove(local_models_of("2b-it"))
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .resolve import ResolvedModel


@dataclass(frozen=True)
class LocalModel:
    """One model's weights on disk."""

    name: str
    format: str  # "gguf" or "mlx"
    quantization: str
    size: int  # bytes
    path: Path
    origin: str  # "store", "bundled", "hf-cache" or "path"


def quantization_of(found: ResolvedModel) -> str:
    """A GGUF's quantization from its header; an MLX folder's bits from its config."""
    if found.format == "gguf":
        from .gguf_file import read_gguf

        return read_gguf(found.path).quantization
    config = found.path / "config.json"
    try:
        bits = json.loads(config.read_text()).get("quantization", {}).get("bits")
    except (OSError, ValueError, AttributeError):
        bits = None
    return f"{bits}-bit" if bits else "unquantized"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_models() -> list[LocalModel]:
    """Every model on disk: catalogue models wherever they are, and every GGUF and MLX folder
    in the store (converted ones too), each once."""
    from . import catalog, store
    from .resolve import find_local, on_disk

    found: list[ResolvedModel] = []
    cat = catalog.load()
    for spec in cat.specs:
        for fmt in on_disk(spec):
            hit = find_local(spec, fmt)
            if hit is not None:
                found.append(hit)
    root = store.models_dir()
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        spec = cat.get(folder.name)
        for item in sorted(folder.iterdir()):
            if item.name.startswith("."):
                continue  # a conversion in progress
            if item.suffix == ".gguf" and item.is_file():
                found.append(ResolvedModel(folder.name, item, "gguf", "store", spec))
            elif item.is_dir() and (item / "config.json").is_file():
                found.append(ResolvedModel(folder.name, item, "mlx", "store", spec))
    out, seen = [], set()
    for hit in found:
        if hit.path.resolve() in seen:
            continue
        seen.add(hit.path.resolve())
        out.append(LocalModel(hit.name, hit.format, quantization_of(hit), _size(hit.path),
                              hit.path, hit.origin))
    return out


def remove(name: str, models: list[LocalModel]) -> None:
    """Delete ``models`` (all of catalogue model ``name``): its store folder, and its revisions
    in the Hugging Face cache (with huggingface_hub)."""
    from . import store

    for model in models:
        if model.origin in ("store", "bundled"):
            shutil.rmtree(store.model_dir(name), ignore_errors=True)
        elif model.origin == "hf-cache":
            _remove_from_hf_cache(model.path)


def _remove_from_hf_cache(path: Path) -> None:
    """Delete the cached revision that holds ``path`` (its blobs too)."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir()
    real = path.resolve()
    for repo in info.repos:
        for revision in repo.revisions:
            if any(f.file_path == path or f.blob_path == real for f in revision.files) or \
                    revision.snapshot_path == path:
                info.delete_revisions(revision.commit_hash).execute()
                return
