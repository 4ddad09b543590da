"""The backend interface every inference engine implements, and the records it streams.

    backend = load_backend(resolved, ctx=4096)
    for chunk in backend.stream(prompt, SamplingParams(temperature=0)):
        print(chunk.text, end="")
        if chunk.stats:
            print(chunk.stats.decode_tps)

One streaming primitive: everything that generates (``gemma run``, the chat, the server, the
benchmarks) consumes :meth:`Backend.stream`. The last chunk carries the :class:`Stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgument

#: Gemma's recommended sampling, used when a model ships no generation config of its own.
#: (llama.cpp and mlx-lm have other defaults of their own; we never inherit them silently.)
GEMMA_DEFAULTS = {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0}

STOP_REASONS = ("stop", "length", "cancelled", "context")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, the same on every backend. ``temperature=0`` is greedy."""

    temperature: float = GEMMA_DEFAULTS["temperature"]
    top_k: int = GEMMA_DEFAULTS["top_k"]  # 0: off
    top_p: float = GEMMA_DEFAULTS["top_p"]  # 1.0: off
    min_p: float = GEMMA_DEFAULTS["min_p"]  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int | None = None  # None: until a stop token or the context is full

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` naming the first value out of range."""
        def bad(name: str, value: object, rule: str) -> InvalidArgument:
            return InvalidArgument(f"invalid {name} {value!r}: {rule}")

        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise bad(name, value, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "must be >= 0 (0 turns it off)")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty", self.repeat_penalty, "must be > 0 (1 turns it off)")
        if self.repeat_last_n < 0:
            raise bad("repeat_last_n", self.repeat_last_n, "must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise bad("seed", self.seed, "must be in [0, 2**32)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, **overrides: object) -> SamplingParams:
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Stats:
    """What one generation did, in the field's terms."""

    prompt_tokens: int = 0  # tokens in the prompt
    prompt_eval_tokens: int = 0  # of those, evaluated now (the rest came from the KV cache)
    generated_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the generated ids, stop token excluded
    ttft_s: float = 0.0  # from the call to the first generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last
    stop_reason: str = "stop"  # one of STOP_REASONS
    stop_token: int | None = None  # the id that ended generation, when it was a stop token
    sampler: str = ""  # the sampler chain that ran, for the record
    cache_note: str = ""  # why the KV cache could not be re-used, when it could not

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_eval_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prompt_eval_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; decode time covers the ones after it.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(
            cached_tokens=self.cached_tokens,
            prefill_tps=round(self.prefill_tps, 2),
            decode_tps=round(self.decode_tps, 2),
        )
        return d


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text, the token ids behind it, and on the last chunk the stats."""

    text: str
    token_ids: tuple[int, ...] = ()
    stats: Stats | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What ``/info`` and ``--verbose`` show about a loaded model."""

    name: str
    path: Path
    backend: str
    architecture: str
    quantization: str
    n_ctx: int  # the context this session allocated
    n_ctx_train: int  # the model's own context length
    n_vocab: int
    n_params: int
    instruction_tuned: bool
    bos_id: int
    eos_id: int
    end_of_turn_id: int | None
    device: str  # "cpu", "cuda", "metal"
    threads: int | None = None
    gpu_layers: int = 0
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)
    weight_repack: str = ""  # llama.cpp's CPU weight repacking, where the backend has one

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["sampling_defaults"] = dict(self.sampling_defaults)
        return d


Prompt = str | Sequence[int]


@runtime_checkable
class Backend(Protocol):
    """An inference engine with one model loaded and a KV cache it keeps between calls."""

    name: str
    info: ModelInfo

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``; never adds a BOS (the template writes ``<bos>`` itself).

        With ``special``, control-token text such as ``<start_of_turn>`` becomes its single id.
        """

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        """Text of ``ids``; control tokens render as nothing unless ``special``."""

    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        ignore_eos: bool = False,
        logit_bias: Mapping[int, float] | None = None,
        stop_ids: Sequence[int] | None = None,
    ) -> Iterator[Chunk]:
        """Generate from ``prompt`` (text is tokenized with special tokens; ids are used as is).

        Re-uses the KV cache for the longest common prefix with the previous call's tokens.
        Stops at ``<end_of_turn>`` or EOS (neither is yielded as text) unless ``ignore_eos``;
        ``stop_ids`` adds more. The final chunk carries :class:`Stats`.
        """

    def cancel(self) -> None:
        """Ask a running :meth:`stream` to stop after the current token (thread-safe)."""

    @property
    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values are in the KV cache now."""

    def trim_cache(self, n_tokens: int) -> str:
        """Keep only the first ``n_tokens`` of the KV cache. A sliding-window cache that cannot
        roll back that far is emptied instead; the return value then says why (else "")."""

    def save_state(self, path: Path) -> None:
        """Write the KV cache and its token ids to ``path``."""

    def load_state(self, path: Path) -> list[int]:
        """Restore a KV cache written by :meth:`save_state`; return its token ids."""

    def close(self) -> None:
        """Free the model and its context."""


def apply_model_defaults(base: SamplingParams, defaults: Mapping[str, float]) -> SamplingParams:
    """The model's own generation config wins over Gemma's recommended defaults."""
    known = {k: v for k, v in defaults.items() if k in {"temperature", "top_k", "top_p", "min_p"}}
    return replace(base, **known) if known else base
