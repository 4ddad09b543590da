"""Image and audio encoders on MLX, beside the mlx-lm text model: mlx-vlm's modules, loaded
with only the encoder weights of a model folder.

    encoders = load_encoders(folder, config)       # None for a text-only folder
    before, n, after = encoders.wrap(media)        # the ids around it, its positions
    features = encoders.encode(media)              # (n, text hidden), for input_embeddings

Gemma 3 (:class:`Gemma3Vision`): mlx-vlm's SigLIP tower and Gemma 3 projector.

mlx-lm runs the language model of a Gemma 3 vision checkpoint and drops its vision weights;
this loads only those (``vision_tower.*`` and ``multi_modal_projector.*``, from the folder's
safetensors) into mlx-vlm's modules, so the text weights are never held twice. A picture is
prepared as the Hugging Face processor does (squashed to the tower's square input, bilinear,
then normalized with the processor's mean and std), encoded, pooled and projected; its features
take the places of the image's soft tokens in the prompt's input embeddings, divided by
``sqrt(hidden_size)`` of the text model because mlx-lm's Gemma 3 multiplies every input
embedding by it (Hugging Face scales only the token embeddings). A picture's tokens see each
other, as in Hugging Face and llama.cpp (mlx-vlm attends causally): the MLX backend's masks.
"""

from __future__ import annotations

import json
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


def _encoder_weights(folder: Path, rename) -> dict:
    """The folder's safetensors tensors that ``rename`` maps to an encoder name, by that name."""
    import mlx.core as mx

    weights = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for name, value in mx.load(str(path)).items():
            new = rename(name)
            if new is not None:
                weights[new] = value
    return weights


def _load_into(module, weights: dict, prefix: str, folder: Path) -> None:
    """Load the ``prefix``ed weights into ``module``, every one of its parameters required."""
    try:
        module.load_weights([(k.removeprefix(prefix), v) for k, v in weights.items()
                             if k.startswith(prefix)])
    except ValueError as exc:
        raise BackendError(f"the encoders of {Path(folder).name} do not load: {exc}") from None


class Gemma3Vision:
    """The vision tower and projector of one Gemma 3 model folder."""

    kinds = ("image",)
    bidirectional = True  # a picture's tokens see each other (gemma_chat.backends.mlx)

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
        self.image_ids = (int(config.get("boi_token_index", 255999)),
                          int(config.get("eoi_token_index", 256000)))

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
        weights = _encoder_weights(folder, vision_name)
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
        _load_into(tower, weights, "vision_tower.", folder)
        _load_into(projector, weights, "multi_modal_projector.", folder)
        if mx.default_device().type == mx.cpu:  # as the text model: float32 on a CPU
            tower.set_dtype(mx.float32)
            projector.set_dtype(mx.float32)
        mx.eval(tower.parameters(), projector.parameters())
        return cls(tower, projector, config, processor_settings(Path(folder)))

    def wrap(self, media) -> tuple[list[int], int, list[int]]:
        """The ids before a picture, its number of positions, the ids after it."""
        return [self.image_ids[0]], self.n_tokens, [self.image_ids[1]]

    def encode(self, media) -> object:
        """The picture's features as input embeddings for mlx-lm's Gemma 3: (n_tokens, hidden)."""
        from .mtmd import squash

        mx = self._mx
        pixels = squash(media.pixels, self.image_size).astype(np.float32) / 255.0
        pixels = (pixels - self.mean) / self.std  # H x W x C, as mlx's conv wants it
        hidden, _, _ = self.tower(mx.array(pixels[None]), output_hidden_states=True)
        features = self.projector(hidden)[0]
        return features / (self.text_hidden ** 0.5)


# -- Gemma 4: a vision tower and (E2B, E4B) an audio conformer ---------------------------------

_GEMMA4_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")


def gemma4_encoder_name(name: str) -> str | None:
    """A Gemma 4 checkpoint's encoder tensor name in mlx-vlm's layout; None for the text
    model's."""
    name = name.removeprefix("model.")
    return name if name.startswith(_GEMMA4_PREFIXES) else None


