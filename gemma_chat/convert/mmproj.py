"""A multimodal Gemma checkpoint's vision tower and projector to a projector GGUF (``mmproj``).

    if has_projector(ckpt):
        write_mmproj(ckpt, Path("mmproj-tiny-f16.gguf"), "f16")

llama.cpp keeps a model's image (and audio) encoder in a file of its own, which its multimodal
library (``mtmd``) loads beside the text model. This writes that file for Gemma 3's SigLIP tower
and its projector (average pooling to ``mm_tokens_per_image`` soft tokens, an RMSNorm, a linear
map into the text model's width) the way llama.cpp's own converter does (``convert_hf_to_gguf.py
--mmproj``, ``Gemma3VisionModel``): the ``clip`` architecture, projector type ``gemma3``, the
image size and normalization the processor uses, tensor names from gguf-py's map, the patch and
position embeddings in F32, the input projection in F16, and the projector's RMSNorm stored as
``1 + w`` (Gemma's norm).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import UnsupportedArchitecture
from ..media import processor_settings
from .checkpoint import Checkpoint
from .hf_gguf import Progress, add_tensor_infos, write_file

VISION_FILE = "vision.safetensors"  # an MLX folder's image encoder (mlx-vlm's names)

#: The checkpoints whose image encoder can be written, by config ``model_type``.
SUPPORTED = {"gemma3": "gemma3", "gemma4": "gemma4v"}
_DEFAULT_MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP's: pixels to [-1, 1]


def has_projector(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint carries an image encoder gemma convert writes."""
    return ckpt.model_type in SUPPORTED and bool(ckpt.config.get("vision_config"))


