"""The Gemma chat template, in pure Python.

    >>> render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    '<bos><start_of_turn>user\\nBe brief.\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\n'

Every Gemma generation (1, 1.1, 2, 3) uses the same turn format. Gemma has no system role:
Gemma 3's official template folds a system message into the first user turn as
``system + "\\n\\n" + user``; Gemma 1 and 2's official templates reject a system message, and we
fold it the same way instead. Message contents are stripped, as the official templates do
(the system text is not, again as Gemma 3's template does).

The rendered string starts with the literal ``<bos>``: tokenize it with special-token parsing
on and without adding another BOS, so the prompt holds exactly one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

BOS = "<bos>"
EOS = "<eos>"
START_OF_TURN = "<start_of_turn>"
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
    content = message.get("content")
    if isinstance(content, str):
        return content
    # OpenAI-style content parts: [{"type": "text", "text": "..."}, ...]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ValueError(f"message {index}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"message {index}: a text part has no text")
            texts.append(text.strip())  # Gemma 3's template trims each part
        return "".join(texts)
    raise ValueError(f"message {index}: content must be a string")


def normalize(messages: Iterable[Mapping[str, object]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Check the role rules; return (system text or None, [(role, content), ...]).

    Raises ``ValueError`` when roles are unknown or do not alternate user/assistant after an
    optional leading system message.
    """
    items = list(messages)
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(items):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is not a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        content = content_text(message, i)
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i}: roles must alternate user/assistant after an optional system "
                f"message (expected {expected}, got {role})"
            )
        turns.append((role, content))
    return system, turns


def render(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = True) -> str:
    """Render a conversation in Gemma's chat format (see the module docstring)."""
    system, turns = normalize(messages)
    if not turns:
        raise ValueError("the conversation has no user message")
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError("the last message must be from the user to generate a reply")
    parts = [BOS]
    for i, (role, content) in enumerate(turns):
        text = content.strip()
        if i == 0 and system is not None:
            text = system + "\n\n" + text
        parts.append(render_turn(role, text))
    if add_generation_prompt:
        parts.append(generation_prompt())
    return "".join(parts)


def render_turn(role: str, text: str) -> str:
    """One finished turn: ``<start_of_turn>{user|model}\\n{text}<end_of_turn>\\n`` (text as is)."""
    return f"{START_OF_TURN}{'model' if role == 'assistant' else role}\n{text}{END_OF_TURN}\n"


def generation_prompt() -> str:
    """What opens the model's turn: ``<start_of_turn>model\\n``."""
    return f"{START_OF_TURN}model\n"
