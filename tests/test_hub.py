"""`gemma pull` and the local store, against a stand-in Hub on 127.0.0.1 (no internet)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import run_gemma
from hubstub import HubStub

from gemma_chat import hub
from gemma_chat.errors import ModelNotFound
from gemma_chat.resolve import resolve

REPO, FILE = "bartowski/gemma-2-2b-it-GGUF", "gemma-2-2b-it-Q4_K_M.gguf"


pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


@pytest.fixture()
def online(tmp_path, monkeypatch):
    """huggingface_hub pointed at an empty cache and allowed online (the session is offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return cache


@pytest.fixture()
def stub(tmp_path, monkeypatch):
    with HubStub(tmp_path / "hub-files") as hub_stub:
        monkeypatch.setenv("HF_ENDPOINT", hub_stub.url)
        yield hub_stub


def env_for(stub, cache) -> dict:
    return {"HF_ENDPOINT": stub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "",
            "HF_TOKEN": ""}


def test_full_pull_then_run(gguf_path, stub, online):
    stub.add(REPO, FILE, gguf_path)  # the real 270M GGUF stands in for the file
    result = run_gemma("pull", "2b-it", "--backend", "llama.cpp", env=env_for(stub, online))
    assert result.returncode == 0, result.stderr
    assert "needs about" in result.stderr and "253.1 MB" in result.stderr
    pulled = next(online.rglob(FILE))
    assert pulled.read_bytes()[:4] == b"GGUF" and pulled.stat().st_size == gguf_path.stat().st_size
    assert ("GET", f"/{REPO}/resolve/main/{FILE}", None) in stub.requests
    # Now on disk: it resolves from the Hugging Face cache, and runs.
    env = {**env_for(stub, online), "HF_HUB_OFFLINE": "1"}
    run = run_gemma("run", "-m", "2b-it", "--raw", "-n", "4", "--temp", "0", "Water boils at",
                    env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    listing = run_gemma("list", env={**env, "COLUMNS": "250"})
    assert "gemma-2-2b-it" in listing.stdout and "hf-cache" in listing.stdout
    shown = run_gemma("show", "2b-it", "--ctx", "2048", env=env)
    assert "gemma2" in shown.stdout and "memory" in shown.stdout and "hf-cache" in shown.stdout
    refused = run_gemma("rm", "2b-it", env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    removed = run_gemma("rm", "2b-it", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not list(online.rglob(FILE))
    gone = run_gemma("run", "-m", "2b-it", "Hi", env=env)
    assert gone.returncode != 0 and "not on disk" in gone.stderr


def test_a_dropped_connection_is_resumed_with_a_range_request(stub, online):
    # huggingface_hub writes in 10 MB chunks: a drop at 25 MB resumes from 20 MB.
    data = os.urandom(30_000_000)
    stub.add(REPO, FILE, data)
    stub.drop_after = 25_000_000
    resolved = hub.pull("2b-it", "gguf", quiet=True)
    assert resolved.path.read_bytes() == data  # byte-identical
    ranges = [r for m, p, r in stub.requests if m == "GET" and p.endswith(FILE)]
    assert ranges[0] is None and ranges[1] is not None
    assert int(ranges[1].split("=")[1].rstrip("-")) >= 20_000_000  # resumed, not restarted
    assert not list(online.rglob("*.incomplete"))


def test_slow_server_with_progress(stub, online):
    import io

    from rich.console import Console

    data = os.urandom(2_000_000)
    stub.add(REPO, FILE, data)
    stub.delay = 0.02  # per 64 KB: about 0.6 s in all
    buf = io.StringIO()
    resolved = hub.pull("2b-it", "gguf", console=Console(file=buf, force_terminal=True,
                                                         width=120))
    assert resolved.path.read_bytes() == data
    shown = buf.getvalue()
    assert FILE[-30:] in shown and "2.0" in shown and "MB" in shown  # file, bytes
    assert "needs about" in shown


def test_corrupt_download_is_detected_and_removed(stub, online, monkeypatch):
    stub.add(REPO, FILE, os.urandom(100_000))
    real = stub.sha256
    monkeypatch.setattr(stub, "sha256", lambda path: "0" * 64 if path.name == FILE
                        else real(path))
    with pytest.raises(hub.HubError, match="sha256"):
        hub.pull("2b-it", "gguf", quiet=True)
    assert not [p for p in online.rglob(FILE) if p.exists()]


def test_gated_repo_message_has_license_and_login(stub, online):
    stub.add(REPO, FILE, b"x" * 1000)
    stub.gated.add(REPO)
    result = run_gemma("pull", "2b-it", "--backend", "llama.cpp", env=env_for(stub, online))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert "is gated" in line and f"https://huggingface.co/{REPO}" in line
    assert "hf auth login" in line and "HF_TOKEN" in line
    # With the token the repo opens; the token never shows in the output.
    stub.token = "hf_secret_token_123"
    ok = run_gemma("pull", "2b-it", "--backend", "llama.cpp",
                   env={**env_for(stub, online), "HF_TOKEN": stub.token})
    assert ok.returncode == 0, ok.stderr
    assert stub.token not in ok.stderr + ok.stdout


def test_guided_login_at_a_terminal(stub, online, tmp_path):
    import pexpect
    from conftest import GEMMA

    stub.add(REPO, FILE, b"z" * 20_000)
    stub.gated.add(REPO)
    stub.token = "hf_guided_login_token_42"
    hf_home = tmp_path / "hf-home-login"
    env = {**os.environ, **env_for(stub, online), "HF_HOME": str(hf_home), "TERM": "dumb"}
    env.pop("HF_TOKEN")
    child = pexpect.spawn(str(GEMMA), ["pull", "2b-it", "--backend", "llama.cpp"], env=env,
                          encoding="utf-8", timeout=60)
    child.expect("is gated")
    child.expect("Hugging Face token: ")
    child.sendline("wrong-token")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "did not accept that token" in child.before
    child = pexpect.spawn(str(GEMMA), ["pull", "2b-it", "--backend", "llama.cpp"], env=env,
                          encoding="utf-8", timeout=60)
    child.expect("Hugging Face token: ")
    child.sendline(stub.token)
    child.expect(pexpect.EOF)
    transcript = child.before
    child.close()
    assert child.exitstatus == 0, transcript
    assert "logged in as tester" in transcript and stub.token not in transcript
    assert (hf_home / "token").read_text().strip() == stub.token  # huggingface_hub stored it
    assert list(online.rglob(FILE))


def test_disk_space_is_checked_first(stub, online, monkeypatch):
    import shutil
    from collections import namedtuple

    stub.add(REPO, FILE, b"x" * 5_000_000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(hub.NotEnoughSpace, match="needs 5.0 MB, 1.0 MB are free"):
        hub.pull("2b-it", "gguf", quiet=True)
    assert not [r for r in stub.requests if r[0] == "GET"]  # nothing was downloaded


def test_unknown_file_and_repo(stub, online):
    stub.add(REPO, "other.gguf", b"x")
    with pytest.raises(hub.HubError, match="has no file"):
        hub.pull("2b-it", "gguf", quiet=True)
    with pytest.raises(hub.HubError, match="not found on the Hub"):
        hub.pull("9b-it", "gguf", quiet=True)


def test_mlx_snapshot_pull(stub, online):
    repo = "mlx-community/gemma-2-2b-it-4bit"
    stub.add(repo, "config.json", b'{"model_type": "gemma2"}')
    stub.add(repo, "model.safetensors", os.urandom(50_000))
    stub.add(repo, "tokenizer.json", b"{}")
    resolved = hub.pull("2b-it", "mlx", quiet=True)
    assert resolved.format == "mlx"
    assert (resolved.path / "model.safetensors").stat().st_size == 50_000
    assert resolve("2b-it", ("mlx",)).path == resolved.path


def test_offline_with_and_without_the_model(gguf_path, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    start = time.time()
    missing = run_gemma("run", "-m", "2b-it", "Hi", env=env)
    assert missing.returncode != 0 and "not on disk" in missing.stderr
    pulled = run_gemma("pull", "2b-it", env=env)
    assert pulled.returncode != 0 and "HF_HUB_OFFLINE" in pulled.stderr
    assert time.time() - start < 20
    present = run_gemma("run", "-m", "gemma-3-270m", "-n", "2", "Hi", env=env)
    assert present.returncode == 0, present.stderr


def test_unreachable_hub_fails_fast(tmp_path):
    for endpoint in ("http://127.0.0.1:9", "https://hub.invalid"):
        start = time.time()
        result = run_gemma("pull", "2b-it", "--backend", "llama.cpp",
                           env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "",
                                "HF_HUB_CACHE": str(tmp_path)})
        assert time.time() - start < 10
        assert result.returncode == 1
        assert "cannot reach the Hugging Face Hub" in result.stderr
        assert "Traceback" not in result.stderr


def test_pull_on_first_use_needs_yes_in_a_script(stub, online, gguf_path):
    stub.add(REPO, FILE, gguf_path)
    env = env_for(stub, online)
    asked = run_gemma("run", "-m", "2b-it", "Hi", env=env)
    assert asked.returncode != 0 and "gemma pull 2b-it" in asked.stderr
    assert not [r for r in stub.requests if r[0] == "GET"]
    done = run_gemma("run", "-m", "2b-it", "--yes", "--raw", "-n", "2", "Hi", env=env)
    assert done.returncode == 0, done.stderr


def test_stray_partials_from_a_killed_pull_are_removed(stub, online):
    blobs = online / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    stale = blobs / "abc.1234abcd.incomplete"
    stale.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    stub.add(REPO, FILE, b"y" * 10_000)
    hub.pull("2b-it", "gguf", quiet=True)
    assert not stale.exists()


def test_memory_estimate_matches_measured_rss(gguf_path):
    """The estimate for the 270M model at context 2048 against the RSS growth of loading it
    and generating one token, measured in a fresh process."""
    import subprocess
    import sys

    from gemma_chat import memory
    from gemma_chat.gguf_file import read_gguf

    code = (
        "import os\n"
        "def rss():\n"
        "    for line in open(f'/proc/{os.getpid()}/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) * 1024\n"
        "from gemma_chat.backends.llamacpp import LlamaCppBackend\n"
        "from gemma_chat.backends.base import SamplingParams\n"
        "from gemma_chat.resolve import resolve\n"
        "r = resolve('gemma-3-270m'); before = rss()\n"
        "b = LlamaCppBackend(r, n_ctx=2048)\n"
        "for _ in b.stream('<bos>Hello', SamplingParams(temperature=0, max_tokens=1)): pass\n"
        "print(rss() - before)\n")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the RSS")
    measured = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.strip())
    info = read_gguf(gguf_path)
    shape, arch = memory.shape_from_gguf(info)
    estimated = memory.estimate(shape, arch, info.file_size, 2048).total
    assert abs(estimated - measured) / measured < 0.25, (estimated, measured)


def test_missing_catalogue_model_error_names_the_pull_command():
    with pytest.raises(ModelNotFound, match="gemma pull 9b-it"):
        resolve("9b-it")


def test_a_model_that_sees_is_pulled_with_its_projector(stub, online):
    from gemma_chat import catalog
    from gemma_chat.resolve import find_projector

    spec = catalog.get("gemma-4-e4b-it")
    quant, download = next((q, d) for q, d in spec.gguf.items() if d.mmproj)
    stub.add(download.repo, download.file, b"GGUF" + os.urandom(40_000))
    stub.add(download.repo, download.mmproj, b"GGUF" + os.urandom(20_000))
    resolved = hub.pull(spec.name, "gguf", quant, quiet=True)
    projector = find_projector(resolved.path)
    assert projector is not None and projector.name == download.mmproj
    assert projector.stat().st_size == 20_004 and projector.parent == resolved.path.parent
    gets = [r[1] for r in stub.requests if r[0] == "GET"]
    assert f"/{download.repo}/resolve/main/{download.mmproj}" in gets