def write_mlx_vision(ckpt: Checkpoint, folder: Path, dtype: str = "float16") -> Path:
    """Add the checkpoint's encoders (vision tower and projector; Gemma 4's audio conformer
    and embedders too) to an MLX folder whose text model mlx-lm wrote
    (:mod:`gemma_chat.backends.mlx_vision`): the weights in mlx-vlm's names
    (``vision.safetensors``; Gemma 3's patch convolution in MLX's layout, Gemma 4's left to
    mlx-vlm's loader), the encoder settings mlx-lm leaves out of config.json, and the
    processor's settings."""
    import json
    import shutil

    import mlx.core as mx

    from ..backends.mlx_vision import gemma4_encoder_name, vision_name

    rename = gemma4_encoder_name if ckpt.model_type == "gemma4" else vision_name
    arrays = {}
    for name, tensor in sorted(ckpt.all_tensors().items()):
        new = rename(name)
        if new is None:
            continue
        value = Checkpoint.read(tensor, np.float32)
        if "patch_embedding.weight" in new and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)  # PyTorch's conv layout to MLX's
        arrays[new] = mx.array(value).astype(getattr(mx, dtype))
    mx.save_safetensors(str(folder / VISION_FILE), arrays, metadata={"format": "mlx"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("vision_config", "audio_config", "mm_tokens_per_image", "boi_token_index",
                "eoi_token_index", "image_token_index", "image_token_id", "audio_token_id",
                "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id"):
        if key in ckpt.config:
            config[key] = ckpt.config[key]
    if "text_config" in config and "text_config" in ckpt.config:
        # How pictures are attended to (Gemma 4's larger models: bidirectionally).
        bidirectional = ckpt.config["text_config"].get("use_bidirectional_attention")
        config["text_config"]["use_bidirectional_attention"] = bidirectional
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, folder / name)
    return folder


def _writer(ckpt: Checkpoint, out_type: str, n_embd_text: int):
    """A projector GGUF's writer, with what every one says first: the ``clip`` architecture,
    the file type, a vision encoder, and the text model's width it projects to."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(ckpt.folder.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32,
                          "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(n_embd_text)
    return writer


def mmproj_name(model_file: Path) -> Path:
    """Where a model GGUF's projector goes: ``mmproj-<model name>.gguf`` beside it."""
    return model_file.with_name(f"mmproj-{model_file.stem}.gguf")


def _vision_name(name: str) -> str | None:
    """A Gemma 3 checkpoint's vision or projector tensor name, in the layout gguf-py's map
    knows (``vision_tower.vision_model.*``, ``multi_modal_projector.*``); None for others."""
    name = name.removeprefix("model.")
    if name.startswith("multi_modal_projector."):
        return name.replace("_weight", ".weight")
    if name.startswith("vision_tower."):
        rest = name.removeprefix("vision_tower.").removeprefix("vision_model.")
        if rest.startswith("head."):
            return None  # SigLIP's pooling head: Gemma does not use it
        return "vision_tower.vision_model." + rest
    return None


def write_mmproj(ckpt: Checkpoint, dst: Path, out_type: str = "f16", *,
                 progress: Progress = lambda *a: None) -> Path:
    """Write the projector GGUF of ``ckpt`` at ``dst`` (atomically); return ``dst``."""
    import gguf

    if not has_projector(ckpt):
        raise UnsupportedArchitecture(f"{ckpt.folder.name} has no image encoder gemma convert "
                                      "can write (Gemma 3 and Gemma 4 checkpoints have one)")
    if ckpt.model_type == "gemma4":
        return _write_gemma4(ckpt, dst, out_type, progress)
    config = ckpt.config
    vision = config["vision_config"]
    n_embd_text = ckpt.hparams["hidden_size"]
    processor = processor_settings(ckpt.folder)
    image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
    tokens = int(config.get("mm_tokens_per_image") or processor.get("image_seq_length") or 256)
    per_side = int(round(tokens ** 0.5))
    if per_side * per_side != tokens or (image_size // patch_size) % per_side:
        raise UnsupportedArchitecture(
            f"{ckpt.folder.name}: {tokens} image tokens do not pool evenly from "
            f"{image_size // patch_size}x{image_size // patch_size} patches")
    blocks = int(vision["num_hidden_layers"])

    writer = _writer(ckpt, out_type, n_embd_text)
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(int(vision["hidden_size"]))
    writer.add_vision_feed_forward_length(int(vision["intermediate_size"]))
    writer.add_vision_block_count(blocks)
    writer.add_vision_head_count(int(vision["num_attention_heads"]))
    writer.add_vision_image_mean(list(processor.get("image_mean") or _DEFAULT_MEAN_STD))
    writer.add_vision_image_std(list(processor.get("image_std") or _DEFAULT_MEAN_STD))
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_attention_layernorm_eps(float(vision.get("layer_norm_eps", 1e-6)))
    writer.add_vision_use_gelu(True)
    scale = (image_size // patch_size) // per_side
    if scale != 4:  # llama.cpp assumes Gemma 3's 4 unless told
        writer.add_vision_projector_scale_factor(scale)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, blocks)
    plan = []
    for hf_name, tensor in sorted(ckpt.all_tensors().items()):
        name = _vision_name(hf_name)
        if name is None:
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UnsupportedArchitecture(f"{ckpt.folder.name}: no llama.cpp name for {hf_name}")
        shift = 1.0 if "soft_emb_norm.weight" in name else 0.0
        if len(tensor.shape) <= 1 or ".embeddings." in name:
            dtype = np.float32
        elif "input_projection" in name:
            dtype = np.float16
        else:
            dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out_type]
        plan.append((new, tensor, list(tensor.shape), dtype, shift))
    if not any(p[0].startswith("mm.") for p in plan):
        raise UnsupportedArchitecture(f"{ckpt.folder.name} has no multi_modal_projector weights")
    total = add_tensor_infos(writer, [(n, shape, dtype) for n, _, shape, dtype, _ in plan])

    return write_file(writer, dst, out_type, total, progress,
                      [(n, lambda t=t, d=d, s=s: Checkpoint.read(t, d, s))
                       for n, t, _, d, s in plan])


# -- Gemma 4: the vision tower (gemma4v) and, on E2B/E4B, the audio conformer (gemma4a) ----------

_CLIPPED = r"(input_min|input_max|output_min|output_max)"
_VT, _AT = r"model\.vision_tower\.", r"model\.audio_tower\."


def _gemma4_table(audio: bool) -> list[tuple[re.Pattern, str, str | None, bool]]:
    """(Hugging Face name, llama.cpp name, transform, always F32) for Gemma 4's encoders, as
    llama.cpp's converter (``Gemma4VisionAudioModel``) writes them. A clipped linear's
    ``.linear.weight`` loses its ``.linear``; its four clip values are one-element F32s."""
    rows = [
        (_VT + r"patch_embedder\.input_proj\.weight", "v.patch_embd.weight", "patch", False),
        (_VT + r"patch_embedder\.position_embedding_table", "v.position_embd.weight", None, True),
        (_VT + r"std_bias", "v.std_bias", None, True),
        (_VT + r"std_scale", "v.std_scale", None, True),
        (_VT + r"encoder\.layers\.(\d+)\.layer_scalar", "v.blk.{0}.out_scale.weight", None, True),
        (r"model\.embed_vision\.embedding_projection\.weight", "mm.input_projection.weight",
         None, False),
    ]
    for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                   ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_out"),
                   ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                   ("mlp.down_proj", "ffn_down")):
        layer = _VT + r"encoder\.layers\.(\d+)\." + re.escape(hf)
        rows += [(layer + r"\.linear\.weight", f"v.blk.{{0}}.{gg}.weight", None, False),
                 (layer + r"\." + _CLIPPED, f"v.blk.{{0}}.{gg}.{{1}}", "scalar", True)]
    for hf, gg in (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
                   ("input_layernorm", "ln1"), ("post_attention_layernorm", "attn_post_norm"),
                   ("pre_feedforward_layernorm", "ln2"),
                   ("post_feedforward_layernorm", "ffn_post_norm")):
        rows.append((_VT + r"encoder\.layers\.(\d+)\." + re.escape(hf) + r"\.weight",
                     f"v.blk.{{0}}.{gg}.weight", None, True))
    if not audio:
        return [(re.compile(p + "$"), g, t, f) for p, g, t, f in rows]
    sub = _AT + r"subsample_conv_projection\."
    rows += [
        (sub + r"layer(\d+)\.conv\.weight", "a.conv1d.{0}.weight", None, True),
        (sub + r"layer(\d+)\.norm\.weight", "a.conv1d.{0}.norm.weight", None, True),
        (sub + r"input_proj_linear\.weight", "a.input_projection.weight", None, True),
        (_AT + r"output_proj\.weight", "a.pre_encode.out.weight", None, False),
        (_AT + r"output_proj\.bias", "a.pre_encode.out.bias", None, True),
        (_AT + r"layers\.(\d+)\.self_attn\.per_dim_scale", "a.blk.{0}.per_dim_scale.weight",
         "softplus", True),
        (_AT + r"layers\.(\d+)\.self_attn\.per_dim_key_scale",
         "a.blk.{0}.per_dim_k_scale.weight", "softplus", True),
        (_AT + r"layers\.(\d+)\.self_attn\.relative_k_proj\.weight",
         "a.blk.{0}.attn_k_rel.weight", None, False),
        (_AT + r"layers\.(\d+)\.lconv1d\.depthwise_conv1d\.weight", "a.blk.{0}.conv_dw.weight",
         "depthwise", True),
        (r"model\.embed_audio\.embedding_projection\.weight", "mm.a.input_projection.weight",
         None, False),
    ]
    for hf, gg in (("feed_forward1.ffw_layer_1", "ffn_up"),
                   ("feed_forward1.ffw_layer_2", "ffn_down"),
                   ("feed_forward2.ffw_layer_1", "ffn_up_1"),
                   ("feed_forward2.ffw_layer_2", "ffn_down_1"),
                   ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                   ("self_attn.v_proj", "attn_v"), ("self_attn.post", "attn_out"),
                   ("lconv1d.linear_start", "conv_pw1"), ("lconv1d.linear_end", "conv_pw2")):
        layer = _AT + r"layers\.(\d+)\." + re.escape(hf)
        rows += [(layer + r"\.linear\.weight", f"a.blk.{{0}}.{gg}.weight", None, False),
                 (layer + r"\." + _CLIPPED, f"a.blk.{{0}}.{gg}.{{1}}", "scalar", True)]
    # llama.cpp's names for the two conv-module norms are the other way round; its graph
    # applies them where Hugging Face does.
    for hf, gg in (("feed_forward1.pre_layer_norm", "ffn_norm"),
                   ("feed_forward1.post_layer_norm", "ffn_post_norm"),
                   ("feed_forward2.pre_layer_norm", "ffn_norm_1"),
                   ("feed_forward2.post_layer_norm", "ffn_post_norm_1"),
                   ("lconv1d.pre_layer_norm", "conv_norm"), ("lconv1d.conv_norm", "norm_conv"),
                   ("norm_pre_attn", "attn_pre_norm"), ("norm_post_attn", "attn_post_norm"),
                   ("norm_out", "ln2")):
        rows.append((_AT + r"layers\.(\d+)\." + re.escape(hf) + r"\.weight",
                     f"a.blk.{{0}}.{gg}.weight", None, True))
    return [(re.compile(p + "$"), g, t, f) for p, g, t, f in rows]


