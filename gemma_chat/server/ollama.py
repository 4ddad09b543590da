"""Ollama's HTTP API on the server core: ``POST /api/chat`` and ``/api/generate`` (streamed as
NDJSON unless ``"stream": false``), ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``,
``GET /api/version`` and ``GET /``. The translation is plain functions over dicts:

    fields, stops = options({"temperature": 0, "num_predict": 32, "stop": ["\\n"]})
    chunk = chat_chunk("gemma-3-270m", "Hello", thought=False)

Field names, durations (integer nanoseconds), timestamps (Go's RFC 3339 with nanoseconds) and
error bodies (``{"error": "..."}``) are Ollama's, so Ollama's own clients (the ``ollama``
Python package, Open WebUI, editor plugins) work unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..backends.base import Stats
from ..structured import ANY_OBJECT
from ..tools import CallPlan, read_calls
from .core import APIError, Job, Server
from .openai import tool_request

#: The Ollama API version whose behaviour this mirrors (clients compare it).
VERSION = "0.12.6"
THINK_LEVELS = ("low", "medium", "high", "max")


# -- names and times ------------------------------------------------------------------------------

def same_model(requested: str, name: str) -> bool:
    """Ollama's name matching: case-insensitive, ``:latest`` implied."""
    def norm(n: str) -> str:
        n = n.strip().lower()
        return n[: -len(":latest")] if n.endswith(":latest") else n
    return norm(requested) == norm(name)


def go_time(seconds: float | None = None, *, utc: bool = True) -> str:
    """A time as Go's ``time.Time`` marshals it: RFC 3339 with up to nine fraction digits,
    trailing zeros dropped; UTC with ``Z`` (``created_at``) or local with its offset."""
    seconds = time.time() if seconds is None else seconds
    when = dt.datetime.fromtimestamp(seconds, dt.timezone.utc if utc else None)
    if not utc:
        when = when.astimezone()
    nanos = int(round((seconds % 1) * 1e9)) % 1_000_000_000
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".")
    zone = "Z" if utc else when.strftime("%z")
    if zone != "Z":
        zone = zone[:3] + ":" + zone[3:]
    return when.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone


def ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# -- requests -------------------------------------------------------------------------------------

def options(value: object) -> tuple[dict, list[str]]:
    """(the request fields :meth:`Server.sampling` reads, stop strings) from Ollama's
    ``options``; unknown keys are ignored, as Ollama ignores them (clients send options Ollama
    no longer has). ``num_predict`` -1 or -2 and ``seed`` -1 mean no limit and a random seed."""
    if value is None:
        return {}, []
    if not isinstance(value, Mapping):
        raise APIError(400, "options must be an object")
    fields = {k: value[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                    "seed") if value.get(k) is not None}
    if isinstance(fields.get("seed"), int) and fields["seed"] < 0:
        del fields["seed"]
    predict = value.get("num_predict")
    if isinstance(predict, (int, float)) and not isinstance(predict, bool) and predict >= 0:
        fields["max_tokens"] = int(predict)
    elif predict is not None and not isinstance(predict, (int, float)):
        raise APIError(400, 'option "num_predict" must be of type integer')
    stop = value.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise APIError(400, 'option "stop" must be of type an array of strings')
    return fields, stops


def think(value: object, can_think: bool, model: str) -> bool:
    """Thinking for this request. As in Ollama: absent means on for a model that can think;
    asking a model that cannot is an error; levels all mean on (Gemma 4 has no levels)."""
    if value is None:
        return can_think
    if isinstance(value, str):
        if value not in THINK_LEVELS:
            raise APIError(400, f'invalid think value: "{value}" (must be "high", "medium", '
                                   '"low", "max", true, or false)')
        value = True
    elif not isinstance(value, bool):
        raise APIError(400, 'think must be a boolean or string ("high", "medium", "low", '
                               '"max", true, or false)')
    if value and not can_think:
        raise APIError(400, f'"{model}" does not support thinking')
    return value


