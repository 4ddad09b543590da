"""Tiny Gemma 4 text checkpoints (``gemma4_text``) with the real Gemma 4 vocabulary.

    vocab = Path(".../vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf")
    folder = build_gemma4(tmp_path / "tiny-gemma4", vocab_gguf=vocab)             # dense, E2B-like
    folder = build_gemma4(tmp_path / "tiny-gemma4-moe", vocab_gguf=vocab, moe=True)  # 26B-A4B-like

The tokenizer is Gemma 4's own 262,144-token BPE, rebuilt from the vocabulary-only GGUF that
llama.cpp ships for its tokenizer tests (``models/ggml-vocab-gemma-4.gguf``, with its ``.inp`` /
``.out`` reference tokenizations): :func:`gemma4_tokenizer` writes the ``tokenizer.json`` /
``tokenizer_config.json`` / ``chat_template.jinja`` that ``AutoTokenizer`` loads as Gemma 4's
tokenizer, and :func:`check_tokenizer` checks it against every reference tokenization.

The model is the real layer layout scaled down (see :data:`SHAPES`): sliding-window and full
attention layers with the last one full, separate head sizes and KV-head counts for the full
layers, proportional RoPE on the full layers, per-layer embeddings and KV-shared layers in the
dense one, routed experts beside the dense MLP in the MoE one, final logit soft-capping 30.
Every width is a multiple of 32 so llama.cpp's Q8_0 applies to every matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tiny_models import train_on_ids

from gemma_chat.convert.gguf_mlx4 import EXTRA_SPECIAL_TOKENS

# The repo's test texts: tests/data, beside this file once it is in tests/.
DATA = Path(__file__).resolve().parent / "data"
SLIDING_WINDOW = 16

#: With EXTRA_SPECIAL_TOKENS (Gemma 4's named special tokens, as its tokenizer_config.json
#: declares them) the 24 tokens that transformers reports as special, and that llama.cpp's
#: converter types CONTROL (or USER_DEFINED for the ones a chat parser must see, see
#: gemma4_gguf.VISIBLE_TOKENS).
NAMED_SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                        "pad_token": "<pad>", "mask_token": "<mask>"}

_COMMON = dict(
    vocab_size=262_144, vocab_size_per_layer_input=262_144, hidden_size=64,
    num_hidden_layers=6, head_dim=32, global_head_dim=64, max_position_embeddings=1024,
    sliding_window=SLIDING_WINDOW, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=30.0, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    bos_token_id=2, initializer_range=0.05, attention_bias=False,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1_000_000.0},
    },
)
_S, _F = "sliding_attention", "full_attention"

#: The two tiny shapes. What each keeps of the real model:
#:
#: - dense (gemma-4-E2B/E4B): 2 sliding : 1 full (E2B has 4 : 1; 2 : 1 keeps two full layers
#:   in 6 layers), per-layer embeddings of 32 per layer, the last 3 layers KV-shared (llama.cpp
#:   maps them onto the last two non-shared layers and asserts those are [sliding, full]:
#:   layers 1 and 2 here), the double-wide MLP on the shared layers, separate K and V,
#:   1 KV head on both kinds of layer (E2B: 1).
#: - moe (gemma-4-26B-A4B): 5 sliding : 1 full (the real pattern), no per-layer embeddings, no
#:   KV sharing, 8 experts of width 32 with top-2 routing beside a dense MLP of 64, full layers
#:   with K = V (``attention_k_eq_v``, no v_proj) and fewer KV heads (1) than the sliding
#:   layers (2), as the 26B has 2 against 8.
SHAPES = {
    "dense": dict(
        _COMMON, layer_types=[_S, _S, _F, _S, _S, _F], num_attention_heads=2,
        num_key_value_heads=1, num_global_key_value_heads=1, intermediate_size=128,
        hidden_size_per_layer_input=32, num_kv_shared_layers=3, use_double_wide_mlp=True,
        attention_k_eq_v=False, enable_moe_block=False),
    "moe": dict(
        _COMMON, layer_types=[_S, _S, _S, _S, _S, _F], num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, intermediate_size=64,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
        attention_k_eq_v=True, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_TOKENIZER_FORMAT = 3  # part of the cache key: bump it when _build_tokenizer_files changes


# -- tokenizer ----------------------------------------------------------------------------------

def gemma4_tokenizer(vocab_gguf: Path, folder: Path, *, cache: Path | None = None) -> Path:
    """Write Gemma 4's Hugging Face tokenizer files into ``folder``, built from the vocabulary
    GGUF ``vocab_gguf``; return ``folder``.

    ``tokenizer.json``: a BPE over the GGUF's tokens and merges with byte fallback, the
    normalizer Gemma uses (" " -> "▁", no pre-tokenizer, no dummy prefix), the decoder
    Replace + ByteFallback + Fuse, and the 24 special tokens (types 3 and 4 in the GGUF) as
    special added tokens. ``tokenizer_config.json`` names them as Gemma 4's does
    (``GemmaTokenizer``, bos/eos/unk/pad/mask and ``extra_special_tokens``), and
    ``chat_template.jinja`` is the template the GGUF carries.

    Building takes a few seconds (262,144 tokens, 514,906 merges); the files are kept in
    ``cache`` (default: ``$GEMMA4_TOKENIZER_CACHE`` or the system temp folder), keyed by the
    GGUF's size and modification time, and copied from there on later calls.
    """
    vocab_gguf, folder = Path(vocab_gguf), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stat = vocab_gguf.stat()
    key = hashlib.sha256(f"{vocab_gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
                         f"{_TOKENIZER_FORMAT}".encode()).hexdigest()[:16]
    cache = Path(cache or os.environ.get("GEMMA4_TOKENIZER_CACHE")
                 or Path(tempfile.gettempdir()) / "gemma4-tokenizer-cache") / key
    if not all((cache / name).is_file() for name in TOKENIZER_FILES):
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=_mkdir(cache.parent)))
        try:
            _build_tokenizer_files(vocab_gguf, tmp)
            shutil.rmtree(cache, ignore_errors=True)  # an incomplete one
            try:
                tmp.rename(cache)  # atomic; if a concurrent builder won, its copy is as good
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(cache / name, folder / name)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_tokenizer_files(vocab_gguf: Path, folder: Path) -> None:
    """gemma-chat's own rebuild of Gemma 4's tokenizer from a GGUF (what ``gemma convert``
    uses to import a Gemma 4 GGUF to MLX), checked here against llama.cpp's references."""
    from gemma_chat.convert.gguf_mlx4 import write_gemma4_tokenizer

    write_gemma4_tokenizer(vocab_gguf, folder)


