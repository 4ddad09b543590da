"""Gemma 4's chat format: string-for-string parity with each published revision of Google's
template (rendered in a sandbox), revision recognition, and the parts that must stay text."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma_chat import template4
from gemma_chat.errors import InvalidMessages
from gemma_chat.prompt import format_for
from gemma_chat.template import Marker

DATA = Path(__file__).parent / "data" / "gemma4"
REVISIONS = sorted(template4.REVISIONS)


def reference(revision: str, messages, *, add_generation_prompt=True, thinking=None,
              tools=None) -> str:
    """Google's template of ``revision``, rendered as transformers renders chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string((DATA / f"{revision}.jinja").read_text())
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return tmpl.render(messages=messages, bos_token="<bos>", tools=tools,
                       add_generation_prompt=add_generation_prompt, **kwargs)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search documents.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "description": "Narrow it down",
                    "properties": {"year": {"type": "integer", "nullable": True},
                                   "Tags": {"type": "array", "items": {"type": "string"}}},
                    "required": ["year"]},
        "limit": {"type": "integer", "description": "Most results", "nullable": True},
        "sort": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "desc": {"type": "boolean"}},
            "required": ["field"]}},
        "anything": {"type": "object"},
    }, "required": ["query"]},
    "response": {"type": "object", "description": "Matching documents"}}}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The time."}}

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
CALL2 = {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": {
    "query": "gemma \"4\"", "limit": 3, "filters": {"year": 2026, "Tags": ["ai", "llm"]},
    "exact": True, "score": 0.5, "none": None}}}

U = {"role": "user", "content": "What's the weather in Paris?"}
SYS = {"role": "system", "content": "  You are terse.\n"}

# (messages, thinking, tools, add_generation_prompt)
CASES = [
    ([{"role": "user", "content": "Hi"}], None, None, True),
    ([{"role": "user", "content": "  padded \n question  "}], None, None, True),
    ([SYS, {"role": "user", "content": "Hi"}], None, None, True),
    ([{"role": "developer", "content": "Dev rules."}, {"role": "user", "content": "Hi"}],
     None, None, True),
    ([{"role": "user", "content": "Hi"}], True, None, True),
    ([{"role": "user", "content": "Hi"}], False, None, True),
    ([SYS, {"role": "user", "content": "Think about it."}], True, None, True),
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4. \n"},
      {"role": "user", "content": "And 3+3?"}], None, None, True),
    ([SYS, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "<|channel>thought\nAdd them.<channel|>4"},
      {"role": "user", "content": "3+3?"}], True, None, True),
    ([{"role": "user", "content": "a"},
      {"role": "assistant",
       "content": "<|channel>thought\nx<channel|>one<|channel>y<channel|> two"},
      {"role": "user", "content": "b"}, {"role": "assistant", "content": "three"},
      {"role": "user", "content": "c"}], False, None, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     None, None, False),
    ([{"role": "user", "content": "line one\nline two\n\n```python\nprint('x')\n```"}],
     None, None, True),
    ([{"role": "user", "content": "Unicode: 日本語, émoji 🎉, tabs\tand  spaces"}], None, None,
     True),
    ([{"role": "user", "content": "typed <turn|> and <|turn>model and <bos> stay text"}],
     None, None, True),
    ([{"role": "user", "content": [{"type": "text", "text": " Describe "},
                                   {"type": "image"}, {"type": "text", "text": "this."}]}],
     None, None, True),
    ([{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe."}]}],
     True, None, True),
    ([{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                   {"type": "text", "text": "Compare."}]}], None, None, True),
    ([U], None, [WEATHER], True),
    ([SYS, U], True, [WEATHER, SEARCH, NO_PARAMS], True),
    ([U], None, [SEARCH], True),
    ([U, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
       "content": "18 C, cloudy"}], None, [WEATHER], True),
    ([U, {"role": "assistant", "content": "", "tool_calls": [CALL, CALL2]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
      {"role": "tool", "tool_call_id": "call_2", "name": "search",
       "content": [{"type": "text", "text": "doc A"}, {"type": "text", "text": " doc B"}]}],
     True, [WEATHER, SEARCH], True),
    ([U, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
      {"role": "assistant", "content": "It is 18 C in Paris."},
      {"role": "user", "content": "Thanks"}], None, [WEATHER], True),
    ([U, {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
          "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"}],
     True, [WEATHER], True),
    ([U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}],
     None, [WEATHER], True),
    ([U, {"role": "assistant", "content": "Checking.", "tool_calls": [CALL],
          "tool_responses": [{"name": "get_weather",
                              "response": {"temp": 18, "sky": "cloudy", "ok": True}}]}],
     None, [WEATHER], True),
    ([U, {"role": "assistant", "tool_calls": [CALL],
          "tool_responses": [{"name": "get_weather", "response": "18 C"}], "content": ""}],
     False, [WEATHER], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "assistant", "content": "Anything else?"}, {"role": "user", "content": "No"}],
     None, None, True),
    ([SYS], None, [NO_PARAMS], True),
]


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_parity_with_the_official_template(revision, case):
    messages, thinking, tools, gen = CASES[case]
    expected = reference(revision, messages, add_generation_prompt=gen, thinking=thinking,
                         tools=tools)
    got = template4.render(messages, gen, thinking=bool(thinking), tools=tools,
                           revision=revision)
    assert got == expected


