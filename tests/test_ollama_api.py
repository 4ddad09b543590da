"""Ollama's API on `gemma serve`, fast: the translation functions with plain dicts, and the
routes through a scripted backend, each response parsed by the official ``ollama`` client's
own response types (what the client does with every line it reads). The real client against a
real model is in test_serve_parallel."""

from __future__ import annotations

import json
import re

import pytest
from fakes import ScriptedBackend
from starlette.testclient import TestClient

from gemma_chat.server import APIError, create_app
from gemma_chat.server import ollama as api

types = pytest.importorskip("ollama._types")


@pytest.fixture
def backend():
    return ScriptedBackend()


@pytest.fixture
def client(backend):
    with TestClient(create_app(backend, ["scripted", "scripted-alias"]),
                    raise_server_exceptions=False) as c:
        yield c


def lines(response) -> list[dict]:
    text = response.text
    assert text.endswith("\n") and "\n\n" not in text  # the client json-parses every line
    return [json.loads(line) for line in text.splitlines()]


def test_options_map_to_sampling_fields():
    fields, stops = api.options({"temperature": 0.2, "top_k": 5, "num_predict": 7, "seed": -1,
                                 "stop": ["\n", "END"], "mirostat": 2, "num_ctx": 4096})
    assert fields == {"temperature": 0.2, "top_k": 5, "max_tokens": 7}
    assert stops == ["\n", "END"]
    assert api.options({"num_predict": -1, "seed": 3}) == ({"seed": 3}, [])
    with pytest.raises(APIError, match="stop"):
        api.options({"stop": [1]})


def test_think_follows_ollama():
    assert api.think(None, True, "m") is True and api.think(None, False, "m") is False
    assert api.think("high", True, "m") is True and api.think(False, False, "m") is False
    with pytest.raises(APIError, match='"m" does not support thinking'):
        api.think(True, False, "m")
    with pytest.raises(APIError, match="invalid think value"):
        api.think("lots", True, "m")


def test_times_are_go_rfc3339():
    assert api.go_time(1700000000.5) == "2023-11-14T22:13:20.5Z"
    assert api.go_time(1700000000.0) == "2023-11-14T22:13:20Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d",
                        api.go_time(1700000000.25, utc=False))
    assert api.same_model("Scripted:latest", "scripted") and not api.same_model("x", "scripted")


def test_root_version_tags_show_ps(client):
    assert client.get("/").text == "Ollama is running"
    assert client.head("/").status_code == 200
    assert client.get("/api/version").json()["version"]
    listing = types.ListResponse(**client.get("/api/tags").json())
    assert listing.models[0].model == "scripted"
    assert listing.models[0].details.family == "gemma3"
    show = types.ShowResponse(**client.post("/api/show", json={"model": "scripted"}).json())
    assert show.modelinfo["general.architecture"] == "gemma3"
    assert show.capabilities == ["completion", "tools"]
    assert types.ProcessResponse(**client.get("/api/ps").json()).models[0].context_length


def test_chat_streams_ndjson_by_default(client, backend):
    backend.enqueue("Hello there")
    response = client.post("/api/chat", json={"model": "scripted:latest", "messages": [
        {"role": "user", "content": "Hi"}], "options": {"temperature": 0}})
    assert response.headers["content-type"].startswith("application/x-ndjson")
    records = [types.ChatResponse(**r) for r in lines(response)]
    assert "".join(r.message.content for r in records) == "Hello there"
    last = records[-1]
    assert last.done and last.done_reason == "stop" and last.model == "scripted:latest"
    assert isinstance(last.total_duration, int) and last.prompt_eval_count > 0
    assert all(not r.done for r in records[:-1])


def test_chat_not_streamed_and_stop_strings(client, backend):
    backend.enqueue("one two three")
    response = client.post("/api/chat", json={
        "model": "scripted", "stream": False, "messages": [{"role": "user", "content": "Hi"}],
        "options": {"stop": [" three"]}})
    reply = types.ChatResponse(**response.json())
    assert reply.message.content == "one two" and reply.done


def test_generate_returns_context_and_continues_from_it(client, backend):
    backend.enqueue("Paris.", "Madrid.")
    first = client.post("/api/generate", json={"model": "scripted", "prompt": "France?",
                                               "stream": False}).json()
    first = types.GenerateResponse(**first)
    assert first.response == "Paris." and first.context
    second = types.GenerateResponse(**client.post("/api/generate", json={
        "model": "scripted", "prompt": "Spain?", "stream": False,
        "context": list(first.context)}).json())
    assert second.response == "Madrid."
    # The earlier exchange, its closing and the new turn: the previous prompt is a prefix.
    assert backend.prompts[-1][:len(first.context)] == list(first.context)
    streamed = [types.GenerateResponse(**r) for r in lines(client.post(
        "/api/generate", json={"model": "scripted", "prompt": "Hi", "raw": True}))]
    assert streamed[-1].done and streamed[-1].context is None  # raw: no context


def test_errors_are_ollamas(client):
    def error(path, body, status):
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert error("/api/chat", {"model": "nope", "messages": []}, 404) == "model 'nope' not found"
    assert error("/api/chat", {"messages": []}, 400) == "model is required"
    assert error("/api/show", {"model": "nope"}, 404) == "model 'nope' not found"
    msgs = [{"role": "user", "content": "Hi"}]
    assert "does not support thinking" in error(
        "/api/chat", {"model": "scripted", "messages": msgs, "think": True}, 400)
    assert "invalid format" in error("/api/chat", {"model": "scripted", "messages": msgs,
                                                   "format": "yaml"}, 400)
    assert "no structured output" in error("/api/chat", {"model": "scripted",
                                                         "messages": msgs, "format": "json"}, 400)
    assert "raw mode" in error("/api/generate", {"model": "scripted", "prompt": "x",
                                                 "raw": True, "system": "s"}, 400)


def test_an_empty_request_loads_the_model(client):
    reply = client.post("/api/chat", json={"model": "scripted", "messages": []}).json()
    assert reply["done"] and reply["done_reason"] == "load"
    reply = client.post("/api/generate", json={"model": "scripted", "keep_alive": 0}).json()
    assert reply["done_reason"] == "unload" and reply["response"] == ""


def test_a_thinking_model_thinks_unless_told_not_to():
    backend = ScriptedBackend(architecture="gemma4")
    backend.enqueue("<|channel>thought\nHmm.<channel|>Yes.", "Yes.")
    with TestClient(create_app(backend, ["scripted4"])) as client:
        reply = types.ChatResponse(**client.post("/api/chat", json={
            "model": "scripted4", "stream": False,
            "messages": [{"role": "user", "content": "Hi"}]}).json())
        assert reply.message.thinking == "Hmm." and reply.message.content == "Yes."
        plain = client.post("/api/chat", json={
            "model": "scripted4", "stream": False, "think": False,
            "messages": [{"role": "user", "content": "Hi"}]}).json()
        assert plain["message"]["content"] == "Yes." and "thinking" not in plain["message"]


def test_a_server_without_a_queue_still_serves_when_idle(backend):
    backend.enqueue("Hi.")
    with TestClient(create_app(backend, ["scripted"], max_queue=0)) as client:
        reply = client.post("/api/chat", json={"model": "scripted", "stream": False,
                                               "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200 and reply.json()["message"]["content"] == "Hi."