def reference_tokenizations(vocab_gguf: Path) -> list[tuple[str, list[int]]]:
    """The (text, ids) pairs of llama.cpp's ``<vocab>.gguf.inp`` / ``.out`` test files."""
    vocab_gguf = Path(vocab_gguf)
    sep = "\n__ggml_vocab_test__\n"
    texts = vocab_gguf.with_name(vocab_gguf.name + ".inp").read_text(encoding="utf-8").split(sep)
    outs = vocab_gguf.with_name(vocab_gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    if len(outs) == len(texts) + 1 and outs[-1] == "":  # one line per text, each ending "\n"
        outs.pop()
    if len(texts) != len(outs):
        raise ValueError(f"{vocab_gguf.name}: {len(texts)} inputs but {len(outs)} outputs")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def check_tokenizer(folder: Path, vocab_gguf: Path) -> int:
    """Tokenize every reference text of llama.cpp's Gemma 4 vocabulary test with the tokenizer
    in ``folder`` (as ``AutoTokenizer`` loads it, without special tokens) and raise
    AssertionError on the first that differs; return how many were checked. Also checks the
    special tokens' ids, bos/eos/pad, and that decoding gives the text back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    pairs = reference_tokenizations(vocab_gguf)
    for text, want in pairs:
        got = tok(text, add_special_tokens=False).input_ids
        assert got == want, f"{text!r}: {got} != {want}"
        assert tok.decode(got) == text, f"{text!r} decodes to {tok.decode(got)!r}"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok("hi").input_ids[0] == 2, "bos is not added"
    inner = tok("user\nhi", add_special_tokens=False).input_ids
    assert tok("<|turn>user\nhi<turn|>", add_special_tokens=False).input_ids == \
        [105, *inner, 106], "special tokens are not matched whole"
    assert len(tok.all_special_ids) == 24, tok.all_special_ids
    return len(pairs)


# -- model --------------------------------------------------------------------------------------

def thinking_chats(n: int = 40) -> list[str]:
    """Chats in Gemma 4's format as a thinking model writes them: thinking switched on in the
    system turn, then ``<|channel>thought\n...<channel|>`` before each answer. Trained on, a
    tiny model learns to open, fill and close its thought channel, then answer and end its
    turn, so the chat's thinking path runs on a real model."""
    from gemma_chat import template4

    lines = [line.strip() for line in training_text() if 8 < len(line.strip()) < 80]
    chats = []
    for i in range(n):
        question, answer = lines[i % len(lines)], lines[(i * 7 + 3) % len(lines)]
        prompt = template4.render([{"role": "user", "content": question}], thinking=True)
        chats.append(prompt + "<|channel>thought\nThe user asks about " + question.split()[0] +
                     ". I will answer.<channel|>" + answer + "<turn|>\n")
    return chats


def build_gemma4(folder: Path, *, vocab_gguf: Path, moe: bool = False, seed: int = 0,
                 train_steps: int = 150, router_init_std: float | None = 1.0,
                 chats: bool = False) -> Path:
    """Write a tiny ``gemma4_text`` checkpoint into ``folder`` (config.json, safetensors in f32,
    Gemma 4's tokenizer): random weights, then ``train_steps`` steps of training on the test
    texts so its next-token predictions are peaked; return ``folder``.

    ``moe=False`` is the dense shape (per-layer embeddings, KV-shared layers), ``moe=True``
    the mixture-of-experts one; see :data:`SHAPES`. ``chats``: train on
    :func:`thinking_chats` too. ``router_init_std``: the std of the MoE
    router's initial weights; None keeps transformers' (0.05 here), whose near-uniform routing
    leaves top-k choices that differently rounding engines break differently (kept to show
    that). config.json states ``global_head_dim``,
    ``num_global_key_value_heads`` and ``final_logit_softcapping`` explicitly: transformers
    keeps the first two only inside ``per_layer_config``, where mlx-lm and llama.cpp's
    converter do not all look.

    Training over 262,144 output tokens costs about a second a step here (the logits and the
    optimizer over the two embedding tables), so the model is trained on a compact vocabulary
    instead: the ~640 tokens the texts and the special tokens use, renumbered. Their trained
    rows are then put back at their real ids in full-size tables whose other rows keep the
    random initialisation. A build takes 14-19 s on this 2-core VM (~6 s of it importing
    torch and transformers and saving 70-270 MB, ~0.06-0.09 s a training step).
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    gemma4_tokenizer(vocab_gguf, folder)
    shape = dict(SHAPES["moe" if moe else "dense"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # 1/3 of AutoTokenizer's time
    text_ids = tokenizer.encode("\n".join(training_text()), add_special_tokens=False).ids
    if chats:  # thinking chats, several times over, after the plain text
        text_ids += tokenizer.encode("".join(thinking_chats() * 3), add_special_tokens=False).ids
    specials = [tokenizer.token_to_id(t) for t in
                [*NAMED_SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS.values()]]
    # Sorted, so the pad/eos/bos ids 0, 1, 2 keep their numbers in the compact vocabulary.
    used = sorted(set(text_ids) | set(specials))
    assert used[:3] == [0, 1, 2]
    compact = {real: i for i, real in enumerate(used)}
    n_compact = -(-len(used) // 32) * 32

    torch.manual_seed(seed)
    small = AutoConfig.for_model("gemma4_text", **{
        **shape, "vocab_size": n_compact, "vocab_size_per_layer_input": n_compact})
    model = AutoModelForCausalLM.from_config(small, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Gemma 4's norms multiply by w itself (no 1 + w), initialised to ones, as are the
            # router's scales: spread them so a converter that drops or offsets one is caught.
            if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
                param.copy_(1.0 + torch.randn_like(param) * 0.2)
            # The router sees the normed hidden state times 1/sqrt(hidden_size): with the
            # default init (std 0.05) its softmax is near uniform, and the top-k choice is
            # decided by near-ties (probabilities 4e-6 apart) that another summation order
            # flips, so a correct engine disagrees. A decisive router, as a trained one is.
            if name.endswith("router.proj.weight") and router_init_std is not None:
                param.normal_(0.0, router_init_std)
        for layer in model.model.layers:  # a buffer, never trained: make it matter too
            layer.layer_scalar.copy_(0.75 + 0.5 * torch.rand_like(layer.layer_scalar))
    if train_steps:
        train_on_ids(model, torch.tensor([compact[i] for i in text_ids]), train_steps)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding, as save_pretrained leaves it out
    index = torch.tensor(used)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, rows in (("model.embed_tokens.weight", shape["vocab_size"]),
                      ("model.embed_tokens_per_layer.weight", shape["vocab_size_per_layer_input"])):
        if key in state:
            full = torch.randn(rows, state[key].shape[1], generator=generator) \
                * shape["initializer_range"]
            full[0] = 0.0  # the padding row, zero as nn.Embedding(padding_idx=0) keeps it
            full[index] = state[key][: len(used)]
            state[key] = full
    _save(folder, shape, state)
    return folder


def _save(folder: Path, shape: dict, state: dict) -> None:
    """config.json (with the values transformers leaves implicit stated), generation_config.json
    and model.safetensors, as save_pretrained writes them."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.for_model("gemma4_text", **shape)
    config.architectures = ["Gemma4ForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key in ("global_head_dim", "num_global_key_value_heads", "final_logit_softcapping"):
        data[key] = shape[key]
    data["dtype"] = "float32"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def training_text() -> list[str]:
    lines = []
    for name in ("public_domain.txt", "english.txt"):
        lines += [line for line in (DATA / name).read_text().splitlines() if line.strip()]
    lines += ["def f(x):\n    return x * 2", "    indented    words   and\ttabs", "1234 5678 90"]
    return lines


def reference_logits(folder: Path, ids: list[int]):
    """transformers' logits at every position, eager attention, float32: (len(ids), vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()
