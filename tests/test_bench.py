"""`gemma bench` on the real 270M model: structure, positivity, self-consistency."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_gemma

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


@pytest.fixture(scope="module")
def bench_json(gguf_path):
    result = run_gemma("bench", "-m", "gemma-3-270m", "-p", "16,32", "-n", "6", "-r", "2",
                       "-d", "0,40", "--format", "json", timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_report_structure(bench_json):
    machine = bench_json["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and "llama_cpp" in machine["versions"]
    (report,) = bench_json["reports"]
    assert report["model"] == "gemma-3-270m" and report["backend"] == "llama.cpp"
    assert report["quantization"] == "Q4_K_M"
    assert report["load_s"] > 0
    assert report["peak_rss"] > report["file_bytes"]  # the weights are in memory
    tests = [r["test"] for r in report["results"]]
    assert tests == ["pp16", "pp32", "tg6", "pp16@d40", "pp32@d40", "tg6@d40"]


def test_every_figure_is_positive_and_self_consistent(bench_json):
    for r in bench_json["reports"][0]["results"]:
        assert len(r["seconds"]) == 2 and len(r["tps"]) == 2  # -r 2, warm-up not counted
        assert all(s > 0 for s in r["seconds"]) and all(t > 0 for t in r["ttft_s"])
        if r["test"].startswith("pp"):
            assert r["tokens"] == int(r["test"][2:].split("@")[0])  # pp tokens = requested
        else:
            assert r["tokens"] == 5 and r["extra"]["generated"] == 6
        for tps, seconds in zip(r["tps"], r["seconds"], strict=True):
            assert math.isclose(tps, r["tokens"] / seconds, rel_tol=1e-9)  # t/s = tokens/time
        assert math.isclose(r["mean_tps"], sum(r["tps"]) / 2, rel_tol=1e-3)
        assert r["sd_tps"] >= 0 and r["sampler"] == "greedy"
        assert r["depth"] == (40 if "@d40" in r["test"] else 0)


def test_output_file_and_compare(gguf_path, tmp_path):
    out = tmp_path / "runs.jsonl"
    for _ in range(2):
        result = run_gemma("bench", "-p", "16", "-n", "4", "-r", "1", "-o", str(out),
                           "--format", "md", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "| gemma-3-270m | llama.cpp | Q4_K_M | pp16 |" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all("machine" in r and "time" in r for r in records)
    compared = run_gemma("bench", "--compare", str(out), str(out))
    assert compared.returncode == 0
    assert "| gemma-3-270m | llama.cpp | pp16 |" in compared.stdout
    assert "1.000 |" in compared.stdout
    csv = run_gemma("bench", "-p", "16", "-n", "4", "-r", "1", "--format", "csv", timeout=300)
    assert csv.stdout.splitlines()[0].startswith("model,backend,quantization,test")
    assert len(csv.stdout.splitlines()) == 3


def test_chat_scenario_shows_kv_reuse(gguf_path):
    result = run_gemma("bench", "--chat-turns", "3", "-r", "1", "--format", "json", timeout=300)
    assert result.returncode == 0, result.stderr
    turns = json.loads(result.stdout)["reports"][0]["results"]
    assert [t["test"] for t in turns] == ["turn1", "turn2", "turn3"]
    third = turns[2]["extra"]
    assert third["evaluated"][0] < third["prompt_tokens"][0] / 2


@pytest.mark.parametrize("args, needle", [
    (["-r", "0"], "-r must be at least 1"),
    (["-n", "1"], "-n must be at least 2"),
    (["-p", "abc"], "comma-separated integers"),
    (["--format", "xml"], "unknown --format"),
    (["-m", "gemma-nope"], "unknown model 'gemma-nope'"),
])
def test_bad_bench_arguments(args, needle):
    result = run_gemma("bench", *args, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: ")
