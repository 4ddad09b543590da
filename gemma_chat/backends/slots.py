"""Parallel slots on llama.cpp: several conversations decoded together, one ``llama_decode``
a step, for ``gemma serve --parallel N``.

    engine = SlotEngine(backend, n_slots=4)          # a loaded LlamaCppBackend
    for chunk in engine.stream(ids, sampling, cancel=event):
        ...                                          # the same Chunks as backend.stream

One llama.cpp context holds ``n_slots`` sequences in one KV pool (llama.cpp's unified cache).
A single engine thread runs the steps; each step builds one batch that carries one token for
every generating sequence plus a chunk of each waiting prompt (chunked prefill: a long prompt
does not stall the others), decodes it, and samples every sequence that asked for logits with
its own sampler chain (its own parameters and seed); a request with a seed gives the same text
alone or beside others (see :data:`EXACT_ROWS`). This is what llama-server does with
``--parallel N``: generation on a CPU or laptop GPU is bound by reading the weights, so one
step for 8 sequences costs far less than 8 steps.

A finished slot keeps its cells. A new request goes to the free slot whose cached tokens share
the longest prefix with its prompt (else the least recently used one), and evaluates only the
rest; a sliding-window cache that no longer holds what the shared prefix needs is emptied and
the prompt evaluated in full. Requests beyond the slots wait in a bounded queue; a full queue
refuses at once (:class:`QueueFull`). A cancelled request leaves its slot within one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import BackendError
from . import base
from .batching import (
    DEFAULT_MAX_QUEUE,
    PREFILL_CHUNK,
    BatchingEngine,
    QueueFull,
    Request,
    Run,
    continues,
)

try:
    import llama_cpp
except ImportError:  # pragma: no cover - exercised where the extra is missing
    llama_cpp = None

__all__ = ["EXACT_ROWS", "PREFILL_CHUNK", "QueueFull", "SlotEngine"]

#: Generating tokens per decode call for reproducible requests. llama.cpp's repacked CPU
#: kernels compute rows in groups of four with another kernel than the rest, and the two
#: differ in the last bits: a sequence decoded beside 3 or more others would not give the
#: tokens it gives alone. With at most 3 rows a call (and each prompt chunk in a call of its
#: own), every row takes the path it takes alone; it costs throughput (59 -> 36 tokens/s for 8
#: sequences of the 270M on 2 cores), so only requests with a seed (or greedy) pay it.
EXACT_ROWS = 3


@dataclass(eq=False)
class _Slot:
    seq: int
    cells: list[int] = field(default_factory=list)  # the tokens whose K/V the cache holds
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    run: Run | None = None
    chain: object = None  # llama.cpp sampler chain, or None for plain greedy
    next_token: int = -1  # sampled, not yet evaluated
    last_used: float = 0.0

    @property
    def request(self) -> Request | None:
        return self.run.request if self.run is not None else None


class SlotEngine(BatchingEngine):
    """``n_slots`` sequences of a llama.cpp model in one context; see the module docstring."""

    def __init__(self, backend, n_slots: int, *, n_ctx: int | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, n_batch: int = 512):
        if llama_cpp is None:
            raise BackendError("parallel slots need llama-cpp-python")
        super().__init__(backend, n_slots, n_ctx=n_ctx, max_queue=max_queue)
        info = backend.info
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * n_slots
        # A picture is decoded in one ubatch: as large as the backend's own context has.
        params.n_batch = params.n_ubatch = max(n_batch, backend.media_ubatch)
        params.n_seq_max = n_slots
        params.n_threads = params.n_threads_batch = info.threads or 1
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = True
        params.swa_full = False
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(backend.model_pointer, params)
        if not self._ctx:
            raise BackendError(f"llama.cpp could not make a context of {params.n_ctx} tokens "
                               f"for {n_slots} slots")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._n_swa = backend.sliding_window
        self._n_vocab = info.n_vocab
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._slots = [_Slot(seq=i) for i in range(n_slots)]
        self._thread.start()

    def _running(self):
        return (s.request for s in self._slots if s.run is not None)

    def _free(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        for slot in self._slots:
            self._free_chain(slot)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None

    def _fail(self, exc: BaseException) -> None:
        for slot in self._slots:
            if slot.run is not None:
                slot.request.out.put(exc)
                self._release(slot)

    # -- the engine thread ----------------------------------------------------------------------

    def _admit(self, request: Request) -> bool:
        slot = self._pick(request.prompt)
        if slot is None:
            return False
        self._assign(slot, request)
        return True

    def _pick(self, prompt: list[int]) -> _Slot | None:
        """The free slot whose cache ``prompt`` continues (:func:`continues`), else the least
        recently used free one (an empty one first)."""
        free = [s for s in self._slots if s.run is None]
        if not free:
            return None
        return max(free, key=lambda s: (continues(s.cells, prompt), -s.last_used))

    def _assign(self, slot: _Slot, request: Request) -> None:
        ids = request.prompt
        keep = min(base.common_prefix(slot.cells, ids), len(ids) - 1)  # >= 1 token evaluated
        if keep and min(ids) < 0:  # never cut a picture in two
            keep = base.media_start(ids, keep, self.backend.media_lengths())
        note = ""
        if keep > 0 and self._n_swa:
            # A sliding-window cache holds only the last window of positions: continuing at
            # ``keep`` needs positions [keep - window, keep) still there.
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq)
            if pos_min > max(0, keep - self._n_swa):
                note = (f"re-evaluated the prompt: the {self._n_swa}-token sliding-window "
                        "cache no longer holds the shared prefix")
                keep = 0
        if keep == 0 or not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            keep = 0
        slot.cells, slot.todo = ids[:keep], ids[keep:]
        slot.run = Run(request, self.new_stats(request, keep, note), self.backend.detokenizer())
        if request.constraint is not None:
            slot.run.matcher = request.constraint.matcher()
        slot.chain = self.backend.sampler_chain(request.sampling, request.logit_bias, ids)

    @staticmethod
    def _exact(slot: _Slot) -> bool:
        """A request with a seed (or greedy) is reproducible: see :data:`EXACT_ROWS`."""
        sampling = slot.request.sampling
        return sampling.seed is not None or sampling.greedy

    def _step(self) -> None:
        """One step: a token for each generating slot, and prompt chunks in what is left of
        the batch. Reproducible requests (:meth:`_exact`) get decode calls of their own: each
        prompt chunk alone, generating tokens at most :data:`EXACT_ROWS` to a call."""
        for slot in self._slots:
            if slot.request is not None and slot.request.cancel.is_set():
                self._finish(slot, "cancelled")
        active = [s for s in self._slots if s.request is not None]
        shared: list[tuple[_Slot, list[int], bool]] = []  # (slot, tokens, wants logits)
        exact_tokens: list[tuple[_Slot, list[int], bool]] = []
        calls: list[list[tuple[_Slot, list[int], bool]]] = []
        room = self._n_batch
        for slot in active:
            if not slot.todo:
                if self._exact(slot):
                    exact_tokens.append((slot, [slot.next_token], True))
                else:
                    shared.append((slot, [slot.next_token], True))
                    room -= 1
        for slot in active:
            while slot.todo and slot.todo[0] < 0:  # a picture or clip: through its projector
                self._decode_media(slot)
            if slot.todo:
                exact = self._exact(slot)
                take = slot.todo[:min(self._n_batch if exact else room, PREFILL_CHUNK)]
                if min(take) < 0:  # up to the next medium
                    take = take[:next(k for k, t in enumerate(take) if t < 0)]
                if not take:
                    continue
                entry = (slot, take, len(take) == len(slot.todo))
                if exact:
                    calls.append([entry])
                else:
                    shared.append(entry)
                    room -= len(take)
        if shared:
            calls.insert(0, shared)
        calls += [exact_tokens[k:k + EXACT_ROWS]
                  for k in range(0, len(exact_tokens), EXACT_ROWS)]
        for plan in calls:
            self._decode(plan)

    def _decode(self, plan: list[tuple[_Slot, list[int], bool]]) -> None:
        batch = self._batch
        batch.n_tokens = 0
        rows: list[tuple[_Slot, int]] = []
        for slot, tokens, wants in plan:
            start = len(slot.cells)
            for k, token in enumerate(tokens):
                i = batch.n_tokens
                last = wants and k == len(tokens) - 1
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + k, 1
                batch.seq_id[i][0], batch.logits[i] = slot.seq, last
                batch.n_tokens = i + 1
                if last:
                    rows.append((slot, i))
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp could not decode a batch of {batch.n_tokens} tokens "
                               f"(llama_decode returned {rc})")
        for slot, tokens, _ in plan:
            slot.cells.extend(tokens)
            if slot.todo:
                slot.todo = slot.todo[len(tokens):]
        for slot, i in rows:
            self._sample(slot, i)

    def _decode_media(self, slot: _Slot) -> None:
        """Decode the medium at the head of the slot's prompt, in a call of its own."""
        key = slot.todo[0]
        start = len(slot.cells)
        end = self.backend.evaluate_media(self._ctx, key, start, slot.seq)
        slot.cells.extend([key] * (end - start))
        slot.todo = slot.todo[end - start:]

    def _sample(self, slot: _Slot, i: int) -> None:
        if slot.run.matcher is not None:  # structured output: only what keeps it valid
            logits = llama_cpp.llama_get_logits_ith(self._ctx, i)
            slot.run.matcher.mask(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)))
        if slot.chain is not None:
            token = llama_cpp.llama_sampler_sample(slot.chain.sampler, self._ctx, i)
        else:
            logits = llama_cpp.llama_get_logits_ith(self._ctx, i)
            token = int(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())
        reason = slot.run.take(token)
        if reason is None and len(slot.cells) + 1 >= self.n_ctx:
            reason = "context"
        if reason is not None:
            self._finish(slot, reason)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, reason: str) -> None:
        run = slot.run
        self._release(slot)
        run.finish(reason)

    def _release(self, slot: _Slot) -> None:
        """Free the slot; its cells stay for the next request that shares their prefix."""
        if slot.todo:  # cancelled mid-prompt: the cache holds only what was evaluated
            slot.todo = []
        self._free_chain(slot)
        slot.run, slot.last_used = None, time.perf_counter()
        self._released()

    @staticmethod
    def _free_chain(slot: _Slot) -> None:
        if slot.chain is not None:
            slot.chain.close()
            slot.chain = None
