"""The llama.cpp backend, on llama-cpp-python: GGUF models on CPU, CUDA or Metal.

We drive the token loop ourselves (``Llama.eval`` + a llama.cpp sampler chain) instead of
``create_completion``, which re-detokenizes the whole reply after every token, and never set
``logits_all`` (it allocates n_ctx x 262k floats). Text is produced by an incremental
detokenizer: each token's bytes go through an incremental UTF-8 decoder, so a character split
across byte-fallback tokens is held back until it is complete.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import memory
from ..errors import BackendError, InvalidArgument, missing_extra
from ..family import GEMMA
from ..gguf_file import check_gemma, read_gguf
from . import base, repack
from .base import BackendBase, Chunk, ModelInfo, Prompt, SamplingParams, Stats

_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed
MAX_THREADS = 512  # GGML_MAX_N_THREADS: more aborts llama.cpp
_SAVED_PROMPTS = 8  # prompts whose final logits are kept for an exact re-run

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError:  # pragma: no cover - exercised where the extra is missing
    llama_cpp = None


def default_threads() -> int:
    """Every core this process may run on (llama-cpp-python's own default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _quiet_logs(verbose: bool) -> None:
    """Route llama.cpp's log lines to stderr only when verbose (``GEMMA_DEBUG`` or ``-v``)."""

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001
        if verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    # Never freed: llama.cpp (and its vision code, which copies the logger) hold raw pointers.
    _KEPT_CALLBACKS.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


_KEPT_CALLBACKS: list = []


def _sampling_from_metadata(meta: Mapping[str, object]) -> dict[str, float]:
    """A GGUF's own recommended sampling (``general.sampling.*``), where it ships one."""
    keys = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
            "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p"}
    return {ours: meta[k] for k, ours in keys.items() if isinstance(meta.get(k), (int, float))}


