"""GGUF header checks and model resolution (paths, names, the bundled model, the HF cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemma_chat.backends import choose, formats_for
from gemma_chat.errors import InvalidModelFile, ModelNotFound, UnsupportedArchitecture
from gemma_chat.gguf_file import check_gemma, read_gguf
from gemma_chat.resolve import resolve

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


def write_tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A small but valid GGUF of the given architecture, written with gguf's GGUFWriter."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_real_model_header(gguf_path):
    info = read_gguf(gguf_path)
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert info.get("attention.sliding_window") == 512
    assert info.get("tokenizer.ggml.bos_token_id") == 2
    assert 250e6 < info.n_params < 300e6
    assert not info.looks_instruction_tuned()  # the base model, no chat template


def test_truncated_gguf_is_named_truncated(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        cut.write_bytes(src.read(20_000_000))
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_gguf(cut)
    # Cut inside the header (the vocabulary) too.
    cut.write_bytes(gguf_path.read_bytes()[:100_000])
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_gguf(cut)


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(InvalidModelFile, match="not a GGUF"):
        read_gguf(bogus)
    with pytest.raises(InvalidModelFile, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_non_gemma_gguf_is_refused_by_name(tmp_path):
    info = read_gguf(write_tiny_gguf(tmp_path / "llama.gguf", "llama"))
    assert info.architecture == "llama"
    with pytest.raises(UnsupportedArchitecture, match="'llama' model, not Gemma"):
        check_gemma(info)


def test_resolve_local_path(gguf_path):
    resolved = resolve(str(gguf_path))
    assert resolved.format == "gguf" and resolved.origin == "path"
    assert resolved.path == gguf_path
    assert not resolved.instruction_tuned


def test_resolve_bundled_demo_by_name(gguf_path):
    for name in ("gemma-3-270m", "270m"):
        resolved = resolve(name)
        assert resolved.origin == "bundled"
        assert resolved.spec.name == "gemma-3-270m"
        assert resolved.path == gguf_path
        assert str(resolved.path).startswith(os.environ["GEMMA_HOME"])


def test_unknown_and_missing_models():
    with pytest.raises(ModelNotFound, match="did you mean"):
        resolve("gemma-2-2b-itt")
    with pytest.raises(ModelNotFound, match="gemma pull 2b-it .*bartowski/gemma-2-2b-it-GGUF/"
                                            "gemma-2-2b-it-Q4_K_M.gguf"):
        resolve("2b-it")
    with pytest.raises(InvalidModelFile, match="does not exist"):
        resolve("./nowhere/model.gguf")


def lay_out_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache as huggingface_hub writes it: blobs, refs/main, snapshots."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, source in files.items():
        blob = root / "blobs" / f"blob-{name}"
        blob.symlink_to(source)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_resolve_from_hub_cache_by_alias_and_repo(gguf_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = lay_out_hub_cache(tmp_path, "bartowski/gemma-2-2b-it-GGUF",
                                 {"gemma-2-2b-it-Q4_K_M.gguf": gguf_path})
    by_alias = resolve("2b-it")
    assert by_alias.origin == "hf-cache"
    assert by_alias.path == snapshot / "gemma-2-2b-it-Q4_K_M.gguf"
    assert by_alias.spec.name == "gemma-2-2b-it" and by_alias.instruction_tuned
    by_repo = resolve("bartowski/gemma-2-2b-it-GGUF")
    assert by_repo.path == by_alias.path and by_repo.spec.name == "gemma-2-2b-it"
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        resolve("someone/gemma-nothing-GGUF")


def write_config(folder: Path, model_type: str, weights: str | None = "model.safetensors"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (folder / weights).write_bytes(b"\0" * 16)
    return folder


def test_model_folders(tmp_path):
    mlx = resolve(str(write_config(tmp_path / "gemma-2-2b-it-4bit", "gemma2")))
    assert mlx.format == "mlx" and mlx.instruction_tuned
    with pytest.raises(UnsupportedArchitecture, match="'llama' checkpoint, not Gemma"):
        resolve(str(write_config(tmp_path / "llama", "llama")))
    with pytest.raises(InvalidModelFile, match="pickle"):
        resolve(str(write_config(tmp_path / "old", "gemma", "pytorch_model.bin")))


def test_backend_choice_names_the_fix():
    assert formats_for("llama.cpp") == ("gguf",)
    assert choose("auto", "gguf").name == "llama.cpp"
    with pytest.raises(InvalidModelFile, match="gemma convert PATH --to gguf"):
        choose("llama.cpp", "mlx")


def test_projector_and_drafter_files_are_not_the_model(tmp_path):
    from gemma_chat.resolve import model_ggufs

    for name in ("mmproj-gemma-4-E4B-it-Q8_0.gguf", "mtp-gemma-4-E4B-it-Q8_0.gguf",
                 "gemma-4-E4B-it-Q4_K_M.gguf", "gemma-4-E4B-it-mmproj.gguf"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in model_ggufs(tmp_path)] == ["gemma-4-E4B-it-Q4_K_M.gguf"]
