"""Prompt formats, and the one builder that turns conversations into token ids.

    prompts = PromptBuilder(backend)            # the format follows the model file
    ids = prompts.chat([{"role": "user", "content": "Hi"}])
    ids = prompts.raw("The capital of France is")

Every prompt gemma-chat sends (``gemma run``, the chat, the server) is built here. A format
turns messages into *parts*: markers (control tokens such as ``<start_of_turn>``) and plain text.
Markers become their control token; plain text is tokenized with control-token parsing off, so
text a user types or pastes (``<end_of_turn>``, ``<bos>``) can never forge a turn, and a prompt
holds exactly one BOS. The format is chosen from the architecture the model file declares, never
from the model's name; a format for another Gemma generation is one more entry in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from . import template
from .errors import UnsupportedArchitecture
from .template import Marker, Part


class PromptFormat(Protocol):
    """How one Gemma generation lays out a conversation."""

    name: str
    description: str  # what `/info` and `gemma show` print

    def parts(self, messages: Iterable[Mapping[str, object]],
              add_generation_prompt: bool = True) -> list[Part]:
        """A whole conversation (raises :class:`~gemma_chat.errors.InvalidMessages`)."""

    def user_turn(self, text: str, *, first: bool, system: str | None) -> list[Part]:
        """One user turn and the opening of the model's reply; the first turn carries the BOS
        (and, where the format has no system role, the system prompt)."""

    def closing(self) -> list[Part]:
        """What follows a model reply in the history."""

    def normalize(self, messages: Iterable[Mapping[str, object]]) \
            -> tuple[str | None, list[tuple[str, str]]]:
        """The role rules: (system text or None, [(role, content), ...])."""


class GemmaTurns:
    """Gemma 1, 1.1, 2 and 3: ``<start_of_turn>user|model`` turns, no system role (folded into
    the first user turn). See :mod:`gemma_chat.template`."""

    name = "gemma"
    description = template.PROMPT_FORMAT

    def parts(self, messages, add_generation_prompt=True):
        return template.parts(messages, add_generation_prompt)

    def user_turn(self, text, *, first, system):
        text = text.strip()
        if first and system:
            text = system + "\n\n" + text
        head = [template.BOS_PART] if first else []
        return head + template.turn_parts("user", text) + template.generation_parts()

    def closing(self):
        return template.closing_parts()

    def normalize(self, messages):
        return template.normalize(messages)


GEMMA_TURNS = GemmaTurns()

#: The prompt format of each architecture a model file can declare.
FORMATS: dict[str, PromptFormat] = {"gemma": GEMMA_TURNS, "gemma2": GEMMA_TURNS,
                                    "gemma3": GEMMA_TURNS}


def format_for(architecture: str) -> PromptFormat:
    """The prompt format of a model file's architecture."""
    try:
        return FORMATS[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no prompt format for architecture {architecture!r}") from None


class PromptBuilder:
    """Token ids of prompts for one loaded model, in its format."""

    def __init__(self, backend, fmt: PromptFormat | None = None):
        self.backend = backend
        self.format = fmt or format_for(backend.info.architecture)
        self._turns: dict[tuple[bool, str | None, str], list[int]] = {}
        self.closing = self.tokens(self.format.closing())

    def tokens(self, parts: Sequence[Part]) -> list[int]:
        """Markers as their control token, everything else as plain text."""
        ids: list[int] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                ids.extend(self.backend.tokenize("".join(plain), special=False))
                plain.clear()

        for part in parts:
            if isinstance(part, Marker):
                flush()
                ids.extend(self.backend.tokenize(part, special=True))
            else:
                plain.append(part)
        flush()
        return ids

    def chat(self, messages: Iterable[Mapping[str, object]]) -> list[int]:
        """A conversation ending in a user turn, with the model's turn opened."""
        return self.tokens(self.format.parts(messages))

    def raw(self, text: str) -> list[int]:
        """Text as it is (control-token text included), with the model's BOS unless it
        already starts with one: exactly one BOS either way."""
        ids = self.backend.tokenize(text)
        bos = self.backend.info.bos_id
        return ids if ids[:1] == [bos] else [bos, *ids]

    def user_turn(self, text: str, *, first: bool, system: str | None = None) -> list[int]:
        """One user turn (see :meth:`PromptFormat.user_turn`), cached."""
        key = (first, system if first else None, text)
        ids = self._turns.get(key)
        if ids is None:
            ids = self.tokens(self.format.user_turn(text, first=first,
                                                    system=system if first else None))
            self._turns[key] = ids
        return ids
