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

from . import template, template4
from .errors import UnsupportedArchitecture
from .template import Marker, MediaPart, Part


class PromptFormat(Protocol):
    """How one Gemma generation lays out a conversation."""

    name: str
    description: str  # what `/info` and `gemma show` print
    thought_channel: tuple[str, str] | None  # the markers around thoughts, where it has them
    revision: str  # which revision of the official template it renders ("" if one)

    def parts(self, messages: Iterable[Mapping[str, object]],
              add_generation_prompt: bool = True, *, thinking: bool = False) -> list[Part]:
        """A whole conversation (raises :class:`~gemma_chat.errors.InvalidMessages`)."""

    def user_turn(self, text: str, *, first: bool, system: str | None,
                  thinking: bool = False, media: Sequence = ()) -> list[Part]:
        """One user turn (``media``, pictures and sound, before its text) and the opening of
        the model's reply; the first turn carries the BOS (and the system prompt: its own
        turn, or folded into the user's)."""

    def history(self, user: str, reply: str, *, first: bool, system: str | None,
                thinking: bool = False, media: Sequence = ()) -> list[Part] | None:
        """A finished exchange as the official template renders it in a later prompt, or None
        when that is the user turn, the reply's own tokens and :meth:`closing` (then the KV
        cache keeps the whole exchange)."""

    def closing(self) -> list[Part]:
        """What follows a model reply in the history."""


class GemmaTurns:
    """Gemma 1, 1.1, 2, 3 and 3n: ``<start_of_turn>user|model`` turns, no system role (folded
    into the first user turn), no thinking. See :mod:`gemma_chat.template`."""

    name = "gemma"
    description = template.PROMPT_FORMAT
    thought_channel = None
    revision = ""

    def parts(self, messages, add_generation_prompt=True, *, thinking=False):
        return template.parts(messages, add_generation_prompt)

    def user_turn(self, text, *, first, system, thinking=False, media=()):
        head = [template.BOS_PART] if first else []
        prefix = system + "\n\n" if first and system else ""
        if media:
            body = template.content_parts({"content": media_content(media, text)}, 0)
            return head + [template.SOT, "user\n" + prefix, *body,
                           *template.closing_parts(), *template.generation_parts()]
        return head + template.turn_parts("user", prefix + text.strip()) + \
            template.generation_parts()

    def history(self, user, reply, *, first, system, thinking=False, media=()):
        return None

    def closing(self):
        return template.closing_parts()

    def normalize(self, messages):
        return template.normalize(messages)


class Gemma4Turns:
    """Gemma 4: ``<|turn>system|user|model`` turns with a native system role, thinking, tools and
    media markers, in one revision of the official template. See :mod:`gemma_chat.template4`.

    Unlike Gemma 1-3, a finished reply is not kept as generated: the template drops its
    thoughts (and, with thinking off, the empty thought channel of the generation prompt), so
    the next prompt differs from the KV cache from the start of the last model turn."""

    name = "gemma4"
    thought_channel = (str(template4.CHANNEL), str(template4.END_CHANNEL))

    def __init__(self, revision: str = template4.DEFAULT_REVISION, note: str = ""):
        self.revision = revision
        self.note = note  # said at load when the file's template is not a known revision
        self.description = (template4.PROMPT_FORMAT +
                            f"\n  template revision: {revision} "
                            f"({template4.REVISIONS[revision].description})")

    def parts(self, messages, add_generation_prompt=True, *, thinking=False, tools=None):
        return template4.parts(messages, add_generation_prompt, thinking=thinking, tools=tools,
                               revision=self.revision)

    def _head(self, first: bool, system: str | None, thinking: bool) -> list[Part]:
        if not first:
            return []
        messages = [{"role": "system", "content": system}] if system else []
        # The BOS and the system turn: what the template writes before the first message.
        return template4.parts(messages, False, thinking=thinking, revision=self.revision)

    def _user(self, text: str, media) -> list[Part]:
        if not media:
            return [template4.TURN, "user\n" + text.strip(), template4.END_TURN, "\n"]
        message = {"role": "user", "content": media_content(media, text)}
        return [template4.TURN, "user\n",
                *template4.content_of(message, self.revision), template4.END_TURN, "\n"]

    def user_turn(self, text, *, first, system, thinking=False, media=()):
        out = self._head(first, system, thinking) + self._user(text, media)
        out += [template4.TURN, "model\n"]
        if not thinking:
            out += [template4.CHANNEL, "thought\n", template4.END_CHANNEL]
        return out

    def history(self, user, reply, *, first, system, thinking=False, media=()):
        return self._head(first, system, thinking) + self._user(user, media) + [
            template4.TURN, "model\n" + template4.strip_thinking(reply), template4.END_TURN,
            "\n"]

    def closing(self):
        return [template4.END_TURN, "\n"]