def format_schema(data: Mapping) -> dict | None:
    """The JSON schema Ollama's ``format`` asks for: ``"json"`` is any JSON object, an object
    is the schema itself; None for free text."""
    value = data.get("format")
    if value in (None, ""):
        return None
    if value == "json":
        return dict(ANY_OBJECT)
    if isinstance(value, dict):
        return dict(value)
    raise APIError(400, f'invalid format: {json.dumps(value)} (must be "json" or a JSON '
                        "schema object)")


def unsupported(data: Mapping) -> None:
    """What gemma serve does not do, refused in Ollama's words rather than ignored."""
    if data.get("images") and (data.get("raw") or data.get("context")):
        raise APIError(400, "images need the chat template: not with raw or context")


def with_images(content: str, images: object, where: str) -> str | list[dict]:
    """A message's text and Ollama's ``images`` (base64 strings) as OpenAI content parts, the
    pictures first; the text alone when there are none."""
    if not images:
        return content
    if not (isinstance(images, list) and all(isinstance(i, str) and i for i in images)):
        raise APIError(400, f"{where}: images must be an array of base64 strings")
    return [{"type": "image_url", "image_url": {"url": f"data:;base64,{i}"}} for i in images] \
        + [{"type": "text", "text": content}]


def chat_messages(data: Mapping) -> list[dict]:
    """``messages`` as OpenAI-style role/content records (thinking in history is dropped, as
    Gemma's templates drop earlier thoughts)."""
    messages = data.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise APIError(400, "messages must be an array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise APIError(400, f"message {i} must be an object")
        role = str(m.get("role") or "").lower()
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"message {i}: role {role!r} is not supported (system, user, "
                                   "assistant or tool)")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise APIError(400, f"message {i}: content must be a string")
        if m.get("images") and role != "user":
            raise APIError(400, f"message {i}: only user messages carry images")
        message: dict = {"role": role, "content": with_images(content, m.get("images"),
                                                              f"message {i}")}
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise APIError(400, f"message {i}: tool_calls must be an array")
            # Ollama's calls carry no ids: the results that follow answer them in order.
            message["tool_calls"] = [
                {"id": f"call_{i}_{k}", "type": "function",
                 "function": (c.get("function") if isinstance(c, Mapping) else None) or {}}
                for k, c in enumerate(calls)]
        if role == "tool":
            previous = next((o for o in reversed(out) if o.get("tool_calls")), None)
            answered = sum(o["role"] == "tool" for o in out[out.index(previous) + 1:]) \
                if previous is not None else 0
            if previous is not None and answered < len(previous["tool_calls"]):
                message["tool_call_id"] = previous["tool_calls"][answered]["id"]
            if isinstance(m.get("tool_name"), str):
                message["name"] = m["tool_name"]
        out.append(message)
    return out


def tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI-style calls as Ollama writes them: arguments an object, not a JSON string."""
    return [{"function": {"name": c["function"]["name"],
                          "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]


# -- responses ------------------------------------------------------------------------------------

def chat_chunk(model: str, text: str, thought: bool) -> dict:
    message = {"role": "assistant", "content": ""}
    message["thinking" if thought else "content"] = text
    return {"model": model, "created_at": go_time(), "message": message, "done": False}


def generate_chunk(model: str, text: str, thought: bool) -> dict:
    chunk = {"model": model, "created_at": go_time(), "response": "" if thought else text,
             "done": False}
    if thought:
        chunk["thinking"] = text
    return chunk


def final_fields(stats: Stats | None, prompt_len: int, total_s: float, reason: str) -> dict:
    """The done record's fields: Ollama's counts and nanosecond durations (zeros left out, as
    Ollama's ``omitempty`` leaves them)."""
    out = {"done": True, "done_reason": "length" if reason == "length" else "stop",
           "total_duration": ns(total_s), "prompt_eval_count": prompt_len}
    if stats is not None:
        out.update(prompt_eval_duration=ns(stats.prefill_s), eval_count=stats.generated_tokens,
                   eval_duration=ns(stats.decode_s))
    return {k: v for k, v in out.items() if v or k in ("done", "done_reason")}


def details(arch: str, fmt: str, n_params: int, quantization: str) -> dict:
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    return {"parent_model": "", "format": fmt, "family": arch, "families": [arch],
            "parameter_size": size, "quantization_level": quantization}


def digest(path: Path) -> str:
    """An identity for the model file: sha256 over its path, size and time (hashing gigabytes
    at every listing would take minutes; Ollama's digest is its manifest's, not the file's)."""
    path = Path(path)
    st = path.stat() if path.exists() else None
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}" if st else str(path)
    return hashlib.sha256(key.encode()).hexdigest()


