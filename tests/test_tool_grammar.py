"""Gemma 4 tool calls held to the declared parameters, on the real Gemma 4 vocabulary: the call
grammar takes every call the official template prints for valid arguments, refuses calls that
break the schema, and a random walk through whatever it allows always ends in a call that
parses and validates."""

from __future__ import annotations

import pytest
from test_gemma4_vocab import Vocabulary
from test_template4 import SEARCH, WEATHER

from gemma_chat import template4
from gemma_chat.errors import InvalidArgument
from gemma_chat.prompt import Gemma4Turns, PromptBuilder
from gemma_chat.tools import ToolRequest, parse_gemma4_calls, plan_calls

pytestmark = pytest.mark.slow  # the sdist's vocabulary, on first use
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

BOOK = {"type": "function", "function": {
    "name": "book", "description": "Book a table.",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "guests": {"type": "integer"},
        "time": {"type": "string", "enum": ["18:00", "20:30"]},
        "vegan": {"type": "boolean"},
        "notes": {"type": ["string", "null"], "maxLength": 6},
        "tables": {"type": "array", "items": {"type": "integer"}},
    }, "required": ["name", "guests", "time"]}}}
TOOLS = [WEATHER, SEARCH, BOOK]


def standard(schema):
    """OpenAPI's ``nullable`` (which Gemma's template knows) as JSON Schema says it."""
    if isinstance(schema, list):
        return [standard(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: standard(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") is True and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


SCHEMAS = {t["function"]["name"]: standard(t["function"]["parameters"]) for t in TOOLS}

VALID = [
    ("get_weather", {"city": "Oslo"}),
    ("get_weather", {"city": "São Paulo, \"BR\"\n", "unit": "fahrenheit"}),
    ("search", {"query": "gemma", "filters": {"year": None, "Tags": ["a", ""]}, "limit": 3,
                "sort": [{"field": "date", "desc": True}, {"field": "x"}],
                "anything": {"k": [1, 2.5, "s", {"n": None}], "b": False}}),
    ("book", {"name": "Ada", "guests": -12, "time": "20:30", "vegan": False,
              "notes": None, "tables": []}),
    ("book", {"name": "B", "guests": 0, "time": "18:00", "notes": "window", "tables": [1, 20]}),
]
INVALID = [
    ("get_weather", {}),  # city is required
    ("get_weather", {"city": "Oslo", "unit": "kelvin"}),  # not in the enum
    ("get_weather", {"city": "Oslo", "country": "NO"}),  # not a declared key
    ("get_weather", {"city": 12}),  # not a string
    ("book", {"name": "Bartholomew", "guests": 2, "time": "18:00"}),  # longer than 8
    ("book", {"name": "", "guests": 2, "time": "18:00"}),  # shorter than 1
    ("book", {"name": "Ada", "guests": 2.5, "time": "18:00"}),  # not an integer
    ("book", {"name": "Ada", "guests": 2, "time": "18:00", "vegan": "yes"}),
    ("launch", {}),  # no such tool
]


@pytest.fixture(scope="module")
def vocab():
    from gemma4_data import vocab_gguf

    return Vocabulary(vocab_gguf())


@pytest.fixture(scope="module")
def prompts(vocab):
    return PromptBuilder(vocab, Gemma4Turns())


def call_ids(prompts, name: str, args: dict) -> list[int]:
    """The official rendering of a call, as token ids, the opening ``<|tool_call>`` left out."""
    ids = prompts.tokens(template4.tool_call({"function": {"name": name, "arguments": args}}))
    assert ids[0] == prompts.tokens([template4.TOOL_CALL])[0]
    return ids[1:]


def takes(matcher, ids: list[int]) -> bool:
    try:
        for token in ids:
            matcher.accept(token)
    except InvalidArgument:
        return False
    return True


@pytest.mark.parametrize("name,args", VALID)
def test_the_grammar_takes_valid_calls_as_the_template_prints_them(vocab, prompts, name, args):
    jsonschema.validate(args, SCHEMAS[name])
    plan = plan_calls(vocab, prompts, ToolRequest(TOOLS, "required"))
    matcher = plan.constraint.matcher()  # opened in the prompt: "call:" taken
    ids = call_ids(prompts, name, args)
    assert plan.prefix == [template4.TOOL_CALL, "call:"]
    opening = prompts.tokens(["call:"])
    assert ids[:len(opening)] == opening
    assert takes(matcher, ids[len(opening):])
    assert matcher.allowed() is None  # the call closed: text is free again


@pytest.mark.parametrize("name,args", INVALID)
def test_the_grammar_refuses_calls_that_break_the_schema(vocab, prompts, name, args):
    matcher = plan_calls(vocab, prompts, ToolRequest(TOOLS, "auto")).constraint.matcher()
    assert matcher.allowed() is None  # free text until the model opens a call
    matcher.accept(prompts.tokens([template4.TOOL_CALL])[0])
    assert matcher.allowed() is not None
    assert not takes(matcher, call_ids(prompts, name, args))


def test_a_named_choice_allows_that_tool_only(vocab, prompts):
    plan = plan_calls(vocab, prompts, ToolRequest(TOOLS, "required", "book"))
    assert plan.forced == "<|tool_call>call:book{"
    ids = call_ids(prompts, "book", {"name": "Ada", "guests": 2, "time": "18:00"})
    opening = prompts.tokens(["call:book{"])
    assert ids[:len(opening)] == opening and takes(plan.constraint.matcher(), ids[len(opening):])
    weather = call_ids(prompts, "get_weather", {"city": "Oslo"})
    other = plan_calls(vocab, prompts, ToolRequest(TOOLS, "required", "get_weather"))
    assert not takes(plan.constraint.matcher(), weather[len(prompts.tokens(["call:"])):])
    assert other.forced == "<|tool_call>call:get_weather{"


@pytest.mark.parametrize("seed", range(12))
def test_any_path_the_grammar_allows_parses_and_validates(vocab, prompts, seed):
    """A random walk over the allowed tokens (the quote and closing tokens favoured, so
    strings end): wherever it goes, the finished call parses and fits its schema."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tools = [WEATHER, BOOK]
    plan = plan_calls(vocab, prompts, ToolRequest(tools, "required"))
    matcher = plan.constraint.matcher()
    favoured = set(prompts.tokens([template4.QUOTE, template4.END_TOOL_CALL])) | \
        set(vocab.tokenize("}]", special=False))
    generated: list[int] = []
    for _ in range(400):
        allowed = matcher.allowed()
        if allowed is None:
            break
        choices = np.flatnonzero(allowed)
        preferred = [t for t in favoured if allowed[t]]
        token = int(rng.choice(preferred) if preferred and rng.random() < 0.3
                    else rng.choice(choices))
        matcher.accept(token)
        generated.append(token)
    else:
        pytest.fail("the walk never closed the call")
    text = plan.forced + vocab.llm.detokenize(generated, special=True).decode()
    calls, rest = parse_gemma4_calls(text)
    assert len(calls) == 1 and rest == ""
    call = calls[0]
    jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
