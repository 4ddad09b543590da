"""The ``gemma`` command line: each command parses, calls one library function, prints.

Errors from the library arrive typed (:mod:`gemma_chat.errors`) and leave here as one line on
stderr and an exit code; ``GEMMA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from . import __version__
from .errors import GemmaChatError, Interrupted, ModelNotFound

app = typer.Typer(
    name="gemma",
    help="Talk to Google's Gemma models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- options shared by several commands -----------------------------------------------------
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Catalogue name or alias (2b-it), Hugging Face repo id, or a path to a .gguf file or "
         "a model folder.")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto, llama.cpp or mlx.")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", "-c", help="Context size in tokens "
                                               "(default: min(the model's, 8192)).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t",
                                                   help="CPU threads (default: every core).")]
TempOpt = Annotated[float | None, typer.Option("--temp", help="Temperature; 0 is greedy "
                                                  "(default: the model's, else 1.0).")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Top-k; 0 is off (default: 64).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Top-p; 1 is off "
                                                  "(default: 0.95).")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Min-p; 0 is off (default: 0).")]
RepeatOpt = Annotated[float | None, typer.Option("--repeat-penalty",
                                                    help="Repeat penalty; 1 is off (default: 1).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: random).")]
MaxTokOpt = Annotated[int | None, typer.Option(
    "--max-tokens", "-n",
    help="Stop after this many tokens (default: until the model stops; 256 for pretrained "
         "models, which rarely stop on their own).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Download a catalogue model that "
                                      "is not on disk without asking.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt (folded "
                                                  "into the first user turn: Gemma has no "
                                                  "system role).")]


def _sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens) -> dict:
    """The sampling flags of `run` and `chat`, checked before a model is loaded."""
    from .run import check_overrides

    overrides = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                     repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens)
    check_overrides(overrides)
    return overrides


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemma-chat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Talk to Google's Gemma models on your own machine."""


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; stdin is appended after "
                                                    "a blank line.")] = None,
    model: ModelOpt = "gemma-3-270m",
    backend: BackendOpt = "auto",
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as raw text, without the chat template (the default for "
                      "pretrained models).")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Use the chat template even for a "
                                       "pretrained model.")] = False,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the text "
                                          "and the stats.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print model info and stats "
                                          "to stderr.")] = False,
    yes: YesOpt = False,
) -> None:
    """Answer one prompt, streaming the reply to stdout."""
    from . import run as runmod

    if raw and chat:
        raise click.UsageError("--raw and --chat exclude each other")
    stdin_text = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = runmod.compose(prompt, stdin_text)
    overrides = _sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    resolved, engine = _load(model, backend, ctx, threads, spinner=False, yes=yes)
    try:
        use_chat = chat or (resolved.instruction_tuned and not raw)
        ids = runmod.prompt_ids(engine, text, chat=use_chat, system=system)
        capped = not (use_chat and resolved.instruction_tuned)
        sampling = runmod.default_sampling(engine, capped=capped, **overrides)
        if verbose:
            _print_info(engine.info, use_chat, sampling)
        write = (lambda s: None) if as_json else _stdout_writer()
        out, stats = runmod.run(engine, ids, sampling, write)
        if as_json:
            typer.echo(json.dumps({
                "model": engine.info.name, "backend": engine.info.backend,
                "prompt_format": "chat" if use_chat else "raw", "text": out,
                "sampling": sampling.to_dict(), "stats": stats.to_dict(),
            }, ensure_ascii=False))
        elif out and not out.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            _print_stats(stats)
    finally:
        engine.close()


def _pull_on_first_use(model: str, fmt: str, yes: bool):
    """A catalogue model that is not on disk: download it after asking (or with --yes).
    Never asks when stdin is not a terminal; returns None when not pulled."""
    from . import catalog, hub

    spec = catalog.load().get(model)
    if spec is None or hub.offline():
        return None
    if not yes:
        if not sys.stdin.isatty():
            raise ModelNotFound(f"{spec.name} is not on disk: run `gemma pull {model}` first "
                                "(or pass --yes to download it now)")
        if not typer.confirm(f"{spec.name} is not on disk. Download it now?", default=True,
                             err=True):
            return None
    return _pull_with_login(model, fmt, "q4", quiet=False)


