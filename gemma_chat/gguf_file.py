"""Check a GGUF file before llama.cpp opens it, and read what we need from its header.

llama.cpp aborts the whole process on some malformed files, so every GGUF is checked here first:
the magic, the header, the metadata, the tensor table, and that the file is long enough to hold
every tensor it declares (a truncated download is the common case). gguf's ``GGUFReader`` does
all this too, but it builds a numpy view per vocabulary entry (tens of seconds on Gemma's 262k
tokens); this reader walks the header once and keeps scalars only, using gguf's own constants.

:func:`check_gemma` then checks the values llama.cpp asserts on for the architectures we load
(layer and head counts, epsilons, the vocabulary, special ids): a well-formed file with a bad
value gets a one-line error naming the file and the key, instead of an abort inside llama.cpp.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .errors import InvalidModelFile, UnsupportedArchitecture
from .family import GEMMA

GGUF_MAGIC = b"GGUF"
GEMMA_ARCHITECTURES = tuple(GEMMA)

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass
class GGUFInfo:
    """What a GGUF header says about the model in it."""

    path: Path
    architecture: str
    metadata: dict[str, object]  # scalar values; arrays as their length
    tensor_count: int
    n_params: int
    file_size: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    arrays: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # (type, count, offset)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> dims

    header: bytes | None = None  # set when parsed from bytes (:func:`parse_gguf`)

    def read_array(self, key: str) -> list:
        """The values of a metadata array (read from the file on demand)."""
        item_type, count, offset = self.arrays[key]
        if self.header is not None:
            return _read_array(self.header, self.path, item_type, count, offset)
        with open(self.path, "rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_array(buf, self.path, item_type, count, offset)

    def get(self, key: str, default: object = None) -> object:
        """An architecture key without its prefix (``context_length``) or a full key."""
        if key in self.metadata:
            return self.metadata[key]
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def context_length(self) -> int | None:
        value = self.get("context_length")
        return int(value) if value is not None else None

    @property
    def quantization(self) -> str:
        """The file type in llama.cpp's words (``Q4_K_M``), or the dominant tensor type."""
        ftype = self.metadata.get("general.file_type")
        if isinstance(ftype, int):
            try:
                name = LlamaFileType(ftype).name
                return name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")
            except ValueError:
                pass
        if self.tensor_types:
            return max(self.tensor_types, key=self.tensor_types.__getitem__)
        return "unknown"

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in self.metadata

    def looks_instruction_tuned(self) -> bool:
        """A guess for files outside the catalogue: a chat template or an ``-it`` name."""
        if self.has_chat_template:
            return True
        label = " ".join(
            str(self.metadata.get(k, "")) for k in ("general.name", "general.finetune")
        ).lower() + " " + self.path.name.lower()
        return any(tag in label for tag in ("-it", " it", "_it", "instruct"))


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise InvalidModelFile(f"{self.path} is truncated (its GGUF header is incomplete)")

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        buf, pos, size = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
        self.pos = pos
        self.need(0)
        if pos > size:
            raise InvalidModelFile(f"{self.path} is truncated (its GGUF header is incomplete)")

    def value(self, vtype: int):
        vtype = GGUFValueType(vtype)
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if item_type == GGUFValueType.STRING:
                self.skip_strings(count)
            elif item_type in _SCALARS:
                n = count * struct.calcsize(_SCALARS[item_type])
                self.need(n)
                self.pos += n
            else:
                raise InvalidModelFile(f"{self.path} has nested arrays in its metadata")
            return count
        raise InvalidModelFile(f"{self.path} has an unknown metadata type {vtype}")


def _read_array(buf, path: Path, item_type: int, count: int, offset: int) -> list:
    cur = _Cursor(buf, path)
    cur.pos = offset
    try:
        if item_type == GGUFValueType.STRING:
            return [cur.string() for _ in range(count)]
        fmt = _SCALARS[GGUFValueType(item_type)]
    except (KeyError, ValueError):
        raise InvalidModelFile(f"{path} has an array of unknown type {item_type}") from None
    cur.need(count * struct.calcsize(fmt))
    return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, cur.pos))


