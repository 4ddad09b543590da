"""What a picture costs: time to first token with a picture, against text of the same length.

    python benchmarks/picture_prefill.py -m MODEL [--backend llama.cpp|mlx] [--image FILE]
        [--runs 3] [--image-tokens 280] [--ctx 2048]

MODEL is a model that sees: a GGUF with its ``mmproj-*.gguf`` beside it, or an MLX folder with
its encoder weights. Each run starts from an empty cache and a picture the encoder has not seen
(a 768x768 gradient drawn here unless ``--image``), then measures three prompts, greedy, 8 tokens:

- **picture**: a user turn with the picture and a question (the encoder runs, then the prefill);
- **text anchor**: the same prompt with the picture's positions filled with ordinary text tokens
  (the same number of positions, so the same prefill without the encoder);
- **next turn**: a follow-up in the same chat, the picture still in the KV cache.

The table gives the median TTFT of each and the picture's own cost (picture minus anchor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import numpy as np

from gemma_chat import media
from gemma_chat.backends import load_backend
from gemma_chat.backends.base import SamplingParams, collect
from gemma_chat.chat import Conversation
from gemma_chat.errors import GemmaChatError
from gemma_chat.loader import LoadOptions
from gemma_chat.resolve import resolve

QUESTION = "Describe this picture in one sentence."


def gradient(size: int = 768) -> np.ndarray:
    """A photo-like picture: smooth colour gradients with a little noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 255 + rng.normal(0, 8, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--image", help="a picture file (default: a 768x768 gradient)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-tokens", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()

    try:
        backend = load_backend(resolve(args.model), args.backend,
                               LoadOptions(n_ctx=args.ctx, image_tokens=args.image_tokens))
    except GemmaChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "image" not in backend.info.media:
        print(f"{backend.info.name} does not take pictures", file=sys.stderr)
        return 2
    if args.image:
        picture = media.load(args.image)
    else:
        picture = media.Media("image", "gradient.png", "gradient", pixels=gradient())
    greedy = SamplingParams(temperature=0, max_tokens=8)
    rows: dict[str, list] = {"picture": [], "text anchor": [], "next turn": []}
    for run in range(args.runs):
        fresh = replace(picture, sha256=f"{picture.sha256}-{run}")  # not seen by the encoder
        backend.trim_cache(0)
        convo = Conversation(backend)
        collect(convo.send(QUESTION, greedy, media=[fresh]))
        rows["picture"].append(convo.last_stats)
        ids = convo.ids_for([], QUESTION, media=[fresh])
        collect(convo.send("And what colours does it have?", greedy))
        rows["next turn"].append(convo.last_stats)
        filler = backend.tokenize(" a quiet garden" * len(ids))
        anchor = [filler[i] if t < 0 else t for i, t in enumerate(ids)]
        backend.trim_cache(0)
        _, stats = collect(backend.stream(anchor, greedy))
        rows["text anchor"].append(stats)
        print(f"run {run + 1}/{args.runs}", file=sys.stderr, end="\r")
    med = statistics.median
    info = backend.info
    print(f"\n{info.name} on {info.backend} ({info.quantization}), ctx {args.ctx}, "
          f"median of {args.runs} runs")
    print("| prompt | tokens | evaluated | TTFT (ms) |")
    print("|---|---:|---:|---:|")
    ttft = {}
    for name, stats in rows.items():
        ttft[name] = med(s.ttft_s for s in stats) * 1000
        print(f"| {name} | {med(s.prompt_tokens for s in stats):.0f} | "
              f"{med(s.prompt_eval_tokens for s in stats):.0f} | {ttft[name]:.0f} |")
    print(f"\nthe picture's own cost (encoder and its positions): "
          f"{ttft['picture'] - ttft['text anchor']:.0f} ms")
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
