"""Python functions as tools the model may call: ``gemma run --tools FILE.py``.

    tools = load_tools("weather.py")            # the file's public, documented functions
    result = tools[0].call({"city": "Oslo"})    # in a child process, with a time limit

Each public function of the file with a docstring becomes a tool: its name, the docstring's
first paragraph as the description, and a JSON schema of its parameters from the type
annotations (``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``dict``, ``Literal[...]``,
``X | None``; parameters without a default are required), with each parameter's description
from an ``Args:`` section where the docstring has one.

A call runs the function in a child Python process (``python -m gemma_chat.tool_runner``), so
that a tool that hangs is stopped at its time limit and one that crashes cannot take the chat
with it; what it prints goes to stderr, what it returns comes back as JSON (or its ``str``).
Running a tool runs the user's code: the CLI asks before each call unless told ``--yes``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

#: A tool's result beyond this many characters is cut (and says so).
MAX_RESULT_CHARS = 4000
DEFAULT_TIMEOUT_S = 30.0

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object",
           list: "array"}


class ToolFailed(Exception):
    """A tool that raised, hung or died: the message says which, for the model and the user."""


@dataclass
class LocalTool:
    name: str
    description: str
    parameters: dict
    path: Path

    def declaration(self) -> dict:
        """The OpenAI-style declaration the prompt formats take."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}

    def check(self, arguments: object) -> dict:
        """``arguments`` if they fit the parameters (names, required ones, simple types);
        else :class:`ToolFailed` saying what is wrong."""
        if not isinstance(arguments, dict):
            raise ToolFailed(f"{self.name} takes an object of arguments")
        properties = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(properties))
        missing = [p for p in self.parameters.get("required", []) if p not in arguments]
        if unknown or missing:
            raise ToolFailed(f"{self.name}: " + "; ".join(
                ([f"unknown argument(s) {', '.join(unknown)}"] if unknown else []) +
                ([f"missing argument(s) {', '.join(missing)}"] if missing else [])))
        required = self.parameters.get("required", [])
        for key, value in arguments.items():
            if value is None and key not in required:
                continue
            if not _fits(value, properties[key]):
                raise ToolFailed(f"{self.name}: argument {key} should be "
                                 f"{properties[key].get('type') or properties[key]}, "
                                 f"not {json.dumps(value)}")
        return arguments

    def call(self, arguments: dict, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """Run the function with ``arguments`` in a child process; its result as text."""
        command = [sys.executable, "-m", "gemma_chat.tool_runner", str(self.path), self.name]
        try:
            done = subprocess.run(command, input=json.dumps(arguments), capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ,
                                                                   "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            raise ToolFailed(f"{self.name} did not finish within {timeout:g} s and was "
                             "stopped") from None
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            raise ToolFailed(f"{self.name} died of {name}")
        try:
            reply = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ToolFailed(f"{self.name} exited with status {done.returncode}: "
                             f"{_last_line(done.stderr)}") from None
        if "error" in reply:
            raise ToolFailed(f"{self.name} raised {reply['error']}")
        result = reply["result"]
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f"... [cut: {len(text):,} characters in all]"
        return text


def run_calls(calls: list[dict], tools: Sequence[LocalTool],
              confirm: Callable[[str, dict], bool], note: Callable[[str], object],
              timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Answer a model turn's ``calls`` (OpenAI ``tool_calls``): each is shown and, if
    ``confirm`` says so, run; the ``tool`` messages that carry the results back. A call the
    model got wrong (no such tool, bad arguments) or a tool that failed is answered with what
    went wrong, so the model can try again or say so."""
    by_name = {t.name: t for t in tools}
    out = []
    for call in calls:
        name = call["function"]["name"]
        args = json.loads(call["function"]["arguments"])
        shown = f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" \
            if isinstance(args, dict) else f"{name}({args!r})"
        tool = by_name.get(name)
        if tool is None:
            result = f"error: there is no tool named {name}; the tools are {', '.join(by_name)}"
            note(f"the model called {name}, which is not one of the tools")
        elif not confirm(shown, args):
            result = "The user declined to run this tool."
            note(f"not run: {shown}")
        else:
            try:
                result = tool.call(tool.check(args), timeout=timeout)
                note(f"ran {shown} -> {result[:200]}")
            except ToolFailed as exc:
                result = f"error: {exc}"
                note(f"failed: {exc}")
        out.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                    "content": result})
    return out


def load_tools(path: str | Path) -> list[LocalTool]:
    """The tools of a Python file (see the module docstring). The file is imported: its
    top-level code runs."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InvalidArgument(f"no tools file {path}")
    module = import_file(path)
    tools = []
    for name, func in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(func) or \
                func.__module__ != module.__name__ or not inspect.getdoc(func):
            continue
        tools.append(LocalTool(name, _description(inspect.getdoc(func)), _schema(func), path))
    if not tools:
        raise InvalidArgument(f"{path.name} has no public functions with a docstring to offer "
                              "as tools")
    return tools


def import_file(path: Path) -> types.ModuleType:
    """Import a Python file by path; a syntax or import error is one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"gemma_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        source = path.read_text(encoding="utf-8")
        ast.parse(source, str(path))
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise InvalidArgument(f"{path.name}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the user's file raises on import
        raise InvalidArgument(f"{path.name} failed to import: {type(exc).__name__}: {exc}") \
            from None
    return module


def _description(doc: str) -> str:
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _arg_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section."""
    match = re.search(r"^\s*(Args|Arguments|Parameters):\s*\n(.*?)(\n\s*\n|\Z)", doc,
                      re.S | re.M)
    out: dict[str, str] = {}
    for line in (match.group(2).splitlines() if match else []):
        item = re.match(r"\s*(\w+)\s*(\([^)]*\))?:\s*(.+)", line)
        if item:
            out[item.group(1)] = item.group(3).strip()
    return out


def _schema(func) -> dict:
    hints = typing.get_type_hints(func)
    docs = _arg_docs(inspect.getdoc(func) or "")
    properties: dict[str, dict] = {}
    required = []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = _type_schema(hints.get(name, str))
        if name in docs:
            prop["description"] = docs[name]
        properties[name] = prop
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


def _type_schema(hint: Any) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _type_schema(options[0])
        return {"anyOf": [_type_schema(a) for a in options]}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    return {"type": "string"}


def _fits(value: object, schema: dict) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    checks = {"string": lambda v: isinstance(v, str),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "object": lambda v: isinstance(v, dict),
              "array": lambda v: isinstance(v, list)}
    if kind in checks:
        return checks[kind](value)
    if "anyOf" in schema:
        return value is None or any(_fits(value, s) for s in schema["anyOf"])
    return True


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
