"""llama.cpp's own ``llama-server`` for tests, built from the source llama-cpp-python vendors
(the same llama.cpp as the installed bindings), once, into the test cache.

    binary = llama_server()   # None when it cannot be built here (said why, on stderr)

The build is what a user does (CMake, Release, native CPU flags) minus what a test needs not:
no web UI assets, no HTTPS, no examples. On x86 the AMX instructions are left out of the
compiler's native set (``-mno-amx-*``): llama.cpp's AMX kernels fault on some Xeon VMs, and
gemma-chat's own llama.cpp backend leaves them out there too (gemma_chat.backends.repack), so
both run the same kernels.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gemma4_data import cache_dir, download_sdist

BUILD_TIMEOUT_S = 1800


def llama_server() -> Path | None:
    """The llama-server binary, built on first use; None (and why, on stderr) if it fails."""
    folder = cache_dir() / "llama-server"
    binary = folder / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        print("llama-server: cmake is not installed", file=sys.stderr)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        sdist = download_sdist(tmp)
        with tarfile.open(sdist) as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            root = f"{top}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(root)]
            tar.extractall(tmp / "src", members=members, filter="data")
        source = tmp / "src" / root
        flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
            if platform.machine() in ("x86_64", "AMD64") else ""
        env = {**os.environ, "CFLAGS": flags, "CXXFLAGS": flags}
        build = tmp / "build"
        configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                     "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                     "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        steps = [configure, ["cmake", "--build", str(build), "--target", "llama-server",
                             "-j", str(os.cpu_count() or 2)]]
        for step in steps:
            result = subprocess.run(step, env=env, capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                print(f"llama-server: {' '.join(step[:3])} failed:\n{result.stderr[-3000:]}",
                      file=sys.stderr)
                return None
        built = next(build.rglob("llama-server"), None)
        if built is None or not built.is_file():
            print("llama-server: the build made no llama-server binary", file=sys.stderr)
            return None
        part = folder / "llama-server.part"
        shutil.copy2(built, part)
        part.replace(binary)
    return binary
