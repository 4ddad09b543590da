"""A bounded load test of ``gemma serve`` on loopback with the official openai client.

    python benchmarks/serve_load.py [-m MODEL] [--clients 8] [--requests 5] [--max-tokens 32]

Starts the server in this process on 127.0.0.1, then runs ``--clients`` concurrent streaming
clients of ``--requests`` chat requests each. Reports requests completed, total generated
tokens per second, and p50/p95 of request latency and time to first token. The server answers
one request at a time, so latency includes queueing: it grows with the number of clients while
throughput stays that of one stream.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import statistics
import sys
import threading
import time

import openai
import uvicorn

from gemma_chat.backends.llamacpp import LlamaCppBackend
from gemma_chat.resolve import resolve
from gemma_chat.server import create_app


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    backend = LlamaCppBackend(resolve(args.model), n_ctx=4096)
    app = create_app(backend, [backend.info.name])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"

    def client(n: int) -> list[tuple[float, float, int, bool]]:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        out = []
        for i in range(args.requests):
            start = time.perf_counter()
            first = None
            tokens = 0
            finish = None
            stream = c.chat.completions.create(
                model=backend.info.name, max_tokens=args.max_tokens, temperature=0.7,
                stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Client {n}, question {i}: tell me "
                                                      "something about the sea."}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            out.append((time.perf_counter() - start, first or 0.0, tokens,
                        finish in ("stop", "length")))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    wall = time.perf_counter() - start
    server.should_exit = True

    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    complete = sum(r[3] for r in results)
    print(f"{backend.info.name} ({backend.info.quantization}), {args.clients} clients x "
          f"{args.requests} requests, max_tokens {args.max_tokens}, streaming")
    print(f"completed {complete}/{len(results)} well-formed streams in {wall:.1f} s; "
          f"{tokens} tokens generated, {tokens / wall:.1f} tokens/s overall, "
          f"{len(results) / wall:.2f} requests/s")
    print(f"latency p50 {statistics.median(latencies):.2f} s, p95 "
          f"{percentile(latencies, 0.95):.2f} s; TTFT p50 {statistics.median(ttfts):.2f} s, "
          f"p95 {percentile(ttfts, 0.95):.2f} s (queueing included: one request at a time)")
    backend.close()
    return 0 if complete == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
