"""Load on ``gemma serve`` and on llama.cpp's own ``llama-server``, in the same run.

    python benchmarks/serve_load.py [-m MODEL] [--backend llama.cpp|mlx] [--clients 8]
        [--requests 5] [--max-tokens 64] [--parallel 8] [--llama-server PATH]

Three runs on loopback, each with gemma-chat's remote backend (the official openai client,
through ``gemma_chat.bench_remote``, what ``gemma bench --url`` runs) streaming chat requests of
``--max-tokens`` tokens (temperature 0.8, no seed: seeded requests are decoded reproducibly,
at a cost; see gemma_chat.backends.slots and mlx_slots):

1. ``gemma serve`` with one client (the baseline: what one conversation gets);
2. ``gemma serve --parallel N`` with ``--clients`` clients of ``--requests`` requests each;
3. ``llama-server --parallel N`` on the same GGUF under the same load, where ``--llama-server``
   names its binary (build it from the llama.cpp that llama-cpp-python vendors:
   ``cmake -B build -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server``).

Reports, per run: requests completed, aggregate generated tokens per second (tokens / wall
time), and time to first token p50/p95 (queueing included).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from gemma_chat.backends import load_backend
from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.remote import RemoteBackend
from gemma_chat.bench_remote import run_level
from gemma_chat.cli.serve import parallel_engine
from gemma_chat.loader import LoadOptions
from gemma_chat.resolve import resolve
from gemma_chat.server import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` concurrent clients, ``requests`` streamed chat requests each, through the
    remote backend's load generator (what ``gemma bench --url`` runs)."""
    backend = RemoteBackend(url, model)
    try:
        return run_level(backend, clients, clients * requests,
                         SamplingParams(temperature=0.8, max_tokens=max_tokens))
    finally:
        backend.close()


def serve_ours(resolved, backend_name: str, parallel: int, n_ctx: int, threads: int | None):
    """``gemma serve`` in this process: (url, stop)."""
    backend = load_backend(resolved, backend_name, LoadOptions(n_ctx=n_ctx, threads=threads))
    engine = parallel_engine(backend, parallel, 64) if parallel > 1 else None
    app = create_app(backend, [backend.info.name], engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)
        if engine is not None:
            engine.close()
        backend.close()

    return f"http://127.0.0.1:{port}/v1", backend.info.name, stop


def serve_llama_server(binary: str, path: str, parallel: int, n_ctx: int,
                       threads: int | None):
    """llama.cpp's own server on the same GGUF: (url, stop)."""
    port = free_port()
    cmd = [binary, "-m", path, "--port", str(port), "--parallel", str(parallel),
           "-c", str(n_ctx), "-t", str(threads or os.cpu_count()), "--no-webui"]
    cmd += os.environ.get("LLAMA_SERVER_ARGS", "").split()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.2)

    def stop() -> None:
        proc.terminate()
        proc.wait(20)

    return f"http://127.0.0.1:{port}/v1", "model", stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--backend", default="llama.cpp", choices=["llama.cpp", "mlx"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=8 * 1024, help="the whole context")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--llama-server", default=None, help="llama-server's binary")
    args = parser.parse_args()
    resolved = resolve(args.model, ("mlx",) if args.backend == "mlx" else ("gguf",))
    path = str(resolved.path)

    def ours(parallel: int):
        return lambda: serve_ours(resolved, args.backend, parallel, args.ctx, args.threads)

    runs = [(f"gemma serve ({args.backend}), 1 client", ours(1), 1),
            (f"gemma serve ({args.backend}) --parallel {args.parallel}, {args.clients} clients",
             ours(args.parallel), args.clients)]
    if args.llama_server:
        runs.append((f"llama-server --parallel {args.parallel}, {args.clients} clients",
                     lambda: serve_llama_server(args.llama_server, path, args.parallel,
                                                args.ctx, args.threads), args.clients))
    print(f"{args.model}: {args.requests} requests per client, {args.max_tokens} tokens each, "
          f"context {args.ctx}", file=sys.stderr)
    print("| run | requests | tokens/s | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|")
    for label, start, clients in runs:
        url, model, stop = start()
        try:
            load(url, model, 1, 1, 8)  # warm-up
            r = load(url, model, clients, args.requests, args.max_tokens)
        finally:
            stop()
        print(f"| {label} | {r['requests']} | {r['aggregate_tps']:.1f} | "
              f"{r['ttft_p50_ms'] / 1000:.2f} s | {r['ttft_p95_ms'] / 1000:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
