"""Tiny random-weight Gemma checkpoints, built with transformers, and a real SentencePiece
tokenizer trained on the test texts: the real config shapes scaled down, every width a multiple
of 256 so llama.cpp's K-quants apply.

    folder = build_checkpoint("gemma2", tmp_path / "tiny-gemma2")
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
VOCAB = 512
SLIDING_WINDOW = 32

#: The real architectures, scaled down: Gemma 1 (MQA), Gemma 2 (GQA, alternating sliding
#: window, soft-capping), Gemma 3 (5 sliding layers then 1 global, QK norms). Weights are stored
#: in f32, f16 and bf16 to cover each reading path.
SHAPES = {
    "gemma": dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  hidden_activation="gelu_pytorch_tanh", dtype="float32"),
    "gemma2": dict(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                   sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, dtype="float16"),
    "gemma3_text": dict(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                        sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=256,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        dtype="bfloat16"),
}


def training_text() -> list[str]:
    lines = []
    for name in ("public_domain.txt", "english.txt"):
        lines += [line for line in (DATA / name).read_text().splitlines() if line.strip()]
    lines += ["def f(x):\n    return x * 2", "    indented    words   and\ttabs", "1234 5678 90"]
    return lines


def train_tokenizer(folder: Path, vocab_size: int = VOCAB, extra_symbols: tuple = (),
                    extra_text: tuple = ()) -> None:
    """A SentencePiece BPE model with Gemma's special pieces and ids (pad 0, eos 1, bos 2,
    unk 3, then <mask>, <start_of_turn>, <end_of_turn>, then ``extra_symbols``), byte
    fallback, no dummy prefix, plus the small tokenizer_config.json transformers needs to load
    it as Gemma's tokenizer."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text() + list(extra_text)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>", *extra_symbols],
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
        "add_eos_token": False, "model_max_length": 1024,
    }))


def build_checkpoint(model_type: str, folder: Path, seed: int = 0, train_steps: int = 150) -> Path:
    """Write a tiny ``model_type`` checkpoint (safetensors, config, tokenizer): random weights,
    then ``train_steps`` steps of training on the test texts.

    A random network's next-token logits are near-ties (or, through the tied embedding, a copy
    of the input token), so any rounding flips its top-1 and agreement figures mean little. A
    few steps of training give peaked, context-dependent predictions like a real model's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    train_tokenizer(folder)
    shape = dict(SHAPES[model_type])
    dtype = getattr(torch, shape.pop("dtype"))
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=256, intermediate_size=512, head_dim=256,
        max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's (1 + w): make w matter
                param.copy_(torch.randn_like(param) * 0.2)
    if train_steps:
        _train(model, AutoTokenizer.from_pretrained(folder), train_steps)
    model.to(dtype).save_pretrained(folder)
    # transformers converts the SentencePiece model into tokenizer.json (the fast tokenizer).
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def _train(model, tokenizer, steps: int, window: int = 64, batch: int = 8) -> None:
    import torch

    text = "\n".join(training_text())
    train_on_ids(model, torch.tensor(tokenizer(text, add_special_tokens=False).input_ids),
                 steps, window, batch)


def train_on_ids(model, ids, steps: int, window: int = 64, batch: int = 8,
                 lr: float = 3e-3) -> None:
    """AdamW on ``batch`` random windows of ``ids`` a step, then eval mode."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window, (batch,))
        x = torch.stack([ids[s:s + window] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def reference_logits(folder: Path, ids: list[int]):
    """transformers' logits at every position, eager attention, float32: (len(ids), vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0].float().numpy()
