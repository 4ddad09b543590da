"""``gemma serve``."""

from __future__ import annotations

from typing import Annotated

import click
import typer

from .common import BackendOpt, CtxOpt, ImageTokensOpt, ModelOpt, ThreadsOpt, app, load, stderr


@app.command()
def serve(
    model: ModelOpt = "gemma-3-270m",
    host: Annotated[str, typer.Option("--host", help="Interface to listen on; 0.0.0.0 exposes "
                                      "the server to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="GEMMA_API_KEY",
        help="Require `Authorization: Bearer KEY` on API requests (/v1 and /api).")] = None,
    cors: Annotated[list[str] | None, typer.Option(
        "--cors", help="Allow browser requests from this origin (repeatable, or *).")] = None,
    backend: BackendOpt = "auto",
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "-np", min=1, max=64,
        help="Requests generated at once, in one batch (they share the context). "
             "Default: from the context, up to 4.")] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="Requests that may wait for a slot before a 503.")] = 64,
    allow_remote_media: Annotated[bool, typer.Option(
        "--allow-remote-media", help="Fetch http(s) image URLs that requests name (off: only "
                                     "data: URLs, so that a request cannot make the server "
                                     "fetch arbitrary URLs).")] = False,
    image_tokens: ImageTokensOpt = None,
    ui: Annotated[bool, typer.Option(
        "--ui", help="Serve the chat page at /ui/ too (its URL, with a per-launch token, is "
                     "printed).")] = False,
) -> None:
    """Serve the model over OpenAI's (/v1/...) and Ollama's (/api/...) HTTP APIs."""
    run_server(model, host, port, api_key, cors, backend, ctx, threads, parallel, max_queue,
               allow_remote_media, image_tokens, ui)


@app.command("ui")
def ui_command(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="As for `gemma chat` (default: the configured default-model, else "
                              "2b-it when it is on disk, else the bundled gemma-3-270m).")] = None,
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port (default: a free "
                                      "one).")] = 0,
    backend: BackendOpt = "auto",
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    no_browser: Annotated[bool, typer.Option(
        "--no-browser", help="Print the page's URL without opening a browser.")] = False,
) -> None:
    """Chat in a browser window: the chat page on 127.0.0.1, with the REPL's conversations."""
    from ..loader import default_chat_model

    if model is None:
        model, _why = default_chat_model()
    if port == 0:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    run_server(model, "127.0.0.1", port, None, None, backend, ctx, threads, None, 64, False,
               None, True, open_browser=not no_browser)


def run_server(model, host, port, api_key, cors, backend, ctx, threads, parallel, max_queue,
               allow_remote_media, image_tokens, ui: bool, open_browser: bool = False) -> None:
    """Load the model and serve it (and the chat page, with ``ui``) until a signal."""
    from ..backends import REMOTE, normalize
    from ..server import create_app
    from ..server.ui import UISecurity, new_token, page_url

    if not 0 < port < 65536:
        raise click.UsageError(f"invalid port {port}")
    if normalize(backend) == REMOTE:
        raise click.UsageError("gemma serve runs a model on this machine: --backend is auto, "
                               "llama.cpp or mlx (openai is for chat, run and bench --url)")
    with load(model, backend, ctx, threads, spinner=True, image_tokens=image_tokens) as opened:
        info = opened.backend.info
        names = served_names(opened, model)
        slots = served_slots(info, parallel)
        engine = parallel_engine(opened.backend, slots, max_queue) if slots > 1 else None
        if engine is not None:
            how = (f"{slots} requests at once, in parallel slots of {engine.n_ctx:,} tokens "
                   f"each{'' if parallel else ' (--parallel sets another number)'}")
        else:
            how = f"requests one at a time, context {info.n_ctx:,} tokens"
        if info.media:
            how += f"; takes {' and '.join(info.media)}"
        page = None
        if ui:
            loopback = host in ("127.0.0.1", "localhost", "::1")
            page = UISecurity(new_token(), port if loopback else None)
        switcher = ModelSwitcher(opened.resolved, backend, ctx, threads, parallel, max_queue) \
            if ui else None
        try:
            app_ = create_app(opened.backend, names, api_key=api_key, cors=cors or (),
                              engine=engine, max_queue=max_queue,
                              allow_remote_media=allow_remote_media, page=page,
                              switcher=switcher)
            stderr().print(f"serving [bold]{info.name}[/bold] ({info.backend}; {how}) at "
                           f"http://{host}:{port}/v1 (OpenAI) and /api (Ollama)"
                           f"{'; API key required' if api_key else ''}. Ctrl-C stops.")
            if page is not None:
                url = page_url("127.0.0.1" if host in ("0.0.0.0", "::") else host, port,
                               page.token)
                print(f"chat page: {url}", flush=True)
                if open_browser:
                    _open_soon(url)
            run_until_signalled(app_, host, port)
        finally:
            served = app_.state.server if "app_" in locals() else None
            if served is not None and served.backend is not opened.backend:
                # The page switched models (the first one is closed): close the one now loaded.
                if served.engine is not None:
                    served.engine.close()
                served.backend.close()
            elif engine is not None:
                engine.close()


