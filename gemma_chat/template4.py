"""Gemma 4's chat template, in pure Python.

    >>> render([{"role": "user", "content": "Hi"}], thinking=True)
    '<bos><|turn>system\\n<|think|>\\n<turn|>\\n<|turn>user\\nHi<turn|>\\n<|turn>model\\n'

Gemma 4 has a native system turn. Thinking is switched on by ``<|think|>`` at the top of the
system turn; the model then writes ``<|channel>thought\\n...<channel|>`` before its answer, and
with thinking off the generation prompt pre-fills an empty thought channel. When history is
rendered again, model turns lose their thoughts (:func:`strip_thinking`), so the prompt of the
next turn differs from the tokens the model generated from the start of its last turn. Tool
declarations, calls and responses have their own markers and a compact argument syntax (bare
keys, strings quoted by ``<|"|>``); images, audio and video are single placeholder tokens.

Google has published the template in revisions that render some conversations differently
(:data:`REVISIONS`): the one in a model file decides, recognised by :mod:`gemma_chat.prompt`
from the file's own template rendered in a sandbox. Each revision here is checked
string-for-string against its Jinja source (``tests/test_template4.py``).

As :mod:`gemma_chat.template` does for Gemma 1-3, :func:`parts` gives the text as markers
(control tokens written by the template) and plain text (message contents, tool names and
values), so that content can never become a control token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidMessages
from .template import Marker, MediaPart, Part

BOS = Marker("<bos>")
TURN, END_TURN = Marker("<|turn>"), Marker("<turn|>")
THINK = Marker("<|think|>")
CHANNEL, END_CHANNEL = Marker("<|channel>"), Marker("<channel|>")
TOOL, END_TOOL = Marker("<|tool>"), Marker("<tool|>")
TOOL_CALL, END_TOOL_CALL = Marker("<|tool_call>"), Marker("<tool_call|>")
TOOL_RESPONSE, END_TOOL_RESPONSE = Marker("<|tool_response>"), Marker("<tool_response|>")
QUOTE = Marker('<|"|>')
IMAGE, AUDIO, VIDEO = Marker("<|image|>"), Marker("<|audio|>"), Marker("<|video|>")

#: Every control token the format writes.
MARKERS = (BOS, TURN, END_TURN, THINK, CHANNEL, END_CHANNEL, TOOL, END_TOOL, TOOL_CALL,
           END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE, QUOTE, IMAGE, AUDIO, VIDEO)

ROLES = ("system", "developer", "user", "assistant", "tool")

#: What ``/info`` and ``gemma show`` print as the prompt format.
PROMPT_FORMAT = (
    "<bos><|turn>system\\n[<|think|>]{system}<turn|>\\n<|turn>user\\n{user}<turn|>\\n"
    "<|turn>model\\n{reply}<turn|>\\n ... <|turn>model\\n  (native system role; thoughts in "
    "<|channel>thought ... <channel|>, dropped from history)"
)


@dataclass(frozen=True)
class Revision:
    """One published revision of the official template, by what it renders differently."""

    name: str
    description: str
    think_newline: bool  # "<|think|>\n" (else "<|think|>" directly followed by the system text)
    padded_media: bool  # "\n\n<|image|>\n\n" (else "<|image|>")
    nested_first: bool  # tool parameters: nullable/object/array in the newer order
    tool_messages: str  # "turn": a role "tool" message is its own turn; "fold": into the call
    reasoning: str  # thoughts kept in tool-calling turns: "", "interleaved" or "fold"


REVISIONS: dict[str, Revision] = {r.name: r for r in (
    Revision("release", "as in the first Gemma 4 model files", False, True, False, "turn", ""),
    Revision("interleaved", "keeps thoughts between tool calls", True, False, False, "turn",
             "interleaved"),
    Revision("openai-tools", "folds OpenAI tool messages into the model turn", True, False,
             True, "fold", "fold"),
)}

#: For a model file without a template: the newest revision.
DEFAULT_REVISION = "openai-tools"


# -- values as the template prints them --------------------------------------------------------

def _sorted_items(mapping: Mapping) -> list:
    """Jinja's ``dictsort``: by key, case-insensitively, stable."""
    return sorted(mapping.items(),
                  key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _upper(value: object) -> str:
    """Jinja's ``upper`` filter; an absent value is ""."""
    return "" if value is None else str(value).upper()


def argument(value: object, escape_keys: bool = True) -> list[Part]:
    """``format_argument``: strings in ``<|"|>``, booleans as true/false, mappings with sorted
    keys, sequences in brackets, anything else as Python prints it."""
    if isinstance(value, str):
        return [QUOTE, value, QUOTE]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, Mapping):
        out: list[Part] = ["{"]
        for i, (key, item) in enumerate(_sorted_items(value)):
            if i:
                out.append(",")
            out += [QUOTE, str(key), QUOTE] if escape_keys else [str(key)]
            out.append(":")
            out += argument(item, escape_keys)
        return out + ["}"]
    if isinstance(value, (list, tuple)):
        out = ["["]
        for i, item in enumerate(value):
            if i:
                out.append(",")
            out += argument(item, escape_keys)
        return out + ["]"]
    return [str(value)]


