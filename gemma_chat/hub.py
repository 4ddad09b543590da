"""Downloads from the Hugging Face Hub, on huggingface_hub, into the Hugging Face cache.

    resolved = pull("2b-it", fmt="gguf", quant="q4")

Before a byte is fetched: the Hub is checked to be reachable (a few seconds at most, where
huggingface_hub alone retries a failing DNS lookup for ~25 s), the file's size is compared
with the free disk space, and the memory the model will need is compared with the machine's.
Within one pull, huggingface_hub resumes a dropped connection with a Range request. The
finished file is checked against the size and, for LFS files, the sha256 the Hub gives.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from tqdm.std import tqdm as std_tqdm

from . import catalog, memory
from .catalog import ModelSpec
from .errors import GatedRepo, HubError, InvalidArgument, ModelNotFound, NotEnoughSpace
from .resolve import ResolvedModel, find_local

REACH_TIMEOUT = 4.0
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE")


def check_reachable(url: str | None = None, timeout: float = REACH_TIMEOUT) -> None:
    """Fail within ``timeout`` seconds when the Hub's host cannot be reached (DNS included)."""
    url = url or endpoint()
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout
    worker.start()
    worker.join(timeout)
    if not outcome or outcome[0] is not None:
        reason = f" ({outcome[0]})" if outcome and outcome[0] else " (timed out)"
        raise HubError(f"cannot reach the Hugging Face Hub at {url}{reason}; check the network, "
                       "or use a model that is already on disk (`gemma list`)")


class RichProgress(std_tqdm):
    """A tqdm that huggingface_hub drives and Rich draws: one task per file, with bytes,
    speed and time left. ``RichProgress.progress`` is set while a pull runs (None: quiet)."""

    progress = None

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)  # huggingface_hub's own tqdm takes a logger name
        desc = kwargs.get("desc") or "download"
        total = kwargs.get("total")
        initial = kwargs.get("initial", 0) or 0
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        self._task = None
        if self.progress is not None:
            self._task = self.progress.add_task(str(desc)[-40:], total=total, completed=initial)

    def update(self, n=1):
        if self._task is not None and n:
            self.progress.advance(self._task, n)


def _progress(console):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def _hub_errors(repo: str, filename: str | None = None):
    """Translate huggingface_hub's errors into one line that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    class _Translate:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if exc is None:
                return False
            page = f"https://huggingface.co/{repo}"
            if isinstance(exc, GatedRepoError):
                raise GatedRepo(f"{repo} is gated: accept its license at {page}, then log in "
                                "with `hf auth login` (or set HF_TOKEN) and pull again",
                                repo) from None
            if isinstance(exc, RepositoryNotFoundError):
                raise HubError(f"{repo} was not found on the Hub (a private repo needs a token: "
                               "`hf auth login` or HF_TOKEN)") from None
            if isinstance(exc, EntryNotFoundError):
                raise HubError(f"{repo} has no file {filename}") from None
            if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
                raise HubError(f"cannot download {repo}: offline, or the Hub did not "
                               "answer") from None
            if isinstance(exc, HfHubHTTPError):
                status = getattr(exc.response, "status_code", "?")
                if status in (401, 403):
                    raise GatedRepo(f"{repo} needs a Hugging Face token ({status}): accept the "
                                    f"license at {page}, then `hf auth login` or set "
                                    "HF_TOKEN", repo) from None
                raise HubError(f"the Hub answered {status} for {repo}") from None
            if isinstance(exc, (ConnectionError, TimeoutError)) or \
                    type(exc).__module__.startswith(("httpx", "httpcore")):
                raise HubError(f"the connection to the Hub failed while downloading {repo} "
                               f"({type(exc).__name__}); run the pull again") from None
            return False

    return _Translate()


def check_disk(size: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    needed = int(size * 1.02) + 64 * 2**20
    if free < needed:
        raise NotEnoughSpace(f"not enough disk space in {folder}: the download needs "
                             f"{memory.human(size)}, {memory.human(free)} are free")


def remove_stray_partials(repo: str, max_age: float = 120.0) -> int:
    """Delete ``*.incomplete`` files a killed download left in this repo's cache folder.

    huggingface_hub writes each download to a process-unique temporary file and deletes it on
    any error; only a killed process leaves one. A file untouched for ``max_age`` seconds is
    no live download's."""
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "blobs"
    removed = 0
    if blobs.is_dir():
        for path in blobs.glob("*.incomplete"):
            if time.time() - path.stat().st_mtime > max_age:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def verify(path: Path, etag: str | None, size: int | None) -> None:
    """The downloaded file has the size and (for LFS files) the sha256 the Hub announced."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise HubError(f"{path.name} is {actual} bytes, the Hub said {size}; pull it again")
    if etag and SHA256.match(etag):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != etag:
            blob = Path(os.path.realpath(path))
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise HubError(f"{path.name} does not match the sha256 the Hub gives (a corrupt "
                           "download; removed): pull it again")


def plan(spec: ModelSpec, fmt: str, quant: str) -> tuple[str, str | None]:
    """(repo, file) to fetch for a catalogue model; file None means the whole repo (MLX, or
    ``hf``: the original checkpoint, for ``gemma convert``)."""
    if fmt == "hf":
        return spec.hf_repo, None
    if fmt == "gguf":
        source = spec.gguf_source(quant)
        if source is None:
            raise InvalidArgument(f"{spec.name} has no {quant} GGUF in the catalogue "
                                  f"(available: {', '.join(spec.gguf)})")
        return source[1].repo, source[1].file
    source = spec.mlx_source(quant)
    if source is None:
        raise InvalidArgument(f"{spec.name} has no {quant} MLX weights in the catalogue "
                              f"(available: {', '.join(spec.mlx) or 'none'})")
    return source[1].repo, None


def memory_note(spec: ModelSpec, size: int, n_ctx: int) -> tuple[str, bool]:
    """A line about the memory the model will need, and whether it fits this machine."""
    est = memory.estimate(spec.shape, spec.arch, size, n_ctx)
    ram = memory.total_ram()
    line = (f"needs about {memory.human(est.total)} of memory at context {n_ctx} (weights "
            f"{memory.human(est.weights)}, KV cache {memory.human(est.kv_cache)})")
    if ram is None:
        return line, True
    fits = est.total < ram * 0.9
    return line + f"; this machine has {memory.human(ram)}", fits


def pull(model: str, fmt: str = "gguf", quant: str = "q4", *, quiet: bool = False,
         console=None, n_ctx: int = 8192, progress=None) -> ResolvedModel:
    """Download a catalogue model's weights for ``fmt`` unless they are on disk already.
    ``progress`` (an object with Rich's ``add_task``/``advance``/``start``/``stop``) sees the
    bytes of each file instead of a progress bar on ``console``."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

    spec = catalog.get(model)
    found = original_on_disk(spec) if fmt == "hf" else find_local(spec, fmt, quant)
    if found is not None:
        return found
    repo, filename = plan(spec, fmt, quant)
    if offline():
        raise ModelNotFound(f"{spec.name} is not on disk, and HF_HUB_OFFLINE is set: "
                            "nothing can be downloaded")
    url = endpoint()
    check_reachable(url)
    say = (lambda s: None) if quiet or console is None else console.print
    RichProgress.progress = progress if progress is not None else \
        None if quiet else _progress(console)
    try:
        if filename is not None:
            with _hub_errors(repo, filename):
                meta = get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=url),
                                            timeout=10)
            from huggingface_hub import constants

            size = meta.size or 0
            check_disk(size, Path(constants.HF_HUB_CACHE))
            note, fits = memory_note(spec, size, n_ctx)
            say(f"[dim]{spec.name}: {repo}/{filename}, {memory.human(size)}; {note}[/dim]")
            if not fits:
                say("[yellow]warning: this model may not fit in this machine's memory[/yellow]")
            remove_stray_partials(repo)
            if RichProgress.progress is not None:
                RichProgress.progress.start()
            with _hub_errors(repo, filename):
                path = Path(hf_hub_download(repo, filename, endpoint=url,
                                            tqdm_class=RichProgress, etag_timeout=10))
            if RichProgress.progress is not None:
                RichProgress.progress.stop()
            verify(path, meta.etag, meta.size)
            _pull_projector(spec, quant, url, say)
            return ResolvedModel(spec.name, path, "gguf", "hf-cache", spec, repo)
        if RichProgress.progress is not None:
            RichProgress.progress.start()
        with _hub_errors(repo):
            folder = Path(snapshot_download(
                repo, endpoint=url, tqdm_class=RichProgress, etag_timeout=10,
                allow_patterns=ORIGINAL_FILES if fmt == "hf" else None))
        return ResolvedModel(spec.name, folder, "mlx", "hf-cache", spec, repo)
    finally:
        if RichProgress.progress is not None:
            RichProgress.progress.stop()
        RichProgress.progress = None


