"""A multi-turn conversation kept both as messages and as the exact token ids the model saw.

    convo = Conversation(backend, system="Be brief.")
    for chunk in convo.send("Hi!", SamplingParams()):
        print(chunk.text, end="")

The prompt for turn N is the ids of the earlier turns followed by the tokens of the new user
turn. For Gemma 1-3 an earlier turn is the user turn as rendered, the reply ids the model
generated and ``<end_of_turn>\\n``: re-tokenizing a stripped reply could give other ids and defeat
the KV cache's prefix match; keeping the ids means each turn evaluates only its new tokens.
Gemma 4's template renders an earlier reply without its thoughts (and without the empty thought
channel of the generation prompt), so there the history is the template's, and a turn
re-evaluates from the start of the previous model turn: its answer, then the new user turn.
A thinking model's thoughts are kept apart from the reply (``Exchange.thoughts``). After
``undo``, ``retry`` or a context trim the backend re-uses the longest common prefix of what it
has cached.

A model on a server (:mod:`gemma_chat.backends.remote`) renders its own template and keeps its
own cache: there the conversation is sent as messages each turn, and token counts come from what
the server reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .backends.base import Backend, Chunk, SamplingParams, Stats
from .errors import ContextOverflow, InvalidArgument
from .prompt import PromptBuilder, media_content
from .thinking import split_thoughts

#: Room kept for the reply when the conversation is trimmed to fit, if max_tokens is not set.
DEFAULT_REPLY_RESERVE = 512


@dataclass
class Exchange:
    """One user turn and the model's reply to it."""

    user: str
    reply: str = ""  # the answer, thoughts left out
    reply_ids: list[int] = field(default_factory=list)  # every generated id, thoughts included
    interrupted: bool = False
    thoughts: str = ""
    calls: list[dict] = field(default_factory=list)  # tool calls and results, in between
    media: list = field(default_factory=list)  # pictures and clips sent with the user turn
    missing_media: list[str] = field(default_factory=list)  # ones a resumed chat lost

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"user": self.user, "reply": self.reply,
                                  "interrupted": self.interrupted}
        if self.media:
            out["media"] = [m.to_dict() for m in self.media]
        if self.thoughts:
            out["thoughts"] = self.thoughts
        if self.calls:
            out["calls"] = self.calls
        return out

    def messages(self) -> list[dict]:
        """The exchange as OpenAI-style messages."""
        user = media_content(self.media, self.user) if self.media else self.user
        return [{"role": "user", "content": user}, *self.calls,
                {"role": "assistant", "content": self.reply}]


