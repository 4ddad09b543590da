"""A Hugging Face Gemma 4 checkpoint (text model) to an unquantized GGUF that llama.cpp runs.

    write_gemma4_gguf(Path("gemma-4-E2B-it"), Path("model-f16.gguf"), "f16")

Takes ``gemma4_text`` checkpoints (``Gemma4ForCausalLM``) and the text part of multimodal
``gemma4`` ones (``Gemma4ForConditionalGeneration``: ``text_config``, ``model.language_model.*``;
the vision and audio towers are left out). Written with gguf-py's ``GGUFWriter`` (gguf 0.19
knows ``gemma4``, its keys and tensor names) the way the repo's Gemma 1-3 writer does: header,
metadata and tensor table first, then one tensor at a time from its memory map.

What it writes mirrors llama.cpp's own converter (``conversion/gemma.py``, ``Gemma4Model``, of
the llama.cpp that llama-cpp-python 0.3.36 vendors) and what ``src/models/gemma4.cpp`` loads:

- Two kinds of attention layer: sliding-window ones with ``head_dim`` and
  ``num_key_value_heads``, full ones with the global head size and KV-head count. Per-layer
  values are arrays (``attention.sliding_window_pattern``, ``attention.head_count_kv`` when
  the two kinds differ, ``feed_forward_length`` with the double-wide MLP of KV-shared layers);
  ``key_length`` is the full layers' head size and ``key_length_swa`` the sliding ones'.
- RoPE: the sliding layers rotate their whole head (base ``rope.freq_base_swa``); the full
  layers use "proportional" RoPE, which rotates the first ``partial_rotary_factor`` of each
  half. ggml's NeoX RoPE cannot leave dimensions out, so llama.cpp rotates the whole head
  with a ``rope_freqs`` tensor of per-pair frequency divisors: 1 for the rotated pairs, 1e30
  (a zero frequency) for the others.
- Norms: Gemma 4's RMSNorm multiplies by ``w`` (not Gemma 1-3's ``1 + w``), so norm weights
  are written as they are. ``v_norm`` has no weight; the router's scales become
  ``ffn_gate_inp.scale`` and ``ffn_down_exps.scale`` (the per-expert scale, applied to each
  expert's output: the same as scaling its routing weight). ``layer_scalar`` becomes
  ``layer_output_scale``.
- Experts stay in transformers' fused layout: ``gate_up_proj`` [experts, 2 x width, hidden]
  (gate rows first) is llama.cpp's ``ffn_gate_up_exps``, which it splits gate-then-up too.
- ``final_logit_softcapping`` is always written: llama.cpp assumes 30 when the key is absent,
  so a checkpoint without soft-capping gets 0 (off). llama.cpp's converter leaves it out then.
- The tokenizer: ``tokenizer.ggml.model = "gemma4"`` (BPE over ``tokenizer.json``'s vocabulary
  and merges, spaces as "▁", byte fallback), scores -1000, the tokens transformers reports as
  special typed CONTROL except the chat-syntax ones a parser must see in the text
  (:data:`VISIBLE_TOKENS`, USER_DEFINED, as llama.cpp's converter does), bos added.
- Weights: matrices in the requested type; vectors, scalars and the router's matrix in F32.

Hyperparameters llama.cpp fixes or cannot express are refused (:func:`check_llama_cpp_compatible`)
rather than converted into a model that computes something else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidModelFile, UnsupportedArchitecture
from . import hf_gguf
from .checkpoint import _DTYPES, Checkpoint, _weight_files, bf16_to_f32, f32_to_bf16

Progress = Callable[..., object]  # (stage, done, total, detail="")

OUT_TYPES = ("f32", "f16", "bf16")
MODEL_TYPES = ("gemma4_text", "gemma4", "gemma4_unified_text", "gemma4_unified")

# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: Special tokens that llama.cpp's Gemma 4 converter types USER_DEFINED instead of CONTROL, so
#: that they are rendered in the generated text where the chat parser reads them (thinking
#: channel, tool calls and responses, the string delimiter). llama.cpp itself then re-marks
#: ``<|tool_response>`` as an end-of-generation control token (by its text).
VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                            "<|tool_response>", "<tool_response|>", '<|"|>'})

# Values Gemma4TextConfig assumes when config.json leaves them out (transformers 5.24).
_DEFAULTS = {
    "vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": None,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "sliding_window": 512, "final_logit_softcapping": None,
    "use_bidirectional_attention": None, "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
    "enable_moe_block": False, "use_double_wide_mlp": False, "num_experts": None,
    "top_k_experts": None, "moe_intermediate_size": None,
}
_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1_000_000.0},
}
SLIDING, FULL = "sliding_attention", "full_attention"

# Parts of a multimodal Gemma 4 checkpoint that are not the language model.
_NOT_TEXT = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
             "model.embed_audio.", "model.multi_modal_projector.")


# -- hyperparameters ------------------------------------------------------------------------------

def gemma4_hparams(config: dict) -> dict:
    """The text model's config with Gemma4TextConfig's defaults filled in and the per-layer
    values resolved as transformers resolves them:

    ``layer_types`` (default: 5 sliding then 1 full; the last layer is always full),
    ``head_dim_full`` / ``kv_heads_full`` (``per_layer_config`` of the full layers when the
    config has one, else ``global_head_dim`` and, only with ``attention_k_eq_v``,
    ``num_global_key_value_heads``), and ``rope_parameters`` per layer type.
    """
    if config.get("model_type") in ("gemma4", "gemma4_unified"):
        text = dict(config.get("text_config") or {})
        for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
            if key in config and key not in text:
                text[key] = config[key]
    else:
        text = dict(config)
    hp = {**_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k not in _DEFAULTS}}
    layers = int(hp["num_hidden_layers"])
    types = list(hp.get("layer_types") or
                 [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)])
    if types:
        types[-1] = FULL  # as Gemma4TextConfig forces it
    hp["layer_types"] = types
    rope = dict(_DEFAULT_ROPE)
    rope.update(hp.get("rope_parameters") or {})
    hp["rope_parameters"] = rope

    per_layer = {int(k): v for k, v in (hp.get("per_layer_config") or {}).items()
                 if str(k).isdigit() and isinstance(v, dict)}
    full = [per_layer.get(i, {}) for i, t in enumerate(types) if t == FULL]
    for i, t in enumerate(types):
        own = per_layer.get(i, {})
        if t == SLIDING and (own.get("head_dim", hp["head_dim"]) != hp["head_dim"] or
                             own.get("num_key_value_heads", hp["num_key_value_heads"])
                             != hp["num_key_value_heads"]):
            raise UnsupportedArchitecture(f"sliding-window layer {i} has its own head size or "
                                          "KV heads; llama.cpp's gemma4 has one of each")
    if per_layer:
        # config.json as transformers writes it: per_layer_config is what it runs.
        head_dims = {c.get("head_dim", hp["head_dim"]) for c in full}
        kv_heads = {c.get("num_key_value_heads", hp["num_key_value_heads"]) for c in full}
        if len(head_dims) > 1 or len(kv_heads) > 1:
            raise UnsupportedArchitecture("the full-attention layers differ in head size or "
                                          "KV heads; llama.cpp's gemma4 has one of each")
        hp["head_dim_full"] = head_dims.pop() if head_dims else hp["global_head_dim"]
        hp["kv_heads_full"] = kv_heads.pop() if kv_heads else hp["num_key_value_heads"]
    else:
        hp["head_dim_full"] = hp["global_head_dim"]
        global_kv = hp["num_global_key_value_heads"]
        hp["kv_heads_full"] = global_kv if hp["attention_k_eq_v"] and global_kv is not None \
            else hp["num_key_value_heads"]
    hp["hidden_size_per_layer_input"] = int(hp["hidden_size_per_layer_input"] or 0)
    hp["num_kv_shared_layers"] = int(hp["num_kv_shared_layers"] or 0)
    return hp


def check_llama_cpp_compatible(hp: dict, name: str) -> None:
    """Refuse what llama.cpp's gemma4 cannot represent, or would silently compute otherwise."""
    def refuse(what: str) -> None:
        raise UnsupportedArchitecture(f"{name}: {what}; llama.cpp's gemma4 cannot represent that")

    types, layers = hp["layer_types"], int(hp["num_hidden_layers"])
    if len(types) != layers or set(types) - {SLIDING, FULL}:
        refuse(f"layer_types has {len(types)} entries for {layers} layers, or unknown kinds")
    if hp["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        refuse(f"hidden_activation is {hp['hidden_activation']!r}, not gelu_pytorch_tanh")
    if hp["attention_bias"]:
        refuse("the attention projections have biases")
    if hp["use_bidirectional_attention"] == "all":
        refuse("attention is bidirectional")
    full, sliding = hp["rope_parameters"].get(FULL) or {}, hp["rope_parameters"].get(SLIDING) or {}
    if full.get("rope_type") != "proportional" or float(full.get("factor", 1.0)) != 1.0:
        refuse(f"the full-attention RoPE is {full.get('rope_type')!r} (factor "
               f"{full.get('factor', 1.0)}), not unscaled 'proportional'")
    if sliding.get("rope_type", "default") != "default":
        refuse(f"the sliding-window RoPE is {sliding.get('rope_type')!r}, not 'default'")
    shared = hp["num_kv_shared_layers"]
    if shared:
        first = layers - shared
        # llama.cpp's KV cache maps every shared layer onto layer first-2 (sliding) or
        # first-1 (full) and aborts the process (GGML_ASSERT) unless they are of those kinds;
        # transformers shares with the last non-shared layer of each kind.
        if first < 2 or types[first - 2:first] != [SLIDING, FULL]:
            refuse(f"the last two layers before the {shared} KV-shared ones are "
                   f"{types[max(first - 2, 0):first]}, not [sliding, full]")
    if hp["enable_moe_block"] and not all(
            hp[k] for k in ("num_experts", "top_k_experts", "moe_intermediate_size")):
        refuse("enable_moe_block without num_experts, top_k_experts or moe_intermediate_size")
    if hp["hidden_size_per_layer_input"] and \
            int(hp["vocab_size_per_layer_input"]) < int(hp["vocab_size"]):
        refuse("the per-layer embedding has fewer rows than the vocabulary")


def rope_freqs(hp: dict) -> np.ndarray:
    """llama.cpp's frequency divisors for the full layers' proportional RoPE (see above):
    head_dim_full / 2 values, as transformers counts the rotated pairs."""
    head_dim = int(hp["head_dim_full"])
    factor = float(hp["rope_parameters"][FULL].get("partial_rotary_factor", 1.0))
    rotated = int(factor * head_dim // 2)
    return np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), dtype=np.float32)


