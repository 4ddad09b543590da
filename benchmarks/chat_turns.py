"""Turn latency of a growing chat: does each turn process only its new tokens?

    python benchmarks/chat_turns.py [-m MODEL] [--turns 10] [--runs 3] [--ctx 4096]

The same scenario as ``gemma bench --chat-turns`` (``gemma_chat.bench.run_chat``), printed as
one table with the ratio of turn 10's time to first token to turn 2's: fresh conversations of
~50-token user turns, replies capped at 64 tokens, greedy, a context large enough that nothing
is trimmed, median over ``--runs`` runs. With KV cache reuse every turn evaluates only its new
tokens, so TTFT stays close to turn 2's although the prompt grows several times over.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from gemma_chat.backends.llamacpp import LlamaCppBackend, default_threads
from gemma_chat.bench import run_chat
from gemma_chat.resolve import resolve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()

    backend = LlamaCppBackend(resolve(args.model), n_ctx=args.ctx, threads=args.threads)
    turns = run_chat(backend, args.turns, args.runs,
                     progress=lambda s: print(s, file=sys.stderr, end="\r"))
    med = statistics.median
    print(f"\n{backend.info.name} ({backend.info.quantization}), {args.threads} threads, "
          f"ctx {args.ctx}, median of {args.runs} runs")
    print("| turn | prompt tokens | evaluated | TTFT (ms) | decode t/s |")
    print("|---:|---:|---:|---:|---:|")
    ttft = [med(t.ttft_s) for t in turns]
    for i, t in enumerate(turns):
        print(f"| {i + 1} | {med(t.extra['prompt_tokens']):.0f} | "
              f"{med(t.extra['evaluated']):.0f} | {ttft[i] * 1000:.0f} | {med(t.tps):.1f} |")
    ratio = ttft[-1] / ttft[1]
    print(f"\nturn {args.turns} TTFT / turn 2 TTFT = {ratio:.2f} "
          f"({'within' if ratio <= 1.5 else 'NOT within'} 1.5x)")
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