class Conversation:
    """The exchanges of one chat, their token ids, and ``send`` to add one more."""

    def __init__(self, backend: Backend, system: str | None = None, thinking: bool = False,
                 tools: list[dict] | None = None):
        self.backend = backend
        self.system = system or None
        self.thinking = thinking
        self.tools = tools or None  # OpenAI-style declarations the model may call
        self.exchanges: list[Exchange] = []
        self.last_stats: Stats | None = None
        self.dropped = 0  # exchanges the last send dropped to fit the context
        self._finished = False  # whether the reply being streamed has ended
        self.prompts = prompts_for(backend)

    @property
    def remote(self) -> bool:
        """Whether the model runs on a server (messages are sent, not token ids)."""
        return bool(getattr(self.backend, "remote", False))

    def context_used(self) -> int:
        """Tokens the conversation takes in the context: counted here, or for a model on a
        server, as its last reply reported (prompt plus reply)."""
        if not self.remote:
            return len(self.ids)
        stats = self.last_stats
        return stats.prompt_tokens + stats.generated_tokens if stats and self.exchanges else 0

    # -- token ids ------------------------------------------------------------------------

    def ids_for(self, exchanges: list[Exchange], pending: str | None = None,
                media: list | tuple = ()) -> list[int]:
        """The token ids of ``exchanges`` and, when given, a new user turn awaiting a reply
        (with its ``media``)."""
        if not exchanges and pending is None:
            return []
        if self.tools or any(ex.calls for ex in exchanges):
            # Declared tools, calls and results: the whole conversation in the model's format.
            messages = self.messages_of(exchanges)
            if pending is not None:
                messages.append({"role": "user", "content": media_content(media, pending)
                                 if media else pending})
            return self.prompts.with_tools(messages, self.tools, thinking=self.thinking,
                                           open_reply=pending is not None)
        ids: list[int] = []
        for i, ex in enumerate(exchanges):
            ids += self.prompts.exchange(ex.user, ex.reply, ex.reply_ids, first=i == 0,
                                         system=self.system, thinking=self.thinking,
                                         media=self._seen(ex))
        if pending is not None:
            ids += self.prompts.user_turn(pending, first=not exchanges, system=self.system,
                                          thinking=self.thinking, media=media)
        return ids

    @property
    def ids(self) -> list[int]:
        """The finished conversation as the model sees it."""
        return self.ids_for(self.exchanges)

    @property
    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages, the system prompt first when there is one."""
        return self.messages_of(self.exchanges)

    def messages_of(self, exchanges: list[Exchange]) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for ex in exchanges:
            messages = ex.messages()
            seen = self._seen(ex)
            if seen != ex.media:  # the loaded model does not take some of them
                messages[0] = {"role": "user",
                               "content": media_content(seen, ex.user) if seen else ex.user}
            out += messages
        return out

    def _seen(self, ex: Exchange) -> list:
        """The exchange's pictures and clips the loaded model takes: after ``/model`` to a
        model that reads text only (or a resume on one), earlier turns keep their text."""
        kinds = self.backend.info.media
        return [m for m in ex.media if m.kind in kinds]

    def render(self) -> str:
        """The conversation in the chat template, as text (what ``ids`` spell, up to the
        whitespace the template strips from replies)."""
        if not self.exchanges:
            return ""
        return "".join(self.prompts.format.parts(self.messages, add_generation_prompt=False,
                                                 thinking=self.thinking))

    # -- fitting the context --------------------------------------------------------------

    def _fit(self, text: str, reserve: int, media=()) -> tuple[list[Exchange], list[int]]:
        """Drop the oldest exchanges until the prompt plus ``reserve`` fits the context."""
        n_ctx = self.backend.info.n_ctx
        exchanges = list(self.exchanges)
        prompt = self.ids_for(exchanges, text, media)
        while exchanges and len(prompt) + reserve > n_ctx:
            exchanges.pop(0)
            prompt = self.ids_for(exchanges, text, media)
        if len(prompt) >= n_ctx:
            raise ContextOverflow(
                f"this message is {len(prompt)} tokens with its turn markers and the context "
                f"holds {n_ctx}; shorten it or raise --ctx (the model allows "
                f"{self.backend.info.n_ctx_train})"
            )
        return exchanges, prompt

    # -- turns ----------------------------------------------------------------------------

    def send(self, text: str, sampling: SamplingParams, *, run_calls=None,
             tool_choice: str = "auto", media=(), **options) -> Iterator[Chunk]:
        """Stream the model's reply to ``text``; the exchange is recorded when the stream
        ends, also when it is closed early (Ctrl-C): then the partial reply is kept, marked
        interrupted. Raises :class:`ContextOverflow` before recording anything when ``text``
        alone does not fit. With tools declared, ``run_calls(calls)`` answers the model's
        calls (:func:`gemma_chat.generate.tool_turns`): the stream goes on through every
        turn, and the exchange keeps the calls and results. ``media`` (pictures, clips) go
        with the message, before its text."""
        if not text.strip():
            raise InvalidArgument("the message is empty")
        if self.remote:
            yield from self._send_remote(text, sampling, media, run_calls, **options)
        else:
            yield from self._send_local(text, sampling, run_calls=run_calls,
                                        tool_choice=tool_choice, media=media, **options)

    def _send_remote(self, text: str, sampling: SamplingParams, media, run_calls,
                     **options) -> Iterator[Chunk]:
        """The conversation as messages to a server, which renders and fits it."""
        if self.tools and run_calls is not None:
            raise InvalidArgument("tools are not offered to a model on a server yet; drop "
                                  "--tools")
        exchange = Exchange(text, media=list(media))
        messages = self.messages_of(self.exchanges) + exchange.messages()[:1]
        self.dropped = 0
        stream = self.backend.chat(messages, sampling, thinking=self.thinking,
                                   cancel=options.get("cancel"))
        return self._record(exchange, stream)

    def _send_local(self, text: str, sampling: SamplingParams, *, run_calls=None,
                    tool_choice: str = "auto", media=(), **options) -> Iterator[Chunk]:
        reserve = min(sampling.max_tokens or DEFAULT_REPLY_RESERVE,
                      self.backend.info.n_ctx // 4)
        kept, prompt = self._fit(text, reserve, media)
        exchange = Exchange(text, media=list(media))
        pieces: list[str] = []
        thoughts: list[str] = []
        messages: list[dict] = []
        if self.tools and run_calls is not None:
            from .generate import tool_turns

            messages = self.messages_of(kept) + exchange.messages()[:1]
            start = len(messages)

            def between(calls: list[dict]) -> list[dict]:
                # That turn called tools: its text is not the reply, its calls are kept.
                self._finished = False
                pieces.clear()
                thoughts.clear()
                exchange.reply_ids.clear()
                results = run_calls(calls)
                exchange.calls = messages[start:] + results
                return results

            stream = tool_turns(self.backend, self.prompts, messages, self.tools, sampling,
                                run_calls=between, choice=tool_choice, thinking=self.thinking)
        else:
            stream = split_thoughts(self.backend.stream(prompt, sampling, **options),
                                    self.prompts.thought_ids)
        self.dropped = len(self.exchanges) - len(kept)
        self.exchanges = kept
        return self._record(exchange, stream, pieces, thoughts)

    def _record(self, exchange: Exchange, stream: Iterator[Chunk], pieces: list[str] | None = None,
                thoughts: list[str] | None = None) -> Iterator[Chunk]:
        """Hand out ``stream``, recording the exchange as it goes (see :meth:`send`). A turn
        is finished by its stats chunk; a tool call in between opens it again."""
        pieces = [] if pieces is None else pieces
        thoughts = [] if thoughts is None else thoughts
        self._finished = False
        try:
            for chunk in stream:
                # Recorded as it is handed out: after Ctrl-C the exchange holds what was shown.
                exchange.reply_ids.extend(chunk.token_ids)
                (thoughts if chunk.thought else pieces).append(chunk.text)
                if chunk.stats is not None:
                    self.last_stats = chunk.stats
                    exchange.reply_ids = list(chunk.stats.token_ids)
                    self._finished = True
                yield chunk
        finally:
            exchange.reply = "".join(pieces)
            exchange.thoughts = "".join(thoughts)
            exchange.interrupted = not self._finished
            self.exchanges.append(exchange)

    def undo(self) -> Exchange | None:
        """Drop the last exchange; return it."""
        return self.exchanges.pop() if self.exchanges else None

    def retry(self, sampling: SamplingParams, **options) -> Iterator[Chunk]:
        """Regenerate the last reply."""
        last = self.undo()
        if last is None:
            raise InvalidArgument("nothing to retry yet")
        return self.send(last.user, sampling, media=last.media, **options)

    def clear(self) -> None:
        """Start over (the system prompt stays)."""
        self.exchanges.clear()
        self.last_stats = None

    def set_system(self, system: str | None) -> None:
        self.system = system or None

    def set_thinking(self, on: bool) -> None:
        """Thinking on or off for the next turns (the model must be able to think)."""
        if on and not self.prompts.can_think:
            raise InvalidArgument(f"{self.backend.info.name} has no thinking mode (Gemma 4 "
                                  "models think)")
        self.thinking = on

    def rebind(self, backend: Backend) -> None:
        """Move to another model: replies are re-tokenized with its vocabulary."""
        self.backend = backend
        self.prompts = prompts_for(backend)
        for ex in self.exchanges:
            ex.reply_ids = [] if self.remote else backend.tokenize(ex.reply, special=False)


def prompts_for(backend: Backend):
    """The prompt builder for ``backend``'s model file; for a model on a server, a stand-in
    that says the server renders the template."""
    if getattr(backend, "remote", False):
        from .backends.remote import ServerPrompts

        return ServerPrompts(backend)
    return PromptBuilder(backend)
