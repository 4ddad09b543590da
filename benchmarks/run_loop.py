"""Our generation loop (what ``gemma run`` runs) against a minimal raw llama-cpp-python loop.

    python benchmarks/run_loop.py [-m MODEL] [-p 512] [-n 128] [-r 5] [--threads N]

Both load the same GGUF with the same threads, context and batch size. For each repetition the
two are run back to back (interleaved, alternating which goes first), so machine noise hits
both alike. Prefill: a ``-p``-token random-token prompt into an empty KV cache. Decode: ``-n``
tokens, greedy, never stopping at EOS; t/s counts the tokens after the first one (the first
comes out of prefill). Ours includes sampling through a llama.cpp sampler chain, streaming
detokenization and the consumer loop; the raw loop is ``Llama.eval`` + ``Llama.sample(temp=0)``
with no detokenization.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

import llama_cpp

from gemma_chat import generate as gen
from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.llamacpp import LlamaCppBackend, default_threads
from gemma_chat.resolve import resolve


def random_prompt(n: int, n_vocab: int, bos: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    # Skip the first ids (control and byte tokens), like llama-bench's random prompts.
    return [bos] + [rng.randrange(1000, n_vocab) for _ in range(n - 1)]


def ours_prefill(backend: LlamaCppBackend, prompt: list[int]) -> float:
    backend.trim_cache(0)
    sampling = SamplingParams(temperature=0, max_tokens=1)
    _, stats = gen.generate(backend, prompt, sampling, lambda s: None, ignore_eos=True)
    assert stats.prompt_eval_tokens == len(prompt)
    return stats.prompt_eval_tokens / stats.prefill_s


def raw_prefill(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    llm.sample(temp=0)  # ours samples the first token inside its prefill time too
    return len(prompt) / (time.perf_counter() - t0)


def ours_decode(backend: LlamaCppBackend, prompt: list[int], n: int) -> float:
    backend.trim_cache(0)
    sampling = SamplingParams(temperature=0, max_tokens=n)
    _, stats = gen.generate(backend, prompt, sampling, lambda s: None, ignore_eos=True)
    assert stats.generated_tokens == n, stats
    return stats.decode_tps


def raw_decode(llm: llama_cpp.Llama, prompt: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt)
    token = llm.sample(temp=0)
    t_first = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([token])
        token = llm.sample(temp=0)
    return (n - 1) / (time.perf_counter() - t_first)


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=512)
    parser.add_argument("-n", "--gen-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()

    resolved = resolve(args.model)
    ours = LlamaCppBackend(resolved, n_ctx=args.ctx, threads=args.threads)
    # The same context settings as ours: flash attention, window-sized sliding-window cache.
    raw = llama_cpp.Llama(model_path=str(resolved.path), n_ctx=args.ctx, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads,
                          n_gpu_layers=ours.info.gpu_layers, flash_attn=True, swa_full=False,
                          verbose=False)
    pp_prompt = random_prompt(args.prompt_tokens, ours.info.n_vocab, ours.info.bos_id)
    tg_prompt = random_prompt(16, ours.info.n_vocab, ours.info.bos_id, seed=1)

    # Warm-up, one of each.
    ours_prefill(ours, pp_prompt), raw_prefill(raw, pp_prompt)
    ours_decode(ours, tg_prompt, 16), raw_decode(raw, tg_prompt, 16)

    results: dict[str, list[float]] = {"ours_pp": [], "raw_pp": [], "ours_tg": [], "raw_tg": []}
    for rep in range(args.repetitions):
        order = [("ours", ours), ("raw", raw)]
        if rep % 2:
            order.reverse()
        for name, engine in order:
            fn_pp = ours_prefill if name == "ours" else raw_prefill
            results[f"{name}_pp"].append(fn_pp(engine, pp_prompt))
        for name, engine in order:
            fn_tg = ours_decode if name == "ours" else raw_decode
            results[f"{name}_tg"].append(fn_tg(engine, tg_prompt, args.gen_tokens))
        print(f"rep {rep + 1}/{args.repetitions}: " + ", ".join(
            f"{k} {v[-1]:.1f}" for k, v in results.items()), file=sys.stderr)

    pp, tg = f"pp{args.prompt_tokens}", f"tg{args.gen_tokens}"
    rows = []
    for test, key in ((pp, "pp"), (tg, "tg")):
        o_mean, o_sd = summary(results[f"ours_{key}"])
        r_mean, r_sd = summary(results[f"raw_{key}"])
        rows.append({"test": test, "ours_tps": round(o_mean, 2), "ours_sd": round(o_sd, 2),
                     "raw_tps": round(r_mean, 2), "raw_sd": round(r_sd, 2),
                     "ratio": round(o_mean / r_mean, 3)})
    print(f"\nmodel {resolved.path.name}, {args.threads} threads, ctx {args.ctx}, "
          f"{args.repetitions} runs each, interleaved; {cpu_name()}, llama-cpp-python "
          f"{llama_cpp.__version__}")
    print("| test | gemma run loop (t/s) | raw llama-cpp-python loop (t/s) | ours / raw |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['test']} | {row['ours_tps']:.1f} ± {row['ours_sd']:.1f} | "
              f"{row['raw_tps']:.1f} ± {row['raw_sd']:.1f} | {row['ratio']:.3f} |")
    print(json.dumps({"rows": rows, "threads": args.threads, "cpu": cpu_name(),
                      "model": resolved.path.name}))
    ours.close()
    raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
