"""``gemma bench --url``: load on a served model, to size a deployment with the same tool.

    backend = RemoteBackend("http://gpu-box:8000/v1", "31b-it")
    rows = run_load(backend, concurrency=[1, 8, 32], max_tokens=128)

For each concurrency level, that many clients stream chat requests at once (each with its own
prompt, so no two share a cached prefix) until ``requests`` have finished. Measured here, on the
client, as a user feels it: time to first token, inter-token latency (the gaps between streamed
pieces, pooled over requests), end-to-end latency (p50/p95 each), and aggregate generated tokens
per second (every request's tokens over the level's wall time). Token counts are the server's
``usage`` where it reports one, else the streamed pieces.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .backends.base import SamplingParams
from .errors import GemmaChatError

#: Topics for the requests' prompts: distinct openings, so no request reuses another's cache.
TOPICS = ("the sea", "a mountain town", "bread", "the moon", "an old clock", "rain", "bees",
          "a lighthouse", "winter", "a library", "trains", "a garden")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class RequestTiming:
    """One streamed request, timed on the client."""

    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between streamed pieces
    error: str = ""


def timed_request(backend, messages: list[dict], sampling: SamplingParams) -> RequestTiming:
    """Stream one chat request through ``backend`` (a remote backend) and time it."""
    timing = RequestTiming()
    start = last = time.perf_counter()
    try:
        for chunk in backend.chat(messages, sampling):
            now = time.perf_counter()
            if chunk.stats is not None:
                timing.tokens = chunk.stats.generated_tokens
                break
            if not chunk.text:
                continue
            if timing.ttft_s == 0.0:
                timing.ttft_s = now - start
            else:
                timing.gaps.append(now - last)
            last = now
    except GemmaChatError as exc:
        timing.error = str(exc)
    timing.e2e_s = time.perf_counter() - start
    return timing


def prompt_for(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Request {i}: write a long, detailed story about {topic}."


def run_level(backend, clients: int, requests: int, sampling: SamplingParams) -> dict:
    """``requests`` requests by ``clients`` concurrent clients; the level's figures."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> list[RequestTiming]:
        out = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return out
            out.append(timed_request(backend, [{"role": "user", "content": prompt_for(i)}],
                                     sampling))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        timings = [t for f in [pool.submit(client) for _ in range(clients)] for t in f.result()]
    wall = time.perf_counter() - start
    done = [t for t in timings if not t.error]
    gaps = [g for t in done for g in t.gaps]
    tokens = sum(t.tokens for t in done)
    return {
        "concurrency": clients, "requests": len(timings), "failed": len(timings) - len(done),
        "errors": sorted({t.error for t in timings if t.error})[:3],
        "wall_s": round(wall, 3), "generated_tokens": tokens,
        "aggregate_tps": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": round(percentile([t.ttft_s for t in done], 0.5) * 1000, 1),
        "ttft_p95_ms": round(percentile([t.ttft_s for t in done], 0.95) * 1000, 1),
        "itl_p50_ms": round(percentile(gaps, 0.5) * 1000, 2),
        "itl_p95_ms": round(percentile(gaps, 0.95) * 1000, 2),
        "e2e_p50_s": round(percentile([t.e2e_s for t in done], 0.5), 3),
        "e2e_p95_s": round(percentile([t.e2e_s for t in done], 0.95), 3),
    }


def run_load(backend, concurrency: Sequence[int], max_tokens: int = 128,
             requests: int | None = None, temperature: float = 0.8,
             progress: Callable[[str], object] = lambda s: None) -> list[dict]:
    """One row per concurrency level (see the module docstring); each level runs ``requests``
    requests, by default twice its concurrency (at least 4), after one warm-up request."""
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    progress("warm-up request")
    timed_request(backend, [{"role": "user", "content": prompt_for(-1)}],
                  sampling.with_overrides(max_tokens=4))
    rows = []
    for clients in concurrency:
        n = requests or max(4, 2 * clients)
        progress(f"concurrency {clients}: {n} requests")
        rows.append(run_level(backend, clients, n, sampling))
    return rows


COLUMNS = (("concurrency", "clients"), ("requests", "requests"), ("failed", "failed"),
           ("aggregate_tps", "t/s (all)"), ("ttft_p50_ms", "TTFT p50 ms"),
           ("ttft_p95_ms", "TTFT p95 ms"), ("itl_p50_ms", "ITL p50 ms"),
           ("itl_p95_ms", "ITL p95 ms"), ("e2e_p50_s", "e2e p50 s"), ("e2e_p95_s", "e2e p95 s"))


def markdown(rows: Sequence[dict]) -> str:
    """The concurrency table as Markdown."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])