def capabilities(can_think: bool) -> list[str]:
    return ["completion", "tools", *(["thinking"] if can_think else [])]


def parameters(defaults: Mapping[str, object], stops: Iterable[str]) -> str:
    """``/api/show``'s ``parameters``: one ``%-30s %#v`` line per option, as Ollama prints
    them."""
    lines = [f"{'stop':<30} {json.dumps(s)}" for s in stops]
    lines += [f"{k:<30} {json.dumps(v)}" for k, v in defaults.items() if v is not None]
    return "\n".join(lines)


def error_response(exc: APIError) -> Response:
    """Ollama's error body: ``{"error": message}``."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers())


def ndjson(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- routes ---------------------------------------------------------------------------------------

def routes(server: Server, guarded) -> list[Route]:
    """The Ollama endpoints over ``server``; ``guarded`` wraps each in auth and error bodies."""
    info = server.backend.info
    path = Path(info.path)

    def model_size() -> int:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.is_file() else 0

    def entry() -> dict:
        name = server.names[0]
        mtime = path.stat().st_mtime if path.exists() else server.created
        return {"name": name, "model": name, "modified_at": go_time(mtime, utc=False),
                "size": model_size(), "digest": digest(path),
                "details": details(info.architecture, "gguf" if path.is_file() else "mlx",
                                   info.n_params, info.quantization),
                "capabilities": capabilities(server.prompts.can_think)}

    def model_of(data: dict) -> str:
        model = data.get("model") or data.get("name")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required")
        if not any(same_model(model, name) for name in server.names):
            raise APIError(404, f"model '{model}' not found")
        return model

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [entry()]})

    async def ps(request: Request) -> Response:
        forever = go_time(time.time() + 10 * 365 * 86400, utc=False)  # loaded while serving
        size = model_size()
        return JSONResponse({"models": [{**entry(), "expires_at": forever,
                                         "size_vram": size if info.gpu_layers else 0,
                                         "context_length": server.n_ctx}]})

    async def show(request: Request) -> Response:
        data = await server.read_json(request)
        model_of(data)
        about = entry()
        arch = info.architecture
        stops = []
        if info.end_of_turn_id is not None:
            stops.append(server.backend.detokenize([info.end_of_turn_id], special=True))
        return JSONResponse({
            "modelfile": f"# gemma-chat serves {server.names[0]}\nFROM {path}\n",
            "parameters": parameters(server.defaults.to_dict(), stops),
            "template": server.prompts.format.description,
            "details": about["details"],
            "model_info": {"general.architecture": arch,
                           "general.parameter_count": info.n_params,
                           f"{arch}.context_length": info.n_ctx_train},
            "capabilities": about["capabilities"],
            "modified_at": about["modified_at"],
        })

    async def chat(request: Request) -> Response:
        return await generation(request, chat=True)

    async def generate(request: Request) -> Response:
        return await generation(request, chat=False)

    async def generation(request: Request, chat: bool) -> Response:
        server.check_open()
        data = await server.read_json(request)
        model = model_of(data)
        unsupported(data)
        started = time.perf_counter()
        thinking = think(data.get("think"), server.prompts.can_think, model)
        fields, stops = options(data.get("options"))
        raw, prompt = False, ""
        tools = None
        if chat:
            messages = chat_messages(data)
            if data.get("tools"):  # Ollama has no tool_choice: the model decides
                tools = tool_request({"tools": data["tools"]})
        else:
            prompt = data.get("prompt") or ""
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string")
            raw = bool(data.get("raw"))
            if raw and (data.get("system") or data.get("context") or data.get("template")):
                raise APIError(400, "raw mode does not support template, system, or context")
            system = data.get("system")
            messages = [{"role": "system", "content": system}] \
                if isinstance(system, str) and system else []
            messages += [{"role": "user", "content": with_images(prompt, data.get("images"),
                                                                 "the request")}] \
                if prompt else []
        if not any(m["role"] == "user" for m in messages):  # Ollama's "load the model"
            record = {"model": model, "created_at": go_time(), "done": True,
                      "done_reason": "unload" if data.get("keep_alive") in (0, "0") else "load"}
            record.update({"message": {"role": "assistant", "content": ""}} if chat
                          else {"response": ""})
            return JSONResponse(record)
        server.check_size({"messages": messages})
        context = data.get("context")
        if raw:
            ids = await asyncio.to_thread(server.prompts.raw, prompt)
        elif not chat and context:
            if not (isinstance(context, list) and
                    all(isinstance(t, int) and 0 <= t < info.n_vocab for t in context)):
                raise APIError(400, "context must be the token ids of an earlier reply")
            # The earlier exchange as it was, its closing, and the new user turn.
            ids = [*context, *server.prompts.closing,
                   *server.prompts.user_turn(prompt, first=False, thinking=thinking)]
        else:
            request_data = {"messages": messages,
                            "chat_template_kwargs": {"enable_thinking": thinking}}
            ids = await asyncio.to_thread(server.chat_prompt, request_data,
                                          tools.tools if tools is not None else None)
        plan = CallPlan()
        if tools is not None:  # Gemma 4's calls are constrained to the tools' parameters
            plan = await asyncio.to_thread(server.call_plan, tools)
        job = Job(ids, server.sampling(fields, len(ids)), stops,
                  thought_ids=server.prompts.thought_ids, constraint=plan.constraint)
        schema = format_schema(data)
        if schema is not None:
            job.constraint = await asyncio.to_thread(server.constraint, schema, "format")
        server.admit(job)
        piece = chat_chunk if chat else generate_chunk

        def final(stats: Stats | None, reason: str, text: str = "", thoughts: str = "") -> dict:
            record = piece(model, text, thought=False)
            if thoughts:
                if chat:
                    record["message"]["thinking"] = thoughts
                else:
                    record["thinking"] = thoughts
            record.update(final_fields(stats, len(ids), time.perf_counter() - started, reason))
            if not chat and not raw:
                record["context"] = ids + (stats.token_ids if stats else [])
            return record

        if tools is not None:  # generated whole, then its calls read back
            text, thoughts, stats, reason = await server.collect(request, job)
            if reason == "cancelled":
                raise APIError(503, "the server is shutting down")
            gemma4 = server.prompts.format.name == "gemma4"
            full = server.backend.detokenize(stats.token_ids, special=True) \
                if gemma4 and stats is not None else text
            calls, rest = read_calls(full, tools, gemma4)
            record = final(stats, reason, rest if calls else text, thoughts)
            if calls:
                record["message"]["tool_calls"] = tool_calls(calls)
            if not data.get("stream", True):
                return JSONResponse(record)
            first = {k: v for k, v in record.items() if k in ("model", "created_at", "message")}
            first["done"] = False
            last = final(stats, reason)
            return StreamingResponse(iter([ndjson(first), ndjson(last)]),
                                     media_type="application/x-ndjson")

        if data.get("stream", True):
            async def lines():
                stats, reason = None, "stop"
                async for text, stats_, reason_, thought, _ids in server.generate(job):
                    if reason_ == "cancelled":  # the server is shutting down
                        yield ndjson({"error": "the server is shutting down"})
                        return
                    stats, reason = stats_ or stats, reason_ or reason
                    if text:
                        yield ndjson(piece(model, text, thought))
                yield ndjson(final(stats, reason))

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        text, thoughts, stats, reason = await server.collect(request, job)
        if reason == "cancelled":
            raise APIError(503, "the server is shutting down")
        return JSONResponse(final(stats, reason, text, thoughts))

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", guarded(version), methods=["GET", "HEAD"]),
        Route("/api/tags", guarded(tags), methods=["GET", "HEAD"]),
        Route("/api/ps", guarded(ps), methods=["GET"]),
        Route("/api/show", guarded(show), methods=["POST"]),
        Route("/api/chat", guarded(chat), methods=["POST"]),
        Route("/api/generate", guarded(generate), methods=["POST"]),
    ]
