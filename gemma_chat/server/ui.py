"""The chat page of ``gemma ui`` and ``gemma serve --ui``: its files, and the API it keeps
conversations with. The page itself talks to the model through our own OpenAI API (streamed);
it stores each finished exchange here, in the same autosave files the REPL writes, so a chat
started in the terminal continues in the window and back.

    app = create_app(backend, names, ui=UISecurity(token, port=8080))

Safety: the page's API, and every other route, needs the per-launch token the opened URL
carries (``#token=...``; the page sends it as ``Authorization: Bearer``), so other web pages in
the same browser cannot drive the model; on loopback the ``Host`` header must name loopback, so
DNS rebinding cannot reach it either. Model text is rendered as Markdown and sanitized in the
page (DOMPurify) before it touches the document.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import sessions
from ..errors import GemmaChatError
from .core import APIError, Server

#: The page's files, shipped in the wheel (vendor/ holds the third-party scripts, unmodified).
PAGE_DIR = Path(__file__).resolve().parent.parent / "ui"
FILES = {"app.js": "text/javascript", "app.css": "text/css",
         "vendor/marked.umd.js": "text/javascript", "vendor/purify.min.js": "text/javascript",
         "vendor/highlight.min.js": "text/javascript", "vendor/github.min.css": "text/css",
         "vendor/github-dark.min.css": "text/css", "icon.svg": "image/svg+xml"}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
#: Replies of a pretrained model stop here unless the page says otherwise (as in the CLI).
PT_MAX_TOKENS = 256


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class UISecurity:
    """The per-launch token, and the port (for the ``Host`` check) when bound to loopback."""

    token: str
    loopback_port: int | None = None

    def check(self, request: Request) -> None:
        """403 unless the request carries the token and, on loopback, a loopback ``Host``."""
        if self.loopback_port is not None:
            host = request.headers.get("host", "")
            allowed = {f"{h}:{self.loopback_port}" for h in LOOPBACK}
            if host not in allowed:
                raise APIError(403, "this server answers only to 127.0.0.1 and localhost",
                               "permission_error", code="bad_host")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("latin-1", "replace"), self.token.encode()):
            raise APIError(403, "the chat page's token is missing or wrong: open the URL "
                                "`gemma ui` printed", "permission_error", code="bad_token")

    def host_ok(self, request: Request) -> bool:
        if self.loopback_port is None:
            return True
        return request.headers.get("host", "") in {f"{h}:{self.loopback_port}" for h in LOOPBACK}


def summary(saved: sessions.Saved) -> dict:
    path = saved.path
    return {"id": path.stem, "title": saved.shown_title, "model": saved.model.get("name"),
            "turns": len(saved.exchanges), "created": saved.created,
            "updated": path.stat().st_mtime if path.exists() else None}


def exchange_record(ex) -> dict:
    out = {"user": ex.user, "reply": ex.reply, "thoughts": ex.thoughts,
           "interrupted": ex.interrupted}
    if ex.media:
        out["media"] = [m.to_dict() for m in ex.media]
    return out


class PullProgress:
    """What a download reports (hub.pull's ``progress``), as events for the page: each file's
    bytes done of its total, at most five times a second."""

    def __init__(self, emit):
        self.emit = emit
        self.files: list[list] = []
        self._last = 0.0

    def add_task(self, description, total=None, completed=0):
        self.files.append([str(description), total or 0, completed or 0])
        self._send(force=True)
        return len(self.files) - 1

    def advance(self, task, n) -> None:
        self.files[task][2] += n
        self._send()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.2:
            self._last = now
            done = sum(f[2] for f in self.files)
            total = sum(f[1] for f in self.files)
            self.emit({"stage": "download", "file": self.files[-1][0] if self.files else "",
                       "done": done, "total": total})


def approx_download(spec) -> int:
    """About how many bytes a catalogue model's default GGUF (Q4_K_M, ~4.85 bits a weight)
    takes: for the picker, before anything is downloaded."""
    return int(spec.params_b * 1e9 * 4.85 / 8)


def routes(server: Server, security: UISecurity, switcher=None) -> list[Route]:
    """The page and its API; ``switcher`` (see :func:`gemma_chat.cli.serve.ModelSwitcher`)
    lets the page change the model."""

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                security.check(request)
                return await handler(request)
            except APIError as exc:
                return exc.response()
            except GemmaChatError as exc:
                return APIError(400, str(exc)).response()
        return endpoint

    async def page(request: Request) -> Response:
        if not security.host_ok(request):
            return Response("this server answers only to 127.0.0.1 and localhost",
                            status_code=403)
        return FileResponse(PAGE_DIR / "index.html", headers=_page_headers())

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES or not security.host_ok(request):
            return Response("not found", status_code=404)
        return FileResponse(PAGE_DIR / name, media_type=FILES[name],
                            headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        backend_info = server.backend.info
        tuned = backend_info.instruction_tuned
        return JSONResponse({
            "model": server.names[0], "backend": backend_info.backend,
            "context": server.n_ctx, "can_think": server.prompts.can_think,
            "media": list(backend_info.media), "instruction_tuned": tuned,
            "max_tokens": None if tuned else PT_MAX_TOKENS,
            "sampling": server.defaults.to_dict(),
            "prompt_format": server.prompts.format.description})

    async def listing(request: Request) -> Response:
        query = request.query_params.get("q", "").strip().lower()
        out = []
        for path in sessions.recent(limit=200):
            try:
                saved = sessions.load(path)
            except GemmaChatError:
                continue
            if query and query not in saved.shown_title.lower() and not any(
                    query in ex.user.lower() or query in ex.reply.lower()
                    for ex in saved.exchanges):
                continue
            out.append(summary(saved))
        return JSONResponse({"conversations": out})

    def saved_of(request: Request) -> sessions.Saved:
        path = sessions.autosave_path(request.path_params["id"])
        if not path.is_file():
            raise APIError(404, f"no conversation {path.stem}", code="not_found")
        return sessions.load(path)

    async def one(request: Request) -> Response:
        saved = saved_of(request)
        if request.method == "DELETE":
            saved.path.unlink()
            return JSONResponse({"deleted": saved.path.stem})
        if request.method == "PATCH":
            data = await server.read_json(request)
            for key, kind in (("title", str), ("system", (str, type(None))),
                              ("thinking", bool)):
                if key in data:
                    if not isinstance(data[key], kind):
                        raise APIError(400, f"{key} has the wrong type", param=key)
                    sessions.append_event(saved.path, {"type": key, key: data[key]})
            saved = sessions.load(saved.path)
        return JSONResponse({**summary(saved), "system": saved.system,
                             "thinking": saved.thinking,
                             "exchanges": [exchange_record(ex) for ex in saved.exchanges]})

    async def create(request: Request) -> Response:
        data = await server.read_json(request)
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise APIError(400, "system must be a string", param="system")
        recorder = sessions.Autosave()
        recorder.start(_Header(server, system or None, bool(data.get("thinking"))),
                       server.defaults.to_dict())
        if recorder.problem:
            raise APIError(500, recorder.problem, "server_error")
        return JSONResponse({"id": recorder.path.stem})

    async def append(request: Request) -> Response:
        saved = saved_of(request)
        data = await server.read_json(request)
        kind = request.path_params["what"]
        if kind == "undo":
            count = data.get("count", 1)
            if not isinstance(count, int) or not 0 < count <= len(saved.exchanges):
                raise APIError(400, "count must be between 1 and the number of exchanges",
                               param="count")
            for _ in range(count):
                sessions.append_event(saved.path, {"type": "undo"})
        elif kind == "exchanges":
            if not isinstance(data.get("user"), str) or not isinstance(data.get("reply"), str):
                raise APIError(400, "an exchange needs user and reply text")
            thoughts = data.get("thoughts") or ""
            sessions.append_event(saved.path, {
                "type": "exchange", "user": data["user"], "reply": data["reply"],
                "thoughts": thoughts if isinstance(thoughts, str) else "",
                "interrupted": bool(data.get("interrupted")), "reply_ids": []})
        else:
            raise APIError(404, f"no such action {kind!r}", code="not_found")
        return JSONResponse({"turns": len(sessions.load(saved.path).exchanges)})

    async def models(request: Request) -> Response:
        from .. import catalog, inventory
        from ..resolve import on_disk

        path = getattr(switcher.current, "path", None) if switcher is not None else None
        current = Path(path).resolve() if path is not None else None
        local = await asyncio.to_thread(inventory.local_models)
        disk = [{"name": m.name, "path": str(m.path), "format": m.format,
                 "quantization": m.quantization, "size": m.size,
                 "current": current is not None and m.path.resolve() == current}
                for m in local]
        if current is not None and not any(m["current"] for m in disk):
            # Opened by a path outside the store: listed too, first.
            info = server.backend.info
            disk.insert(0, {"name": server.names[0], "path": str(current),
                            "format": switcher.current.format, "quantization": info.quantization,
                            "size": current.stat().st_size if current.is_file() else 0,
                            "current": True})
        specs = [spec for spec in catalog.load().specs if spec.gguf and not on_disk(spec)]
        specs.sort(key=lambda spec: (not spec.instruction_tuned, spec.params_b))
        return JSONResponse({
            "current": server.names[0], "switch": switcher is not None, "on_disk": disk,
            "catalogue": [{"name": spec.name, "display": spec.display, "params": spec.params,
                           "download": approx_download(spec), "tuned": spec.tuned,
                           "modalities": list(spec.modalities)} for spec in specs]})

    async def switch(request: Request) -> Response:
        if switcher is None:
            raise APIError(400, "this server serves one model (start it with `gemma ui` to "
                                "switch)", code="no_switching")
        if server.switching:
            raise APIError(409, "already switching models", code="switching_models")
        data = await server.read_json(request)
        name = data.get("model")
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "model must be a model's name or path", param="model")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        async def run() -> None:
            try:
                resolved = await asyncio.to_thread(switcher.find, name.strip(),
                                                   PullProgress(emit))
                emit({"stage": "load", "model": resolved.name})
                await server.swap(lambda: switcher.load(resolved),
                                  lambda: switcher.load(switcher.current))
                switcher.current = resolved
                emit({"stage": "ready", "model": server.names[0]})
            except GemmaChatError as exc:
                emit({"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - said to the page, the old model kept
                emit({"error": f"{type(exc).__name__}: {exc}"})
            finally:
                emit(None)

        task = asyncio.create_task(run())  # goes on if the page leaves

        async def events():
            while True:
                event = await queue.get()
                if event is None:
                    break
                yield f"data: {json.dumps(event)}\n\n"
            await task

        return StreamingResponse(events(), media_type="text/event-stream")

    return [
        Route("/ui/api/models", guarded(models), methods=["GET"]),
        Route("/ui/api/model", guarded(switch), methods=["POST"]),
        Route("/ui/", page, methods=["GET"]),
        Route("/ui/static/{name:path}", static, methods=["GET"]),
        Route("/ui/api/info", guarded(info), methods=["GET"]),
        Route("/ui/api/conversations", guarded(listing), methods=["GET"]),
        Route("/ui/api/conversations", guarded(create), methods=["POST"]),
        Route("/ui/api/conversations/{id}", guarded(one), methods=["GET", "PATCH", "DELETE"]),
        Route("/ui/api/conversations/{id}/{what}", guarded(append), methods=["POST"]),
    ]


class _Header:
    """What :meth:`sessions.Autosave.start` reads of a conversation, for a new one."""

    def __init__(self, server: Server, system: str | None, thinking: bool):
        self.backend, self.system, self.thinking = server.backend, system, thinking
        self.exchanges: list = []
        self.remote = False


def _page_headers() -> dict[str, str]:
    # The page runs only its own scripts; nothing it renders can load others or frame it.
    return {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "media-src 'self' data: blob:; style-src 'self' "
                                       "'unsafe-inline'; script-src 'self'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


def page_url(host: str, port: int, token: str) -> str:
    """The URL that opens the page with its token (in the fragment: never sent, never logged)."""
    return f"http://{host}:{port}/ui/#token={token}"


__all__ = ["UISecurity", "new_token", "page_url", "routes"]
