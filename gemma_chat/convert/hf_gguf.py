"""A Hugging Face Gemma checkpoint to an unquantized GGUF (F32, F16 or BF16), as llama.cpp reads it.

    write_gguf(Checkpoint.open(folder), Path("model-f16.gguf"), "f16")

Written with gguf-py's ``GGUFWriter`` and ``TensorNameMap``: the header, metadata and tensor
table first, then one tensor at a time, each read from its memory map and converted in row
blocks, so memory holds about one tensor, not the model. What llama.cpp expects of Gemma:

- RMSNorm: Gemma scales by ``(1 + w)`` and Hugging Face stores ``w``; llama.cpp multiplies by
  the stored weight, so every ``*norm.weight`` is written as ``w + 1`` (in F32).
- The output projection is the token embedding (tied): no ``lm_head`` is written.
- The tokenizer is the SentencePiece model's pieces, scores and types, with the added tokens of
  ``tokenizer_config.json`` marked CONTROL or USER_DEFINED (user-defined whitespace runs written
  as real spaces, as llama.cpp matches them), no space prefix, and the special ids.
- llama.cpp fixes some hyperparameters per architecture instead of reading them (Gemma 3's 5:1
  sliding-window pattern and local RoPE base, the query scaling); a checkpoint that differs is
  refused rather than converted into a model that computes something else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import store
from ..errors import InvalidModelFile, UnsupportedArchitecture, missing_extra
from ..family import GEMMA, layer_types, query_pre_attn_scalar
from .checkpoint import Checkpoint

Progress = Callable[..., object]  # (stage, done, total, detail="")

OUT_TYPES = ("f32", "f16", "bf16")

# SentencePiece token types, as llama.cpp numbers them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def write_gguf(ckpt: Checkpoint, dst: Path, out_type: str = "f16", *, name: str | None = None,
               progress: Progress = lambda *a: None) -> Path:
    """Write ``ckpt`` as a GGUF at ``dst`` (atomically); return ``dst``."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {OUT_TYPES}")
    check_llama_cpp_compatible(ckpt)
    progress("reading the tokenizer", 0, None)
    tokens, scores, types = sentencepiece_vocab(ckpt)
    writer = gguf.GGUFWriter(path=None, arch=ckpt.arch)
    add_metadata(writer, ckpt, out_type, name or ckpt.folder.name)
    add_tokenizer(writer, ckpt, tokens, scores, types)

    plan = tensor_plan(ckpt, out_type, len(tokens))
    total = add_tensor_infos(writer, [(n, shape, dtype) for n, _, shape, dtype, _ in plan])

    def read(tensor, shape, dtype, shift):
        array = Checkpoint.read(tensor, dtype, shift)
        if array.shape != tuple(shape):  # the embedding, cut to the vocabulary
            array = np.ascontiguousarray(array[: shape[0]])
        return array

    return write_file(writer, dst, out_type, total, progress,
                      [(n, lambda t=t, sh=sh, d=d, s=s: read(t, sh, d, s))
                       for n, t, sh, d, s in plan])


def add_tensor_infos(writer, specs) -> int:
    """Declare each (name, shape, numpy dtype) tensor in the writer's table (uint16 meaning
    bf16); return their total size in bytes."""
    import gguf

    total = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = gguf.GGMLQuantizationType.BF16 if dtype == np.uint16 else None
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        total += nbytes
    return total


def write_file(writer, dst: Path, out_type: str, total: int, progress: Progress,
               tensors) -> Path:
    """Write the writer's header, metadata and tensor table, then each tensor's data, to
    ``dst`` atomically; ``tensors`` is [(name, a function giving an object with ``nbytes``
    and ``tofile``)] in table order, each made only when it is written."""
    with store.atomic_path(Path(dst)) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done, stage = 0, f"writing {out_type.upper()} GGUF"
        try:
            for name, make in tensors:
                progress(stage, done, total, name)
                data = make()
                writer.write_tensor_data(data)
                done += data.nbytes
                del data
            progress(stage, total, total, "")
        finally:
            writer.close()
    return Path(dst)


def check_llama_cpp_compatible(ckpt: Checkpoint) -> None:
    """Refuse checkpoints whose hyperparameters llama.cpp would silently replace by its own."""
    hp, arch = ckpt.hparams, ckpt.arch
    layers, hidden, heads = hp["num_hidden_layers"], hp["hidden_size"], hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hidden // heads

    def refuse(what: str) -> None:
        raise UnsupportedArchitecture(
            f"{ckpt.folder.name}: {what}; llama.cpp's {arch} cannot represent that")

    if arch in ("gemma2", "gemma3"):
        # llama.cpp derives the query scaling from the layer count; a config that says
        # otherwise cannot be represented.
        expected = query_pre_attn_scalar(arch, layers, hidden, heads, head_dim)
        if float(hp.get("query_pre_attn_scalar", expected)) != float(expected):
            refuse(f"query_pre_attn_scalar is {hp['query_pre_attn_scalar']}, not {expected}")
    pattern = GEMMA[arch].sliding_window_pattern
    if arch in ("gemma2", "gemma3"):
        want = layer_types(arch, layers)
        types = hp.get("layer_types")
        if arch == "gemma3" and hp.get("sliding_window_pattern", 6) != 6 and not types:
            refuse(f"sliding_window_pattern is {hp['sliding_window_pattern']}, not 6")
        if types is not None and list(types) != want:
            refuse("its sliding-window layers are not the standard pattern "
                   f"({pattern - 1} sliding, then 1 global)")
    if arch == "gemma3":
        if hp.get("attn_logit_softcapping"):
            refuse("attention logit soft-capping is set")
        if float(hp.get("rope_local_base_freq", 10000.0)) != 10000.0:
            refuse(f"rope_local_base_freq is {hp['rope_local_base_freq']}, not 10000")
    scaling = hp.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "default"):
        refuse(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r}")


