"""The `gemma` process runs each command in a child and reports a child that dies of a signal
in one line: a real child that really dies (fast), and the real chat killed mid-session (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import GEMMA


def supervised(body: str) -> subprocess.Popen:
    code = ("import os, signal, sys, time\n"
            "from gemma_chat.cli.supervise import note_model, supervised\n"
            f"def run():\n{body}\n"
            "sys.exit(supervised(run))\n")
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_NO_SUPERVISOR"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_child_that_aborts_is_named_with_its_model():
    proc = supervised("    note_model('/models/x.gguf')\n    os.abort()")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGABRT
    assert err.strip() == ("error: gemma-chat, running /models/x.gguf, crashed with SIGABRT "
                           "(aborted): llama.cpp stopped on a failed check; GEMMA_DEBUG=1 shows "
                           "its log")


def test_exit_codes_pass_through():
    proc = supervised("    print('from the child')\n    return 7")
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (7, "from the child\n", "")


def test_signals_sent_to_gemma_reach_the_child():
    proc = supervised("    signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
                      "    print('ready', flush=True)\n    time.sleep(30)\n    return 0")
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 42 and err == ""  # the child handled it and chose its exit


@pytest.mark.slow
def test_a_chat_whose_engine_dies_says_so(gguf_path):
    proc = subprocess.Popen([str(GEMMA), "chat", "-m", str(gguf_path), "--no-autosave"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        child = None
        while child is None and time.time() < deadline:
            children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
            child = int(children[0]) if children else None
            time.sleep(0.1)
        time.sleep(2)  # let it load the model
        os.kill(child, signal.SIGABRT)  # as llama.cpp's GGML_ASSERT would
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGABRT
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: gemma-chat, running {gguf_path}, crashed with SIGABRT")