def _pull_with_login(model: str, fmt: str, quant: str, quiet: bool):
    """``hub.pull``; on a gated repo at a terminal, offer to paste a token, log in with it
    (huggingface_hub's own login) and try again. In a script: the message and exit code."""
    import getpass

    from . import hub

    try:
        return hub.pull(model, fmt, quant, quiet=quiet, console=_stderr())
    except hub.GatedRepo as exc:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise
        err = _stderr()
        err.print(f"[yellow]{exc}[/yellow]")
        err.print(f"Accept the license at https://huggingface.co/{exc.repo}, then paste a "
                  "token from https://huggingface.co/settings/tokens (input hidden; empty to "
                  "give up).")
        token = getpass.getpass("Hugging Face token: ")
        if not token.strip():
            raise
        name = hub.login_with(token)
        err.print(f"[dim]logged in as {name}; the token is stored by huggingface_hub[/dim]")
        return hub.pull(model, fmt, quant, quiet=quiet, console=err)


def _load(model: str, backend: str, ctx: int | None, threads: int | None, spinner: bool,
          yes: bool = False):
    """Resolve and load a model; a spinner on stderr while it loads, when asked and on a tty."""
    import time

    from .backends import ensure_available, formats_for, load_backend
    from .resolve import resolve

    if backend == "auto":
        from . import config

        backend = config.get("default-backend") or "auto"
    ensure_available(backend)
    try:
        resolved = resolve(model, formats_for(backend))
    except ModelNotFound:
        resolved = _pull_on_first_use(model, formats_for(backend)[0], yes)
        if resolved is None:
            raise
    debug = bool(os.environ.get("GEMMA_DEBUG"))
    if resolved.format == "gguf":
        from .memory import load_warning

        warning = load_warning(resolved.path, ctx)
        if warning:
            _stderr().print(f"[yellow]warning: {warning}[/yellow]")
    start = time.perf_counter()
    if spinner and sys.stderr.isatty():
        with _stderr().status(f"loading {resolved.name} ({backend} backend)"):
            engine = load_backend(resolved, backend, n_ctx=ctx, threads=threads, verbose=debug)
    else:
        engine = load_backend(resolved, backend, n_ctx=ctx, threads=threads, verbose=debug)
    engine.load_s = time.perf_counter() - start
    for note in getattr(engine, "notes", ()):
        _stderr().print(f"[dim]{escape(note)}[/dim]")
    return resolved, engine


def _default_chat_model() -> tuple[str, str]:
    """The configured default, else ``2b-it`` when it is on disk, else the bundled demo model;
    never a download."""
    from . import catalog, config
    from .resolve import on_disk

    configured = config.get("default-model")
    if configured:
        return configured, "the configured default-model"
    if on_disk(catalog.get("2b-it")):
        return "2b-it", "Gemma 2 2B IT, found on disk"
    return "gemma-3-270m", "the bundled demo model"


