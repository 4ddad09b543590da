"""Python functions as tools (`gemma run --tools FILE.py`): their schemas, argument checks, and
calls in a child process that may raise, hang, crash or return too much; then the real 270M
model calling one through a pseudo-terminal, with and without the user's consent."""

from __future__ import annotations

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
