"""Builds and loads the fused CPU kernels (the C++ files beside this one) on first use.

The build is one ``c++`` invocation per source file against the installed torch's headers and
libraries (no ninja, no pybind), cached under ``$DROPRNN_CACHE`` (default ``~/.cache/droprnn``) by a key
of the sources, torch's version, the compiler, its flags and the CPU's instruction-set flags, so it runs once per
machine. Anything that goes wrong (no compiler, a failed build) is recorded, never raised: the layers
fall back to the reference loop and ``droprnn.explain`` says why. ``DROPRNN_DISABLE_FUSED=1`` turns the
fused kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCES = ("ops.cpp", "pool.cpp", "lstm.cpp", "gru.cpp", "simple_rnn.cpp")
HEADERS = ("common.h",)
_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict[str, Optional[str]] = {}  # "loaded": path, or "reason": why not


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _flags(compiler: str) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragma must be compiled in here;
    # the resulting libgomp.so.1 dependency resolves to the copy torch has already loaded.
    # GCC prefers 256-bit vectors even where 512-bit ones exist; the element-wise passes gain from 512.
    wide = ["-mprefer-vector-width=512"] if "avx512f" in _cpu_flags().split() else []
    return ["-O3", "-march=native", *wide, "-fopenmp", "-fPIC", "-std=c++20", "-DNDEBUG", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]


def _key(compiler: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((_HERE / name).read_bytes())
    for part in (torch.__version__, compiler, sys.platform, _cpu_flags(), " ".join(_flags(compiler))):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    from torch.utils import cpp_extension

    flags = _flags(compiler)
    lib_dirs = cpp_extension.library_paths()
    with tempfile.TemporaryDirectory(prefix="droprnn-build-") as tmp:
        objects, jobs = [], []
        for name in SOURCES:
            obj = Path(tmp) / (name + ".o")
            objects.append(str(obj))
            jobs.append(subprocess.Popen(
                [compiler, *flags, "-c", str(_HERE / name), "-o", str(obj)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        for job in jobs:
            output, _ = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"compiling the fused kernels failed:\n{output[-3000:]}")
        staged = Path(tmp) / target.name
        link = [compiler, "-shared", "-fopenmp", *objects, "-o", str(staged)]
        link += [f"-L{d}" for d in lib_dirs] + ["-lc10", "-ltorch_cpu"] + [f"-Wl,-rpath,{d}" for d in lib_dirs]
        result = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking the fused kernels failed:\n{result.stdout[-3000:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # atomic: a concurrent build never leaves half a file


def load() -> bool:
    """Build (once) and load the kernels; True when ``torch.ops.droprnn_cpu`` is ready."""
    with _lock:
        if "loaded" in _state:
            return True
        if "reason" in _state:
            return False
        try:
            if os.environ.get("DROPRNN_DISABLE_FUSED", "") not in ("", "0"):
                raise RuntimeError("disabled by DROPRNN_DISABLE_FUSED")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
            cache = Path(os.environ.get("DROPRNN_CACHE", Path.home() / ".cache" / "droprnn"))
            target = cache / "kernels" / _key(compiler) / "droprnn_cpu.so"
            if not target.exists():
                _build(compiler, target)
            torch.ops.load_library(str(target))
            _state["loaded"] = str(target)
            return True
        except Exception as error:  # noqa: BLE001 - any failure means: use the reference loop, and say why
            _state["reason"] = f"fused CPU kernels unavailable: {error}".strip()
            return False


def unavailable_reason() -> Optional[str]:
    """Why the kernels cannot be used (None when they can); builds them if not tried yet."""
    return None if load() else _state["reason"]


def library_path() -> Optional[str]:
    return _state.get("loaded")


def empty_cache() -> int:
    """Free the large blocks the fused kernels keep for reuse (see pool.cpp); returns the bytes freed.

    Like ``torch.cuda.empty_cache``: blocks still in use stay, and the cache refills as the kernels run.
    The cache holds at most ``DROPRNN_CPU_CACHE_MB`` MiB (default 1024; 0 turns it off).
    """
    return int(torch.ops.droprnn_cpu.empty_cache()) if "loaded" in _state else 0


def cached_bytes() -> int:
    """Bytes of freed blocks the kernels hold for reuse."""
    return int(torch.ops.droprnn_cpu.cached_bytes()) if "loaded" in _state else 0
