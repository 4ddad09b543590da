"""A Hugging Face Gemma checkpoint folder, read lazily.

    ckpt = Checkpoint.open(Path("gemma-2-2b-it"))
    ckpt.arch                      # "gemma2" (llama.cpp's architecture name)
    for name, tensor in ckpt.tensors():
        rows = ckpt.read(tensor, np.float16)

Weights are read from safetensors only (never pickle), through gguf-py's ``SafetensorsLocal``:
each tensor is a memory-mapped byte range, converted in row blocks, so converting a model never
holds more than about one tensor in memory. ``hparams`` is the text model's configuration with
the defaults Hugging Face leaves out of Gemma 3's ``text_config`` filled in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidModelFile, UnsupportedArchitecture
from ..family import MODEL_TYPES, legacy_config_keys

#: The architectures gemma convert writes from a Hugging Face checkpoint.
CONVERTIBLE = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4")

SUPPORTED = ("gemma (Gemma 1), gemma2 (Gemma 2), gemma3_text and gemma3 (Gemma 3, text part), "
             "gemma3n_text and gemma3n (Gemma 3n, text part), gemma4_text and gemma4 (Gemma 4, "
             "text part)")

# Values transformers assumes when a Gemma 3 config leaves them out (Gemma3TextConfig).
_GEMMA3_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 4096,
    "query_pre_attn_scalar": 256, "sliding_window_pattern": 6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
}
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "sliding_window": 4096, "query_pre_attn_scalar": 256, "head_dim": 256}

# Parts of a multimodal Gemma 3 checkpoint that are not the language model.
_SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                  "model.multi_modal_projector.", "model.audio_tower.", "model.embed_vision.",
                  "model.embed_audio.")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass
class Checkpoint:
    """A Gemma text checkpoint: its folder, architecture, text config and weight files."""

    folder: Path
    model_type: str
    hparams: dict
    weight_files: list[Path]
    _index: dict = field(default_factory=dict, repr=False)
    config: dict = field(default_factory=dict, repr=False)  # the whole config.json

    @property
    def arch(self) -> str:
        """llama.cpp's architecture name: gemma, gemma2, gemma3, gemma3n or gemma4."""
        return MODEL_TYPES[self.model_type]

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        """Check the folder and read its config; raise a one-line error for what is missing."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise InvalidModelFile(f"{folder} is not a folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise InvalidModelFile(f"{folder} has no config.json: not a Hugging Face checkpoint")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidModelFile(f"{config_path} is not valid JSON ({exc})") from None
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES or MODEL_TYPES[model_type] not in CONVERTIBLE:
            raise UnsupportedArchitecture(
                f"{folder.name} is a {model_type!r} checkpoint; gemma convert supports "
                f"{SUPPORTED}")
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "?")
            raise UnsupportedArchitecture(
                f"{folder.name} is already quantized ({method}); convert the original "
                "bf16/f16 weights")
        return cls(folder, model_type, text_hparams(config), _weight_files(folder),
                   config=config)

    # -- tokenizer ------------------------------------------------------------------------------

    @property
    def sentencepiece_model(self) -> Path:
        """The SentencePiece ``tokenizer.model``; a clear error when the folder has none."""
        path = self.folder / "tokenizer.model"
        if not path.is_file():
            extra = " (it has only tokenizer.json)" if (self.folder / "tokenizer.json").is_file() \
                else ""
            raise InvalidModelFile(
                f"{self.folder.name} has no tokenizer.model{extra}: copy the SentencePiece "
                "tokenizer of its base model into the folder")
        return path

    def require_tokenizer(self) -> None:
        """Any tokenizer transformers can load (tokenizer.model or tokenizer.json)."""
        if not any((self.folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
            raise InvalidModelFile(f"{self.folder.name} has no tokenizer (tokenizer.model or "
                                   "tokenizer.json)")

    # -- weights ------------------------------------------------------------------------------

    def tensors(self) -> Iterator[tuple[str, object]]:
        """(Hugging Face name of the text model, lazy tensor) for every weight, sorted by name.

        Multimodal Gemma 3 names (``language_model.model.*``, ``model.language_model.*``) come
        out as the text model's (``model.*``); vision tensors and a tied ``lm_head`` are
        skipped.
        """
        index = self.all_tensors()
        for name in sorted(index):
            text_name = text_model_name(name)
            if text_name is None:
                continue
            if text_name == "lm_head.weight":
                if self.hparams.get("tie_word_embeddings", True) is False:
                    raise UnsupportedArchitecture(
                        f"{self.folder.name} has an untied lm_head; Gemma ties it to the "
                        "token embedding and llama.cpp's Gemma models expect that")
                continue
            yield text_name, index[name]

    def all_tensors(self) -> dict[str, object]:
        """Every tensor of the checkpoint (vision and audio towers too), by its name."""
        from gguf.utility import SafetensorsLocal

        if not self._index:
            for path in self.weight_files:
                try:
                    with SafetensorsLocal(path) as part:
                        self._index.update(part)
                except (ValueError, OSError, KeyError) as exc:
                    raise InvalidModelFile(f"{path.name} is not a valid safetensors file "
                                           f"({exc})") from None
            end = {t.data_range.filename: 0 for t in self._index.values()}
            for t in self._index.values():
                end[t.data_range.filename] = max(end[t.data_range.filename],
                                                 t.data_range.offset + t.data_range.size)
            for path, needed in end.items():
                if Path(path).stat().st_size < needed:
                    raise InvalidModelFile(f"{Path(path).name} is truncated (an incomplete "
                                           "download?); fetch it again")
        return self._index

    @staticmethod
    def read(tensor, dtype=np.float32, shift: float = 0.0) -> np.ndarray:
        """The tensor as a new ``dtype`` array (float32, float16, or uint16 meaning bf16 bits),
        plus ``shift``; converted in blocks of rows from the memory map."""
        src_dtype = _DTYPES.get(tensor.dtype)
        if src_dtype is None:
            raise InvalidModelFile(f"unsupported tensor dtype {tensor.dtype}")
        shape = tuple(tensor.shape)
        raw = tensor.mmap_bytes().view(src_dtype).reshape(shape if shape else (1,))
        out = np.empty(raw.shape, dtype=dtype)
        rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        dst = out.reshape(rows.shape)
        step = max(1, (1 << 22) // rows.shape[1])  # ~4M values (16 MB of f32) per block
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step]
            if tensor.dtype == "BF16" and dtype == np.uint16 and shift == 0.0:
                dst[start:start + step] = block  # bf16 -> bf16: the bits as they are
                continue
            values = bf16_to_f32(block) if tensor.dtype == "BF16" else block.astype(np.float32)
            if shift:
                values += shift
            dst[start:start + step] = f32_to_bf16(values) if dtype == np.uint16 else values
        del raw, rows
        return out.reshape(shape) if shape else out.reshape(())

    @property
    def source_dtype(self) -> str:
        """The dtype of most of the weights: F32, F16 or BF16."""
        counts: dict[str, int] = {}
        for _, t in self.tensors():
            counts[t.dtype] = counts.get(t.dtype, 0) + int(np.prod(t.shape))
        return max(counts, key=counts.get) if counts else "F32"

    def parameter_count(self) -> int:
        return sum(int(np.prod(t.shape)) for _, t in self.tensors())

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def text_hparams(config: dict) -> dict:
    """The text model's config with Gemma's unstated defaults filled in."""
    model_type = config["model_type"]
    if MODEL_TYPES.get(model_type) == "gemma4":
        from .gemma4_gguf import gemma4_hparams

        return gemma4_hparams(config)
    if MODEL_TYPES.get(model_type) == "gemma3n":
        from .gemma3n import gemma3n_hparams

        return gemma3n_hparams(config)
    if model_type == "gemma3":
        text = dict(config.get("text_config") or {})
        for key in ("tie_word_embeddings", "torch_dtype", "dtype"):
            if key in config and key not in text:
                text[key] = config[key]
        base = dict(_GEMMA3_DEFAULTS)
    elif model_type == "gemma3_text":
        text, base = dict(config), dict(_GEMMA3_DEFAULTS)
    elif model_type == "gemma2":
        text, base = dict(config), dict(_GEMMA2_DEFAULTS)
    else:
        text, base = dict(config), {"head_dim": 256}
    # transformers 5 writes rope_parameters / layer_types instead of the older keys.
    text.update(legacy_config_keys(text))
    return {**base, **{k: v for k, v in text.items() if v is not None or k not in base}}


def text_model_name(name: str) -> str | None:
    """The text model's tensor name, or None for a tensor that is not part of it."""
    if name.startswith(_SKIP_PREFIXES):
        return None
    if name.startswith("language_model."):
        name = name.removeprefix("language_model.")
    elif name.startswith("model.language_model."):
        name = "model." + name.removeprefix("model.language_model.")
    return name


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (exact), with gguf-py's dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(np.ascontiguousarray(bits).view(np.uint8), GGMLQuantizationType.BF16)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 bit patterns, with gguf-py's quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(values, dtype=np.float32),
                    GGMLQuantizationType.BF16).view(np.uint16)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidModelFile(f"{index.name} is not a valid index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise InvalidModelFile(f"{folder.name} is missing {', '.join(missing)} (an "
                                   "incomplete download?)")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise InvalidModelFile(
            f"{folder.name} holds pickle weights ({pickles[0]}); gemma-chat reads safetensors "
            "only, never pickle (it can run code): use the repository's .safetensors files")
    raise InvalidModelFile(f"{folder.name} has a config.json but no .safetensors weights")
