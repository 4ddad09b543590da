"""``gemma chat``: the interactive loop. Given a backend, never builds one (``load_model`` is
injected for ``/model``).

On a terminal, input comes from prompt-toolkit (history, Ctrl-R search, completion of slash
commands, multi-line input, a bottom toolbar with the context meter) and replies render as
Markdown with Rich while they stream. Otherwise each line of stdin is one user turn and replies
are plain text, so ``printf 'hi\\nbye\\n' | gemma chat`` works.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import sessions, store
from .backends.base import Backend, SamplingParams
from .chat import Conversation
from .errors import GemmaChatError

EXIT_COMMANDS = ("/exit", "/bye", "/quit")
MULTILINE = '"""'

#: /set names -> SamplingParams fields.
SETTINGS = {
    "temp": "temperature", "temperature": "temperature", "top-k": "top_k", "top-p": "top_p",
    "min-p": "min_p", "repeat-penalty": "repeat_penalty", "seed": "seed",
    "max-tokens": "max_tokens",
}


# -- output -------------------------------------------------------------------------------

def thought_summary(seconds: float, tokens: int) -> str:
    """The line a finished thought collapses to."""
    return f"thought for {seconds:.1f} s, {tokens} token{'s' * (tokens != 1)}"


class PlainRenderer:
    """Reply text as it arrives, unformatted (pipes, ``--plain``); thoughts go to ``err``,
    labelled, so stdout holds only the answer."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO | None = None):
        self.out = out
        self.err = err
        self._thinking = False

    def start(self) -> None:
        self._thinking = False

    def think(self, text: str) -> None:
        err = self.err or sys.stderr
        if not self._thinking:
            err.write("[thinking] ")
            self._thinking = True
        err.write(text)
        err.flush()

    def thought(self, summary: str) -> None:
        err = self.err or sys.stderr
        err.write(("\n" if self._thinking else "") + f"[{summary}]\n")
        err.flush()
        self._thinking = False

    def feed(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


class _Tail:
    """Renders only the last screenful of a renderable, so a long streaming reply shows its
    newest lines instead of overflowing the live area."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


class MarkdownRenderer:
    """Reply rendered as Markdown (code highlighted) in a Rich Live view that re-renders as
    tokens arrive. The live view is transient: when the reply ends it is replaced by one final
    rendering, so nothing flickers or prints twice."""

    def __init__(self, console=None, fps: float = 12.0):
        from rich.console import Console

        self.console = console or Console()
        self.interval = 1.0 / fps
        self.text = ""
        self.live = None
        self._last = 0.0

    def start(self) -> None:
        from rich.live import Live

        self.text = ""
        self.thoughts = ""
        self.live = Live(console=self.console, auto_refresh=False, transient=True,
                         vertical_overflow="visible")
        self.live.start()

    def think(self, text: str) -> None:
        """Thoughts stream in a dim, labelled region, replaced by one line when they end."""
        import time

        from rich.text import Text

        self.thoughts += text
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.live.update(_Tail(Text("thinking...\n" + self.thoughts, style="dim italic")),
                             refresh=True)

    def thought(self, summary: str) -> None:
        from rich.text import Text

        self.live.update(Text(""), refresh=True)
        self.console.print(Text(summary, style="dim"))
        self.thoughts = ""

    def feed(self, text: str) -> None:
        import time

        from rich.markdown import Markdown

        self.text += text
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.live.update(_Tail(Markdown(self.text)), refresh=True)

    def end(self) -> None:
        from rich.markdown import Markdown

        if self.live is not None:
            self.live.stop()
            self.live = None
        self.console.print(Markdown(self.text))


class ThoughtView:
    """Routes a stream's chunks to a renderer: thoughts to its thinking region (or nowhere,
    when hidden), and, when the answer starts, the one-line summary they collapse to."""

    def __init__(self, renderer, show: bool = True):
        self.renderer, self.show_thoughts = renderer, show
        self.start: float | None = None
        self.tokens = 0
        self.elapsed = 0.0

    def show(self, chunk) -> None:
        import time

        if chunk.thought:
            if self.start is None:
                self.start = time.monotonic()
            self.tokens += len(chunk.token_ids) or 1  # a server's piece: one token
            self.elapsed = time.monotonic() - self.start
            if chunk.text and self.show_thoughts:
                self.renderer.think(chunk.text)
            return
        if chunk.text:
            self.done()
            self.renderer.feed(chunk.text)

    def done(self) -> None:
        """Collapse the thoughts, if any are still open."""
        if self.start is not None:
            self.renderer.thought(thought_summary(self.elapsed, self.tokens))
            self.start = None


