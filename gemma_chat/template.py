"""The Gemma chat template, in pure Python.

    >>> render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    '<bos><start_of_turn>user\\nBe brief.\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\n'

Every Gemma generation (1, 1.1, 2, 3) uses the same turn format. Gemma has no system role:
Gemma 3's official template folds a system message into the first user turn as
``system + "\\n\\n" + user``; Gemma 1 and 2's official templates reject a system message, and we
fold it the same way instead. Message contents are stripped, as the official templates do
(the system text is not, again as Gemma 3's template does).

The rendered string starts with the literal ``<bos>``. :func:`parts` gives the same text as
markers and plain text apart, so that :mod:`gemma_chat.prompt` can tokenize message contents as
plain text (text a user types never becomes a control token) and the prompt holds exactly one
BOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import InvalidMessages

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_TURN = "<end_of_turn>"
ROLES = ("system", "user", "assistant")

#: What ``/info`` and ``gemma run --verbose`` show as the prompt format in use.
PROMPT_FORMAT = (
    "<bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n"
    "<start_of_turn>model\\n{reply}<end_of_turn>\\n ... <start_of_turn>model\\n"
    "  (Gemma has no system role: a system prompt is folded into the first user turn)"
)


def content_text(message: Mapping[str, object], index: int) -> str:
    """A message's content as text: a string, or OpenAI-style text parts joined."""
    content = content_parts(message, index)
    if any(isinstance(p, MediaPart) for p in content):
        raise InvalidMessages(f"message {index}: only text content parts are supported here")
    return "".join(content)


def content_parts(message: Mapping[str, object], index: int) -> list[Part]:
    """A message's content as parts: text (each text part trimmed, as Gemma 3's template does)
    and, for an image part with its picture (``"media"``), a :class:`MediaPart` between blank
    lines, where Gemma 3's processor expands the template's ``<start_of_image>``."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise InvalidMessages(f"message {index}: content must be a string")
    out: list[Part] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidMessages(f"message {index}: a text part has no text")
            out.append(text.strip())
        elif kind == "image":
            if part.get("media") is None:
                raise InvalidMessages(f"message {index}: an image part without its picture")
            out += ["\n\n", MediaPart(START_OF_IMAGE, part["media"]), "\n\n"]
        elif kind == "audio":
            raise InvalidMessages(f"message {index}: Gemma 1-3 do not hear audio (Gemma 4 E2B "
                                  "and E4B do)")
        else:
            raise InvalidMessages(f"message {index}: content parts must be text or image")
    return out


def _has_media(parts: list[Part]) -> bool:
    return any(isinstance(p, MediaPart) for p in parts)


def normalize(messages: Iterable[Mapping[str, object]]) \
        -> tuple[str | None, list[tuple[str, str | list[Part]]]]:
    """Check the role rules; return (system text or None, [(role, content), ...]), a content
    being its text, or its parts where it holds a picture.

    Raises :class:`InvalidMessages` when roles are unknown or do not alternate user/assistant
    after an optional leading system message.
    """
    items = list(messages)
    system: str | None = None
    turns: list[tuple[str, str | list[Part]]] = []
    for i, message in enumerate(items):
        if not isinstance(message, Mapping):
            raise InvalidMessages(f"message {i} is not a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessages(
                f"message {i}: unknown role {role!r} (use system, user or assistant)")
        content = content_text(message, i) if role == "system" else content_parts(message, i)
        if isinstance(content, list) and not _has_media(content):
            content = "".join(content)
        if role == "system":
            if i != 0:
                raise InvalidMessages(f"message {i}: a system message may only come first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidMessages(
                f"message {i}: roles must alternate user/assistant after an optional system "
                f"message (expected {expected}, got {role})"
            )
        turns.append((role, content))
    return system, turns


class Marker(str):
    """A control token's text (``<bos>``, ``<start_of_turn>``, ...), as opposed to plain text."""


class MediaPart(str):
    """A picture or sound clip in a prompt: the placeholder its template writes (its text) and
    the :class:`~gemma_chat.media.Media` itself, which the backend turns into the ids around
    it and one key per position of its own."""

    media: object

    def __new__(cls, text: str, media: object):
        part = super().__new__(cls, text)
        part.media = media
        return part


Part = str  # plain text, a Marker or a MediaPart

#: Gemma's control tokens, as the parts that spell them.
BOS_PART, SOT, EOT = Marker(BOS), Marker(START_OF_TURN), Marker(END_OF_TURN)


def parts(messages: Iterable[Mapping[str, object]],
          add_generation_prompt: bool = True) -> list[Part]:
    """The conversation in Gemma's chat format, as markers and plain text."""
    system, turns = normalize(messages)
    if not turns:
        raise InvalidMessages("the conversation has no user message")
    if add_generation_prompt and turns[-1][0] != "user":
        raise InvalidMessages("the last message must be from the user to generate a reply")
    out: list[Part] = [BOS_PART]
    for i, (role, content) in enumerate(turns):
        prefix = system + "\n\n" if i == 0 and system is not None else ""
        if isinstance(content, str):
            out += turn_parts(role, prefix + content.strip())
        else:  # with pictures
            out += [SOT, f"{'model' if role == 'assistant' else role}\n{prefix}", *content,
                    *closing_parts()]
    if add_generation_prompt:
        out += generation_parts()
    return out


def render(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = True) -> str:
    """Render a conversation in Gemma's chat format (see the module docstring)."""
    return "".join(parts(messages, add_generation_prompt))


def turn_parts(role: str, text: str) -> list[Part]:
    """One finished turn: ``<start_of_turn>{user|model}\\n{text}<end_of_turn>\\n`` (text as is)."""
    return [SOT, f"{'model' if role == 'assistant' else role}\n{text}", *closing_parts()]


def closing_parts() -> list[Part]:
    """What ends a turn: ``<end_of_turn>\\n``."""
    return [EOT, "\n"]


def generation_parts() -> list[Part]:
    """What opens the model's turn: ``<start_of_turn>model\\n``."""
    return [SOT, "model\n"]
