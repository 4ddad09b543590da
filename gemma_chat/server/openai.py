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
from .core import Job, Server

SHUTTING_DOWN = {"message": "the server is shutting down", "type": "server_error", "param": None,
                 "code": "shutting_down"}


def usage(prompt_len: int, stats: Stats | None) -> dict[str, object]:
    """OpenAI's usage record; ``cached_tokens`` counts the prompt tokens the KV cache held."""
    completion = stats.generated_tokens if stats else 0
    return {"prompt_tokens": prompt_len, "completion_tokens": completion,
            "total_tokens": prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0}}


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def routes(server: Server, guarded) -> list[Route]:
    """The OpenAI endpoints over ``server``; ``guarded`` wraps each in auth and error bodies."""

    async def models(request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": server.created, "owned_by": "google"}
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
                async for text, stats_, reason, thought in server.generate(job):
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

    def completion_endpoint(chat: bool):
        build_prompt = server.chat_prompt if chat else server.completion_prompt

        async def endpoint(request: Request) -> Response:
            server.check_open()
            data = await server.read_json(request)
            server.check_model(data)
            server.check_size(data)
            # Tokenizing a long prompt takes a while: off the event loop, which keeps serving.
            prompt = await asyncio.to_thread(build_prompt, data)
            job = Job(prompt, server.sampling(data, len(prompt)), server.stops(data),
                      thought_ids=server.prompts.thought_ids)
            server.admit(job)  # a full queue answers 503 before any response starts
            return await respond(request, data, job, chat=chat)

        return endpoint

    chat_completions, completions = completion_endpoint(True), completion_endpoint(False)
    return [
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
