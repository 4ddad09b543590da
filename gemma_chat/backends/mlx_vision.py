"""Gemma 3's image encoder on MLX: mlx-vlm's SigLIP tower and Gemma 3 projector, beside the
mlx-lm text model.

    vision = Gemma3Vision.load(folder, config)     # None for a text-only folder
    features = vision.encode(media)                # (mm_tokens_per_image, text hidden)

mlx-lm runs the language model of a Gemma 3 vision checkpoint and drops its vision weights;
this loads only those (``vision_tower.*`` and ``multi_modal_projector.*``, from the folder's
safetensors) into mlx-vlm's modules, so the text weights are never held twice. A picture is
prepared as the Hugging Face processor does (squashed to the tower's square input, bilinear,
then normalized with the processor's mean and std), encoded, pooled and projected; its features
take the places of the image's soft tokens in the prompt's input embeddings, divided by
``sqrt(hidden_size)`` of the text model because mlx-lm's Gemma 3 multiplies every input
embedding by it (Hugging Face scales only the token embeddings). Attention over the picture is
causal here, as in mlx-vlm (Hugging Face and llama.cpp let its tokens see each other).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendError, missing_extra
from ..media import processor_settings

_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def vision_name(name: str) -> str | None:
    """A checkpoint's vision tensor name in mlx-vlm's layout; None for the text model's."""
    name = name.removeprefix("model.")
    if name.startswith("multi_modal_projector."):
        return name
    if name.startswith("vision_tower."):
        rest = name.removeprefix("vision_tower.").removeprefix("vision_model.")
        return None if rest.startswith("head.") else "vision_tower.vision_model." + rest
    return None


class Gemma3Vision:
    """The vision tower and projector of one Gemma 3 model folder."""

    def __init__(self, tower, projector, config: dict, processor: dict):
        import mlx.core as mx

        self._mx = mx
        self.tower, self.projector = tower, projector
        vision = config["vision_config"]
        self.image_size = int(vision.get("image_size", 896))
        self.n_tokens = int(config.get("mm_tokens_per_image") or 256)
        self.text_hidden = int(config["text_config"]["hidden_size"])
        self.mean = np.array(processor.get("image_mean") or [0.5] * 3, dtype=np.float32)
        self.std = np.array(processor.get("image_std") or [0.5] * 3, dtype=np.float32)

    @classmethod
    def load(cls, folder: Path, config: dict) -> Gemma3Vision | None:
        """The folder's image encoder, or None when it has none (a text-only model)."""
        if config.get("model_type") != "gemma3" or not config.get("vision_config"):
            return None
        try:
            import mlx.core as mx
            from mlx_vlm.models.gemma3.config import ModelConfig, TextConfig, VisionConfig
            from mlx_vlm.models.gemma3.gemma3 import Gemma3MultiModalProjector
            from mlx_vlm.models.gemma3.vision import VisionModel
        except ImportError:
            raise missing_extra("mlx-vlm", "mlx") from None
        weights = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            for name, value in mx.load(str(path)).items():
                new = vision_name(name)
                if new is not None:
                    weights[new] = value
        if not any(k.startswith("vision_tower.") for k in weights):
            return None  # converted without its encoder: the model reads text
        text = dict(config["text_config"])
        text.setdefault("model_type", "gemma3_text")
        text["mm_tokens_per_image"] = int(config.get("mm_tokens_per_image") or 256)
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            text.setdefault(key, 1)
        vision = dict(config["vision_config"])
        vision.setdefault("model_type", "siglip_vision_model")
        model_config = ModelConfig(text_config=TextConfig.from_dict(text),
                                   vision_config=VisionConfig.from_dict(vision),
                                   model_type="gemma3")
        tower = VisionModel(model_config.vision_config)
        projector = Gemma3MultiModalProjector(model_config)
        weights = tower.sanitize(weights)
        try:
            tower.load_weights([(k.removeprefix("vision_tower."), v) for k, v in weights.items()
                                if k.startswith("vision_tower.")])
            projector.load_weights([(k.removeprefix("multi_modal_projector."), v)
                                    for k, v in weights.items()
                                    if k.startswith("multi_modal_projector.")])
        except ValueError as exc:
            raise BackendError(f"the image encoder of {Path(folder).name} does not load: "
                               f"{exc}") from None
        if mx.default_device().type == mx.cpu:  # as the text model: float32 on a CPU
            tower.set_dtype(mx.float32)
            projector.set_dtype(mx.float32)
        mx.eval(tower.parameters(), projector.parameters())
        return cls(tower, projector, config, processor_settings(Path(folder)))

    def encode(self, media) -> object:
        """The picture's features as input embeddings for mlx-lm's Gemma 3: (n_tokens, hidden)."""
        from .mtmd import squash

        mx = self._mx
        pixels = squash(media.pixels, self.image_size).astype(np.float32) / 255.0
        pixels = (pixels - self.mean) / self.std  # H x W x C, as mlx's conv wants it
        hidden, _, _ = self.tower(mx.array(pixels[None]), output_hidden_states=True)
        features = self.projector(hidden)[0]
        return features / (self.text_hidden ** 0.5)
