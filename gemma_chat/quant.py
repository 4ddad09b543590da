"""The one quantization vocabulary that every command uses.

=========  ==========================================  =================================
name       GGUF (llama.cpp)                            MLX
=========  ==========================================  =================================
q4         Q4_K_M (Google's QAT Q4_0 when pulling)     4-bit, group size 64
q5         Q5_K_M                                      5-bit, group size 64
q8         Q8_0                                        8-bit, group size 64
f16        F16                                         float16
bf16       BF16                                        bfloat16
f32        F32                                         float32
=========  ==========================================  =================================

llama.cpp's own type names (``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q8_0``) are accepted
for GGUF as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument


@dataclass(frozen=True)
class Quant:
    """One entry of the vocabulary: what a name means for each backend."""

    name: str
    gguf: str  # llama.cpp type name, lower case (q4_k_m, q8_0, f16, ...)
    mlx_bits: int | None  # None: not quantized on MLX
    mlx_dtype: str | None  # float16 / bfloat16 / float32 when not quantized
    description: str
    mlx_group_size: int = 64


QUANTS: dict[str, Quant] = {
    q.name: q
    for q in [
        Quant("q4", "q4_k_m", 4, None,
              "4-bit: Q4_K_M GGUF (Google's QAT Q4_0 when pulled), MLX 4-bit"),
        Quant("q5", "q5_k_m", 5, None, "5-bit: Q5_K_M GGUF, MLX 5-bit"),
        Quant("q8", "q8_0", 8, None, "8-bit: Q8_0 GGUF, MLX 8-bit"),
        Quant("f16", "f16", None, "float16", "16-bit float, unquantized"),
        Quant("bf16", "bf16", None, "bfloat16", "bfloat16, unquantized"),
        Quant("f32", "f32", None, "float32", "32-bit float, unquantized"),
    ]
}

#: llama.cpp type names accepted for GGUF, each mapped to its vocabulary name where one fits.
GGUF_TYPES: dict[str, str | None] = {
    "q4_0": None,
    "q4_k_m": "q4",
    "q5_k_m": "q5",
    "q6_k": None,
    "q8_0": "q8",
    "f16": "f16",
    "bf16": "bf16",
    "f32": "f32",
}

#: When a catalogue entry offers several GGUF files, the order in which ``q4`` picks one.
Q4_GGUF_PREFERENCE = ("q4_0", "q4_k_m")  # Google's QAT Q4_0 first

#: MLX repository quantization keys in the catalogue, by vocabulary name.
MLX_KEYS = {"q4": "4bit", "q5": "5bit", "q8": "8bit", "f16": "f16", "bf16": "bf16", "f32": "f32"}


def parse(name: str, backend: str = "gguf") -> str:
    """Normalize a ``--quant`` value; return a vocabulary name or a llama.cpp type name.

    ``backend`` is ``"gguf"`` or ``"mlx"``. Raises :class:`InvalidArgument` for an unknown name
    or a llama.cpp-only type asked of MLX.
    """
    key = name.strip().lower().replace("-", "_")
    if key in QUANTS:
        return key
    if key in GGUF_TYPES:
        if backend == "gguf":
            return key
        mapped = GGUF_TYPES[key]
        if mapped is None:
            raise InvalidArgument(
                f"--quant {name} is a GGUF type; for MLX use q4, q5, q8, f16 or bf16")
        return mapped
    known = ", ".join([*QUANTS, *(k for k in GGUF_TYPES if k not in QUANTS)])
    raise InvalidArgument(f"unknown quantization {name!r}; use one of: {known}")


def gguf_type(name: str) -> str:
    """The llama.cpp type a ``--quant`` value means for GGUF (``q4`` -> ``q4_k_m``)."""
    key = parse(name, "gguf")
    return QUANTS[key].gguf if key in QUANTS else key


def gguf_candidates(name: str) -> tuple[str, ...]:
    """The catalogue GGUF keys for ``--quant name``, best first (``q4``: QAT Q4_0 first)."""
    key = parse(name, "gguf")
    if key == "q4":
        return Q4_GGUF_PREFERENCE
    return (gguf_type(key),)
