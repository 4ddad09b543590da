"""The backend interface every inference engine implements, and the records it streams.

    backend = load_backend(resolved, "auto", LoadOptions(n_ctx=4096))
    for chunk in backend.stream(prompt, SamplingParams(temperature=0)):
        print(chunk.text, end="")
        if chunk.stats:
            print(chunk.stats.decode_tps)

One streaming primitive: everything that generates (``gemma run``, the chat, the server, the
benchmarks) consumes :meth:`Backend.stream`. The last chunk carries the :class:`Stats`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..errors import ContextOverflow, InvalidArgument

#: Gemma's recommended sampling, used when a model ships no generation config of its own.
#: (llama.cpp and mlx-lm have other defaults of their own; we never inherit them silently.)
GEMMA_DEFAULTS = {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0}

#: Why a generation ended (``Stats.stop_reason``), and what OpenAI's API calls it.
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length",
                  "cancelled": "cancelled"}

#: The context allocated when none is asked for: a Gemma 3 model's 128k context would take
#: many GB of KV cache.
DEFAULT_MAX_CTX = 8192


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
    stop_reason: str = "stop"  # a key of FINISH_REASONS
    stop_token: int | None = None  # the id that ended generation, when it was a stop token
    sampler: str = ""  # the sampler chain that ran, for the record
    cache_note: str = ""  # why the KV cache could not be re-used, when it could not
    thought_tokens: int = 0  # of the generated tokens, those in the thought channel
    thinking_s: float = 0.0  # from the first token to the end of the thoughts

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
    """A piece of streamed text, the token ids behind it, and on the last chunk the stats.

    Every generated token comes in a chunk, control tokens too (with no text): a thinking
    model's thought channel is told apart by them (:mod:`gemma_chat.thinking`, which marks
    ``thought``)."""

    text: str
    token_ids: tuple[int, ...] = ()
    stats: Stats | None = None
    thought: bool = False

    @property
    def finish_reason(self) -> str | None:
        """On the last chunk, why generation ended in OpenAI's terms; else None."""
        return FINISH_REASONS[self.stats.stop_reason] if self.stats is not None else None


def collect(chunks: Iterable[Chunk], write=None) -> tuple[str, Stats]:
    """Consume a stream: the whole answer text (thoughts left out) and the final stats
    (``write`` sees each piece)."""
    pieces: list[str] = []
    stats = None
    for chunk in chunks:
        if chunk.text and not chunk.thought:
            pieces.append(chunk.text)
            if write is not None:
                write(chunk.text)
        if chunk.stats is not None:
            stats = chunk.stats
    if stats is None:
        raise RuntimeError("a backend stream must end with a stats chunk")
    return "".join(pieces), stats


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
    context_note: str = ""  # how the context was chosen, when it was not asked for
    chat_template: str = ""  # the model file's own template (never rendered but in a sandbox)
    media: tuple[str, ...] = ()  # what it takes besides text ("image", "audio"), with its projector
    projector: str = ""  # the projector file that encodes them

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["sampling_defaults"] = dict(self.sampling_defaults)
        return d


Prompt = str | Sequence[int]


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
        cancel: threading.Event | None = None,
        constraint=None,
    ) -> Iterator[Chunk]:
        """Generate from ``prompt`` (text is tokenized with special tokens; ids are used as is).

        Re-uses the KV cache for the longest common prefix with the previous call's tokens.
        Stops at ``<end_of_turn>`` or EOS (neither is yielded as text) unless ``ignore_eos``;
        ``stop_ids`` adds more. Setting ``cancel`` (from any thread) stops this generation, and
        only this one, after the current token. ``constraint`` (a
        :class:`~gemma_chat.structured.JsonConstraint`) allows only text that stays valid JSON
        for its schema. The final chunk carries :class:`Stats`.
        """

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


# -- what both backends share ------------------------------------------------------------------

class BackendBase:
    """The parts of a backend that do not depend on its engine."""

    info: ModelInfo

    def media_ids(self, media) -> list[int]:
        """The ids a picture or sound clip takes in a prompt: the tokens the model wraps it in,
        and :func:`media_key` once per position of its own (see :mod:`gemma_chat.media`)."""
        raise cannot_take(self.info, media)

    def knows_media(self, token: int) -> bool:
        """Whether ``token`` is the key of a medium :meth:`media_ids` has seen."""
        return False

    def close(self) -> None:  # pragma: no cover - each backend frees its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def context_size(requested: int | None, n_ctx_train: int, engine: str,
                 default: int | None = None) -> int:
    """The context to allocate: ``requested``, else ``default`` (chosen from memory), else the
    model's up to DEFAULT_MAX_CTX."""
    if requested is None:
        requested = default if default is not None else min(n_ctx_train, DEFAULT_MAX_CTX)
    n_ctx = requested
    if n_ctx < 16:
        raise InvalidArgument(f"invalid context size {n_ctx}: must be at least 16")
    if n_ctx > n_ctx_train:
        raise InvalidArgument(f"--ctx {n_ctx} is more than the model's context length "
                              f"({n_ctx_train}) on {engine}")
    return n_ctx


