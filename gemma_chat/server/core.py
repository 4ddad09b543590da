"""The core of ``gemma serve``: request checks, sampling from request fields, and generation
for every API (OpenAI's in :mod:`.openai`, Ollama's in :mod:`.ollama`).

Generation goes through parallel slots (:mod:`gemma_chat.backends.slots`) where the server has
them, else one request at a time in arrival order through the backend; either way the KV cache
is re-used for the longest common token prefix, a bounded queue stands in front (a full queue
answers 503), and a client that disconnects stops its generation within one token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import template
from ..backends.base import Backend, Chunk, SamplingParams, Stats
from ..errors import GemmaChatError, InvalidMessages
from ..generate import default_sampling
from ..media import MediaError
from ..prompt import PromptBuilder
from ..thinking import split_thoughts

DEFAULT_MAX_BODY = 8 * 1024 * 1024
MEDIA_MAX_BODY = 64 * 1024 * 1024  # for a model that takes pictures and sound
#: Requests that may wait for a slot (or, without slots, for the model) before a 503.
DEFAULT_MAX_QUEUE = 64
MAX_STOP_STRINGS = 4
#: Gemma's longest token is 31 characters: a prompt of more than this many characters per token
#: of context cannot fit, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 64


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers())

    def headers(self) -> dict[str, str]:
        """A full queue asks the client to come back shortly."""
        return {"Retry-After": "1"} if self.code == "queue_full" else {}


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail that could still
    become one, so a stop string is never sent in part."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop string was hit)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass(eq=False)
class Job:
    """One validated generation request, with the switch that cancels it and nothing else."""

    prompt: list[int]
    sampling: SamplingParams
    stops: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    thought_ids: tuple[int, int] | None = None  # a thinking model's channel markers
    source: object = None  # its chunks, once admitted to the slots
    admitted: bool = False
    constraint: object = None  # structured output (a compiled JSON schema), or None


def call_records(calls: object, i: int) -> list[dict]:
    """An assistant message's ``tool_calls``, with JSON-string arguments read as objects."""
    if not isinstance(calls, list):
        raise InvalidMessages(f"message {i}: tool_calls must be a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidMessages(f"message {i}: a tool call needs a function with a name")
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InvalidMessages(f"message {i}: the arguments of {function['name']} are "
                                      "not JSON") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": args or {}}})
    return out


@dataclass
class Counters:
    served: int = 0
    cancelled: int = 0
    waiting: int = 0


class Server:
    """The loaded model, the queue in front of it, and the request handlers."""

    def __init__(self, backend: Backend, names: Iterable[str], api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, engine=None,
                 max_queue: int = DEFAULT_MAX_QUEUE, allow_remote_media: bool = False):
        self.allow_remote_media = allow_remote_media  # fetch http(s) image URLs
        self.max_queue = max_queue
        self.api_key = api_key
        self.other_keys: tuple[str, ...] = ()  # also accepted (the chat page's token)
        self.max_body = max_body
        self.lock = asyncio.Lock()
        self.counters = Counters()
        self.created = int(time.time())
        # The model, its parallel slots (SlotEngine, or None: one request at a time), names,
        # sampling defaults and prompt builder; the chat page's model picker replaces them.
        self._serve(backend, names, engine)
        self.jobs: set[Job] = set()  # waiting or generating
        self.closing = False
        self.switching = False  # another model is being loaded (the chat page's model picker)
        self._constraints: dict[str, object] = {}  # compiled schemas, by their JSON text

    @property
    def n_ctx(self) -> int:
        """What one request may hold: a slot's share of the context, or the whole of it."""
        return self.engine.n_ctx if self.engine is not None else self.backend.info.n_ctx

    def status(self) -> dict[str, object]:
        """Slots busy and requests waiting, for /health and Ollama's /api/ps."""
        if self.engine is not None:
            return self.engine.status()
        return {"slots": 1, "busy": int(self.lock.locked()), "waiting": self.counters.waiting,
                "max_queue": self.max_queue, "slot_context": self.n_ctx}

    def shutdown(self) -> None:
        """Stop taking requests and cancel every job: generations stop within a token."""
        self.closing = True
        for job in list(self.jobs):
            job.cancel.set()

    def check_open(self) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", "server_error",
                           code="shutting_down")
        if self.switching:
            raise APIError(503, "the server is switching models; try again in a moment",
                           "server_error", code="switching_models")

    async def swap(self, load: Callable[[], tuple], restore: Callable[[], tuple]) -> None:
        """Serve another model: stop taking requests, cancel the ones in flight, free the
        loaded model, then ``load()`` the next one (``(backend, names, engine)``), in a thread;
        if that fails, ``restore()`` loads the old one again and the error is raised. One
        model is in memory at a time, as a laptop needs."""
        self.switching = True
        try:
            for job in list(self.jobs):
                job.cancel.set()
            deadline = time.monotonic() + 30
            while self.jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            old_engine, old_backend = self.engine, self.backend
            await asyncio.to_thread(_close, old_engine, old_backend)
            try:
                backend, names, engine = await asyncio.to_thread(load)
            except BaseException:
                backend, names, engine = await asyncio.to_thread(restore)
                self._serve(backend, names, engine)
                raise
            self._serve(backend, names, engine)
        finally:
            self.switching = False

    def _serve(self, backend: Backend, names: Iterable[str], engine) -> None:
        self.backend, self.engine = backend, engine
        self.names = list(dict.fromkeys(n for n in names if n))
        if engine is not None:
            self.max_queue = engine.max_queue
        if backend.info.media:  # room for pictures and clips sent inline
            self.max_body = max(self.max_body, MEDIA_MAX_BODY)
        self.defaults = default_sampling(backend, capped=False)
        self.prompts = PromptBuilder(backend)
        self._constraints = {}

    def check_size(self, data: dict) -> None:
        """Refuse a prompt that cannot fit in the context before tokenizing it (a large one
        would hold the tokenizer for seconds)."""
        parts = [data.get("prompt")] if "prompt" in data else [
            m.get("content") for m in data.get("messages") or [] if isinstance(m, dict)]
        chars = 0
        for part in parts:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, list):
                chars += sum(len(p.get("text", "")) if isinstance(p, dict) and
                             isinstance(p.get("text"), str) else len(p) if isinstance(p, str)
                             else 0 for p in part)
        n_ctx = self.n_ctx
        if chars > n_ctx * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the prompt is {chars:,} characters: more than a context of "
                                f"{n_ctx} tokens can hold", code="context_length_exceeded")

    # -- request parsing ----------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compared as bytes (compare_digest refuses str with non-ASCII characters): the header's
        # raw bytes, which Starlette decoded as latin-1, against the key in UTF-8.
        given = token.strip().encode("latin-1", "replace")
        keys = (self.api_key, *self.other_keys)
        if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))
                for key in keys):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise APIError(413, f"request body over {self.max_body} bytes", code="too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                raise APIError(413, f"request body over {self.max_body} bytes", code="too_large")
        try:
            data = json.loads(body)
        except RecursionError:
            raise APIError(400, "the request body nests too deeply") from None
        except ValueError as exc:  # bad JSON or UTF-8, or an integer over Python's digit limit
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def check_model(self, data: dict) -> None:
        model = data.get("model")
        if model is not None and model not in self.names:
            raise APIError(404, f"model {model!r} is not served here; this server has "
                                f"{self.names[0]!r}", code="model_not_found", param="model")

    def sampling(self, data: dict, prompt_len: int) -> SamplingParams:
        def number(name: str, kind=float):
            value = data.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise APIError(400, f"{name} must be a{'n integer' if kind is int else ' number'}",
                               param=name)
            if isinstance(value, int) and abs(value) > 2**63:  # float() of it would overflow
                raise APIError(400, f"{name} is out of range", param=name)
            return kind(value)

        if data.get("n") not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if data.get("logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        max_tokens = number("max_completion_tokens", int) or number("max_tokens", int)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        room = self.n_ctx - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens and the context holds "
                                f"{self.n_ctx}", code="context_length_exceeded")
        max_tokens = min(max_tokens or room, room)  # capped by the context
        overrides = {
            "temperature": number("temperature"), "top_p": number("top_p"),
            "top_k": number("top_k", int), "min_p": number("min_p"),
            # vLLM calls it repetition_penalty; llama.cpp, repeat_penalty: either is taken.
            "repeat_penalty": number("repeat_penalty") or number("repetition_penalty"),
            "seed": number("seed", int),
            "max_tokens": max_tokens,
        }
        try:
            return self.defaults.with_overrides(**overrides)
        except GemmaChatError as exc:
            raise APIError(400, str(exc)) from None

    @staticmethod
    def stream_options(data: dict) -> dict:
        options = data.get("stream_options")
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        return options

    @staticmethod
    def stops(data: dict) -> list[str]:
        stop = data.get("stop")
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)) \
                or len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} "
                                "strings", param="stop")
        return stops

    def constraint(self, schema: dict, param: str):
        """``schema`` compiled for this model (kept for the next request with the same one);
        a schema that cannot be compiled is a 400 naming what is unsupported."""
        from ..structured import json_constraint

        return self.compiled(json.dumps(schema, sort_keys=True),
                             lambda: json_constraint(self.backend, schema), param)

    def compiled(self, key: str, build, param: str):
        """``build()``'s grammar, kept under ``key`` for the next request (16 at most); a
        :class:`GemmaChatError` from it is a 400 about ``param``."""
        from ..errors import GemmaChatError

        if key not in self._constraints:
            try:
                compiled = build()
            except GemmaChatError as exc:
                raise APIError(400, str(exc), param=param) from None
            while len(self._constraints) >= 16:
                del self._constraints[next(iter(self._constraints))]
            self._constraints[key] = compiled
        return self._constraints[key]

    def call_plan(self, tools):
        """How a reply that may call ``tools`` (a :class:`~gemma_chat.tools.ToolRequest`)
        starts and is constrained, its grammar cached."""
        from ..tools import plan_calls

        return plan_calls(self.backend, self.prompts, tools,
                          lambda key, build: self.compiled(key, build, "tools"))

    def thinking(self, data: dict) -> bool:
        """Thinking for this request: ``chat_template_kwargs.enable_thinking`` (vLLM's and
        llama-server's switch) or ``reasoning_effort`` (any effort but "none" thinks); off by
        default, as the model's own template has it. Ignored by models that cannot think."""
        kwargs = data.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise APIError(400, "chat_template_kwargs must be an object",
                           param="chat_template_kwargs")
        enable = (kwargs or {}).get("enable_thinking")
        effort = data.get("reasoning_effort")
        if enable is not None and not isinstance(enable, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs")
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high"):
            raise APIError(400, "reasoning_effort must be none, minimal, low, medium or high",
                           param="reasoning_effort")
        if not self.prompts.can_think:
            return False
        if enable is not None:
            return enable
        return effort is not None and effort != "none"

    def chat_prompt(self, data: dict, tools: list | None = None) -> list[int]:
        """Token ids of the model's chat format over ``messages`` (with ``tools`` declared
        in the model's own way). Leading system (or developer) messages are joined into one;
        assistant tool calls and tool results are kept."""
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        from .openai import MEDIA_PARTS, media_content

        normalized: list[dict[str, object]] = []
        try:
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    raise InvalidMessages(f"message {i} must be an object")
                role = message.get("role")
                role = "system" if role == "developer" else role  # newer clients say developer
                raw = message.get("content")
                if role == "user" and isinstance(raw, list) and any(
                        isinstance(p, dict) and p.get("type") in MEDIA_PARTS for p in raw):
                    content = media_content(raw, i, self.allow_remote_media)
                else:
                    content = template.content_text(message, i) \
                        if raw is not None or role != "assistant" else ""
                if role == "system" and normalized and normalized[-1]["role"] == "system" \
                        and len(normalized) == 1:
                    normalized[0]["content"] += "\n\n" + content
                    continue
                item: dict[str, object] = {"role": role, "content": content}
                if role == "assistant" and message.get("tool_calls"):
                    item["tool_calls"] = call_records(message["tool_calls"], i)
                if role == "tool":
                    item.update({k: message[k] for k in ("tool_call_id", "name")
                                 if isinstance(message.get(k), str)})
                normalized.append(item)
            return self.prompts.with_tools(normalized, tools, thinking=self.thinking(data))
        except InvalidMessages as exc:
            raise APIError(400, f"invalid messages: {exc}", param="messages") from None
        except MediaError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def completion_prompt(self, data: dict) -> list[int]:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt")
        return self.prompts.raw(prompt)

    # -- generation ---------------------------------------------------------------------------

    def admit(self, job: Job) -> None:
        """Take ``job`` into the queue, or refuse it with a 503 when the queue is full: called
        before a response starts, so that a streamed request is refused with a status too."""
        if self.engine is not None:
            from ..backends.batching import QueueFull

            try:  # queued in the engine at once
                job.source = self.engine.stream(job.prompt, job.sampling, cancel=job.cancel,
                                                constraint=job.constraint)
            except QueueFull as exc:
                raise APIError(503, f"server busy: {exc}", "server_error",
                               code="queue_full") from None
        elif self.lock.locked() and self.counters.waiting >= self.max_queue:
            raise APIError(503, f"server busy: a request is being served and {self.max_queue} "
                                "are waiting", "server_error", code="queue_full")
        job.admitted = True

    async def generate(self, job: Job) \
            -> AsyncIterator[tuple[str, Stats | None, str | None, bool, tuple[int, ...]]]:
        """Yield (text, stats, finish_reason, thought, token ids) as the model writes. A thinking
        model's thoughts come apart (``thought``), never cut by stop strings; the ids are those
        of the chunk the text came with (control tokens, which have no text, included).

        Generation runs in a thread of its own, reading the slots' stream (or, without slots,
        the backend's, one request at a time under the lock); if the consumer stops early (a
        client disconnected) the generation is cancelled, and without slots the lock is
        released when the thread has finished, never before."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        backend, engine = self.backend, self.engine
        if not job.admitted:
            self.admit(job)
        source = job.source

        def hand(item) -> None:
            """To the event loop, unless the server has stopped it: then stop generating."""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed
                job.cancel.set()

        def worker() -> None:
            try:
                chunks = source if source is not None else \
                    backend.stream(job.prompt, job.sampling, cancel=job.cancel,
                                   **({"constraint": job.constraint} if job.constraint else {}))
                for chunk in split_thoughts(chunks, job.thought_ids):
                    hand(chunk)
            except BaseException as exc:  # handed to the event loop, raised there
                hand(exc)
            finally:
                hand(None)
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:
                    pass

        locked = engine is None

        def finished() -> None:
            self.jobs.discard(job)
            if locked:
                self.lock.release()

        self.jobs.add(job)
        if locked:
            self.counters.waiting += 1
            try:
                await self.lock.acquire()
            except BaseException:
                self.jobs.discard(job)
                raise
            finally:
                self.counters.waiting -= 1
            if job.cancel.is_set():  # its client left, or the server is closing, while it waited
                self.lock.release()
                self.jobs.discard(job)
                self.counters.cancelled += 1
                yield "", None, "cancelled", False, ()
                return
        # A thread per request, not the default executor's few: with slots, every request
        # streams at once.
        threading.Thread(target=worker, name="gemma-request", daemon=True).start()
        stops = StopStrings(job.stops)
        done = False
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                chunk: Chunk = item
                ids = chunk.token_ids
                if chunk.thought:
                    if chunk.text:
                        yield chunk.text, None, None, True, ids
                    if chunk.stats is None:
                        continue
                text, hit = stops.feed("" if chunk.thought else chunk.text)
                if hit:
                    job.cancel.set()
                    stats = await self._drain(queue)
                    done = True
                    yield text, stats, "stop", False, ids
                    return
                if chunk.stats is not None:
                    text += stops.flush()
                    done = True
                    if chunk.stats.stop_reason == "cancelled":  # client gone, or shutdown
                        self.counters.cancelled += 1
                    yield text, chunk.stats, chunk.finish_reason, False, ids
                    return
                if text or ids:
                    yield text, None, None, False, ids
        finally:
            self.counters.served += 1
            if not done:
                job.cancel.set()  # the client left: stop this generation within one token
                self.counters.cancelled += 1

    async def collect(self, request: Request, job: Job) -> tuple[str, str, Stats | None, str]:
        """A non-streamed request's (answer, thoughts, stats, finish reason); its generation
        stops when its client goes away, which nothing else would notice before the end."""
        pieces, thoughts, stats, reason = [], [], None, "stop"
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            async for text, stats_, reason_, thought, _ids in self.generate(job):
                (thoughts if thought else pieces).append(text)
                stats, reason = stats_ or stats, reason_ or reason
        finally:
            watcher.cancel()
        return "".join(pieces), "".join(thoughts), stats, reason

    @staticmethod
    async def _drain(queue: asyncio.Queue) -> Stats | None:
        stats = None
        while True:
            item = await queue.get()
            if item is None or isinstance(item, BaseException):
                return stats
            if item.stats is not None:
                stats = item.stats


async def watch_disconnect(request: Request, job: Job, every: float = 0.1) -> None:
    """Cancel ``job`` when its client goes away (a non-streamed request sends nothing until
    the end, so nothing else would notice)."""
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        await asyncio.sleep(every)


def _close(engine, backend) -> None:
    if engine is not None:
        engine.close()
    backend.close()
