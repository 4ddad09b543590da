"""Typed errors, and the one place that turns them into a user message and an exit code.

Library code raises these; ``cli.main()`` prints ``error: <message>`` on one line of stderr and
exits with the error's code. Set ``GEMMA_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations


class GemmaChatError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


class InvalidArgument(GemmaChatError):
    """A flag or parameter value out of range (``--temp -1``, an empty prompt, ...)."""

    exit_code = 2


class ModelNotFound(GemmaChatError):
    """The model argument names nothing we know or nothing on disk."""


class InvalidModelFile(GemmaChatError):
    """A model file that is missing, truncated, corrupt or of the wrong format."""


class UnsupportedArchitecture(GemmaChatError):
    """A real model file, but not a Gemma architecture we can run."""


class MissingDependency(GemmaChatError):
    """An optional extra is not installed; the message names the ``pip install`` that fixes it."""


class BackendError(GemmaChatError):
    """The inference library failed (load, decode) in a way that is not the user's input."""


class ContextOverflow(GemmaChatError):
    """The prompt does not fit in the context window."""


class CatalogError(GemmaChatError):
    """The model catalogue data is malformed (a packaging bug, reported clearly)."""


class Interrupted(GemmaChatError):
    """Ctrl-C: the conventional exit code 130."""

    exit_code = 130


def missing_extra(module: str, extra: str) -> MissingDependency:
    """The error for an optional dependency that did not import."""
    return MissingDependency(
        f"{module} is not installed: pip install 'gemma-chat[{extra}]'"
    )
