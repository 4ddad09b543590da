"""The MLX backend, on mlx-lm: mlx-lm model folders (config.json, safetensors, tokenizer).

On Apple Silicon this runs on the GPU with unified memory; on Linux ``mlx[cpu]`` runs it on the
CPU (slowly for quantized weights: fine for correctness, not a speed reference).

The token loop is mlx-lm's ``generate_step`` with its samplers and logits processors; stopping,
detokenization (mlx-lm's streaming detokenizer) and the stats are ours, so both backends behave
the same. The prompt cache lives across calls: a prompt that extends the cached tokens evaluates
only the rest, and after a roll-back the cache is trimmed to the common prefix.

mlx-lm's rotating sliding-window cache holds exactly the window and cannot be trimmed once it
has wrapped; every Gemma 4 turn rolls back over the thoughts of the last reply, so a long
thinking chat would re-evaluate everything every turn. Here the sliding-window caches hold
:data:`SWA_SLACK` positions beyond their window (the model's masks still limit attention to the
window), and a wrapped cache is trimmed as long as the window before the new end is still in it.
A roll-back further than that re-evaluates the prompt, and the stats say so.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendError, missing_extra
from ..family import GEMMA, architecture_of, legacy_config_keys
from ..memory import MLX_SWA_SLACK
from . import base
from .base import BackendBase, Chunk, ModelInfo, Prompt, SamplingParams, Stats

try:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_logits_processors
except ImportError:  # pragma: no cover - exercised where the extra is missing
    mx = None


SWA_SLACK = MLX_SWA_SLACK  # read at load time (tests narrow it)


def add_window_slack(model, slack: int | None = None) -> None:
    """Give ``model``'s rotating sliding-window caches ``slack`` (default :data:`SWA_SLACK`)
    more positions (see above)."""
    from mlx_lm.models.cache import RotatingKVCache

    slack = SWA_SLACK if slack is None else slack
    make = model.make_cache

    def make_cache():
        caches = []
        for c in make():
            if type(c) is RotatingKVCache and not c.keep:
                wide = RotatingKVCache(max_size=c.max_size + slack)
                wide.window = c.max_size  # what the model attends to
                wide.first = 0  # the absolute position of the oldest real entry
                c = wide
            caches.append(c)
        return caches

    model.make_cache = make_cache


def _trimmable(cache, drop: int) -> bool:
    """Whether dropping the last ``drop`` positions leaves every cache able to continue."""
    for c in cache:
        if c.is_trimmable():
            continue
        window = getattr(c, "window", None)
        if window is None:
            return False
        held_from = max(c.first, c.offset - c.max_size)
        # The window before the new end must be held, and the cache must stay wrapped (a
        # wrapped cache's layout is not the one mlx-lm assumes below its size).
        if c.offset - drop - window < held_from or c.offset - drop < c.max_size:
            return False
    return True


def _trim(cache, drop: int) -> None:
    """Drop the last ``drop`` positions; a wrapped rotating cache is put in temporal order,
    cut, and padded back to its size (the padding lies outside every window: never seen)."""
    for c in cache:
        if c.is_trimmable() or getattr(c, "window", None) is None:
            c.trim(drop)
            continue
        keys, values = c._temporal_order(c.keys), c._temporal_order(c.values)
        keep = keys.shape[2] - drop
        # keys[..., 0, :] is position offset - length; earlier padding is older still.
        c.first = max(c.first, c.offset - keys.shape[2])
        pad = c.max_size - keep
        if pad > 0:
            keys = mx.concatenate([keys[..., :keep, :], mx.zeros((*keys.shape[:2], pad,
                                   keys.shape[3]), keys.dtype)], axis=2)
            values = mx.concatenate([values[..., :keep, :], mx.zeros((*values.shape[:2], pad,
                                     values.shape[3]), values.dtype)], axis=2)
        else:
            keys, values = keys[..., :keep, :], values[..., :keep, :]
        c.keys, c.values = keys, values
        c.offset -= drop
        c._idx = keep


class _SlidingWindowGemma2:
    """mlx-lm's Gemma 2 body with Gemma 2's attention pattern: even layers see only the last
    ``window`` tokens (a window mask and a rotating cache of that size), odd layers everything.
    mlx-lm 0.32's own Gemma 2 attends to the whole context in every layer, which is wrong past
    the window (4096 tokens on the real models)."""

    def __call__(self, inputs, cache=None):
        from mlx_lm.models.base import create_attention_mask

        h = self.embed_tokens(inputs) * (self.args.hidden_size ** 0.5)
        if cache is None:
            cache = [None] * len(self.layers)
        full = create_attention_mask(h, cache[1] if len(cache) > 1 else None,
                                     return_array=True)
        local = create_attention_mask(h, cache[0], window_size=self.window, return_array=True)
        if getattr(full, "ndim", 0) == 4 and self.layers[0].self_attn.repeats > 1:
            # A batch's masks are (B, 1, L, S); with grouped queries the scores are
            # (B, kv_heads, repeats, L, S), which the mask must meet one axis further in.
            full, local = full[:, :, None], local[:, :, None]
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, local if i % 2 == 0 else full, c)
        return self.norm(h)


def add_gemma2_sliding_window(model, window: int) -> None:
    """Give a loaded mlx-lm Gemma 2 model its sliding-window layers (see above)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    body = model.model
    body.__class__ = type("SlidingWindowGemmaModel", (_SlidingWindowGemma2, type(body)), {})
    body.window = window
    model.make_cache = lambda: [RotatingKVCache(max_size=window) if i % 2 == 0 else KVCache()
                                for i in range(len(model.layers))]


