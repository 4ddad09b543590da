"""`gemma serve` with parallel slots on the real 270M model: many clients at once, each with its
own sampling; prefix reuse per slot; cancellation; the bounded queue; Ollama's own client."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

from conftest import assert_extension_reuses_the_cache  # noqa: E402
from conftest import serving as served_app  # noqa: E402

from gemma_chat.backends.llamacpp import LlamaCppBackend  # noqa: E402
from gemma_chat.backends.slots import SlotEngine  # noqa: E402
from gemma_chat.resolve import resolve  # noqa: E402
from gemma_chat.server import create_app  # noqa: E402

SLOTS = 4


def serving(backend, engine):
    return served_app(create_app(backend, ["gemma-3-270m", "270m"], engine=engine))


@pytest.fixture(scope="module")
def backend(gguf_path):
    backend = LlamaCppBackend(resolve(str(gguf_path)), n_ctx=SLOTS * 2048)
    backend.release_context()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def served(backend):
    engine = SlotEngine(backend, SLOTS, max_queue=64)
    with serving(backend, engine) as url:
        yield url, engine
    engine.close()


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)


def health(url: str) -> dict:
    return httpx.get(url + "/health").json()


def chat_stream(url: str, content: str, **kw) -> tuple[str, list]:
    chunks = list(client(url).chat.completions.create(
        model="gemma-3-270m", stream=True, messages=[{"role": "user", "content": content}],
        stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_health_says_slots(served):
    url, engine = served
    state = health(url)
    assert state["slots"] == SLOTS == state["concurrency"] and state["busy"] == 0
    assert state["slot_context"] == engine.n_ctx == 2048 and "parallel" in state["note"]


def test_8_concurrent_streams_complete_well_formed(served):
    url, _ = served

    def one(i: int):
        return chat_stream(url, f"Tell me something about the number {i}.", max_tokens=32,
                           temperature=0.8, seed=i)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for text, chunks in results:
        first = chunks[0].choices[0].delta
        assert first.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
        assert chunks[-1].usage.completion_tokens == len(
            [c for c in chunks if c.choices and c.choices[0].delta.content]) or text
    assert health(url)["busy"] == 0 and health(url)["waiting"] == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_seed_gives_the_same_text_alone_or_beside_7_others(backend, temperature):
    """The same request (and seed) on a fresh 8-slot engine, first alone, then in the middle
    of 7 others with their own prompts and samplers: the same tokens."""
    from gemma_chat.backends.base import SamplingParams
    from gemma_chat.prompt import PromptBuilder

    prompts = PromptBuilder(backend)

    def ids(text: str) -> list[int]:
        return prompts.chat([{"role": "user", "content": text}])

    target = ids("Write a story about a dragon who learns to bake bread.")
    sampling = SamplingParams(temperature=temperature, seed=42, max_tokens=48)
    others = [(ids(f"Question {i}: why is the sky blue? Answer briefly."),
               SamplingParams(temperature=0.7, seed=100 + i, max_tokens=48)) for i in range(7)]
    runs = []
    for company in ([], others):
        engine = SlotEngine(backend, 8, n_ctx=8 * 256)
        try:
            streams = [engine.stream(p, sp) for p, sp in company[:3]]
            streams.append(engine.stream(target, sampling))
            streams += [engine.stream(p, sp) for p, sp in company[3:]]
            results = [list(s)[-1].stats for s in streams]
            runs.append(results[min(3, len(company))].token_ids)
        finally:
            engine.close()
    assert runs[0] == runs[1] and len(runs[0]) > 8


def test_a_request_extending_an_earlier_one_evaluates_only_its_new_tokens(served):
    """Another request in between takes another slot; the extension goes back to the slot
    that holds its prefix."""
    url, _ = served
    c = client(url)
    assert_extension_reuses_the_cache(c, lambda: c.chat.completions.create(
        model="gemma-3-270m", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Something else."}]))


def test_a_disconnected_client_frees_its_slot(served):
    url, _ = served
    before = health(url)["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        [next(lines) for _ in range(3)]
        assert health(url)["busy"] == 1
    deadline = time.time() + 5
    while health(url)["busy"] and time.time() < deadline:
        time.sleep(0.05)
    state = health(url)
    assert state["busy"] == 0 and state["cancelled"] > before


def test_a_full_queue_answers_503(backend):
    """One slot, taken; one request waiting, which fills the queue: the next is refused at
    once with a 503 and Retry-After, on both APIs; the queued ones are still served."""
    from gemma_chat.backends.base import SamplingParams

    engine = SlotEngine(backend, 1, max_queue=1)
    try:
        with serving(backend, engine) as url:
            long = SamplingParams(temperature=0, max_tokens=1500)
            cancel = threading.Event()
            ids = backend.tokenize("<bos>Once upon a time")
            first = engine.stream(ids, long, cancel=cancel, ignore_eos=True)
            next(first)  # it has the slot
            second = engine.stream(ids, long, cancel=cancel)
            assert health(url)["busy"] == 1 and health(url)["waiting"] == 1
            refused = httpx.post(url + "/v1/completions", timeout=10,
                                 json={"prompt": "Hi", "max_tokens": 2, "stream": True})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            ollama = httpx.post(url + "/api/generate", timeout=10,
                                json={"model": "270m", "prompt": "Hi"})
            assert ollama.status_code == 503 and "busy" in ollama.json()["error"]
            cancel.set()
            for stream in (first, second):
                assert list(stream)[-1].stats.stop_reason == "cancelled"
            ok = httpx.post(url + "/v1/completions", timeout=60,
                            json={"prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200
    finally:
        engine.close()


def test_the_ollama_client_works_unchanged(served):
    ollama = pytest.importorskip("ollama")
    url, _ = served
    c = ollama.Client(host=url)
    assert [m.model for m in c.list().models] == ["gemma-3-270m"]
    shown = c.show("270m")
    assert shown.modelinfo["general.architecture"] == "gemma3"
    messages = [{"role": "user", "content": "Say hello."}]
    options = {"temperature": 0, "num_predict": 16}
    whole = c.chat(model="270m", messages=messages, options=options)
    assert whole.done and whole.message.content and whole.eval_count <= 16
    assert whole.done_reason in ("stop", "length") and whole.total_duration > 0
    pieces = list(c.chat(model="270m", messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in pieces) == whole.message.content
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])
    gen = c.generate(model="gemma-3-270m", prompt="Say hello.", options=options)
    assert gen.response == whole.message.content and gen.context
    streamed = list(c.generate(model="gemma-3-270m", prompt="Say hello.", options=options,
                               stream=True))
    assert "".join(p.response for p in streamed) == gen.response
    with pytest.raises(ollama.ResponseError) as info:
        c.chat(model="gemma-2-2b", messages=messages)
    assert info.value.status_code == 404 and "not found" in info.value.error
    assert c.ps().models[0].context_length == 2048