@app.command()
def chat(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="As for `gemma run` (default: the configured default-model, else "
                              "2b-it when it is on disk, else the bundled gemma-3-270m).")] = None,
    backend: BackendOpt = "auto",
    system: SystemOpt = None,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Plain text replies, no Markdown "
                                        "rendering (the default when stdout is not a "
                                        "terminal).")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", "-r", help="Continue a conversation: a file saved with /save, an autosave "
                               "file, or `last`.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List recent conversations and "
                                        "exit.")] = False,
    no_autosave: Annotated[bool, typer.Option("--no-autosave", help="Do not append turns to "
                                              "the conversation history.")] = False,
    yes: YesOpt = False,
) -> None:
    """Chat with a model: replies stream as they are generated."""
    from . import repl, sessions
    from . import run as runmod
    from .chat import Conversation

    if list_:
        _list_conversations()
        return
    overrides = _sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    err = _stderr()
    saved = None
    if resume:
        path = sessions.recent(1)[0] if resume == "last" and sessions.recent(1) else None
        if resume == "last" and path is None:
            raise click.UsageError("there is no conversation to resume yet")
        saved = sessions.load(path or Path(resume))
        if model is None and saved.model:
            saved_path = Path(str(saved.model.get("path", "")))
            model = str(saved_path) if saved_path.exists() else str(saved.model.get("name"))
    if model is None:
        model, why = _default_chat_model()
        err.print(f"[dim]using {model} ({why})[/dim]")
    resolved, engine = _load(model, backend, ctx, threads, spinner=True, yes=yes)
    try:
        info = engine.info
        err.print(f"[dim]{info.name}: {info.architecture}, {info.quantization}, "
                  f"{info.backend} on {info.device}, context {info.n_ctx}, "
                  f"loaded in {engine.load_s:.1f} s. /help for commands.[/dim]")
        pretrained = not resolved.instruction_tuned
        sampling = runmod.default_sampling(engine, capped=pretrained, **overrides)
        if pretrained:
            err.print(f"[yellow]{info.name} is a pretrained (base) model, not trained to chat: "
                      f"expect it to ramble; replies stop after {sampling.max_tokens} "
                      f"tokens.[/yellow]")

        def load_model(name: str):
            return _load(name, backend, ctx, threads, spinner=True)[1]

        interactive = sys.stdin.isatty()
        rich_out = not plain and sys.stdout.isatty()
        renderer = repl.MarkdownRenderer() if rich_out else repl.PlainRenderer()
        app_ = repl.ChatApp(
            engine, Conversation(engine, system=system), sampling, renderer=renderer,
            note=lambda s: err.print(s, markup=False, style="dim"), load_model=load_model,
            autosave=None if no_autosave else sessions.Autosave())
        if saved is not None:
            if system is not None:
                saved.system = system
            err.print(f"[dim]{app_.restore(saved)}[/dim]")
        lines = repl.terminal_lines(app_) if interactive else repl.stream_lines(sys.stdin)
        try:
            app_.run(lines)
        finally:
            app_.backend.close()  # /model may have replaced the engine
    finally:
        engine.close()


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
    import uvicorn

    from .server import create_app

    if not 0 < port < 65536:
        raise click.UsageError(f"invalid port {port}")
    resolved, engine = _load(model, backend, ctx, threads, spinner=True)
    try:
        names = [engine.info.name]
        if resolved.spec is not None:
            names += [resolved.spec.name, *resolved.spec.aliases]
        names.append(model)
        app_ = create_app(engine, names, api_key=api_key, cors=cors or ())
        url = f"http://{host}:{port}/v1"
        _stderr().print(f"serving [bold]{engine.info.name}[/bold] ({engine.info.backend}, "
                        f"context {engine.info.n_ctx}) at {url}; requests are served one at a "
                        f"time{'; API key required' if api_key else ''}. Ctrl-C stops.")
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        engine.close()


def _list_conversations() -> None:
    from rich.console import Console
    from rich.table import Table

    from . import sessions

    table = Table(title="Recent conversations (gemma chat --resume FILE)", title_justify="left")
    for col in ("file", "model", "turns", "started with"):
        table.add_column(col)
    for path in sessions.recent():
        try:
            saved = sessions.load(path)
        except GemmaChatError:
            continue
        first = saved.exchanges[0].user if saved.exchanges else ""
        table.add_row(str(path), str(saved.model.get("name", "?")), str(len(saved.exchanges)),
                      first[:40] + ("..." if len(first) > 40 else ""))
    Console().print(table)


