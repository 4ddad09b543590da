"""Gemma 4 tool calls read back from text: the calls each published revision of Google's
template prints (rendered in a sandbox) parse to the arguments they were printed from."""

from __future__ import annotations

import pytest
from test_template4 import REVISIONS, WEATHER, reference

from gemma_chat.tools import ToolCallSyntaxError, parse_gemma4_calls

CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    {"name": "search", "arguments": {
        "query": 'say "hi", {not a brace}: [x]', "limit": 3, "ratio": 0.25, "exact": False,
        "filters": {"year": 2024, "tags": ["a", "b c"], "owner": {"name": "Ada", "id": -7}},
        "empty": [], "none": {}, "when": None}},
    {"name": "get_weather", "arguments": {"city": "Zürich, CH"}},
]


@pytest.mark.parametrize("revision", REVISIONS)
def test_calls_printed_by_the_official_template_parse_back(revision):
    messages = [{"role": "user", "content": "Weather and news?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": c["name"],
                                                      "arguments": c["arguments"]}}
                    for c in CALLS]}]
    text = reference(revision, messages, add_generation_prompt=False, tools=[WEATHER])
    turn = text[text.rindex("<|turn>model"):]
    calls, rest = parse_gemma4_calls(turn)
    expected = [dict(c, arguments={k: v for k, v in c["arguments"].items()}) for c in CALLS]
    assert calls == expected
    assert "<|tool_call>" not in rest


def test_text_around_calls_and_bad_calls():
    calls, rest = parse_gemma4_calls('Let me check.<|tool_call>call:f{a:1}<tool_call|>')
    assert calls == [{"name": "f", "arguments": {"a": 1}}] and rest == "Let me check."
    assert parse_gemma4_calls("no calls here") == ([], "no calls here")
    for bad in ("<|tool_call>f{a:1}<tool_call|>", '<|tool_call>call:f{a:<|"|>x}<tool_call|>',
                "<|tool_call>call:f{a:1<tool_call|>", "<|tool_call>call:f{a:1} extra<tool_call|>"):
        with pytest.raises(ToolCallSyntaxError):
            parse_gemma4_calls(bad)
    # A reply cut off by the length limit inside a second call keeps the first.
    cut = '<|tool_call>call:f{a:1}<tool_call|><|tool_call>call:g{b:<|"|>unfini'
    assert parse_gemma4_calls(cut) == ([{"name": "f", "arguments": {"a": 1}}], "")
    with pytest.raises(ToolCallSyntaxError):
        parse_gemma4_calls("<|tool_call>call:g{b:1")


def test_calls_to_unknown_tools_stay_text_unless_the_caller_answers_them():
    from gemma_chat.tools import ToolRequest, read_calls

    request = ToolRequest([WEATHER], "auto")
    for text, gemma4 in (('<|tool_call>call:launch{x:1}<tool_call|>', True),
                         ('{"name": "launch", "parameters": {"x": 1}}', False)):
        assert read_calls(text, request, gemma4) == ([], text)
        [call], _ = read_calls(text, request, gemma4, known_only=False)
        assert call["function"] == {"name": "launch", "arguments": '{"x": 1}'}


# -- the OpenAI API's tool fields, without a model ----------------------------------------------

def test_tool_request_fields():
    from gemma_chat.server import APIError
    from gemma_chat.server.openai import tool_request

    assert tool_request({}) is None
    req = tool_request({"tools": [WEATHER]})
    assert (req.choice, req.name, req.parallel, req.active) == ("auto", None, True, True)
    named = tool_request({"tools": [WEATHER], "parallel_tool_calls": False, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert (named.choice, named.name, named.parallel) == ("required", "get_weather", False)
    assert not tool_request({"tools": [WEATHER], "tool_choice": "none"}).active
    for bad, param in (({"tool_choice": "required"}, "tool_choice"),
                       ({"tools": [{"type": "function"}]}, "tools"),
                       ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
                       ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}},
                        "tool_choice")):
        with pytest.raises(APIError) as info:
            tool_request(bad)
        assert info.value.status == 400 and info.value.param == param


def test_calls_read_from_replies_of_each_format():
    import json

    from gemma_chat.server.openai import tool_request
    from gemma_chat.tools import read_calls

    tools = tool_request({"tools": [WEATHER]})
    calls, rest = read_calls('```json\n{"name": "get_weather", "parameters": '
                             '{"city": "Oslo"}}\n```', tools, gemma4=False)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}]
    assert calls[0]["id"].startswith("call_") and rest == ""
    assert read_calls("It is sunny.", tools, gemma4=False) == ([], "It is sunny.")
    two = ('<|channel>thought\nhmm<channel|>Checking.<|tool_call>call:get_weather{city:'
           '<|"|>Oslo<|"|>}<tool_call|><|tool_call>call:get_weather{city:<|"|>Rome<|"|>}'
           '<tool_call|>')
    calls, rest = read_calls(two, tools, gemma4=True)
    assert [c["function"]["name"] for c in calls] == ["get_weather"] * 2 and rest == "Checking."
    tools.parallel = False
    assert len(read_calls(two, tools, gemma4=True)[0]) == 1
    unknown = "<|tool_call>call:delete_all{}<tool_call|>"
    assert read_calls(unknown, tools, gemma4=True) == ([], unknown)  # not a tool it was given