# -- the session ----------------------------------------------------------------------------

@dataclass
class Command:
    handler: Callable[[ChatApp, str], object]
    usage: str
    help: str


class ChatApp:
    """One chat: the conversation, its settings, the commands, and the output."""

    def __init__(
        self,
        backend: Backend,
        conversation: Conversation,
        sampling: SamplingParams,
        *,
        renderer=None,
        note: Callable[[str], object] | None = None,
        load_model: Callable[[str], Backend] | None = None,
        autosave: sessions.Autosave | None = None,
        editor: Callable[[str], str] | None = None,
        show_thinking: bool = True,
        tools: list | None = None,
        confirm: Callable[[str, dict], bool] | None = None,
        tool_choice: str = "auto",
    ):
        self.backend = backend
        self.conversation = conversation
        self.sampling = sampling
        self.renderer = renderer or PlainRenderer()
        self.note = note or (lambda s: print(s, file=sys.stderr))
        self.load_model = load_model
        self.autosave = autosave
        self._autosave_warned = False
        self.editor = editor or edit_in_editor
        self.created = sessions.now()
        self.replies = 0
        self.show_thinking = show_thinking
        self.tools = tools or []  # gemma_chat.local_tools.LocalTool, offered to the model
        self.confirm = confirm or (lambda _shown, _args: False)
        self.tool_choice = tool_choice
        self._view: ThoughtView | None = None
        self.attached: list = []  # pictures and clips for the next message (gemma_chat.media)

    # -- turns --

    def ask(self, text: str) -> None:
        """Send one user message and stream the reply (Ctrl-C stops it); with tools, the
        model's calls are shown, confirmed and run on the way. Attached pictures and clips go
        with it, and so does a picture or clip whose file the message names, as Ollama does."""
        self._attach_named(text)
        media, self.attached = self.attached, []
        if self.tools:
            self._stream(lambda: self.conversation.send(
                text, self.sampling, run_calls=self._run_calls, tool_choice=self.tool_choice,
                media=media))
        else:
            self._stream(lambda: self.conversation.send(text, self.sampling, media=media))

    def _attach_named(self, text: str) -> None:
        """Attach the existing picture and sound files a message names (for a model that
        takes them), each said on a line."""
        from .media import MediaError, load, looks_like_media

        kinds = self.backend.info.media
        if not kinds:
            return
        for word in text.split():
            word = word.strip("'\"`()[]<>,;")
            if not looks_like_media(word) or "://" in word:
                continue
            path = Path(os.path.expanduser(word))
            if not path.is_file() or any(m.source == str(path) for m in self.attached):
                continue
            try:
                item = load(str(path))
            except MediaError as exc:
                self.note(f"(not attached: {exc})")
                continue
            if item.kind in kinds:
                self.attached.append(item)
                self.note(f"(attached {item.describe()}: the message names it)")

    def _attach(self, kind: str, arg: str) -> None:
        from .backends.base import cannot_take
        from .media import load

        if not arg:
            raise_usage(f"usage: /{kind} {'PATH|URL' if kind == 'image' else 'PATH'}")
        item = load(os.path.expanduser(arg) if "://" not in arg else arg, kind=kind,
                    allow_remote=True)
        if kind not in self.backend.info.media:
            raise cannot_take(self.backend.info, item)
        self.attached.append(item)
        extra = f"; {item.note}" if item.note else ""
        self.note(f"(attached {item.describe()}{extra}: it goes with your next message)")

    def _run_calls(self, calls: list[dict]) -> list[dict]:
        """Between two model turns: the reply so far is closed, each call is shown and run
        if confirmed, then the next turn renders afresh."""
        from .local_tools import run_calls

        self._end_reply()
        results = run_calls(calls, self.tools, self.confirm, self.note)
        self.renderer.start()
        self._view = ThoughtView(self.renderer, self.show_thinking)
        return results

    def _end_reply(self) -> None:
        if self._view is not None:
            self._view.done()
            self.renderer.end()
            self._view = None

    def _stream(self, make_stream: Callable[[], Iterator]) -> None:
        try:
            stream = make_stream()
            first = next(stream, None)  # raises before output when the turn is refused
        except GemmaChatError as exc:
            self.note(f"error: {exc}")
            return
        except KeyboardInterrupt:  # during prefill: the exchange is recorded, empty
            self.note("[interrupted]")
            self._autosave()
            return
        if self.conversation.dropped:
            n = self.conversation.dropped
            self.note(f"(dropped the {n} oldest exchange{'s' * (n > 1)} to fit the context)")
        self.renderer.start()
        self._view = ThoughtView(self.renderer, self.show_thinking)
        try:
            for chunk in ([first] if first is not None else []):
                self._view.show(chunk)
            for chunk in stream:
                self._view.show(chunk)
        except KeyboardInterrupt:
            stream.close()  # records the partial reply, marked interrupted
            self._end_reply()
            self.note("[interrupted]")
        except GemmaChatError as exc:  # e.g. a model that keeps calling tools
            self._end_reply()
            self.note(f"error: {exc}")
        else:
            self._end_reply()
            self.replies += 1
        stats = self.conversation.last_stats
        if stats is not None and stats.cache_note:
            self.note(f"({stats.cache_note})")
        self._autosave()

    def _autosave(self) -> None:
        if self.autosave is not None and self.conversation.exchanges:
            self.autosave.exchange(self.conversation, self.sampling.to_dict())
        self._autosave_warning()

    def _autosave_warning(self) -> None:
        """Say once that autosaving fails (and once more when it works again)."""
        problem = self.autosave.problem if self.autosave is not None else None
        if problem and not self._autosave_warned:
            self.note(f"warning: {problem}")
        elif not problem and self._autosave_warned:
            self.note("(autosaving works again; nothing was lost)")
        self._autosave_warned = bool(problem)

    # -- commands --

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/") or text.startswith("//"):
            self.ask(text[1:] if text.startswith("//") else line)
            return True
        name, _, arg = text.partition(" ")
        name = name.lower()
        if name in EXIT_COMMANDS:
            return False
        command = COMMANDS.get(name)
        if command is None:
            close = [c for c in COMMANDS if c.startswith(name[:3])]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            self.note(f"unknown command {name}{hint} (/help lists them)")
            return True
        try:
            command.handler(self, arg.strip())
        except GemmaChatError as exc:
            self.note(f"error: {exc}")
        return True

    def cmd_help(self, arg: str) -> None:
        lines = [f"  {c.usage:<22} {c.help}" for c in COMMANDS.values()]
        lines.append(f"  {'/exit, /bye':<22} leave (Ctrl-D works too)")
        lines.append(f'  {MULTILINE + " ... " + MULTILINE:<22} a multi-line message '
                     "(Alt-Enter also inserts a newline)")
        lines.append("  Ctrl-C stops a reply and keeps what was written; "
                     "Ctrl-X Ctrl-E edits the message in $EDITOR")
        self.note("\n".join(lines))

    def cmd_tools(self, arg: str) -> None:
        if not self.tools:
            self.note("no tools (gemma chat --tools FILE.py offers a file's functions)")
            return
        lines = []
        for tool in self.tools:
            properties = tool.parameters.get("properties", {})
            required = set(tool.parameters.get("required", []))
            args = ", ".join(
                f"{k}: " + ("|".join(map(str, v["enum"])) if "enum" in v else v.get("type", "any"))
                + ("" if k in required else "?") for k, v in properties.items())
            lines.append(f"  {tool.name}({args})  {tool.description}".rstrip())
        lines.append("  (a call runs your code on this machine)")
        self.note("\n".join(lines))

    def cmd_image(self, arg: str) -> None:
        self._attach("image", arg)

    def cmd_audio(self, arg: str) -> None:
        self._attach("audio", arg)

    def cmd_clear(self, arg: str) -> None:
        self.conversation.clear()
        if self.autosave is not None:
            self.autosave.reset()
        self.note("(new conversation)")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.note(f"system prompt: {self.conversation.system!r}" if self.conversation.system
                      else "no system prompt (/system TEXT sets one)")
            return
        self.conversation.set_system(None if arg.lower() in ("off", "none") else arg)
        self._record({"type": "system", "system": self.conversation.system})
        folded = self.conversation.prompts.format.name == "gemma"
        self.note("(system prompt removed)" if self.conversation.system is None
                  else "(system prompt set; Gemma folds it into the first user turn)" if folded
                  else "(system prompt set)")

    def cmd_think(self, arg: str) -> None:
        convo = self.conversation
        if not arg:
            state = "on" if convo.thinking else "off"
            can = "" if convo.prompts.can_think else f" ({self.backend.info.name} cannot think)"
            self.note(f"thinking is {state}{can}; /think on|off switches it")
            return
        if arg.lower() not in ("on", "off"):
            raise_usage("usage: /think on|off")
        convo.set_thinking(arg.lower() == "on")
        self._record({"type": "thinking", "thinking": convo.thinking})
        self.note("(thinking on: the model thinks before it answers)" if convo.thinking
                  else "(thinking off)")

    def cmd_undo(self, arg: str) -> None:
        if self.conversation.undo() is None:
            self.note("nothing to undo")
            return
        self._record({"type": "undo"})
        self.note(f"(dropped the last exchange; {len(self.conversation.exchanges)} left)")

    def cmd_retry(self, arg: str) -> None:
        if not self.conversation.exchanges:
            self.note("nothing to retry yet")
            return
        self._record({"type": "undo"})
        self._stream(lambda: self.conversation.retry(self.sampling))

    def cmd_set(self, arg: str) -> None:
        if not arg:
            current = self.sampling.to_dict()
            self.note("  ".join(f"{name} {current[field]}" for name, field in SETTINGS.items()
                                if name != "temperature"))
            return
        parts = arg.split()
        if len(parts) != 2 or parts[0].lower() not in SETTINGS:
            raise_usage(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
        field, raw = SETTINGS[parts[0].lower()], parts[1]
        value = parse_setting(field, raw)
        self.sampling = self.sampling.with_overrides(**{field: value}) if value is not None \
            else _unset(self.sampling, field)
        self.note(f"({parts[0]} = {getattr(self.sampling, field)})")

    def cmd_stats(self, arg: str) -> None:
        info, stats = self.backend.info, self.conversation.last_stats
        used = self.conversation.context_used()
        line = (f"context {used}/{info.n_ctx or '?'} tokens, "
                f"{len(self.conversation.exchanges)} exchanges")
        if stats is not None:
            line += (f"; last turn: prompt {stats.prompt_tokens} tokens "
                     f"({stats.prompt_eval_tokens} evaluated, {stats.cached_tokens} from the KV "
                     f"cache), ttft {stats.ttft_s * 1000:.0f} ms, {stats.generated_tokens} tokens "
                     f"at {stats.decode_tps:.1f} t/s, stop: {stats.stop_reason}")
            if stats.thought_tokens:
                line += f"; {thought_summary(stats.thinking_s, stats.thought_tokens)}"
            if stats.cache_note:
                line += f" ({stats.cache_note})"
            if self.conversation.remote and not stats.prompt_tokens:
                line += " (the server reports no usage: tokens counted as streamed pieces)"
        self.note(line)

    def cmd_info(self, arg: str) -> None:
        info = self.backend.info
        if self.conversation.remote:
            self.note("\n".join([
                f"model         {info.name} on {self.backend.url}",
                "backend       a server with OpenAI's API (it renders the template and keeps "
                "the KV cache)",
                f"context       {info.n_ctx or 'not stated by the server'}",
                f"sampling      {self.sampling.to_dict()}",
            ]))
            return
        self.note("\n".join([
            f"model         {info.name}  ({info.path})",
            f"architecture  {info.architecture}, {info.n_params / 1e6:,.0f}M parameters, "
            f"{'instruction-tuned' if info.instruction_tuned else 'pretrained'}",
            f"quantization  {info.quantization}",
            f"backend       {info.backend} on {info.device}"
            + (f", {info.threads} threads" if info.threads else ""),
            f"context       {info.n_ctx} tokens (the model allows {info.n_ctx_train})",
            *([f"repacking     {info.weight_repack}"] if info.weight_repack else []),
            f"sampling      {self.sampling.to_dict()}",
            "prompt format " + self.conversation.prompts.format.description,
        ]))

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise_usage("usage: /save FILE")
        path = Path(os.path.expanduser(arg))
        kv = sessions.save(self.conversation, path, self.sampling.to_dict(), self.created)
        where = (f", KV state in {kv.name})" if kv else
                 "; the KV state stays on the server)" if self.conversation.remote else ")")
        self.note(f"(saved to {path}{where}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise_usage("usage: /load FILE")
        saved = sessions.load(Path(os.path.expanduser(arg)))  # errors leave the chat as is
        self.note(self.restore(saved))

    def restore(self, saved: sessions.Saved) -> str:
        message = sessions.restore(self.conversation, saved)
        if saved.created:
            self.created = saved.created
        if self.autosave is not None:
            self.autosave.reset()
            if saved.path is not None and saved.path.suffix == ".jsonl" and \
                    saved.path.parent == sessions.conversations_dir():
                self.autosave.resume(saved.path)  # an autosaved chat goes on in its own file
            else:
                self.autosave.start(self.conversation, self.sampling.to_dict())
            self._autosave_warning()
        return message

    def cmd_model(self, arg: str) -> None:
        if not arg:
            self.note(f"model: {self.backend.info.name} (/model NAME switches)")
            return
        if self.load_model is None:
            raise_usage("switching models is not available here")
        new = self.load_model(arg)  # on failure the old model stays
        old, self.backend = self.backend, new
        self.conversation.rebind(new)
        old.close()
        self.note(f"(now using {new.info.name}; the conversation is kept)")

    def cmd_edit(self, arg: str) -> None:
        text = self.editor(arg)
        if text.strip():
            self.ask(text)
        else:
            self.note("(empty message, nothing sent)")

    def _record(self, event: dict) -> None:
        if self.autosave is not None:
            self.autosave.record(self.conversation, self.sampling.to_dict(), event)
        self._autosave_warning()

    # -- the toolbar --

    def toolbar(self) -> str:
        info, stats = self.backend.info, self.conversation.last_stats
        used = self.conversation.context_used()
        parts = [f"{info.name}", f"context {used}/{info.n_ctx or '?'}"]
        if stats is not None:
            parts.append(f"{stats.decode_tps:.1f} t/s")
        if self.conversation.dropped:
            parts.append(f"dropped {self.conversation.dropped} old exchanges")
        if self.attached:
            parts.append(f"{len(self.attached)} attached")
        parts.append("/help")
        return "  |  ".join(parts)

    def run(self, lines: Iterable[str]) -> int:
        """Handle lines until one ends the chat; return the number of replies."""
        for line in lines:
            if not self.handle(line):
                break
        return self.replies


def raise_usage(message: str):
    from .errors import InvalidArgument

    raise InvalidArgument(message)


def parse_setting(field: str, raw: str) -> object:
    """A /set value as the field's type; None means unset (seed, max_tokens)."""
    if field in ("seed", "max_tokens") and raw.lower() in ("none", "off", "random"):
        return None
    try:
        return int(raw) if field in ("top_k", "seed", "max_tokens") else float(raw)
    except ValueError:
        raise_usage(f"invalid value {raw!r} for {field}")


def _unset(sampling: SamplingParams, field: str) -> SamplingParams:
    from dataclasses import replace

    return replace(sampling, **{field: None})


COMMANDS: dict[str, Command] = {
    "/help": Command(ChatApp.cmd_help, "/help", "this help"),
    "/clear": Command(ChatApp.cmd_clear, "/clear", "start a new conversation"),
    "/system": Command(ChatApp.cmd_system, "/system [TEXT|off]", "show or set the system prompt"),
    "/think": Command(ChatApp.cmd_think, "/think [on|off]", "let a thinking model (Gemma 4) "
                      "think before it answers"),
    "/retry": Command(ChatApp.cmd_retry, "/retry", "regenerate the last answer"),
    "/undo": Command(ChatApp.cmd_undo, "/undo", "drop the last exchange"),
    "/save": Command(ChatApp.cmd_save, "/save FILE", "save the conversation (and its KV state)"),
    "/load": Command(ChatApp.cmd_load, "/load FILE", "load a saved conversation"),
    "/set": Command(ChatApp.cmd_set, "/set [NAME VALUE]", "show or change sampling (temp, "
                    "top-k, top-p, min-p, repeat-penalty, seed, max-tokens)"),
    "/stats": Command(ChatApp.cmd_stats, "/stats", "tokens in context, last turn's speed"),
    "/model": Command(ChatApp.cmd_model, "/model [NAME]", "switch model, keeping the chat"),
    "/info": Command(ChatApp.cmd_info, "/info", "model, backend, context, prompt format"),
    "/image": Command(ChatApp.cmd_image, "/image PATH|URL", "attach a picture to the next "
                      "message (a message that names a picture file attaches it too)"),
    "/audio": Command(ChatApp.cmd_audio, "/audio PATH", "attach a sound clip (at most 30 s) "
                      "to the next message"),
    "/tools": Command(ChatApp.cmd_tools, "/tools", "the tools the model may call (--tools)"),
    "/edit": Command(ChatApp.cmd_edit, "/edit", "compose the next message in $EDITOR"),
}


# -- input ----------------------------------------------------------------------------------

def edit_in_editor(initial: str = "") -> str:
    """Open ``$EDITOR`` (or ``$VISUAL``, else vi) on a temporary file; return what was saved."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w+", suffix=".md", delete=False) as fh:
        fh.write(initial)
        name = fh.name
    try:
        result = subprocess.run([*shlex.split(editor), name])
        if result.returncode != 0:
            raise_usage(f"the editor ({editor}) exited with {result.returncode}")
        return Path(name).read_text(encoding="utf-8")
    finally:
        os.unlink(name)


def join_multiline(lines: Iterator[str]) -> Iterator[str]:
    """Join a block opened by a line starting with three quotes and closed by one ending with
    them into one message."""
    for line in lines:
        if not line.lstrip().startswith(MULTILINE):
            yield line
            continue
        first = line.lstrip()[len(MULTILINE):]
        if first.rstrip().endswith(MULTILINE) and first.strip():
            yield first.rstrip()[: -len(MULTILINE)]
            continue
        block = [first] if first.strip() else []
        for more in lines:
            if more.rstrip().endswith(MULTILINE):
                tail = more.rstrip()[: -len(MULTILINE)]
                if tail:
                    block.append(tail)
                break
            block.append(more)
        yield "\n".join(block)


def stream_lines(stream: TextIO) -> Iterator[str]:
    """Lines of a non-terminal stdin, one user turn each (with the multi-line blocks)."""
    return join_multiline(line.rstrip("\n") for line in stream)


def terminal_lines(app: ChatApp, *, input=None, output=None,
                   history_path: Path | None = None) -> Iterator[str]:
    """Lines typed at a terminal with prompt-toolkit: history (up/down, Ctrl-R), slash-command
    completion, Alt-Enter for a newline, Ctrl-X Ctrl-E for $EDITOR, a bottom toolbar.
    Ctrl-C keeps what was typed; at an empty prompt it asks to press again (or Ctrl-D)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    history_path = history_path or store.gemma_home() / "chat_history"
    history_path.parent.mkdir(parents=True, exist_ok=True)
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    words = [*COMMANDS, *EXIT_COMMANDS]
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history_path)),
        completer=WordCompleter(words, sentence=True, pattern=None),
        complete_while_typing=True,
        key_bindings=keys,
        enable_open_in_editor=True,
        bottom_toolbar=app.toolbar,
        input=input,
        output=output,
    )

    def raw_lines() -> Iterator[str]:
        pending = ""
        warned = False
        while True:
            try:
                line = session.prompt(">>> ", default=pending)
            except KeyboardInterrupt:
                pending = session.default_buffer.text
                if pending.strip():
                    continue  # Ctrl-C with text typed: keep it, ask again
                if warned:
                    return
                warned = True
                app.note("(press Ctrl-C again or Ctrl-D to leave)")
                continue
            except EOFError:
                return
            pending, warned = "", False
            yield line

    return join_multiline(raw_lines())