def picture_mask(h, c, spans, window: int | None = None):
    """The attention mask of one layer for the tokens ``h`` after cache ``c``, where a
    picture's tokens also see each other (within ``window`` when given); None when no query
    is in a picture (the layer's own mask then stands)."""
    from mlx_lm.models.base import create_attention_mask

    n = h.shape[1]
    if n == 1 or h.shape[0] != 1 or not spans:
        return None
    base_mask = create_attention_mask(h, c, window_size=window, return_array=True)
    offset = c.offset if c is not None else 0
    size = base_mask.shape[-1]
    # The keys are the last `size` positions, in order (mlx-lm puts a rotating cache in
    # temporal order before it adds more than one token).
    queries = np.arange(offset, offset + n)
    keys = np.arange(offset + n - size, offset + n)
    block_q, block_k = _blocks(queries, spans), _blocks(keys, spans)
    same = (block_q[:, None] == block_k[None, :]) & (block_q[:, None] >= 0)
    if window:
        same &= keys[None, :] > queries[:, None] - window
    if not same.any():
        return None
    return base_mask | mx.array(same).reshape(base_mask.shape)


class _PictureAttentionGemma4:
    """mlx-lm's Gemma 4 body with the larger models' attention over pictures: in the
    sliding-window layers, a picture's tokens see each other (and, as ever, what came before
    within the window); the global layers stay causal, as in Hugging Face's Gemma 4. mlx-lm 0.32
    attends causally everywhere. ``picture_spans`` holds the absolute [start, end) of each
    picture being evaluated; every picture must be evaluated in one call
    (:func:`prefill_step`)."""

    picture_spans: tuple[tuple[int, int], ...] = ()

    def _make_masks(self, h, cache):
        masks = super()._make_masks(h, cache)
        if h.shape[1] == 1 or not self.picture_spans:  # decoding, or no picture: as mlx-lm
            return masks
        sliding = [i for i, layer in enumerate(self.layers)
                   if layer.layer_type == "sliding_attention"]
        if not sliding:
            return masks
        mask = picture_mask(h, cache[sliding[0]], self.picture_spans, self.window_size)
        if mask is None:
            return masks
        return [mask if i in sliding else m for i, m in enumerate(masks)]


class _PictureAttentionGemma3:
    """mlx-lm's Gemma 3 body with Gemma 3's attention over pictures: a picture's tokens see
    each other in every layer, as in Hugging Face's Gemma 3 and llama.cpp (mlx-lm and mlx-vlm
    attend causally). The body is mlx-lm 0.32's, with the masks made here."""

    picture_spans: tuple[tuple[int, int], ...] = ()

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        pattern = self.sliding_window_pattern
        full = picture_mask(h, cache[pattern - 1], self.picture_spans)
        if full is None:
            return super().__call__(inputs, cache, input_embeddings)
        local = picture_mask(h, cache[0], self.picture_spans, self.window_size) \
            if pattern > 1 else None
        h = h * mx.array(self.args.hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, full if i % pattern == pattern - 1 else local, c)
        return self.norm(h)


_PICTURE_ATTENTION = {"gemma3": _PictureAttentionGemma3, "gemma4": _PictureAttentionGemma4}


