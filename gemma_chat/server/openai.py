"""OpenAI's API on the server core: ``POST /v1/chat/completions`` (streamed as server-sent
events, or not), ``POST /v1/completions`` and ``GET /v1/models``, with OpenAI's field names and
error bodies. Thoughts go in ``reasoning_content`` (vLLM's and llama-server's convention)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..backends.base import Stats
from ..structured import ANY_OBJECT
from ..template4 import TOOL_CALL
from ..tools import CallPlan, ToolRequest, read_calls
from .core import APIError, Job, Server

SHUTTING_DOWN = {"message": "the server is shutting down", "type": "server_error", "param": None,
                 "code": "shutting_down"}


def usage(prompt_len: int, stats: Stats | None) -> dict[str, object]:
    """OpenAI's usage record; ``cached_tokens`` counts the prompt tokens the KV cache held."""
    completion = stats.generated_tokens if stats else 0
    return {"prompt_tokens": prompt_len, "completion_tokens": completion,
            "total_tokens": prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0}}


def response_format(data: dict) -> dict | None:
    """The JSON schema ``response_format`` asks for (None: free text): ``json_object`` is any
    JSON object, ``json_schema`` its ``json_schema.schema``."""
    spec = data.get("response_format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema", ANY_OBJECT) if isinstance(inner, dict) else None
        if isinstance(schema, dict):
            return schema
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format")
    raise APIError(400, "response_format.type must be text, json_object or json_schema",
                   param="response_format")


def tool_request(data: dict) -> ToolRequest | None:
    """The request's tools (None when it declares none)."""
    tools, choice = data.get("tools"), data.get("tool_choice", "auto")
    if not tools:
        if choice not in ("auto", "none") and choice is not None:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", param="tools")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and
                isinstance(function, dict) and isinstance(function.get("name"), str) and
                function["name"]):
            raise APIError(400, 'each tool must be {"type": "function", "function": {"name": '
                                "..., \"parameters\": {...}}}", param="tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, f"the parameters of {function['name']} must be a JSON schema "
                                "object", param="tools")
        names.append(function["name"])
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") \
            if isinstance(choice.get("function"), dict) else None
        if name not in names:
            raise APIError(400, f"tool_choice names a function that is not in tools: {name!r}",
                           param="tool_choice")
        choice = "required"
    elif choice is None:
        choice = "auto"
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "tool_choice must be auto, none, required or a named function",
                       param="tool_choice")
    parallel = data.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, "parallel_tool_calls must be true or false",
                       param="parallel_tool_calls")
    return ToolRequest(list(tools), choice, name, parallel)


#: OpenAI's content parts that carry media, and the kind each holds.
MEDIA_PARTS = {"image_url": "image", "input_audio": "audio"}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac",
                 "ogg": "audio/ogg"}


