"""`gemma chat` as a user runs it: a pseudo-terminal, pipes, --resume, --list, config."""

from __future__ import annotations

import importlib.util
import os
import re
import time

import pexpect
import pytest
from conftest import GEMMA, run_gemma

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


def screen_text(raw: str) -> str:
    return ANSI.sub("", raw)


def test_chat_in_a_pseudo_terminal(gguf_path, tmp_path):
    env = {**os.environ, "TERM": "xterm-256color", "GEMMA_HOME": str(tmp_path / "home")}
    child = pexpect.spawn(str(GEMMA), ["chat", "--temp", "0", "-n", "24"], env=env,
                          encoding="utf-8", dimensions=(24, 80), timeout=90)

    def at_prompt():
        # prompt-toolkit asks where the cursor is; answer like a terminal does.
        child.expect(re.escape("\x1b[6n"))
        child.send("\x1b[10;1R")
        child.expect(">>>")

    try:
        at_prompt()
        child.sendline("Hello there")
        at_prompt()
        child.expect(r"context \d+/32768")  # the bottom toolbar's context meter
        child.sendline("Tell me more")
        child.setwinsize(30, 100)  # a terminal resize during the reply
        at_prompt()
        child.sendline("/set max-tokens 2000")
        at_prompt()
        child.sendline("Write a very long story")
        time.sleep(3)  # 2000 tokens take ~40 s here: the reply is streaming...
        child.sendcontrol("c")  # ... and Ctrl-C stops it
        child.expect(r"\[interrupted\]")
        at_prompt()
        child.sendline("/stats")
        child.expect("evaluated")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        transcript = screen_text(child.before or "")
        child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in transcript
    files = list((tmp_path / "home" / "conversations").glob("*.jsonl"))
    assert len(files) == 1 and "Tell me more" in files[0].read_text()
    assert '"interrupted": true' in files[0].read_text()


def test_piped_chat(gguf_path):
    result = run_gemma("chat", "--temp", "0", "-n", "6",
                       input="Hello\nWhat is the capital of France?\n/bye\nnot reached\n")
    assert result.returncode == 0, result.stderr
    assert "using gemma-3-270m (the bundled demo model)" in result.stderr
    assert "pretrained (base) model" in result.stderr
    assert result.stdout.strip() and "\x1b[" not in result.stdout
    assert "Traceback" not in result.stderr


def test_resume_with_kv_state_evaluates_only_the_new_turn(gguf_path, tmp_path):
    path = tmp_path / "talk.json"
    first = run_gemma("chat", "--temp", "0", "-n", "6",
                      input=f"Hello there\nHow are you?\n/save {path}\n")
    assert first.returncode == 0, first.stderr
    assert path.is_file() and path.with_name("talk.json.kv").is_file()
    resumed = run_gemma("chat", "--resume", str(path), "--temp", "0", "-n", "6",
                        input="/stats\nOne more question\n/stats\n")
    assert resumed.returncode == 0, resumed.stderr
    err = screen_text(resumed.stderr).replace("\n", " ")
    assert "resumed 2 exchanges with their KV state" in err
    # The turn after resuming evaluated only its own tokens, not the history.
    evaluated = [int(m) for m in re.findall(r"\((\d+) evaluated", err)]
    prompts = [int(m) for m in re.findall(r"prompt (\d+) tokens", err)]
    assert evaluated and evaluated[-1] < 20 < prompts[-1]


def test_resume_last_and_list(gguf_path, tmp_path):
    env = {"GEMMA_HOME": str(tmp_path / "home")}
    run_gemma("chat", "-n", "4", "--temp", "0", input="A distinctive opening line\n", env=env)
    listing = run_gemma("chat", "--list", env={**env, "COLUMNS": "200"})
    assert listing.returncode == 0
    assert "A distinctive opening line" in listing.stdout
    resumed = run_gemma("chat", "--resume", "last", "-n", "4", "--temp", "0",
                        input="/stats\n", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 1 exchanges" in screen_text(resumed.stderr)
    none = run_gemma("chat", "--resume", "last", env={"GEMMA_HOME": str(tmp_path / "empty")})
    assert none.returncode == 2 and "no conversation to resume" in none.stderr


def test_resume_of_a_bad_file_is_one_clean_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    result = run_gemma("chat", "--resume", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_configured_default_model(gguf_path, tmp_path):
    env = {"GEMMA_CONFIG": str(tmp_path / "config.json")}
    assert run_gemma("config", "set", "default-model", str(gguf_path), env=env).returncode == 0
    assert run_gemma("config", "get", "default-model", env=env).stdout.strip() == str(gguf_path)
    result = run_gemma("chat", "-n", "2", input="Hi\n", env=env)
    assert result.returncode == 0, result.stderr
    assert "the configured default-model" in result.stderr
    bad = run_gemma("config", "set", "colour", "blue", env=env)
    assert bad.returncode == 2 and "unknown setting 'colour'" in bad.stderr
    assert "default-model" in run_gemma("config", "list", env=env).stdout
    bad_backend = run_gemma("config", "set", "default-backend", "onnx", env=env)
    assert bad_backend.returncode == 2 and "unknown backend" in bad_backend.stderr
    assert run_gemma("config", "set", "default-backend", "mlx", env=env).returncode == 0
    if importlib.util.find_spec("mlx_lm") is None:  # the configured backend is honoured
        assert "pip install 'gemma-chat[mlx]'" in run_gemma("run", "Hi", env=env).stderr
