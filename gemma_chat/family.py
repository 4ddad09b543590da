"""What differs between Gemma generations, in one place: architectures, the config model types
that name them, sliding-window layer patterns, query scaling, the prompt format and tokenizer,
whether the model can think, and the newer Hugging Face config form. The backends, the
converter, the memory estimate, the catalogue and the prompt formats all read it from here.

    arch = architecture_of("gemma3_text")          # "gemma3"
    GEMMA["gemma3"].sliding_window_pattern         # 6: five sliding layers, then one global
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture of the Gemma family."""

    name: str  # llama.cpp's architecture name, as GGUF files declare it
    generation: str  # "1", "2", "3", "3n", "4"
    model_types: tuple[str, ...]  # config.json model types that are this architecture
    mlx_model_type: str  # what mlx-lm calls its text model
    sliding_window_pattern: int  # every Nth layer is global, the others sliding; 0: none
    big_layers: int | None  # the 27B's layer count: its queries are scaled by hidden / heads
    end_of_turn: str  # the control token that ends a turn
    prompt_format: str = "gemma"  # a key of gemma_chat.prompt.FORMATS
    tokenizer: str = "llama"  # GGUF tokenizer.ggml.model: SentencePiece ("llama") or BPE
    thinks: bool = False  # has a thinking mode (off unless asked for)


GEMMA: dict[str, Architecture] = {
    "gemma": Architecture("gemma", "1", ("gemma",), "gemma", 0, None, "<end_of_turn>"),
    "gemma2": Architecture("gemma2", "2", ("gemma2",), "gemma2", 2, 46, "<end_of_turn>"),
    "gemma3": Architecture("gemma3", "3", ("gemma3", "gemma3_text"), "gemma3_text", 6, 62,
                           "<end_of_turn>"),
    # Gemma 3n: Gemma 3's prompt format and vocabulary; per-layer embeddings, AltUp, KV sharing.
    "gemma3n": Architecture("gemma3n", "3n", ("gemma3n", "gemma3n_text"), "gemma3n", 5, None,
                            "<end_of_turn>"),
    # Gemma 4: native system turn, thinking, a BPE vocabulary with other control tokens. Its
    # sliding-window pattern differs between sizes: the model file lists it per layer.
    "gemma4": Architecture("gemma4", "4", ("gemma4", "gemma4_text", "gemma4_unified",
                                           "gemma4_unified_text"), "gemma4_text", 6, None,
                           "<turn|>", prompt_format="gemma4", tokenizer="gemma4", thinks=True),
}

#: config.json ``model_type`` -> architecture name.
MODEL_TYPES: dict[str, str] = {t: a.name for a in GEMMA.values() for t in a.model_types}


def architecture_of(model_type: str | None) -> str | None:
    """The architecture a config.json ``model_type`` names, or None when it is not Gemma."""
    return MODEL_TYPES.get(model_type or "")


def supported_model_types() -> str:
    return ", ".join(MODEL_TYPES)


def query_pre_attn_scalar(arch: str, layers: int, hidden: int, heads: int,
                          head_dim: int) -> int:
    """What queries are scaled by (1/sqrt of it): hidden/heads for the 27B models, which
    llama.cpp recognizes by their layer count, else head_dim. GGUF files have no key for it."""
    big = GEMMA[arch].big_layers
    return hidden // heads if big is not None and layers == big else head_dim


def layer_kinds(arch: str, layers: int, pattern: int | None = None) -> tuple[int, int]:
    """(global layers, sliding-window layers); every layer is global in an architecture
    this module does not know."""
    if pattern is None:
        pattern = GEMMA[arch].sliding_window_pattern if arch in GEMMA else 0
    if not pattern:
        return layers, 0
    n_global = layers // pattern
    return n_global, layers - n_global


def layer_types(arch: str, layers: int) -> list[str]:
    """transformers' ``layer_types`` for the standard pattern."""
    pattern = GEMMA[arch].sliding_window_pattern
    return ["full_attention" if not pattern or (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)]


def legacy_config_keys(config: dict) -> dict:
    """The newer Hugging Face config form (transformers 5: ``rope_parameters``,
    ``layer_types``) as the older keys that mlx-lm and our converter read (``rope_theta``,
    ``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``). Returns only the
    keys to add; keys the config already has are left alone."""
    out: dict = {}
    if MODEL_TYPES.get(config.get("model_type") or "") == "gemma4":
        return _gemma4_global_keys(config)  # mlx-lm's Gemma 4 reads rope_parameters itself
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        full = rope.get("full_attention", rope)
        sliding = rope.get("sliding_attention", {})
        if isinstance(full, dict):
            if "rope_theta" in full and "rope_theta" not in config:
                out["rope_theta"] = full["rope_theta"]
            if full.get("rope_type", "default") != "default" and "rope_scaling" not in config:
                out["rope_scaling"] = full
        if isinstance(sliding, dict) and "rope_theta" in sliding \
                and "rope_local_base_freq" not in config:
            out["rope_local_base_freq"] = sliding["rope_theta"]
    types = config.get("layer_types")
    if isinstance(types, list) and "full_attention" in types \
            and "sliding_window_pattern" not in config:
        out["sliding_window_pattern"] = types.index("full_attention") + 1
    return out


def _gemma4_global_keys(config: dict) -> dict:
    """Gemma 4: transformers keeps the global layers' head size and KV heads only per layer
    (``per_layer_config``); mlx-lm reads them as global_head_dim / num_global_key_value_heads."""
    out: dict = {}
    types = config.get("layer_types")
    per_layer = config.get("per_layer_config")
    if isinstance(per_layer, dict) and isinstance(types, list) and "full_attention" in types:
        first_global = per_layer.get(str(types.index("full_attention")))
        if isinstance(first_global, dict):
            for theirs, ours in (("head_dim", "global_head_dim"),
                                 ("num_key_value_heads", "num_global_key_value_heads")):
                if theirs in first_global and ours not in config:
                    out[ours] = first_global[theirs]
    return out