class Gemma4Encoders:
    """Gemma 4's picture and sound encoders: mlx-vlm's vision tower (patches with 2-D
    positions, pooled 3x3) and audio conformer (log-mel features, 40 ms a token), each
    followed by its embedder into the text model's width.

    A picture is resized to Gemma 4's token budget as its processor does (aspect ratio kept,
    sides in multiples of 48 px: :func:`~gemma_chat.backends.mtmd.fit_budget`) and rescaled to
    [0, 1]; a clip's features come from mlx-vlm's port of the feature extractor, with the
    settings of the folder's ``processor_config.json``. Picture tokens see each other in the
    sliding-window layers where the model says so (``use_bidirectional_attention: vision``,
    the larger Gemma 4 models): :attr:`bidirectional`.
    """

    def __init__(self, vision, embed_vision, audio, embed_audio, config: dict,
                 processor: dict, image_tokens: int, extractor):
        import mlx.core as mx

        self._mx = mx
        self.vision, self.embed_vision = vision, embed_vision
        self.audio, self.embed_audio = audio, embed_audio
        self.kinds = ("image",) + (("audio",) if audio is not None else ())
        text = config["text_config"]
        self.text_hidden = int(text["hidden_size"])
        self.bidirectional = text.get("use_bidirectional_attention") == "vision"
        vision_config = config.get("vision_config") or {}
        self.patch = int(vision_config.get("patch_size", 16))
        self.pool = int(vision_config.get("pooling_kernel_size", 3))
        self.image_tokens = image_tokens
        self.normalize = bool(processor.get("do_normalize"))
        self.mean = np.array(processor.get("image_mean") or [0.5] * 3, dtype=np.float32)
        self.std = np.array(processor.get("image_std") or [0.5] * 3, dtype=np.float32)
        self.image_ids = (int(config.get("boi_token_id", 255999)),
                          int(config.get("eoi_token_id", 258882)))
        self.audio_ids = (int(config.get("boa_token_id", 256000)),
                          int(config.get("eoa_token_id", 258883)))
        self._extractor = extractor
        self._features: dict[tuple[str, str], object] = {}  # (kind, sha256) -> features

    @classmethod
    def load(cls, folder: Path, config: dict, image_tokens: int) -> Gemma4Encoders | None:
        """The folder's encoders, or None when it has none (converted text-only)."""
        from types import SimpleNamespace

        if config.get("model_type") != "gemma4" or not config.get("vision_config"):
            return None
        try:
            import mlx.core as mx
            from mlx_vlm.models.gemma4.audio import AudioEncoder
            from mlx_vlm.models.gemma4.audio_feature_extractor import (
                Gemma4AudioFeatureExtractor,
            )
            from mlx_vlm.models.gemma4.config import (
                AudioConfig,
                ModelConfig,
                TextConfig,
                VisionConfig,
            )
            from mlx_vlm.models.gemma4.gemma4 import Model, MultimodalEmbedder
            from mlx_vlm.models.gemma4.vision import VisionModel
        except ImportError:
            raise missing_extra("mlx-vlm", "mlx") from None
        weights = _encoder_weights(folder, gemma4_encoder_name)
        if not any(k.startswith("vision_tower.") for k in weights):
            return None
        model_config = ModelConfig.from_dict(config)  # its parts too, as mlx-vlm's loader does
        model_config.text_config = TextConfig.from_dict(config["text_config"])
        model_config.vision_config = VisionConfig.from_dict(config["vision_config"])
        if config.get("audio_config"):
            model_config.audio_config = AudioConfig.from_dict(config["audio_config"])
        has_audio = model_config.audio_config is not None and \
            any(k.startswith("audio_tower.") for k in weights)
        vision = VisionModel(model_config.vision_config)
        text_hidden = model_config.text_config.hidden_size
        embed_vision = MultimodalEmbedder(model_config.vision_config.hidden_size, text_hidden,
                                          model_config.vision_config.rms_norm_eps)
        audio = embed_audio = None
        if has_audio:
            audio_config = model_config.audio_config
            audio = AudioEncoder(audio_config)
            embed_audio = MultimodalEmbedder(
                audio_config.output_proj_dims or audio_config.hidden_size, text_hidden,
                audio_config.rms_norm_eps)
        # mlx-vlm's own renaming and layout changes (convolutions to MLX's layout, unused
        # clipping bounds dropped), which read only these two attributes of its model.
        weights = Model.sanitize(SimpleNamespace(config=model_config, audio_tower=audio),
                                 weights)
        modules = [(vision, "vision_tower."), (embed_vision, "embed_vision.")]
        if has_audio:
            modules += [(audio, "audio_tower."), (embed_audio, "embed_audio.")]
        for module, prefix in modules:
            _load_into(module, weights, prefix, folder)
            if mx.default_device().type == mx.cpu:  # as the text model: float32 on a CPU
                module.set_dtype(mx.float32)
            mx.eval(module.parameters())
        settings = _processor_config(Path(folder))
        extractor = None
        if has_audio:
            import inspect

            accepted = inspect.signature(Gemma4AudioFeatureExtractor).parameters
            extractor = Gemma4AudioFeatureExtractor(**{
                k: v for k, v in settings.get("feature_extractor", {}).items()
                if k in accepted})
        return cls(vision, embed_vision, audio, embed_audio, config,
                   processor_settings(Path(folder)), image_tokens, extractor)

    def _pixels(self, media) -> np.ndarray:
        from .mtmd import fit_budget

        pixels = fit_budget(media.pixels, self.image_tokens).astype(np.float32) / 255.0
        if self.normalize:
            pixels = (pixels - self.mean) / self.std
        return pixels

    def wrap(self, media) -> tuple[list[int], int, list[int]]:
        """The ids before a picture or clip, its number of positions, the ids after it."""
        if media.kind == "image":
            from .mtmd import budget_size

            h, w = budget_size(media.pixels.shape[0], media.pixels.shape[1], self.image_tokens,
                               self.patch, self.pool)
            n = (h // self.patch) * (w // self.patch) // self.pool ** 2
            return [self.image_ids[0]], n, [self.image_ids[1]]
        return [self.audio_ids[0]], len(self.encode(media)), [self.audio_ids[1]]

    def encode(self, media) -> object:
        """The medium's features as input embeddings for mlx-lm's Gemma 4: (n, hidden)."""
        key = (media.kind, media.sha256)
        if key in self._features:
            return self._features[key]
        mx = self._mx
        if media.kind == "image":
            pixels = self._pixels(media).transpose(2, 0, 1)[None]  # channels first
            features = self.embed_vision(self.vision(mx.array(pixels)))[0]
        else:
            out = self._extractor([media.samples])
            mel = mx.array(out["input_features"][0][None])
            valid = np.asarray(out["input_features_mask"][0], dtype=bool)
            encoded, padding = self.audio(mel, mx.array(~valid[None]))
            keep = np.nonzero(~np.asarray(padding[0]))[0]
            features = self.embed_audio(encoded[0][mx.array(keep)])
        # mlx-lm's Gemma 4 multiplies every input embedding by sqrt(hidden_size); Hugging Face
        # scales only the token embeddings.
        features = features / (self.text_hidden ** 0.5)
        mx.eval(features)
        if len(self._features) >= 16:
            self._features.pop(next(iter(self._features)))
        self._features[key] = features
        return features


def _processor_config(folder: Path) -> dict:
    try:
        data = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


#: The encoders of each multimodal model type.
ENCODERS = {"gemma3": lambda folder, config, image_tokens: Gemma3Vision.load(folder, config),
            "gemma4": Gemma4Encoders.load}


def load_encoders(folder: Path, config: dict, image_tokens: int):
    """The picture (and sound) encoders of an MLX model folder; None where it has none."""
    load = ENCODERS.get(config.get("model_type"))
    return load(Path(folder), config, image_tokens) if load else None


def describe_encoders(folder: Path) -> str | None:
    """What an MLX folder's encoders take, for ``gemma show``; None without encoders. Reads
    only config.json and the safetensors headers."""
    import struct

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("model_type") not in ENCODERS or not config.get("vision_config"):
        return None
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                names |= set(json.loads(f.read(min(size, 100 * 2**20))))
        except (OSError, ValueError, struct.error):
            continue
    names = {n.removeprefix("model.") for n in names}
    if not any(n.startswith("vision_tower.") for n in names):
        return None
    if config["model_type"] == "gemma3":
        return f"pictures ({int(config.get('mm_tokens_per_image') or 256)} tokens each)"
    from .mtmd import IMAGE_TOKENS

    parts = [f"pictures (up to {IMAGE_TOKENS} tokens each; --image-tokens)"]
    if config.get("audio_config") and any(n.startswith("audio_tower.") for n in names):
        parts.append("sound (25 tokens a second, 30 s a clip)")
    return " and ".join(parts)
