"""Corrupt conversation files, a full disk and damaged KV states: clear one-line errors, and the
chat goes on. Fast with the scripted backend; the KV state through the real model is slow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import run_gemma
from fakes import ScriptedBackend

from gemma_chat import sessions
from gemma_chat.backends.base import SamplingParams
from gemma_chat.chat import Conversation
from gemma_chat.errors import InvalidArgument
from gemma_chat.repl import ChatApp, PlainRenderer

GOOD = {"format": sessions.FORMAT, "version": 1, "system": None, "model": {},
        "exchanges": [{"user": "Hi", "reply": "Hello", "reply_ids": [1072]}]}
CORRUPT = {
    "exchanges-5": {**GOOD, "exchanges": 5},
    "exchanges-null": {**GOOD, "exchanges": None},
    "messages-5": {k: v for k, v in {**GOOD, "messages": 5}.items() if k != "exchanges"},
}
ODD_BUT_READABLE = {
    "model-list": {**GOOD, "model": [1]},
    "kv-empty": {**GOOD, "kv_state": ""},
    "kv-traversal": {**GOOD, "kv_state": "../../etc/passwd"},
    "created-number": {**GOOD, "created": 5},
    "system-list": {**GOOD, "system": ["x"]},
}


def write(tmp_path: Path, name: str, record: object) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_files_are_one_line_errors(tmp_path, name):
    with pytest.raises(InvalidArgument, match="not a gemma-chat conversation"):
        sessions.load(write(tmp_path, name, CORRUPT[name]))


@pytest.mark.parametrize("name", list(ODD_BUT_READABLE))
def test_odd_fields_are_ignored_not_fatal(tmp_path, name):
    saved = sessions.load(write(tmp_path, name, ODD_BUT_READABLE[name]))
    assert [ex.user for ex in saved.exchanges] == ["Hi"]
    assert saved.kv_path is None and isinstance(saved.model, dict)
    assert saved.system is None or isinstance(saved.system, str)


def test_deep_huge_and_special_files(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidArgument, match="nests too deeply"):
        sessions.load(deep)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        sessions.load(Path("/dev/zero"))
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(sessions.MAX_FILE_BYTES + 1)
    with pytest.raises(InvalidArgument, match="over 64 MB"):
        sessions.load(big)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        sessions.load(binary)


def make_app(backend, folder: Path):
    _model_file(folder.parent, backend)
    notes: list[str] = []
    app = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0),
                  renderer=PlainRenderer(io.StringIO()), note=notes.append,
                  autosave=sessions.Autosave(folder))
    return app, notes


def test_a_failed_load_keeps_the_chat(tmp_path):
    backend = ScriptedBackend().enqueue("One.", "Two.")
    app, notes = make_app(backend, tmp_path / "conversations")
    bad = write(tmp_path, "bad", CORRUPT["exchanges-5"])
    oov = write(tmp_path, "oov", {**GOOD, "model": {"identity": sessions.model_identity(
        _model_file(tmp_path, backend))}, "exchanges": [
            {"user": "Hi", "reply": "x", "reply_ids": [10**9]}]})
    app.run(["Hi", f"/load {bad}", f"/load {oov}", "/load /dev/zero", "Again"])
    assert [ex.user for ex in app.conversation.exchanges] == ["Hi", "Again"]
    errors = [n for n in notes if n.startswith("error: ")]
    assert len(errors) == 3 and "outside this model's vocabulary" in errors[1]


def _model_file(tmp_path: Path, backend: ScriptedBackend) -> Path:
    from dataclasses import replace

    path = tmp_path / "scripted.gguf"
    path.write_bytes(b"scripted model")
    backend.info = replace(backend.info, path=path)
    return path


def test_a_full_disk_warns_once_and_the_chat_goes_on(tmp_path):
    backend = ScriptedBackend().enqueue("One.", "Two.", "Three.")
    app, notes = make_app(backend, tmp_path / "conversations")
    app.run(["Hi"])
    good = app.autosave.path
    written = good.read_text()
    app.autosave.path = Path("/dev/full")  # every write: ENOSPC, for real
    app.run(["Second", "Third"])
    assert [n for n in notes if n.startswith("warning:")] == [
        "warning: the conversation could not be autosaved to /dev/full (No space left on "
        "device); the chat goes on, and the turns are written as soon as there is room"]
    assert len(app.conversation.exchanges) == 3 and len(app.autosave.pending) == 2
    app.autosave.path = good  # room again: the next write catches up
    app.run(["/system Be brief."])
    assert "(autosaving works again; nothing was lost)" in notes
    saved = sessions.load(good)
    assert good.read_text().startswith(written)  # what was written is intact
    assert [ex.user for ex in saved.exchanges] == ["Hi", "Second", "Third"]
    assert saved.system == "Be brief."


@pytest.mark.slow
def test_a_truncated_kv_state_is_not_given_to_llama_cpp(gguf_path, tmp_path):
    conversation = tmp_path / "talk.json"
    first = run_gemma("chat", "-m", str(gguf_path), "--no-autosave", "-n", "4",
                      input=f"Hello there\n/save {conversation}\n")
    assert first.returncode == 0, first.stderr
    kv = conversation.with_name("talk.json.kv")
    assert kv.stat().st_size > 1000
    resumed = run_gemma("chat", "--resume", str(conversation), "--no-autosave", "-n", "2",
                        input="And now?\n")
    assert resumed.returncode == 0 and "with their KV state" in resumed.stderr, resumed.stderr
    with open(kv, "r+b") as fh:
        fh.truncate(kv.stat().st_size // 2)
    cut = run_gemma("chat", "--resume", str(conversation), "--no-autosave", "-n", "2",
                    input="And now?\n")
    assert cut.returncode == 0, cut.stderr  # llama.cpp used to abort reading it (SIGABRT)
    assert "re-processed" in cut.stderr and "Traceback" not in cut.stderr


def test_a_kv_state_larger_than_the_context_is_not_loaded(tmp_path):
    backend = ScriptedBackend().enqueue("A reply long enough to fill a small context.")
    _model_file(tmp_path, backend)
    convo = Conversation(backend)
    for _ in convo.send("Hi", SamplingParams(temperature=0)):
        pass
    path = tmp_path / "talk.json"
    assert sessions.save(convo, path, {}) is not None
    saved = sessions.load(path)
    assert saved.kv_path is not None and saved.kv_tokens == len(backend.cached_tokens)
    small = ScriptedBackend(n_ctx=saved.kv_tokens - 1)
    small.info = backend.info.__class__(**{**backend.info.__dict__, "n_ctx": small.info.n_ctx})
    note = sessions.restore(Conversation(small), saved)
    assert "re-processed" in note and small.cached_tokens == []
    assert "with their KV state" in sessions.restore(Conversation(backend), sessions.load(path))