def media_key(sha256: str, n_tokens: int) -> int:
    """The id each position of a medium holds in a prompt: negative, so never a token, and the
    same for the same medium seen as the same number of tokens, so that the KV cache's prefix
    match keeps a picture from one turn to the next."""
    digest = hashlib.sha256(f"{sha256}:{n_tokens}".encode()).digest()
    return -1 - int.from_bytes(digest[:4], "little") % (2**31 - 2)


def media_start(ids: Sequence[int], n: int, lengths: Mapping[int, int]) -> int:
    """``n``, or where the medium that position ``n`` falls inside starts: a cache is never
    cut inside a picture."""
    if n <= 0 or n >= len(ids) or ids[n] >= 0 or ids[n - 1] != ids[n]:
        return n
    key, size = ids[n], lengths[ids[n]]
    start = n
    while start > 0 and ids[start - 1] == key:
        start -= 1
    return start + (n - start) // size * size  # the same medium twice in a row: whole ones


def cannot_take(info: ModelInfo, media) -> InvalidArgument:
    """The one-line error for a medium a loaded model cannot take."""
    from ..media import MediaError

    if info.backend == "openai":
        return MediaError(f"{info.name} on the server does not take {media.kind}s "
                          f"({media.name}), as its catalogue card says")
    if info.backend == "mlx" and not info.media:
        return MediaError(
            f"{info.name} does not take {media.kind}s ({media.name}): its folder has no "
            "encoder weights. Gemma 3 4B, 12B and 27B and Gemma 4 see images on MLX when "
            "converted with theirs (gemma convert CHECKPOINT --to mlx); Gemma 1, 2 and Gemma 3 "
            "270M and 1B read text only")
    if info.media:
        return MediaError(f"{info.name} takes {' and '.join(info.media)}, not {media.kind} "
                          f"({media.name}); Gemma 4 E2B and E4B hear audio")
    return MediaError(
        f"{info.name} does not take {media.kind}s ({media.name}): it has no projector file "
        "(mmproj-*.gguf) beside it. Gemma 3 4B, 12B and 27B, Gemma 3n and Gemma 4 see images "
        "with theirs; Gemma 1, 2 and Gemma 3 270M and 1B read text only")


def checked_prompt(backend: Backend, prompt: Prompt) -> list[int]:
    """The prompt as token ids, refused when empty, too long or outside the vocabulary."""
    ids = backend.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    info = backend.info
    if not ids:
        raise InvalidArgument("the prompt is empty")
    if len(ids) >= info.n_ctx:
        raise ContextOverflow(
            f"the prompt is {len(ids)} tokens and the context holds {info.n_ctx}; "
            f"shorten it or raise --ctx (the model allows {info.n_ctx_train})")
    knows = getattr(backend, "knows_media", None)
    bad = [t for t in ids if not 0 <= t < info.n_vocab and not (t < 0 and knows and knows(t))]
    if bad:
        raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary")
    return ids


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stop_set(ends: Iterable[int], extra: Sequence[int] | None, ignore_eos: bool) -> set[int]:
    """The ids that end a generation: the model's end ids unless ``ignore_eos``, plus extras."""
    stops = set(extra or ())
    if not ignore_eos:
        stops |= {t for t in ends if t is not None}
    return stops


def describe_sampler(sp: SamplingParams, logit_bias: Mapping[int, float] | None = None) -> str:
    """The sampler chain in llama.cpp's order, as the stats record it."""
    names = ["logit_bias"] if logit_bias else []
    if sp.repeat_penalty != 1.0 and sp.repeat_last_n:
        names.append(f"repeat_penalty={sp.repeat_penalty}/{sp.repeat_last_n}")
    if sp.greedy:
        return " > ".join([*names, "greedy"])
    if sp.top_k > 0:
        names.append(f"top_k={sp.top_k}")
    if sp.top_p < 1.0:
        names.append(f"top_p={sp.top_p}")
    if sp.min_p > 0.0:
        names.append(f"min_p={sp.min_p}")
    names += [f"temp={sp.temperature}",
              f"dist(seed={'random' if sp.seed is None else sp.seed})"]
    return " > ".join(names)