def media_content(parts: list, index: int, allow_remote: bool) -> list[dict]:
    """A user message's OpenAI content parts with their media read: ``image_url`` (a data: URL,
    or an http(s) URL where ``allow_remote``) and ``input_audio`` (base64 wav/mp3/flac/ogg)
    become ``{"type": "image"|"audio", "media": Media}``; text parts stay."""
    from ..media import load

    out: list[dict] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(part)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError(400, f"message {index}: an image_url part needs a url",
                               param="messages")
            out.append({"type": "image", "media": load(url, kind="image",
                                                       allow_remote=allow_remote)})
        elif kind == "input_audio":
            ref = part.get("input_audio")
            data = ref.get("data") if isinstance(ref, dict) else None
            fmt = ref.get("format", "wav") if isinstance(ref, dict) else None
            if not isinstance(data, str) or fmt not in AUDIO_FORMATS:
                raise APIError(400, f"message {index}: an input_audio part needs base64 data and "
                                    f"a format ({', '.join(AUDIO_FORMATS)})", param="messages")
            out.append({"type": "audio", "media": load(
                f"data:{AUDIO_FORMATS[fmt]};base64,{data}", kind="audio")})
        else:
            raise APIError(400, f"message {index}: content parts must be text, image_url or "
                                "input_audio", param="messages")
    return out


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def routes(server: Server, guarded) -> list[Route]:
    """The OpenAI endpoints over ``server``; ``guarded`` wraps each in auth and error bodies."""

    async def models(request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": server.created, "owned_by": "google",
                 "max_model_len": server.n_ctx}  # vLLM's field: the context it serves
                for name in server.names]
        return JSONResponse({"object": "list", "data": data})

    async def respond(request: Request, data: dict, job: Job, chat: bool) -> Response:
        """The OpenAI response for a chat or text completion: SSE when streamed, else JSON."""
        prefix = "chatcmpl" if chat else "cmpl"
        base = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": data.get("model") or server.names[0]}
        chunk_object = "chat.completion.chunk" if chat else "text_completion"

        def piece(text: str, reason: str | None, thought: bool = False) -> dict:
            if chat:
                key = "reasoning_content" if thought else "content"
                return {"index": 0, "delta": {key: text} if text else {},
                        "finish_reason": reason}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        if data.get("stream"):
            include_usage = bool(server.stream_options(data).get("include_usage"))

            async def events():
                if chat:  # the role comes first, as OpenAI sends it
                    yield sse({**base, "object": chunk_object, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]})
                stats = None
                async for text, stats_, reason, thought, _ids in server.generate(job):
                    stats = stats_ or stats
                    if reason == "cancelled":  # the server is shutting down
                        yield sse({"error": SHUTTING_DOWN})
                        break
                    if thought and not chat:
                        continue  # a text completion has no place for thoughts
                    if text or reason:
                        yield sse({**base, "object": chunk_object,
                                   "choices": [piece(text, reason, thought)]})
                if include_usage:
                    yield sse({**base, "object": chunk_object, "choices": [],
                               "usage": usage(len(job.prompt), stats)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        text, thoughts, stats, reason = await server.collect(request, job)
        if reason == "cancelled":  # the client left (nobody reads this), or shutdown
            return JSONResponse({"error": SHUTTING_DOWN}, status_code=503)
        message = {"role": "assistant", "content": text}
        if thoughts:
            message["reasoning_content"] = thoughts
        choice = ({"index": 0, "message": message, "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": usage(len(job.prompt), stats)})

    async def respond_with_tools(request: Request, data: dict, job: Job, tools: ToolRequest,
                                 forced: str) -> Response:
        """A reply that may call tools: its calls read back (Gemma 4's native syntax, Gemma 1-3's
        JSON) and sent as ``tool_calls``. Streamed, text streams as it comes until a call
        begins (Gemma 4's call token; a Gemma 1-3 reply that opens with ``{`` or a code fence
        is held back until it is read), then each call comes as OpenAI sends it: its id and
        name, then its arguments."""
        gemma4 = server.prompts.format.name == "gemma4"
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": data.get("model") or server.names[0]}

        def read_back(answer: str, stats) -> tuple[list[dict], str]:
            text = answer
            if gemma4 and stats is not None:  # the call markers are control tokens
                text = forced + server.backend.detokenize(stats.token_ids, special=True)
            return read_calls(text, tools, gemma4)

        if not data.get("stream"):
            answer, thoughts, stats, reason = await server.collect(request, job)
            if reason == "cancelled":
                return JSONResponse({"error": SHUTTING_DOWN}, status_code=503)
            calls, content = read_back(answer, stats)
            message = {"role": "assistant", "content": (content if calls else answer) or None}
            if thoughts:
                message["reasoning_content"] = thoughts
            if calls:
                message["tool_calls"] = calls
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message,
                 "finish_reason": "tool_calls" if calls else reason}],
                "usage": usage(len(job.prompt), stats)})
        include_usage = bool(server.stream_options(data).get("include_usage"))
        opening = server.prompts.tokens([TOOL_CALL])[0] if gemma4 else None

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            # A required call: the reply is the call from its first token.
            calling = bool(forced) or (job.constraint is not None and not gemma4)
            pieces: list[str] = []
            shown = 0  # characters of the answer sent as content
            stats, reason = None, "stop"
            async for text, stats_, reason_, thought, ids in server.generate(job):
                if reason_ == "cancelled":  # the server is shutting down
                    yield sse({"error": SHUTTING_DOWN})
                    yield "data: [DONE]\n\n"
                    return
                stats, reason = stats_ or stats, reason_ or reason
                if thought:
                    if text:
                        yield chunk({"reasoning_content": text})
                    continue
                pieces.append(text)
                if calling:
                    continue
                answer = "".join(pieces)
                if gemma4:
                    calling = opening in ids  # this chunk's text (if any) came before it
                elif answer.lstrip()[:1] in ("{", "`"):
                    calling = True  # Gemma 1-3 write a call as JSON: hold it back
                    continue
                elif not answer.strip():
                    continue  # leading whitespace waits for what follows
                if len(answer) > shown:
                    yield chunk({"content": answer[shown:]})
                    shown = len(answer)
            answer = "".join(pieces)
            calls, _ = read_back(answer, stats)
            if not calls and len(answer) > shown:  # held back, and not a call after all
                yield chunk({"content": answer[shown:]})
            for i, call in enumerate(calls):
                yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                             "function": {"name": call["function"]["name"],
                                                          "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": i, "function": {
                    "arguments": call["function"]["arguments"]}}]})
            yield chunk({}, "tool_calls" if calls else reason)
            if include_usage:
                yield sse({**base, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage(len(job.prompt), stats)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def completion_endpoint(chat: bool):
        async def endpoint(request: Request) -> Response:
            server.check_open()
            data = await server.read_json(request)
            server.check_model(data)
            server.check_size(data)
            tools = tool_request(data) if chat else None
            declared = tools.tools if tools is not None and tools.active else None
            # Tokenizing a long prompt takes a while: off the event loop, which keeps serving.
            if chat:
                prompt = await asyncio.to_thread(server.chat_prompt, data, declared)
            else:
                prompt = await asyncio.to_thread(server.completion_prompt, data)
            plan = CallPlan()
            if declared:  # compiling takes a moment: off the event loop
                plan = await asyncio.to_thread(server.call_plan, tools)
                prompt = prompt + server.prompts.tokens(plan.prefix)  # a required Gemma 4 call
            job = Job(prompt, server.sampling(data, len(prompt)), server.stops(data),
                      thought_ids=server.prompts.thought_ids, constraint=plan.constraint)
            schema = response_format(data)
            if schema is not None:  # compiling takes a moment: off the event loop too
                job.constraint = await asyncio.to_thread(server.constraint, schema,
                                                         "response_format")
            server.admit(job)  # a full queue answers 503 before any response starts
            if declared:
                return await respond_with_tools(request, data, job, tools, plan.forced)
            return await respond(request, data, job, chat=chat)

        return endpoint

    chat_completions, completions = completion_endpoint(True), completion_endpoint(False)
    return [
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