def parse_gguf(header: bytes, name: str, file_size: int) -> GGUFInfo:
    """A GGUF header held in memory (at least the metadata and tensor table) of a file of
    ``file_size`` bytes: what :func:`read_gguf` does, without the file (for fuzzing)."""
    path = Path(name)
    if header[:4] != GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        info = _parse(header, path, file_size)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidModelFile(f"{path} is a corrupt GGUF file ({exc})") from None
    info.header = header
    return info


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check a GGUF header; raise :class:`InvalidModelFile` when it is not sound."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelFile(f"{path} does not exist")
    if path.is_dir():
        raise InvalidModelFile(f"{path} is a folder, not a GGUF file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise InvalidModelFile(f"{path} is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise InvalidModelFile(f"{path} is not a GGUF file (no GGUF magic at its start)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(buf, path, size)
            except (ValueError, struct.error, UnicodeDecodeError) as exc:
                raise InvalidModelFile(f"{path} is a corrupt GGUF file ({exc})") from None


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFInfo:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise InvalidModelFile(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise InvalidModelFile(f"{path} is a corrupt GGUF file (implausible header counts)")
    metadata: dict[str, object] = {}
    arrays: dict[str, tuple[int, int, int]] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        start = cur.pos
        metadata[key] = cur.value(vtype)
        if vtype == GGUFValueType.ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, start)
            arrays[key] = (item_type, count, start + 12)

    n_params = 0
    end = 0
    types: dict[str, int] = {}
    tensors: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise InvalidModelFile(f"{path} is a corrupt GGUF file (a tensor with {n_dims} dims)")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        tensors[name] = tuple(dims)
        ggml_type = GGMLQuantizationType(cur.unpack("<I"))
        offset = cur.unpack("<Q")
        elements = 1
        for d in dims:
            elements *= d
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        end = max(end, offset + elements // block * type_size)
        n_params += elements
        types[ggml_type.name] = types.get(ggml_type.name, 0) + 1

    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) \
            or not 32 <= alignment <= 1 << 20 or alignment & (alignment - 1):
        raise InvalidModelFile(f"{path}: general.alignment = {alignment!r} is not a power of two "
                               "from 32 to 1 MiB")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if n_tensors and data_start + end > size:  # (a vocabulary-only file has no data part)
        missing = data_start + end - size
        raise InvalidModelFile(
            f"{path} is truncated: {size:,} bytes, {missing:,} short of the tensors it declares"
            " (an interrupted download?)"
        )
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise InvalidModelFile(f"{path} has no general.architecture in its metadata")
    return GGUFInfo(path, architecture, metadata, n_tensors, n_params, size, types, arrays,
                    tensors)


def check_gemma(info: GGUFInfo) -> GGUFInfo:
    """Refuse a GGUF whose architecture is not a Gemma one we run."""
    if info.architecture not in GEMMA_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{info.path.name} is a {info.architecture!r} model, not Gemma "
            f"(supported architectures: {', '.join(GEMMA_ARCHITECTURES)})"
        )
    check_values(info)
    return info


# -- the values llama.cpp asserts on ---------------------------------------------------------

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _refuse(info: GGUFInfo, key: str, value: object, rule: str) -> InvalidModelFile:
    shown = repr(value) if not isinstance(value, list) else f"[{len(value)} values]"
    return InvalidModelFile(f"{info.path.name}: {key} = {shown[:60]} {rule} (a damaged or "
                            "wrongly written GGUF file)")


def _number(info: GGUFInfo, key: str, lo: float, hi: float, *, integer: bool = True,
            required: bool = True, low_open: bool = False):
    """A scalar key (or each entry of a per-layer array) within [lo, hi]."""
    full = f"{info.architecture}.{key}"
    if full in info.arrays:
        values = info.read_array(full)
    elif full in info.metadata:
        values = [info.metadata[full]]
    elif required:
        raise InvalidModelFile(f"{info.path.name}: {full} is missing (a damaged or wrongly "
                               "written GGUF file)")
    else:
        return None
    for v in values:
        kind_ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not kind_ok or (not integer and not math.isfinite(v)) \
                or not lo <= v <= hi or (low_open and v == lo):
            bound = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
            what = "an integer" if integer else "a finite number"
            raise _refuse(info, full, v, f"is not {what} in {bound}")
    return values if full in info.arrays else values[0]


_checked: set[str] = set()  # files that passed in this process
_CHECKED_FILE = "checked-gguf.json"  # ... and in earlier ones, in GEMMA_HOME
_CHECKED_KEPT = 64


def _file_key(info: GGUFInfo) -> str | None:
    if info.header is not None:  # parsed from memory: nothing on disk to remember it by
        return None
    try:
        stat = info.path.stat()
    except OSError:
        return None
    return f"{info.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _remembered() -> tuple[Path, list[str]]:
    from .store import gemma_home

    path = gemma_home() / _CHECKED_FILE
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        keys = []
    return path, [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def check_values(info: GGUFInfo) -> None:
    """Refuse values llama.cpp would abort or hang on, naming the file and the key. A file
    that passed is remembered by path, size and modification time (reading the vocabulary
    takes 0.3 s on Gemma's 262k tokens)."""
    key = _file_key(info)
    if key is not None and key in _checked:
        return
    record, keys = _remembered() if key is not None else (None, [])
    if key is None or key not in keys:
        _check_values(info)
        if key is not None:
            from .store import atomic_path

            try:
                with atomic_path(record) as tmp:
                    tmp.write_text(json.dumps([*keys, key][-_CHECKED_KEPT:]), encoding="utf-8")
            except OSError:
                pass  # not remembered: checked again next time
    if key is not None:
        _checked.add(key)


def _check_values(info: GGUFInfo) -> None:
    arch = info.architecture
    n_layer = _number(info, "block_count", 1, MAX_LAYERS)
    blocks = {int(m.group(1)) for name in info.tensors if (m := _BLOCK.match(name))}
    if blocks and (max(blocks) >= n_layer or len(blocks) != n_layer):
        raise _refuse(info, f"{arch}.block_count", n_layer,
                      f"does not match the {len(blocks)} layers of tensors in the file")
    _number(info, "context_length", 1, 1 << 24)
    n_embd = _number(info, "embedding_length", 1, 1 << 16)
    _number(info, "feed_forward_length", 1, 1 << 20)
    heads = _number(info, "attention.head_count", 1, 1024)
    _number(info, "attention.head_count_kv", 1, max(heads) if isinstance(heads, list) else heads,
            required=False)
    for key in ("attention.key_length", "attention.value_length"):
        _number(info, key, 1, 1 << 12, required=False)
    _number(info, "attention.layer_norm_rms_epsilon", 0.0, 0.5, integer=False, low_open=True)
    _number(info, "rope.freq_base", 0.0, 1e12, integer=False, required=False, low_open=True)
    _number(info, "rope.scaling.factor", 0.0, 1e6, integer=False, required=False, low_open=True)
    _number(info, "attention.sliding_window", 1, 1 << 24, required=False)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        _number(info, key, 0.0, 1e6, integer=False, required=False)
    if isinstance(heads, list) and len(heads) != n_layer:
        raise _refuse(info, f"{arch}.attention.head_count", heads, f"has not {n_layer} entries")
    _check_vocabulary(info, n_embd)


def _check_vocabulary(info: GGUFInfo, n_embd: int) -> None:
    model = info.metadata.get("tokenizer.ggml.model")
    expected = GEMMA[info.architecture].tokenizer
    if model != expected:
        raise _refuse(info, "tokenizer.ggml.model", model, f"is not the {info.architecture} "
                      f"tokenizer ({expected!r})")
    if expected != "llama" and info.arrays.get("tokenizer.ggml.merges", (None,))[0] \
            != GGUFValueType.STRING:
        raise InvalidModelFile(f"{info.path.name}: tokenizer.ggml.merges is missing or not a "
                               "list of strings (a damaged or wrongly written GGUF file)")
    if info.arrays.get("tokenizer.ggml.tokens", (None,))[0] != GGUFValueType.STRING:
        raise InvalidModelFile(f"{info.path.name}: tokenizer.ggml.tokens is missing or not a "
                               "list of strings (a damaged or wrongly written GGUF file)")
    tokens = info.read_array("tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    embd = info.tensors.get("token_embd.weight")
    if not n_vocab or (embd is not None and (len(embd) != 2 or embd[1] != n_vocab
                                             or embd[0] != n_embd)):
        raise _refuse(info, "tokenizer.ggml.tokens", tokens,
                      f"does not match token_embd.weight {list(embd or ())}")
    if "" in tokens or len(set(tokens)) != n_vocab:
        raise _refuse(info, "tokenizer.ggml.tokens", tokens, "holds empty or repeated tokens")
    if "tokenizer.ggml.token_type" in info.arrays:
        types = info.read_array("tokenizer.ggml.token_type")
        if len(types) != n_vocab or any(not 0 <= t <= 6 for t in types):
            raise _refuse(info, "tokenizer.ggml.token_type", types,
                          f"is not {n_vocab} token types from 0 to 6")
        bad = next((t for t, kind in zip(tokens, types) if kind == 6 and
                    not _BYTE_TOKEN.match(t)), None)
        if bad is not None:
            raise _refuse(info, "tokenizer.ggml.tokens", bad, "is a byte token that is not "
                          "<0xHH>")
    if "tokenizer.ggml.scores" in info.arrays and \
            info.arrays["tokenizer.ggml.scores"][1] != n_vocab:
        raise _refuse(info, "tokenizer.ggml.scores", [], f"has not {n_vocab} entries")
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        full = f"tokenizer.ggml.{key}_token_id"
        value = info.metadata.get(full)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < n_vocab):
            raise _refuse(info, full, value, f"is not a token id below {n_vocab}")