def _shape(shape: list[int], how: str | None) -> list[int]:
    """The shape :func:`_transformed` gives a tensor of ``shape``."""
    if how == "scalar" or not shape:
        return [1]
    if how == "depthwise":
        return [shape[0], shape[2]]
    if how == "patch":
        p = int(round((shape[1] // 3) ** 0.5))
        return [shape[0], 3, p, p]
    return shape


def _transformed(array: np.ndarray, how: str | None) -> np.ndarray:
    if how == "scalar" or array.ndim == 0:
        return array.reshape(1)
    if how == "softplus":
        # softplus as PyTorch computes it (linear above 20), bit for bit in float32
        array = array.astype(np.float32)
        return np.where(array > 20, array, np.log1p(np.exp(array))).astype(np.float32)
    if how == "depthwise":  # (H, 1, K) -> (H, K)
        return array.reshape(array.shape[0], array.shape[2])
    if how == "patch":  # (E, p*p*3) in (py, px, c) order -> a conv (E, 3, p, p)
        e, k = array.shape
        p = int(round((k // 3) ** 0.5))
        return np.ascontiguousarray(array.reshape(e, p, p, 3).transpose(0, 3, 1, 2))
    return array


def _write_gemma4(ckpt: Checkpoint, dst: Path, out_type: str, progress: Progress) -> Path:
    import gguf

    config, text = ckpt.config, ckpt.hparams
    vision, audio = config.get("vision_config") or {}, config.get("audio_config") or {}
    processor = processor_settings(ckpt.folder)
    if int(vision.get("pooling_kernel_size", 3)) != 3:
        raise UnsupportedArchitecture(f"{ckpt.folder.name}: llama.cpp pools Gemma 4 pictures "
                                      "3x3, not " + str(vision["pooling_kernel_size"]))
    heads = int(vision["num_attention_heads"])
    if int(vision.get("head_dim") or 0) not in (0, int(vision["hidden_size"]) // heads):
        raise UnsupportedArchitecture(f"{ckpt.folder.name}: the vision head size must be the "
                                      "width over the heads, as llama.cpp assumes")
    writer = _writer(ckpt, out_type, int(text["hidden_size"]))
    writer.add_vision_image_size(224)  # required, unused: Gemma 4 sizes pictures by a budget
    writer.add_vision_patch_size(int(vision.get("patch_size", 16)))
    writer.add_vision_embedding_length(int(vision["hidden_size"]))
    writer.add_vision_feed_forward_length(int(vision["intermediate_size"]))
    writer.add_vision_block_count(int(vision["num_hidden_layers"]))
    writer.add_vision_head_count(heads)
    writer.add_vision_image_mean(list(processor.get("image_mean") or [0.0, 0.0, 0.0]))
    writer.add_vision_image_std(list(processor.get("image_std") or [1.0, 1.0, 1.0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_clip_vision_projector_type("gemma4v")
    writer.add_vision_attention_layernorm_eps(1e-6)
    # Hugging Face's vision MLP is gelu (tanh); llama.cpp assumes gelu_quick unless told.
    writer.add_vision_use_gelu(True)
    if audio:
        writer.add_clip_has_audio_encoder(True)
        writer.add_audio_projection_dim(int(text["hidden_size"]))
        writer.add_audio_embedding_length(int(audio["hidden_size"]))
        writer.add_audio_feed_forward_length(4 * int(audio["hidden_size"]))
        writer.add_audio_block_count(int(audio["num_hidden_layers"]))
        writer.add_audio_head_count(int(audio["num_attention_heads"]))
        writer.add_clip_audio_projector_type("gemma4a")
        writer.add_audio_num_mel_bins(int(audio.get("input_feat_size", 128)))
        writer.add_audio_attention_layernorm_eps(1e-6)

    table = _gemma4_table(bool(audio))
    plan = []
    for hf_name, tensor in sorted(ckpt.all_tensors().items()):
        if "language_model." in hf_name or hf_name == "lm_head.weight":
            continue
        found = next(((row, m) for row in table if (m := row[0].match(hf_name))), None)
        if found is None:
            if hf_name.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_")):
                raise UnsupportedArchitecture(f"{ckpt.folder.name}: no llama.cpp name for "
                                              f"{hf_name}")
            continue
        (_, name, how, always_f32), match = found
        shape = _shape(list(tensor.shape), how)
        wide = not always_f32 and len(shape) > 1
        dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out_type] \
            if wide else np.float32
        plan.append((name.format(*match.groups()), tensor, shape, dtype, how))
    total = add_tensor_infos(writer, [(n, shape, dtype) for n, _, shape, dtype, _ in plan])

    def read(tensor, dtype, how):
        array = _transformed(Checkpoint.read(tensor, np.float32), how)
        if dtype == np.uint16:
            from .checkpoint import f32_to_bf16

            return f32_to_bf16(array)
        return np.ascontiguousarray(array, dtype=dtype)

    return write_file(writer, dst, out_type, total, progress,
                      [(n, lambda t=t, d=d, h=h: read(t, d, h)) for n, t, _, d, h in plan])
