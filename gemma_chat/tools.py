"""Function calling for both Gemma prompt formats: declaring tools, and reading calls back.

    calls, text = parse_gemma4_calls(reply)
    # calls: [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]

Gemma 1-3 have no tool tokens: they are prompted with Google's documented function-calling
prompt (the JSON variant, :func:`gemma3_preamble`) and answer a call with one JSON object
``{"name": ..., "parameters": {...}}``; a tool's result goes back in a user turn, wrapped in
a ```` ```tool_output ```` block as Google's guides do. When a call is required, the reply is
constrained to :func:`gemma3_call_schema`, so it always parses and validates.

A Gemma 4 model calls a tool by writing ``<|tool_call>call:NAME{key:value,...}<tool_call|>``,
the syntax its chat template uses to print calls back (``gemma_chat.template4.tool_call``):
keys bare, strings between ``<|"|>`` marks (no escapes inside), ``true``/``false``, numbers,
nested ``{...}`` (keys bare or quoted) and ``[...]``. Several calls may follow one another.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
QUOTE = '<|"|>'

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"call:([A-Za-z_][\w.\-]*)\{")
_NULLS = {"null": None, "None": None, "none": None}
_BOOLS = {"true": True, "false": False, "True": True, "False": False}


@dataclass
class ToolRequest:
    """What a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` ask for."""

    tools: list[dict]
    choice: str  # "auto", "none" or "required"
    name: str | None = None  # the one function a named tool_choice requires
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.choice != "none"


def read_calls(text: str, tools: ToolRequest, gemma4: bool,
               known_only: bool = True) -> tuple[list[dict], str]:
    """The calls of a reply as OpenAI ``tool_calls`` (each with a fresh id), and the rest of its
    text. A call that does not parse stays text, and so does a call to a function not in
    ``tools`` unless ``known_only`` is false (then the caller answers it)."""
    from .template4 import strip_thinking

    if gemma4:
        try:
            calls, rest = parse_gemma4_calls(strip_thinking(text))
        except ToolCallSyntaxError:
            return [], text
    else:
        call = parse_gemma3_call(text, None if not known_only else tools.tools)
        calls, rest = ([call], "") if call is not None else ([], text)
    known = {t["function"]["name"] for t in tools.tools}
    if known_only and any(c["name"] not in known for c in calls):
        return [], text
    if not tools.parallel:
        calls = calls[:1]
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"],
                          "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls], rest


@dataclass
class CallPlan:
    """How a generation that may call tools starts and what constrains it."""

    prefix: list = field(default_factory=list)  # Parts the reply starts with (in the prompt)
    constraint: object = None  # gemma_chat.structured's constraint, or None

    @property
    def forced(self) -> str:
        """The prefix as text: what to put before the generated text to read it back."""
        return "".join(str(part) for part in self.prefix)


def plan_calls(backend, prompts, request: ToolRequest,
               compile: Callable[[str, Callable[[], object]], object] | None = None) -> CallPlan:
    """Set up a reply to a request with tools. Gemma 4: whenever the model opens a call
    (``<|tool_call>``), its name and arguments are constrained to the declared tools'
    (:func:`gemma4_call_grammar`); a required call is opened in the prompt. Gemma 1-3: a
    required call is one JSON object constrained to :func:`gemma3_call_schema`; otherwise
    the model is free. ``compile(key, build)`` may cache compiled grammars by ``key``."""
    from .structured import TriggeredConstraint, json_constraint, lark_constraint
    from .template4 import END_TOOL_CALL, QUOTE, TOOL_CALL

    compile = compile or (lambda _key, build: build())
    required = request.choice == "required"
    if prompts.format.name == "gemma4":
        [trigger], [quote], [end] = (prompts.tokens([m]) for m in (TOOL_CALL, QUOTE,
                                                                  END_TOOL_CALL))
        name = request.name if required else None
        grammar = gemma4_call_grammar(request.tools, name, quote, end)
        inner = compile(grammar, lambda: lark_constraint(backend, grammar))
        if not required:
            return CallPlan([], TriggeredConstraint(inner, trigger))
        opening = "call:" + (f"{name}{{" if name else "")
        return CallPlan([TOOL_CALL, opening],
                        TriggeredConstraint(inner, trigger, prompts.tokens([opening])))
    if required:
        schema = gemma3_call_schema(request.tools, request.name)
        return CallPlan([], compile(json.dumps(schema, sort_keys=True),
                                    lambda: json_constraint(backend, schema)))
    return CallPlan()


class ToolCallSyntaxError(ValueError):
    """A tool call that does not follow Gemma 4's syntax."""


# -- Gemma 1-3: Google's prompt, JSON calls ---------------------------------------------------

GEMMA3_PROMPT = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST "
    "put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
    "You SHOULD NOT include any other text in the response if you call a function\n")


def functions(tools: Sequence[Mapping]) -> list[dict]:
    """The ``function`` records of OpenAI-style tools."""
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError("each tool needs a function with a name")
        out.append(dict(function))
    return out


def gemma3_preamble(tools: Sequence[Mapping]) -> str:
    """Google's function-calling prompt with the tools' definitions, for the first user turn."""
    return GEMMA3_PROMPT + json.dumps(functions(tools), indent=2, ensure_ascii=False) + "\n"


def gemma3_call_schema(tools: Sequence[Mapping], name: str | None = None) -> dict:
    """The JSON schema of one call to one of ``tools`` (or to ``name`` only)."""
    options = []
    for function in functions(tools):
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {
            "name": {"const": function["name"]}, "parameters": parameters},
            "required": ["name", "parameters"], "additionalProperties": False})
    if not options:
        raise ValueError(f"no tool is called {name!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}


def gemma3_messages(messages: Sequence[Mapping], tools: Sequence[Mapping]) -> list[dict]:
    """OpenAI messages with tools as Gemma 1-3 turns: the prompt and definitions before the
    first user message, an assistant's calls as the JSON it wrote, tool results as user turns
    of ```` ```tool_output ```` blocks (consecutive ones in one turn)."""
    out: list[dict] = []
    preamble = gemma3_preamble(tools) if tools else ""
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "parameters": _arguments(c["function"])}
                     for c in message["tool_calls"]]
            text = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
            out.append({"role": "assistant", "content": (content + "\n" + text).strip()})
        elif role == "tool":
            block = f"```tool_output\n{content}\n```"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_output"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_output": True})
        elif role == "user" and preamble:
            out.append({"role": "user", "content": preamble + "\n" + content})
            preamble = ""
        else:
            out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_output", None)
    return out


def _arguments(function: Mapping) -> Any:
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args if args is not None else {}


def parse_gemma3_call(text: str, tools: Sequence[Mapping] | None) -> dict[str, Any] | None:
    """The call in a Gemma 1-3 reply (a JSON object naming one of ``tools``, or any function
    when ``tools`` is None, perhaps in a code fence), as ``{"name", "arguments"}``; None when
    the reply is not a call."""
    body = text.strip()
    fence = re.fullmatch(r"```[\w-]*\s*(.*?)\s*```", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)) or \
            tools is not None and value["name"] not in {f["name"] for f in functions(tools)}:
        return None
    args = value.get("parameters", value.get("arguments", {}))
    return {"name": value["name"], "arguments": args if isinstance(args, dict) else {}}


def parse_gemma4_calls(text: str) -> tuple[list[dict[str, Any]], str]:
    """The tool calls in ``text`` (name and arguments, in order) and the text around them.
    A call that does not parse raises :class:`ToolCallSyntaxError` naming where; a last call
    cut off before its closing mark, after complete ones, is left out."""
    calls: list[dict[str, Any]] = []
    rest: list[str] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        rest.append(text[pos:start])
        end = text.find(CALL_CLOSE, start)
        if end < 0 and calls:  # a further call cut off by the length limit: the calls before
            pos = len(text)    # it stand
            break
        body = text[start + len(CALL_OPEN):end if end >= 0 else len(text)]
        calls.append(parse_call(body))
        pos = end + len(CALL_CLOSE) if end >= 0 else len(text)
    rest.append(text[pos:])
    return calls, "".join(rest).strip()


def parse_call(body: str) -> dict[str, Any]:
    """``call:NAME{...}`` -> ``{"name": NAME, "arguments": {...}}``."""
    match = _NAME.match(body.strip())
    if match is None:
        raise ToolCallSyntaxError(f"a tool call must read call:NAME{{...}}, not {body[:40]!r}")
    reader = _Reader(body.strip(), match.end() - 1)
    arguments = reader.mapping()
    if reader.text[reader.pos:].strip():
        raise ToolCallSyntaxError(f"unexpected text after the arguments of {match.group(1)}: "
                                  f"{reader.text[reader.pos:][:40]!r}")
    return {"name": match.group(1), "arguments": arguments}


class _Reader:
    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def fail(self, what: str) -> ToolCallSyntaxError:
        return ToolCallSyntaxError(f"{what} at {self.text[self.pos:self.pos + 30]!r}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \n\t\r":
            self.pos += 1

    def take(self, token: str) -> bool:
        self.skip()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def value(self) -> Any:
        self.skip()
        text, pos = self.text, self.pos
        if text.startswith(QUOTE, pos):
            end = text.find(QUOTE, pos + len(QUOTE))
            if end < 0:
                raise self.fail("an unterminated string")
            self.pos = end + len(QUOTE)
            return text[pos + len(QUOTE):end]
        if text.startswith("{", pos):
            return self.mapping()
        if text.startswith("[", pos):
            return self.sequence()
        if (number := _NUMBER.match(text, pos)) and \
                not (number.end() < len(text) and (text[number.end()].isalnum()
                                                   or text[number.end()] == "_")):
            self.pos = number.end()
            word = number.group()
            return float(word) if any(c in word for c in ".eE") else int(word)
        end = pos
        while end < len(text) and text[end] not in ",}]":
            end += 1
        word = text[pos:end].strip()
        if not word:
            raise self.fail("a missing value")
        self.pos = end
        if word in _BOOLS:
            return _BOOLS[word]
        if word in _NULLS:
            return None
        return word  # a bare word: a string the model did not quote

    def key(self) -> str:
        self.skip()
        if self.text.startswith(QUOTE, self.pos):
            key = self.value()
        else:
            end = self.text.find(":", self.pos)
            if end < 0:
                raise self.fail("a key without a value")
            key = self.text[self.pos:end].strip()
            self.pos = end
        if not key or not self.take(":"):
            raise self.fail("a key must be followed by ':'")
        return key

    def mapping(self) -> dict[str, Any]:
        if not self.take("{"):
            raise self.fail("expected '{'")
        out: dict[str, Any] = {}
        if self.take("}"):
            return out
        while True:
            key = self.key()
            out[key] = self.value()
            if self.take("}"):
                return out
            if not self.take(","):
                raise self.fail("expected ',' or '}'")

    def sequence(self) -> list[Any]:
        self.take("[")
        out: list[Any] = []
        if self.take("]"):
            return out
        while True:
            out.append(self.value())
            if self.take("]"):
                return out
            if not self.take(","):
                raise self.fail("expected ',' or ']'")


# -- Gemma 4: calls constrained to the declared parameters ------------------------------------

def gemma4_call_grammar(tools: Sequence[Mapping], name: str | None, quote: int,
                        end: int) -> str:
    """A grammar (llguidance's Lark dialect) for what follows ``<|tool_call>``: ``call:NAME{
    ...}<tool_call|>`` naming one of ``tools`` (or ``name``), its arguments following that
    tool's parameter schema in the syntax the template prints calls in: keys bare and in the
    template's order (sorted), strings between ``quote`` tokens, then the ``end`` token.
    Enforced: types, ``properties``/``required`` (no other keys), ``items``, ``enum``,
    ``const``, ``anyOf``/``oneOf``, ``nullable``, string lengths; other keywords (ranges,
    patterns, array lengths) are not."""
    grammar = _CallGrammar(quote)
    calls = []
    for function in functions(tools):
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        args = grammar.value(parameters if parameters.get("properties") is not None
                             or parameters.get("type") != "object" else
                             {"type": "object", "properties": {}})
        calls.append(grammar.rule(f"{_literal(function['name'])} {args}"))
    if not calls:
        raise ValueError(f"no tool is called {name!r}")
    grammar.rules.insert(0, f'start: "call:" ({" | ".join(calls)}) <[{end}]>')
    return "\n".join(grammar.rules) + "\n"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _CallGrammar:
    """Lark rules for values in Gemma 4's call syntax, one rule per schema node."""

    def __init__(self, quote: int):
        self.q = f"<[{quote}]>"
        self.rules = [
            'any_value: any_string | NUMBER | "true" | "false" | null | any_array | any_object',
            'null: "null" | "None"',  # the template prints Python's None
            f"any_string: {self.q} TEXT? {self.q}",
            'any_array: "[" (any_value ("," any_value)*)? "]"',
            'any_object: "{" (KEY ":" any_value ("," KEY ":" any_value)*)? "}"',
            "KEY: /[A-Za-z_][A-Za-z0-9_]*/",
            "TEXT: /(.|\\n)+/",
            # Numbers a tool can take (64-bit floats keep 17 digits): a model that never
            # stops writing digits is stopped by the grammar, not by the length limit.
            "INTEGER: /-?(0|[1-9][0-9]{0,17})/",
            "NUMBER: /-?(0|[1-9][0-9]{0,17})(\\.[0-9]{1,17})?([eE][+-]?[0-9]{1,3})?/",
        ]
        self.strings: dict[tuple[int, int | None], str] = {}

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def constant(self, value: Any) -> str:
        if isinstance(value, str):
            return f"{self.q} {_literal(value)} {self.q}" if value else f"{self.q} {self.q}"
        if value is None:
            return "null"
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if isinstance(value, (int, float)):
            return _literal(json.dumps(value))
        return "any_value"  # a constant list or object: its shape is checked on reading

    def value(self, schema: Any) -> str:
        if not isinstance(schema, Mapping):
            return "any_value"
        if "const" in schema:
            return self.constant(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rule(" | ".join(self.constant(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.rule(" | ".join(self.value(s) for s in schema[key]))
        kinds = schema.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
        if not kinds:
            return "any_value"
        options = [self.typed(kind, schema) for kind in kinds]
        if schema.get("nullable") is True and "null" not in kinds:
            options.append("null")
        return options[0] if len(options) == 1 else self.rule(" | ".join(options))

    def typed(self, kind: str, schema: Mapping) -> str:
        if kind == "string":
            return self.string(schema.get("minLength"), schema.get("maxLength"))
        if kind == "integer":
            return "INTEGER"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return "null"
        if kind == "array":
            item = self.value(schema.get("items"))
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object":
            properties = schema.get("properties")
            if not isinstance(properties, Mapping):
                return "any_object"
            required = set(schema.get("required") or ())
            keys = sorted(properties, key=str.lower)  # the template's dictsort
            return self.rule(f'"{{" {self.members(keys, properties, required)} "}}"')
        return "any_value"

    def string(self, least: object, most: object) -> str:
        """A string between quote tokens, its length bounded where the schema says."""
        least = least if isinstance(least, int) and least > 0 else 0
        most = most if isinstance(most, int) and most >= least else None
        if (least, most) == (0, None):
            return "any_string"
        if most == 0:
            return f"{self.q} {self.q}"
        if (least, most) not in self.strings:
            name = f"TEXT{len(self.strings)}"
            bounds = f"{max(least, 1)},{'' if most is None else most}"
            self.rules.append(f"{name}: /(.|\\n){{{bounds}}}/")
            self.strings[(least, most)] = self.rule(
                f"{self.q} {name} {self.q}" if least else f"{self.q} {name}? {self.q}")
        return self.strings[(least, most)]

    def members(self, keys: list[str], properties: Mapping, required: set) -> str:
        """``key:value`` pairs in ``keys``' order, comma-separated, each optional unless
        required: one rule per (position, whether a pair came before)."""
        made: dict[tuple[int, bool], str] = {}
        values = [self.value(properties[key]) for key in keys]

        def rest(i: int, after: bool) -> str:
            if i == len(keys):
                return ""
            if (i, after) not in made:
                key = keys[i]
                pair = (('"," ' if after else "") + _literal(f"{key}:") + " "
                        + values[i] + " " + rest(i + 1, True)).strip()
                if key in required:
                    body = pair
                else:
                    skip = rest(i + 1, after)
                    body = f"({pair}) | {skip}" if skip else f"({pair})?"
                made[(i, after)] = self.rule(body)
            return made[(i, after)]

        return rest(0, False)