config_app = typer.Typer(help="Show or change settings (default-model, default-backend).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Set a setting: `gemma config set default-model 1b-it`."""
    from . import config

    config.set_value(key, value)
    typer.echo(f"{key} = {value}")


@config_app.command("get")
def config_get(key: str) -> None:
    """Print one setting."""
    from . import config

    value = config.get(key)
    typer.echo("" if value is None else value)


@config_app.command("unset")
def config_unset(key: str) -> None:
    """Remove a setting."""
    from . import config

    config.set_value(key, None)


@config_app.command("list")
def config_list() -> None:
    """Print every setting, and where the file is."""
    from . import config

    values = config.load()
    for key, meaning in config.KEYS.items():
        typer.echo(f"{key} = {values.get(key, '')}    # {meaning}")
    typer.echo(f"# {config.config_path()}")


def _stdout_writer():
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def _print_info(info, chat: bool, sampling) -> None:
    err = _stderr()
    err.print(f"[dim]model   {info.name} ({info.architecture}, {info.quantization}, "
              f"{info.n_params / 1e6:.0f}M params) {info.path}[/dim]")
    err.print(f"[dim]backend {info.backend} on {info.device}, {info.threads} threads, "
              f"context {info.n_ctx} of {info.n_ctx_train}[/dim]")
    if info.weight_repack:
        err.print(f"[dim]repack  {escape(info.weight_repack)}[/dim]")
    err.print(f"[dim]prompt  {'Gemma chat template' if chat else 'raw text'}; "
              f"sampling {sampling.to_dict()}[/dim]")


def _print_stats(stats) -> None:
    _stderr().print(
        f"[dim]prompt {stats.prompt_tokens} tokens ({stats.prompt_eval_tokens} evaluated, "
        f"{stats.prefill_tps:.1f} t/s) | generated {stats.generated_tokens} tokens "
        f"({stats.decode_tps:.1f} t/s) | ttft {stats.ttft_s * 1000:.0f} ms | "
        f"stop: {stats.stop_reason} | sampler: {stats.sampler}[/dim]"
    )


QuantOpt = Annotated[str, typer.Option("--quant", "-q", help="q4, q5, q8, f16, bf16, f32, or a "
                                        "llama.cpp type (q4_k_m, q6_k, ...).")]


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="A catalogue name or alias (`gemma models`).")],
    backend: BackendOpt = "auto",
    quant: QuantOpt = "q4",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Download a model's weights for the backend (into the Hugging Face cache)."""
    from .backends import formats_for
    from .quant import parse

    fmt = formats_for(backend)[0]
    parse(quant, fmt if fmt == "mlx" else "gguf")
    resolved = _pull_with_login(model, fmt, quant, quiet)
    _stderr().print(f"{resolved.name}: {resolved.path}")


def _local_rows():
    """(name, format, quantization, bytes, path, origin) of every model on disk: catalogue
    models wherever they are, and every GGUF and MLX folder in the store (converted ones too)."""
    from . import catalog, store
    from .resolve import ResolvedModel, find_local, on_disk

    rows, seen = [], set()

    def add(found) -> None:
        path = found.path
        if path.resolve() in seen:
            return
        seen.add(path.resolve())
        size = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append((found.name, found.format, _quant_of(found), size, path, found.origin))

    cat = catalog.load()
    for spec in cat.specs:
        for fmt in on_disk(spec):
            found = find_local(spec, fmt)
            if found is not None:
                add(found)
    root = store.models_dir()
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        spec = cat.get(folder.name)
        for item in sorted(folder.iterdir()):
            if item.name.startswith("."):
                continue  # a conversion in progress
            if item.suffix == ".gguf" and item.is_file():
                add(ResolvedModel(folder.name, item, "gguf", "store", spec))
            elif item.is_dir() and (item / "config.json").is_file():
                add(ResolvedModel(folder.name, item, "mlx", "store", spec))
    return rows


def _quant_of(found) -> str:
    if found.format == "gguf":
        from .gguf_file import read_gguf

        return read_gguf(found.path).quantization
    config = found.path / "config.json"
    try:
        bits = json.loads(config.read_text()).get("quantization", {}).get("bits")
    except (OSError, ValueError, AttributeError):
        bits = None
    return f"{bits}-bit" if bits else "unquantized"