def _blocks(positions: np.ndarray, spans) -> np.ndarray:
    """The index of the span each position falls in, -1 outside them all."""
    out = np.full(len(positions), -1)
    for i, (start, end) in enumerate(spans):
        out[(positions >= start) & (positions < end)] = i
    return out


def _text_body(model):
    return model.language_model.model if hasattr(model, "language_model") else model.model


def add_picture_attention(model, arch: str) -> None:
    """Give a loaded mlx-lm Gemma 3 or 4 model its attention over pictures (see above)."""
    body = _text_body(model)
    mixin = _PICTURE_ATTENTION[arch]
    body.__class__ = type(mixin.__name__.lstrip("_"), (mixin, type(body)), {})


def set_picture_spans(model, spans: list[tuple[int, int]]) -> None:
    """Tell a model with :func:`add_picture_attention` where the pictures are."""
    body = _text_body(model)
    if isinstance(body, tuple(_PICTURE_ATTENTION.values())):
        # A plain attribute: an MLX module would hold a list as a child of its tree.
        object.__setattr__(body, "picture_spans", tuple(spans))


def media_spans(ids: Sequence[int], lengths: Mapping[int, int]) -> list[tuple[int, int]]:
    """[start, end) of each medium whose key is in ``lengths`` (the same one twice in a row:
    each whole)."""
    spans, i = [], 0
    while i < len(ids):
        n = lengths.get(ids[i])
        if n:
            spans.append((i, i + n))
            i += n
        else:
            i += 1
    return spans


def prefill_step(spans: Sequence[tuple[int, int]], n: int, step: int = 2048) -> int:
    """A prefill chunk size whose boundaries (its multiples, within the ``n - 1`` tokens
    mlx-lm evaluates before the last) cut no span: the largest up to ``step``, else the
    smallest above it."""
    inside = [(a, b) for a, b in spans if b > 0 and a < n - 1]

    def whole(size: int) -> bool:
        return all(not any(a < k < b for k in range(size, n - 1, size)) for a, b in inside)

    for size in [*range(step, 0, -1), *range(step + 1, n)]:
        if whole(size):
            return size
    return max(n, 1)


def _generation_config(path: Path) -> dict[str, float]:
    """The model's own recommended sampling (generation_config.json), where it ships one."""
    try:
        config = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    return {ours: config[k] for k, ours in keys.items()
            if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}


def _chat_template(path: Path, tok) -> str:
    """The folder's own chat template (chat_template.jinja, or tokenizer_config.json's)."""
    try:
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    template = getattr(tok, "chat_template", None)
    return template if isinstance(template, str) else ""