def media_content(media: Sequence, text: str) -> list[dict]:
    """A user message's content parts: each picture or clip (a :class:`~gemma_chat.media.Media`),
    then the text."""
    return [{"type": m.kind, "media": m} for m in media] + [{"type": "text", "text": text}]


GEMMA_TURNS = GemmaTurns()

#: The prompt format of each format name (``family.Architecture.prompt_format``).
FORMATS: dict[str, type] = {"gemma": GemmaTurns, "gemma4": Gemma4Turns}


def format_for(architecture: str, chat_template: str | None = None) -> PromptFormat:
    """The prompt format of a model file's architecture; for Gemma 4, in the revision of the
    official template the file carries (``chat_template``)."""
    from .family import GEMMA

    arch = GEMMA.get(architecture)
    if arch is None:
        raise UnsupportedArchitecture(f"no prompt format for architecture {architecture!r}")
    if arch.prompt_format == "gemma4":
        revision, note = recognize_revision(chat_template)
        return Gemma4Turns(revision, note)
    return GEMMA_TURNS


# Conversations that tell the revisions of Gemma 4's template apart.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "f", "description": "d", "parameters": {"type": "object", "properties": {
        "o": {"type": "object", "properties": {"n": {"type": "integer", "nullable": True}}},
        "a": {"type": "array", "items": {"type": "string"}}}}}}
_PROBE_CALL = {"id": "c1", "type": "function",
               "function": {"name": "f", "arguments": {"a": ["x"]}}}
_PROBES = [
    ({"thinking": True}, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]),
    ({}, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "u"}]}]),
    ({"tools": [_PROBE_TOOL]}, [{"role": "user", "content": "u"}]),
    ({"thinking": True, "tools": [_PROBE_TOOL]}, [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [_PROBE_CALL]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "v"}]),
]
_recognized: dict[str, tuple[str, str]] = {}


def recognize_revision(chat_template: str | None) -> tuple[str, str]:
    """(revision, note): which known revision of Gemma 4's template ``chat_template`` renders
    like, found by rendering probe conversations with it in a sandbox. A file without a
    template gets the newest revision; an unknown template the revision it matches best, and a
    note that says so."""
    if not chat_template:
        return template4.DEFAULT_REVISION, ""
    cached = _recognized.get(chat_template)
    if cached is not None:
        return cached
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        compiled = env.from_string(chat_template)
        rendered = []
        for options, messages in _PROBES:
            rendered.append(compiled.render(
                messages=messages, bos_token="<bos>", add_generation_prompt=True,
                tools=options.get("tools"), enable_thinking=options.get("thinking", False)))
    except Exception as exc:  # noqa: BLE001 - any template error: not a revision we know
        rendered, error = None, f"{type(exc).__name__}: {exc}"
    scores = {}
    for name in template4.REVISIONS:
        ours = [template4.render(m, thinking=o.get("thinking", False), tools=o.get("tools"),
                                 revision=name) for o, m in _PROBES]
        scores[name] = sum(a == b for a, b in zip(ours, rendered or []))
    best = max(template4.REVISIONS, key=lambda n: (scores[n], n == template4.DEFAULT_REVISION))
    note = ""
    if scores[best] < len(_PROBES):
        why = error if rendered is None else \
            f"it renders {len(_PROBES) - scores[best]} of {len(_PROBES)} test conversations " \
            "otherwise"
        note = (f"this model's chat template is not a Gemma 4 revision gemma-chat knows ({why}); "
                f"prompts follow the {best!r} revision")
    _recognized[chat_template] = (best, note)
    return best, note


