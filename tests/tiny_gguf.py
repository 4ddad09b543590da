"""A tiny Gemma 3 GGUF written with gguf's GGUFWriter (one layer, 256 wide, a 512-token
vocabulary, random f32 weights) that llama.cpp loads and runs, with any metadata value replaced:
the base of the malformed-file tests.

    path = write_gguf(tmp_path / "bad.gguf", {"gemma3.block_count": ("u32", 0)})
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemma_chat.backends.repack import probe_tensors

N_EMBD, N_FF, N_HEAD, HEAD_DIM, N_VOCAB = 256, 512, 2, 128, 512

#: The metadata of the valid file: key -> (kind, value).
def base_metadata() -> dict[str, tuple[str, object]]:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(N_VOCAB - len(tokens))]
    return {
        "general.architecture": ("str", "gemma3"),
        "general.name": ("str", "tiny"),
        "general.alignment": ("u32", 32),
        "gemma3.context_length": ("u32", 512),
        "gemma3.embedding_length": ("u32", N_EMBD),
        "gemma3.block_count": ("u32", 1),
        "gemma3.feed_forward_length": ("u32", N_FF),
        "gemma3.attention.head_count": ("u32", N_HEAD),
        "gemma3.attention.head_count_kv": ("u32", 1),
        "gemma3.attention.key_length": ("u32", HEAD_DIM),
        "gemma3.attention.value_length": ("u32", HEAD_DIM),
        "gemma3.attention.layer_norm_rms_epsilon": ("f32", 1e-6),
        "gemma3.rope.freq_base": ("f32", 10000.0),
        "gemma3.attention.sliding_window": ("u32", 512),
        "tokenizer.ggml.model": ("str", "llama"),
        "tokenizer.ggml.tokens": ("arr_str", tokens),
        "tokenizer.ggml.scores": ("arr_f32", [0.0] * N_VOCAB),
        "tokenizer.ggml.token_type": ("arr_i32", [3] * 4 + [6] * 256 + [1] * (N_VOCAB - 260)),
        "tokenizer.ggml.bos_token_id": ("u32", 2),
        "tokenizer.ggml.eos_token_id": ("u32", 1),
        "tokenizer.ggml.unknown_token_id": ("u32", 3),
        "tokenizer.ggml.padding_token_id": ("u32", 0),
    }


def write_gguf(path: Path, changes: dict[str, tuple[str, object] | None] | None = None) -> Path:
    """The tiny model with ``changes`` applied to its metadata (None removes a key)."""
    import gguf

    meta = base_metadata()
    for key, value in (changes or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.kv_data[0].clear()  # the writer's own architecture key: ours may differ
    adders = {
        "str": writer.add_string, "u32": writer.add_uint32, "u64": writer.add_uint64,
        "i32": writer.add_int32, "f32": writer.add_float32, "bool": writer.add_bool,
        "arr_str": writer.add_array, "arr_i32": lambda k, v: writer.add_key_value(
            k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32),
        "arr_f32": lambda k, v: writer.add_key_value(
            k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32),
        "arr_u32": lambda k, v: writer.add_key_value(
            k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32),
    }
    for key, (kind, value) in meta.items():
        adders[kind](key, value)

    for name, value in probe_tensors(rng, N_VOCAB, N_EMBD, N_FF, N_HEAD, HEAD_DIM).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
