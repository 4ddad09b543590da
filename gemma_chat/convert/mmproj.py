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

from pathlib import Path

import numpy as np

from ..errors import UnsupportedArchitecture
from ..media import processor_settings
from .checkpoint import Checkpoint
from .hf_gguf import Progress, add_tensor_infos, write_file

VISION_FILE = "vision.safetensors"  # an MLX folder's image encoder (mlx-vlm's names)

#: The checkpoints whose image encoder can be written, by config ``model_type``.
SUPPORTED = {"gemma3": "gemma3"}
_DEFAULT_MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP's: pixels to [-1, 1]


def has_projector(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint carries an image encoder gemma convert writes."""
    return ckpt.model_type in SUPPORTED and bool(ckpt.config.get("vision_config"))


def write_mlx_vision(ckpt: Checkpoint, folder: Path, dtype: str = "float16") -> Path:
    """Add the checkpoint's vision tower and projector to an MLX folder whose text model
    mlx-lm wrote (:mod:`gemma_chat.backends.mlx_vision`): the weights in mlx-vlm's names and
    layouts (``vision.safetensors``), the vision settings mlx-lm leaves out of config.json,
    and the processor's settings."""
    import json
    import shutil

    import mlx.core as mx

    from ..backends.mlx_vision import vision_name

    arrays = {}
    for name, tensor in sorted(ckpt.all_tensors().items()):
        new = vision_name(name)
        if new is None:
            continue
        value = Checkpoint.read(tensor, np.float32)
        if "patch_embedding.weight" in new and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)  # PyTorch's conv layout to MLX's
        arrays[new] = mx.array(value).astype(getattr(mx, dtype))
    mx.save_safetensors(str(folder / VISION_FILE), arrays, metadata={"format": "mlx"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
                "image_token_index"):
        if key in ckpt.config:
            config[key] = ckpt.config[key]
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, folder / name)
    return folder


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
                                      "can write (Gemma 3 vision checkpoints have one)")
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

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(ckpt.folder.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32,
                          "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(n_embd_text)
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
