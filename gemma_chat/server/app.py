"""``gemma serve``'s application: the routes of both APIs, authentication, CORS and /health.

    app = create_app(backend, names=["gemma-3-270m", "270m"], engine=SlotEngine(backend, 4))
    uvicorn.run(app, host="127.0.0.1", port=8080)

OpenAI's API is under ``/v1`` (:mod:`.openai`), Ollama's under ``/api`` (:mod:`.ollama`), on
the same port: ``gemma serve --port 11434`` stands in for Ollama for its clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..backends.base import Backend
from . import ollama, openai
from .core import DEFAULT_MAX_BODY, DEFAULT_MAX_QUEUE, APIError, Server


def create_app(backend: Backend, names: Iterable[str], *, api_key: str | None = None,
               cors: Sequence[str] = (), max_body: int = DEFAULT_MAX_BODY, engine=None,
               max_queue: int = DEFAULT_MAX_QUEUE,
               allow_remote_media: bool = False, page=None, switcher=None) -> Starlette:
    """The ASGI application serving ``backend`` under the model ``names`` (the first is the
    full name), through ``engine``'s parallel slots where given; with ``page`` (a
    :class:`~.ui.UISecurity`), the chat page too, at ``/ui/``. Without an ``api_key`` the page's
    token is then the key of every API; with one, either is taken."""
    if page is not None and api_key is None:
        api_key = page.token
    server = Server(backend, names, api_key, max_body, engine=engine, max_queue=max_queue,
                    allow_remote_media=allow_remote_media)
    if page is not None:
        server.other_keys = (page.token,)

    def guard(render: Callable[[APIError], Response]):
        def guarded(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    if page is not None and not page.host_ok(request):
                        raise APIError(403, "this server answers only to 127.0.0.1 and "
                                            "localhost", "permission_error", code="bad_host")
                    if request.url.path not in ("/health", "/"):
                        server.check_auth(request)
                    return await handler(request)
                except APIError as exc:
                    return render(exc)
            return endpoint
        return guarded

    async def health(request: Request) -> Response:
        info = server.backend.info
        status = server.status()
        slots = status["slots"]
        return JSONResponse({
            "status": "ok", "model": server.names[0], "backend": info.backend,
            "context": server.n_ctx, "concurrency": slots, **status,
            "note": (f"{slots} requests are generated at once, in parallel slots" if slots > 1
                     else "one model in memory; requests are served one at a time, in order"),
            "served": server.counters.served, "cancelled": server.counters.cancelled,
        })

    middleware = []
    if cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors),
                                     allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
                                     allow_headers=["authorization", "content-type"]))
    routes = [Route("/health", guard(APIError.response)(health), methods=["GET"]),
              *openai.routes(server, guard(APIError.response)),
              *ollama.routes(server, guard(ollama.error_response))]
    if page is not None:
        from . import ui

        routes += ui.routes(server, page, switcher)
    app = Starlette(routes=routes, middleware=middleware)
    app.state.server = server
    return app
