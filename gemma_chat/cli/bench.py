"""``gemma bench``: speed and memory, like llama-bench, through gemma-chat's own loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from .common import ApiKeyOpt, BackendOpt, CtxOpt, ThreadsOpt, UrlOpt, app, remote_url, stderr


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
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    concurrency: Annotated[str, typer.Option(
        "--concurrency", help="With --url: clients at once, one row each (comma list).")] = "1,4",
    requests: Annotated[int | None, typer.Option(
        "--requests", help="With --url: requests per row (default: twice the concurrency, at "
                           "least 4).")] = None,
) -> None:
    """Measure prompt processing (pp) and generation (tg) speed, time to first token, load
    time and peak memory, like llama-bench, through gemma-chat's own generation loop."""
    from .. import bench as benchmod
    from .. import bench_report as report
    from .. import sessions

    if compare:
        typer.echo(report.compare_markdown(*(report.read_jsonl(p) for p in compare)))
        return
    if reps < 1:
        raise click.UsageError("-r must be at least 1")
    fmt = fmt or ("table" if sys.stdout.isatty() else "md")
    if fmt not in ("table", "md", "json", "csv"):
        raise click.UsageError(f"unknown --format {fmt!r}; use table, md, json or csv")
    if remote_url(url, backend) is not None:
        bench_url(url, api_key, model, _int_list(concurrency, "--concurrency"), requests,
                  _int_list(gen, "-n")[0], fmt, output)
        return
    prompts, gens, depths = _int_list(prompt, "-p"), _int_list(gen, "-n"), _int_list(depth, "-d")
    if any(n < 2 for n in gens):
        raise click.UsageError("-n must be at least 2 (the first token comes from the prompt)")
    need = max(depths) + max(max(prompts), max(gens)) + 16
    reports = []
    with stderr().status("starting") as status:
        for name in model or ["gemma-3-270m"]:
            spec = benchmod.BenchSpec(name, backend, prompts, gens, reps, depths, threads,
                                      ctx or (4096 if chat_turns else need), chat_turns)
            reports.append(benchmod.measure(spec, progress=lambda t: status.update(t)))
    if output is not None:
        record_machine = benchmod.machine_info()
        now = sessions.now()
        with open(output, "a", encoding="utf-8") as fh:
            for rep in reports:
                fh.write(json.dumps({"time": now, "machine": record_machine, **rep}) + "\n")
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


def bench_url(url: str, api_key: str | None, model: list[str] | None, levels: list[int],
              requests: int | None, max_tokens: int, fmt: str, output: Path | None) -> None:
    """``gemma bench --url``: the concurrency table of a served model."""
    from .. import bench_remote, sessions
    from ..bench import machine_info
    from ..loader import open_remote

    if any(n < 1 for n in levels):
        raise click.UsageError("--concurrency takes positive integers")
    if requests is not None and requests < 1:
        raise click.UsageError("--requests must be at least 1")
    if model and len(model) > 1:
        raise click.UsageError("with --url, give one -m (a model the server serves)")
    with open_remote(url, model[0] if model else None, api_key) as opened:
        backend = opened.backend
        with stderr().status("connecting") as status:
            rows = bench_remote.run_load(backend, levels, max_tokens, requests,
                                         progress=lambda t: status.update(t))
        record = {"url": backend.url, "model": backend.model, "max_tokens": max_tokens,
                  "rows": rows}
    if output is not None:
        with open(output, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": sessions.now(), "client": machine_info(), **record})
                     + "\n")
    if fmt == "json":
        typer.echo(json.dumps(record, indent=2))
        return
    if fmt == "csv":
        keys = [k for k, _ in bench_remote.COLUMNS]
        typer.echo(",".join(keys))
        for row in rows:
            typer.echo(",".join(str(row[k]) for k in keys))
        return
    if fmt == "md":
        typer.echo(bench_remote.markdown(rows))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{backend.model} at {backend.url}, {max_tokens} tokens a request",
                      title_justify="left")
        for _, title in bench_remote.COLUMNS:
            table.add_column(title, justify="right")
        for row in rows:
            table.add_row(*(str(row[k]) for k, _ in bench_remote.COLUMNS))
        Console().print(table)
    for row in rows:
        if row["failed"]:
            stderr().print(f"[yellow]{row['failed']} of {row['requests']} requests at "
                           f"concurrency {row['concurrency']} failed: "
                           f"{escape('; '.join(row['errors']))}[/yellow]")