def _quoted_list(items: Iterable[object]) -> list[Part]:
    out: list[Part] = []
    for i, item in enumerate(items):
        if i:
            out.append(",")
        out += [QUOTE, str(item), QUOTE]
    return out


_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _items_parts(items: Mapping, revision: Revision) -> list[Part]:
    out: list[Part] = []
    first = True
    for key, value in _sorted_items(items):
        if value is None:
            continue
        if not first:
            out.append(",")
        first = False
        if key == "properties":
            out.append("properties:{")
            if isinstance(value, Mapping):
                out += _parameters(value, revision)
            out.append("}")
        elif key == "required":
            out += ["required:[", *_quoted_list(value), "]"]
        elif key == "type":
            out.append("type:")
            out += argument(value.upper() if isinstance(value, str)
                            else [_upper(v) for v in value])
        else:
            out.append(f"{key}:")
            out += argument(value)
    return out


def _parameters(properties: Mapping, revision: Revision) -> list[Part]:
    """``format_parameters``: the properties of a parameter schema, standard keys skipped."""
    out: list[Part] = []
    first = True
    for key, value in _sorted_items(properties):
        if key in _STANDARD_KEYS:
            continue
        if not first:
            out.append(",")
        first = False
        value = value if isinstance(value, Mapping) else {}
        comma = [False]  # the template's add_comma: a comma before every field but the first

        def sep(out: list[Part] = out, comma: list[bool] = comma) -> None:
            if comma[0]:
                out.append(",")
            comma[0] = True

        out.append(f"{key}:{{")
        if value.get("description"):
            out += ["description:", QUOTE, str(value["description"]), QUOTE]
            comma[0] = True
        kind = _upper(value.get("type"))
        if revision.nested_first:
            if kind == "STRING":
                if value.get("enum"):
                    sep()
                    out += ["enum:", *argument(value["enum"])]
            elif kind == "ARRAY":
                if isinstance(value.get("items"), Mapping) and value["items"]:
                    sep()
                    out += ["items:{", *_items_parts(value["items"], revision), "}"]
            if value.get("nullable"):
                sep()
                out.append("nullable:true")
            if kind == "OBJECT":
                sep()
                nested = value.get("properties")
                out.append("properties:{")
                out += _parameters(nested if isinstance(nested, Mapping) else value, revision)
                out.append("}")
                if value.get("required"):
                    sep()
                    out += ["required:[", *_quoted_list(value["required"]), "]"]
        else:
            if value.get("nullable"):
                sep()
                out.append("nullable:true")
            if kind == "STRING":
                if value.get("enum"):
                    sep()
                    out += ["enum:", *argument(value["enum"])]
            elif kind == "OBJECT":
                # This revision writes these commas unconditionally.
                nested = value.get("properties")
                out.append(",properties:{")
                out += _parameters(nested if isinstance(nested, Mapping) else value, revision)
                out.append("}")
                if value.get("required"):
                    out += [",required:[", *_quoted_list(value["required"]), "]"]
            elif kind == "ARRAY":
                if isinstance(value.get("items"), Mapping) and value["items"]:
                    out += [",items:{", *_items_parts(value["items"], revision), "}"]
        sep()
        out += ["type:", QUOTE, kind, QUOTE, "}"]
    return out


def declaration(tool: Mapping, revision: Revision) -> list[Part]:
    """``format_function_declaration``: one OpenAI-style tool (``{"type": "function",
    "function": {"name", "description", "parameters", ["response"]}}``)."""
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidMessages("a tool needs a function with a name")
    out: list[Part] = [f"declaration:{function['name']}{{description:", QUOTE,
                       str(function.get("description") or ""), QUOTE]
    params = function.get("parameters")
    if params:
        if not isinstance(params, Mapping):
            raise InvalidMessages(f"tool {function['name']}: parameters must be an object")
        out.append(",parameters:{")
        if params.get("properties"):
            out += ["properties:{", *_parameters(params["properties"], revision), "},"]
        if params.get("required"):
            out += ["required:[", *_quoted_list(params["required"]), "],"]
        if params.get("type"):
            out += ["type:", QUOTE, _upper(params["type"]), QUOTE, "}"]
    if "response" in function:
        response = function["response"] if isinstance(function["response"], Mapping) else {}
        out.append(",response:{")
        if response.get("description"):
            out += ["description:", QUOTE, str(response["description"]), QUOTE, ","]
        if _upper(response.get("type")) == "OBJECT":
            out += ["type:", QUOTE, "OBJECT", QUOTE, "}"]
    out.append("}")
    return _trim(out)


