"""``gemma run`` and ``gemma chat``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from ..errors import GemmaChatError
from .common import (
    ApiKeyOpt,
    AudioOpt,
    BackendOpt,
    CtxOpt,
    HideThinkingOpt,
    ImageOpt,
    ImageTokensOpt,
    MaxTokOpt,
    MinPOpt,
    ModelOpt,
    RepeatOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    ThinkOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    UrlOpt,
    YesOpt,
    app,
    dim,
    load,
    sampling_flags,
    stderr,
)

ToolsOpt = Annotated[Path | None, typer.Option(
    "--tools", help="Offer the documented functions of this Python file as tools; each call "
                    "runs your code after you confirm it (--yes: without asking).")]
ToolChoiceOpt = Annotated[str, typer.Option(
    "--tool-choice", help="auto (the model decides), required (it must call one), or a tool's "
                          "name; for the first turn of each answer.")]


RUN_DEFAULT = "gemma-3-270m"


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; stdin is appended after "
                                                    "a blank line.")] = None,
    model: ModelOpt = RUN_DEFAULT,
    backend: BackendOpt = "auto",
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as raw text, without the chat template (the default for "
                      "pretrained models).")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Use the chat template even for a "
                                       "pretrained model.")] = False,
    think: ThinkOpt = None,
    hide_thinking: HideThinkingOpt = False,
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
    format_: Annotated[str | None, typer.Option(
        "--format", help='Constrain the reply to JSON: "json" (any JSON object), or a JSON '
                         "schema (its text or a file).")] = None,
    json_schema: Annotated[str | None, typer.Option(
        "--json-schema", help="Constrain the reply to this JSON schema (its text or a "
                              "file).")] = None,
    tools_file: ToolsOpt = None,
    tool_choice: ToolChoiceOpt = "auto",
    image: ImageOpt = None,
    audio: AudioOpt = None,
    image_tokens: ImageTokensOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print model info and stats "
                                          "to stderr.")] = False,
    yes: YesOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Answer one prompt, streaming the reply to stdout."""
    from .. import generate as gen
    from ..media import load as load_media

    if raw and chat:
        raise click.UsageError("--raw and --chat exclude each other")
    stdin_text = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = gen.compose(prompt, stdin_text)
    overrides = sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    schema = wanted_schema(format_, json_schema)
    if tools_file is not None and schema is not None:
        raise click.UsageError("--tools and --format/--json-schema exclude each other")
    tools = offered_tools(tools_file, tool_choice, yes)
    # Read before the model loads: a bad file is a one-line error at once.
    media = [load_media(p, kind="image", allow_remote=True) for p in image or ()] + \
        [load_media(p, kind="audio") for p in audio or ()]
    for item in media:
        if item.note:
            dim(f"{item.name}: {item.note}")
    if url is not None:
        if raw:
            raise click.UsageError("--raw needs a local model: a server applies its own chat "
                                   "template")
        if tools is not None:
            raise click.UsageError("--tools is not offered to a model on a server yet")
        with load(None if model == RUN_DEFAULT else model, backend, ctx, threads,
                  spinner=False, url=url, api_key=api_key) as opened:
            run_remote(opened, text, system, think, hide_thinking, overrides, schema, media,
                       as_json, verbose)
        return
    with load(model, backend, ctx, threads, spinner=False, yes=yes,
              image_tokens=image_tokens) as opened:
        use_chat = chat or (opened.resolved.instruction_tuned and not raw)
        prompts = gen.PromptBuilder(opened.backend)
        thinking = gen.thinking_mode(prompts, think, chat=use_chat)
        ids = gen.prompt_ids(opened.backend, text, chat=use_chat, system=system,
                             thinking=thinking, media=media)
        capped = not (use_chat and opened.resolved.instruction_tuned)
        sampling = gen.default_sampling(opened.backend, capped=capped, **overrides)
        if verbose:
            print_info(opened.backend.info, use_chat, sampling)
        write = (lambda s: None) if as_json else stdout_writer()
        thoughts = ThoughtsToStderr(show=not (hide_thinking or as_json))
        if tools is not None:
            out, stats = tools_answer(opened.backend, text, system, tools, sampling,
                                      tool_choice, thinking, yes, media)
            write(out)
        else:
            options = {}
            if schema is not None:
                from ..structured import json_constraint

                options["constraint"] = json_constraint(opened.backend, schema)
            out, stats = gen.generate(opened.backend, ids, sampling, write,
                                      thought_ids=prompts.thought_ids, thoughts=thoughts,
                                      **options)
            if schema is not None and stats.stop_reason != "stop":
                stderr().print(f"[yellow]the reply ended early ({stats.stop_reason}), so its "
                               "JSON is incomplete: raise --max-tokens[/yellow]")
        thoughts.done()
        if as_json:
            record = {
                "model": opened.backend.info.name, "backend": opened.backend.info.backend,
                "prompt_format": "chat" if use_chat else "raw", "text": out,
                "sampling": sampling.to_dict(), "stats": stats.to_dict(),
            }
            if prompts.can_think:
                record["thinking"] = thinking
                record["thoughts"] = thoughts.text
        finish_output(out, record if as_json else None, stats, verbose)