def _pull_projector(spec: ModelSpec, quant: str, url: str, say) -> Path | None:
    """The model's projector (``mmproj-*.gguf``, its image and audio encoder), downloaded into
    the same folder as the model GGUF where the catalogue names one."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    source = spec.gguf_source(quant)
    download = source[1] if source is not None else None
    if download is None or not download.mmproj:
        return None
    repo, filename = download.repo, download.mmproj
    with _hub_errors(repo, filename):
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=url), timeout=10)
    from huggingface_hub import constants

    check_disk(meta.size or 0, Path(constants.HF_HUB_CACHE))
    say(f"[dim]{spec.name}: its projector {filename}, {memory.human(meta.size or 0)} "
        f"(pictures{' and sound' if 'audio' in spec.modalities else ''})[/dim]")
    with _hub_errors(repo, filename):
        path = Path(hf_hub_download(repo, filename, endpoint=url, tqdm_class=RichProgress,
                                    etag_timeout=10))
    verify(path, meta.etag, meta.size)
    return path


#: What ``gemma convert`` needs of an original checkpoint (never pickle or other formats).
ORIGINAL_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def original_on_disk(spec: ModelSpec) -> ResolvedModel | None:
    """A catalogue model's original safetensors checkpoint in the Hugging Face cache."""
    from .resolve import hf_cached_snapshot

    folder = hf_cached_snapshot(spec.hf_repo) if spec.hf_repo else None
    if folder is None or not (folder / "config.json").is_file() or \
            not any(folder.glob("*.safetensors")):
        return None
    return ResolvedModel(spec.name, folder, "mlx", "hf-cache", spec, spec.hf_repo)


def login_with(token: str) -> str:
    """Store ``token`` with huggingface_hub's own login (which checks it with the Hub's whoami
    endpoint); return the account name. The token itself is never printed."""
    from huggingface_hub import login, whoami
    from huggingface_hub.errors import HfHubHTTPError

    token = token.strip()
    if not token:
        raise InvalidArgument("no token given")
    rejected = HubError("the Hub did not accept that token; check it at "
                        "https://huggingface.co/settings/tokens")
    try:
        login(token=token, add_to_git_credential=False)
        return str(whoami(token=token).get("name", "?"))
    except ValueError:
        raise rejected from None
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) in (401, 403):
            raise rejected from None
        raise HubError(f"could not check the token with the Hub ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - network or HTTP errors from whoami
        raise HubError(f"could not check the token with the Hub ({type(exc).__name__})") \
            from None
