"""The local model store: one folder, ``GEMMA_HOME``, for models we convert, import or unpack.

Downloads stay in the Hugging Face cache (shared with other tools); everything gemma-chat writes
itself goes under ``GEMMA_HOME/models/<name>/``. ``GEMMA_HOME`` defaults to the platform's user
data folder (``~/.local/share/gemma-chat`` on Linux, ``~/Library/Application Support/gemma-chat``
on macOS).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

APP_NAME = "gemma-chat"


def gemma_home() -> Path:
    """The store's root folder (``$GEMMA_HOME`` or the user data folder); not created here."""
    env = os.environ.get("GEMMA_HOME")
    if env:
        return Path(env).expanduser()
    return platformdirs.user_data_path(APP_NAME)


def models_dir(out: Path | None = None) -> Path:
    """Where models are written: ``out`` when given (a command's ``--out``), else the store."""
    return Path(out) if out is not None else gemma_home() / "models"


def model_dir(name: str, out: Path | None = None) -> Path:
    """The folder of one stored model."""
    return models_dir(out) / name


def _sync(path: Path) -> None:
    """fsync a file, or a folder (its entries), where the platform allows it."""
    if not path.exists() or (path.is_dir() and os.name == "nt"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    Works for a file or a folder. A failure or Ctrl-C leaves ``target`` untouched and removes
    the temporary.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        _sync(tmp)  # the data on disk before the rename makes it the file
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _sync(target.parent)  # ... and the rename itself
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
