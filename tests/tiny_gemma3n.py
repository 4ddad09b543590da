"""Tiny Gemma 3n text checkpoints (``gemma3n_text``, ``Gemma3nForCausalLM``).

    folder = build_gemma3n(tmp_path / "tiny-gemma3n", chats=True)
    mm = as_multimodal(folder, tmp_path / "tiny-gemma3n-mm")   # model_type gemma3n

The real layer layout (gemma-3n-E2B/E4B) scaled down in width, not in depth: llama.cpp's
``gemma3n`` fixes the things below in code instead of reading them from the GGUF (see
``gemma_chat.convert.gemma3n.LLAMA_CPP_FIXED``), so the tiny model keeps them as the real
models have them:

- 20 layers that compute their own KV (``n_layer_kv_from_start = 20``): 25 layers, the last 5
  KV-shared (E2B: 30 and 10, E4B: 35 and 15). llama.cpp maps every shared layer onto layer 18
  (sliding) or 19 (full), which the 4 sliding : 1 full pattern makes [sliding, full], as
  transformers' "last non-shared layer of each kind" also picks.
- activation sparsity 0.95 on the first 10 layers, none after;
- per-layer embeddings of 256 per layer, LAuReL rank 64, 4 AltUp inputs with the first active,
  AltUp's correct-output scale applied, final soft-capping 30.

Scaled down: hidden 64, 2 query heads and 1 KV head of 32, MLP 256, sliding window 16, and a
512-piece SentencePiece vocabulary trained on the test texts (tests/tiny_models) with an
embedding of 544 rows, as Gemma 3n has 262,144 pieces and 262,400 rows (the per-layer
embedding has only the pieces' rows, as the real one has 262,144). Gemma 3n's real vocabulary
would make the per-layer table 262,144 x 6,400: the tiny model keeps the small one. Every
width is a multiple of 32, so Q8_0 applies to every matrix.

Real Gemma 3n checkpoints carry ``k_proj``/``v_proj``/``k_norm`` for the KV-shared layers too
(unused: transformers 5 no longer creates them); llama.cpp and mlx-lm both require them.
``shared_kv_weights=True`` (the default) writes them, as the real files have them; False writes
the checkpoint as transformers 5's ``save_pretrained`` would.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import train_on_ids, train_tokenizer, training_text

SLIDING_WINDOW = 16
N_PIECES = 512          # SentencePiece pieces = rows of the per-layer embedding
N_VOCAB = N_PIECES + 32  # rows of the token embedding (Gemma 3n: 262,144 + 256)
_S, _F = "sliding_attention", "full_attention"
N_LAYERS, N_SHARED = 25, 5

CONFIG = dict(
    vocab_size=N_VOCAB, vocab_size_per_layer_input=N_PIECES, hidden_size=64,
    intermediate_size=[256] * N_LAYERS, num_hidden_layers=N_LAYERS, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=1024, initializer_range=0.05, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    attention_bias=False, sliding_window=SLIDING_WINDOW,
    layer_types=[_F if (i + 1) % 5 == 0 else _S for i in range(N_LAYERS)],
    final_logit_softcapping=30.0, hidden_size_per_layer_input=256, altup_active_idx=0,
    altup_coef_clip=120.0, altup_correct_scale=True, altup_num_inputs=4,
    num_kv_shared_layers=N_SHARED, laurel_rank=64,
    activation_sparsity_pattern=[0.95] * 10 + [0.0] * (N_LAYERS - 10),
)


def chats(n: int = 40) -> list[str]:
    """Short chats in Gemma 3n's prompt format (Gemma 3's turns): trained on, the tiny model
    learns to answer and close its turn with ``<end_of_turn>``, so a chat with it stops as a
    real one does."""
    from gemma_chat import template

    lines = [line.strip() for line in training_text() if 8 < len(line.strip()) < 80]
    out = []
    for i in range(n):
        question, answer = lines[i % len(lines)], lines[(i * 7 + 3) % len(lines)]
        out.append(template.render([{"role": "user", "content": question}]).removeprefix("<bos>")
                   + answer + "<end_of_turn>\n")
    return out


def build_gemma3n(folder: Path, *, seed: int = 0, train_steps: int = 60,
                  shared_kv_weights: bool = True, chats_too: bool = False) -> Path:
    """Write a tiny ``gemma3n_text`` checkpoint into ``folder`` (config.json,
    generation_config.json, model.safetensors in f32, tokenizer.model/tokenizer.json/
    tokenizer_config.json): random weights, then ``train_steps`` steps of training on the test
    texts (and :func:`chats` with ``chats_too``) so its next-token predictions are peaked;
    return ``folder``.

    Parameters that start at values which hide a mistake are spread first: the norms (Gemma 3n
    multiplies by ``w``, initialised to ones), AltUp's ``correct_output_scale`` (zeros, which
    would switch the per-layer inputs off) and its router (near-zero modalities).

    A training step costs ~0.5 s here whatever its size (25 layers of small ops: Python and
    dispatch overhead), so the model is trained for fewer, larger-rate steps than the other
    tiny models (lr 1e-2, 4 windows of 64 tokens): 60 steps take the loss on the test texts
    from 6.36 to ~3.7. Torch runs on one thread: with two threads on a busy 2-core machine a
    step took ~13 s instead of 0.5 (OpenMP threads waiting on each other).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    train_tokenizer(folder, N_PIECES)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)  # tokenizer.json, as a real checkpoint has it
    config = AutoConfig.for_model("gemma3n_text", **CONFIG)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + torch.randn_like(param) * 0.2)
            elif name.endswith("altup.correct_output_scale"):
                param.copy_(0.5 + torch.rand_like(param))
            elif name.endswith("altup.modality_router.weight"):
                param.normal_(0.0, 1.0)
            elif name.endswith(("altup.prediction_coefs.weight", "altup.correction_coefs.weight")):
                param.normal_(0.0, 0.2)
    if train_steps:
        text = "\n".join(training_text())
        if chats_too:
            text += "\n" + "".join(chats() * 3)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_on_ids(model, ids, train_steps, batch=4, lr=1e-2)
        finally:
            torch.set_num_threads(threads)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied, as save_pretrained leaves it out
    if shared_kv_weights:
        generator = torch.Generator().manual_seed(seed + 1)
        kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
        for i in range(N_LAYERS - N_SHARED, N_LAYERS):
            p = f"model.layers.{i}.self_attn."
            state[p + "k_proj.weight"] = torch.randn(kv, CONFIG["hidden_size"],
                                                     generator=generator) * 0.05
            state[p + "v_proj.weight"] = torch.randn(kv, CONFIG["hidden_size"],
                                                     generator=generator) * 0.05
            state[p + "k_norm.weight"] = 1.0 + torch.randn(CONFIG["head_dim"],
                                                           generator=generator) * 0.2
    _save(folder, config, state)
    return folder


