"""``gemma bench``: speed and memory numbers comparable with llama-bench's.

    results = run_bench(backend, prompts=[512], gens=[128], reps=5)

Tests are named like llama-bench's: ``pp512`` (prompt processing of a 512-token prompt),
``tg128`` (generating 128 tokens), with ``@d512`` when 512 tokens are already in the KV cache.
Like llama-bench, prompts are random tokens and generation never stops at EOS; unlike it, every
figure is measured end to end through our backend's stream (tokenization, the sampler chain and
detokenization included: greedy unless told otherwise), since that is what a user gets. Each
model is measured in a subprocess of its own, so its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .backends.base import Backend, SamplingParams, collect
from .errors import InvalidArgument


@dataclass
class Result:
    """One test of one model: a sample per repetition."""

    model: str
    backend: str
    test: str  # pp512, tg128, pp512@d1024, turn3 ...
    tokens: int  # tokens processed or generated per repetition
    depth: int = 0
    seconds: list[float] = field(default_factory=list)  # the timed part of each repetition
    ttft_s: list[float] = field(default_factory=list)
    sampler: str = "greedy"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def tps(self) -> list[float]:
        return [self.tokens / s for s in self.seconds if s > 0]

    @property
    def mean(self) -> float:
        return statistics.mean(self.tps) if self.tps else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(tps=self.tps, mean_tps=round(self.mean, 3), sd_tps=round(self.sd, 3))
        return d


def random_tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    """Random ordinary tokens (control and byte tokens sit at the start of Gemma's vocab)."""
    rng = random.Random(seed)
    low = min(1000, n_vocab // 4)
    return [rng.randrange(low, n_vocab) for _ in range(n)]


def _prime(backend: Backend, ids: list[int]) -> None:
    """Put ``ids`` in the KV cache."""
    backend.trim_cache(0)
    if len(ids) > 1:
        for _ in backend.stream(ids, SamplingParams(temperature=0, max_tokens=1),
                                ignore_eos=True):
            pass


def _repeat(result: Result, reps: int, progress, run_once, timed) -> Result:
    """One warm-up, then ``reps`` timed runs of ``run_once()`` (which returns Stats); ``timed``
    picks the seconds to record from the stats."""
    for rep in range(reps + 1):
        progress(f"{result.test} {'warm-up' if rep == 0 else f'{rep}/{reps}'}")
        stats = run_once()
        if rep:
            result.seconds.append(timed(stats))
            result.ttft_s.append(stats.ttft_s)
            result.sampler = stats.sampler
    return result


def _last_stats(backend: Backend, prompt: list[int], sampling: SamplingParams):
    return collect(backend.stream(prompt, sampling, ignore_eos=True))[1]


def run_bench(backend: Backend, prompts=(512,), gens=(128,), reps: int = 5, depths=(0,),
              sampling: SamplingParams | None = None,
              progress: Callable[[str], object] = lambda s: None) -> list[Result]:
    """pp and tg tests on a loaded backend; one warm-up run of each test first."""
    info = backend.info
    sampling = sampling or SamplingParams(temperature=0)
    results = []
    bos = info.bos_id
    for depth in depths:
        context = [bos] + random_tokens(depth, info.n_vocab, seed=depth + 1) if depth else [bos]
        suffix = f"@d{depth}" if depth else ""
        for p in prompts:
            prompt = random_tokens(p, info.n_vocab, seed=p)
            prefix = context if depth else []
            if not depth:  # exactly p tokens evaluated, the BOS among them
                prompt = [bos] + prompt[1:]

            def prefill(prefix=prefix, prompt=prompt, p=p):
                _prime(backend, prefix)
                stats = _last_stats(backend, prefix + prompt, sampling.with_overrides(
                    max_tokens=1))
                assert stats.prompt_eval_tokens == p, (stats.prompt_eval_tokens, p)
                return stats

            results.append(_repeat(Result(info.name, info.backend, f"pp{p}{suffix}", p, depth),
                                   reps, progress, prefill, lambda s: s.prefill_s))
        for n in gens:
            def decode(n=n, context=context):
                _prime(backend, context)
                stats = _last_stats(backend, context, sampling.with_overrides(max_tokens=n))
                assert stats.generated_tokens == n, (stats.generated_tokens, n)
                return stats

            # The first token comes out of the prompt's evaluation: the n-1 after it are the
            # decode steps, as llama-bench's tg counts its n evaluations.
            result = Result(info.name, info.backend, f"tg{n}{suffix}", n - 1, depth,
                            extra={"generated": n})
            results.append(_repeat(result, reps, progress, decode, lambda s: s.decode_s))
    return results


CHAT_TOPICS = ["rivers", "mountains", "bread", "trains", "libraries", "gardens", "bridges",
               "music", "winter", "the sea", "clocks", "maps"]


def chat_turn_text(i: int) -> str:
    topic = CHAT_TOPICS[i % len(CHAT_TOPICS)]
    return (f"Question {i + 1}: tell me three short facts about {topic}, and explain in plain "
            f"words why people have always cared about {topic}, how {topic} changed over the "
            f"last century, and what a child might notice first about {topic}.")


def run_chat(backend: Backend, turns: int = 10, reps: int = 3, max_tokens: int = 64,
             progress: Callable[[str], object] = lambda s: None) -> list[Result]:
    """A growing conversation: per turn, prompt tokens, tokens evaluated, TTFT, tg t/s."""
    from .chat import Conversation

    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    per_turn = [Result(backend.info.name, backend.info.backend, f"turn{i + 1}", 0)
                for i in range(turns)]
    for rep in range(reps):
        backend.trim_cache(0)
        convo = Conversation(backend)
        for i in range(turns):
            progress(f"chat run {rep + 1}/{reps}, turn {i + 1}/{turns}")
            for _ in convo.send(chat_turn_text(i), sampling):
                pass
            if convo.dropped:
                raise InvalidArgument("the context is too small for this chat: raise --ctx")
            stats, result = convo.last_stats, per_turn[i]
            result.tokens = max(stats.generated_tokens - 1, 1)
            result.seconds.append(stats.decode_s)
            result.ttft_s.append(stats.ttft_s)
            result.extra.setdefault("prompt_tokens", []).append(stats.prompt_tokens)
            result.extra.setdefault("evaluated", []).append(stats.prompt_eval_tokens)
    return per_turn


# -- the machine, and a subprocess per model -------------------------------------------------

def machine_info() -> dict[str, object]:
    from . import __version__
    from .memory import total_ram

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"gemma-chat": __version__, "python": platform.python_version()}
    for package in ("llama_cpp", "mlx_lm", "mlx"):
        try:
            module = __import__(package)
            versions[package] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": total_ram(),
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "versions": versions}


