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
) -> None:
    """Serve the model over OpenAI's (/v1/...) and Ollama's (/api/...) HTTP APIs."""
    from ..backends import REMOTE, normalize
    from ..server import create_app

    if not 0 < port < 65536:
        raise click.UsageError(f"invalid port {port}")
    if normalize(backend) == REMOTE:
        raise click.UsageError("gemma serve runs a model on this machine: --backend is auto, "
                               "llama.cpp or mlx (openai is for chat, run and bench --url)")
    with load(model, backend, ctx, threads, spinner=True, image_tokens=image_tokens) as opened:
        info, spec = opened.backend.info, opened.resolved.spec
        names = [info.name]
        if spec is not None:
            names += [spec.name, *spec.aliases]
        names.append(model)
        slots = parallel if parallel is not None else default_parallel(info)
        if parallel is None and info.backend == "mlx" and info.media and slots > 1:
            slots = 1  # mlx-lm's batches take token ids only: pictures need one at a time
        engine = parallel_engine(opened.backend, slots, max_queue) if slots > 1 else None
        if engine is not None:
            how = (f"{slots} requests at once, in parallel slots of {engine.n_ctx:,} tokens "
                   f"each{'' if parallel else ' (--parallel sets another number)'}")
        else:
            how = f"requests one at a time, context {info.n_ctx:,} tokens"
        if info.media:
            how += f"; takes {' and '.join(info.media)}"
        try:
            app_ = create_app(opened.backend, names, api_key=api_key, cors=cors or (),
                              engine=engine, max_queue=max_queue,
                              allow_remote_media=allow_remote_media)
            stderr().print(f"serving [bold]{info.name}[/bold] ({info.backend}; {how}) at "
                           f"http://{host}:{port}/v1 (OpenAI) and /api (Ollama)"
                           f"{'; API key required' if api_key else ''}. Ctrl-C stops.")
            run_until_signalled(app_, host, port)
        finally:
            if engine is not None:
                engine.close()


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