class MLXBackend(BackendBase):
    """An mlx-lm model with one prompt cache that persists between calls."""

    name = "mlx"

    def __init__(self, resolved, *, n_ctx: int | None = None, threads: int | None = None,
                 image_tokens: int | None = None, verbose: bool = False, **_ignored):
        if mx is None:
            raise missing_extra("mlx-lm", "mlx")
        path = Path(resolved.path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read {path / 'config.json'}: {exc}") from None
        arch = architecture_of(config.get("model_type"))
        if arch is None:
            raise BackendError(f"{path.name} is a {config.get('model_type')!r} model, not Gemma")
        text = config.get("text_config", config)
        n_ctx_train = int(text.get("max_position_embeddings") or base.DEFAULT_MAX_CTX)
        n_ctx = base.context_size(n_ctx, n_ctx_train, "MLX")
        try:
            self._model, self._tok = mlx_load(str(path),
                                              model_config=legacy_config_keys(config) or None)
        except Exception as exc:  # noqa: BLE001 - mlx-lm raises many kinds on a bad folder
            raise BackendError(f"mlx-lm could not load {path.name}: {exc}") from None
        if arch == "gemma2":
            add_gemma2_sliding_window(self._model, int(text.get("sliding_window") or 4096))
        if GEMMA[arch].sliding_window_pattern:  # their masks take the window, not the size
            add_window_slack(self._model)
        if config.get("quantization") and mx.default_device().type == mx.cpu:
            # MLX's CPU kernels for quantized matrix products are slow and lose accuracy with
            # bfloat16 activations (Gemma 3 270M, 8-bit: mean KL to llama.cpp 0.09 in bf16,
            # 0.008 in f32, and 7x faster). The packed weights stay as they are; only scales,
            # biases and norms become float32. GPUs keep the model's own dtype.
            self._model.set_dtype(mx.float32)
        materialize(self._model)
        from .mlx_vision import load_encoders
        from .mtmd import image_budget

        self._vision = load_encoders(path, config, image_budget(image_tokens))
        if getattr(self._vision, "bidirectional", False):
            add_picture_attention(self._model, arch)
        self._media: dict[int, tuple[object, int]] = {}  # key -> (media, n_tokens)
        self._n_ctx = n_ctx
        self._cache = make_prompt_cache(self._model)
        self._cached: list[int] = []
        self._grammar_tokenizer = None
        tok = self._tok
        self._vocab_size = int(text.get("vocab_size") or len(tok.get_vocab()))
        eot = tok.convert_tokens_to_ids(GEMMA[arch].end_of_turn)
        self._eot = eot if isinstance(eot, int) and eot != tok.unk_token_id else None
        self._eos = {int(t) for t in (tok.eos_token_ids or [])} | {int(tok.eos_token_id)}
        quant = config.get("quantization") or {}
        quantization = (f"{quant['bits']}-bit, group {quant.get('group_size', 64)}"
                        if "bits" in quant else str(config.get("torch_dtype", "unquantized")))
        n_params = sum(v.size for _, v in tree_flatten(self._model.parameters()))
        self.info = ModelInfo(
            name=resolved.name, path=path, backend=self.name, architecture=arch,
            quantization=quantization, n_ctx=n_ctx, n_ctx_train=n_ctx_train,
            n_vocab=self._vocab_size, n_params=int(n_params),
            instruction_tuned=resolved.instruction_tuned, bos_id=int(tok.bos_token_id),
            eos_id=int(tok.eos_token_id), end_of_turn_id=self._eot,
            device=str(mx.default_device()).split("(")[-1].split(",")[0].strip().lower(),
            threads=None, gpu_layers=0, sampling_defaults=_generation_config(path),
            chat_template=_chat_template(path, tok),
            media=self._vision.kinds if self._vision is not None else ())

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        if not text:
            return []
        return list(self._tok.encode(text, add_special_tokens=False,
                                     split_special_tokens=not special))

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=not special)

    # -- pictures and sound (mlx-vlm's encoders: gemma_chat.backends.mlx_vision) -------------

    def media_ids(self, media) -> list[int]:
        if self._vision is None or media.kind not in self._vision.kinds:
            raise base.cannot_take(self.info, media)
        before, n, after = self._vision.wrap(media)
        key = base.media_key(media.sha256, n)
        self._media[key] = (media, n)
        return [*before, *[key] * n, *after]

    def knows_media(self, token: int) -> bool:
        return token in self._media

    def _embeddings(self, ids: Sequence[int]):
        """Input embeddings for ``ids``: the tokens' own, and each picture's features in its
        places."""
        keys = [t for t in dict.fromkeys(ids) if t < 0]
        tokens = mx.array([max(t, 0) for t in ids])
        embed = self._model.language_model.model.embed_tokens \
            if hasattr(self._model, "language_model") else self._model.model.embed_tokens
        out = embed(tokens)
        positions = np.asarray(ids)
        for key in keys:
            features = self._vision.encode(self._media[key][0]).astype(out.dtype)
            where = np.nonzero(positions == key)[0]
            n = len(features)
            for start in where[::n]:  # the same picture twice in a row: each whole
                out[int(start):int(start) + n] = features
        return out

    def _picture_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """[start, end) of each picture in ``ids``, where its tokens see each other."""
        if not getattr(self._vision, "bidirectional", False):
            return []
        pictures = {k for k, (m, _) in self._media.items() if m.kind == "image"}
        return media_spans(ids, {k: n for k, (_, n) in self._media.items() if k in pictures})

    # -- the prompt cache -------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._cached)

    def trim_cache(self, n_tokens: int) -> str:
        n_tokens = max(0, min(n_tokens, len(self._cached)))
        drop = len(self._cached) - n_tokens
        note = ""
        if drop and n_tokens and not _trimmable(self._cache, drop):
            note = (f"re-evaluated the prompt: rolling back {drop} tokens goes past what the "
                    "sliding-window cache still holds")
            n_tokens = 0
        if n_tokens == 0:
            self._cache = make_prompt_cache(self._model)
        elif drop:
            _trim(self._cache, drop)
        self._cached = self._cached[:n_tokens]
        return note

    # mlx writes and reads safetensors by file extension: the state files get one on disk
    # only for the moment mlx needs it.

    def save_state(self, path: Path) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        written = Path(str(path) + ".safetensors")
        save_prompt_cache(str(written), self._cache, {"tokens": json.dumps(self._cached)})
        os.replace(written, path)

    def load_state(self, path: Path) -> list[int]:
        from mlx_lm.models.cache import load_prompt_cache

        with tempfile.TemporaryDirectory() as tmp:
            link = Path(tmp) / "state.safetensors"
            link.symlink_to(Path(path).resolve())
            try:
                cache, meta = load_prompt_cache(str(link), return_metadata=True)
            except Exception as exc:  # noqa: BLE001
                raise BackendError(f"{path} is not a prompt cache of this model: {exc}") \
                    from None
        self._cache, self._cached = cache, json.loads(meta.get("tokens", "[]"))
        return list(self._cached)

    # -- generation -------------------------------------------------------------------------

    def stream(self, prompt: Prompt, sampling: SamplingParams, *, ignore_eos: bool = False,
               logit_bias: Mapping[int, float] | None = None,
               stop_ids: Sequence[int] | None = None,
               cancel: threading.Event | None = None, constraint=None) -> Iterator[Chunk]:
        ids = base.checked_prompt(self, prompt)
        stops = base.stop_set((*self._eos, self._eot), stop_ids, ignore_eos)
        return self._generate(ids, sampling, stops, logit_bias, cancel or threading.Event(),
                              constraint)

    def _generate(self, ids, sp, stops, logit_bias, cancel, constraint) -> Iterator[Chunk]:
        t_start = time.perf_counter()
        lcp = base.common_prefix(self._cached, ids)
        lcp = min(lcp, len(ids) - 1)  # at least one token to evaluate, for fresh logits
        if self._media:  # a cache is never cut inside a picture
            lcp = base.media_start(ids, lcp, {k: n for k, (_, n) in self._media.items()})
        note = self.trim_cache(lcp)
        reused = len(self._cached)
        stats = Stats(prompt_tokens=len(ids), prompt_eval_tokens=len(ids) - reused,
                      cache_note=note)
        sampler, processors = sampling_functions(sp, logit_bias, constraint)
        stats.sampler = base.describe_sampler(sp, logit_bias)
        room = self._n_ctx - len(ids)
        limit = min(sp.max_tokens or room, room)
        detok = self._tok.detokenizer
        detok.reset()
        sampled: list[int] = []
        t_first = None
        rest = ids[reused:]
        media = {}
        if min(rest) < 0:
            # Token 0 (padding) where a medium is: Gemma 4's per-layer inputs take it there.
            media["input_embeddings"] = self._embeddings(rest)
            spans = self._picture_spans(ids)
            set_picture_spans(self._model, spans)
            media["prefill_step_size"] = prefill_step([(a - reused, b - reused)
                                                       for a, b in spans], len(rest))
        steps = generate_step(mx.array([max(t, 0) for t in rest]), self._model,
                              max_tokens=limit, sampler=sampler, logits_processors=processors,
                              prompt_cache=self._cache, **media)
        stats.stop_reason = "length"
        try:
            for token, _ in steps:
                token = int(token)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = stats.prefill_s = t_first - t_start
                    set_picture_spans(self._model, [])
                sampled.append(token)
                if token in stops:
                    stats.stop_reason, stats.stop_token = "stop", token
                    break
                stats.token_ids.append(token)
                detok.add_token(token)
                yield Chunk(detok.last_segment, (token,))
                if cancel.is_set():
                    stats.stop_reason = "cancelled"
                    break
                if len(stats.token_ids) >= limit:
                    stats.stop_reason = "length" if limit < room else "context"
                    break
        finally:
            steps.close()
            set_picture_spans(self._model, [])
            # generate_step feeds each sampled token ahead of time: the cache holds exactly
            # `offset` positions of prompt + sampled tokens.
            offset = max(getattr(c, "offset", 0) for c in self._cache)
            self._cached = (ids + sampled)[:offset]
        stats.generated_tokens = len(stats.token_ids)
        if t_first is not None:
            stats.decode_s = time.perf_counter() - t_first
        detok.finalize()
        yield Chunk(detok.last_segment, (), stats)

    def close(self) -> None:
        self._model = None
        self._cache = None

    # -- what parallel slots share (gemma_chat.backends.mlx_slots) ---------------------------

    @property
    def model(self):
        return self._model

    @property
    def end_of_generation(self) -> set[int]:
        return {*self._eos, *([self._eot] if self._eot is not None else [])}

    def grammar_tokenizer(self):
        """This tokenizer for llguidance (structured output), made once."""
        if self._grammar_tokenizer is None:
            from llguidance.hf import from_tokenizer

            self._grammar_tokenizer = from_tokenizer(
                self._tok._tokenizer, n_vocab=self._vocab_size,
                eos_token=sorted(self.end_of_generation))
        return self._grammar_tokenizer

    def detokenizer(self) -> StreamingText:
        return StreamingText(self._tok.detokenizer)