class PromptBuilder:
    """Token ids of prompts for one loaded model, in its format."""

    def __init__(self, backend, fmt: PromptFormat | None = None):
        self.backend = backend
        info = backend.info
        self.format = fmt or format_for(info.architecture, getattr(info, "chat_template", ""))
        self._turns: dict[tuple, list[int]] = {}
        self.closing = self.tokens(self.format.closing())
        #: The ids that open and close the thought channel, where the format has one.
        self.thought_ids: tuple[int, int] | None = None
        if self.format.thought_channel:
            ids = [backend.tokenize(m, special=True) for m in self.format.thought_channel]
            if all(len(i) == 1 for i in ids):
                self.thought_ids = (ids[0][0], ids[1][0])

    @property
    def can_think(self) -> bool:
        return self.thought_ids is not None

    def tokens(self, parts: Sequence[Part]) -> list[int]:
        """Markers as their control token, everything else as plain text."""
        ids: list[int] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                ids.extend(self.backend.tokenize("".join(plain), special=False))
                plain.clear()

        for part in parts:
            if isinstance(part, MediaPart):
                flush()
                ids.extend(self.backend.media_ids(part.media))
            elif isinstance(part, Marker):
                flush()
                ids.extend(self.backend.tokenize(part, special=True))
            else:
                plain.append(part)
        flush()
        return ids

    def check_media(self, media: Iterable) -> None:
        """Refuse, in one line, a picture or clip the loaded model cannot take."""
        from .backends.base import cannot_take

        for item in media:
            if item.kind not in self.backend.info.media:
                raise cannot_take(self.backend.info, item)

    def _check_messages(self, messages: list) -> None:
        self.check_media(part["media"] for m in messages if isinstance(m, Mapping)
                         and isinstance(m.get("content"), list) for part in m["content"]
                         if isinstance(part, Mapping) and part.get("media") is not None)

    def chat(self, messages: Iterable[Mapping[str, object]], *, thinking: bool = False,
             **options) -> list[int]:
        """A conversation ending in a user turn, with the model's turn opened."""
        messages = list(messages)
        self._check_messages(messages)
        return self.tokens(self.format.parts(messages, thinking=thinking, **options))

    def with_tools(self, messages: Iterable[Mapping[str, object]], tools: Sequence | None, *,
                   thinking: bool = False, open_reply: bool = True) -> list[int]:
        """A conversation with ``tools`` declared and any calls and results in it: Gemma 4
        in its own format, Gemma 1-3 with Google's function-calling prompt
        (:func:`gemma_chat.tools.gemma3_messages`)."""
        from .tools import gemma3_messages

        messages = list(messages)
        self._check_messages(messages)
        if self.format.name == "gemma4":
            parts = self.format.parts(messages, open_reply, thinking=thinking,
                                      **({"tools": list(tools)} if tools else {}))
        else:
            if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
                messages = gemma3_messages(messages, tools or [])
            parts = self.format.parts(messages, open_reply, thinking=thinking)
        return self.tokens(parts)

    def raw(self, text: str) -> list[int]:
        """Text as it is (control-token text included), with the model's BOS unless it
        already starts with one: exactly one BOS either way."""
        ids = self.backend.tokenize(text)
        bos = self.backend.info.bos_id
        return ids if ids[:1] == [bos] else [bos, *ids]

    def user_turn(self, text: str, *, first: bool, system: str | None = None,
                  thinking: bool = False, media: Sequence = ()) -> list[int]:
        """One user turn (see :meth:`PromptFormat.user_turn`), cached."""
        key = ("turn", first, system if first else None, thinking, text,
               tuple(m.sha256 for m in media))
        ids = self._turns.get(key)
        if ids is None:
            self.check_media(media)
            ids = self.tokens(self.format.user_turn(text, first=first,
                                                    system=system if first else None,
                                                    thinking=thinking, media=media))
            self._turns[key] = ids
        return ids

    def exchange(self, user: str, reply: str, reply_ids: Sequence[int], *, first: bool,
                 system: str | None = None, thinking: bool = False,
                 media: Sequence = ()) -> list[int]:
        """A finished exchange as it appears in later prompts: as the model generated it where
        the format keeps replies, else as the official template renders it again (Gemma 4
        drops the thoughts)."""
        parts = self.format.history(user, reply, first=first, system=system if first else None,
                                    thinking=thinking, media=media)
        if parts is None:
            return self.user_turn(user, first=first, system=system, thinking=thinking,
                                  media=media) + list(reply_ids) + self.closing
        key = ("history", first, system if first else None, thinking, user, reply,
               tuple(m.sha256 for m in media))
        ids = self._turns.get(key)
        if ids is None:
            ids = self._turns[key] = self.tokens(parts)
        return ids