@app.command("list")
def list_models() -> None:
    """The models on disk: name, format, quantization, size, path."""
    from rich.console import Console
    from rich.table import Table

    from .memory import human

    table = Table(title="Models on disk", title_justify="left")
    for col in ("name", "format", "quantization", "size", "where", "path"):
        table.add_column(col)
    for name, fmt, quant, size, path, origin in _local_rows():
        table.add_row(name, fmt, quant, human(size), origin, str(path))
    Console().print(table)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="Catalogue name or alias, or a path.")],
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Context size for the memory "
                                     "estimate.")] = 8192,
) -> None:
    """Architecture, context, parameters, quantization, files, license, memory needs."""
    from . import catalog, memory, template
    from .gguf_file import read_gguf
    from .resolve import resolve

    spec = catalog.load().get(model)
    lines = []
    local = None
    try:
        local = resolve(model, ("gguf", "mlx"))
    except ModelNotFound:
        if spec is None:
            raise
    if spec is None and local is not None:
        spec = local.spec
    if spec is not None:
        lines += [f"model          {spec.name} ({spec.display}), {spec.params} parameters, "
                  f"{'instruction-tuned' if spec.instruction_tuned else 'pretrained'}",
                  f"architecture   {spec.arch}, {spec.shape.get('layers')} layers, "
                  f"{spec.shape.get('heads')} heads / {spec.shape.get('kv_heads')} KV heads",
                  f"context        {spec.context:,} tokens",
                  f"license        {spec.license} (https://huggingface.co/{spec.hf_repo})",
                  "sources        GGUF: " + ", ".join(f"{k} {v.repo}/{v.file}"
                                                      for k, v in spec.gguf.items())]
    if local is not None:
        lines.append(f"on disk        {local.path} ({local.format}, {local.origin})")
        if local.format == "gguf":
            info = read_gguf(local.path)
            lines.append(f"quantization   {info.quantization}, {info.n_params / 1e6:,.0f}M "
                         f"parameters in the file")
            shape, arch = memory.shape_from_gguf(info)
            est = memory.estimate(shape, arch, info.file_size, ctx)
            lines.append(f"memory         about {memory.human(est.total)} at context {ctx} "
                         f"(weights {memory.human(est.weights)}, KV cache "
                         f"{memory.human(est.kv_cache)})")
            repacking = _repack_summary()
            if repacking:
                lines.append(f"repacking      {repacking}")
    else:
        lines.append("on disk        no (`gemma pull` downloads it)")
    lines.append("chat template  Gemma's (built in; templates in model files are never run): "
                 + template.PROMPT_FORMAT)
    typer.echo("\n".join(lines))


def _repack_summary() -> str:
    """llama.cpp's weight repacking on this machine, where llama-cpp-python is installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return ""
    from .backends import repack

    state = repack.prepare()
    if state.note:
        _stderr().print(f"[dim]{escape(state.note)}[/dim]")
    return state.describe()


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="A catalogue name or alias.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a model's files from the store and the Hugging Face cache."""
    import shutil

    from . import catalog, store
    from .memory import human

    spec = catalog.get(model)
    targets = [row for row in _local_rows() if row[0] == spec.name]
    if not targets:
        raise ModelNotFound(f"{spec.name} is not on disk")
    for _, fmt, _, size, path, origin in targets:
        typer.echo(f"{path} ({fmt}, {origin}, {human(size)})", err=True)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("pass --yes to delete without asking")
        if not typer.confirm("Delete these files?", err=True):
            return
    for _, _, _, _, path, origin in targets:
        if origin in ("store", "bundled"):
            shutil.rmtree(store.model_dir(spec.name), ignore_errors=True)
        elif origin == "hf-cache":
            _remove_from_hf_cache(path)
    typer.echo(f"removed {spec.name}", err=True)