def materialize(model) -> None:
    """Compute every array of ``model`` now, in this thread, the private ones too (Gemma 4's
    proportional RoPE keeps its frequencies lazy): MLX streams belong to a thread, and an
    array left lazy here cannot be computed in a server's generation thread later."""
    arrays: list = []
    seen: set[int] = set()

    def walk(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        if isinstance(obj, dict):
            values += list(obj.values())
        elif isinstance(obj, (list, tuple)):
            values += list(obj)
        for value in values:
            if isinstance(value, mx.array):
                arrays.append(value)
            elif hasattr(value, "__dict__") or isinstance(value, (dict, list, tuple)):
                walk(value)

    walk(model)
    mx.eval(arrays)


class StreamingText:
    """mlx-lm's streaming detokenizer with the push/flush interface of llama.cpp's."""

    def __init__(self, detok):
        self._detok = detok

    def push(self, token: int) -> str:
        self._detok.add_token(token)
        return self._detok.last_segment

    def flush(self) -> str:
        self._detok.finalize()
        return self._detok.last_segment


def sampling_functions(sp: SamplingParams, logit_bias: Mapping[int, float] | None = None,
                       constraint=None):
    """The sampler and mlx-lm logits processors for ``sp`` (and structured output's
    ``constraint``, a :class:`~gemma_chat.structured.JsonConstraint`).

    The sampler draws from a random key of its own (``sp.seed``, else a fresh one), never from
    MLX's global random state: requests decoded together each keep their own sequence of
    draws, and no thread leaves the global state behind. (mlx-lm's samplers are compiled
    against the global state; used from a worker thread, that state makes the process abort
    at exit, now and then, with "terminate called without an active exception".) The filters
    are mlx-lm's, in its order: top-p, min-p, top-k, then the temperature.
    """
    processors = make_logits_processors(
        logit_bias=dict(logit_bias) if logit_bias else None,
        repetition_penalty=sp.repeat_penalty if sp.repeat_penalty != 1.0 else None,
        repetition_context_size=sp.repeat_last_n)
    if constraint is not None:
        processors.append(grammar_processor(constraint.matcher()))
    if sp.greedy:
        return (lambda logprobs: mx.argmax(logprobs, axis=-1)), processors
    filters = []
    if 0 < sp.top_p < 1:
        filters.append(lambda x: _top_p(x, sp.top_p))
    if sp.min_p > 0:
        filters.append(lambda x: _min_p(x, sp.min_p))
    if sp.top_k > 0:
        filters.append(lambda x: _top_k(x, sp.top_k))
    key = mx.random.key(sp.seed if sp.seed is not None else random.SystemRandom().getrandbits(63))

    def sampler(logprobs):
        nonlocal key
        for keep in filters:
            logprobs = keep(logprobs)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / sp.temperature), key=draw)

    return sampler, processors