def _trim(parts: list[Part]) -> list[Part]:
    """Jinja's ``trim`` of the joined text, applied to the first and last plain parts."""
    out = list(parts)
    while out and not isinstance(out[0], Marker):
        text = out[0].lstrip()
        if text:
            out[0] = text
            break
        out.pop(0)
    while out and not isinstance(out[-1], Marker):
        text = out[-1].rstrip()
        if text:
            out[-1] = text
            break
        out.pop()
    return out


def strip_thinking(text: str) -> str:
    """A model turn's text without its thought channels, trimmed (as the template does)."""
    result = []
    for piece in text.split("<channel|>"):
        result.append(piece.split("<|channel>")[0] if "<|channel>" in piece else piece)
    return "".join(result).strip()


def tool_call(call: Mapping) -> list[Part]:
    """``<|tool_call>call:NAME{key:value,...}<tool_call|>`` for an OpenAI tool call (its
    arguments a mapping, or a string written as it is)."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidMessages("a tool call needs a function with a name")
    out: list[Part] = [TOOL_CALL, f"call:{function['name']}{{"]
    args = function.get("arguments")
    if isinstance(args, Mapping):
        for i, (key, value) in enumerate(_sorted_items(args)):
            if i:
                out.append(",")
            out += [f"{key}:", *argument(value, escape_keys=False)]
    elif isinstance(args, str):
        out.append(args)
    return out + ["}", END_TOOL_CALL]


def tool_response(name: str, response: object) -> list[Part]:
    """``<|tool_response>response:NAME{...}<tool_response|>``."""
    out: list[Part] = [TOOL_RESPONSE, f"response:{name}{{"]
    if isinstance(response, Mapping):
        for i, (key, value) in enumerate(_sorted_items(response)):
            if i:
                out.append(",")
            out += [f"{key}:", *argument(value, escape_keys=False)]
    else:
        out += ["value:", *argument(response, escape_keys=False)]
    return out + ["}", END_TOOL_RESPONSE]


# -- conversations -----------------------------------------------------------------------------

def check(messages: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """The messages, refused (:class:`InvalidMessages`) where a role or content is malformed."""
    items = list(messages)
    for i, message in enumerate(items):
        if not isinstance(message, Mapping):
            raise InvalidMessages(f"message {i} is not a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessages(f"message {i}: unknown role {role!r} (use system, user, "
                                  "assistant or tool)")
        if role in ("system", "developer") and i != 0:
            raise InvalidMessages(f"message {i}: a system message may only come first")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidMessages(f"message {i}: content must be a string or a list of parts")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping) or part.get("type") not in (
                    "text", "image", "audio", "video"):
                raise InvalidMessages(f"message {i}: content parts must be text, image, audio "
                                      "or video")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InvalidMessages(f"message {i}: a text part has no text")
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise InvalidMessages(f"message {i}: tool_calls must be a list")
    return items


def content_of(message: Mapping, revision: Revision | str = DEFAULT_REVISION) -> list[Part]:
    """A user message's content as the template writes it (media included)."""
    return _content(message, False, REVISIONS[revision] if isinstance(revision, str) else revision)


def _content(message: Mapping, model: bool, revision: Revision) -> list[Part]:
    content = message.get("content")
    text = strip_thinking if model else str.strip
    if isinstance(content, str):
        return [text(content)]
    out: list[Part] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            out.append(text(part["text"]))
        elif kind in ("image", "video"):
            marker = IMAGE if kind == "image" else VIDEO
            if part.get("media") is not None:  # the picture itself: the backend's ids for it
                marker = MediaPart(marker, part["media"])
            out += ["\n\n", marker, "\n\n"] if revision.padded_media else [marker]
        elif kind == "audio":
            media = part.get("media")
            out.append(AUDIO if media is None else MediaPart(AUDIO, media))
    return out


