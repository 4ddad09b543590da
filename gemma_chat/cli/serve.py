"""``gemma serve``."""

from __future__ import annotations

from typing import Annotated

import click
import typer

from .common import BackendOpt, CtxOpt, ModelOpt, ThreadsOpt, app, load, stderr


@app.command()
def serve(
    model: ModelOpt = "gemma-3-270m",
    host: Annotated[str, typer.Option("--host", help="Interface to listen on; 0.0.0.0 exposes "
                                      "the server to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="GEMMA_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1 requests.")] = None,
    cors: Annotated[list[str] | None, typer.Option(
        "--cors", help="Allow browser requests from this origin (repeatable, or *).")] = None,
    backend: BackendOpt = "auto",
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    from ..server import create_app

    if not 0 < port < 65536:
        raise click.UsageError(f"invalid port {port}")
    with load(model, backend, ctx, threads, spinner=True) as opened:
        info, spec = opened.backend.info, opened.resolved.spec
        names = [info.name]
        if spec is not None:
            names += [spec.name, *spec.aliases]
        names.append(model)
        app_ = create_app(opened.backend, names, api_key=api_key, cors=cors or ())
        url = f"http://{host}:{port}/v1"
        stderr().print(f"serving [bold]{info.name}[/bold] ({info.backend}, context "
                       f"{info.n_ctx}) at {url}; requests are served one at a time"
                       f"{'; API key required' if api_key else ''}. Ctrl-C stops.")
        run_until_signalled(app_, host, port)


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
