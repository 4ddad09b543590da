"""Check a GGUF file before llama.cpp opens it, and read what we need from its header.

llama.cpp aborts the whole process on some malformed files, so every GGUF is checked here first:
the magic, the header, the metadata, the tensor table, and that the file is long enough to hold
every tensor it declares (a truncated download is the common case). gguf's ``GGUFReader`` does
all this too, but it builds a numpy view per vocabulary entry (tens of seconds on Gemma's 262k
tokens); this reader walks the header once and keeps scalars only, using gguf's own constants.
"""

from __future__ import annotations

import mmap
import os
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


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check a GGUF header; raise :class:`InvalidModelFile` when it is not sound."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelFile(f"{path} does not exist")
    if path.is_dir():
        raise InvalidModelFile(f"{path} is a folder, not a GGUF file")
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
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))

    n_params = 0
    end = 0
    types: dict[str, int] = {}
    for _ in range(n_tensors):
        cur.string()  # tensor name
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise InvalidModelFile(f"{path} is a corrupt GGUF file (a tensor with {n_dims} dims)")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        ggml_type = GGMLQuantizationType(cur.unpack("<I"))
        offset = cur.unpack("<Q")
        elements = 1
        for d in dims:
            elements *= d
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        end = max(end, offset + elements // block * type_size)
        n_params += elements
        types[ggml_type.name] = types.get(ggml_type.name, 0) + 1

    alignment = int(metadata.get("general.alignment", 32) or 32)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if data_start + end > size:
        missing = data_start + end - size
        raise InvalidModelFile(
            f"{path} is truncated: {size:,} bytes, {missing:,} short of the tensors it declares"
            " (an interrupted download?)"
        )
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise InvalidModelFile(f"{path} has no general.architecture in its metadata")
    return GGUFInfo(path, architecture, metadata, n_tensors, n_params, size, types)


def check_gemma(info: GGUFInfo) -> GGUFInfo:
    """Refuse a GGUF whose architecture is not a Gemma one we run."""
    if info.architecture not in GEMMA_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{info.path.name} is a {info.architecture!r} model, not Gemma "
            f"(supported architectures: {', '.join(GEMMA_ARCHITECTURES)})"
        )
    return info
