"""Our MLX backend against raw mlx-lm ``stream_generate`` on the same model folder.

    python benchmarks/mlx_overhead.py [-m MODEL] [-p 64] [-n 16] [-r 5]

MODEL is anything ``gemma run --backend mlx -m`` takes (default: the demo model converted with
``gemma convert gemma-3-270m --to mlx``). Both start from an empty cache each run, process the
same random-token prompt and generate ``-n`` greedy tokens with EOS and <end_of_turn> banned by
the same logit bias, interleaved, alternating which goes first. Reports prefill and decode t/s,
their ratio, and MLX's peak memory (Metal memory on Apple Silicon). Runs unchanged on a Mac.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.mlx import MLXBackend
from gemma_chat.resolve import resolve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("-p", type=int, default=64)
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("-r", type=int, default=5)
    args = parser.parse_args()

    ours = MLXBackend(resolve(args.model, ("mlx",)), n_ctx=2048)
    model, tokenizer = ours._model, ours._tok  # the same weights for both
    rng = random.Random(0)
    prompt = [ours.info.bos_id] + [rng.randrange(1000, ours.info.n_vocab)
                                   for _ in range(args.p - 1)]
    ban = {ours.info.eos_id: -1e9}
    if ours.info.end_of_turn_id is not None:
        ban[ours.info.end_of_turn_id] = -1e9

    def run_ours():
        ours.trim_cache(0)
        stats = None
        for chunk in ours.stream(prompt, SamplingParams(temperature=0, max_tokens=args.n),
                                 logit_bias=ban):
            stats = chunk.stats or stats
        assert stats.generated_tokens == args.n
        return stats.prefill_tps, stats.decode_tps

    def run_raw():
        last = None
        for response in stream_generate(model, tokenizer, prompt=prompt, max_tokens=args.n,
                                        sampler=make_sampler(0.0),
                                        logits_processors=make_logits_processors(ban)):
            last = response
        assert last.generation_tokens == args.n
        # mlx-lm divides all n tokens by the time since the first one, which covers n - 1
        # decode steps; count the steps, as ours (and llama-bench) do.
        return last.prompt_tps, last.generation_tps * (args.n - 1) / args.n

    run_ours(), run_raw()  # warm-up
    results = {"ours": ([], []), "raw": ([], [])}
    for rep in range(args.r):
        order = [("ours", run_ours), ("raw", run_raw)]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            pp, tg = fn()
            results[name][0].append(pp)
            results[name][1].append(tg)
        print(f"round {rep + 1}/{args.r}", file=sys.stderr)
    print(f"{ours.info.name} ({ours.info.quantization}) on {ours.info.device}, prompt {args.p}, "
          f"{args.n} tokens, {args.r} runs each, interleaved; peak MLX memory "
          f"{mx.get_peak_memory() / 1e6:.0f} MB")
    print("| test | gemma-chat MLX backend (t/s) | raw mlx-lm stream_generate (t/s) | ratio |")
    print("|---|---:|---:|---:|")
    for i, test in enumerate((f"pp{args.p}", f"tg{args.n}")):
        a, b = results["ours"][i], results["raw"][i]
        print(f"| {test} | {statistics.mean(a):.2f} ± {statistics.stdev(a):.2f} | "
              f"{statistics.mean(b):.2f} ± {statistics.stdev(b):.2f} | "
              f"{statistics.mean(a) / statistics.mean(b):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
