"""The model catalogue: one TOML card per Gemma model, loaded and validated here.

    >>> spec = get("2b-it")
    >>> spec.name, spec.arch, spec.context
    ('gemma-2-2b-it', 'gemma2', 8192)

The cards live in the repository's ``models/`` folder and ship inside the wheel as
``gemma_chat/models/``. Every model has one full name (``gemma-2b-it``, ``gemma-1.1-7b-it``,
``gemma-2-2b-it``, ``gemma-3-270m``, ``gemma-3-1b-it``, ``gemma-3n-e4b-it``, ``gemma-4-e4b-it``,
``gemma-4-26b-a4b-it``) and unambiguous aliases: a bare size label (``2b-it``, ``e4b-it``,
``12b-it``) names the newest generation that has that label, so ``e4b`` is Gemma 4 (Gemma 3n
answers to ``3n-e4b-it`` and ``gemma3n:e4b``) and ``4b`` is still Gemma 3 (E4B is another label).
Ollama's tags (``gemma4:e4b``, ``gemma3n:e2b``) name the instruction-tuned models.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import quant as quantmod
from .errors import CatalogError, ModelNotFound
from .family import GEMMA

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ARCHITECTURES = tuple(GEMMA)
MODALITIES = {"text", "image", "audio", "video"}
FAMILIES = ("gemma-1", "gemma-1.1", "gemma-2", "gemma-3", "gemma-3n", "gemma-4")


@dataclass(frozen=True)
class Download:
    """A downloadable artifact: a Hugging Face repo and, for GGUF, one file in it."""

    repo: str
    file: str | None = None
    confirmed: bool = True  # False: the name could not be checked against the Hub
    mmproj: str | None = None  # the image/audio projector GGUF in the same repo


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue card."""

    name: str
    display: str
    family: str
    arch: str
    params_b: float
    context: int
    tuned: str  # "it" or "pt"
    hf_repo: str
    aliases: tuple[str, ...] = ()
    gated: bool = True
    license: str = "gemma"
    bundled: str | None = None  # a Python package that carries the weights
    text_part_of_multimodal: bool = False
    size_label: str | None = None  # what people call it: "E4B", "26B A4B"
    params_effective_b: float | None = None  # Gemma 3n/4 E models: without per-layer tables
    params_active_b: float | None = None  # mixture of experts: used per token
    modalities: tuple[str, ...] = ("text",)  # what the model takes in
    draft: dict = field(default_factory=dict)  # its MTP drafter (speculative decoding)
    shape: dict[str, float] = field(default_factory=dict)
    gguf: dict[str, Download] = field(default_factory=dict)  # llama.cpp type name -> file
    mlx: dict[str, Download] = field(default_factory=dict)  # 4bit / 8bit / bf16 -> repo

    @property
    def instruction_tuned(self) -> bool:
        return self.tuned == "it"

    @property
    def params(self) -> str:
        """Parameter count for people: ``2.6B``, ``268M``, ``E4B``, ``26B A4B``."""
        if self.size_label:
            return self.size_label
        if self.params_b < 1:
            return f"{self.params_b * 1000:.0f}M"
        return f"{self.params_b:.1f}B"

    def gguf_source(self, quant: str = "q4") -> tuple[str, Download] | None:
        """The catalogue's GGUF file for ``--quant`` (``q4``: Google's QAT Q4_0 first)."""
        for key in quantmod.gguf_candidates(quant):
            if key in self.gguf:
                return key, self.gguf[key]
        return None

    def mlx_source(self, quant: str = "q4") -> tuple[str, Download] | None:
        """The catalogue's MLX repo for ``--quant``."""
        key = quantmod.MLX_KEYS[quantmod.parse(quant, "mlx")]
        return (key, self.mlx[key]) if key in self.mlx else None

    def to_dict(self) -> dict[str, object]:
        def src(s: Download) -> dict[str, object]:
            d: dict[str, object] = {"repo": s.repo}
            if s.file:
                d["file"] = s.file
            if s.mmproj:
                d["mmproj"] = s.mmproj
            d["confirmed"] = s.confirmed
            return d

        return {
            "name": self.name,
            "display": self.display,
            "family": self.family,
            "arch": self.arch,
            "params": self.params,
            "params_b": self.params_b,
            "context": self.context,
            "tuned": self.tuned,
            "aliases": list(self.aliases),
            "hf_repo": self.hf_repo,
            "gated": self.gated,
            "license": self.license,
            "bundled": self.bundled,
            "text_part_of_multimodal": self.text_part_of_multimodal,
            "size_label": self.size_label,
            "params_effective_b": self.params_effective_b,
            "params_active_b": self.params_active_b,
            "modalities": list(self.modalities),
            "shape": dict(self.shape),
            "gguf": {k: src(v) for k, v in self.gguf.items()},
            "mlx": {k: src(v) for k, v in self.mlx.items()},
        }


def catalog_dir() -> Path:
    """The folder of model cards: inside the installed package, else the source tree's."""
    packaged = resources.files("gemma_chat") / "models"
    if packaged.is_dir():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parent.parent / "models"
    if source_tree.is_dir():
        return source_tree
    raise CatalogError("the model catalogue is missing from this installation; reinstall it")


_REQUIRED = {
    "name": str,
    "display": str,
    "family": str,
    "arch": str,
    "params_b": (int, float),
    "context": int,
    "tuned": str,
    "hf_repo": str,
}


