"""The ``gemma`` command end to end: the installed script, the real model, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import GEMMA, run_gemma
from test_resolve import write_tiny_gguf

from gemma_chat.generate import compose

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


def assert_clean_error(result, needle: str, code: int | None = None):
    """One line on stderr naming the problem, a non-zero exit, no traceback."""
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0], lines[0]


def test_readme_example_prints_text(gguf_path):
    result = run_gemma("run", "-m", "gemma-3-270m", "--temp", "0", "-n", "16",
                       "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 5
    assert "\x1b[" not in result.stdout  # no colour codes into a pipe
    assert result.stderr == ""


def test_json_output_and_determinism(gguf_path):
    args = ("run", "-m", "gemma-3-270m", "--temp", "0", "-n", "8", "--json", "Water boils at")
    first, second = run_gemma(*args), run_gemma(*args)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["text"] and data["text"] == json.loads(second.stdout)["text"]
    assert data["prompt_format"] == "raw"  # a pretrained model gets raw text
    stats = data["stats"]
    assert stats["generated_tokens"] == len(stats["token_ids"]) == 8
    assert stats["stop_reason"] == "length"
    assert data["sampling"]["temperature"] == 0


def test_stdin_is_appended_after_the_argument(gguf_path):
    base = json.loads(run_gemma("run", "-n", "1", "--json", "Summarize:").stdout)
    piped = json.loads(run_gemma("run", "-n", "1", "--json", "Summarize:",
                                 input="A long note about tea.\n").stdout)
    only_stdin = json.loads(run_gemma("run", "-n", "1", "--json",
                                      input="A long note about tea.\n").stdout)
    assert piped["stats"]["prompt_tokens"] > base["stats"]["prompt_tokens"]
    assert piped["stats"]["prompt_tokens"] > only_stdin["stats"]["prompt_tokens"]
    assert compose("Summarize:", "A long note.\n") == "Summarize:\n\nA long note."


def test_chat_template_and_system_prompt_with_verbose(gguf_path):
    result = run_gemma("run", "--chat", "--system", "Be brief.", "-n", "4", "--temp", "0",
                       "--verbose", "Hi")
    assert result.returncode == 0, result.stderr
    assert "Gemma chat template" in result.stderr
    assert "generated 4 tokens" in result.stderr
    assert "stop: length" in result.stderr


def test_every_sampling_flag_is_accepted(gguf_path):
    result = run_gemma("run", "--temp", "0.7", "--top-k", "40", "--top-p", "0.9",
                       "--min-p", "0.05", "--repeat-penalty", "1.1", "--seed", "7",
                       "--max-tokens", "3", "--ctx", "512", "--threads", "1",
                       "--backend", "llama.cpp", "--json", "Hello")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sampling"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                                "repeat_penalty": 1.1, "repeat_last_n": 64, "seed": 7,
                                "max_tokens": 3}
    assert "top_k=40" in data["stats"]["sampler"] and "dist(seed=7)" in data["stats"]["sampler"]


@pytest.mark.parametrize("args, needle", [
    (["--temp", "-1"], "invalid temperature -1"),
    (["--top-p", "2"], "invalid top_p 2"),
    (["--top-k", "-5"], "invalid top_k"),
    (["--max-tokens", "0"], "invalid max_tokens"),
    (["--backend", "tensorflow"], "unknown backend"),
])
def test_invalid_values(args, needle):
    assert_clean_error(run_gemma("run", *args, "Hello"), needle, code=2)


def test_empty_prompt():
    assert_clean_error(run_gemma("run", "   "), "the prompt is empty", code=2)
    assert_clean_error(run_gemma("run", input=""), "the prompt is empty", code=2)


def test_unknown_model_name():
    assert_clean_error(run_gemma("run", "-m", "gemma-2-2b-itt", "Hi"), "did you mean")


def test_missing_file(tmp_path):
    assert_clean_error(run_gemma("run", "-m", str(tmp_path / "nope.gguf"), "Hi"),
                       "does not exist")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "weights.gguf"
    bogus.write_text("definitely not a model")
    assert_clean_error(run_gemma("run", "-m", str(bogus), "Hi"), "is not a GGUF file")


def test_truncated_gguf(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        cut.write_bytes(src.read(50_000_000))
    assert_clean_error(run_gemma("run", "-m", str(cut), "Hi"), "truncated")


def test_non_gemma_gguf(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama")
    assert_clean_error(run_gemma("run", "-m", str(path), "Hi"), "'llama' model, not Gemma")


def test_context_too_large_for_the_model(gguf_path):
    assert_clean_error(run_gemma("run", "--ctx", "100000", "Hi"), "context length (32768)")


def test_ctrl_c_stops_generation_with_130(gguf_path):
    proc = subprocess.Popen(
        [str(GEMMA), "run", "--temp", "0", "-n", "5000", "--ctx", "8192", "Once upon a time"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    # Wait for streamed text to arrive, then press Ctrl-C.
    os.set_blocking(proc.stdout.fileno(), False)
    received = b""
    deadline = time.time() + 60
    while len(received) < 20 and time.time() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            received += chunk
        time.sleep(0.05)
    assert received, "no streamed output before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert err.strip().splitlines()[-1] == b"interrupted"


def test_models_table_and_json():
    result = run_gemma("models", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    names = {e["name"] for e in entries}
    assert {"gemma-2-2b-it", "gemma-3-270m", "gemma-1.1-7b-it", "gemma-3-1b-it"} <= names
    demo = next(e for e in entries if e["name"] == "gemma-3-270m")
    assert "gguf" in demo["on_disk"]  # (and "mlx" once a test has imported it)
    table = run_gemma("models", env={"COLUMNS": "200"})
    assert table.returncode == 0
    assert "gemma-2-2b-it" in table.stdout and "2b-it" in table.stdout
    assert "\x1b[" not in table.stdout


def test_help_and_version_do_not_import_inference_libraries():
    code = ("import sys; from gemma_chat.cli import main; "
            "rc = main(['--help']); "
            "assert 'llama_cpp' not in sys.modules and 'mlx' not in sys.modules; "
            "sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "models" in result.stdout
    version = run_gemma("--version")
    assert version.returncode == 0 and version.stdout.startswith("gemma-chat ")


def hide_module_and_run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter where ``module`` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None; "
            "import importlib.util as u; orig = u.find_spec; "
            f"u.find_spec = lambda n, *a: None if n == {module!r} else orig(n, *a); "
            f"from gemma_chat.cli import main; sys.exit(main({args!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ.copy())


def test_backend_without_its_library_names_the_pip_install():
    result = hide_module_and_run("mlx_lm", ["run", "--backend", "mlx", "Hi"])
    assert_clean_error(result, "pip install 'gemma-chat[mlx]'")


def test_missing_extra_names_the_pip_install(tmp_path):
    result = hide_module_and_run("llama_cpp", ["run", "Hi"])
    assert result.returncode == 1
    assert "pip install 'gemma-chat[llama]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_absurd_thread_count_is_refused_before_llama_cpp(gguf_path):
    # llama.cpp died with std::bad_alloc (SIGABRT) on -t 100000.
    assert_clean_error(run_gemma("run", "-m", str(gguf_path), "-t", "100000", "Hi"),
                       "invalid thread count 100000: must be 1 to 512", code=2)