def test_gemma3_tool_turns():
    from gemma_chat.tools import GEMMA3_PROMPT, gemma3_call_schema, gemma3_messages

    turns = gemma3_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}], [WEATHER])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"].startswith(GEMMA3_PROMPT) and '"get_weather"' in turns[0]["content"]
    assert turns[0]["content"].endswith("\n\nWeather in Oslo?")
    assert turns[1]["content"] == '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert turns[2]["content"] == "```tool_output\n12 C\n```\n```tool_output\nrain\n```"
    schema = gemma3_call_schema([WEATHER])
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["parameters"] == WEATHER["function"]["parameters"]


# -- the real 270M model through `gemma serve` ----------------------------------------------------

@pytest.mark.slow
def test_openai_client_gets_a_tool_call_and_sends_the_result_back(backend):
    """Gemma 3 270M with Google's function-calling prompt: tool_choice "required" constrains
    the reply to a call that validates (streamed and not); the tool's result goes back and the
    model answers in text."""
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    import json

    from conftest import serving

    from gemma_chat.server import create_app

    with serving(create_app(backend, ["gemma-3-270m"])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
        reply = client.chat.completions.create(model="gemma-3-270m", messages=messages,
                                               tools=[WEATHER], tool_choice="required", seed=1)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments),
                            WEATHER["function"]["parameters"])
        stream = list(client.chat.completions.create(
            model="gemma-3-270m", messages=messages, tools=[WEATHER], seed=1, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        deltas = [c.choices[0].delta for c in stream if c.choices]
        pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
        assert pieces[0].id == call.id or pieces[0].id.startswith("call_")
        assert pieces[0].function.name == "get_weather"
        assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
        assert stream[-1].choices[0].finish_reason == "tool_calls"
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "12 C and sunny"}]
        final = client.chat.completions.create(model="gemma-3-270m", messages=messages,
                                               tools=[WEATHER], max_tokens=24, temperature=0)
        assert final.choices[0].finish_reason in ("stop", "length")
        assert final.choices[0].message.content and not final.choices[0].message.tool_calls
        assert final.usage.prompt_tokens > reply.usage.prompt_tokens


def test_ollama_tool_messages_become_openai_shaped():
    from gemma_chat.server.ollama import chat_messages, tool_calls

    messages = chat_messages({"messages": [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "12 C", "tool_name": "get_weather"},
        {"role": "tool", "content": "20 C"}]})
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert [m.get("tool_call_id") for m in messages[2:]] == ids  # answered in order
    assert messages[2]["name"] == "get_weather" and "name" not in messages[3]
    openai_calls = [{"function": {"name": "f", "arguments": '{"a": [1, 2]}'}}]
    assert tool_calls(openai_calls) == [{"function": {"name": "f", "arguments": {"a": [1, 2]}}}]


@pytest.mark.slow
def test_ollama_client_with_tools(backend):
    """Ollama's client with tools (it has no tool_choice: the model decides) on the 270M: a
    well-formed reply either way, and a tool's result taken back into the next prompt."""
    ollama = pytest.importorskip("ollama")
    from conftest import serving

    from gemma_chat.server import create_app

    with serving(create_app(backend, ["gemma-3-270m"])) as url:
        client = ollama.Client(host=url)
        messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
        reply = client.chat(model="gemma-3-270m", messages=messages, tools=[WEATHER],
                            options={"seed": 2, "num_predict": 48})
        assert reply.done and (reply.message.content or reply.message.tool_calls)
        for call in reply.message.tool_calls or []:
            assert call.function.name == "get_weather" and isinstance(
                call.function.arguments, dict)
        streamed = list(client.chat(model="gemma-3-270m", messages=messages, tools=[WEATHER],
                                    options={"seed": 2, "num_predict": 48}, stream=True))
        assert streamed[-1].done and not any(p.done for p in streamed[:-1])
        assert "".join(p.message.content for p in streamed) == reply.message.content
        messages += [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "12 C and sunny", "tool_name": "get_weather"}]
        final = client.chat(model="gemma-3-270m", messages=messages, tools=[WEATHER],
                            options={"temperature": 0, "num_predict": 24})
        assert final.done and final.prompt_eval_count > reply.prompt_eval_count


def test_a_reply_with_tools_declared_streams_its_text(backend):
    """Tools declared, the model free to answer in text: the streamed reply comes in pieces as
    it is written (not whole at the end) and says what the non-streamed one says."""
    openai = pytest.importorskip("openai")
    from conftest import serving

    from gemma_chat.server import create_app

    with serving(create_app(backend, ["gemma-3-270m"])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for prompt in ("Tell me about the sea.", "Write a poem about rain."):
            ask = {"model": "gemma-3-270m", "tools": [WEATHER], "temperature": 0,
                   "max_tokens": 40, "messages": [{"role": "user", "content": prompt}]}
            whole = client.chat.completions.create(**ask).choices[0]
            stream = list(client.chat.completions.create(**ask, stream=True))
            deltas = [c.choices[0].delta for c in stream if c.choices]
            text = "".join(d.content or "" for d in deltas)
            calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
            assert stream[-1].choices[0].finish_reason == whole.finish_reason
            if whole.message.tool_calls:
                assert calls and calls[0].function.name == "get_weather"
                continue
            assert text == whole.message.content and not calls
            if not text.lstrip().startswith(("{", "`")):  # not held back as a possible call
                assert sum(bool(d.content) for d in deltas) > 5