def add_metadata(writer, ckpt: Checkpoint, out_type: str, name: str) -> None:
    """The architecture keys llama.cpp reads for gemma, gemma2 and gemma3."""
    import gguf

    hp = ckpt.hparams
    heads = hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hp["hidden_size"] // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(hp.get("max_position_embeddings", 8192)))
    writer.add_embedding_length(int(hp["hidden_size"]))
    writer.add_block_count(int(hp["num_hidden_layers"]))
    writer.add_feed_forward_length(int(hp["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(hp.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    if ckpt.arch in ("gemma", "gemma2") or "rope_theta" in hp:
        writer.add_rope_freq_base(float(hp.get("rope_theta", 10000.0)))
    if ckpt.arch == "gemma2":
        writer.add_attn_logit_softcapping(float(hp["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    if ckpt.arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(int(hp["sliding_window"]))
    if ckpt.arch == "gemma3" and hp.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    scaling = hp.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])


def sentencepiece_vocab(ckpt: Checkpoint) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types from ``tokenizer.model`` and the added tokens of
    ``tokenizer_config.json``; padded with ``[PADn]`` to the config's vocabulary size."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise missing_extra("sentencepiece", "convert") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(ckpt.sentencepiece_model))
    except (OSError, RuntimeError) as exc:
        raise InvalidModelFile(f"{ckpt.folder.name}/tokenizer.model does not load ({exc})") \
            from None
    size = int(ckpt.hparams.get("vocab_size") or sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    for i in range(min(size, sp.vocab_size())):
        kind = NORMAL
        if sp.IsUnknown(i):
            kind = UNKNOWN
        elif sp.IsControl(i):
            kind = CONTROL
        elif sp.IsUnused(i):
            kind = UNUSED
        elif sp.IsByte(i):
            kind = BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    for i, data in sorted(_added_tokens(ckpt).items()):
        text = data["content"]
        if i >= size:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp matches these as plain spaces
            types[i] = USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    return tokens, scores, types


def _added_tokens(ckpt: Checkpoint) -> dict[int, dict]:
    """The added tokens by id: tokenizer.json's ``added_tokens`` (where transformers 5 keeps
    them), then tokenizer_config.json's ``added_tokens_decoder`` (the older place)."""
    added: dict[int, dict] = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = ckpt.folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidModelFile(f"{ckpt.folder.name}/{name} is not valid JSON ({exc})") \
                from None
        if name == "tokenizer.json":
            added.update({int(t["id"]): t for t in data.get("added_tokens") or []})
        else:
            added.update({int(k): v for k, v in (data.get("added_tokens_decoder") or {}).items()})
    return added


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or \
        text in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>",
                 "<end_of_turn>", "<start_of_image>", "<end_of_image>")


def add_tokenizer(writer, ckpt: Checkpoint, tokens, scores, types) -> None:
    import logging

    import gguf

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # its notes are not the user's
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(ckpt.folder, load_merges=False, n_vocab=len(tokens))
    pieces = {t: i for i, t in enumerate(tokens)}
    # Gemma's own ids, where the tokenizer files leave any out.
    for kind, piece in (("bos", b"<bos>"), ("eos", b"<eos>"), ("unk", b"<unk>"),
                        ("pad", b"<pad>")):
        if kind not in special.special_token_ids and piece in pieces:
            special.special_token_ids[kind] = pieces[piece]
    if special.add_special_token.get("bos") is None:
        special.add_special_token["bos"] = True
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)


def tensor_plan(ckpt: Checkpoint, out_type: str, n_vocab: int):
    """[(gguf name, lazy tensor, shape, numpy dtype, shift)] in the order they are written."""
    import gguf

    hp = ckpt.hparams
    arch = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
            "gemma3": gguf.MODEL_ARCH.GEMMA3}[ckpt.arch]
    names = gguf.get_tensor_name_map(arch, int(hp["num_hidden_layers"]))
    dtype2d = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[out_type]
    plan = []
    for hf_name, tensor in ckpt.tensors():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitecture(
                f"{ckpt.folder.name}: unexpected tensor {hf_name} for {ckpt.arch}")
        shape = list(tensor.shape)
        if gguf_name == "token_embd.weight":
            if shape[0] < n_vocab:
                raise InvalidModelFile(f"{ckpt.folder.name}: the embedding has {shape[0]} rows "
                                       f"but the tokenizer {n_vocab} tokens")
            shape[0] = n_vocab  # rows past the tokenizer's vocabulary are never used
        norm = hf_name.endswith("norm.weight")
        dtype = np.float32 if len(shape) == 1 or norm else dtype2d
        plan.append((gguf_name, tensor, shape, dtype, 1.0 if norm else 0.0))
    if not any(p[0] == "token_embd.weight" for p in plan):
        raise InvalidModelFile(f"{ckpt.folder.name} has no model.embed_tokens.weight")
    return plan
