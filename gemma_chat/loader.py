"""Opening a model by name: resolve it, pull it on first use where allowed, load it.

    with open_model("2b-it", options=LoadOptions(n_ctx=4096)) as model:
        text, stats = collect(model.backend.stream(prompt, SamplingParams()))

The command line, the chat, the server and the benchmarks all open models through here; the
questions a terminal asks (download now? paste a token?) come in as callables, so scripts and
tests answer them without one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .backends.base import Backend
from .errors import GatedRepo, ModelNotFound
from .resolve import ResolvedModel


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; ``None`` leaves the choice to the backend."""

    n_ctx: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    image_tokens: int | None = None  # Gemma 4's picture budget (llama.cpp)
    verbose: bool = False

    def kwargs(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class PullPolicy:
    """What to do about a catalogue model that is not on disk.

    ``yes`` downloads without asking; else ``ask(question)`` decides (None: never download).
    ``on_gated(error)`` may log in (returns True) so the download is tried once more.
    """

    yes: bool = False
    ask: Callable[[str], bool] | None = None
    on_gated: Callable[[GatedRepo], bool] | None = None
    console: object = None  # where progress bars go (a Rich console), or None
    quiet: bool = False
    progress: object = None  # sees each file's bytes instead (hub.pull's ``progress``)


NEVER = PullPolicy()


@dataclass
class OpenModel:
    """A resolved model, loaded in a backend; closing it frees the backend."""

    resolved: ResolvedModel
    backend: Backend
    load_s: float
    notes: list[str] = field(default_factory=list)  # one-time notes for the user

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> OpenModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pull(model: str, fmt: str, quant: str, policy: PullPolicy = NEVER) -> ResolvedModel:
    """Download ``model`` (``hub.pull``); a gated repo goes through ``policy.on_gated`` once."""
    from . import hub

    options = dict(quiet=policy.quiet, console=policy.console, progress=policy.progress)
    try:
        return hub.pull(model, fmt, quant, **options)
    except GatedRepo as exc:
        if policy.on_gated is None or not policy.on_gated(exc):
            raise
        return hub.pull(model, fmt, quant, **options)


def find(model: str, backend: str = "auto", policy: PullPolicy = NEVER) -> ResolvedModel:
    """The weights for ``model`` on disk, pulled first when the policy allows; never a
    download without ``policy.yes`` or a yes from ``policy.ask``."""
    from . import catalog, hub
    from .backends import ensure_available, formats_for
    from .resolve import resolve

    ensure_available(backend)
    formats = formats_for(backend)
    try:
        return resolve(model, formats)
    except ModelNotFound:
        spec = catalog.load().get(model)
        if spec is None or hub.offline():
            raise
        if not policy.yes:
            if policy.ask is None:
                raise ModelNotFound(f"{spec.name} is not on disk: run `gemma pull {model}` "
                                    "first (or pass --yes to download it now)") from None
            if not policy.ask(f"{spec.name} is not on disk. Download it now?"):
                raise
        return pull(model, formats[0], "q4", policy)


def load(resolved: ResolvedModel, backend: str = "auto",
         options: LoadOptions = LoadOptions()) -> OpenModel:
    """Load resolved weights in the backend that runs their format."""
    from .backends import load_backend
    from .prompt import format_for

    start = time.perf_counter()
    loaded = load_backend(resolved, backend, options)
    notes = list(getattr(loaded, "notes", ()))
    info = loaded.info
    fmt_note = getattr(format_for(info.architecture, info.chat_template), "note", "")
    if fmt_note:
        notes.append(fmt_note)
    return OpenModel(resolved, loaded, time.perf_counter() - start, notes)


def open_model(model: str, backend: str = "auto", options: LoadOptions = LoadOptions(),
               policy: PullPolicy = NEVER) -> OpenModel:
    """:func:`find` then :func:`load`."""
    return load(find(model, backend, policy), backend, options)


def open_remote(url: str, model: str | None = None, api_key: str | None = None) -> OpenModel:
    """Connect to a model on a server that speaks OpenAI's API (see
    :mod:`gemma_chat.backends.remote`); ``model`` may be a catalogue name or the server's id,
    or None for the one model the server has."""
    from .backends.remote import RemoteBackend, _spec_for

    start = time.perf_counter()
    backend = RemoteBackend(url, model, api_key)
    resolved = ResolvedModel(backend.model, backend.info.path, "remote", "server",
                             _spec_for(model, backend.model))
    return OpenModel(resolved, backend, time.perf_counter() - start)


def configured_backend(requested: str) -> str:
    """``auto`` becomes the configured default backend, if one is set."""
    if requested != "auto":
        return requested
    from . import config

    return config.get("default-backend") or "auto"


def default_chat_model() -> tuple[str, str]:
    """The configured default, else ``2b-it`` when it is on disk, else the bundled demo model,
    and why; never a download."""
    from . import catalog, config
    from .resolve import on_disk

    configured = config.get("default-model")
    if configured:
        return configured, "the configured default-model"
    if on_disk(catalog.get("2b-it")):
        return "2b-it", "Gemma 2 2B IT, found on disk"
    return "gemma-3-270m", "the bundled demo model"
