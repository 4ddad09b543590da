"""A multi-turn conversation kept both as messages and as the exact token ids the model saw.

    convo = Conversation(backend, system="Be brief.")
    for chunk in convo.send("Hi!", SamplingParams()):
        print(chunk.text, end="")

The prompt for turn N is the ids of the earlier turns (each user turn as rendered, the reply ids
the model generated, ``<end_of_turn>\\n``) followed by the tokens of the new user turn.
Re-tokenizing a stripped reply could give other ids and defeat the KV cache's prefix match;
keeping the ids means each turn evaluates only its new tokens. After ``undo``, ``retry`` or a
context trim the backend re-uses the longest common prefix of what it has cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .backends.base import Backend, Chunk, SamplingParams, Stats
from .errors import ContextOverflow, InvalidArgument
from .prompt import PromptBuilder

#: Room kept for the reply when the conversation is trimmed to fit, if max_tokens is not set.
DEFAULT_REPLY_RESERVE = 512


@dataclass
class Exchange:
    """One user turn and the model's reply to it."""

    user: str
    reply: str = ""
    reply_ids: list[int] = field(default_factory=list)
    interrupted: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"user": self.user, "reply": self.reply, "interrupted": self.interrupted}


class Conversation:
    """The exchanges of one chat, their token ids, and ``send`` to add one more."""

    def __init__(self, backend: Backend, system: str | None = None):
        self.backend = backend
        self.system = system or None
        self.exchanges: list[Exchange] = []
        self.last_stats: Stats | None = None
        self.dropped = 0  # exchanges the last send dropped to fit the context
        self.prompts = PromptBuilder(backend)

    # -- token ids ------------------------------------------------------------------------

    def ids_for(self, exchanges: list[Exchange], pending: str | None = None) -> list[int]:
        """The token ids of ``exchanges`` and, when given, a new user turn awaiting a reply."""
        ids: list[int] = []
        turn, closing = self.prompts.user_turn, self.prompts.closing
        for i, ex in enumerate(exchanges):
            ids += turn(ex.user, first=i == 0, system=self.system) + ex.reply_ids + closing
        if pending is not None:
            ids += turn(pending, first=not exchanges, system=self.system)
        return ids

    @property
    def ids(self) -> list[int]:
        """The finished conversation as the model sees it."""
        return self.ids_for(self.exchanges)

    @property
    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages, the system prompt first when there is one."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for ex in self.exchanges:
            out += [{"role": "user", "content": ex.user},
                    {"role": "assistant", "content": ex.reply}]
        return out

    def render(self) -> str:
        """The conversation in the chat template, as text (what ``ids`` spell, up to the
        whitespace the template strips from replies)."""
        if not self.exchanges:
            return ""
        return "".join(self.prompts.format.parts(self.messages, add_generation_prompt=False))

    # -- fitting the context --------------------------------------------------------------

    def _fit(self, text: str, reserve: int) -> tuple[list[Exchange], list[int]]:
        """Drop the oldest exchanges until the prompt plus ``reserve`` fits the context."""
        n_ctx = self.backend.info.n_ctx
        exchanges = list(self.exchanges)
        prompt = self.ids_for(exchanges, text)
        while exchanges and len(prompt) + reserve > n_ctx:
            exchanges.pop(0)
            prompt = self.ids_for(exchanges, text)
        if len(prompt) >= n_ctx:
            raise ContextOverflow(
                f"this message is {len(prompt)} tokens with its turn markers and the context "
                f"holds {n_ctx}; shorten it or raise --ctx (the model allows "
                f"{self.backend.info.n_ctx_train})"
            )
        return exchanges, prompt

    # -- turns ----------------------------------------------------------------------------

    def send(self, text: str, sampling: SamplingParams, **options) -> Iterator[Chunk]:
        """Stream the model's reply to ``text``; the exchange is recorded when the stream
        ends, also when it is closed early (Ctrl-C): then the partial reply is kept, marked
        interrupted. Raises :class:`ContextOverflow` before recording anything when ``text``
        alone does not fit."""
        if not text.strip():
            raise InvalidArgument("the message is empty")
        reserve = min(sampling.max_tokens or DEFAULT_REPLY_RESERVE,
                      self.backend.info.n_ctx // 4)
        kept, prompt = self._fit(text, reserve)
        stream = self.backend.stream(prompt, sampling, **options)
        self.dropped = len(self.exchanges) - len(kept)
        self.exchanges = kept
        exchange = Exchange(text)
        pieces: list[str] = []
        finished = False
        try:
            for chunk in stream:
                # Recorded as it is handed out: after Ctrl-C the exchange holds what was shown.
                exchange.reply_ids.extend(chunk.token_ids)
                pieces.append(chunk.text)
                if chunk.stats is not None:
                    self.last_stats = chunk.stats
                    exchange.reply_ids = list(chunk.stats.token_ids)
                    finished = True
                yield chunk
        finally:
            exchange.reply = "".join(pieces)
            exchange.interrupted = not finished
            self.exchanges.append(exchange)

    def undo(self) -> Exchange | None:
        """Drop the last exchange; return it."""
        return self.exchanges.pop() if self.exchanges else None

    def retry(self, sampling: SamplingParams, **options) -> Iterator[Chunk]:
        """Regenerate the last reply."""
        last = self.undo()
        if last is None:
            raise InvalidArgument("nothing to retry yet")
        return self.send(last.user, sampling, **options)

    def clear(self) -> None:
        """Start over (the system prompt stays)."""
        self.exchanges.clear()
        self.last_stats = None

    def set_system(self, system: str | None) -> None:
        self.system = system or None

    def rebind(self, backend: Backend) -> None:
        """Move to another model: replies are re-tokenized with its vocabulary."""
        self.backend = backend
        self.prompts = PromptBuilder(backend)
        for ex in self.exchanges:
            ex.reply_ids = backend.tokenize(ex.reply, special=False)