def grammar_processor(matcher):
    """A logits processor that allows only the tokens ``matcher`` allows next. mlx-lm calls a
    processor with every token so far: from the second call on, the last one is the token
    just sampled, which the matcher takes first."""
    started = False

    def processor(tokens, logits):
        nonlocal started
        if started:
            matcher.accept(int(tokens[-1]))
        started = True
        allowed = matcher.allowed()
        if allowed is None:  # a triggered grammar, not triggered yet: free text
            return logits
        return mx.where(mx.array(allowed[:logits.shape[-1]]), logits, -mx.inf)

    return processor


def _top_k(logprobs, k: int):
    if k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k:-k + 1] if k > 1 else \
        mx.max(logprobs, axis=-1, keepdims=True)
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def _top_p(logprobs, p: float):
    """Keep the most likely tokens whose probabilities sum to ``p`` (the first always)."""
    ranked = mx.sort(logprobs, axis=-1)[..., ::-1]
    before = mx.cumsum(mx.exp(ranked), axis=-1) - mx.exp(ranked)  # mass ahead of each
    floor = mx.min(mx.where(before < p, ranked, mx.inf), axis=-1, keepdims=True)
    return mx.where(logprobs >= floor, logprobs, -mx.inf)


def _min_p(logprobs, m: float):
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(m)
    return mx.where(logprobs >= floor, logprobs, -mx.inf)