def parts(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = True, *,
          thinking: bool = False, tools: Sequence[Mapping] | None = None,
          revision: Revision | str = DEFAULT_REVISION) -> list[Part]:
    """The conversation in Gemma 4's chat format, as markers and plain text."""
    rev = REVISIONS[revision] if isinstance(revision, str) else revision
    items = check(messages)
    out: list[Part] = [BOS]
    prev: str | None = None
    if thinking or tools or (items and items[0].get("role") in ("system", "developer")):
        out += [TURN, "system\n"]
        if thinking:
            out += [THINK, "\n"] if rev.think_newline else [THINK]
            prev = "think"
        if items and items[0].get("role") in ("system", "developer"):
            out += _content_text(items[0])
            items = items[1:]
        if tools:
            for tool in tools:
                out += [TOOL, *declaration(tool, rev), END_TOOL]
            prev = "tool"
        out += [END_TURN, "\n"]
    last_user = max((i for i, m in enumerate(items) if m.get("role") == "user"), default=-1)
    loop = _fold_loop if rev.tool_messages == "fold" else _turn_loop
    prev = loop(items, rev, last_user, prev, out)
    if add_generation_prompt:
        if rev.tool_messages == "fold":
            if prev not in ("tool_response", "tool_call"):
                out += [TURN, "model\n"]
                if not thinking:
                    out += [CHANNEL, "thought\n", END_CHANNEL]
        else:
            if prev != "tool_response":
                out += [TURN, "model\n"]
            if not thinking:
                out += [CHANNEL, "thought\n", END_CHANNEL]
    return [p for p in out if p]


def _content_text(message: Mapping) -> list[Part]:
    """A system message's content, trimmed (text parts only, as the template prints them)."""
    content = message.get("content")
    if isinstance(content, str):
        return [content.strip()]
    return [str(p.get("text", "")) for p in content or () if p.get("type") == "text"]


def _turn_loop(items, rev: Revision, last_user: int, prev, out: list[Part]):
    """The "release" and "interleaved" revisions: every message is a turn, tool messages too."""
    for i, message in enumerate(items):
        role = "model" if message["role"] == "assistant" else message["role"]
        calls = message.get("tool_calls")
        if not (rev.reasoning == "interleaved" and prev == "tool_response" and calls):
            out += [TURN, role + "\n"]
        prev = None
        if calls:
            reasoning = message.get("reasoning_content")
            if rev.reasoning == "interleaved" and reasoning and i > last_user:
                out += [CHANNEL, "thought\n", str(reasoning), END_CHANNEL]
            for call in calls:
                out += tool_call(call)
            prev = "tool_call"
        responses = message.get("tool_responses")
        if responses:
            for response in responses:
                out += tool_response(str(response.get("name") or "unknown"),
                                     response.get("response"))
            prev = "tool_response"
        out += _content(message, role == "model", rev)
        prev = _media_kind(message) or prev
        if not (responses and not message.get("content")):
            out += [END_TURN, "\n"]
    return prev


def _fold_loop(items, rev: Revision, last_user: int, prev, out: list[Part]):
    """The "openai-tools" revision: tool messages are folded into the model turn that called
    them, and a model message after another model message continues its turn."""
    for i, message in enumerate(items):
        if message["role"] == "tool":
            continue
        prev = None
        role = "model" if message["role"] == "assistant" else message["role"]
        previous = next((m["role"] for m in reversed(items[:i]) if m["role"] != "tool"), None)
        if not (role == "model" and previous == "assistant"):
            out += [TURN, role + "\n"]
        calls = message.get("tool_calls")
        thought = message.get("reasoning") or message.get("reasoning_content")
        if thought and i > last_user and calls:
            out += [CHANNEL, "thought\n" + str(thought) + "\n", END_CHANNEL]
        if calls:
            for call in calls:
                out += tool_call(call)
            prev = "tool_call"
        answered = False
        if message.get("tool_responses"):
            for response in message["tool_responses"]:
                out += tool_response(str(response.get("name") or "unknown"),
                                     response.get("response"))
                answered, prev = True, "tool_response"
        elif calls:
            for follow in _following_tools(items, i):
                name = follow.get("name") or "unknown"
                for call in calls:
                    if call.get("id") == follow.get("tool_call_id"):
                        name = call["function"]["name"]
                body = follow.get("content")
                if isinstance(body, list):
                    body = "".join(str(p.get("text") or "") for p in body
                                   if p.get("type") == "text")
                out += tool_response(str(name), body)
                answered, prev = True, "tool_response"
        out += _content(message, role == "model", rev)
        prev = _media_kind(message) or prev
        if prev == "tool_call" and not answered:
            out.append(TOOL_RESPONSE)
        elif not (answered and not message.get("content")):
            out += [END_TURN, "\n"]
    return prev


def _following_tools(items, i: int) -> list[Mapping]:
    out = []
    for message in items[i + 1:]:
        if message["role"] != "tool":
            break
        out.append(message)
    return out


def _media_kind(message: Mapping) -> str | None:
    """The kind of the last media part of a message (the template remembers it)."""
    kind = None
    content = message.get("content")
    for part in content if isinstance(content, list) else ():
        if part.get("type") in ("image", "audio", "video"):
            kind = part["type"]
    return kind


def render(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = True,
           **options) -> str:
    """Render a conversation in Gemma 4's chat format (see the module docstring)."""
    return "".join(parts(messages, add_generation_prompt, **options))
