"""The remote backend against real servers on 127.0.0.1 with the real 270M model: llama.cpp's own
`llama-server` (built from the source llama-cpp-python vendors, tests/llama_server.py),
llama-cpp-python's OpenAI server (`python -m llama_cpp.server`), neither written here, and
`gemma serve`, each started by the tests as a process of its own. Greedy text equals the local
backend's on the same GGUF; Ctrl-C mid-reply stops the server's generation (its log and its next
answer say so); a wrong key, a server killed mid-reply, save and resume, `gemma bench --url`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest
from conftest import GEMMA, run_gemma, stop_process_group

from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.remote import RemoteBackend, StreamDropped
from gemma_chat.chat import Conversation

pytestmark = pytest.mark.slow

KEY = "remote-test-key"
#: A prompt the 270M model answers greedily for hundreds of tokens (it counts on and on).
LONG = "Count from 1 to 500, one number per line."
LONG_TOKENS = 1900  # about 30 s of generation here: far longer than a stopped reply takes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A server process on a free port, its log in a file."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{name} exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"{name} did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process_group(self.process)


def llama_cpp_server(gguf: Path, log: Path, *extra: str) -> Served:
    """llama-cpp-python's server as a user would start it for a Gemma 1-3 GGUF without a chat
    template: its ``gemma`` chat format, one request at a time (a new request does not cut the
    one in progress), and flash attention as gemma-chat's llama.cpp backend uses it (without
    it the numbers differ in the last bits and a near-tie in the 270M model breaks the other
    way). On a CPU whose AMX tiles fault (Intel Xeon VMs) it would die on the first prompt, and
    it has no switch for llama.cpp's repacking: it runs here after gemma-chat's own fallback
    has been applied in its process."""
    port = free_port()
    start = ("import runpy, sys; from gemma_chat.backends import repack; repack.prepare(); "
             "sys.argv[0] = 'llama_cpp.server'; "
             "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
    return Served("llama_cpp.server", [
        sys.executable, "-c", start, "--model", str(gguf), "--chat_format", "gemma",
        "--n_ctx", "2048", "--flash_attn", "true", "--interrupt_requests", "false",
        "--host", "127.0.0.1", "--port", str(port), "--api_key", KEY, *extra], port, log)


def llama_cpp_main_server(gguf: Path, log: Path) -> Served:
    """llama.cpp's llama-server as its README has it, with Google's Gemma 3 chat template (the
    270M GGUF carries none), one slot, and the attention set up as gemma-chat's llama.cpp
    backend has it: flash attention on and a full-size sliding-window cache (llama-server's
    default cache of the window alone pads the attention differently, and the 270M model's
    first near-tie then breaks another way: "Hi there devenueuser" against "Hi there\nYou are
    a user of")."""
    from llama_server import llama_server

    binary = llama_server()
    if binary is None:
        pytest.skip("llama-server could not be built here (the reason is on stderr)")
    port = free_port()
    template = Path(__file__).parent / "data" / "gemma3_chat_template.jinja"
    return Served("llama-server", [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--api-key", KEY, "-c", "2048", "-np", "1", "-fa", "on", "--swa-full", "--jinja",
        "--chat-template-file", str(template), "--no-webui"], port, log)


def gemma_serve(gguf: Path, log: Path) -> Served:
    port = free_port()
    return Served("gemma serve", [str(GEMMA), "serve", "-m", str(gguf), "--ctx", "2048",
                                  "--port", str(port), "--api-key", KEY], port, log)


SERVERS = {"llama-server": llama_cpp_main_server, "llama_cpp.server": llama_cpp_server,
           "gemma serve": gemma_serve}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, gguf_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    served = SERVERS[request.param](gguf_path, log)
    yield served
    served.stop()


def remote(server: Served) -> RemoteBackend:
    return RemoteBackend(server.url, "gemma-3-270m", api_key=KEY)


def test_greedy_chat_equals_the_local_backend(server, backend):
    """Two greedy turns: the same replies through the server as through the local llama.cpp
    backend on the same GGUF (the history goes back as text and is re-tokenized there)."""
    sampling = SamplingParams(temperature=0, max_tokens=16)
    backend.trim_cache(0)
    local, far = Conversation(backend), Conversation(remote(server))
    for text in ("Hi there", "What is water made of?"):
        list(local.send(text, sampling))
        chunks = list(far.send(text, sampling))
        assert far.exchanges[-1].reply == local.exchanges[-1].reply
        assert len([c for c in chunks if c.text]) > 3  # streamed in pieces, not at once
        stats = far.last_stats
        assert stats.stop_reason == local.last_stats.stop_reason and stats.ttft_s > 0
        if server.name != "llama_cpp.server":  # llama-cpp-python's stream has no usage
            assert stats.prompt_tokens == local.last_stats.prompt_tokens
            assert stats.generated_tokens == local.last_stats.generated_tokens
    if server.name != "llama_cpp.server":
        assert far.last_stats.cached_tokens > 0  # the server kept the first turn in its cache


def test_gemma_run_and_chat_print_what_the_local_model_does(server, gguf_path):
    local = run_gemma("run", "-m", str(gguf_path), "--chat", "--temp", "0", "-n", "16",
                      "Hi there")
    far = run_gemma("run", "--url", server.url, "--temp", "0", "-n", "16", "Hi there",
                    env={"GEMMA_API_KEY": KEY})
    assert far.returncode == 0, far.stderr
    assert far.stdout == local.stdout and far.stdout.strip()
    chat = run_gemma("chat", "--url", server.url, "-m", "270m", "--temp", "0", "-n", "16",
                     "--no-autosave", input="Hi there\n/info\n", env={"GEMMA_API_KEY": KEY,
                                                                         "COLUMNS": "300"})
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == local.stdout.strip()
    assert f"on {server.url}/v1 (OpenAI API)" in chat.stderr
    assert "a server with OpenAI's API" in chat.stderr  # /info
    assert "is a pretrained (base) model" in chat.stderr  # the served file is the 270M base


def test_closing_the_stream_stops_the_server(server):
    """Ctrl-C in the chat closes the stream: the partial reply is kept, marked, and the server
    stops generating, so the next request is answered at once (it serves one at a time: had it
    gone on, the next would wait ~30 s)."""
    convo = Conversation(remote(server))
    stream = convo.send(LONG, SamplingParams(temperature=0, max_tokens=LONG_TOKENS))
    pieces = [chunk.text for _, chunk in zip(range(6), stream)]
    stream.close()
    ex = convo.exchanges[-1]
    assert ex.interrupted and ex.reply == "".join(pieces) and ex.reply.strip()
    start = time.perf_counter()
    list(convo.send("Hi there", SamplingParams(temperature=0, max_tokens=4)))
    assert time.perf_counter() - start < 8
    assert not convo.exchanges[-1].interrupted
    if server.name == "llama_cpp.server":
        assert "Disconnected from client" in server.log.read_text()
    elif server.name == "llama-server":
        slots = httpx.get(server.url + "/slots", headers={"Authorization": f"Bearer {KEY}"})
        assert slots.status_code != 200 or not any(s["is_processing"] for s in slots.json())
    else:
        health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
        assert health.json()["busy"] == 0


def test_a_wrong_key_is_one_line(server):
    result = run_gemma("run", "--url", server.url, "hi", env={"GEMMA_API_KEY": "wrong"})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {server.url}/v1 refused the request (401 "
                                     "Unauthorized): give the server's key with --api-key or "
                                     "GEMMA_API_KEY")


def test_ctrl_c_in_the_chat_window(gguf_path, tmp_path):
    """Ctrl-C at a terminal during a reply from `gemma serve`: `[interrupted]`, the chat goes
    on, and the server is free for the next message at once."""
    served = gemma_serve(gguf_path, tmp_path / "serve.log")
    try:
        env = {**os.environ, "GEMMA_API_KEY": KEY, "TERM": "xterm-256color"}
        child = pexpect.spawn(str(GEMMA), ["chat", "--url", served.url, "--temp", "0", "-n",
                                           str(LONG_TOKENS), "--no-autosave"],
                              env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))

        def at_prompt():
            # prompt-toolkit asks where the cursor is; answer like a terminal does.
            child.expect(re.escape("\x1b[6n"))
            child.send("\x1b[10;1R")
            child.expect(">>>")

        at_prompt()
        child.sendline(LONG)
        time.sleep(3)  # the reply is streaming (it would take ~30 s)...
        child.sendcontrol("c")  # ... and Ctrl-C stops it
        child.expect(r"\[interrupted\]")
        at_prompt()
        start = time.perf_counter()
        child.sendline("/stats")
        child.expect(r"1 exchanges")
        at_prompt()
        health = httpx.get(served.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
        assert health.json()["busy"] == 0 and time.perf_counter() - start < 10
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        served.stop()


def test_a_server_killed_mid_reply(gguf_path, tmp_path):
    """The server dies mid-reply (SIGKILL): one line, and the partial reply is kept, marked."""
    served = llama_cpp_server(gguf_path, tmp_path / "server.log")
    try:
        convo = Conversation(remote(served))
        seen = []
        with pytest.raises(StreamDropped, match="dropped the connection mid-reply"):
            for chunk in convo.send(LONG, SamplingParams(temperature=0, max_tokens=LONG_TOKENS)):
                seen.append(chunk.text)
                if len(seen) == 5:
                    os.killpg(served.process.pid, signal.SIGKILL)
        ex = convo.exchanges[-1]
        assert ex.interrupted and ex.reply == "".join(seen) and len(seen) >= 5
    finally:
        served.stop()


def test_save_and_resume_resend_the_conversation(gguf_path, tmp_path):
    served = gemma_serve(gguf_path, tmp_path / "serve.log")
    env = {"GEMMA_API_KEY": KEY, "COLUMNS": "300"}
    saved = tmp_path / "chat.json"
    try:
        first = run_gemma("chat", "--url", served.url, "--temp", "0", "-n", "8",
                          "--no-autosave", input=f"Hi there\n/save {saved}\n", env=env)
        assert first.returncode == 0, first.stderr
        assert f"(saved to {saved}; the KV state stays on the server)" in first.stderr
        record = json.loads(saved.read_text())
        assert record["model"]["url"] == served.url + "/v1" and record["kv_state"] is None
        again = run_gemma("chat", "--url", served.url, "--resume", str(saved), "--temp", "0",
                          "-n", "8", "--no-autosave", input="And then?\n/stats\n", env=env)
        assert again.returncode == 0, again.stderr
        assert "resumed 1 exchanges; the server is sent the whole conversation" in again.stderr
        stats = next(line for line in again.stderr.splitlines() if "2 exchanges" in line)
        prompt = int(stats.split("prompt ")[1].split()[0])
        assert prompt > 20  # both user turns and the first reply, not the new message alone
    finally:
        served.stop()


def test_bench_url_reports_the_concurrency_table(gguf_path, tmp_path):
    served = gemma_serve(gguf_path, tmp_path / "serve.log")
    try:
        result = run_gemma("bench", "--url", served.url, "--concurrency", "1,2", "-n", "8",
                           "--requests", "3", "--format", "json",
                           env={"GEMMA_API_KEY": KEY}, timeout=300)
    finally:
        served.stop()
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    rows = record["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["requests"] == 3 and row["failed"] == 0
        assert 0 < row["generated_tokens"] <= 24  # the server's usage, at most 8 each
        assert row["aggregate_tps"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"]
        assert 0 < row["itl_p50_ms"] <= row["itl_p95_ms"]
        assert row["e2e_p50_s"] <= row["e2e_p95_s"] <= row["wall_s"]