def run_remote(opened, text: str, system: str | None, think: bool | None, hide_thinking: bool,
               overrides: dict, schema: dict | None, media, as_json: bool,
               verbose: bool) -> None:
    """``gemma run --url``: the prompt as a chat message to the server's model."""
    from .. import generate as gen
    from ..prompt import media_content

    backend = opened.backend
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": media_content(media, text) if media else text}]
    sampling = gen.default_sampling(backend, capped=not opened.resolved.instruction_tuned,
                                    **overrides)
    if verbose:
        dim(f"model   {backend.info.name} on {backend.url} (OpenAI API)")
    write = (lambda s: None) if as_json else stdout_writer()
    thoughts = ThoughtsToStderr(show=not (hide_thinking or as_json))
    response_format = None if schema is None else \
        {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    out, stats = gen.generate_messages(backend, messages, sampling, write, thinking=think,
                                       thoughts=thoughts, response_format=response_format)
    thoughts.done()
    if as_json:
        record = {"model": backend.info.name, "backend": backend.info.backend,
                  "url": backend.url, "prompt_format": "server", "text": out,
                  "sampling": sampling.to_dict(), "stats": stats.to_dict()}
        if thoughts.text:
            record["thoughts"] = thoughts.text
    finish_output(out, record if as_json else None, stats, verbose)


def finish_output(out: str, record: dict | None, stats, verbose: bool) -> None:
    """The end of `gemma run`: the JSON record (``--json``) or the newline the reply lacks,
    then the stats on stderr (``--verbose``)."""
    if record is not None:
        typer.echo(json.dumps(record, ensure_ascii=False))
    elif out and not out.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        print_stats(stats)


def tools_answer(backend, text: str, system: str | None, tools, sampling, choice: str,
                 thinking: bool, yes: bool, media=()):
    """``gemma run --tools``: the answer after the model's tool calls, each shown on stderr
    and run after a keypress (or at once with ``--yes``)."""
    from .. import generate as gen
    from ..prompt import media_content

    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": media_content(media, text) if media else text}]
    return gen.answer_with_tools(backend, messages, tools, sampling, choice=choice,
                                 thinking=thinking, note=dim,
                                 confirm=(lambda _shown, _args: True) if yes else ask_to_run)


def offered_tools(path: Path | None, choice: str, yes: bool):
    """The tools of ``--tools FILE`` (None without it), the ``--tool-choice`` checked; without
    a terminal to confirm calls on, only with ``--yes``."""
    if path is None:
        return None
    from ..local_tools import load_tools

    tools = load_tools(path)
    if choice not in ("auto", "required", *(t.name for t in tools)):
        raise click.UsageError(f"--tool-choice must be auto, required or one of: "
                               f"{', '.join(t.name for t in tools)}")
    if not yes and not sys.stdin.isatty():
        raise click.UsageError("a tool call runs your code: without a terminal to confirm "
                               "each one, say --yes to run them all")
    return tools


def ask_to_run(shown: str, _args: dict) -> bool:
    """Ask on the terminal before a tool call runs (the user's own code)."""
    sys.stderr.write(f"tool call {shown}: this runs your code. Run it? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def wanted_schema(format_: str | None, json_schema: str | None) -> dict | None:
    """The schema ``--format``/``--json-schema`` ask for, read before a model is loaded."""
    from ..structured import ANY_OBJECT, parse_schema

    if format_ is not None and json_schema is not None:
        raise click.UsageError("--format and --json-schema exclude each other")
    if format_ == "json":
        return dict(ANY_OBJECT)
    text = json_schema if json_schema is not None else format_
    return parse_schema(text) if text is not None else None


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
    think: ThinkOpt = None,
    hide_thinking: HideThinkingOpt = False,
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
    tools_file: ToolsOpt = None,
    tool_choice: ToolChoiceOpt = "auto",
    image_tokens: ImageTokensOpt = None,
    yes: YesOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Chat with a model: replies stream as they are generated."""
    from .. import generate as gen
    from .. import repl, sessions
    from ..chat import Conversation
    from ..loader import default_chat_model

    if list_:
        list_conversations()
        return
    overrides = sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens)
    err = stderr()
    if url is not None and tools_file is not None:
        raise click.UsageError("--tools is not offered to a model on a server yet")
    tools = offered_tools(tools_file, tool_choice, yes)
    saved = None
    if resume is not None:
        saved = sessions.load_latest() if resume == "last" else _load_named(resume)
        if model is None and saved.model:
            saved_path = Path(str(saved.model.get("path", "")))
            model = str(saved_path) if saved_path.exists() and url is None \
                else str(saved.model.get("name"))
    if model is None and url is None:
        model, why = default_chat_model()
        dim(f"using {model} ({why})")
    opened = load(model, backend, ctx, threads, spinner=True, yes=yes,
                  image_tokens=image_tokens, url=url, api_key=api_key)
    try:
        info = opened.backend.info
        if url is not None:
            dim(f"{info.name} on {opened.backend.url} (OpenAI API), context "
                f"{info.n_ctx or 'not stated'}, connected in {opened.load_s:.1f} s. /help for "
                "commands.")
        else:
            dim(f"{info.name}: {info.architecture}, {info.quantization}, {info.backend} on "
                f"{info.device}, context {info.n_ctx}, loaded in {opened.load_s:.1f} s. /help "
                "for commands.")
        if info.context_note:
            dim(info.context_note)
        pretrained = not opened.resolved.instruction_tuned
        sampling = gen.default_sampling(opened.backend, capped=pretrained, **overrides)
        if pretrained:
            err.print(f"[yellow]{escape(info.name)} is a pretrained (base) model, not trained "
                      f"to chat: expect it to ramble; replies stop after {sampling.max_tokens} "
                      f"tokens.[/yellow]")

        def load_model(name: str):
            if url is not None:  # another model on the same server
                return opened.backend.switch(name)
            return load(name, backend, ctx, threads, spinner=True).backend

        interactive = sys.stdin.isatty()
        rich_out = not plain and sys.stdout.isatty()
        renderer = repl.MarkdownRenderer() if rich_out else repl.PlainRenderer()
        convo = Conversation(opened.backend, system=system,
                             tools=[t.declaration() for t in tools] if tools else None)
        thinking = gen.thinking_mode(convo.prompts, think, chat=True)
        convo.thinking = thinking
        if convo.prompts.can_think:
            dim(f"thinking {'on' if thinking else 'off'} (/think on|off switches it)")
        app_ = repl.ChatApp(
            opened.backend, convo, sampling,
            renderer=renderer,
            note=lambda s: err.print(s, markup=False, style="dim"), load_model=load_model,
            autosave=None if no_autosave else sessions.Autosave(),
            show_thinking=not hide_thinking, tools=tools, tool_choice=tool_choice,
            confirm=(lambda _shown, _args: True) if yes else ask_to_run)
        if tools:
            dim(f"tools: {', '.join(t.name for t in tools)} (/tools lists them; "
                + ("calls run without asking" if yes else "each call asks before it runs")
                + ")")
        if saved is not None:
            if system is not None:
                saved.system = system
            if think is not None:
                saved.thinking = think
            dim(app_.restore(saved))
        lines = repl.terminal_lines(app_) if interactive else repl.stream_lines(sys.stdin)
        try:
            app_.run(lines)
        finally:
            app_.backend.close()  # /model may have replaced the backend
    finally:
        opened.backend.close()


def _load_named(resume: str):
    from .. import sessions

    if not resume.strip():
        raise click.UsageError("--resume needs a conversation file, or `last`")
    return sessions.load(Path(resume))


def list_conversations() -> None:
    from rich.console import Console
    from rich.table import Table

    from .. import sessions

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


class ThoughtsToStderr:
    """A thinking model's thoughts on stderr, dim, then the line they collapse to; stdout keeps
    only the answer. ``text`` has them all (for ``--json``)."""

    def __init__(self, show: bool = True):
        self.show = show
        self.pieces: list[str] = []
        self.tokens = 0
        self.start: float | None = None
        self.elapsed = 0.0
        self._err = stderr() if show else None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __call__(self, chunk) -> None:
        import time

        if self.start is None:
            self.start = time.monotonic()
            if self._err is not None:
                self._err.print("thinking...", style="dim italic")
        self.tokens += len(chunk.token_ids) or 1  # a server's piece: one token
        self.elapsed = time.monotonic() - self.start
        if chunk.text:
            self.pieces.append(chunk.text)
            if self._err is not None:
                self._err.print(chunk.text, style="dim", end="", markup=False,
                                highlight=False)

    def done(self) -> None:
        from ..repl import thought_summary

        if self.start is None:
            return
        if self._err is not None:
            self._err.print("")
        dim(thought_summary(self.elapsed, self.tokens))
        self.start = None


def stdout_writer():
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def print_info(info, chat: bool, sampling) -> None:
    err = stderr()
    err.print(f"[dim]model   {escape(info.name)} ({info.architecture}, {info.quantization}, "
              f"{info.n_params / 1e6:.0f}M params) {escape(str(info.path))}[/dim]")
    err.print(f"[dim]backend {info.backend} on {info.device}, {info.threads} threads, "
              f"context {info.n_ctx} of {info.n_ctx_train}[/dim]")
    if info.context_note:
        dim(f"        {info.context_note}")
    if info.weight_repack:
        dim(f"repack  {info.weight_repack}")
    err.print(f"[dim]prompt  {'Gemma chat template' if chat else 'raw text'}; "
              f"sampling {escape(str(sampling.to_dict()))}[/dim]")


def print_stats(stats) -> None:
    dim(f"prompt {stats.prompt_tokens} tokens ({stats.prompt_eval_tokens} evaluated, "
        f"{stats.prefill_tps:.1f} t/s) | generated {stats.generated_tokens} tokens "
        f"({stats.decode_tps:.1f} t/s) | ttft {stats.ttft_s * 1000:.0f} ms | "
        f"stop: {stats.stop_reason} | sampler: {stats.sampler}")
