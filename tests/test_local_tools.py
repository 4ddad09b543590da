"""Python functions as tools (`gemma run --tools FILE.py`): their schemas, argument checks, and
calls in a child process that may raise, hang, crash or return too much; then the real 270M
model calling one through a pseudo-terminal, with and without the user's consent."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import GEMMA, run_gemma

from gemma_chat.errors import InvalidArgument
from gemma_chat.local_tools import MAX_RESULT_CHARS, ToolFailed, load_tools

EXAMPLE = Path(__file__).parent / "data" / "tools_example.py"


@pytest.fixture(scope="module")
def tools():
    return {t.name: t for t in load_tools(EXAMPLE)}


def test_schemas_from_signatures_and_docstrings(tools):
    assert set(tools) == {"get_weather", "add", "sleepy", "broken", "crash", "huge"}
    weather = tools["get_weather"].declaration()["function"]
    assert weather["description"] == "Current weather for a city."
    assert weather["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city's name."},
        "unit": {"enum": ["celsius", "fahrenheit"], "description": "Temperature unit."}}}
    add = tools["add"].parameters
    assert add["required"] == ["a", "b"] and add["properties"]["scale"] == {"type": "number"}
    assert add["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}


def test_arguments_are_checked(tools):
    assert tools["add"].check({"a": 1, "b": 2, "scale": None}) == {"a": 1, "b": 2,
                                                                   "scale": None}
    for bad, words in (({"a": 1}, "missing argument(s) b"), ({"a": 1, "b": 2, "c": 3},
                       "unknown argument(s) c"), ({"a": "1", "b": 2}, "argument a should be "
                       "integer"), ([1, 2], "takes an object")):
        with pytest.raises(ToolFailed, match=re.escape(words)):
            tools["add"].check(bad)


def test_calls_run_in_a_child_process(tools):
    assert tools["get_weather"].call({"city": "Oslo"}) == \
        '{"city": "Oslo", "temperature": 12, "unit": "celsius"}'
    assert tools["add"].call({"a": 2, "b": 3}) == "5"
    with pytest.raises(ToolFailed, match="broken raised RuntimeError: the sensor is offline"):
        tools["broken"].call({})
    with pytest.raises(ToolFailed, match="sleepy did not finish within 1 s and was stopped"):
        tools["sleepy"].call({"seconds": 30}, timeout=1)
    with pytest.raises(ToolFailed, match="crash died of SIGSEGV"):
        tools["crash"].call({})
    text = tools["huge"].call({})
    assert len(text) < MAX_RESULT_CHARS + 100 and text.endswith("[cut: 100,000 characters in all]")


def test_each_call_is_answered_whatever_goes_wrong(tools):
    from gemma_chat.local_tools import run_calls

    def call(name, **args):
        return {"id": f"call_{name}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}

    notes = []
    calls = [call("get_weather", city="Oslo"), call("launch"), call("add", a=1),
             call("broken"), call("get_weather", city="Rome")]
    results = run_calls(calls, list(tools.values()),
                        confirm=lambda shown, _args: "Rome" not in shown, note=notes.append)
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
    assert json.loads(results[0]["content"])["city"] == "Oslo"
    assert results[1]["content"].startswith("error: there is no tool named launch; the tools "
                                            "are get_weather, add")
    assert results[2]["content"] == "error: add: missing argument(s) b"
    assert results[3]["content"] == "error: broken raised RuntimeError: the sensor is offline"
    assert results[4]["content"] == "The user declined to run this tool."
    assert notes[1] == "the model called launch, which is not one of the tools"
    assert notes[4] == "not run: get_weather(city='Rome')"


def test_bad_tools_files(tmp_path):
    for source, words in (("def f(:\n", "line 1"), ("import nowhere_at_all\n",
                          "failed to import: ModuleNotFoundError"), ("x = 1\n", "no public "
                          "functions")):
        path = tmp_path / "t.py"
        path.write_text(source)
        with pytest.raises(InvalidArgument, match=words):
            load_tools(path)
    with pytest.raises(InvalidArgument, match="no tools file"):
        load_tools(tmp_path / "missing.py")


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["y", "n"])
def test_gemma_run_asks_before_each_call(gguf_path, tmp_path, answer):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "dumb", "GEMMA_HOME": str(tmp_path / "home")}
    child = pexpect.spawn(str(GEMMA), ["run", "--tools", str(EXAMPLE), "--tool-choice",
                                       "get_weather", "--chat", "--seed", "1", "-n", "48",
                                       "What is the weather in Oslo?"],
                          env=env, encoding="utf-8", dimensions=(24, 200), timeout=120)
    child.expect(r"tool call get_weather\(city='[^']*'.*\): this runs your code\. Run it\? "
                 r"\[y/N\]")
    child.sendline(answer)
    child.expect("ran get_weather" if answer == "y" else "not run: get_weather")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_gemma_run_tools_needs_consent_without_a_terminal(gguf_path):
    refused = run_gemma("run", "--tools", str(EXAMPLE), "Weather?")
    assert refused.returncode == 2 and "say --yes" in refused.stderr
    ran = run_gemma("run", "--tools", str(EXAMPLE), "--tool-choice", "required", "--yes",
                    "--chat", "--seed", "2", "-n", "48", "What is the weather in Oslo?")
    assert ran.returncode == 0, ran.stderr
    assert re.search(r"ran (get_weather|add|sleepy|broken|crash|huge)\(", ran.stderr) or \
        "failed:" in ran.stderr
    bad = run_gemma("run", "--tools", str(EXAMPLE), "--tool-choice", "nope", "--yes", "x")
    assert bad.returncode == 2 and "--tool-choice must be" in bad.stderr


@pytest.mark.slow
def test_a_chat_keeps_its_tool_calls(backend, tmp_path):
    """The real 270M in a Conversation with tools: a required call is run (here by a stub),
    the exchange keeps the call and its result, the next prompt carries the result in Google's
    ```tool_output``` turn, and a saved conversation loads back with them."""
    from gemma_chat import sessions
    from gemma_chat.backends.base import SamplingParams
    from gemma_chat.chat import Conversation

    tools = load_tools(EXAMPLE)
    convo = Conversation(backend, tools=[t.declaration() for t in tools])
    seen = []

    def run_calls(calls):
        seen.extend(calls)
        return [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                 "content": '{"temperature": 12}'} for c in calls]

    # Room for the whole call on either CPU kind (on one, the call alone is 25 tokens).
    chunks = list(convo.send("What is the weather in Oslo?", SamplingParams(seed=3,
                                                                            max_tokens=64),
                             run_calls=run_calls, tool_choice="get_weather"))
    assert chunks[-1].stats is not None
    [exchange] = convo.exchanges
    assert [c["function"]["name"] for c in seen] == ["get_weather"]
    assert [m["role"] for m in exchange.calls] == ["assistant", "tool"]
    assert exchange.calls[0]["tool_calls"][0]["function"]["arguments"]["city"]
    # The reply is the last turn's (the call's turn is not): its ids are that turn's.
    assert not exchange.interrupted and exchange.reply_ids == list(chunks[-1].stats.token_ids)
    prompt = backend.detokenize(convo.ids_for(convo.exchanges, "Thanks!"), special=True)
    assert '```tool_output\n{"temperature": 12}\n```' in prompt
    assert prompt.count("<bos>") == 1 and prompt.endswith("<start_of_turn>model\n")
    path = tmp_path / "chat.json"
    sessions.save(convo, path, {}, sessions.now())
    loaded = sessions.load(path)
    assert loaded.exchanges[0].calls == exchange.calls


@pytest.mark.slow
def test_gemma_chat_asks_before_each_call_and_lists_tools(gguf_path, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "xterm-256color", "GEMMA_HOME": str(tmp_path / "home")}
    child = pexpect.spawn(str(GEMMA), ["chat", "--tools", str(EXAMPLE), "--tool-choice",
                                       "get_weather", "--seed", "1", "-n", "40"],
                          env=env, encoding="utf-8", dimensions=(24, 200), timeout=120)

    def at_prompt():
        child.expect(re.escape("\x1b[6n"))  # prompt-toolkit asks where the cursor is
        child.send("\x1b[10;1R")
        child.expect(">>>")

    try:
        child.expect(r"tools: get_weather, add, sleepy, broken, crash, huge")
        at_prompt()
        child.sendline("What is the weather in Oslo?")
        child.expect(r"tool call get_weather\(city='[^']*'.*\): this runs your code\. Run it\? "
                     r"\[y/N\]")
        child.sendline("y")
        child.expect(r"ran get_weather\(city='[^']*'.*\) -> \{\"city\"")
        at_prompt()
        child.sendline("/tools")
        child.expect(r"get_weather\(city: string, unit: celsius\|fahrenheit\?\)")
        at_prompt()
        child.sendline("And in Rome?")
        child.expect(r"Run it\? \[y/N\]")
        child.sendline("n")
        child.expect("not run: get_weather")
        at_prompt()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    [saved] = (tmp_path / "home" / "conversations").glob("*.jsonl")
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    results = [m["content"] for r in records if r["type"] == "exchange"
               for m in r.get("calls", []) if m["role"] == "tool"]
    assert json.loads(results[0])["temperature"] == 12
    assert results[1] == "The user declined to run this tool."