def add_metadata(writer, hp: dict, out_type: str, name: str) -> None:
    """The architecture keys llama.cpp's gemma4 reads."""
    import gguf

    layers = int(hp["num_hidden_layers"])
    swa = [t == SLIDING for t in hp["layer_types"]]
    shared = hp["num_kv_shared_layers"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(int(hp["max_position_embeddings"]))
    writer.add_embedding_length(int(hp["hidden_size"]))
    n_ff = int(hp["intermediate_size"])
    if hp["use_double_wide_mlp"]:  # the KV-shared layers' MLP is twice as wide
        writer.add_feed_forward_length([n_ff if i < layers - shared else 2 * n_ff
                                        for i in range(layers)])
    else:
        writer.add_feed_forward_length(n_ff)
    writer.add_head_count(int(hp["num_attention_heads"]))
    kv_sliding, kv_full = int(hp["num_key_value_heads"]), int(hp["kv_heads_full"])
    if kv_sliding == kv_full:
        writer.add_head_count_kv(kv_sliding)
    else:
        writer.add_head_count_kv([kv_sliding if s else kv_full for s in swa])
    rope = hp["rope_parameters"]
    writer.add_rope_freq_base(float(rope[FULL].get("rope_theta", 1_000_000.0)))
    writer.add_rope_freq_base_swa(float(rope[SLIDING].get("rope_theta", 10_000.0)))
    writer.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    if hp["enable_moe_block"]:
        writer.add_expert_count(int(hp["num_experts"]))
        writer.add_expert_used_count(int(hp["top_k_experts"]))
        writer.add_expert_feed_forward_length(int(hp["moe_intermediate_size"]))
    head_full, head_swa = int(hp["head_dim_full"]), int(hp["head_dim"])
    writer.add_key_length(head_full)
    writer.add_value_length(head_full)
    writer.add_key_length_swa(head_swa)
    writer.add_value_length_swa(head_swa)
    # The full layers rotate their whole head (rope_freqs zeroes the unrotated pairs' frequency).
    writer.add_rope_dimension_count(head_full)
    writer.add_rope_dimension_count_swa(
        int(head_swa * float(rope[SLIDING].get("partial_rotary_factor", 1.0))))
    writer.add_final_logit_softcapping(float(hp["final_logit_softcapping"] or 0.0))
    writer.add_sliding_window(int(hp["sliding_window"]))
    writer.add_sliding_window_pattern(swa)
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(hp["hidden_size_per_layer_input"])
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tokenizer ------------------------------------------------------------------------------------

@dataclass
class Gemma4Vocab:
    """What the GGUF's tokenizer keys hold, read from the checkpoint's tokenizer files."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad, mask
    chat_template: str | None


def gemma4_vocab(folder: Path) -> Gemma4Vocab:
    """Gemma 4's tokenizer from ``tokenizer.json`` (a BPE with byte fallback), typed as
    llama.cpp's converter types it: CONTROL for the tokens transformers reports as special
    (``tokenizer_config.json``'s named ``*_token`` entries and ``extra_special_tokens``) except
    :data:`VISIBLE_TOKENS` (USER_DEFINED), USER_DEFINED for other added tokens, BYTE for
    ``<0xXX>``, NORMAL for the rest."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InvalidModelFile(f"{folder.name} has no tokenizer.json (Gemma 4's tokenizer)")
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise InvalidModelFile(f"{folder.name}/tokenizer.json is not Gemma 4's tokenizer (a BPE "
                               "with byte fallback)")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    for i, t in added.items():
        by_id[i] = t["content"]
    size = max(by_id) + 1
    if len(by_id) != size:
        raise InvalidModelFile(f"{folder.name}/tokenizer.json: token ids are not contiguous "
                               f"({len(by_id)} tokens, highest id {size - 1})")
    tokens = [by_id[i] for i in range(size)]
    ids = {t: i for i, t in enumerate(tokens)}

    config = _read_json(folder / "tokenizer_config.json") \
        if (folder / "tokenizer_config.json").is_file() else {}
    special = _special_tokens(folder, config)
    types = []
    for i, token in enumerate(tokens):
        if token in special:
            types.append(USER_DEFINED if token in VISIBLE_TOKENS else CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(BYTE)
        else:
            types.append(NORMAL)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    special_ids: dict[str, int] = {}
    model_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() \
        else {}
    for kind, default in (("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"),
                          ("pad", "<pad>"), ("mask", "<mask>")):
        token = _token_text(config.get(f"{kind}_token")) or default
        if token in ids:
            special_ids[kind] = ids[token]
        elif isinstance(model_config.get(f"{kind}_token_id"), int):
            special_ids[kind] = model_config[f"{kind}_token_id"]

    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in config["chat_template"]}
        template = named.get("default")
    return Gemma4Vocab(tokens, types, merges, special_ids, template or None)


def _special_tokens(folder: Path, config: dict) -> set[str]:
    """The tokens transformers 5 counts as special (``all_special_tokens``): the named ones and
    any other ``*_token`` key, ``extra_special_tokens`` (a list, or a dict of named tokens) and
    the older ``additional_special_tokens``; ``special_tokens_map.json`` where the config has
    none of them."""
    sources = [config]
    if (folder / "special_tokens_map.json").is_file():
        sources.append(_read_json(folder / "special_tokens_map.json"))
    out: set[str] = set()
    for source in sources:
        for key, value in source.items():
            if key.endswith("_token") and _token_text(value):
                out.add(_token_text(value))
            elif key in ("extra_special_tokens", "additional_special_tokens"):
                values = value.values() if isinstance(value, dict) else value or []
                out.update(t for t in map(_token_text, values) if t)
        if out:
            break
    return out


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path.parent.name}/{path.name} is not valid JSON ({exc})") \
            from None


def add_tokenizer(writer, vocab: Gemma4Vocab) -> None:
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores([-1000.0] * len(vocab.tokens))
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id,
              "mask": writer.add_mask_token_id}
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    # llama.cpp forces bos on for Gemma 4 (with a warning) when this says otherwise.
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    writer.add_add_space_prefix(False)


# -- tensors --------------------------------------------------------------------------------------

def _tensor_names():
    import gguf

    T = gguf.MODEL_TENSOR
    top = {
        "model.embed_tokens.weight": (T.TOKEN_EMBD, "weight"),
        "model.norm.weight": (T.OUTPUT_NORM, "weight"),
        "model.embed_tokens_per_layer.weight": (T.PER_LAYER_TOKEN_EMBD, "weight"),
        "model.per_layer_model_projection.weight": (T.PER_LAYER_MODEL_PROJ, "weight"),
        "model.per_layer_projection_norm.weight": (T.PER_LAYER_PROJ_NORM, "weight"),
    }
    layer = {
        "input_layernorm.weight": (T.ATTN_NORM, "weight"),
        "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),
        "self_attn.k_proj.weight": (T.ATTN_K, "weight"),
        "self_attn.v_proj.weight": (T.ATTN_V, "weight"),
        "self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
        "self_attn.q_norm.weight": (T.ATTN_Q_NORM, "weight"),
        "self_attn.k_norm.weight": (T.ATTN_K_NORM, "weight"),
        "post_attention_layernorm.weight": (T.ATTN_POST_NORM, "weight"),
        "pre_feedforward_layernorm.weight": (T.FFN_PRE_NORM, "weight"),  # blk.N.ffn_norm
        "post_feedforward_layernorm.weight": (T.FFN_POST_NORM, "weight"),
        "mlp.gate_proj.weight": (T.FFN_GATE, "weight"),
        "mlp.up_proj.weight": (T.FFN_UP, "weight"),
        "mlp.down_proj.weight": (T.FFN_DOWN, "weight"),
        "pre_feedforward_layernorm_2.weight": (T.FFN_PRE_NORM_2, "weight"),
        "post_feedforward_layernorm_1.weight": (T.FFN_POST_NORM_1, "weight"),
        "post_feedforward_layernorm_2.weight": (T.FFN_POST_NORM_2, "weight"),
        "router.proj.weight": (T.FFN_GATE_INP, "weight"),
        "router.scale": (T.FFN_GATE_INP, "scale"),
        "router.per_expert_scale": (T.FFN_DOWN_EXP, "scale"),
        "experts.gate_up_proj": (T.FFN_GATE_UP_EXP, "weight"),
        "experts.down_proj": (T.FFN_DOWN_EXP, "weight"),
        "layer_scalar": (T.LAYER_OUT_SCALE, "weight"),
        "per_layer_input_gate.weight": (T.PER_LAYER_INP_GATE, "weight"),
        "per_layer_projection.weight": (T.PER_LAYER_PROJ, "weight"),
        "post_per_layer_input_norm.weight": (T.PER_LAYER_POST_NORM, "weight"),
    }
    return top, layer


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Gemma 4 text-model tensor (``model.*``), or None if unknown."""
    import gguf

    top, layer = _tensor_names()
    if hf_name in top:
        kind, suffix = top[hf_name]
        return f"{gguf.TENSOR_NAMES[kind]}.{suffix}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match.group(2) in layer:
        kind, suffix = layer[match.group(2)]
        return f"{gguf.TENSOR_NAMES[kind].format(bid=int(match.group(1)))}.{suffix}"
    return None


def tensor_plan(ckpt: Checkpoint, hp: dict, out_type: str, n_vocab: int):
    """[(gguf name, lazy tensor or ndarray, shape, numpy dtype)] in the order they are written:
    ``rope_freqs`` (generated), the model-wide tensors, then layer by layer."""
    dtype_nd = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out_type]
    plan = [("rope_freqs.weight", rope_freqs(hp), [int(hp["head_dim_full"]) // 2], np.float32)]
    keyed = []
    for hf_name, tensor in ckpt.tensors():
        if hf_name.startswith(_NOT_TEXT):
            continue
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise UnsupportedArchitecture(
                f"{ckpt.folder.name}: unexpected tensor {hf_name} for gemma4 (experts stored "
                "one by one, or a quantized checkpoint?)")
        shape = list(tensor.shape)
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            if shape[0] < n_vocab:
                raise InvalidModelFile(f"{ckpt.folder.name}: {hf_name} has {shape[0]} rows "
                                       f"but the tokenizer {n_vocab} tokens")
            shape[0] = n_vocab  # rows past the tokenizer's vocabulary are never used
        # Vectors and scalars in F32, as llama.cpp's converter keeps them; the router's matrix
        # too (it decides which experts run: F16 rounding could change the choice).
        keep_f32 = len(shape) <= 1 or name.endswith("ffn_gate_inp.weight")
        block = int(match.group(1)) if (match := re.match(r"blk\.(\d+)\.", name)) else -1
        keyed.append(((block, name), (name, tensor, shape, np.float32 if keep_f32 else dtype_nd)))
    keyed.sort(key=lambda item: item[0])
    plan += [entry for _, entry in keyed]
    names = {p[0] for p in plan}
    if "token_embd.weight" not in names:
        raise InvalidModelFile(f"{ckpt.folder.name} has no model.embed_tokens.weight")
    if hp["hidden_size_per_layer_input"] and "per_layer_token_embd.weight" not in names:
        raise InvalidModelFile(f"{ckpt.folder.name} has hidden_size_per_layer_input but no "
                               "model.embed_tokens_per_layer.weight")
    return plan


class _Rows:
    """A safetensors tensor converted to ``dtype`` (uint16: bf16 bits) and written in blocks of
    rows from its memory map, its first ``shape[0]`` rows only: what ``GGUFWriter.
    write_tensor_data`` needs of an array (``nbytes``, ``tofile``), without holding the whole
    tensor. Gemma 4's per-layer embedding is 262,144 x 8,960 values in E2B (9.4 GB as F32)."""

    def __init__(self, tensor, shape: list[int], dtype) -> None:
        self.tensor, self.shape, self.dtype = tensor, [int(n) for n in shape], np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def tofile(self, fout) -> None:
        src = _DTYPES.get(self.tensor.dtype)
        if src is None:
            raise InvalidModelFile(f"unsupported tensor dtype {self.tensor.dtype}")
        raw = self.tensor.mmap_bytes().view(src).reshape(tuple(self.tensor.shape) or (1,))
        raw = raw[: self.shape[0]] if raw.ndim > 1 else raw
        rows = raw.reshape(-1, raw.shape[-1])
        step = max(1, (1 << 22) // rows.shape[1])  # ~4M values (16 MB of f32) per block
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step]
            if self.tensor.dtype == "BF16" and self.dtype == np.uint16:
                out = block  # bf16 -> bf16: the bits as they are
            else:
                values = bf16_to_f32(block) if self.tensor.dtype == "BF16" \
                    else block.astype(np.float32)
                out = f32_to_bf16(values) if self.dtype == np.uint16 else values.astype(self.dtype)
            np.ascontiguousarray(out).tofile(fout)


# -- the file -------------------------------------------------------------------------------------

def open_gemma4(folder: Path) -> tuple[Checkpoint, dict]:
    """The checkpoint (weights read lazily) and its resolved text hyperparameters."""
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidModelFile(f"{folder} has no config.json: not a Hugging Face checkpoint")
    config = _read_json(config_path)
    if config.get("model_type") not in MODEL_TYPES:
        raise UnsupportedArchitecture(f"{folder.name} is a {config.get('model_type')!r} "
                                      "checkpoint, not gemma4_text or gemma4")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise UnsupportedArchitecture(f"{folder.name} is already quantized ({method}); "
                                      "convert the original bf16/f16 weights")
    hp = gemma4_hparams(config)
    return Checkpoint(folder, "gemma4_text", hp, _weight_files(folder)), hp


def write_gemma4_gguf(folder: Path, dst: Path, out_type: str = "f16", *,
                      name: str | None = None, progress: Progress = lambda *a: None) -> Path:
    """Write the Gemma 4 checkpoint in ``folder`` as a GGUF at ``dst`` (atomically), with its
    matrices in ``out_type`` (f32, f16 or bf16); return ``dst``."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {OUT_TYPES}")
    ckpt, hp = open_gemma4(folder)
    check_llama_cpp_compatible(hp, ckpt.folder.name)
    progress("reading the tokenizer", 0, None)
    vocab = gemma4_vocab(ckpt.folder)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA4])
    add_metadata(writer, hp, out_type, name or ckpt.folder.name)
    plan = tensor_plan(ckpt, hp, out_type, len(vocab.tokens))
    total = hf_gguf.add_tensor_infos(writer, [(n, shape, dtype) for n, _, shape, dtype in plan])
    # As llama.cpp's converter labels it ("67M", "8x17M"), from the tensor table.
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    add_tokenizer(writer, vocab)

    def data(tensor, shape, dtype):
        return tensor if isinstance(tensor, np.ndarray) else _Rows(tensor, shape, dtype)

    return hf_gguf.write_file(writer, dst, out_type, total, progress,
                              [(n, lambda t=t, sh=sh, d=d: data(t, sh, d))
                               for n, t, sh, d in plan])
