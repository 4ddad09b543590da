"""`gemma serve` over real HTTP on 127.0.0.1, with the official openai client and the real model."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import openai
import pytest
from conftest import GEMMA, serving

from gemma_chat.backends.llamacpp import LlamaCppBackend
from gemma_chat.resolve import resolve
from gemma_chat.server import StopStrings, create_app
from gemma_chat.template import render

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(gguf_path):
    backend = LlamaCppBackend(resolve(str(gguf_path)), n_ctx=2048)
    app = create_app(backend, ["gemma-3-270m", "270m"], api_key=KEY,
                     cors=["http://localhost:3000"], max_body=1 << 20)
    with serving(app) as url:
        yield url, backend
    backend.close()


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(served, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kw.setdefault("timeout", 120)
    return httpx.post(served[0] + path, content=body if isinstance(body, (bytes, str))
                      else json.dumps(body), headers=headers, **kw)


MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_chat_completion_with_usage(client, served):
    response = client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES,
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    backend = served[1]
    assert response.usage.prompt_tokens == len(backend.tokenize(render(MESSAGES)))
    assert response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == (response.usage.prompt_tokens
                                           + response.usage.completion_tokens)
    assert response.model == "gemma-3-270m"


def test_streaming_chat_matches_the_non_streamed_reply(client):
    whole = client.chat.completions.create(model="270m", messages=MESSAGES, max_tokens=16,
                                           temperature=0).choices[0].message.content
    stream = client.chat.completions.create(model="270m", messages=MESSAGES, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 3 and "".join(pieces) == whole
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions_and_streaming_completions(client):
    result = client.completions.create(model="gemma-3-270m", prompt="The capital of France is",
                                       max_tokens=8, temperature=0)
    assert result.choices[0].text.strip() and result.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma-3-270m", prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert streamed == result.choices[0].text


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "gemma-3-270m" and "270m" in ids


def test_system_and_developer_are_folded_and_parts_accepted(client, served):
    backend = served[1]
    expected = len(backend.tokenize(render([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}])))
    for role in ("system", "developer"):
        response = client.chat.completions.create(
            model="gemma-3-270m", max_tokens=2,
            messages=[{"role": role, "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        assert response.usage.prompt_tokens == expected


def test_kv_cache_is_reused_when_a_conversation_extends(client):
    first = client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES,
                                           max_tokens=8, temperature=0)
    follow = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And three more?"}]
    second = client.chat.completions.create(model="gemma-3-270m", messages=follow,
                                            max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens


def test_stop_strings(client):
    free = client.completions.create(model="gemma-3-270m", prompt="The capital of France is",
                                     max_tokens=16, temperature=0).choices[0].text
    words = free.split()
    stop = words[min(3, len(words) - 1)]
    cut = client.completions.create(model="gemma-3-270m", prompt="The capital of France is",
                                    max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[: free.index(stop)]


def test_stop_string_split_across_pieces_is_never_sent_in_part():
    stops = StopStrings(["<END>"])
    assert stops.feed("Hello <E") == ("Hello ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D> more") == ("", True)
    stops = StopStrings(["<END>"])
    assert stops.feed("a <Eb") == ("a <Eb", False)


@pytest.mark.parametrize("path, body, key, status, needle", [
    ("/v1/chat/completions", b"{not json", KEY, 400, "not valid JSON"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, KEY, 400,
     "alternate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                           {"role": "user", "content": "b"}]}, KEY, 400,
     "alternate"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, KEY, 404, "not served"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -5}, KEY, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, KEY, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES}, None, 401, "API key"),
    ("/v1/chat/completions", {"messages": MESSAGES}, "wrong", 401, "API key"),
    ("/v1/completions", {"prompt": ""}, KEY, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 3}, KEY, 400, "n=1"),
    ("/v1/completions", {"prompt": "word " * 3000}, KEY, 400, "context holds"),
    ("/v1/chat/completions", {"messages": MESSAGES, "pad": "x" * (2 << 20)}, KEY, 413, "over"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
        served, client, path, body, key, status, needle):
    response = post(served, path, body, key=key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]
    ok = client.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_health_is_open_and_says_one_at_a_time(served):
    health = httpx.get(served[0] + "/health").json()
    assert health["status"] == "ok" and health["concurrency"] == 1
    assert "one at a time" in health["note"]


def test_cors_preflight(served):
    response = httpx.options(served[0] + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_client_disconnect_stops_generation_and_the_next_request_is_served(served, client):
    before = httpx.get(served[0] + "/health").json()["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: ") for line in received)
    start = time.time()
    # 1500 tokens would take ~30 s; the next request must not wait for them.
    ok = client.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=4)
    assert ok.choices[0].text is not None and time.time() - start < 10
    assert httpx.get(served[0] + "/health").json()["cancelled"] > before


def test_a_non_streamed_request_stops_when_its_client_gives_up(served):
    before = httpx.get(served[0] + "/health").json()["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # 1500 tokens take ~30 s; the client waits 1 s
        post(served, "/v1/completions", body, timeout=1.0)
    deadline = time.time() + 10
    while httpx.get(served[0] + "/health").json()["busy"] and time.time() < deadline:
        time.sleep(0.1)
    health = httpx.get(served[0] + "/health").json()
    assert not health["busy"] and health["cancelled"] == before + 1


def test_bounded_load_8_clients_x_5_requests(served):
    """Every streamed request completes, well formed; none is lost."""

    def one_client(n: int) -> list[tuple[int, float]]:
        results = []
        c = openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        for i in range(5):
            start = time.time()
            stream = c.chat.completions.create(
                model="gemma-3-270m", max_tokens=8, stream=True,
                messages=[{"role": "user", "content": f"Client {n}, request {i}: hello"}])
            chunks = list(stream)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
            assert finish[-1] in ("stop", "length")
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            results.append((len(text), time.time() - start))
        return results

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(results) == 40
    assert httpx.get(served[0] + "/health").json()["waiting"] == 0


def test_gemma_serve_command(gguf_path):
    import subprocess

    port = free_port()
    proc = subprocess.Popen([str(GEMMA), "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health["model"] == "gemma-3-270m"
        result = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                            json={"messages": MESSAGES, "max_tokens": 3}).json()
        assert result["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "serving gemma-3-270m" in err and "Traceback" not in err
