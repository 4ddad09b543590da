"""Turn latency of a growing chat: does each turn process only its new tokens?

    python benchmarks/chat_turns.py [-m MODEL] [--turns 10] [--runs 3] [--ctx 4096]

Each run is a fresh conversation (empty KV cache) of ``--turns`` user turns of about 50 tokens,
replies capped at 64 tokens, greedy, with a context large enough that nothing is trimmed. Per
turn: prompt tokens, tokens evaluated, time to first token and decode t/s, as the median over
``--runs`` runs. With KV cache reuse, turn 10's TTFT stays close to turn 2's although its prompt
is several times longer; without it, TTFT grows with the conversation.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.llamacpp import LlamaCppBackend, default_threads
from gemma_chat.chat import Conversation
from gemma_chat.resolve import resolve

TOPICS = ["rivers", "mountains", "bread", "trains", "libraries", "gardens", "bridges", "music",
          "winter", "the sea", "clocks", "maps"]


def user_turn(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"Question {i + 1}: tell me three short facts about {topic}, and explain in plain "
            f"words why people have always cared about {topic}, how {topic} changed over the "
            f"last century, and what a child might notice first about {topic}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--no-flash-attn", action="store_true")
    args = parser.parse_args()

    backend = LlamaCppBackend(resolve(args.model), n_ctx=args.ctx, threads=args.threads,
                              flash_attn=not args.no_flash_attn)
    sampling = SamplingParams(temperature=0, max_tokens=64)
    per_turn: list[list] = [[] for _ in range(args.turns)]
    for run in range(args.runs):
        backend.trim_cache(0)
        convo = Conversation(backend)
        for i in range(args.turns):
            for _ in convo.send(user_turn(i), sampling):
                pass
            assert convo.dropped == 0, "the context is too small: raise --ctx"
            per_turn[i].append(convo.last_stats)
        print(f"run {run + 1}/{args.runs}: {len(convo.ids)} tokens in context", file=sys.stderr)

    print(f"\n{backend.info.name} ({backend.info.quantization}), {args.threads} threads, "
          f"ctx {args.ctx}, flash attention {'off' if args.no_flash_attn else 'on'}, "
          f"median of {args.runs} runs")
    print("| turn | prompt tokens | evaluated | TTFT (ms) | decode t/s |")
    print("|---:|---:|---:|---:|---:|")
    ttft = []
    for i, stats in enumerate(per_turn):
        med = statistics.median
        ttft.append(med(s.ttft_s for s in stats))
        print(f"| {i + 1} | {med(s.prompt_tokens for s in stats):.0f} | "
              f"{med(s.prompt_eval_tokens for s in stats):.0f} | {ttft[-1] * 1000:.0f} | "
              f"{med(s.decode_tps for s in stats):.1f} |")
    ratio = ttft[-1] / ttft[1]
    verdict = "within" if ratio <= 1.5 else "NOT within"
    print(f"\nturn {args.turns} TTFT / turn 2 TTFT = {ratio:.2f} ({verdict} 1.5x)")
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
