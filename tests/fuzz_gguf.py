"""A seeded fuzz campaign against the GGUF checks: well-formed-looking files with bad values,
and broken structure, built from the tiny Gemma 3 GGUF of ``tiny_gguf``.

    python tests/fuzz_gguf.py --seed 1 --mutants 10000 --cli 300

In-process, each mutant's header goes through ``parse_gguf`` + ``check_gemma``: it must be
accepted or refused with a gemma-chat error, never another exception. Through the command line
(``gemma run -m MUTANT``), it must answer or give a one-line error: no signal, no hang, no
traceback, no generic ``error: SomeType:``. Mutations keep every length (values overwritten in
place: scalars with edge values, array items, token bytes) or flip header bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_gguf  # noqa: E402

from gemma_chat.errors import GemmaChatError  # noqa: E402
from gemma_chat.gguf_file import check_gemma, parse_gguf  # noqa: E402

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
        11: "<q", 12: "<d"}
_INTS = [0, 1, 2, 3, 7, 8, 255, 256, 511, 512, 513, 1023, 2**15, 2**16, 2**31 - 1, 2**31,
         2**32 - 1, 2**63 - 1, 2**64 - 1]
_FLOATS = [0.0, -0.0, -1.0, 1e-38, 1e-8, 0.5, 1.0, 1e30, 3.4e38, math.nan, math.inf, -math.inf]


@dataclass
class Field:
    key: str
    vtype: int
    offset: int  # of the value (scalars), or of the first item (arrays)
    item_type: int | None = None
    items: list[tuple[int, int]] | None = None  # (offset, length) of each string item


def layout(data: bytes) -> tuple[list[Field], int]:
    """The metadata fields of a GGUF and where the header (tensor table included) ends."""
    pos = 4 + 4
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16
    fields = []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:  # string
            (n,) = struct.unpack_from("<Q", data, pos)
            fields.append(Field(key, vtype, pos, items=[(pos + 8, n)]))
            pos += 8 + n
        elif vtype == 9:  # array
            item_type, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            field = Field(key, vtype, pos, item_type)
            if item_type == 8:
                field.items = []
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", data, pos)
                    field.items.append((pos + 8, n))
                    pos += 8 + n
            else:
                field.items = [(pos + i * struct.calcsize(_FMT[item_type]),
                                struct.calcsize(_FMT[item_type])) for i in range(count)]
                pos += count * struct.calcsize(_FMT[item_type])
            fields.append(field)
        else:
            fields.append(Field(key, vtype, pos))
            pos += struct.calcsize(_FMT[vtype])
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * dims + 4 + 8
    return fields, pos


def _pack(fmt: str, rng: random.Random) -> bytes:
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, rng.choice(_FLOATS + [rng.uniform(-1e6, 1e6)]))
    size = struct.calcsize(fmt)
    value = rng.choice(_INTS + [rng.getrandbits(8 * size)]) % (1 << (8 * size))
    return value.to_bytes(size, "little")


def mutate(base: bytes, fields: list[Field], header_end: int, rng: random.Random) -> tuple[
        bytes, str]:
    """One mutant of ``base`` and a short description of what changed."""
    data = bytearray(base[:header_end])
    kind = rng.choices(["scalar", "array-one", "array-all", "string", "flip"],
                       weights=[4, 2, 1, 2, 1])[0]
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(8, header_end)
            data[at] = rng.randrange(256)
        return bytes(data), "flip"
    field = rng.choice(fields)
    if field.vtype not in (8, 9) and kind in ("scalar", "array-one", "array-all"):
        fmt = _FMT[field.vtype]
        data[field.offset:field.offset + struct.calcsize(fmt)] = _pack(fmt, rng)
        return bytes(data), f"scalar {field.key}"
    if field.vtype == 9 and field.item_type != 8 and kind != "string":
        fmt = _FMT[field.item_type]
        targets = field.items if kind == "array-all" else [rng.choice(field.items)]
        value = _pack(fmt, rng)
        for offset, size in targets:
            data[offset:offset + size] = value
        return bytes(data), f"{kind} {field.key}"
    if field.items:  # a string, or strings of an array: same-length byte changes
        targets = [rng.choice(field.items)] if rng.random() < 0.7 else field.items
        style = rng.choice(["random", "zero", "hex", "copy"])
        first = field.items[0]
        for offset, n in targets:
            if n == 0:
                continue
            if style == "random":
                chunk = bytes(rng.randrange(256) for _ in range(n))
            elif style == "zero":
                chunk = bytes(n)
            elif style == "hex":
                chunk = (b"<0xZZ>" * n)[:n]
            else:  # the first item's bytes, repeated to this length: duplicates
                src = base[first[0]:first[0] + max(first[1], 1)]
                chunk = (src * (n // max(len(src), 1) + 1))[:n]
            data[offset:offset + n] = chunk
        return bytes(data), f"string-{style} {field.key}"
    at = rng.randrange(8, header_end)
    data[at] = rng.randrange(256)
    return bytes(data), "flip"


def in_process(header: bytes, file_size: int, name: str) -> str:
    """accepted, refused, or ``bug: ...`` for anything else."""
    try:
        check_gemma(parse_gguf(header, name, file_size))
        return "accepted"
    except GemmaChatError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - that is what we look for
        return f"bug: {type(exc).__name__}: {exc}"


def through_cli(path: Path, gemma: str, timeout: float = 60) -> str:
    """ran, refused, or ``bug: ...`` (a signal, a hang, a traceback, a generic error)."""
    try:
        proc = subprocess.run([gemma, "run", "-m", str(path), "--raw", "-n", "2", "Hello"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "bug: hang"
    err = proc.stderr.strip().splitlines()
    if proc.returncode < 0:
        return f"bug: signal {-proc.returncode}"
    if proc.returncode == 0:
        return "ran"
    line = err[-1] if err else ""
    if "Traceback" in proc.stderr or len(err) != 1 or not line.startswith("error: "):
        return f"bug: output {line[:120]!r}"
    if line.startswith("error: ") and line.split(":")[1].strip().isidentifier() and \
            line.split(":")[1].strip().endswith(("Error", "Exception")):
        return f"bug: generic {line[:120]!r}"
    return "refused"


def campaign(seed: int, mutants: int, cli: int, gemma: str, folder: Path) -> dict:
    base_path = write_gguf(folder / "base.gguf")
    base = base_path.read_bytes()
    fields, header_end = layout(base)
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    bugs: list[tuple[int, str, str]] = []
    start = time.perf_counter()
    cli_every = max(1, mutants // cli) if cli else 0
    cli_done = 0
    for i in range(mutants):
        header, what = mutate(base, fields, header_end, rng)
        result = in_process(header, len(base), f"mutant-{seed}-{i}.gguf")
        outcomes[f"in-process {result.split(':')[0]}"] += 1
        if result.startswith("bug"):
            bugs.append((i, what, result))
        if cli_every and i % cli_every == 0 and cli_done < cli:
            path = folder / f"mutant-{i}.gguf"
            path.write_bytes(header + base[header_end:])
            result = through_cli(path, gemma)
            path.unlink()
            cli_done += 1
            outcomes[f"cli {result.split(':')[0]}"] += 1
            if result.startswith("bug"):
                bugs.append((i, what, result))
    return {"seed": seed, "mutants": mutants, "cli": cli_done, "seconds":
            round(time.perf_counter() - start, 1), "outcomes": dict(sorted(outcomes.items())),
            "bugs": bugs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--cli", type=int, default=300)
    parser.add_argument("--gemma", default=str(Path(sys.executable).with_name("gemma")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gemma-fuzz-") as tmp:
        report = campaign(args.seed, args.mutants, args.cli, args.gemma, Path(tmp))
    print(json.dumps(report, indent=1))
    return 1 if report["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
