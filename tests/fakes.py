"""A scripted backend for the fast tier: replies are enqueued, like ``llm``'s mock model.

    backend = ScriptedBackend()
    backend.enqueue("Hello there!", "Second reply")
    text, stats = collect(backend.stream(prompt, SamplingParams(temperature=0)))

It tokenizes one character per token (ids 1000 + code point) with Gemma 3's (or, with
``architecture="gemma4"``, Gemma 4's) control tokens at their real ids, keeps a KV "cache" of
the ids it has seen (so prefix reuse shows in the stats), honours ``max_tokens``, the context,
stop ids and ``cancel``, and can wait between tokens to let tests interleave with a running
generation. Never a feature's only test: the real-model tests cover every behaviour end to end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gemma_chat.backends.base import (
    BackendBase,
    Chunk,
    ModelInfo,
    Prompt,
    SamplingParams,
    Stats,
    checked_prompt,
    common_prefix,
    describe_sampler,
    stop_set,
)

SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105,
           "<end_of_turn>": 106}
#: Gemma 4's control tokens at their ids in the real vocabulary (ggml-vocab-gemma-4.gguf).
SPECIAL4 = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|tool_call>": 48,
            "<tool_call|>": 49, "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
            "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105,
            "<turn|>": 106, "<|tool>": 46, "<tool|>": 47, "<|image|>": 258880,
            "<|audio|>": 258881, "<|video|>": 258884}
OFFSET = 1000 + 0x100000  # above every special id


class ScriptedBackend(BackendBase):
    name = "scripted"

    def __init__(self, n_ctx: int = 4096, delay: float = 0.0, architecture: str = "gemma3"):
        self.replies: deque[str] = deque()
        self.prompts: list[list[int]] = []  # every prompt it was given
        self.delay = delay
        self._cached: list[int] = []
        self.special = SPECIAL4 if architecture == "gemma4" else SPECIAL
        self.by_id = {v: k for k, v in self.special.items()}
        self.info = ModelInfo(
            name="scripted", path=Path("scripted.gguf"), backend=self.name,
            architecture=architecture, quantization="none", n_ctx=n_ctx, n_ctx_train=n_ctx,
            n_vocab=OFFSET + 0x110000, n_params=0, instruction_tuned=True, bos_id=2, eos_id=1,
            end_of_turn_id=106, device="cpu")

    def enqueue(self, *replies: str) -> ScriptedBackend:
        self.replies.extend(replies)
        return self

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if special:
                hit = next((s for s in self.special if text.startswith(s, i)), None)
                if hit:
                    ids.append(self.special[hit])
                    i += len(hit)
                    continue
            ids.append(OFFSET + ord(text[i]))
            i += 1
        return ids

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        return "".join(chr(t - OFFSET) if t >= OFFSET else
                       (self.by_id.get(t, "") if special else "") for t in ids)

    # -- the cache --------------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._cached)

    def trim_cache(self, n_tokens: int) -> str:
        self._cached = self._cached[:max(0, n_tokens)]
        return ""

    def save_state(self, path: Path) -> None:
        Path(path).write_text(" ".join(map(str, self._cached)))

    def load_state(self, path: Path) -> list[int]:
        self._cached = [int(t) for t in Path(path).read_text().split()]
        return list(self._cached)

    # -- generation -------------------------------------------------------------------------

    def stream(self, prompt: Prompt, sampling: SamplingParams, *, ignore_eos: bool = False,
               logit_bias: Mapping[int, float] | None = None,
               stop_ids: Sequence[int] | None = None,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        ids = checked_prompt(self, prompt)
        ends = (1, 106, 50) if self.info.architecture == "gemma4" else (1, 106)
        stops = stop_set(ends, stop_ids, ignore_eos)
        reply = self.replies.popleft() if self.replies else "ok"
        self.prompts.append(ids)
        return self._generate(ids, sampling, reply, stops, logit_bias,
                              cancel or threading.Event())

    def _generate(self, ids, sp, reply, stops, logit_bias, cancel) -> Iterator[Chunk]:
        start = time.perf_counter()
        reused = min(common_prefix(self._cached, ids), len(ids) - 1)
        stats = Stats(prompt_tokens=len(ids), prompt_eval_tokens=len(ids) - reused,
                      sampler=describe_sampler(sp, logit_bias))
        self._cached = list(ids)
        script = self.tokenize(reply, special=True) + [106]
        room = self.info.n_ctx - len(ids)
        limit = min(sp.max_tokens or room, room)
        stats.stop_reason = "length"
        for token in script:
            if cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            if token in stops:
                stats.stop_reason, stats.stop_token = "stop", token
                break
            if self.delay:
                time.sleep(self.delay)
            stats.token_ids.append(token)
            self._cached.append(token)
            if stats.ttft_s == 0.0:
                stats.ttft_s = stats.prefill_s = time.perf_counter() - start
            yield Chunk(self.detokenize([token]), (token,))
            if len(stats.token_ids) >= limit:
                stats.stop_reason = "length" if limit < room else "context"
                break
        stats.generated_tokens = len(stats.token_ids)
        stats.decode_s = max(time.perf_counter() - start - stats.prefill_s, 1e-9)
        yield Chunk("", (), stats)

    def close(self) -> None:
        pass
