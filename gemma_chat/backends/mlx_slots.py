"""Parallel slots on MLX: several conversations decoded together with mlx-lm's continuous
batching (``BatchGenerator``), for ``gemma serve --parallel N`` on an MLX model.

    engine = MlxSlotEngine(backend, n_slots=4)       # a loaded MLXBackend
    for chunk in engine.stream(ids, sampling, cancel=event):
        ...                                          # the same Chunks as backend.stream

One engine thread drives the batch: each step decodes one token for every generating request
and evaluates up to :data:`PREFILL_CHUNK` tokens of each waiting prompt (mlx-lm's chunked
prefill). Each request keeps its own sampler and logits processors.

Prefix reuse: a finished (or cancelled) request leaves its KV cache parked with its tokens; a
new request takes the parked cache sharing the longest prefix with its prompt, trimmed to that
prefix, and evaluates only the rest. Parked and running caches together are at most
``n_slots``, so memory stays what N slots of ``n_ctx`` tokens need. The sliding-window caches
keep the window slack of :mod:`gemma_chat.backends.mlx` and its rule for what can be trimmed.

Seeds: a batch computes each row with other matrix shapes than one sequence alone, and the
last bits differ, so a sampled token can differ too. A request with a seed therefore runs in a
batch of its own (still stepped beside the others) and draws from its own random key: the same
seed gives the same text alone or beside any other requests. Requests without a seed share the
batch and its throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import BackendError
from .batching import DEFAULT_MAX_QUEUE, PREFILL_CHUNK, BatchingEngine, Request, Run, continues
from .mlx import _trim, _trimmable, sampling_functions

try:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, StopSequences
    from mlx_lm.models.cache import make_prompt_cache
except ImportError:  # pragma: no cover - exercised where the extra is missing
    mx = None


@dataclass(eq=False)
class _Active:
    run: Run
    lane: object  # the BatchGenerator it runs in
    uid: int
    own_lane: bool  # a seeded request's batch of one


@dataclass(eq=False)
class _Parked:
    tokens: list[int]  # what the cache holds
    cache: list
    last_used: float


class MlxSlotEngine(BatchingEngine):
    """``n_slots`` requests of an MLX model decoded together; see the module docstring."""

    takes_media = False  # mlx-lm's batches take token ids only

    # A thread that has sampled with MLX and ends while the interpreter exits makes the process
    # abort ("terminate called without an active exception": MLX tears down its per-thread
    # state and needs the GIL then): the engine thread stays until the process ends.
    _park_thread = True

    def __init__(self, backend, n_slots: int, *, n_ctx: int | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefill_chunk: int = PREFILL_CHUNK):
        if mx is None:
            raise BackendError("parallel slots need mlx-lm")
        super().__init__(backend, n_slots, n_ctx=n_ctx, max_queue=max_queue)
        self._model = backend.model
        self._layout = make_prompt_cache(self._model)  # each layer's cache, for parked ones
        unmergeable = {type(c).__name__ for c in self._layout if not hasattr(c, "merge")}
        if unmergeable:
            raise BackendError(f"mlx-lm cannot batch this model's caches "
                               f"({', '.join(sorted(unmergeable))})")
        self._prefill_chunk = prefill_chunk
        self._shared = self._lane()
        self._active: list[_Active] = []
        self._parked: list[_Parked] = []
        self._thread.start()

    def _lane(self):
        return BatchGenerator(self._model, completion_batch_size=self.n_slots,
                              prefill_batch_size=self.n_slots,
                              prefill_step_size=self._prefill_chunk)

    def _running(self):
        return (a.run.request for a in self._active)

    def _free(self) -> None:
        self._shared.close()
        self._active, self._parked = [], []

    def _fail(self, exc: BaseException) -> None:
        for active in list(self._active):
            active.run.request.out.put(exc)
            self._leave(active, park=False)

    # -- taking a slot --------------------------------------------------------------------------

    def _admit(self, request: Request) -> bool:
        if len(self._active) >= self.n_slots:
            return False
        ids = request.prompt
        sp = request.sampling
        own = sp.seed is not None
        # A seeded request starts from a fresh cache: logits after a reused prefix differ in
        # the last bits from those of the whole prompt, and so could its tokens.
        cache, keep, note = self._reuse(ids) if not own else (None, 0, "")
        while self._parked and len(self._parked) + len(self._active) >= self.n_slots:
            self._parked.remove(min(self._parked, key=lambda p: p.last_used))
        sampler, processors = sampling_functions(sp, request.logit_bias, request.constraint)
        room = self.n_ctx - len(ids)
        lane = self._lane() if own else self._shared
        (uid,) = lane.insert(
            [ids[keep:]], max_tokens=[min(sp.max_tokens or room, room)], caches=[cache],
            all_tokens=[ids[:keep]], samplers=[sampler], logits_processors=[processors],
            stop_sequences=[StopSequences([[t] for t in request.stops] or None)])
        run = Run(request, self.new_stats(request, keep, note), self.backend.detokenizer())
        self._active.append(_Active(run, lane, uid, own))
        return True

    def _reuse(self, ids: list[int]) -> tuple[list | None, int, str]:
        """The parked cache sharing the longest prefix with ``ids``, trimmed to it (None: a
        fresh one), how many tokens of ``ids`` it holds, and a note when it could not be
        used."""
        if not self._parked:
            return None, 0, ""
        best = max(self._parked, key=lambda p: (continues(p.tokens, ids), p.last_used))
        keep = min(continues(best.tokens, ids), len(ids) - 1)  # >= 1 token to evaluate
        if keep <= 0:  # no parked cache that this request continues: leave them all be
            return None, 0, ""
        self._parked.remove(best)
        drop = len(best.tokens) - keep
        if drop and not _trimmable(best.cache, drop):
            return None, 0, ("re-evaluated the prompt: the sliding-window cache no longer "
                             "holds the shared prefix")
        if drop:
            _trim(best.cache, drop)
        return best.cache, keep, ""

    # -- the engine thread ----------------------------------------------------------------------

    def _step(self) -> None:
        for active in list(self._active):
            if active.run.request.cancel.is_set():
                self._leave(active)
                active.run.finish("cancelled")
        lanes = {id(a.lane): a.lane for a in self._active}
        for lane in lanes.values():
            _, responses = lane.next()
            for response in responses:
                self._take(lane, response)

    def _take(self, lane, response) -> None:
        active = next((a for a in self._active if a.lane is lane and a.uid == response.uid),
                      None)
        if active is None:
            return
        run = active.run
        reason = run.take(int(response.token))
        if reason is None and response.finish_reason is not None:
            reason = "context"  # the slot's room, the only limit not checked by take()
        if reason is None:
            return
        if response.finish_reason is not None:  # mlx-lm handed its cache back already
            self._leave(active, (response.prompt_cache, response.all_tokens))
        else:
            self._leave(active)
        run.finish(reason)

    def _leave(self, active: _Active, cache=None, *, park: bool = True) -> None:
        """Take ``active`` out of its batch, its cache parked for prefix reuse."""
        self._active.remove(active)
        if cache is None:
            cache = active.lane.remove([active.uid], return_prompt_caches=True).get(active.uid)
        if active.own_lane:
            active.lane.close()
        if park and cache is not None and cache[0] is not None and cache[1]:
            self._parked.append(_Parked(list(cache[1]), self._restore(cache[0]),
                                        time.perf_counter()))
        self._released()

    def _restore(self, cache: list) -> list:
        """Caches out of a batch are plain mlx-lm caches: give the sliding-window ones back
        their window and the position of their oldest entry (see backends.mlx)."""
        for c, layout in zip(cache, self._layout):
            window = getattr(layout, "window", None)
            if window is not None and getattr(c, "window", None) is None:
                c.window = window
                c.first = c.offset - (c.keys.shape[2] if c.keys is not None else 0)
        return cache
