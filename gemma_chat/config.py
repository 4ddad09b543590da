"""User settings: a small JSON file in the platform's user config folder.

    gemma config set default-model 1b-it
    gemma config get default-model

``GEMMA_CONFIG`` names another file (tests use it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

from . import store
from .errors import InvalidArgument

KEYS = {
    "default-model": "the model `gemma chat` uses when no --model is given",
    "default-backend": "auto, llama.cpp or mlx",
    "repack": "llama.cpp weight repacking: auto (checked once per CPU), on, no-amx or off",
}


def config_path() -> Path:
    env = os.environ.get("GEMMA_CONFIG")
    if env:
        return Path(env).expanduser()
    return platformdirs.user_config_path(store.APP_NAME) / "config.json"


def load() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument(
            f"{path} is not a valid config file ({exc}); fix or delete it") from None
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _check(key: str) -> None:
    if key not in KEYS:
        raise InvalidArgument(f"unknown setting {key!r}; known: {', '.join(KEYS)}")


def get(key: str) -> str | None:
    _check(key)
    return load().get(key)


def set_value(key: str, value: str | None) -> None:
    """Set (or with None, remove) one setting; the file is replaced atomically."""
    _check(key)
    if key == "default-backend" and value is not None:
        from .backends import normalize

        value = normalize(value)
    if key == "repack" and value is not None:
        from .backends.repack import SETTINGS

        value = value.strip().lower()
        if value not in SETTINGS:
            raise InvalidArgument(f"repack must be one of: {', '.join(SETTINGS)}")
    data = load()
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value
    path = config_path()
    with store.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
