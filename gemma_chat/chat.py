"""A multi-turn conversation kept both as messages and as the exact token ids the model saw.

    convo = Conversation(backend, system="Be brief.")
    for chunk in convo.send("Hi!", SamplingParams()):
        print(chunk.text, end="")

The prompt for turn N is the ids of turn N-1 (its prompt, the reply ids the model generated,
``<end_of_turn>\\n``) followed by the tokens of the newly rendered user turn. Re-tokenizing a
stripped reply could give other ids and defeat the KV cache's prefix match; keeping the ids
means each turn evaluates only its new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import template
from .backends.base import Backend, Chunk, SamplingParams, Stats


class Conversation:
    """Messages plus their token ids; ``send`` streams one reply and records it."""

    def __init__(self, backend: Backend, system: str | None = None):
        self.backend = backend
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.ids: list[int] = []  # the finished turns, each closed with <end_of_turn>\n
        self.last_stats: Stats | None = None
        self.interrupted = False  # the last reply was cut short by the user

    def _turn_ids(self, text: str) -> list[int]:
        if not self.ids:
            messages = [{"role": "user", "content": text}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
            return self.backend.tokenize(template.render(messages))
        turn = template.render_turn("user", text.strip()) + template.generation_prompt()
        return self.ids + self.backend.tokenize(turn)

    def send(self, text: str, sampling: SamplingParams, **options) -> Iterator[Chunk]:
        """Stream the model's reply to ``text``; the turn is recorded when the stream ends,
        also when it is closed early (Ctrl-C): then the partial reply is kept, marked
        interrupted."""
        prompt = self._turn_ids(text)
        # Raises before anything is recorded when the backend refuses the prompt (too long).
        stream = self.backend.stream(prompt, sampling, **options)
        reply_ids: list[int] = []
        pieces: list[str] = []
        finished = False
        try:
            for chunk in stream:
                yield chunk
                # Recorded once the consumer has taken the chunk: after Ctrl-C the turn holds
                # what was printed.
                reply_ids.extend(chunk.token_ids)
                pieces.append(chunk.text)
                if chunk.stats is not None:
                    self.last_stats = chunk.stats
                    reply_ids = list(chunk.stats.token_ids)
                    finished = True
        finally:
            self.interrupted = not finished
            closing = self.backend.tokenize(template.END_OF_TURN + "\n")
            self.ids = prompt + reply_ids + closing
            self.messages.append({"role": "user", "content": text})
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def clear(self) -> None:
        """Start over (the system prompt stays)."""
        self.messages.clear()
        self.ids.clear()
        self.last_stats = None

    def render(self) -> str:
        """The conversation in the chat template, as text (what ``ids`` spell, modulo the
        whitespace the template strips from replies)."""
        messages = list(self.messages)
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return template.render(messages, add_generation_prompt=False) if self.messages else ""
