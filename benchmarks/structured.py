"""What a JSON-schema constraint costs: decode tokens/s with and without one, same model, same
prompt, same seeds, in the same run; and the grammar's own time per token.

    python benchmarks/structured.py [-m MODEL] [--backend llama.cpp|mlx] [--runs 10]

Each constrained run writes one record of the schema in tests/test_structured.py (about 40
tokens) and stops when the JSON is complete; each free run generates the same number of tokens
(end of text ignored), so both decode the same lengths. The grammar time is llguidance's mask
for the next token plus setting the other logits to -inf, measured apart over the tokens of
a constrained reply.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from test_structured import PROMPT, SCHEMA  # noqa: E402

from gemma_chat.backends import load_backend  # noqa: E402
from gemma_chat.backends.base import SamplingParams  # noqa: E402
from gemma_chat.loader import LoadOptions  # noqa: E402
from gemma_chat.resolve import resolve  # noqa: E402
from gemma_chat.structured import json_constraint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("--backend", default="llama.cpp", choices=["llama.cpp", "mlx"])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    resolved = resolve(args.model, ("mlx",) if args.backend == "mlx" else ("gguf",))
    backend = load_backend(resolved, args.backend, LoadOptions(n_ctx=2048))
    started = time.perf_counter()
    constraint = json_constraint(backend, SCHEMA)
    compile_s = time.perf_counter() - started
    ids = backend.tokenize(PROMPT)
    free, constrained, lengths, replies = [], [], [], []
    for seed in range(args.runs):
        sampling = SamplingParams(temperature=1.0, seed=seed, max_tokens=256)
        chunks = list(backend.stream(ids, sampling, constraint=constraint))
        stats = chunks[-1].stats
        constrained.append(stats.decode_tps)
        lengths.append(stats.generated_tokens)
        replies.append(stats.token_ids)
        same = SamplingParams(temperature=1.0, seed=seed, max_tokens=stats.generated_tokens)
        free.append(list(backend.stream(ids, same, ignore_eos=True))[-1].stats.decode_tps)
    # The grammar alone: the mask before each token of the replies, on a logits-sized array.
    logits = np.zeros(backend.info.n_vocab, dtype=np.float32)
    masks = 0
    started = time.perf_counter()
    for reply in replies:
        matcher = constraint.matcher()
        for token in reply:
            matcher.mask(logits)
            matcher.accept(token)
            masks += 1
    grammar_ms = (time.perf_counter() - started) / masks * 1000
    print(f"{backend.info.name} on {args.backend}: {args.runs} replies of "
          f"{statistics.mean(lengths):.0f} tokens on average; schema compiled (with the "
          f"vocabulary) in {compile_s:.2f} s", file=sys.stderr)
    print("| run | decode tokens/s (median) |")
    print("|---|---|")
    print(f"| free | {statistics.median(free):.1f} |")
    print(f"| JSON schema | {statistics.median(constrained):.1f} |")
    print(f"\ngrammar mask + apply: {grammar_ms:.2f} ms a token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