def _remove_from_hf_cache(path: Path) -> None:
    """Delete the cached revision that holds ``path`` (its blobs too) with huggingface_hub."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir()
    real = path.resolve()
    for repo in info.repos:
        for revision in repo.revisions:
            if any(f.file_path == path or f.blob_path == real for f in revision.files) or \
                    revision.snapshot_path == path:
                info.delete_revisions(revision.commit_hash).execute()
                return


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A Hugging Face checkpoint folder, a .gguf file, "
                                          "or a catalogue name (its original weights are "
                                          "pulled first).")],
    to: Annotated[str | None, typer.Option(
        "--to", help="gguf or mlx (default: mlx on Apple Silicon, gguf elsewhere).")] = None,
    quant: Annotated[str | None, typer.Option(
        "--quant", "-q", help="q4, q5, q8, f16, bf16, f32; for GGUF also q4_0, q4_k_m, q5_k_m, "
                              "q6_k, q8_0 (default: q4; from a GGUF to MLX: bf16).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (or .gguf file) (default: the local store, where "
                      "`gemma chat -m NAME` finds it).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="Quantizer threads "
                                                "(default: all cores).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Download the original weights "
                                      "without asking.")] = False,
) -> None:
    """Convert Hugging Face weights or a GGUF into a (quantized) model for llama.cpp or MLX."""
    from . import convert as conv
    from .memory import human

    try:
        src = conv.locate(source)
    except ModelNotFound:
        from . import catalog

        spec = catalog.load().get(source)
        if spec is None:
            raise
        src = _pull_original(spec, yes)
    job = conv.plan(src, to, quant, out)
    err = _stderr()
    if src.note:
        err.print(f"[dim]from {src.note}[/dim]", soft_wrap=True)
    for warning in job.warnings:
        err.print(f"[yellow]warning: {warning}[/yellow]", soft_wrap=True)
    with _progress_bars(err) as progress:
        result = conv.run(job, progress=progress, threads=threads)
    src_size = src.size
    err.print(f"{src.path.name} ({human(src_size)}) -> {job.target} ({human(result.size)}, "
              f"{job.quant}, {result.size / max(src_size, 1):.0%} of the source) in "
              f"{result.seconds:.0f} s", soft_wrap=True)
    err.print(f"[dim]chat with it: {conv.chat_hint(result)}[/dim]", soft_wrap=True)


def _pull_original(spec, yes: bool):
    """A catalogue model's original checkpoint, downloaded after asking (or with --yes)."""
    from . import convert as conv
    from . import hub

    if hub.offline():
        raise ModelNotFound(f"{spec.name}'s original weights ({spec.hf_repo}) are not on disk "
                            "and HF_HUB_OFFLINE is set")
    if not yes:
        if not sys.stdin.isatty():
            raise ModelNotFound(f"{spec.name}'s original weights ({spec.hf_repo}) are not on "
                                "disk: pass --yes to download them")
        if not typer.confirm(f"Download {spec.name}'s original weights ({spec.hf_repo})?",
                             default=True, err=True):
            raise ModelNotFound(f"{spec.name}'s original weights are not on disk")
    resolved = _pull_with_login(spec.name, "hf", "bf16", quiet=False)
    return conv.Source("hf", resolved.path, spec.name, f"the original weights ({spec.hf_repo})")


@contextmanager
def _progress_bars(console):
    """A progress callable (stage, done, total, detail="") drawing one Rich bar per stage."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(), TimeElapsedColumn(), TextColumn("[dim]{task.fields[detail]}"),
                    console=console, transient=False, disable=not console.is_terminal)
    tasks: dict[str, int] = {}

    def update(stage: str, done: float, total: float | None, detail: str = "") -> None:
        if stage not in tasks:
            for other in tasks.values():  # a new stage: the earlier ones are finished
                task = bars.tasks[other]
                bars.update(other, total=task.total or 1, completed=task.total or 1, detail="")
            tasks[stage] = bars.add_task(stage, total=total, detail=detail)
        bars.update(tasks[stage], completed=done, total=total, detail=detail)

    with bars:
        yield update
        for task_id in tasks.values():
            task = bars.tasks[task_id]
            bars.update(task_id, total=task.total or 1, completed=task.total or 1, detail="")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"{flag} takes comma-separated integers, not {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise click.UsageError(f"{flag} takes positive integers")
    return values


@app.command()
def bench(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Model to measure (repeatable).")] = None,
    backend: BackendOpt = "auto",
    prompt: Annotated[str, typer.Option("-p", "--n-prompt", help="Prompt sizes for pp tests "
                                        "(comma list).")] = "512",
    gen: Annotated[str, typer.Option("-n", "--n-gen", help="Token counts for tg tests "
                                     "(comma list).")] = "128",
    reps: Annotated[int, typer.Option("-r", "--repetitions", help="Repetitions of each test, "
                                      "after one warm-up.")] = 5,
    depth: Annotated[str, typer.Option("-d", "--depth", help="Tokens already in the KV cache "
                                       "(comma list).")] = "0",
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    chat_turns: Annotated[int, typer.Option("--chat-turns", help="Instead: a growing chat of "
                                            "this many turns.")] = 0,
    bandwidth: Annotated[float | None, typer.Option(
        "--bandwidth", help="The machine's peak memory bandwidth in GB/s, for the roofline "
                            "percentage.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, md, json or csv (default: table "
                                     "on a terminal, md otherwise).")] = "",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Append the results "
                                                "(JSON lines, with machine info).")] = None,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(
        "--compare", help="Print the ratios between two --output files and exit.")] = None,
) -> None:
    """Measure prompt processing (pp) and generation (tg) speed, time to first token, load
    time and peak memory, like llama-bench, through gemma-chat's own generation loop."""
    from . import bench as benchmod
    from . import bench_report as report

    if compare:
        a, b = (report.read_jsonl(p) for p in compare)
        lines = ["| model | backend | test | a t/s | b t/s | b/a |", "|---|---|---|---:|---:|---:|"]
        for m, be, t, ta, tb, ratio in report.compare(a, b):
            lines.append(f"| {m} | {be} | {t} | {ta:.2f} | {tb:.2f} | {ratio:.3f} |")
        typer.echo("\n".join(lines))
        return
    if reps < 1:
        raise click.UsageError("-r must be at least 1")
    fmt = fmt or ("table" if sys.stdout.isatty() else "md")
    if fmt not in ("table", "md", "json", "csv"):
        raise click.UsageError(f"unknown --format {fmt!r}; use table, md, json or csv")
    prompts, gens, depths = _int_list(prompt, "-p"), _int_list(gen, "-n"), _int_list(depth, "-d")
    if any(n < 2 for n in gens):
        raise click.UsageError("-n must be at least 2 (the first token comes from the prompt)")
    need = max(depths) + max(max(prompts), max(gens)) + 16
    spec_ctx = ctx or (4096 if chat_turns else need)
    models_ = model or ["gemma-3-270m"]
    err = _stderr()
    reports = []
    with err.status("starting") as status:
        for name in models_:
            spec = {"model": name, "backend": backend, "prompts": prompts, "gens": gens,
                    "reps": reps, "depths": depths, "threads": threads, "ctx": spec_ctx,
                    "chat_turns": chat_turns}
            reports.append(benchmod.measure(spec, progress=lambda t: status.update(t)))
    if output is not None:
        record_machine = benchmod.machine_info()
        with open(output, "a", encoding="utf-8") as fh:
            for rep in reports:
                fh.write(json.dumps({"time": time_now(), "machine": record_machine, **rep})
                         + "\n")
    sampler = reports[0]["results"][0]["sampler"] if reports and reports[0]["results"] else ""
    if fmt == "json":
        typer.echo(json.dumps({"machine": benchmod.machine_info(), "reports": reports},
                              indent=2))
    elif fmt == "csv":
        typer.echo(report.csv_text(reports), nl=False)
    elif fmt == "md":
        typer.echo(report.markdown(reports, bandwidth))
        typer.echo(f"\nsampler: {sampler}; t/s mean ± sd over {reps} runs")
        for line in report.repack_lines(reports):
            typer.echo(line)
    else:
        from rich.console import Console

        console = Console()
        console.print(report.table(reports, bandwidth, sampler))
        for line in report.repack_lines(reports):
            console.print(f"[dim]{escape(line)}[/dim]")