def cuda_memory_of(pid: int) -> int | None:
    """GPU memory this process holds on NVIDIA GPUs, from nvidia-smi (None without one)."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) * 2**20 for line in out.splitlines()
            for p, mib in [line.split(",")[:2]] if p.strip() == str(pid)]
    return sum(used) if used else None


def peak_rss() -> int:
    """This process's peak resident memory in bytes. On Linux from VmHWM: ru_maxrss there
    carries the parent's peak over fork and exec, so a worker started by a big process would
    report the parent's memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class BenchSpec:
    """What one worker process measures."""

    model: str
    backend: str = "auto"
    prompts: list[int] = field(default_factory=lambda: [512])
    gens: list[int] = field(default_factory=lambda: [128])
    reps: int = 5
    depths: list[int] = field(default_factory=lambda: [0])
    threads: int | None = None
    ctx: int | None = None
    chat_turns: int = 0
    temperature: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSpec:
        return cls(**json.loads(text))


def worker(spec: BenchSpec) -> dict:
    """Runs in the subprocess: load one model, run the tests, report."""
    from . import loader

    def progress(text: str) -> None:
        print(f"PROGRESS {spec.model}: {text}", file=sys.stderr, flush=True)

    progress("loading")
    model = loader.load(loader.find(spec.model, spec.backend), spec.backend,
                        loader.LoadOptions(n_ctx=spec.ctx, threads=spec.threads))
    backend, load_s = model.backend, model.load_s
    sampling = SamplingParams(temperature=spec.temperature)
    if spec.chat_turns:
        results = run_chat(backend, spec.chat_turns, spec.reps, progress=progress)
    else:
        results = run_bench(backend, spec.prompts, spec.gens, spec.reps, spec.depths, sampling,
                            progress)
    info = backend.info
    accelerator_peak = None
    if info.backend == "mlx":  # Metal memory on Apple Silicon (MLX's own count on the CPU)
        import mlx.core as mx

        accelerator_peak = int(mx.get_peak_memory())
    elif info.device == "gpu":
        accelerator_peak = cuda_memory_of(os.getpid())
    out = {"model": info.name, "path": str(info.path), "backend": info.backend,
           "accelerator_peak": accelerator_peak,
           "quantization": info.quantization, "device": info.device, "threads": info.threads,
           "n_ctx": info.n_ctx, "load_s": load_s, "peak_rss": peak_rss(),
           "weight_repack": info.weight_repack,
           "file_bytes": info.path.stat().st_size if info.path.is_file() else None,
           "results": [r.to_dict() for r in results]}
    backend.close()
    return out


def measure(spec: BenchSpec, progress: Callable[[str], object] = lambda s: None,
            command: list[str] | None = None) -> dict:
    """Run :func:`worker` in a fresh Python process; relay its progress; return its report.

    A worker that dies of a signal (llama.cpp's SIGILL or SIGABRT, the kernel's SIGKILL) is
    reported as that, with the likely fix."""
    command = command or [sys.executable, "-m", "gemma_chat.bench", spec.to_json()]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = []
    for line in proc.stderr:
        if line.startswith("PROGRESS "):
            progress(line[len("PROGRESS "):].strip())
        elif line.strip():
            errors.append(line.rstrip())
    out = proc.stdout.read()
    if proc.wait() != 0:
        from .errors import BackendError, crash_message, describe_exit

        if proc.returncode < 0:
            raise BackendError(f"benchmarking {spec.model} failed: "
                               + crash_message("the worker process", proc.returncode))
        last = errors[-1].removeprefix("error: ") if errors else describe_exit(proc.returncode)
        raise BackendError(f"benchmarking {spec.model} failed: {last}")
    return json.loads(out)


def bandwidth_gbps(report: dict, result: dict) -> float | None:
    """Effective memory bandwidth of a tg test: weight bytes read per token x tokens/s."""
    if not result["test"].startswith("tg") or not report.get("file_bytes"):
        return None
    return report["file_bytes"] * result["mean_tps"] / 1e9


def main() -> int:  # the subprocess entry point
    from .errors import GemmaChatError

    try:
        print(json.dumps(worker(BenchSpec.from_json(sys.argv[1]))))
    except GemmaChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