def served_names(opened, model: str) -> list[str]:
    """The names a loaded model answers to: its own, its catalogue name and aliases, and what
    it was asked for by."""
    info, spec = opened.backend.info, opened.resolved.spec
    names = [info.name]
    if spec is not None:
        names += [spec.name, *spec.aliases]
    names.append(model)
    return names


def served_slots(info, parallel: int | None) -> int:
    slots = parallel if parallel is not None else default_parallel(info)
    if parallel is None and info.backend == "mlx" and info.media and slots > 1:
        slots = 1  # mlx-lm's batches take token ids only: pictures need one at a time
    return slots


class ModelSwitcher:
    """How the chat page changes the served model: find it (downloading a catalogue model,
    with progress), then load it as the server was started (backend, context, threads,
    slots)."""

    def __init__(self, current, backend: str, ctx, threads, parallel, max_queue: int):
        self.current = current
        self.backend, self.ctx, self.threads = backend, ctx, threads
        self.parallel, self.max_queue = parallel, max_queue

    def find(self, name: str, progress):
        from .. import loader

        policy = loader.PullPolicy(yes=True, quiet=True, progress=progress)
        return loader.find(name, loader.configured_backend(self.backend), policy)

    def load(self, resolved):
        from .. import loader

        options = loader.LoadOptions(n_ctx=self.ctx, threads=self.threads)
        opened = loader.load(resolved, loader.configured_backend(self.backend), options)
        slots = served_slots(opened.backend.info, self.parallel)
        engine = parallel_engine(opened.backend, slots, self.max_queue) if slots > 1 else None
        return opened.backend, served_names(opened, resolved.name), engine


def default_parallel(info) -> int:
    """Parallel slots when none are asked for: one per 8,192 tokens of the context (chosen
    from this machine's memory), up to 4."""
    return max(1, min(4, info.n_ctx // 8192))


def parallel_engine(backend, slots: int, max_queue: int):
    """The backend's parallel slots, or None (with a warning) where the model cannot batch."""
    from ..errors import BackendError

    if backend.info.backend == "llama.cpp":
        from ..backends.slots import SlotEngine

        backend.release_context()  # the slots' context takes its memory
        return SlotEngine(backend, slots, max_queue=max_queue)
    from ..backends.mlx_slots import MlxSlotEngine

    try:
        return MlxSlotEngine(backend, slots, max_queue=max_queue)
    except BackendError as exc:
        stderr().print(f"[yellow]--parallel {slots}: {exc}; serving one request at a "
                       "time[/yellow]")
        return None


def run_until_signalled(app_, host: str, port: int) -> None:
    """uvicorn, with SIGTERM and Ctrl-C cancelling every generation at once: in-flight requests
    get a 503 (or an error event), and the process exits within about two seconds."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app_.state.server.shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app_, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    Server(config).run()


def _open_soon(url: str) -> None:
    """Open the default browser on ``url`` once the server is listening (a moment after)."""
    import threading
    import webbrowser

    threading.Timer(1.0, lambda: webbrowser.open(url)).start()