def time_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON.")] = False,
) -> None:
    """List the Gemma models in the catalogue, and which are on disk."""
    from . import catalog
    from .resolve import on_disk

    specs = catalog.load().specs
    rows = [(spec, on_disk(spec)) for spec in specs]
    if as_json:
        typer.echo(json.dumps([{**spec.to_dict(), "on_disk": disk} for spec, disk in rows],
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Gemma models", title_justify="left")
    for col, kw in (("name", {"style": "bold"}), ("aliases", {}), ("params", {"justify": "right"}),
                    ("context", {"justify": "right"}), ("type", {}), ("weights", {}),
                    ("on disk", {})):
        table.add_column(col, **kw)
    for spec, disk in rows:
        weights = [b for b, has in (("gguf", spec.gguf), ("mlx", spec.mlx)) if has]
        table.add_row(spec.name, ", ".join(spec.aliases), spec.params, f"{spec.context:,}",
                      spec.tuned.upper(), ", ".join(weights), ", ".join(disk) or "-")
    Console().print(table)


def _interrupted() -> int:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    print("\ninterrupted", file=sys.stderr)
    return Interrupted.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gemma`` script; returns the exit code."""
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("GEMMA_DEBUG"))
    try:
        result = command.main(args=argv, prog_name="gemma", standalone_mode=False)
        if result == Interrupted.exit_code:  # Typer turns Ctrl-C into a returned 130
            return _interrupted()
        return result if isinstance(result, int) else 0
    except GemmaChatError as exc:
        if debug:
            raise
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help())
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _interrupted()
    except BrokenPipeError:
        # `gemma run ... | head -1`: the reader left; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # the last line of defence: never a traceback by default
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (set GEMMA_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
