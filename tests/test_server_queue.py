"""The server's queue and cancellation with a scripted backend (fast): a client that leaves
cancels its own generation and never the next one."""

from __future__ import annotations

import asyncio

from fakes import ScriptedBackend

from gemma_chat.backends.base import SamplingParams
from gemma_chat.server import Job, Server

REPLY = "abcdefghijklmnopqrst"  # 20 tokens


def job(backend: ScriptedBackend) -> Job:
    return Job(backend.tokenize("<bos>hi"), SamplingParams(temperature=0, max_tokens=20))


def test_a_late_disconnect_does_not_cancel_the_next_request():
    backend = ScriptedBackend(delay=0.01).enqueue(REPLY, REPLY)
    server = Server(backend, ["scripted"])

    async def scenario():
        first = server.generate(job(backend))
        await first.__anext__()  # client 1 read one piece...
        while server.lock.locked():  # ... and its generation has ended, its output queued
            await asyncio.sleep(0.005)
        second = server.generate(job(backend))
        pieces = [await second.__anext__()]  # request 2 is generating now
        await first.aclose()  # client 1 goes away only now
        pieces += [item async for item in second]
        return pieces

    pieces = asyncio.run(scenario())
    text = "".join(p[0] for p in pieces)
    stats, reason = pieces[-1][1], pieces[-1][2]
    assert (text, reason) == (REPLY, "length")
    assert stats.generated_tokens == 20 and stats.stop_reason == "length"
    assert server.counters.cancelled == 1  # client 1's generation, counted as cancelled


def test_a_disconnect_mid_stream_stops_that_generation_within_a_token():
    backend = ScriptedBackend(delay=0.02).enqueue(REPLY * 5)
    server = Server(backend, ["scripted"])
    leaving = job(backend)
    leaving.sampling = SamplingParams(temperature=0, max_tokens=100)

    async def scenario():
        gen = server.generate(leaving)
        await gen.__anext__()
        await gen.aclose()
        while server.lock.locked():
            await asyncio.sleep(0.005)

    asyncio.run(scenario())
    assert leaving.cancel.is_set()
    assert len(backend.cached_tokens) - len(backend.prompts[0]) <= 3  # stopped within a token
