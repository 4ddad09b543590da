"""`gemma convert` refusals (one line, non-zero exit) and atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

from conftest import run_gemma  # noqa: E402
from tiny_models import build_checkpoint  # noqa: E402

from gemma_chat import convert as conv  # noqa: E402
from gemma_chat.errors import GemmaChatError  # noqa: E402
from gemma_chat.hub import NotEnoughSpace  # noqa: E402

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint("gemma3_text", tmp_path_factory.mktemp("err") / "tiny-gemma3",
                            train_steps=0)


@pytest.fixture()
def copy(checkpoint, tmp_path):
    def make(**edits) -> Path:
        folder = tmp_path / "ckpt"
        shutil.copytree(checkpoint, folder)
        for name, content in edits.items():
            path = folder / name.replace("__", ".")
            if content is None:
                path.unlink()
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return folder
    return make


def one_line_error(result, code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unsupported_architecture_lists_the_supported_ones(copy):
    folder = copy()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    line = one_line_error(run_gemma("convert", str(folder), "--to", "gguf"))
    assert "'llama' checkpoint" in line and "gemma2 (Gemma 2)" in line and "gemma3_text" in line


def test_missing_tokenizer(copy):
    folder = copy(tokenizer__model=None)
    line = one_line_error(run_gemma("convert", str(folder), "--to", "gguf"))
    assert "no tokenizer.model" in line
    (folder / "tokenizer.json").unlink()
    line = one_line_error(run_gemma("convert", str(folder), "--to", "mlx"))
    assert "has no tokenizer" in line


def test_pickle_checkpoints_are_refused(copy):
    folder = copy(model__safetensors=None)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    line = one_line_error(run_gemma("convert", str(folder), "--to", "gguf"))
    assert "pickle" in line and "pytorch_model.bin" in line and "safetensors" in line


def test_truncated_safetensors(copy, checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    folder = copy(model__safetensors=data[: len(data) // 2])
    line = one_line_error(run_gemma("convert", str(folder), "--to", "gguf", "-q", "f16"))
    assert "truncated" in line
    assert not list(folder.parent.rglob("*.gguf"))


def test_config_llama_cpp_cannot_represent(copy):
    folder = copy()
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"] * 3
    (folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(run_gemma("convert", str(folder), "--to", "gguf"))
    assert "not the standard pattern" in line


def test_bad_flags(checkpoint):
    one_line_error(run_gemma("convert", str(checkpoint), "--to", "onnx"), 2)
    line = one_line_error(run_gemma("convert", str(checkpoint), "--to", "mlx", "-q", "q6_k"), 2)
    assert "GGUF type" in line
    line = one_line_error(run_gemma("convert", "gemma-9000"), 1)
    assert "unknown model" in line


def test_not_enough_disk_space_is_refused_before_writing(checkpoint, tmp_path, monkeypatch):
    job = conv.plan(conv.locate(str(checkpoint)), "gguf", "q8_0", tmp_path / "out")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(NotEnoughSpace):
        conv.run(job)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("quant", ["f16", "q4_k_m"])
def test_an_interrupted_conversion_leaves_nothing(checkpoint, tmp_path, quant):
    out = tmp_path / "out"
    job = conv.plan(conv.locate(str(checkpoint)), "gguf", quant, out)
    seen = []

    def interrupt(stage, done, total, detail=""):
        seen.append(stage)
        if stage.startswith("writing") and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.run(job, progress=interrupt)
    assert seen and not job.target.exists()
    assert [p.name for p in out.iterdir()] == []  # no .partial file, no intermediate folder


def test_errors_are_typed_for_library_callers(copy):
    folder = copy(model__safetensors=None)
    with pytest.raises(GemmaChatError):
        conv.locate(str(folder))


def test_a_catalogue_name_pulls_the_original_weights_first(checkpoint, tmp_path):
    """`gemma convert 1b-it` against a local stand-in of the Hub serving a tiny checkpoint as
    google/gemma-3-1b-it: asks for --yes in a script, then downloads (safetensors, configs and
    tokenizer only) and converts into the store, where `gemma run -m` finds it."""
    from hubstub import HubStub

    with HubStub(tmp_path / "hub-files") as stub:
        for item in checkpoint.iterdir():
            stub.add("google/gemma-3-1b-it", item.name, item)
        stub.add("google/gemma-3-1b-it", "pytorch_model.bin", b"never fetched")
        env = {"HF_ENDPOINT": stub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_HUB_OFFLINE": "", "HF_TOKEN": "", "GEMMA_HOME": str(tmp_path / "home")}
        refused = run_gemma("convert", "1b-it", "--to", "gguf", env=env)
        assert refused.returncode == 1 and "pass --yes" in refused.stderr
        result = run_gemma("convert", "1b-it", "--to", "gguf", "-q", "q8_0", "--yes", env=env,
                           timeout=300)
        assert result.returncode == 0, result.stderr
    assert "the original weights (google/gemma-3-1b-it)" in result.stderr
    assert "chat with it: gemma chat -m gemma-3-1b-it --backend llama.cpp" in result.stderr
    snapshot = next((tmp_path / "cache").rglob("snapshots/*"))
    assert not (snapshot / "pytorch_model.bin").exists()
    stored = tmp_path / "home" / "models" / "gemma-3-1b-it" / "gemma-3-1b-it-q8_0.gguf"
    assert stored.is_file()
    run = run_gemma("run", "-m", "1b-it", "--raw", "-n", "3", "--temp", "0", "--json", "The",
                    env={**env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"] == "gemma-3-1b-it"
    listed = run_gemma("list", env={**env, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "Q8_0" in line)
    assert "gemma-3-1b-it" in row and "store" in row


def test_a_converted_model_is_a_source_by_its_store_name(checkpoint, tmp_path):
    env = {"GEMMA_HOME": str(tmp_path / "home")}
    first = run_gemma("convert", str(checkpoint), "--to", "gguf", "-q", "f16", env=env)
    assert first.returncode == 0, first.stderr
    again = run_gemma("convert", "tiny-gemma3", "--to", "gguf", "-q", "q8_0", env=env)
    assert again.returncode == 0, again.stderr
    assert "tiny-gemma3-f16.gguf" in again.stderr and "warning" not in again.stderr
    stored = sorted(p.name for p in (tmp_path / "home" / "models" / "tiny-gemma3").iterdir())
    assert stored == ["tiny-gemma3-f16.gguf", "tiny-gemma3-q8_0.gguf"]
