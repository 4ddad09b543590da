"""Well-formed GGUF files with values llama.cpp aborts or hangs on: each refused with one line
naming the file and the key, before llama.cpp sees it. In-process against the check (fast) and
through `gemma run` (slow: llama.cpp would have died with SIGABRT or hung on these)."""

from __future__ import annotations

import math

import pytest
from conftest import run_gemma
from tiny_gguf import N_VOCAB, write_gguf

from gemma_chat.errors import InvalidModelFile
from gemma_chat.gguf_file import check_gemma, read_gguf

MUTANTS = {
    "alignment-1": ({"general.alignment": ("u32", 1)}, "general.alignment"),
    "alignment-inf": ({"general.alignment": ("f32", math.inf)}, "general.alignment"),
    "blocks-0": ({"gemma3.block_count": ("u32", 0)}, "gemma3.block_count"),
    "blocks-513": ({"gemma3.block_count": ("u32", 513)}, "gemma3.block_count"),
    "blocks-max": ({"gemma3.block_count": ("u32", 2**32 - 1)}, "gemma3.block_count"),
    "blocks-2": ({"gemma3.block_count": ("u32", 2)}, "gemma3.block_count"),
    "eps-nan": ({"gemma3.attention.layer_norm_rms_epsilon": ("f32", math.nan)},
                "layer_norm_rms_epsilon"),
    "eps-negative": ({"gemma3.attention.layer_norm_rms_epsilon": ("f32", -1.0)},
                     "layer_norm_rms_epsilon"),
    "eps-missing": ({"gemma3.attention.layer_norm_rms_epsilon": None}, "layer_norm_rms_epsilon"),
    "kv-heads-array-0": ({"gemma3.attention.head_count_kv": ("arr_u32", [0])}, "head_count_kv"),
    "kv-heads-0": ({"gemma3.attention.head_count_kv": ("u32", 0)}, "head_count_kv"),
    "heads-0": ({"gemma3.attention.head_count": ("u32", 0)}, "head_count"),
    "tokens-empty": ({"tokenizer.ggml.tokens": ("arr_str", [""] * N_VOCAB)},
                     "tokenizer.ggml.tokens"),
    "tokens-identical": ({"tokenizer.ggml.tokens": ("arr_str", ["a"] * N_VOCAB)},
                         "tokenizer.ggml.tokens"),
    "tokens-bad-bytes": ({"tokenizer.ggml.tokens": ("arr_str", [f"<0xZ{i}>" for i in
                                                               range(N_VOCAB)])},
                         "tokenizer.ggml.tokens"),
    "tokens-short": ({"tokenizer.ggml.tokens": ("arr_str", ["x"])}, "tokenizer.ggml.tokens"),
    "token-types-bad": ({"tokenizer.ggml.token_type": ("arr_i32", [9] * N_VOCAB)},
                        "tokenizer.ggml.token_type"),
    "tokenizer-bert": ({"tokenizer.ggml.model": ("str", "bert")}, "tokenizer.ggml.model"),
    "context-max": ({"gemma3.context_length": ("u32", 0xFFFFFFFF)}, "gemma3.context_length"),
    "context-0": ({"gemma3.context_length": ("u32", 0)}, "gemma3.context_length"),
    "bos-outside": ({"tokenizer.ggml.bos_token_id": ("u32", 10**6)}, "bos_token_id"),
    "embd-mismatch": ({"gemma3.embedding_length": ("u32", 128)}, "token_embd.weight"),
    "rope-base-0": ({"gemma3.rope.freq_base": ("f32", 0.0)}, "rope.freq_base"),
    "window-0": ({"gemma3.attention.sliding_window": ("u32", 0)}, "sliding_window"),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mutants")
    return {name: write_gguf(folder / f"{name}.gguf", changes)
            for name, (changes, _) in MUTANTS.items()}


def test_the_valid_tiny_file_passes(tmp_path):
    info = check_gemma(read_gguf(write_gguf(tmp_path / "ok.gguf")))
    assert info.architecture == "gemma3" and len(info.read_array("tokenizer.ggml.tokens")) == 512


@pytest.mark.parametrize("name", list(MUTANTS))
def test_bad_values_are_refused_by_name(mutants, name):
    key = MUTANTS[name][1]
    with pytest.raises(InvalidModelFile) as err:
        check_gemma(read_gguf(mutants[name]))
    message = str(err.value)
    assert key in message and f"{name}.gguf" in message, message
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTANTS))
def test_gemma_run_refuses_them_in_one_line(mutants, name):
    result = run_gemma("run", "-m", str(mutants[name]), "--raw", "-n", "2", "Hello", timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)  # not 134 (SIGABRT)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert MUTANTS[name][1] in lines[0], lines[0]


def test_a_checked_file_is_remembered_and_a_changed_one_checked_again(tmp_path, monkeypatch):
    from gemma_chat import gguf_file

    monkeypatch.setenv("GEMMA_HOME", str(tmp_path / "home"))
    path = write_gguf(tmp_path / "ok.gguf")
    reads = []
    original = gguf_file.GGUFInfo.read_array
    monkeypatch.setattr(gguf_file.GGUFInfo, "read_array",
                        lambda self, key: reads.append(key) or original(self, key))
    check_gemma(read_gguf(path))
    assert "tokenizer.ggml.tokens" in reads
    reads.clear()
    gguf_file._checked.clear()  # as a new process would start
    check_gemma(read_gguf(path))
    assert reads == []  # answered from GEMMA_HOME/checked-gguf.json
    write_gguf(path, {"gemma3.block_count": ("u32", 0)})  # the file changes: checked again
    with pytest.raises(InvalidModelFile, match="block_count"):
        check_gemma(read_gguf(path))


def test_a_vocabulary_only_file_is_not_called_truncated(tmp_path):
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "<eos>", "<bos>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    info = read_gguf(path)  # no tensors, and no padding after the header
    assert info.tensor_count == 0 and info.read_array("tokenizer.ggml.tokens")[2] == "<bos>"
