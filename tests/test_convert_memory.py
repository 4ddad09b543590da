"""Converting reads safetensors lazily: on a synthetic checkpoint with the real Gemma 2 2B tensor
shapes (4 of its 26 layers, random bf16 weights), the peak memory growth of `gemma convert`'s
GGUF writer stays below twice the largest tensor's float32 size (the 256000 x 2304 embedding:
2.36 GB), and so does llama.cpp's quantizer after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from tiny_models import train_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


SHAPE = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=256)
LARGEST_F32 = 256000 * 2304 * 4


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    h, f, q, kv = 2304, 9216, 8 * 256, 4 * 256
    shapes = {"model.embed_tokens.weight": (256000, h), "model.norm.weight": (h,)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)}
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
    return shapes


def write_bf16_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file of random bf16 tensors, streamed tensor by tensor (the writer of the
    safetensors package needs them all in memory at once)."""
    from gemma_chat.convert.checkpoint import f32_to_bf16

    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset,
                                                                              offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for shape in shapes.values():
            n = int(np.prod(shape))
            for start in range(0, n, 1 << 24):
                block = rng.standard_normal(min(1 << 24, n - start), dtype=np.float32) * 0.02
                fh.write(f32_to_bf16(block).tobytes())


MEASURE = """
import sys, time
from pathlib import Path
import numpy, gguf, llama_cpp
from gemma_chat.convert import Checkpoint, quantize_gguf, write_gguf
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss(); t = time.perf_counter()
src, dst, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if what == "write":
    write_gguf(Checkpoint.open(src), dst, "bf16")
else:
    quantize_gguf(src, dst, "q4_k_m", threads=2)
# VmHWM: this process's peak RSS. (Not ru_maxrss: Linux carries it over from the parent's
# memory across fork and exec, so a child of a big pytest process would report the parent's.)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(base, hwm, time.perf_counter() - t)
"""


def measure(*args: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    base, peak, seconds = out.stdout.split()
    return int(peak) - int(base), float(seconds)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_peak_memory_stays_below_twice_the_largest_tensor(tmp_path):
    ckpt = tmp_path / "gemma-2-2b-shapes"
    train_tokenizer(ckpt)
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "gemma2", **SHAPE, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0}))
    write_bf16_safetensors(ckpt / "model.safetensors", tensor_shapes())
    size = (ckpt / "model.safetensors").stat().st_size
    full, quantized = tmp_path / "bf16.gguf", tmp_path / "q4_k_m.gguf"
    write_growth, write_s = measure(str(ckpt), str(full), "write")
    quant_growth, quant_s = measure(str(full), str(quantized), "quantize")
    for stage, growth, seconds in (("GGUF writer", write_growth, write_s),
                                   ("llama.cpp quantizer", quant_growth, quant_s)):
        print(f"{stage}: checkpoint {size / 1e9:.2f} GB, peak RSS growth {growth / 1e9:.2f} GB "
              f"= {growth / LARGEST_F32:.2f} x the largest tensor's f32 size "
              f"({LARGEST_F32 / 1e9:.2f} GB), {seconds:.0f} s")
    assert full.stat().st_size > size * 0.99
    assert write_growth < 2 * LARGEST_F32
    assert quant_growth < 2 * LARGEST_F32
