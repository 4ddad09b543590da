"""``gemma config``: show or change settings."""

from __future__ import annotations

import typer

from .common import app

config_app = typer.Typer(help="Show or change settings (default-model, default-backend, "
                              "repack).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Set a setting: `gemma config set default-model 1b-it`."""
    from .. import config

    config.set_value(key, value)
    typer.echo(f"{key} = {config.get(key)}")


@config_app.command("get")
def config_get(key: str) -> None:
    """Print one setting."""
    from .. import config

    value = config.get(key)
    typer.echo("" if value is None else value)


@config_app.command("unset")
def config_unset(key: str) -> None:
    """Remove a setting."""
    from .. import config

    config.set_value(key, None)


@config_app.command("list")
def config_list() -> None:
    """Print every setting, and where the file is."""
    from .. import config

    values = config.load()
    for key, meaning in config.KEYS.items():
        typer.echo(f"{key} = {values.get(key, '')}    # {meaning}")
    typer.echo(f"# {config.config_path()}")
