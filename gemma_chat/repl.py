"""``gemma chat``: the interactive loop. Given a backend, never builds one.

On a terminal, input comes from prompt-toolkit (history in the user data folder); otherwise each
line of stdin is one user turn, so ``printf 'hi\\nbye\\n' | gemma chat`` works. Replies stream as
plain text to stdout; notes go to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TextIO

from . import store
from .backends.base import Backend, SamplingParams
from .chat import Conversation
from .errors import GemmaChatError

HELP = """commands:
  /help          this help
  /clear         start a new conversation (the system prompt stays)
  /exit, /bye    leave (Ctrl-D works too)
Ctrl-C stops a reply; the part already written is kept."""

EXIT_COMMANDS = {"/exit", "/bye", "/quit"}


def terminal_lines(prompt: str = ">>> ") -> Iterable[str]:
    """Lines typed at a terminal, with history; Ctrl-C on an empty line asks before leaving."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history = store.gemma_home() / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(history=FileHistory(str(history)))
    while True:
        try:
            yield session.prompt(prompt)
        except KeyboardInterrupt:
            print("(press Ctrl-D or type /exit to leave)", file=sys.stderr)
        except EOFError:
            return


def stream_lines(stream: TextIO) -> Iterable[str]:
    for line in stream:
        yield line.rstrip("\n")


def chat_loop(
    backend: Backend,
    conversation: Conversation,
    sampling: SamplingParams,
    lines: Iterable[str],
    out: TextIO = sys.stdout,
    note: Callable[[str], object] = lambda s: print(s, file=sys.stderr),
) -> int:
    """Run the conversation over ``lines``; return the number of replies given."""
    replies = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in EXIT_COMMANDS:
                break
            if command == "/clear":
                conversation.clear()
                note("(new conversation)")
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command}; /help lists them")
            continue
        stream = conversation.send(text, sampling)
        try:
            for chunk in stream:
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
        except KeyboardInterrupt:
            stream.close()  # records the partial reply, marked interrupted
            note("[interrupted]")
        except GemmaChatError as exc:  # the turn was refused and not recorded
            note(f"error: {exc}")
            continue
        else:
            replies += 1
        out.write("\n")
        out.flush()
    return replies
