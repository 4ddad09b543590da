"""`gemma bench` next to llama.cpp's own llama-bench, on the same GGUF and threads.

    python benchmarks/llama_bench_compare.py [-m MODEL] [-p 512] [-n 128] [-r 5] [-t THREADS]

llama-bench is built from the llama.cpp source that llama-cpp-python's sdist vendors, for the
installed llama-cpp-python version (so both run the same llama.cpp), into a cache folder
outside the repository (``~/.cache/gemma-chat/llama-bench-VERSION``); nothing of it is
committed. The two tools run interleaved, one repetition each per round, with the same context
settings (flash attention on, batch and micro-batch 512). llama-bench times bare evaluations;
`gemma bench` times its whole loop, sampling and detokenization included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import llama_cpp

from gemma_chat.resolve import resolve

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-chat"


def build_llama_bench() -> Path:
    version = llama_cpp.__version__
    root = CACHE / f"llama-bench-{version}"
    binary = root / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the llama-cpp-python {version} sdist ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        "llama-cpp-python", f"llama-cpp-python=={version}", "-d", tmp],
                       check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        target = root / "src"
        if target.exists():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        source.rename(target)
    print("building llama-bench (several minutes on 2 cores) ...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(root / "src"), "-B", str(root / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-bench", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return binary


def llama_bench(binary: Path, model: Path, p: int, n: int, threads: int) -> dict[str, float]:
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(p),
                          "-n", str(n), "-r", "1", "-fa", "1", "-b", "512", "-ub", "512",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    result = {}
    for row in rows:
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        result[name] = row["avg_ts"]
    return result


def gemma_bench(model: str, p: int, n: int, threads: int) -> dict[str, float]:
    gemma = Path(sys.executable).with_name("gemma")
    out = subprocess.run([str(gemma), "bench", "-m", model, "-p", str(p), "-n", str(n),
                          "-r", "1", "-t", str(threads), "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out)["reports"][0]
    return {r["test"]: r["mean_tps"] for r in report["results"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m")
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-r", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    binary = build_llama_bench()
    path = resolve(args.model).path
    runs: dict[str, dict[str, list[float]]] = {"llama-bench": {}, "gemma bench": {}}
    for rep in range(args.r):
        order = [("llama-bench", lambda: llama_bench(binary, path, args.p, args.n,
                                                     args.threads)),
                 ("gemma bench", lambda: gemma_bench(args.model, args.p, args.n,
                                                     args.threads))]
        if rep % 2:
            order.reverse()
        for name, run in order:
            for test, tps in run().items():
                runs[name].setdefault(test, []).append(tps)
        print(f"round {rep + 1}/{args.r} done", file=sys.stderr)
    print(f"{path.name}, {args.threads} threads, {args.r} runs each, interleaved; "
          f"llama.cpp from llama-cpp-python {llama_cpp.__version__}")
    print("| test | llama-bench (t/s) | gemma bench (t/s) | gemma / llama-bench |")
    print("|---|---:|---:|---:|")
    for test in runs["llama-bench"]:
        a, b = runs["llama-bench"][test], runs["gemma bench"].get(test, [])
        if not b:
            continue
        ma, mb = statistics.mean(a), statistics.mean(b)
        sa = statistics.stdev(a) if len(a) > 1 else 0.0
        sb = statistics.stdev(b) if len(b) > 1 else 0.0
        print(f"| {test} | {ma:.1f} ± {sa:.1f} | {mb:.1f} ± {sb:.1f} | {mb / ma:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
