"""The command line in-process (fast): parsing, usage errors and the one-line error contract,
without a model or a subprocess. The subprocess tests in test_cli cover the same paths end to end
through the installed script."""

from __future__ import annotations

import io

import pytest

from gemma_chat.cli import run_command as main  # in this process: no supervisor fork


@pytest.fixture(autouse=True)
def empty_stdin(monkeypatch):
    """As a script with nothing piped in: stdin is not a terminal, and empty."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, code, needle", [
    (["run", "--temp", "-1", "Hi"], 2, "invalid temperature -1.0"),
    (["run", "--top-p", "2", "Hi"], 2, "invalid top_p 2.0"),
    (["run", "--max-tokens", "0", "Hi"], 2, "invalid max_tokens 0"),
    (["run", "--raw", "--chat", "Hi"], 2, "--raw and --chat exclude each other"),
    (["run", "--backend", "onnx", "Hi"], 2, "unknown backend 'onnx'"),
    (["run", "-m", "gemma-nope", "Hi"], 1, "gemma-nope"),
    (["bench", "-r", "0"], 2, "-r must be at least 1"),
    (["bench", "-p", "a,b"], 2, "comma-separated integers"),
    (["bench", "--format", "xml"], 2, "unknown --format"),
    (["serve", "--port", "0"], 2, "invalid port 0"),
    (["config", "set", "colour", "blue"], 2, "unknown setting 'colour'"),
    (["config", "set", "repack", "sometimes"], 2, "repack must be one of"),
    (["show", "gemma-nope"], 1, "gemma-nope"),
])
def test_bad_input_is_one_line_and_an_exit_code(capsys, argv, code, needle, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("GEMMA_CONFIG", str(tmp_path / "config.json"))
    got, out, err = run(capsys, *argv)
    assert got == code, err
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def test_empty_prompt_before_any_model_is_loaded(capsys):
    code, _, err = run(capsys, "run", "  ")
    assert code == 2 and "the prompt is empty" in err


def test_help_version_and_settings(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_CONFIG", str(tmp_path / "config.json"))
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("gemma-chat ")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("run", "chat", "serve", "bench", "convert"))
    assert run(capsys, "config", "set", "repack", "Off")[1] == "repack = off\n"
    assert run(capsys, "config", "get", "repack")[1] == "off\n"
    listing = run(capsys, "config", "list")[1]
    assert "repack = off" in listing and "default-model = " in listing
    run(capsys, "config", "unset", "repack")
    assert run(capsys, "config", "get", "repack")[1] == "\n"


def test_models_json_lists_the_catalogue(capsys):
    import json

    code, out, _ = run(capsys, "models", "--json")
    names = {entry["name"] for entry in json.loads(out)}
    assert code == 0 and {"gemma-2-2b-it", "gemma-3-270m", "gemma-3-1b-it"} <= names


def test_bench_compare_reads_two_runs(capsys, tmp_path):
    import json

    def record(tps):
        return json.dumps({"model": "m", "backend": "llama.cpp",
                           "results": [{"test": "pp512", "mean_tps": tps}]})

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(record(100.0) + "\n")
    b.write_text(record(150.0) + "\n")
    code, out, _ = run(capsys, "bench", "--compare", str(a), str(b))
    assert code == 0 and "| m | llama.cpp | pp512 | 100.00 | 150.00 | 1.500 |" in out
    code, _, err = run(capsys, "bench", "--compare", str(a), str(tmp_path / "missing"))
    assert code == 2 and "cannot read benchmark results" in err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--bogus", "Hi"], "error: No such option: --bogus"),
    (["run", "-m"], "error: Option '-m' requires an argument."),
    (["nosuchcommand"], "error: No such command 'nosuchcommand'."),
    (["chat", "--resume", ""], "error: --resume needs a conversation file, or `last`"),
    (["run", "caf\udce9"], "error: the prompt is not valid UTF-8 text"),
    (["run", "--chat", "-s", "\udcff", "Hi"], "error: the system prompt is not valid UTF-8"),
])
def test_usage_errors_are_said_as_click_says_them(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith(needle) and len(err.strip().splitlines()) == 1, err
    assert "NoSuchOption" not in err and "Error:" not in err and out == ""


def test_a_fifo_is_not_read_as_a_model(capsys, tmp_path):
    import os

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "run", "-m", str(fifo), "Hi")
    assert code == 1 and err.strip() == f"error: {fifo} is not a regular file"


def test_resume_last_names_the_conversations_that_still_load(capsys, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("GEMMA_HOME", str(tmp_path))
    folder = tmp_path / "conversations"
    folder.mkdir()
    older = folder / "20260101-000000-aaaaaa.jsonl"
    older.write_text('{"type": "header", "format": "gemma-chat.conversation", "version": 1}\n')
    newest = folder / "20260102-000000-bbbbbb.jsonl"
    newest.write_text('{"type": "header", "format": "something else"}\n')
    now = time.time()
    os.utime(older, (now - 60, now - 60))
    code, _, err = run(capsys, "chat", "--resume", "last")
    assert code == 2 and err.startswith("error: the latest conversation cannot be resumed: ")
    assert f"these older ones can be resumed: {older}" in err