def _save(folder: Path, config, state: dict) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config.architectures = ["Gemma3nForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["dtype"] = "float32"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def as_multimodal(folder: Path, dst: Path, *, drop_shared_kv: bool = False) -> Path:
    """The checkpoint in ``folder`` laid out as a multimodal ``gemma3n`` one
    (``Gemma3nForConditionalGeneration``): config with ``text_config`` (and, as transformers
    4.5x wrote it, ``rope_theta`` / ``rope_local_base_freq``), text weights under
    ``model.language_model.*``, tokenizer files copied, and one stand-in
    ``model.embed_vision`` tensor that converters must skip (no real towers).
    ``drop_shared_kv``: leave out the KV-shared layers' K/V, as transformers 5 saves them."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder, dst = Path(folder), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
    text = json.loads((folder / "config.json").read_text())
    text.pop("architectures", None)
    rope = text.get("rope_parameters") or {}
    text["rope_theta"] = rope.get(_F, {}).get("rope_theta", 1_000_000.0)
    text["rope_local_base_freq"] = rope.get(_S, {}).get("rope_theta", 10_000.0)
    config = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
              "text_config": text, "tie_word_embeddings": True, "dtype": "float32",
              "eos_token_id": text.get("eos_token_id", 1),
              "pad_token_id": text.get("pad_token_id", 0),
              "bos_token_id": text.get("bos_token_id", 2)}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shared = {f"model.layers.{i}.self_attn.{k}" for i in range(N_LAYERS - N_SHARED, N_LAYERS)
              for k in ("k_proj.weight", "v_proj.weight", "k_norm.weight")}
    state = {"model.language_model." + name.removeprefix("model."): value
             for name, value in load_file(str(folder / "model.safetensors")).items()
             if not (drop_shared_kv and name in shared)}
    state["model.embed_vision.embedding.weight"] = np.zeros((8, 32), dtype=np.float32)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