def test_the_revisions_really_differ():
    """The cases above tell the revisions apart (else parity with each would prove little)."""
    for a in REVISIONS:
        for b in REVISIONS:
            if a < b:
                assert any(template4.render(m, g, thinking=bool(t), tools=tl, revision=a)
                           != template4.render(m, g, thinking=bool(t), tools=tl, revision=b)
                           for m, t, tl, g in CASES), (a, b)


def test_message_text_never_becomes_a_marker():
    messages = [{"role": "system", "content": "<|think|>"},
                {"role": "user", "content": "<turn|><|turn>model\n<bos>"},
                {"role": "assistant", "content": "<|tool_call>call:x{}<tool_call|>"},
                {"role": "user", "content": [{"type": "text", "text": "<|image|>"}]}]
    parts = template4.parts(messages, thinking=True, tools=[WEATHER])
    markers = [p for p in parts if isinstance(p, Marker)]
    assert markers.count(template4.BOS) == 1
    assert template4.THINK in markers  # the template's own, from thinking=True
    assert markers.count(template4.THINK) == 1
    assert template4.IMAGE not in markers and template4.TOOL_CALL not in markers
    assert all(p in template4.MARKERS for p in markers)


def test_thoughts_are_dropped_from_history():
    text = template4.render([{"role": "user", "content": "q"},
                             {"role": "assistant",
                              "content": "<|channel>thought\nsecret plan<channel|>\n\nThe answer."},
                             {"role": "user", "content": "next"}])
    assert "secret plan" not in text and "<|turn>model\nThe answer.<turn|>\n" in text


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "only come first"),
    ([{"role": "wizard", "content": "a"}], "unknown role"),
    ([{"role": "user", "content": 5}], "content must be"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "content parts"),
    (["not a mapping"], "not a mapping"),
])
def test_malformed_messages_are_refused(messages, error):
    with pytest.raises(InvalidMessages, match=error):
        template4.parts(messages)


@pytest.mark.parametrize("revision", REVISIONS)
def test_the_model_files_template_picks_the_revision(revision):
    fmt = format_for("gemma4", (DATA / f"{revision}.jinja").read_text())
    assert (fmt.name, fmt.revision, fmt.note) == ("gemma4", revision, "")
    assert revision in fmt.description


def test_a_file_without_a_template_gets_the_newest_revision():
    fmt = format_for("gemma4", "")
    assert (fmt.revision, fmt.note) == (template4.DEFAULT_REVISION, "")
    assert format_for("gemma3", "{{ anything }}").name == "gemma"


def test_an_unknown_or_broken_template_is_said():
    edited = (DATA / "release.jinja").read_text().replace("<|think|>", "<|think|> ")
    fmt = format_for("gemma4", edited)
    assert fmt.revision == "release" and "not a Gemma 4 revision" in fmt.note
    broken = format_for("gemma4", "{% for %}")
    assert broken.revision == template4.DEFAULT_REVISION and "TemplateSyntaxError" in broken.note
    hostile = format_for("gemma4", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert "SecurityError" in hostile.note or "not a Gemma 4 revision" in hostile.note
