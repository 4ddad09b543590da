"""The chat REPL in-process: prompt-toolkit pipe input, the real model, every command."""

from __future__ import annotations

import io
import json
import stat
import sys

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from gemma_chat import sessions
from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.llamacpp import LlamaCppBackend
from gemma_chat.chat import Conversation
from gemma_chat.errors import ModelNotFound
from gemma_chat.repl import ChatApp, MarkdownRenderer, PlainRenderer, join_multiline, terminal_lines
from gemma_chat.resolve import resolve

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


GREEDY = SamplingParams(temperature=0, max_tokens=6)


def make_app(backend, tmp_path, **kw):
    out, notes = io.StringIO(), []
    app = ChatApp(backend, Conversation(backend), kw.pop("sampling", GREEDY),
                  renderer=PlainRenderer(out), note=notes.append,
                  autosave=sessions.Autosave(tmp_path / "conversations"), **kw)
    return app, out, notes


def type_into(app, keys: str, tmp_path) -> list[str]:
    """Feed keystrokes through a real prompt-toolkit session; return the lines it produced,
    after the app handled them."""
    handled = []
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        for line in terminal_lines(app, input=pipe, output=DummyOutput(),
                                   history_path=tmp_path / "history"):
            handled.append(line)
            if not app.handle(line):
                break
    return handled


def test_multi_turn_through_prompt_toolkit(backend, tmp_path):
    app, out, notes = make_app(backend, tmp_path)
    lines = type_into(app, "Hello\rWhat next?\r/exit\r", tmp_path)
    assert lines == ["Hello", "What next?", "/exit"]
    assert app.replies == 2 and len(app.conversation.exchanges) == 2
    assert out.getvalue().count("\n") >= 2
    # The history file remembers what was typed.
    assert "What next?" in (tmp_path / "history").read_text()


def test_multiline_input_and_alt_enter(backend, tmp_path):
    app, _, _ = make_app(backend, tmp_path)
    keys = '"""\rline one\rline two\r"""\rfirst\x1b\rsecond\r/exit\r'
    lines = type_into(app, keys, tmp_path)
    assert lines[0] == "line one\nline two"
    assert lines[1] == "first\nsecond"  # Esc-Enter inserted a newline
    assert [ex.user for ex in app.conversation.exchanges] == lines[:2]
    assert list(join_multiline(iter(['"""one line"""']))) == ["one line"]


def test_ctrl_c_at_the_prompt(backend, tmp_path):
    app, _, notes = make_app(backend, tmp_path)
    # Ctrl-C with text typed keeps the text; Enter then sends it.
    lines = type_into(app, "keep me\x03\r/exit\r", tmp_path)
    assert lines[0] == "keep me"
    # Ctrl-C twice at an empty prompt leaves, after a hint.
    app2, _, notes2 = make_app(backend, tmp_path)
    assert type_into(app2, "\x03\x03", tmp_path) == []
    assert any("Ctrl-C again or Ctrl-D" in n for n in notes2)


def test_every_command(backend, tmp_path):
    app, out, notes = make_app(backend, tmp_path)
    for line in ["/help", "Hello", "/stats", "/set", "/set temp 0.7", "/set top-k 3",
                 "/set seed 5", "/set seed none", "/set max-tokens 4", "/set temp -2",
                 "/set nonsense 1", "/info", "/system", "/system Be terse.", "/system",
                 "/model", "/frobnicate", "/clear"]:
        assert app.handle(line)
    text = "\n".join(notes)
    assert "/retry" in text and "/edit" in text  # help
    assert "context 1" in text and "evaluated" in text  # stats
    assert "(temp = 0.7)" in text and "(top-k = 3)" in text
    assert "invalid temperature -2" in text and "usage: /set" in text
    assert "prompt format <bos><start_of_turn>user" in text and "Q4_K_M" in text  # info
    assert "system prompt: 'Be terse.'" in text
    assert "unknown command /frobnicate" in text
    assert app.sampling.temperature == 0.7 and app.sampling.top_k == 3
    assert app.sampling.seed is None and app.sampling.max_tokens == 4
    assert app.conversation.system == "Be terse." and app.conversation.exchanges == []
    assert not app.handle("/bye") and not app.handle("/exit")