def _sources(card: dict, key: str, allowed: set[str], where: str) -> dict[str, Download]:
    table = card.get(key, {})
    if not isinstance(table, dict):
        raise CatalogError(f"{where}: [{key}] must be a table")
    out = {}
    for qkey, entry in table.items():
        if qkey not in allowed:
            raise CatalogError(f"{where}: [{key}.{qkey}] is not a known quantization")
        if not isinstance(entry, dict) or not isinstance(entry.get("repo"), str):
            raise CatalogError(f"{where}: [{key}.{qkey}] needs a repo")
        file = entry.get("file")
        if key == "gguf" and not (isinstance(file, str) and file.endswith(".gguf")):
            raise CatalogError(f"{where}: [{key}.{qkey}] needs a .gguf file name")
        mmproj = entry.get("mmproj")
        if mmproj is not None and not (isinstance(mmproj, str) and mmproj.endswith(".gguf")):
            raise CatalogError(f"{where}: [{key}.{qkey}] mmproj must be a .gguf file name")
        out[qkey] = Download(entry["repo"], file, bool(entry.get("confirmed", True)), mmproj)
    return out


def parse_card(card: dict, where: str) -> ModelSpec:
    """Validate one card's TOML table and build its :class:`ModelSpec`."""
    for key, typ in _REQUIRED.items():
        if not isinstance(card.get(key), typ):
            raise CatalogError(f"{where}: missing or invalid {key!r}")
    if card["arch"] not in ARCHITECTURES:
        raise CatalogError(f"{where}: arch must be one of {', '.join(ARCHITECTURES)}")
    if card["family"] not in FAMILIES:
        raise CatalogError(f"{where}: family must be one of {', '.join(FAMILIES)}")
    if card["tuned"] not in ("it", "pt"):
        raise CatalogError(f"{where}: tuned must be 'it' or 'pt'")
    aliases = card.get("aliases", [])
    if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise CatalogError(f"{where}: aliases must be a list of strings")
    modalities = card.get("modalities", ["text"])
    if not (isinstance(modalities, list) and set(modalities) <= MODALITIES and
            "text" in modalities):
        raise CatalogError(f"{where}: modalities must list text and any of "
                           f"{', '.join(sorted(MODALITIES - {'text'}))}")
    for key in ("params_effective_b", "params_active_b"):
        if key in card and not isinstance(card[key], (int, float)):
            raise CatalogError(f"{where}: {key} must be a number")
    return ModelSpec(
        name=card["name"],
        display=card["display"],
        family=card["family"],
        arch=card["arch"],
        params_b=float(card["params_b"]),
        context=card["context"],
        tuned=card["tuned"],
        hf_repo=card["hf_repo"],
        aliases=tuple(aliases),
        gated=bool(card.get("gated", True)),
        license=str(card.get("license", "gemma")),
        bundled=card.get("bundled"),
        text_part_of_multimodal=bool(card.get("text_part_of_multimodal", False)),
        size_label=card.get("size_label"),
        params_effective_b=card.get("params_effective_b"),
        params_active_b=card.get("params_active_b"),
        modalities=tuple(modalities),
        draft=dict(card.get("draft", {})),
        shape=dict(card.get("shape", {})),
        gguf=_sources(card, "gguf", set(quantmod.GGUF_TYPES), where),
        mlx=_sources(card, "mlx", set(quantmod.MLX_KEYS.values()), where),
    )


@dataclass(frozen=True)
class Catalog:
    """All cards, and the name/alias index over them."""

    specs: tuple[ModelSpec, ...]
    index: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec | None:
        return self.index.get(name.strip().lower())

    def by_repo(self, repo: str) -> ModelSpec | None:
        """The card whose original, GGUF or MLX repo is ``repo``."""
        repo = repo.lower()
        for spec in self.specs:
            repos = {spec.hf_repo, *(s.repo for s in spec.gguf.values()),
                     *(s.repo for s in spec.mlx.values())}
            if repo in {r.lower() for r in repos}:
                return spec
        return None

    def suggest(self, name: str, n: int = 3) -> list[str]:
        return difflib.get_close_matches(name.lower(), list(self.index), n=n, cutoff=0.5)


def build(specs: list[ModelSpec]) -> Catalog:
    """Index cards by name and alias; refuse any name that would mean two models."""
    index: dict[str, ModelSpec] = {}
    for spec in specs:
        for key in (spec.name, *spec.aliases):
            key = key.lower()
            if key in index and index[key] is not spec:
                raise CatalogError(
                    f"{key!r} names both {index[key].name} and {spec.name} in the catalogue"
                )
            index[key] = spec
    return Catalog(tuple(specs), index)


@lru_cache(maxsize=1)
def load() -> Catalog:
    """Load and validate every card of the installed catalogue (cached)."""
    folder = catalog_dir()
    specs = []
    for path in sorted(folder.glob("*.toml")):
        try:
            card = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{path.name}: {exc}") from None
        spec = parse_card(card, path.name)
        if spec.name != path.stem:
            raise CatalogError(f"{path.name}: its name is {spec.name!r}; the file must match it")
        specs.append(spec)
    if not specs:
        raise CatalogError(f"no model cards in {folder}")
    specs.sort(key=lambda s: (FAMILIES.index(s.family), s.params_b, s.tuned == "it"))
    return build(specs)


def get(name: str) -> ModelSpec:
    """The card for a full name or alias; :class:`ModelNotFound` with close names otherwise."""
    catalog = load()
    spec = catalog.get(name)
    if spec is None:
        close = catalog.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `gemma models` lists them"
        raise ModelNotFound(f"unknown model {name!r}{hint}")
    return spec
