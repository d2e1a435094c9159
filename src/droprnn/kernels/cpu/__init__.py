"""Builds and loads the fused CPU kernels (the C++ files beside this one) on first use.

The build is one ``c++`` invocation per source file against the installed torch's headers and
libraries (no ninja, no pybind), cached under ``$DROPRNN_CACHE`` (default ``~/.cache/droprnn``) by a key
of the sources, torch's version, the compiler, its flags and the CPU's instruction-set flags, so it runs once per
machine. Anything that goes wrong (no compiler, a failed build) is recorded, never raised: the layers
fall back to the reference loop and ``droprnn.explain`` says why. ``DROPRNN_DISABLE_FUSED=1`` turns the
fused kernels off.

A cached library is trusted only as it was built: beside it ``droprnn_cpu.json`` records the build key and
the library's SHA-256, and a library that does not match (truncated, overwritten, empty, half-copied) is
rebuilt before anything loads it -- loading a damaged shared object can kill the process (SIGBUS, SIGILL).
The build runs in a folder inside the cache and is renamed into place there, so it is atomic whatever
filesystem ``$TMPDIR`` is on. A cache folder that cannot be written (read-only) is said once, in a
warning, and a per-user folder in the temporary directory is used instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import machine

SOURCES = ("ops.cpp", "pool.cpp", "lstm.cpp", "gru.cpp", "simple_rnn.cpp", "bf16.cpp", "mm.cpp")
HEADERS = ("common.h", "checks.h", "bf16.h", "bf16_dot.h")
# What a cache folder holds, part of the build key: 2 keeps the object files beside the library.
CACHE_LAYOUT = 2
_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict[str, Optional[str]] = {}  # "loaded": path (and "repaired": what was fixed), or "reason": why not


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
    # A sanitized build is for tests: -O1 compiles it about four times faster than -O3 with full debug
    # information, and keeps line numbers in the reports (-g1 in _sanitizers).
    sanitize = _sanitizers()
    return ["-O1" if sanitize else "-O3", "-march=native", *wide, "-fopenmp", "-fPIC", "-std=c++20", "-DNDEBUG",
            "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *sanitize, *includes]


def _sanitizers() -> list[str]:
    """``DROPRNN_SANITIZE=address,undefined``: a build that stops at the first out-of-bounds access or
    undefined behaviour (for tests; the interpreter needs the ASan runtime preloaded: tests/test_sanitized.py)."""
    wanted = os.environ.get("DROPRNN_SANITIZE", "")
    if not wanted:
        return []
    return [f"-fsanitize={wanted}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]


def _key(compiler: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((_HERE / name).read_bytes())
    for part in (str(CACHE_LAYOUT), torch.__version__, compiler, sys.platform, _cpu_flags(),
                 " ".join(_flags(compiler))):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(target: Path) -> Path:
    return target.with_name("droprnn_cpu.json")


def _damage(target: Path, key: str) -> Optional[str]:
    """Why the cached library at ``target`` must not be loaded (None when it is what build ``key`` made)."""
    if not target.exists():
        return "not built yet"
    try:
        record = json.loads(_manifest(target).read_text())
        if record.get("key") != key:
            return "its build record is of another build"
        if record.get("sha256") != _digest(target):
            return "its checksum differs from the one recorded at build time (truncated or overwritten)"
    except (OSError, ValueError, AttributeError):
        return "its build record is missing or unreadable"
    return None


def _build(compiler: str, target: Path, key: str) -> None:
    """Compile in a folder inside ``target``'s, then rename the library into place and record its checksum
    beside it (a rename within one filesystem is atomic: a concurrent build never leaves half a file)."""
    from torch.utils import cpp_extension

    flags = _flags(compiler)
    lib_dirs = cpp_extension.library_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr is not None and sys.stderr.isatty():  # a person is waiting: say why (never into a captured log)
        print(f"droprnn: building the fused CPU kernels for this machine, once ({len(SOURCES)} files, under a "
              f"minute on 2 cores; cached in {target.parent})", file=sys.stderr, flush=True)
    kept = _kept_objects(target.parent)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        objects, jobs, compiled = [], [], []
        for name in SOURCES:
            if name in kept:  # a library damaged after its build is repaired by a link alone
                objects.append(str(_object(target.parent, name)))
                continue
            obj = Path(tmp) / (name + ".o")
            objects.append(str(obj))
            compiled.append((name, obj))
            jobs.append(subprocess.Popen(
                [compiler, *flags, "-c", str(_HERE / name), "-o", str(obj)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        for job in jobs:
            output, _ = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"compiling the fused kernels failed:\n{output[-3000:]}")
        staged = Path(tmp) / target.name
        link = [compiler, "-shared", "-fopenmp", *_sanitizers(), *objects, "-o", str(staged)]
        link += [f"-L{d}" for d in lib_dirs] + ["-lc10", "-ltorch_cpu"] + [f"-Wl,-rpath,{d}" for d in lib_dirs]
        result = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking the fused kernels failed:\n{result.stdout[-3000:]}")
        record = Path(tmp) / "droprnn_cpu.json"
        record.write_text(json.dumps({"key": key, "sha256": _digest(staged), "torch": torch.__version__}))
        os.replace(staged, target)
        os.replace(record, _manifest(target))
        _keep_objects(target.parent, kept, compiled, Path(tmp))


def _object(folder: Path, name: str) -> Path:
    """Where the build in ``folder`` keeps the object file of source ``name``."""
    return folder / "objects" / (name + ".o")


def _kept_objects(folder: Path) -> dict[str, str]:
    """The object files of an earlier build of this key whose checksums still match their record: source
    name -> checksum."""
    try:
        record = json.loads((folder / "objects" / "objects.json").read_text())
        if not isinstance(record, dict):
            return {}
        return {name: record[name] for name in SOURCES
                if _object(folder, name).exists() and record.get(name) == _digest(_object(folder, name))}
    except (OSError, ValueError):
        return {}


def _keep_objects(folder: Path, kept: dict[str, str], compiled: list[tuple[str, Path]], tmp: Path) -> None:
    """Keep the objects just compiled beside those kept (each renamed into place, then the record)."""
    if not compiled:
        return
    (folder / "objects").mkdir(exist_ok=True)
    record = dict(kept)
    for name, obj in compiled:
        record[name] = _digest(obj)
        os.replace(obj, _object(folder, name))
    staged = tmp / "objects.json"
    staged.write_text(json.dumps(record))
    os.replace(staged, folder / "objects" / "objects.json")


def _cache_folders() -> list[Path]:
    """Where builds are cached: $DROPRNN_CACHE (default ~/.cache/droprnn), then a per-user folder in the
    temporary directory for when that one cannot be written."""
    configured = os.environ.get("DROPRNN_CACHE")
    first = Path(configured) if configured else Path.home() / ".cache" / "droprnn"
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    fallback = Path(tempfile.gettempdir()) / f"droprnn-{user}"
    return [first] if first == fallback else [first, fallback]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _library(compiler: str) -> tuple[Path, Optional[str]]:
    """The verified library to load, built first where needed, and what was repaired on the way (None if
    nothing). Raises when no cache folder gives one."""
    key = _key(compiler)
    notes: list[str] = []
    last_error: Optional[BaseException] = None
    for cache in _cache_folders():
        target = cache / "kernels" / key / "droprnn_cpu.so"
        damage = _damage(target, key)
        if damage is None:
            return target, "; ".join(notes) or None
        if not _writable(target.parent):
            notes.append(f"the cache {cache} cannot be written")
            warnings.warn(f"droprnn: the kernel cache {cache} cannot be written; the fused CPU kernels are built in a "
                          "per-user folder of the temporary directory instead (DROPRNN_CACHE chooses the folder)",
                          RuntimeWarning, stacklevel=2)
            continue
        if target.exists():
            notes.append(f"the cached library {target} was rebuilt: {damage}")
        try:
            _build(compiler, target, key)
        except OSError as error:  # a full disk, a folder that refused a write: the next folder may do
            last_error = error
            continue
        if _damage(target, key) is None:
            return target, "; ".join(notes) or None
        last_error = RuntimeError(f"the library built at {target} did not verify")
    raise RuntimeError(f"no cache folder gave a library ({'; '.join(notes) or last_error or 'none writable'})")


def load() -> bool:
    """Build (once) and load the kernels; True when ``torch.ops.droprnn_cpu`` is ready."""
    if "loaded" in _state:
        return True
    if "reason" in _state:
        return False
    with _lock:
        if "loaded" in _state or "reason" in _state:
            return "loaded" in _state
        try:
            if os.environ.get("DROPRNN_DISABLE_FUSED", "") not in ("", "0"):
                raise RuntimeError("disabled by DROPRNN_DISABLE_FUSED")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
            target, fixed = _library(compiler)
            torch.ops.load_library(str(target))
            torch.ops.droprnn_cpu.set_gemm_block(machine.blocking().gemm_block)
            _state["loaded"] = str(target)
            _state["repaired"] = fixed
            return True
        except Exception as error:  # noqa: BLE001 - any failure means: use the reference loop, and say why
            _state["reason"] = f"fused CPU kernels unavailable: {error}".strip()
            return False


def projection_products() -> str:
    """Which library runs float32 input projections here, "torch" or "brgemm" (:func:`machine.products_choice`,
    measured once per build and thread count). Needs the kernels loaded."""
    threads = torch.get_num_threads()
    key = f"products-{threads}"
    if key not in _state:
        _state[key] = machine.products_choice(Path(_state["loaded"]).parent, threads)
    return _state[key]


def unavailable_reason() -> Optional[str]:
    """Why the kernels cannot be used (None when they can); builds them if not tried yet."""
    return None if load() else _state["reason"]


def library_path() -> Optional[str]:
    return _state.get("loaded")


def repaired() -> Optional[str]:
    """What loading had to repair on the way (a damaged cached library rebuilt, a read-only cache passed
    over), or None."""
    return _state.get("repaired")


def empty_cache() -> int:
    """Free the large blocks the fused kernels keep for reuse (see pool.cpp); returns the bytes freed.

    Like ``torch.cuda.empty_cache``: blocks still in use stay, and the cache refills as the kernels run.
    The cache holds at most ``DROPRNN_CPU_CACHE_MB`` MiB (default 1024; 0 turns it off).
    """
    return int(torch.ops.droprnn_cpu.empty_cache()) if "loaded" in _state else 0


def cached_bytes() -> int:
    """Bytes of freed blocks the kernels hold for reuse."""
    return int(torch.ops.droprnn_cpu.cached_bytes()) if "loaded" in _state else 0
