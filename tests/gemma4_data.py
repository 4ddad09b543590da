"""The real Gemma 4 vocabulary for tests, from the llama-cpp-python sdist that vendors llama.cpp:
``models/ggml-vocab-gemma-4.gguf`` (a vocabulary-only GGUF of Gemma 4's tokenizer) and its
``.inp``/``.out`` reference tokenizations.

    path = vocab_gguf()       # downloads the sdist once (pip download), then cached

The sdist of the installed llama-cpp-python version is fetched with ``pip download`` into
``GEMMA_TEST_CACHE`` (default ``~/.cache/gemma-chat-tests``), and only those files are kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

FILES = ("ggml-vocab-gemma-4.gguf", "ggml-vocab-gemma-4.gguf.inp",
         "ggml-vocab-gemma-4.gguf.out")


def cache_dir() -> Path:
    root = os.environ.get("GEMMA_TEST_CACHE") or Path.home() / ".cache" / "gemma-chat-tests"
    return Path(root) / f"llama-cpp-python-{version('llama_cpp_python')}"


def download_sdist(into: Path) -> Path:
    """The installed llama-cpp-python version's source archive, downloaded into ``into``."""
    spec = f"llama-cpp-python=={version('llama_cpp_python')}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", spec, "-d", str(into)], check=True, timeout=900)
    return next(Path(into).glob("*.tar.gz"))


def vocab_gguf() -> Path:
    """The vocabulary GGUF (its reference files beside it), fetched on first use."""
    folder = cache_dir()
    if all((folder / name).is_file() for name in FILES):
        return folder / FILES[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        sdist = download_sdist(Path(tmp))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in FILES and "/models/" in member.name:
                    data = tar.extractfile(member).read()
                    part = folder / (name + ".part")
                    part.write_bytes(data)
                    part.replace(folder / name)
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise RuntimeError(f"the llama-cpp-python sdist has no {missing[0]}")
    return folder / FILES[0]


def reference_tokenizations() -> list[tuple[str, list[int]]]:
    """(text, ids) pairs of llama.cpp's reference tokenizations for the vocabulary."""
    path = vocab_gguf()
    texts = Path(str(path) + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = Path(str(path) + ".out").read_text(encoding="utf-8").strip("\n").split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]
