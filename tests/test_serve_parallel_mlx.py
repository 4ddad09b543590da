"""`gemma serve --parallel` on MLX (mlx-lm's continuous batching), with the real 270M imported
to MLX: concurrent streams through the openai client, a seed that gives the same text alone or
beside others, prefix reuse, a disconnect that frees its slot. MLX on a CPU is slow (about
2 tokens/s for this model here), so the replies are short."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.slow

from conftest import assert_extension_reuses_the_cache, serving  # noqa: E402

from gemma_chat.server import create_app  # noqa: E402

SLOTS = 4


@pytest.fixture(scope="module")
def backend(mlx_270m):
    from gemma_chat.backends.mlx import MLXBackend
    from gemma_chat.resolve import resolve

    backend = MLXBackend(resolve("gemma-3-270m", ("mlx",)), n_ctx=SLOTS * 1024)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def served(backend):
    from gemma_chat.cli.serve import parallel_engine

    engine = parallel_engine(backend, SLOTS, 16)  # what `gemma serve --parallel 4` builds
    with serving(create_app(backend, ["gemma-3-270m"], engine=engine)) as url:
        yield url, engine
    engine.close()


def chat(url: str, content: str, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    chunks = list(client.chat.completions.create(
        model="gemma-3-270m", stream=True, messages=[{"role": "user", "content": content}],
        stream_options={"include_usage": True}, max_tokens=6, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_concurrent_streams_and_a_seed_beside_others(served):
    url, engine = served
    state = httpx.get(url + "/health").json()
    assert type(engine).__name__ == "MlxSlotEngine"
    assert state["slots"] == SLOTS and state["slot_context"] == 1024 and state["busy"] == 0
    seeded = {"temperature": 0.9, "seed": 5}
    alone, _ = chat(url, "Tell me about the moon.", **seeded)

    def one(i: int):
        if i == 1:
            return chat(url, "Tell me about the moon.", **seeded)
        return chat(url, f"Count to {i + 3}.", temperature=0.8)

    with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
        results = list(pool.map(one, range(SLOTS)))
    for _, chunks in results:
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
        assert 0 < chunks[-1].usage.completion_tokens <= 6
    assert results[1][0] == alone and alone
    assert httpx.get(url + "/health").json()["busy"] == 0


def test_a_request_extending_an_earlier_one_evaluates_only_its_new_tokens(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    assert_extension_reuses_the_cache(client, reply_tokens=6, question="Name a colour.")


def test_a_disconnected_client_frees_its_slot(served):
    url, _ = served
    before = httpx.get(url + "/health").json()["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        next(lines)
        assert httpx.get(url + "/health").json()["busy"] == 1
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["busy"] and time.time() < deadline:
        time.sleep(0.1)
    state = httpx.get(url + "/health").json()
    assert state["busy"] == 0 and state["cancelled"] > before
