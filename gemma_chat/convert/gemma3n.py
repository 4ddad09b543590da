"""A Hugging Face Gemma 3n checkpoint (text model) to an unquantized GGUF that llama.cpp runs,
and to the layout mlx-lm reads.

    write_gemma3n_gguf(Path("gemma-3n-E2B-it"), Path("model-f16.gguf"), "f16")
    stage_for_mlx(Path("gemma-3n-E2B-it"), Path("staged"))   # then mlx-lm's convert

Takes ``gemma3n_text`` checkpoints (``Gemma3nForCausalLM``) and the text part of multimodal
``gemma3n`` ones (``Gemma3nForConditionalGeneration``: ``text_config``,
``model.language_model.*``; the vision and audio towers and their embedders are left out).
Written with gguf-py's ``GGUFWriter`` like the Gemma 4 writer (:mod:`.gemma4_gguf`, whose
streaming ``_Rows`` it reuses) with the SentencePiece vocabulary of the Gemma 1-3 writer
(:mod:`.hf_gguf`).

What it writes mirrors llama.cpp's own converter (``conversion/gemma.py``, ``Gemma3NModel``, of
the llama.cpp that llama-cpp-python 0.3.36 vendors) and what ``src/models/gemma3n.cpp`` loads:

- Norms are written as they are (Gemma 3n's RMSNorm multiplies by ``w``, not ``1 + w``);
  ``v_norm`` has no weight. AltUp's ``correct_output_scale`` becomes
  ``blk.N.altup_correct_scale.weight``.
- The three ``altup_projections`` / ``altup_unembed_projections`` matrices are stacked into one
  3-D tensor each (``altup_proj``, ``altup_unembd_proj``: [3, hidden, hidden]).
- The vocabulary is ``vocab_size`` long (262,400: the 262,144 SentencePiece pieces, the added
  tokens, ``[PADn]`` for the rest), and so are both embeddings: the per-layer one, which has
  only ``vocab_size_per_layer_input`` rows, is padded. llama.cpp's converter pads with zeros;
  this writer repeats row 0, which is what transformers looks up for those ids (and what
  llama.cpp itself uses for image/audio embeddings). The two agree when row 0 is zero.
- KV-shared layers: llama.cpp requires ``attn_k``/``attn_v``/``attn_k_norm`` in every layer
  although the shared ones never use them. Google's checkpoints carry them; a checkpoint saved
  by transformers 5 does not, and llama.cpp's converter then writes a file llama.cpp cannot
  load. Missing ones are written as zeros (norm: ones).
- Weights: matrices in the requested type; vectors, norms and the AltUp coefficient matrices
  (``altup_correct_coef``, ``altup_predict_coef``) in F32, as llama.cpp's converter keeps them.

llama.cpp's gemma3n reads almost none of the Gemma 3n hyperparameters from the file: it fixes
them in code (:data:`LLAMA_CPP_FIXED`). The keys are written anyway (as llama.cpp's converter
does), and a checkpoint whose values differ is refused (:func:`check_llama_cpp_compatible`)
rather than converted into a model that computes something else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import numpy as np

from ..errors import InvalidModelFile, UnsupportedArchitecture
from . import hf_gguf
from .checkpoint import _DTYPES, Checkpoint, bf16_to_f32, f32_to_bf16, text_model_name
from .gemma4_gguf import _Rows

Progress = Callable[..., object]  # (stage, done, total, detail="")

OUT_TYPES = ("f32", "f16", "bf16")
SLIDING, FULL = "sliding_attention", "full_attention"

#: What llama.cpp's gemma3n (llama-cpp-python 0.3.36) fixes in code instead of reading from the
#: GGUF (llama-hparams.h, models/gemma3n.cpp, models/models.h). The converter must refuse a
#: checkpoint that differs: llama.cpp would load it (or fail on a tensor shape) and compute
#: another model.
LLAMA_CPP_FIXED = {
    "altup_num_inputs": 4,               # hparams.n_altup
    "altup_active_idx": 0,               # hparams.i_altup_act
    "laurel_rank": 64,                   # hparams.laurel_rank (tensor shapes)
    "hidden_size_per_layer_input": 256,  # hparams.n_embd_altup (tensor shapes)
    "kv_layers": 20,                     # hparams.n_layer_kv_from_start
    "sparse_layers": 10,                 # graph::n_layer_sparsity
    "sparsity": 0.95,                    # graph::f_sparsity_std_mul = icdf(0.95)
    "final_logit_softcapping": 30.0,     # hparams default; the key is not read for gemma3n
    "altup_correct_scale": True,         # always applied
}

# Values Gemma3nTextConfig assumes when config.json leaves them out (transformers 5.24).
_DEFAULTS = {
    "vocab_size": 262_400, "vocab_size_per_layer_input": 262_144, "hidden_size": 2048,
    "intermediate_size": 16_384, "num_hidden_layers": 35, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "sliding_window": 512, "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 256, "altup_active_idx": 0, "altup_coef_clip": 120.0,
    "altup_correct_scale": True, "altup_num_inputs": 4, "num_kv_shared_layers": 15,
    "laurel_rank": 64, "activation_sparsity_pattern": None, "layer_types": None,
}


# -- hyperparameters ------------------------------------------------------------------------------

def gemma3n_hparams(config: dict) -> dict:
    """The text model's config with Gemma3nTextConfig's defaults filled in and resolved as
    transformers resolves them: ``intermediate_size`` per layer, ``layer_types`` (default: 4
    sliding then 1 full), ``activation_sparsity_pattern`` (default: 0.95 on the first 10 layers
    when there are more than 10), and the RoPE bases of both layer kinds from
    ``rope_parameters`` or the older ``rope_theta`` / ``rope_local_base_freq``."""
    if config.get("model_type") == "gemma3n":
        text = dict(config.get("text_config") or {})
        for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
            if key in config and key not in text:
                text[key] = config[key]
    else:
        text = dict(config)
    hp = {**_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k not in _DEFAULTS}}
    if "final_logit_softcapping" in text:  # an explicit null switches soft-capping off
        hp["final_logit_softcapping"] = text["final_logit_softcapping"]
    layers = int(hp["num_hidden_layers"])
    ff = hp["intermediate_size"]
    hp["intermediate_size"] = [int(x) for x in ff] if isinstance(ff, (list, tuple)) \
        else [int(ff)] * layers
    hp["layer_types"] = list(hp["layer_types"] or
                             [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(layers)])
    if hp["activation_sparsity_pattern"] is None:
        sparse = 10 if layers > 10 else 0
        hp["activation_sparsity_pattern"] = [0.95] * sparse + [0.0] * (layers - sparse)
    elif isinstance(hp["activation_sparsity_pattern"], (int, float)):
        hp["activation_sparsity_pattern"] = [float(hp["activation_sparsity_pattern"])] * layers
    rope = {k: dict(v) for k, v in (hp.get("rope_parameters") or {}).items()
            if isinstance(v, dict)}
    scaling = hp.get("rope_scaling")
    full = rope.setdefault(FULL, {"rope_type": "default"})
    if scaling:
        full.update(scaling)
    full.setdefault("rope_theta", hp.get("rope_theta") or 1_000_000.0)
    sliding = rope.setdefault(SLIDING, {"rope_type": "default"})
    sliding.setdefault("rope_theta", hp.get("rope_local_base_freq") or 10_000.0)
    hp["rope_parameters"] = rope
    hp["num_kv_shared_layers"] = int(hp["num_kv_shared_layers"] or 0)
    return hp


def check_llama_cpp_compatible(hp: dict, name: str) -> None:
    """Refuse what llama.cpp's gemma3n cannot represent, or would silently compute otherwise."""
    def refuse(what: str) -> None:
        raise UnsupportedArchitecture(f"{name}: {what}; llama.cpp's gemma3n cannot represent "
                                      "that")

    fixed = LLAMA_CPP_FIXED
    layers, types = int(hp["num_hidden_layers"]), hp["layer_types"]
    if len(types) != layers or set(types) - {SLIDING, FULL}:
        refuse(f"layer_types has {len(types)} entries for {layers} layers, or unknown kinds")
    if len(hp["intermediate_size"]) != layers:
        refuse(f"intermediate_size has {len(hp['intermediate_size'])} entries for {layers} "
               "layers")
    for key in ("altup_num_inputs", "altup_active_idx", "laurel_rank",
                "hidden_size_per_layer_input"):
        if int(hp[key]) != fixed[key]:
            refuse(f"{key} is {hp[key]}, not {fixed[key]} (fixed in llama.cpp)")
    if bool(hp["altup_correct_scale"]) is not True:
        refuse("altup_correct_scale is off (llama.cpp always applies it)")
    cap = hp["final_logit_softcapping"]
    if cap is None or float(cap) != fixed["final_logit_softcapping"]:
        refuse(f"final_logit_softcapping is {cap}, not 30 (fixed in llama.cpp)")
    if hp["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        refuse(f"hidden_activation is {hp['hidden_activation']!r}, not gelu_pytorch_tanh")
    if hp["attention_bias"]:
        refuse("the attention projections have biases")
    if not hp.get("tie_word_embeddings", True):
        refuse("the output projection is not tied to the token embedding")
    for kind in (FULL, SLIDING):
        params = hp["rope_parameters"][kind]
        if params.get("rope_type", params.get("type", "default")) != "default" or \
                float(params.get("factor", 1.0)) != 1.0:
            refuse(f"the {kind} RoPE is {params.get('rope_type', params.get('type'))!r}, not "
                   "unscaled 'default'")
    # KV sharing: llama.cpp gives the first 20 layers their own KV and maps every later layer
    # onto layer 18 (sliding) or 19 (full); transformers shares the last num_kv_shared_layers
    # with the last non-shared layer of each kind.
    kv_layers, shared = fixed["kv_layers"], hp["num_kv_shared_layers"]
    if shared == 0:
        if layers > kv_layers:
            refuse(f"{layers} layers without KV sharing (llama.cpp shares every layer after "
                   f"the first {kv_layers})")
    else:
        if layers - shared != kv_layers:
            refuse(f"{layers - shared} layers with their own KV, not {kv_layers}")
        if types[kv_layers - 2:kv_layers] != [SLIDING, FULL]:
            refuse(f"layers {kv_layers - 2} and {kv_layers - 1} are "
                   f"{types[kv_layers - 2:kv_layers]}, not [sliding, full]")
    # Activation sparsity: llama.cpp applies the 0.95 cut to the first 10 layers, none after.
    want = [fixed["sparsity"] if i < fixed["sparse_layers"] else 0.0 for i in range(layers)]
    got = [float(x) for x in hp["activation_sparsity_pattern"]]
    if len(got) != layers or any(abs(a - b) > 1e-9 for a, b in zip(got, want)):
        refuse(f"activation_sparsity_pattern is {got}, not 0.95 on the first 10 layers and 0 "
               "after")
    if int(hp["vocab_size_per_layer_input"]) > int(hp["vocab_size"]):
        refuse("the per-layer embedding has more rows than the vocabulary")


def sparsity_scales(hp: dict) -> list[float]:
    """``activation_sparsity_scale`` as llama.cpp's converter writes it: the standard normal
    quantile of each layer's sparsity (-inf for the dense layers). llama.cpp does not read it."""
    out = []
    for s in hp["activation_sparsity_pattern"]:
        s = float(s)
        out.append(-math.inf if s <= 0.0 else math.inf if s >= 1.0 else NormalDist().inv_cdf(s))
    return out


def add_metadata(writer, hp: dict, out_type: str, name: str) -> None:
    """The architecture keys llama.cpp's converter writes for gemma3n (llama.cpp itself reads
    the generic ones, the sliding-window size and pattern and the SWA RoPE base)."""
    import gguf

    rope = hp["rope_parameters"]
    head_dim = int(hp["head_dim"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(int(hp["num_hidden_layers"]))
    writer.add_context_length(int(hp["max_position_embeddings"]))
    writer.add_embedding_length(int(hp["hidden_size"]))
    writer.add_feed_forward_length(list(hp["intermediate_size"]))
    writer.add_head_count(int(hp["num_attention_heads"]))
    writer.add_head_count_kv(int(hp["num_key_value_heads"]))
    writer.add_rope_freq_base(float(rope[FULL]["rope_theta"]))
    writer.add_rope_freq_base_swa(float(rope[SLIDING]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    writer.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    writer.add_sliding_window(int(hp["sliding_window"]))
    writer.add_altup_active_idx(int(hp["altup_active_idx"]))
    writer.add_altup_num_inputs(int(hp["altup_num_inputs"]))
    writer.add_embedding_length_per_layer_input(int(hp["hidden_size_per_layer_input"]))
    writer.add_shared_kv_layers(int(hp["num_kv_shared_layers"]))
    writer.add_activation_sparsity_scale(sparsity_scales(hp))
    writer.add_sliding_window_pattern([t == SLIDING for t in hp["layer_types"]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tensors --------------------------------------------------------------------------------------

# Always F32 (llama.cpp's converter: 1-D tensors, "*_norm.weight", and these).
_F32_KINDS = ("altup_correct_coef", "altup_predict_coef")


class _Source:
    """What one GGUF tensor is written from: ``parts`` (lazy safetensors tensors, one after
    the other: stacked along a new first axis when there are several), then ``pad`` copies of
    the first part's row 0; or ``fill`` (a constant) for a tensor the checkpoint lacks."""

    def __init__(self, parts, *, pad: int = 0, fill: float | None = None):
        self.parts, self.pad, self.fill = parts, pad, fill

    def data(self, shape: list[int], dtype):
        """An object with ``nbytes`` and ``tofile`` for ``GGUFWriter.write_tensor_data``."""
        return _Writer(self, shape, dtype)


class _Writer:
    def __init__(self, source: _Source, shape: list[int], dtype) -> None:
        self.source, self.shape, self.dtype = source, [int(n) for n in shape], np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def tofile(self, fout) -> None:
        src = self.source
        if src.fill is not None:
            value = np.full(self.shape, src.fill, dtype=np.float32)
            _cast(value, self.dtype).tofile(fout)
            return
        if len(src.parts) == 1:  # its first rows (a vocabulary cut to the tokenizer's)
            part = src.parts[0]
            _Rows(part, [self.shape[0] - src.pad, *part.shape[1:]], self.dtype).tofile(fout)
        else:  # stacked
            for part in src.parts:
                _Rows(part, list(part.shape), self.dtype).tofile(fout)
        if src.pad:  # repeat row 0, converted once
            t = src.parts[0]
            raw = t.mmap_bytes().view(_DTYPES[t.dtype]).reshape(tuple(t.shape))[:1]
            row = bf16_to_f32(raw) if t.dtype == "BF16" else raw.astype(np.float32)
            _cast(np.repeat(row, src.pad, axis=0), self.dtype).tofile(fout)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return f32_to_bf16(values) if dtype == np.uint16 else values.astype(dtype)


def tensor_plan(ckpt: Checkpoint, hp: dict, out_type: str, n_vocab: int):
    """[(gguf name, _Source, shape, numpy dtype)] in the order they are written: the
    model-wide tensors, then layer by layer."""
    import gguf

    layers = int(hp["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, layers)
    dtype_nd = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out_type]
    entries: dict[str, tuple[_Source, list[int]]] = {}
    stacks: dict[str, dict[int, object]] = {"altup_proj.weight": {},
                                            "altup_unembd_proj.weight": {}}
    for hf_name, tensor in ckpt.tensors():
        match = re.fullmatch(r"model\.altup_(unembed_)?projections\.(\d+)\.weight", hf_name)
        if match:
            key = "altup_unembd_proj.weight" if match.group(1) else "altup_proj.weight"
            stacks[key][int(match.group(2))] = tensor
            continue
        lookup = hf_name + ".weight" if hf_name.endswith("_scale") else hf_name
        gguf_name = names.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitecture(f"{ckpt.folder.name}: unexpected tensor {hf_name} "
                                          "for gemma3n (a quantized checkpoint?)")
        shape = list(tensor.shape)
        pad = 0
        if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight"):
            if shape[0] > n_vocab:
                shape[0] = n_vocab  # rows past the vocabulary are never used
            elif shape[0] < n_vocab:
                if gguf_name == "token_embd.weight":
                    raise InvalidModelFile(f"{ckpt.folder.name}: {hf_name} has {shape[0]} rows "
                                           f"but the vocabulary {n_vocab} tokens")
                pad, shape[0] = n_vocab - shape[0], n_vocab
        entries[gguf_name] = (_Source([tensor], pad=pad), shape)
    n_altup = int(hp["altup_num_inputs"])
    for key, parts in stacks.items():
        if sorted(parts) != list(range(n_altup - 1)):
            raise InvalidModelFile(f"{ckpt.folder.name}: {key.split('.')[0]} needs "
                                   f"{n_altup - 1} matrices, found {sorted(parts)}")
        ordered = [parts[i] for i in range(n_altup - 1)]
        entries[key] = (_Source(ordered), [len(ordered), *ordered[0].shape])

    # The KV-shared layers' unused K/V projections, where the checkpoint leaves them out.
    hidden, head_dim = int(hp["hidden_size"]), int(hp["head_dim"])
    kv = int(hp["num_key_value_heads"]) * head_dim
    for i in range(layers - hp["num_kv_shared_layers"], layers):
        for kind, shape, fill in (("attn_k.weight", [kv, hidden], 0.0),
                                  ("attn_v.weight", [kv, hidden], 0.0),
                                  ("attn_k_norm.weight", [head_dim], 1.0)):
            entries.setdefault(f"blk.{i}.{kind}", (_Source([], fill=fill), shape))

    missing = [n for n in _required(layers) if n not in entries]
    if missing:
        raise InvalidModelFile(f"{ckpt.folder.name} lacks {len(missing)} Gemma 3n tensors "
                               f"({', '.join(missing[:3])}...)")

    def order(name: str):
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)

    plan = []
    for name in sorted(entries, key=order):
        source, shape = entries[name]
        keep_f32 = len(shape) <= 1 or name.endswith("_norm.weight") or \
            name.split(".")[-2] in _F32_KINDS
        plan.append((name, source, shape, np.float32 if keep_f32 else dtype_nd))
    return plan


def _required(layers: int) -> list[str]:
    top = ["token_embd", "output_norm", "altup_proj", "altup_unembd_proj",
           "per_layer_token_embd", "per_layer_model_proj", "per_layer_proj_norm"]
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                 "attn_k_norm", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down", "post_ffw_norm", "inp_gate", "proj", "post_norm",
                 "altup_correct_coef", "altup_correct_scale", "altup_predict_coef",
                 "altup_router", "altup_router_norm", "laurel_l", "laurel_r",
                 "laurel_post_norm"]
    return [f"{n}.weight" for n in top] + \
        [f"blk.{i}.{n}.weight" for i in range(layers) for n in per_layer]


# -- the file -------------------------------------------------------------------------------------

def write_gemma3n_gguf(folder: Path, dst: Path, out_type: str = "f16", *,
                       name: str | None = None, progress: Progress = lambda *a: None) -> Path:
    """Write the Gemma 3n checkpoint in ``folder`` as a GGUF at ``dst`` (atomically), with its
    matrices in ``out_type`` (f32, f16 or bf16); return ``dst``."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {OUT_TYPES}")
    ckpt = Checkpoint.open(folder)
    if ckpt.arch != "gemma3n":
        raise UnsupportedArchitecture(f"{ckpt.folder.name} is a {ckpt.model_type!r} checkpoint, "
                                      "not gemma3n_text or gemma3n")
    hp = ckpt.hparams
    check_llama_cpp_compatible(hp, ckpt.folder.name)
    progress("reading the tokenizer", 0, None)
    # Gemma 3's SentencePiece vocabulary, padded with [PADn] to vocab_size (262,400).
    tokens, scores, types = hf_gguf.sentencepiece_vocab(ckpt)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3N])
    add_metadata(writer, hp, out_type, name or ckpt.folder.name)
    plan = tensor_plan(ckpt, hp, out_type, len(tokens))
    total = hf_gguf.add_tensor_infos(writer, [(n, shape, dtype) for n, _, shape, dtype in plan])
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    hf_gguf.add_tokenizer(writer, ckpt, tokens, scores, types)
    return hf_gguf.write_file(writer, dst, out_type, total, progress,
                              [(n, lambda src=src, sh=sh, d=d: src.data(sh, d))
                               for n, src, sh, d in plan])


# -- mlx-lm ---------------------------------------------------------------------------------------

#: The text config keys mlx-lm's gemma3n requires (its TextConfig has no defaults for them).
_MLX_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "head_dim", "rms_norm_eps", "vocab_size", "num_key_value_heads",
                  "num_kv_shared_layers", "vocab_size_per_layer_input", "sliding_window",
                  "max_position_embeddings", "final_logit_softcapping", "layer_types",
                  "activation_sparsity_pattern", "hidden_size_per_layer_input",
                  "altup_num_inputs", "altup_coef_clip", "altup_correct_scale",
                  "altup_active_idx", "laurel_rank")


def mlx_config(config: dict, hp: dict) -> dict:
    """``config`` in the form mlx-lm's gemma3n loads: the multimodal layout (``model_type``
    gemma3n, the text model in ``text_config``) with every key its TextConfig requires, and
    the RoPE bases as ``rope_theta`` / ``rope_local_base_freq`` (transformers 5 writes only
    ``rope_parameters``)."""
    if config.get("model_type") == "gemma3n":
        out = dict(config)
        text = dict(config.get("text_config") or {})
    else:
        text = {k: v for k, v in config.items() if k != "architectures"}
        out = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n"}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
                    "dtype", "torch_dtype"):
            if key in config:
                out[key] = config[key]
    for key in _MLX_TEXT_KEYS:
        text.setdefault(key, hp[key])
    rope = hp["rope_parameters"]
    text.setdefault("rope_theta", rope[FULL]["rope_theta"])
    text.setdefault("rope_local_base_freq", rope[SLIDING]["rope_theta"])
    text["model_type"] = "gemma3n_text"
    out["text_config"] = text
    return out


def stage_for_mlx(folder: Path, staged: Path) -> Path:
    """A folder mlx-lm's converter reads, from the Gemma 3n checkpoint in ``folder``: its
    config in :func:`mlx_config`'s form, its weights under the multimodal names
    (``model.language_model.*``), and the KV-shared layers' unused K/V projections where the
    checkpoint leaves them out (mlx-lm declares them; written as zeros). A multimodal
    checkpoint that has them all is linked, not copied."""
    import mlx.core as mx

    ckpt = Checkpoint.open(folder)
    hp = ckpt.hparams
    config = json.loads((ckpt.folder / "config.json").read_text(encoding="utf-8"))
    staged.mkdir(parents=True)
    for item in ckpt.folder.iterdir():
        if item.is_file() and item.name != "config.json" and item.suffix != ".safetensors" \
                and item.name != "model.safetensors.index.json":
            (staged / item.name).symlink_to(item.resolve())
    (staged / "config.json").write_text(json.dumps(mlx_config(config, hp), indent=2),
                                        encoding="utf-8")
    names = {text_model_name(name) for name, _ in ckpt.tensors()}
    layers, shared = int(hp["num_hidden_layers"]), hp["num_kv_shared_layers"]
    kv, head_dim = int(hp["num_key_value_heads"]) * int(hp["head_dim"]), int(hp["head_dim"])
    missing = {}
    for i in range(layers - shared, layers):
        p = f"model.layers.{i}.self_attn."
        for kind, shape, fill in (("k_proj.weight", (kv, int(hp["hidden_size"])), 0.0),
                                  ("v_proj.weight", (kv, int(hp["hidden_size"])), 0.0),
                                  ("k_norm.weight", (head_dim,), 1.0)):
            if p + kind not in names:
                missing[_mlx_name(p + kind)] = (shape, fill)
    if ckpt.model_type == "gemma3n" and not missing:
        for path in ckpt.weight_files:
            (staged / path.name).symlink_to(path.resolve())
        return staged
    for n, path in enumerate(ckpt.weight_files):
        weights = {}
        for name, value in mx.load(str(path)).items():
            text = text_model_name(name)
            if text is not None and text != "lm_head.weight":
                weights[_mlx_name(text)] = value
        mx.save_safetensors(str(staged / f"model-{n:05d}.safetensors"), weights,
                            metadata={"format": "mlx"})
        del weights
    if missing:
        dtype = mx.bfloat16 if ckpt.source_dtype == "BF16" else \
            mx.float16 if ckpt.source_dtype == "F16" else mx.float32
        mx.save_safetensors(str(staged / "model-shared-kv.safetensors"),
                            {name: mx.full(shape, fill, dtype=dtype)
                             for name, (shape, fill) in missing.items()},
                            metadata={"format": "mlx"})
    return staged


def _mlx_name(text_name: str) -> str:
    """A text-model tensor name (``model.layers.0...``) under mlx-lm's gemma3n
    (``model.language_model.layers.0...``)."""
    return "model.language_model." + text_name.removeprefix("model.")
