"""A tiny Gemma 3 vision-language checkpoint, built with transformers and taught to name colours.

    folder = build_gemma3_vlm(tmp_path / "tiny-vlm")

The real architecture scaled down: Gemma 3's text model (5 sliding layers then a global one),
a SigLIP vision tower on 64x64 pictures in 16-pixel patches (4x4), and Gemma 3's projector
pooling them to 2x2 = 4 soft tokens, with the processor's settings in ``preprocessor_config``.
The tokenizer is a real SentencePiece model with Gemma 3's image tokens. A few hundred steps of
training on chats about solid-colour pictures make the answer depend on the picture: asked
"What colour is this?", it names the colour it is shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tiny_models import SHAPES, VOCAB, train_tokenizer

IMAGE_SIZE, PATCH, TOKENS = 64, 16, 4
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30)}
QUESTION = "What colour is this?"


def picture(rgb, size=(IMAGE_SIZE, IMAGE_SIZE), seed: int = 0) -> np.ndarray:
    """A solid-colour picture with a little noise: H x W x 3 uint8."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-25, 26, size=(size[1], size[0], 3))
    return np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)


def chat_text(answer: str | None = None) -> str:
    """The chat a picture comes in, as the processor expands it (4 soft tokens)."""
    head = (f"<bos><start_of_turn>user\n\n\n{BOI}{SOFT * TOKENS}{EOI}\n\n{QUESTION}"
            "<end_of_turn>\n<start_of_turn>model\n")
    return head if answer is None else head + answer + "<end_of_turn>\n"


def build_gemma3_vlm(folder: Path, *, seed: int = 0, steps: int = 200) -> Path:
    """Write the checkpoint (safetensors, config, tokenizer, processor settings)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    train_tokenizer(folder, extra_symbols=(BOI, EOI, SOFT),
                    extra_text=tuple(f"{QUESTION} {c}" for c in COLOURS))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOI, EOI, SOFT)}
    shape = {k: v for k, v in SHAPES["gemma3_text"].items() if k != "dtype"}
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                            head_dim=256, max_position_embeddings=1024, rms_norm_eps=1e-6,
                            initializer_range=0.1, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2, tie_word_embeddings=True, **shape)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                vision_use_head=False)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=TOKENS, boi_token_index=ids[BOI],
                          eoi_token_index=ids[EOI], image_token_index=ids[SOFT],
                          tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "language_model" in name:
                param.copy_(torch.randn_like(param) * 0.2)
        # transformers starts the projection at zero: pictures would change nothing.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    _train(model, tokenizer, ids[SOFT], steps)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = {"image_processor_type": "Gemma3ImageProcessor", "do_resize": True,
                 "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "do_convert_rgb": True, "do_pan_and_scan": False,
                 "image_seq_length": TOKENS, "processor_class": "Gemma3Processor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return folder


def pixel_values(pixels: np.ndarray):
    """A 64x64 picture as the processor hands it to the model: [1, 3, 64, 64] in [-1, 1]."""
    import torch

    x = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1) / 255.0
    return ((x - 0.5) / 0.5)[None]


def _train(model, tokenizer, soft_id: int, steps: int, batch: int = 8) -> None:
    import torch

    names = list(COLOURS)
    prompt = tokenizer(chat_text(), add_special_tokens=False).input_ids
    answers = {c: tokenizer(c + "<end_of_turn>\n", add_special_tokens=False).input_ids
               for c in names}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(1)
    model.train()
    for _ in range(steps):
        rows, pixels, labels = [], [], []
        for _ in range(batch):
            colour = names[rng.integers(len(names))]
            ids = prompt + answers[colour]
            rows.append(ids)
            labels.append([-100] * len(prompt) + answers[colour])
            pixels.append(pixel_values(picture(COLOURS[colour], seed=int(rng.integers(1 << 30)))))
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        out = model(input_ids=input_ids, pixel_values=torch.cat(pixels),
                    token_type_ids=(input_ids == soft_id).long(), labels=label_ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()


def reference_logits(folder: Path, ids: list[int], pixels: np.ndarray,
                     bidirectional: bool = True):
    """transformers' logits at every position of ``ids`` with one picture (already at 64x64),
    eager attention, float32: (len(ids), vocab). The picture's tokens see each other, as in
    Gemma 3, unless not ``bidirectional`` (plain causal attention, as mlx-vlm has it)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    soft = model.config.image_token_index
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values(pixels),
                    token_type_ids=(input_ids == soft).long() if bidirectional else None)
    return out.logits[0].float().numpy()


# -- Gemma 4: a vision tower and an audio conformer beside the dense text model -------------------

def build_gemma4_vlm(folder: Path, *, vocab_gguf: Path, seed: int = 0) -> Path:
    """A tiny ``gemma4`` checkpoint with pictures and sound (E2B/E4B-like), random weights,
    Gemma 4's real vocabulary and token ids: the dense text shape of tests/tiny_gemma4.py, a
    one-layer vision tower (16-pixel patches pooled 3x3, 2-D positions up to 128 patches a
    side) and a one-layer audio conformer (128 mel bins). Picture tokens see each other in the
    sliding-window layers (``use_bidirectional_attention="vision"``), which is what llama.cpp
    does for every Gemma 4 whose width is not E2B's or E4B's."""
    import torch
    from tiny_gemma4 import SHAPES as TEXT_SHAPES
    from tiny_gemma4 import gemma4_tokenizer
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    folder = Path(folder)
    gemma4_tokenizer(vocab_gguf, folder)
    text = Gemma4TextConfig(**{**TEXT_SHAPES["dense"], "use_bidirectional_attention": "vision"})
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                position_embedding_size=128)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              subsampling_conv_channels=[128, 4], output_proj_dims=32)
    config = Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          audio_config=audio.to_dict())
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + torch.randn_like(param) * 0.2)
            elif param.dim() > 1:
                param.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    for key in ("global_head_dim", "num_global_key_value_heads", "final_logit_softcapping"):
        data["text_config"][key] = TEXT_SHAPES["dense"][key]
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    processor = {"image_processor_type": "Gemma4ImageProcessor", "image_mean": [0.0] * 3,
                 "image_std": [1.0] * 3, "patch_size": 16, "pooling_kernel_size": 3,
                 "max_soft_tokens": 280}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return folder