def test_retry_and_undo(backend, tmp_path):
    app, out, notes = make_app(backend, tmp_path)
    app.handle("Count: one, two,")
    first = app.conversation.exchanges[-1].reply
    app.handle("/retry")
    assert len(app.conversation.exchanges) == 1
    assert app.conversation.exchanges[-1].reply == first  # greedy
    app.handle("/undo")
    assert app.conversation.exchanges == []
    app.handle("/undo")
    app.handle("/retry")
    assert notes[-2:] == ["nothing to undo", "nothing to retry yet"]


def test_save_load_round_trip_with_kv_state(backend, tmp_path):
    app, _, notes = make_app(backend, tmp_path, sampling=SamplingParams(temperature=0,
                                                                          max_tokens=5,
                                                                          top_k=7))
    app.handle("/system Answer briefly.")
    app.handle("Hello there")
    app.handle("And then?")
    path = tmp_path / "chat.json"
    app.handle(f"/save {path}")
    record = json.loads(path.read_text())
    assert record["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user",
                                                       "assistant"]
    assert record["model"]["name"] == "gemma-3-270m" and record["sampling"]["top_k"] == 7
    assert record["created"] and (tmp_path / "chat.json.kv").is_file()

    # A new chat (as after a restart: the KV cache emptied) loads it back.
    backend.trim_cache(0)
    other, _, notes2 = make_app(backend, tmp_path)
    other.handle(f"/load {path}")
    assert "with their KV state" in notes2[-1]
    assert other.conversation.messages == app.conversation.messages
    assert other.conversation.ids == app.conversation.ids
    other.handle("One more thing.")
    stats = other.conversation.last_stats
    new_turn = stats.prompt_tokens - len(app.conversation.ids)
    assert stats.prompt_eval_tokens <= new_turn + 3  # the history was not re-processed


def test_bad_load_and_save_keep_the_conversation(backend, tmp_path):
    app, _, notes = make_app(backend, tmp_path)
    app.handle("Hello")
    before = app.conversation.messages
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    app.handle(f"/load {bad}")
    assert "is not valid JSON" in notes[-1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": "world"}))
    app.handle(f"/load {other}")
    assert "not a gemma-chat conversation" in notes[-1]
    app.handle(f"/load {tmp_path / 'missing.json'}")
    assert "does not exist" in notes[-1]
    app.handle(f"/save {tmp_path / 'no-such-folder' / 'x.json'}")
    assert "does not exist" in notes[-1]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    app.handle(f"/save {locked / 'x.json'}")
    if not (locked / "x.json").exists():  # root ignores the permission bits
        assert "cannot save" in notes[-1]
    app.handle("/save /proc/gemma-chat-test.json")
    assert "cannot save" in notes[-1]
    assert app.conversation.messages == before


def test_autosave_survives_and_resumes(backend, tmp_path):
    app, _, _ = make_app(backend, tmp_path)
    app.handle("First question")
    app.handle("Second question")
    app.handle("/undo")
    app.handle("Third question")
    path = app.autosave.path
    assert path.parent == tmp_path / "conversations"
    saved = sessions.load(path)
    assert [ex.user for ex in saved.exchanges] == ["First question", "Third question"]
    # A crash mid-write leaves a cut line: everything before it stands.
    with open(path, "a") as fh:
        fh.write('{"type": "exchange", "user": "cut sh')
    assert len(sessions.load(path).exchanges) == 2


def test_edit_composes_the_message(backend, tmp_path):
    app, _, _ = make_app(backend, tmp_path, editor=lambda initial: "Written in an editor\n")
    app.handle("/edit")
    assert app.conversation.exchanges[-1].user.startswith("Written in an editor")


def test_edit_runs_the_real_editor(tmp_path, monkeypatch):
    from gemma_chat.repl import edit_in_editor

    script = tmp_path / "fake-editor"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "open(sys.argv[1], 'w').write('from the editor')\n")
    script.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(script))
    monkeypatch.delenv("VISUAL", raising=False)
    assert edit_in_editor() == "from the editor"


