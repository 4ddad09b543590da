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


class InvalidMessages(InvalidArgument):
    """A conversation the prompt format cannot render: unknown roles, roles out of order, a
    content type it does not take."""


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


class HubError(GemmaChatError):
    """The Hugging Face Hub refused or could not be reached; the message says what to do."""


class GatedRepo(HubError):
    """A gated or private repo and no token that opens it."""

    def __init__(self, message: str, repo: str):
        super().__init__(message)
        self.repo = repo


class NotEnoughSpace(GemmaChatError):
    """A download or conversion does not fit on the disk."""


class Interrupted(GemmaChatError):
    """Ctrl-C: the conventional exit code 130."""

    exit_code = 130


def missing_extra(module: str, extra: str) -> MissingDependency:
    """The error for an optional dependency that did not import."""
    return MissingDependency(
        f"{module} is not installed: pip install 'gemma-chat[{extra}]'"
    )


#: What a child process that died of a signal most likely met, and what to do about it.
_SIGNAL_HINTS = {
    "SIGILL": ("an instruction this CPU or VM refuses, such as AMX on some Intel Xeon VMs; "
               "run with GEMMA_REPACK=off, or see Troubleshooting in the README"),
    "SIGKILL": "it was killed, most likely by the kernel for lack of memory",
    "SIGABRT": "llama.cpp stopped on a failed check; GEMMA_DEBUG=1 shows its log",
    "SIGSEGV": "llama.cpp crashed; GEMMA_DEBUG=1 shows its log",
    "SIGBUS": "the model file changed or became unreadable while it was mapped",
}


def describe_exit(returncode: int) -> str:
    """A child's exit status in words: ``SIGILL (illegal instruction)``, ``exit code 3``."""
    import signal

    if returncode >= 0:
        return f"exit code {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    text = getattr(signal, "strsignal", lambda _: "")(number) or ""
    return f"{name} ({text.lower()})" if text else name


def crash_message(what: str, returncode: int) -> str:
    """One line for a child that died: what it was doing, the signal, and the likely fix."""
    text = f"{what} crashed with {describe_exit(returncode)}"
    if returncode < 0:
        import signal

        try:
            hint = _SIGNAL_HINTS.get(signal.Signals(-returncode).name)
        except ValueError:
            hint = None
        if hint:
            text += f": {hint}"
        if "GEMMA_REPACK=off" not in text and _repack_forced():
            # Forced AMX repacking on a CPU whose tiles fault shows as SIGILL or SIGSEGV.
            text += "; weight repacking is forced on: run with GEMMA_REPACK=off"
    return text


def _repack_forced() -> bool:
    try:
        from .backends.repack import setting

        return setting()[0] == "on"
    except Exception:  # noqa: BLE001 - a bad setting is reported where it is read
        return False