class IncrementalDetokenizer:
    """Token ids in, text out, O(1) per token: bytes of a multi-byte UTF-8 character split
    across tokens are held back until the character is complete."""

    def __init__(self, piece):
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class LlamaCppBackend(BackendBase):
    """A GGUF model loaded in llama.cpp, with one sequence whose KV cache persists."""

    name = "llama.cpp"

    def __init__(
        self,
        resolved,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        n_batch: int = 512,
        flash_attn: bool = True,
        swa_full: bool = False,
        image_tokens: int | None = None,
        verbose: bool = False,
    ):
        if llama_cpp is None:
            raise missing_extra("llama-cpp-python", "llama")
        self.resolved = resolved
        path = Path(resolved.path)
        gguf = check_gemma(read_gguf(path))  # refuse bad files before llama.cpp can abort
        n_ctx_train = gguf.context_length or base.DEFAULT_MAX_CTX
        context_note = ""
        default = None
        if n_ctx is None:
            shape, arch = memory.shape_from_gguf(gguf)
            default, context_note = memory.default_context(shape, arch, gguf.file_size,
                                                           n_ctx_train)
        n_ctx = base.context_size(n_ctx, n_ctx_train, "llama.cpp", default)
        if threads is not None and not 1 <= threads <= MAX_THREADS:
            raise InvalidArgument(f"invalid thread count {threads}: must be 1 to {MAX_THREADS}")
        threads = threads or default_threads()
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers is None:
            gpu_layers = -1 if offload else 0
        _quiet_logs(verbose)
        # Before llama.cpp's first load in this process: weight repacking that is safe here.
        self.repack = repack.prepare()
        self.notes = [self.repack.note] if self.repack.note else []
        from ..resolve import find_projector
        from .mtmd import MEDIA_UBATCH, image_budget, projector_kinds

        self._image_tokens = image_budget(image_tokens)
        self._projector_path = find_projector(path)
        kinds = projector_kinds(self._projector_path) if self._projector_path else ()
        if kinds:
            # A picture is decoded in one ubatch (bidirectional attention over it).
            n_batch = max(n_batch, MEDIA_UBATCH, self._image_tokens)
        self._media_kinds = kinds
        self._projector = None
        self._media: dict[int, tuple[object, int]] = {}  # key -> (media, n_tokens)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_ubatch=min(n_batch, n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=gpu_layers,
                logits_all=False,
                flash_attn=flash_attn,
                # Sliding-window layers keep only their window (llama-server's default): far
                # less memory on long contexts; a roll-back past the window re-evaluates.
                swa_full=swa_full,
                verbose=verbose,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"llama.cpp could not load {path.name}: {exc}") from None
        model = self._llm._model
        # llama.cpp pads the context it allocates; llama-cpp-python's token buffer keeps the
        # size asked for. The smaller of the two is what a sequence can really hold.
        self._n_ctx = min(self._llm.n_ctx(), len(self._llm.input_ids))
        self._vocab = model.vocab
        self._ctx = self._llm._ctx
        window = gguf.get("attention.sliding_window")
        self._n_swa = int(window) if isinstance(window, int) and not swa_full else 0
        self._n_vocab = model.n_vocab()
        self._pieces: dict[int, bytes] = {}
        # The logits at the end of the last few evaluated prompts, by length (1 MB each with
        # Gemma's vocabulary): a prompt that is wholly in the cache again (/retry after /undo,
        # a repeated request) samples its first token from them instead of re-evaluating its
        # last token alone, which a repacked-weight build computes with other kernels than the
        # batch did, so greedy output could change.
        self._prompt_logits: dict[int, np.ndarray] = {}
        eot = self.tokenize(GEMMA[gguf.architecture].end_of_turn)
        self._eot = eot[0] if len(eot) == 1 else None
        self._eos = model.token_eos()
        self._eog = self._end_of_generation(gguf)
        self._grammar_tokenizer = None
        if offload and gpu_layers != 0:
            device = "metal" if sys.platform == "darwin" else "gpu"
        else:
            device = "cpu"
        self.info = ModelInfo(
            name=resolved.name,
            path=path,
            backend=self.name,
            architecture=gguf.architecture,
            quantization=gguf.quantization,
            n_ctx=self._n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=self._n_vocab,
            n_params=model.n_params(),
            instruction_tuned=resolved.instruction_tuned,
            bos_id=model.token_bos(),
            eos_id=self._eos,
            end_of_turn_id=self._eot,
            device=device,
            threads=threads,
            gpu_layers=gpu_layers if offload else 0,
            sampling_defaults=_sampling_from_metadata(gguf.metadata),
            weight_repack=self.repack.describe(),
            chat_template=str(gguf.metadata.get("tokenizer.chat_template") or ""),
            context_note=context_note,
            media=kinds,
            projector=str(self._projector_path) if kinds else "",
        )
        self._offload = offload and gpu_layers != 0

    def _end_of_generation(self, gguf) -> set[int]:
        """The ids llama.cpp ends a generation on (``<eos>``, ``<end_of_turn>``; Gemma 4 also
        ``<turn|>`` and ``<|tool_response>``), as the model file defines them: its control
        and user-defined tokens that llama.cpp's vocabulary marks end-of-generation."""
        ends = {t for t in (self._eos, self._eot) if t is not None and t >= 0}
        if "tokenizer.ggml.token_type" in gguf.arrays:
            types = np.asarray(gguf.read_array("tokenizer.ggml.token_type"))
            is_eog = llama_cpp.llama_vocab_is_eog
            candidates = np.nonzero((types == 3) | (types == 4))[0]
            ends |= {int(t) for t in candidates if is_eog(self._vocab, int(t))}
        return ends

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        if not text:
            return []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens give b""), cached: the vocabulary is fixed."""
        cached = self._pieces.get(token)
        if cached is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
                if n >= 0:
                    cached = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = cached
        return cached

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        if special:
            raw = self._llm.detokenize(list(ids), special=True)
        else:
            raw = b"".join(self.piece(t) for t in ids)
        return raw.decode("utf-8", errors="replace")

    # -- the KV cache -----------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        return self._llm._input_ids.tolist()

    def trim_cache(self, n_tokens: int) -> str:
        """Keep the first ``n_tokens``; returns why it had to drop everything, or ""."""
        n_tokens = max(0, min(n_tokens, self._llm.n_tokens))
        note = ""
        if 0 < n_tokens < self._llm.n_tokens and self._n_swa:
            # A sliding-window cache holds only the last window of positions: continuing at
            # n_tokens needs positions [n_tokens - window, n_tokens) still there.
            memory = llama_cpp.llama_get_memory(self._ctx.ctx)
            pos_min = llama_cpp.llama_memory_seq_pos_min(memory, 0)
            if pos_min > max(0, n_tokens - self._n_swa):
                note = (f"re-evaluated the prompt: rolling back to token {n_tokens} goes past "
                        f"what the {self._n_swa}-token sliding-window cache still holds")
                n_tokens = 0
        if n_tokens == 0 or not self._ctx.kv_cache_seq_rm(-1, n_tokens, -1):
            n_tokens = 0
            self._ctx.kv_cache_clear()
        self._llm.n_tokens = n_tokens
        for n in [n for n in self._prompt_logits if n > n_tokens]:
            del self._prompt_logits[n]
        return note

    def save_state(self, path: Path) -> None:
        """Write the KV cache of sequence 0 and its token ids (llama.cpp's lean state file)."""
        ids = self.cached_tokens
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        written = llama_cpp.llama_state_seq_save_file(
            self._ctx.ctx, str(path).encode(), 0, arr, len(ids))
        if written == 0:
            raise BackendError(f"could not write the KV state to {path}")

    def load_state(self, path: Path) -> list[int]:
        cap = self._n_ctx
        arr = (llama_cpp.llama_token * cap)()
        count = ctypes.c_size_t(0)
        self._prompt_logits.clear()
        self._ctx.kv_cache_clear()
        read = llama_cpp.llama_state_seq_load_file(
            self._ctx.ctx, str(path).encode(), 0, arr, cap, ctypes.byref(count))
        if read == 0:
            self._llm.n_tokens = 0
            raise BackendError(f"{path} is not a KV state of this model and context")
        ids = list(arr[: count.value])
        self._llm.input_ids[: len(ids)] = ids
        self._llm.n_tokens = len(ids)
        return ids

    # -- what parallel slots share (gemma_chat.backends.slots) --------------------------------

    @property
    def model_pointer(self):
        """llama.cpp's model, for another context on the same weights."""
        return self._llm._model.model

    @property
    def sliding_window(self) -> int:
        """The sliding-window cache's size in positions; 0 without one (or a full-size one)."""
        return self._n_swa

    @property
    def end_of_generation(self) -> set[int]:
        return set(self._eog)

    def sampler_chain(self, sp: SamplingParams, logit_bias, history: Sequence[int]):
        """The sampler chain a generation with ``sp`` uses (None: plain greedy, an argmax)."""
        return self._sampler(sp, logit_bias, history)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.piece)

    def grammar_tokenizer(self):
        """This vocabulary for llguidance (structured output), made once (about a second)."""
        if self._grammar_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            vocab = llama_cpp.llama_model_get_vocab(self.model_pointer)
            with warnings.catch_warnings():  # it reads each token's attributes by an old name
                warnings.simplefilter("ignore", DeprecationWarning)
                self._grammar_tokenizer = lltokenizer_from_vocab(vocab,
                                                                 eos_token=sorted(self._eog))
        return self._grammar_tokenizer

    def release_context(self) -> None:
        """Free this backend's own context (its KV cache) when parallel slots take over the
        model: tokenizing still works, generating here does not."""
        self._llm._ctx.close()
        self._released = True

    # -- pictures and sound (llama.cpp's mtmd) ------------------------------------------------

    def _projector_for(self, media):
        if media.kind not in self.info.media:
            raise base.cannot_take(self.info, media)
        if self._projector is None:
            from .mtmd import Projector

            self._projector = Projector(self._projector_path, self._llm._model.model,
                                        threads=self.info.threads or 1, use_gpu=self._offload,
                                        image_tokens=self._image_tokens)
        return self._projector

    def media_ids(self, media) -> list[int]:
        piece = self._projector_for(media).piece(media)
        key = base.media_key(media.sha256, piece.n_tokens)
        self._media[key] = (media, piece.n_tokens)
        return [*piece.before, *[key] * piece.n_tokens, *piece.after]

    def knows_media(self, token: int) -> bool:
        return token in self._media

    @property
    def media_ubatch(self) -> int:
        """The ubatch a context needs for this model's pictures (0: it takes none)."""
        from .mtmd import MEDIA_UBATCH

        return max(MEDIA_UBATCH, self._image_tokens) if self._media_kinds else 0

    def media_lengths(self) -> dict[int, int]:
        """The number of positions of each medium, by its key."""
        return {key: n for key, (_, n) in self._media.items()}

    def evaluate_media(self, ctx, key: int, n_past: int, seq_id: int) -> int:
        """Decode the medium ``key`` stands for at ``n_past`` of ``seq_id`` in llama.cpp
        context ``ctx`` (this backend's, or parallel slots'); return the position after it."""
        media, _ = self._media[key]
        return self._projector.evaluate(ctx, media, n_past, seq_id,
                                        llama_cpp.llama_n_ubatch(ctx))

    def _eval_prompt(self, ids: Sequence[int]) -> None:
        """Evaluate ``ids`` after what the cache holds: runs of tokens with ``Llama.eval``, each
        medium's positions through its projector."""
        llm = self._llm
        i = 0
        while i < len(ids):
            if ids[i] >= 0:
                j = i
                while j < len(ids) and ids[j] >= 0:
                    j += 1
                llm.eval(ids[i:j])
                i = j
                continue
            start = llm.n_tokens
            end = self.evaluate_media(self._ctx.ctx, ids[i], start, 0)
            llm.input_ids[start:end] = ids[i]
            llm.n_tokens = end
            i += self._media[ids[i]][1]

    # -- generation -------------------------------------------------------------------------

    def _logits_view(self) -> np.ndarray:
        """The logits of the last evaluated position, in llama.cpp's own buffer."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _greedy_argmax(self):
        """Pure greedy decoding: the argmax of the last logits, read in place. llama.cpp's
        sampler would first copy all 262k logits into a candidate array (0.42 ms a token
        here, against 0.04 ms)."""
        get_logits, ctx, n_vocab = llama_cpp.llama_get_logits_ith, self._ctx.ctx, self._n_vocab
        as_array = np.ctypeslib.as_array

        def sample(_ctx, _idx) -> int:
            return int(as_array(get_logits(ctx, -1), shape=(n_vocab,)).argmax())

        return sample

    def _sampler(self, sp: SamplingParams, logit_bias, history: Sequence[int]):
        """llama.cpp's sampler chain for ``sp`` (None for the greedy fast path)."""
        if sp.greedy and not logit_bias and sp.repeat_penalty == 1.0:
            return None
        chain = _internals.LlamaSampler()
        if logit_bias:
            chain.add_logit_bias(self._n_vocab, dict(logit_bias))
        if sp.repeat_penalty != 1.0 and sp.repeat_last_n:
            chain.add_penalties(self._n_vocab, sp.repeat_last_n, sp.repeat_penalty, 0.0, 0.0)
            for token in history[-sp.repeat_last_n:]:
                chain.accept(token)  # the penalty window covers the prompt too
        if sp.greedy:
            chain.add_greedy()
        else:
            if sp.top_k > 0:
                chain.add_top_k(sp.top_k)
            if sp.top_p < 1.0:
                chain.add_top_p(sp.top_p, 1)
            if sp.min_p > 0.0:
                chain.add_min_p(sp.min_p, 1)
            chain.add_temp(sp.temperature)
            chain.add_dist(_RANDOM_SEED if sp.seed is None else sp.seed)
        return chain

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
        if getattr(self, "_released", False):
            raise BackendError("this model's context went to parallel slots")
        ids = base.checked_prompt(self, prompt)
        stops = base.stop_set(self._eog, stop_ids, ignore_eos)
        matcher = constraint.matcher() if constraint is not None else None
        return self._generate(ids, sampling, stops, logit_bias, cancel or threading.Event(),
                              matcher)

    def _generate(self, ids, sp, stops, logit_bias, cancel, matcher) -> Iterator[Chunk]:
        llm = self._llm
        t_start = time.perf_counter()

        # KV reuse: keep the longest common prefix with what the cache holds, and evaluate the
        # rest. At least one token is evaluated, to have fresh logits to sample from, unless
        # the logits at the end of this very prompt were kept.
        lcp = base.common_prefix(llm._input_ids.tolist(), ids)
        saved = self._prompt_logits.get(len(ids)) if lcp >= len(ids) else None
        note = ""
        if saved is not None:
            # A sliding-window cache may not roll back that far: then it is emptied (and the
            # saved logits with it), and the prompt is evaluated as usual.
            note = self.trim_cache(len(ids))
            if llm.n_tokens != len(ids):
                saved = None
        if saved is not None:
            self._logits_view()[:] = saved  # the prompt's own logits, as first computed
            reused = len(ids)
        else:
            keep = base.media_start(ids, min(lcp, len(ids) - 1), self.media_lengths()) \
                if self._media else min(lcp, len(ids) - 1)
            note = self.trim_cache(keep) or note
            reused = llm.n_tokens
        stats = Stats(prompt_tokens=len(ids), prompt_eval_tokens=len(ids) - reused,
                      cache_note=note)
        chain = self._sampler(sp, logit_bias, ids)
        stats.sampler = base.describe_sampler(sp, logit_bias)

        if reused < len(ids):
            if self._media:
                self._eval_prompt(ids[reused:])
            else:
                llm.eval(ids[reused:])
            self._prompt_logits[len(ids)] = self._logits_view().copy()
            while len(self._prompt_logits) > _SAVED_PROMPTS:
                del self._prompt_logits[next(iter(self._prompt_logits))]
        stats.prefill_s = time.perf_counter() - t_start
        detok = IncrementalDetokenizer(self.piece)
        n_ctx = self._n_ctx
        limit = sp.max_tokens
        generated = stats.token_ids
        t_first = None
        sample = chain.sample if chain is not None else self._greedy_argmax()
        push = detok.push
        try:
            while True:
                if cancel.is_set():
                    stats.stop_reason = "cancelled"
                    break
                if llm.n_tokens >= n_ctx:  # prompt + reply always fit in the context
                    stats.stop_reason = "context"
                    break
                if matcher is not None:  # structured output: only what keeps it valid
                    matcher.mask(self._logits_view())
                token = sample(self._ctx, -1)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t_start
                if token in stops:
                    stats.stop_reason, stats.stop_token = "stop", token
                    break
                generated.append(token)
                if matcher is not None:
                    matcher.accept(token)
                yield Chunk(push(token), (token,))
                if limit is not None and len(generated) >= limit:
                    stats.stop_reason = "length"
                    break
                llm.eval([token])
        finally:
            if chain is not None:
                chain.close()
        stats.generated_tokens = len(generated)
        if t_first is not None:
            stats.decode_s = time.perf_counter() - t_first
        yield Chunk(detok.flush(), (), stats)

    def close(self) -> None:
        if getattr(self, "_projector", None) is not None:
            self._projector.close()
            self._projector = None
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

