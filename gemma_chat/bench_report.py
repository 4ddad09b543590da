"""Formatting ``gemma bench`` reports: a Rich table with bars, Markdown, CSV, JSON, and the
ratios between two saved runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .bench import bandwidth_gbps
from .errors import InvalidArgument
from .memory import human

COLUMNS = ("model", "backend", "quant", "test", "t/s", "ttft ms", "load s", "peak mem", "GB/s")


def rows(reports: list[dict], peak_bandwidth: float | None = None) -> list[dict[str, object]]:
    out = []
    for report in reports:
        for result in report["results"]:
            gbps = bandwidth_gbps(report, result)
            bw = "" if gbps is None else f"{gbps:.1f}" + (
                f" ({100 * gbps / peak_bandwidth:.0f}%)" if peak_bandwidth else "")
            ttft = result["ttft_s"]
            row = {
                "model": report["model"], "backend": report["backend"],
                "quant": report["quantization"], "test": result["test"],
                "t/s": f"{result['mean_tps']:.2f} ± {result['sd_tps']:.2f}",
                "ttft ms": f"{1000 * sum(ttft) / len(ttft):.0f}" if ttft else "",
                "load s": f"{report['load_s']:.2f}", "peak mem": human(report["peak_rss"]),
                "GB/s": bw, "_mean": result["mean_tps"],
            }
            if "evaluated" in result.get("extra", {}):
                ev, pt = result["extra"]["evaluated"], result["extra"]["prompt_tokens"]
                row["test"] += (f" (prompt {sorted(pt)[len(pt) // 2]}, "
                                f"{sorted(ev)[len(ev) // 2]} evaluated)")
            out.append(row)
    return out


def table(reports: list[dict], peak_bandwidth: float | None = None, sampler: str = ""):
    from rich.table import Table

    data = rows(reports, peak_bandwidth)
    best = {}
    for row in data:
        kind = row["test"][:2]
        best[kind] = max(best.get(kind, 0.0), row["_mean"])
    title = "gemma bench" + (f" (sampler: {sampler})" if sampler else "")
    out = Table(title=title, title_justify="left")
    for col in COLUMNS:
        out.add_column(col, justify="right" if col not in ("model", "backend", "test") else
                       "left")
    out.add_column("")
    for row in data:
        scale = best.get(row["test"][:2]) or 1.0
        bar = "█" * max(1, round(20 * row["_mean"] / scale))
        out.add_row(*(str(row[c]) for c in COLUMNS), f"[cyan]{bar}[/cyan]")
    return out


def markdown(reports: list[dict], peak_bandwidth: float | None = None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(reports, peak_bandwidth):
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def repack_lines(reports: list[dict]) -> list[str]:
    """llama.cpp's weight repacking in each measured process, once per distinct value."""
    seen = dict.fromkeys(r["weight_repack"] for r in reports if r.get("weight_repack"))
    return [f"weight repacking: {text}" for text in seen]


def csv_text(reports: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "backend", "quantization", "test", "tokens", "depth",
                     "mean_tps", "sd_tps", "mean_ttft_s", "load_s", "peak_rss_bytes"])
    for report in reports:
        for r in report["results"]:
            ttft = sum(r["ttft_s"]) / len(r["ttft_s"]) if r["ttft_s"] else ""
            writer.writerow([report["model"], report["backend"], report["quantization"],
                             r["test"], r["tokens"], r["depth"], r["mean_tps"], r["sd_tps"],
                             ttft, round(report["load_s"], 4), report["peak_rss"]])
    return buf.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"cannot read benchmark results from {path}: {exc}") from None


def compare(a: list[dict], b: list[dict]) -> list[tuple[str, str, str, float, float, float]]:
    """(model, backend, test, a t/s, b t/s, b/a) for every test both runs measured (the
    latest record of each)."""
    def index(records):
        out = {}
        for report in records:
            for r in report["results"]:
                out[(report["model"], report["backend"], r["test"])] = r["mean_tps"]
        return out

    ia, ib = index(a), index(b)
    return [(m, be, t, ia[(m, be, t)], ib[(m, be, t)],
             ib[(m, be, t)] / ia[(m, be, t)] if ia[(m, be, t)] else float("nan"))
            for (m, be, t) in ia if (m, be, t) in ib]


def compare_markdown(a: list[dict], b: list[dict]) -> str:
    """``gemma bench --compare A B`` as a Markdown table."""
    lines = ["| model | backend | test | a t/s | b t/s | b/a |", "|---|---|---|---:|---:|---:|"]
    for m, be, t, ta, tb, ratio in compare(a, b):
        lines.append(f"| {m} | {be} | {t} | {ta:.2f} | {tb:.2f} | {ratio:.3f} |")
    return "\n".join(lines)
