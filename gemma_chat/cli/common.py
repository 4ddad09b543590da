"""What the commands share: the Typer app, option types, the stderr console, and loading a
model with the terminal's answers to the library's questions."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.markup import escape

app = typer.Typer(
    name="gemma",
    help="Talk to Google's Gemma models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Catalogue name or alias (2b-it), Hugging Face repo id, or a path to a .gguf file or "
         "a model folder.")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b", help="auto, llama.cpp, mlx, or openai (a model on a server: --url).")]
UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="GEMMA_URL",
    help="Talk to a model on a server with OpenAI's API (vLLM, llama-server, Ollama, LM "
         "Studio, gemma serve), e.g. http://gpu-box:8000/v1; -m picks one of its models.")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="GEMMA_API_KEY", show_default=False,
    help="The server's API key, for --url (default: $GEMMA_API_KEY).")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", "-c", help="Context size in tokens "
                                               "(default: the model's own, or as much of it as "
                                               "half this machine's memory holds, at least "
                                               "8192).")]
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
ImageOpt = Annotated[list[str] | None, typer.Option(
    "--image", help="A picture to send with the prompt (a path or URL; again for more). "
                    "Models with a projector file see them: Gemma 3 4B and up, 3n, 4.")]
ImageTokensOpt = Annotated[int | None, typer.Option(
    "--image-tokens", help="Gemma 4: tokens a picture may take (70, 140, 280, 560 or 1120; "
                           "default 280). More reads small print better, and costs time.")]
AudioOpt = Annotated[list[str] | None, typer.Option(
    "--audio", help="A sound clip (wav, flac, ogg, mp3; at most 30 s) to send with the prompt "
                    "(again for more). Gemma 4 E2B and E4B hear.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt (its own "
                                                  "turn on Gemma 4; folded into the first user "
                                                  "turn on Gemma 1-3, which have no system "
                                                  "role).")]
ThinkOpt = Annotated[bool | None, typer.Option(
    "--think/--no-think", help="Let a thinking model (Gemma 4) think before it answers "
                               "(default: the model's own, off).")]
HideThinkingOpt = Annotated[bool, typer.Option(
    "--hide-thinking", help="Do not show the thoughts, only how long they took.")]


def stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def dim(text: str) -> None:
    """One dim line on stderr, printed as is (no Rich markup)."""
    stderr().print(f"[dim]{escape(text)}[/dim]")


def sampling_flags(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens) -> dict:
    """The sampling flags of `run` and `chat`, checked before a model is loaded."""
    from ..generate import check_overrides

    overrides = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                     repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens)
    check_overrides(overrides)
    return overrides


def _confirm(question: str) -> bool:
    return sys.stdin.isatty() and typer.confirm(question, default=True, err=True)


def _login_at_terminal(exc) -> bool:
    """A gated repo at a terminal: offer to paste a token and log in with huggingface_hub."""
    import getpass

    from .. import hub

    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    err = stderr()
    err.print(f"[yellow]{escape(str(exc))}[/yellow]")
    err.print(f"Accept the license at https://huggingface.co/{exc.repo}, then paste a "
              "token from https://huggingface.co/settings/tokens (input hidden; empty to "
              "give up).")
    token = getpass.getpass("Hugging Face token: ")
    if not token.strip():
        return False
    name = hub.login_with(token)
    dim(f"logged in as {name}; the token is stored by huggingface_hub")
    return True


def pull_policy(yes: bool, quiet: bool = False):
    """Downloads as a terminal user expects: ask (at a terminal only), or --yes."""
    from ..loader import PullPolicy

    return PullPolicy(yes=yes, ask=_confirm if sys.stdin.isatty() else None,
                      on_gated=_login_at_terminal, console=stderr(), quiet=quiet)


def remote_url(url: str | None, backend: str) -> str | None:
    """The server to talk to: ``--url``, which ``--backend openai`` needs and which goes with no
    other backend."""
    from ..backends import REMOTE, normalize

    name = normalize(backend)
    if url is None and name == REMOTE:
        raise typer.BadParameter("--backend openai needs --url (the server's address)")
    if url is not None and name not in ("auto", REMOTE):
        raise typer.BadParameter(f"--url talks to a server; it does not go with --backend "
                                 f"{backend}")
    return url


def load(model: str | None, backend: str, ctx: int | None, threads: int | None, spinner: bool,
         yes: bool = False, image_tokens: int | None = None, url: str | None = None,
         api_key: str | None = None):
    """Find (pulling on first use, as the user allows) and load a model: an OpenModel. A
    spinner on stderr while it loads, when asked and on a terminal. With ``url``, connect to
    the model on that server instead."""
    from .. import loader
    from ..memory import load_warning

    if remote_url(url, backend) is not None:
        if ctx is not None or threads is not None or image_tokens is not None:
            dim("--ctx, --threads and --image-tokens are the server's to set; ignored with --url")
        return loader.open_remote(url, model, api_key)
    backend = loader.configured_backend(backend)
    resolved = loader.find(model, backend, pull_policy(yes))
    if resolved.format == "gguf":
        warning = load_warning(resolved.path, ctx)
        if warning:
            stderr().print(f"[yellow]warning: {escape(warning)}[/yellow]")
    options = loader.LoadOptions(n_ctx=ctx, threads=threads, image_tokens=image_tokens,
                                 verbose=bool(os.environ.get("GEMMA_DEBUG")))
    from .supervise import note_model

    note_model(resolved.path)
    if spinner and sys.stderr.isatty():
        with stderr().status(f"loading {resolved.name} ({backend} backend)"):
            opened = loader.load(resolved, backend, options)
    else:
        opened = loader.load(resolved, backend, options)
    for note in opened.notes:
        dim(note)
    return opened
