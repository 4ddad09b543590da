"""``gemma convert``: Hugging Face weights or a GGUF into a model for llama.cpp or MLX."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import ModelNotFound
from .common import app, pull_policy, stderr


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
    from .. import convert as conv
    from ..memory import human

    try:
        src = conv.locate(source)
    except ModelNotFound:
        from .. import catalog

        spec = catalog.load().get(source)
        if spec is None:
            raise
        src = _pull_original(spec, yes)
    job = conv.plan(src, to, quant, out)
    err = stderr()
    if src.note:
        err.print(f"[dim]from {escape(src.note)}[/dim]", soft_wrap=True)
    for warning in job.warnings:
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]", soft_wrap=True)
    with progress_bars(err) as progress:
        result = conv.run(job, progress=progress, threads=threads)
    src_size = src.size
    err.print(f"{src.path.name} ({human(src_size)}) -> {job.target} ({human(result.size)}, "
              f"{job.quant}, {result.size / max(src_size, 1):.0%} of the source) in "
              f"{result.seconds:.0f} s", soft_wrap=True, markup=False)
    if job.projector is not None:
        err.print(f"image encoder -> {job.projector} ({human(job.projector.stat().st_size)})",
                  soft_wrap=True, markup=False)
    err.print(f"[dim]chat with it: {escape(conv.chat_hint(result))}[/dim]", soft_wrap=True)


def _pull_original(spec, yes: bool):
    """A catalogue model's original checkpoint, downloaded after asking (or with --yes)."""
    from .. import convert as conv
    from .. import hub, loader

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
    resolved = loader.pull(spec.name, "hf", "bf16", pull_policy(yes=True))
    return conv.Source("hf", resolved.path, spec.name, f"the original weights ({spec.hf_repo})")


@contextmanager
def progress_bars(console):
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
