"""A Gemma GGUF to an mlx-lm model folder (one GGUF, both backends).

    gguf_to_mlx(Path("gemma-3-270m-q4_k_m.gguf"), Path("out"), dtype="bfloat16")

The GGUF's tensors are dequantized with gguf-py, renamed from llama.cpp's names back to Hugging
Face's, and llama.cpp's conversion is undone where it changed values: Gemma's RMSNorm scales by
(1 + w), and llama.cpp stores w + 1. The config is written in the form the installed mlx-lm reads,
and the tokenizer is rebuilt with transformers' GGUF loader, which tokenizes exactly as
llama.cpp does (control tokens and whitespace runs included; a naive SentencePiece rebuild does
not). The folder is written beside its destination and renamed into place only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import store
from ..errors import InvalidArgument, MissingDependency, UnsupportedArchitecture
from ..family import GEMMA, query_pre_attn_scalar
from ..gguf_file import check_gemma, read_gguf

# llama.cpp tensor names -> Hugging Face names; {n} is the layer number.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def hf_name(name: str, arch: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name."""
    match = _LAYER.match(name)
    if match:
        layer, part = match.groups()
        if part == "ffn_norm":
            # Gemma 1 has one norm before the MLP, which Hugging Face calls
            # post_attention_layernorm; Gemma 2 and 3 call it pre_feedforward_layernorm.
            part_hf = "post_attention_layernorm" if arch == "gemma" else \
                "pre_feedforward_layernorm"
        elif part in _LAYER_NAMES:
            part_hf = _LAYER_NAMES[part]
        else:
            raise UnsupportedArchitecture(f"unexpected tensor {name} in a {arch} GGUF")
        return f"model.layers.{layer}.{part_hf}.weight"
    base = name.removesuffix(".weight")
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base] + ".weight"
    raise UnsupportedArchitecture(f"unexpected tensor {name} in a {arch} GGUF")


def config_from_gguf(info) -> dict:
    """config.json for mlx-lm, from the GGUF header."""
    arch = info.architecture
    get = info.get
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or hidden // heads)
    layers = int(get("block_count"))
    config = {
        "model_type": GEMMA[arch].mlx_model_type, "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(get("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(get("tokenizer.ggml.tokens")),
        "max_position_embeddings": int(get("context_length") or 8192),
        "rope_theta": float(get("rope.freq_base") or 10000.0),
        "bos_token_id": int(get("tokenizer.ggml.bos_token_id") or 2),
        "pad_token_id": int(get("tokenizer.ggml.padding_token_id") or 0),
        "tie_word_embeddings": True,
    }
    eos = int(get("tokenizer.ggml.eos_token_id") or 1)
    tokens = info.read_array("tokenizer.ggml.tokens")
    end_of_turn = GEMMA[arch].end_of_turn
    config["eos_token_id"] = [eos] + ([tokens.index(end_of_turn)] if end_of_turn in tokens
                                      else [])
    if arch in ("gemma2", "gemma3"):
        config["query_pre_attn_scalar"] = query_pre_attn_scalar(arch, layers, hidden, heads,
                                                                head_dim)
        config["sliding_window"] = int(get("attention.sliding_window") or 4096)
    if arch == "gemma2":
        config["attn_logit_softcapping"] = float(get("attn_logit_softcapping") or 50.0)
        config["final_logit_softcapping"] = float(get("final_logit_softcapping") or 30.0)
    if arch == "gemma3":
        config["rope_local_base_freq"] = 10000.0
        config["sliding_window_pattern"] = GEMMA[arch].sliding_window_pattern
    return config


def gguf_to_mlx(src: Path, dst: Path, dtype: str = "bfloat16",
                progress: Callable[..., object] = lambda *a: None) -> Path:
    """Write an mlx-lm model folder at ``dst`` from the Gemma GGUF ``src``; return ``dst``."""
    try:
        import gguf
        import mlx.core as mx
        from gguf.quants import dequantize
    except ImportError:
        raise MissingDependency("converting to MLX needs mlx-lm: pip install "
                                "'gemma-chat[convert]'") from None
    info = check_gemma(read_gguf(src))
    if dtype not in ("bfloat16", "float16", "float32"):
        raise InvalidArgument(f"unknown dtype {dtype!r}")
    if info.architecture == "gemma4":
        from .gguf_mlx4 import gemma4_gguf_to_mlx

        return gemma4_gguf_to_mlx(src, dst, dtype, progress)
    config = config_from_gguf(info)
    target = getattr(mx, dtype)
    dst = Path(dst)
    with store.atomic_path(dst) as tmp:
        tmp.mkdir(parents=True)
        progress("reading the GGUF", 0, None)
        reader = gguf.GGUFReader(str(src))
        weights = {}
        total, done = sum(int(t.n_bytes) for t in reader.tensors), 0
        for tensor in reader.tensors:
            progress("dequantizing the GGUF", done, total, tensor.name)
            done += int(tensor.n_bytes)
            array = dequantize(tensor.data, tensor.tensor_type)
            name = hf_name(tensor.name, info.architecture)
            if "norm" in name:
                array = array - 1.0  # llama.cpp stores Gemma's RMSNorm weights as w + 1
            weights[name] = mx.array(array).astype(target)
        progress("dequantizing the GGUF", total, total, "")
        progress("writing MLX weights", 0, None)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        del weights
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype},
                                                    indent=2))
        progress("rebuilding the tokenizer", 0, None)
        write_tokenizer(src, tmp)
    return dst


def write_tokenizer(src: Path, folder: Path) -> None:
    """The GGUF's tokenizer as tokenizer.json, via transformers' GGUF loader."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependency("rebuilding the tokenizer needs transformers and torch: "
                                "pip install 'gemma-chat[convert]'") from None
    staging = folder / ".gguf-link"
    staging.mkdir()
    try:
        (staging / "model.gguf").symlink_to(Path(src).resolve())
        tokenizer = AutoTokenizer.from_pretrained(str(staging), gguf_file="model.gguf")
        tokenizer.save_pretrained(str(folder))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