def test_model_switch_keeps_the_conversation_and_failure_keeps_the_old_model(
        backend, gguf_path, tmp_path):
    loaded = []

    def load_model(name):
        resolved = resolve(name)
        engine = LlamaCppBackend(resolved, n_ctx=1024)
        loaded.append(engine)
        return engine

    own = LlamaCppBackend(resolve(str(gguf_path)), n_ctx=1024)
    app, _, notes = make_app(own, tmp_path, load_model=load_model)
    app.handle("Hello")
    app.handle("/model no-such-model-anywhere")
    assert "unknown model" in notes[-1] and app.backend is own
    app.handle(f"/model {gguf_path}")
    assert app.backend is loaded[0] and "conversation is kept" in notes[-1]
    app.handle("Still there?")
    assert len(app.conversation.exchanges) == 2
    assert app.conversation.last_stats.prompt_tokens > 20
    app.backend.close()
    with pytest.raises(ModelNotFound):
        load_model("no-such-model-anywhere")


def test_ctrl_c_during_a_reply_keeps_the_partial_reply(backend, tmp_path):
    class StopAtSecondPiece(PlainRenderer):
        pieces = 0

        def feed(self, text):
            self.pieces += 1
            if self.pieces == 2:
                raise KeyboardInterrupt  # the signal, arriving mid-stream
            super().feed(text)

    out, notes = io.StringIO(), []
    app = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0, max_tokens=40),
                  renderer=StopAtSecondPiece(out), note=notes.append)
    app.handle("Tell me a long story")
    last = app.conversation.exchanges[-1]
    assert last.interrupted and last.reply and "[interrupted]" in notes
    assert out.getvalue().strip() and last.reply.startswith(out.getvalue().strip())
    app.handle("Go on")
    assert not app.conversation.exchanges[-1].interrupted


def test_a_real_sigint_during_streaming(backend, tmp_path):
    """The signal itself, sent to this process mid-reply: KeyboardInterrupt may surface in the
    renderer or inside the backend's token loop; either way the chat goes on."""
    import os
    import signal

    class SignalAtThirdPiece(PlainRenderer):
        pieces = 0

        def feed(self, text):
            self.pieces += 1
            if self.pieces == 3:
                os.kill(os.getpid(), signal.SIGINT)
            super().feed(text)

    out, notes = io.StringIO(), []
    app = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0, max_tokens=60),
                  renderer=SignalAtThirdPiece(out), note=notes.append)
    app.handle("Tell me a long story")
    last = app.conversation.exchanges[-1]
    assert "[interrupted]" in notes and last.interrupted
    assert 0 < len(last.reply_ids) < 60
    app.renderer = PlainRenderer(out)
    app.handle("Go on")
    assert not app.conversation.exchanges[-1].interrupted
    assert app.conversation.last_stats.cached_tokens > 0


def test_context_meter_and_trimming_note(gguf_path, tmp_path):
    with LlamaCppBackend(resolve(str(gguf_path)), n_ctx=256) as small:
        app, _, notes = make_app(small, tmp_path, sampling=SamplingParams(temperature=0,
                                                                            max_tokens=16))
        for i in range(6):
            app.handle(f"message {i}: " + "tea and cake " * 8)
        assert any(n.startswith("(dropped the") for n in notes)
        assert "/256" in app.toolbar() and "t/s" in app.toolbar()
        app.handle("word " * 400)
        assert "context holds 256" in notes[-1]


def test_markdown_renderer_renders_once_with_highlighting():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, height=20, color_system="truecolor")
    renderer = MarkdownRenderer(console, fps=1000)
    renderer.start()
    reply = "Here is code:\n\n```python\ndef unique_marker():\n    return 42\n```\n\nDone."
    for i in range(0, len(reply), 5):
        renderer.feed(reply[i:i + 5])
    renderer.end()
    printed = buf.getvalue()
    final = printed[printed.rindex("Here is code"):]  # the live view was transient
    assert final.count("unique_marker") == 1
    assert "\x1b[" in final  # highlighted
