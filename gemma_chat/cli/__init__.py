"""The ``gemma`` command line: each command parses, calls library functions, prints.

One module per command group (``generate``: run and chat; ``serve``; ``models``: pull, list,
show, rm, models; ``convert``; ``bench``; ``settings``: config), all on the one Typer ``app`` of
:mod:`.common`. Errors from the library arrive typed (:mod:`gemma_chat.errors`) and leave here,
in :func:`main`, as one line on stderr and an exit code; ``GEMMA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import click
import typer

from .. import __version__
from ..errors import GemmaChatError, Interrupted
from .common import app

# The command modules register on `app`; imported in the order `gemma --help` lists them.
# isort: off
from . import generate, serve, settings, models, convert, bench  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemma-chat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Talk to Google's Gemma models on your own machine."""


def _interrupted() -> int:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    print("\ninterrupted", file=sys.stderr)
    return Interrupted.exit_code


def _kinds(exc: BaseException) -> set[str]:
    """Class names in an exception's ancestry: Click's exceptions come both from click and from
    the copy Typer vendors, so they are told apart by name."""
    return {cls.__name__ for cls in type(exc).__mro__}


def _usage_hint(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) if ctx is not None else None
    return f" (try '{path} --help')" if path else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gemma`` script; returns the exit code. The command runs in a
    supervised child process (see :mod:`.supervise`)."""
    from .supervise import supervised

    return supervised(lambda: run_command(argv))


def run_command(argv: list[str] | None = None) -> int:
    """The command itself, in this process; returns the exit code."""
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("GEMMA_DEBUG"))
    try:
        result = command.main(args=argv, prog_name="gemma", standalone_mode=False)
        if result == Interrupted.exit_code:  # Typer turns Ctrl-C into a returned 130
            return _interrupted()
        return result if isinstance(result, int) else 0
    except GemmaChatError as exc:
        if debug:
            raise
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _interrupted()
    except BrokenPipeError:
        # `gemma run ... | head -1`: the reader left; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # Click's own exceptions, then the last line of defence
        kinds = _kinds(exc)
        if "NoArgsIsHelpError" in kinds:
            typer.echo(exc.ctx.get_help())
            return 0
        if "Exit" in kinds:
            return exc.exit_code
        if "Abort" in kinds:
            return _interrupted()
        if "ClickException" in kinds:
            hint = _usage_hint(exc) if "UsageError" in kinds else ""
            print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
            return exc.exit_code
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (set GEMMA_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
