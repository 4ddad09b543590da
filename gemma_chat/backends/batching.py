"""What the parallel engines of both backends share: a bounded queue in front of N slots, one
engine thread, and the bookkeeping of one generation (first token, stop tokens, limits, stats).

    engine = SlotEngine(backend, n_slots=4)          # llama.cpp (slots.py) or MLX (mlx_slots.py)
    for chunk in engine.stream(ids, sampling, cancel=event):
        ...                                          # the same Chunks as backend.stream

A subclass says how requests take a slot (:meth:`BatchingEngine._admit`) and what one step of
the engine does (:meth:`BatchingEngine._step`); everything else (queueing, refusing when the
queue is full, cancelling, closing) is here.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import GemmaChatError
from . import base
from .base import Chunk, Prompt, SamplingParams, Stats

DEFAULT_MAX_QUEUE = 64
#: Prompt tokens one sequence may add to a step while others generate.
PREFILL_CHUNK = 256


def continues(cached: list[int], prompt: list[int]) -> int:
    """How many cached tokens a request would reuse if it took this cache, or 0 where it is
    not a continuation of it: the shared prefix must be at least half of the cache or of the
    prompt (as llama-server's prompt similarity). Else a short shared opening, such as
    ``<bos><start_of_turn>user``, would let an unrelated request wipe another conversation's
    cache while empty slots wait."""
    shared = base.common_prefix(cached, prompt)
    return shared if shared and 2 * shared >= min(len(cached), len(prompt)) else 0


class QueueFull(GemmaChatError):
    """Every slot is busy and the queue in front of them is full."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: SamplingParams
    stops: set[int]
    logit_bias: Mapping[int, float] | None
    cancel: threading.Event
    constraint: object = None  # structured output (gemma_chat.structured.JsonConstraint)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    t_submit: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Run:
    """One request being generated: what it has produced and its stats."""

    request: Request
    stats: Stats
    detok: object  # push(token) -> str, flush() -> str
    generated: list[int] = field(default_factory=list)
    t_first: float | None = None
    matcher: object = None  # where structured output stands, when the engine checks it here

    def take(self, token: int) -> str | None:
        """Record a sampled token (streamed unless it ends the generation); returns why the
        generation ends here, if it does."""
        request, stats = self.request, self.stats
        if self.t_first is None:
            self.t_first = time.perf_counter()
            stats.ttft_s = stats.prefill_s = self.t_first - request.t_submit
        if token in request.stops:
            stats.stop_token = token
            return "stop"
        self.generated.append(token)
        if self.matcher is not None:
            self.matcher.accept(token)
        request.out.put(Chunk(self.detok.push(token), (token,)))
        limit = request.sampling.max_tokens
        if limit is not None and len(self.generated) >= limit:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        """Send the last chunk, with the stats."""
        stats = self.stats
        stats.stop_reason = reason
        stats.token_ids = list(self.generated)
        stats.generated_tokens = len(self.generated)
        if self.t_first is not None:
            stats.decode_s = time.perf_counter() - self.t_first
        self.request.out.put(Chunk(self.detok.flush(), (), stats))


class BatchingEngine:
    """N slots behind a bounded queue, run by one engine thread; see the module docstring."""

    def __init__(self, backend, n_slots: int, *, n_ctx: int | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        if n_slots < 1:
            raise GemmaChatError(f"--parallel must be at least 1, not {n_slots}")
        self.backend = backend
        self.n_slots = n_slots
        self.max_queue = max_queue
        #: What one request may hold: an even share of the context, so that the slots
        #: together never need more than the whole.
        self.n_ctx = max(256, (n_ctx or backend.info.n_ctx) // n_slots)
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="gemma-slots", daemon=True)

    # -- what a subclass provides ---------------------------------------------------------------

    def _running(self) -> Iterable[Request]:
        """The requests that hold a slot."""
        raise NotImplementedError

    def _admit(self, request: Request) -> bool:
        """Give ``request`` a slot (called under the lock); False when none is free."""
        raise NotImplementedError

    def _step(self) -> None:
        """One step of every running request."""
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        """An engine failure: every running request hears of it and leaves its slot."""
        raise NotImplementedError

    def _free(self) -> None:
        """Free the engine's memory (after its thread has ended)."""

    #: Whether the engine thread, its work done, waits for the process to end instead of
    #: ending itself (see MlxSlotEngine).
    _park_thread = False
    takes_media = True  # prompts may hold pictures (their keys: gemma_chat.backends.base)

    # -- the public side ------------------------------------------------------------------------

    def stream(self, prompt: Prompt, sampling: SamplingParams, *, ignore_eos: bool = False,
               logit_bias: Mapping[int, float] | None = None,
               stop_ids: Sequence[int] | None = None,
               cancel: threading.Event | None = None, constraint=None) -> Iterator[Chunk]:
        """Queue a generation (:class:`QueueFull` when the queue is full) and yield its chunks
        as the engine produces them: the same chunks, stats last, as a backend's ``stream``."""
        ids = base.checked_prompt(self.backend, prompt)
        if not self.takes_media and min(ids) < 0:
            from ..media import MediaError

            raise MediaError("pictures on MLX are served one request at a time: start gemma "
                             "serve with --parallel 1")
        if len(ids) >= self.n_ctx:
            raise GemmaChatError(f"the prompt is {len(ids)} tokens and a slot holds "
                                 f"{self.n_ctx}")
        request = Request(ids, sampling, base.stop_set(self.backend.end_of_generation,
                                                       stop_ids, ignore_eos),
                          logit_bias, cancel or threading.Event(), constraint)
        with self._lock:
            if self._closed:
                raise GemmaChatError("the engine is closed")
            free = self.n_slots - sum(1 for _ in self._running())
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"all {self.n_slots} slots are busy and {self.max_queue} "
                                "requests are waiting")
            self._waiting.append(request)
            self._lock.notify()
        return self._read(request)

    @staticmethod
    def _read(request: Request) -> Iterator[Chunk]:
        while True:
            item = request.out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.stats is not None:
                return

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"slots": self.n_slots, "busy": sum(1 for _ in self._running()),
                    "waiting": len(self._waiting), "max_queue": self.max_queue,
                    "slot_context": self.n_ctx}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for request in (*self._waiting, *self._running()):
                request.cancel.set()
            self._lock.notify()
        if self._ended.wait(30):  # else a step that does not end: leave the memory be
            self._free()

    # -- the engine thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._run()
        finally:
            self._ended.set()
        if self._park_thread:
            threading.Event().wait()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not any(self._running()):
                    self._lock.wait()
                if self._closed and not any(self._running()):
                    for request in self._waiting:
                        self._refuse(request)
                    self._waiting.clear()
                    return
                while self._waiting:
                    request = self._waiting[0]
                    if request.cancel.is_set():
                        self._waiting.popleft()
                        self._refuse(request)
                        continue
                    if not self._admit(request):
                        break
                    self._waiting.popleft()
            try:
                self._step()
            except BaseException as exc:  # an engine failure: every request hears of it
                self._fail(exc)

    @staticmethod
    def _refuse(request: Request) -> None:
        stats = Stats(prompt_tokens=len(request.prompt), stop_reason="cancelled")
        request.out.put(Chunk("", (), stats))

    def _released(self) -> None:
        """A slot became free: the engine thread may admit a waiting request."""
        with self._lock:
            self._lock.notify()

    @staticmethod
    def new_stats(request: Request, keep: int, note: str) -> Stats:
        """The stats of a request that reuses ``keep`` cached prompt tokens."""
        return Stats(prompt_tokens=len(request.prompt),
                     prompt_eval_tokens=len(request.prompt) - keep, cache_note=note,
                     sampler=base.describe_sampler(request.sampling, request.logit_bias))
