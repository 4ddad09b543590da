"""The server's lifecycle: clients that leave while waiting or before a non-streamed reply is
done, shutdown with requests in flight, and prompts too large to tokenize. Fast with the
scripted backend; SIGTERM on the real `gemma serve` is slow."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import GEMMA
from fakes import ScriptedBackend
from starlette.testclient import TestClient

from gemma_chat.backends.base import SamplingParams
from gemma_chat.server import Job, Server, create_app

LONG = "x" * 400


def job(backend, max_tokens=400) -> Job:
    return Job(backend.tokenize("<bos>hi"), SamplingParams(temperature=0, max_tokens=max_tokens))


def test_a_job_whose_client_left_while_waiting_never_runs():
    backend = ScriptedBackend(delay=0.005).enqueue("a" * 200, "never")  # holds the lock 1 s
    server = Server(backend, ["scripted"])

    async def scenario():
        first, waiting = job(backend, max_tokens=200), job(backend)
        running = server.generate(first)
        await running.__anext__()
        queued = asyncio.create_task(_drain(server.generate(waiting)))
        await asyncio.sleep(0.01)
        waiting.cancel.set()  # its client went away while it waited
        rest = await _drain(running)
        return rest, await queued

    _, queued = asyncio.run(scenario())
    assert queued == [("", None, "cancelled", False, ())]
    assert len(backend.prompts) == 1  # the second prompt never reached the backend


async def _drain(gen):
    return [item async for item in gen]


def raw_request(app, body: bytes, disconnect_after: float) -> tuple[int, bytes]:
    """A POST whose client hangs up ``disconnect_after`` seconds after sending its body."""
    sent: list[dict] = []
    state = {"body_sent": False, "hang_up": time.monotonic() + disconnect_after}

    async def receive():  # as a server does: the disconnect is there once it has happened
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        wait = state["hang_up"] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_non_streamed_request_stops_when_its_client_leaves():
    backend = ScriptedBackend(delay=0.01).enqueue(LONG)
    app = create_app(backend, ["scripted"])
    body = json.dumps({"prompt": "hi", "max_tokens": 400}).encode()
    raw_request(app, body, disconnect_after=0.2)
    generated = len(backend.cached_tokens) - len(backend.prompts[0])
    assert 0 < generated < 100  # stopped soon after the hang-up, not after 400 tokens
    assert app.state.server.counters.cancelled == 1


def test_shutdown_answers_in_flight_requests_and_refuses_new_ones():
    backend = ScriptedBackend(delay=0.01).enqueue(LONG)
    app = create_app(backend, ["scripted"])
    server = app.state.server
    results = {}
    with TestClient(app) as client:
        def ask():
            results["first"] = client.post("/v1/completions",
                                           json={"prompt": "hi", "max_tokens": 400})
        thread = threading.Thread(target=ask)
        thread.start()
        while not server.lock.locked():
            time.sleep(0.005)
        server.shutdown()
        thread.join(10)
        later = client.post("/v1/completions", json={"prompt": "hi"})
    assert results["first"].status_code == 503
    assert results["first"].json()["error"]["code"] == "shutting_down"
    assert later.status_code == 503
    assert len(backend.cached_tokens) - len(backend.prompts[0]) < 100


def test_a_prompt_too_large_for_the_context_is_refused_before_tokenizing():
    class Counting(ScriptedBackend):
        calls = 0

        def tokenize(self, text, *, special=True):
            Counting.calls += len(text) > 1000
            return super().tokenize(text, special=special)

    backend = Counting(n_ctx=1024)
    with TestClient(create_app(backend, ["scripted"])) as client:
        huge = "word " * 1_400_000  # 7 MB
        for body in ({"prompt": huge}, {"messages": [{"role": "user", "content": huge}]}):
            response = client.post("/v1/completions" if "prompt" in body else
                                   "/v1/chat/completions", json=body)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "context_length_exceeded"
    assert Counting.calls == 0


@pytest.mark.slow
def test_sigterm_stops_gemma_serve_with_a_request_in_flight(gguf_path):
    import httpx

    port = _free_port()
    proc = subprocess.Popen([str(GEMMA), "serve", "-m", str(gguf_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        results = {}

        def ask():
            try:
                results["reply"] = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0})
            except httpx.HTTPError as exc:
                results["error"] = exc
        thread = threading.Thread(target=ask)
        thread.start()
        while not httpx.get(f"{url}/health", timeout=5).json()["busy"]:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)  # it used to need SIGKILL
        thread.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reply = results.get("reply")
    assert reply is not None and reply.status_code == 503, results
    assert reply.json()["error"]["code"] == "shutting_down"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
