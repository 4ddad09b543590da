"""The command runs in a child process; the ``gemma`` process waits for it, so that a crash
inside llama.cpp or MLX (an abort on a failed check, a segmentation fault, an illegal
instruction, the kernel's out-of-memory kill) ends with one line naming the model and the
signal, not silence.

Forking costs about a millisecond and no memory to speak of: it happens before any inference
library is imported. The child shares the terminal (prompt-toolkit, Ctrl-C and Ctrl-Z behave as
before); signals sent to the ``gemma`` process itself (SIGTERM from a service manager, SIGINT
from a script) are passed on to the child. Not on Windows, or with ``GEMMA_NO_SUPERVISOR=1``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

_status_fd: int | None = None  # in the child: where it says which model it works with
SI_KERNEL = 0x80  # si_code of a signal the terminal sent (to the whole process group)
# Not every platform has every signal (Windows has few, and no fork: it runs unsupervised).
_CRASHES = {getattr(signal, name) for name in ("SIGABRT", "SIGSEGV", "SIGILL", "SIGBUS", "SIGFPE",
                                               "SIGKILL") if hasattr(signal, name)}
_PASSED_ON = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                   if hasattr(signal, name))


def note_model(path: object) -> None:
    """In the child: the model about to be loaded, for the parent's crash message."""
    if _status_fd is not None:
        try:
            os.write(_status_fd, f"{path}\n".encode("utf-8", "replace"))
        except OSError:
            pass


def supervised(run: Callable[[], int]) -> int:
    """``run()`` in a child process; its exit code, or a one-line report of a crash."""
    global _status_fd
    if not hasattr(os, "fork") or os.environ.get("GEMMA_NO_SUPERVISOR"):
        return run()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child does the work and exits as the command would
        os.close(read_fd)
        _status_fd = write_fd
        return run()
    os.close(write_fd)
    status = _wait(pid)
    with os.fdopen(read_fd, "rb") as fh:
        notes = fh.read().decode("utf-8", "replace").splitlines()
    return _report(status, notes[-1] if notes else None)


def _wait(pid: int) -> int:
    """Wait for the child, passing on the signals sent to this process."""
    if hasattr(signal, "sigtimedwait"):
        waited = {*_PASSED_ON, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            info = signal.sigtimedwait(waited, 0.5)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_code == SI_KERNEL:
                continue  # from the terminal: the child, in the same group, got it too
            _pass_on(pid, info.si_signo)
    # macOS: no sigtimedwait. The terminal's Ctrl-C reaches the child directly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in _PASSED_ON:
        if sig != signal.SIGINT:
            signal.signal(sig, lambda number, _frame: _pass_on(pid, number))
    return os.waitpid(pid, 0)[1]


def _pass_on(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _report(status: int, model: str | None) -> int:
    if not os.WIFSIGNALED(status):
        return os.waitstatus_to_exitcode(status)
    sig = os.WTERMSIG(status)
    if sig in _CRASHES:
        from ..errors import crash_message

        what = f"gemma-chat, running {model}," if model else "gemma-chat"
        sys.stdout.flush()
        print(f"error: {crash_message(what, -sig)}", file=sys.stderr)
    return 128 + sig
