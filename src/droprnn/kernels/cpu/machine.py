"""The blocking of the fused CPU kernels, from this machine's caches rather than constants measured on one CPU.

Linux says each core's cache sizes in sysfs (``/sys/devices/system/cpu/cpu0/cache``). Three choices follow
from them; each rule is the one that reproduces, on the Intel Xeon where the kernels were first measured
(L1d 48 KiB, L2 2 MiB), the constant measured best there:

- a recurrent kernel stays one panel up to a quarter of L2 (512 KiB there), else one panel per gate;
- the backward forms its weight gradients after its time loop, in large products, where they outgrow half
  of L2 (1 MiB there) and L1d per batch row (48 KiB there) -- a step's rank-B update of them then runs at
  memory speed;
- a product's block of the right-hand side is the largest square of a multiple of 16 whose float32 values
  fill an eighth of L2 (256 x 256 there), so it stays in cache while every row of the left-hand side passes.

Where sysfs says nothing (not Linux, a container that hides it) the Xeon's sizes stand in.

One choice is measured instead: which library runs the float32 input projections (one large product per
call). On a Xeon MKL's sgemm (``torch.mm``) was the faster; on an AMD EPYC it ran them at ~120-145 GFLOP/s
on 2 threads against 160-200 for oneDNN's brgemm (``mm.cpp``). :func:`products_choice` times both once
and keeps the answer beside the built library.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_XEON = {"l1d": 48 << 10, "l2": 2 << 20, "l3": 0}


def _size(text: str) -> int:
    """Bytes from sysfs's "48K", "2048K", "30M"."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@lru_cache(maxsize=1)
def caches() -> dict[str, int]:
    """This machine's per-core data cache sizes in bytes: l1d, l2, l3 (0 where not known)."""
    found = dict(_XEON)
    if not _CACHES.is_dir():
        return found
    seen = {}
    for index in sorted(_CACHES.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and level in (1, 2, 3):
            seen[{1: "l1d", 2: "l2", 3: "l3"}[level]] = size
    if "l1d" in seen and "l2" in seen:
        found = {"l3": 0, **seen}
    return found


@dataclass(frozen=True)
class Blocking:
    one_panel_bytes: int      # a recurrent kernel up to this size stays one panel
    defer_bytes: int          # weight gradients above this size (and ...
    defer_bytes_per_row: int  # ... above this per batch row) are formed after the backward loop
    gemm_block: int           # the side of a product's right-hand block, in elements


@lru_cache(maxsize=1)
def blocking() -> Blocking:
    sizes = caches()
    l1d, l2 = sizes["l1d"], sizes["l2"]
    side = max(64, int(math.isqrt(l2 // 8 // 4)) // 16 * 16)
    return Blocking(one_panel_bytes=l2 // 4, defer_bytes=l2 // 2, defer_bytes_per_row=l1d, gemm_block=side)


def describe() -> str:
    """The CPU model and its caches, for benchmarks and reports."""
    model = os.uname().machine if hasattr(os, "uname") else "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sizes = caches()
    text = f"{model} (L1d {sizes['l1d'] >> 10} KiB and L2 {sizes['l2'] >> 10} KiB per core"
    return text + (f", L3 {sizes['l3'] >> 20} MiB)" if sizes["l3"] else ")")


# The product the choice is timed on: an input projection of a mid-sized call (B·T = 4096, D = 128, 4U = 512).
_PROBE = (4096, 128, 512)
PRODUCTS_ENV = "DROPRNN_PRODUCTS"
_PRODUCTS = ("torch", "brgemm")


def _time_products(rounds: int = 5) -> dict[str, float]:
    """The best of ``rounds`` interleaved timings (seconds) of the probe product by each library."""
    import torch

    m, k, n = _PROBE
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    run = {"torch": lambda: torch.mm(a, b, out=out), "brgemm": lambda: torch.ops.droprnn_cpu.float_mm(a, b, out)}
    best = {name: math.inf for name in run}
    for _ in range(rounds + 1):  # the first round warms up (oneDNN generates its kernel there)
        for name, product in run.items():
            started = time.perf_counter()
            product()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def products_choice(folder: Path, threads: int) -> str:
    """"torch" or "brgemm": which runs this machine's float32 input projections faster with ``threads``
    threads, measured once and kept in ``folder/products.json`` (the built library's folder). brgemm must win
    by 5% to be chosen (torch.mm is the default). ``$DROPRNN_PRODUCTS`` forces either."""
    forced = os.environ.get(PRODUCTS_ENV, "")
    if forced:
        if forced not in _PRODUCTS:
            raise ValueError(f"droprnn: ${PRODUCTS_ENV} expected one of {', '.join(_PRODUCTS)}, got {forced!r}")
        return forced

    def measure() -> str:
        timings = _time_products()
        return "brgemm" if timings["brgemm"] < 0.95 * timings["torch"] else "torch"

    return kept_choice(folder / "products.json", str(threads), measure, _PRODUCTS)


def kept_choice(record: Path, key: str, measure: Callable[[], str], allowed: tuple[str, ...]) -> str:
    """``measure()``, made once per ``key`` and kept in the JSON file ``record``, so that every process on this
    machine and build makes the same choice (results then repeat bit for bit). Processes take turns on the
    record (a lock file beside it), so one that measures while another adds a key loses neither, and one
    that waits reads the other's measurement instead of measuring again. Written atomically: a reader sees
    the old record or the new, never half of one; a read-only folder measures again in the next process."""
    with _turn(record):
        known = _read(record)
        if known.get(key) in allowed:
            return known[key]
        choice = measure()
        known = {**_read(record), key: choice}  # read again: the measurement may have kept a choice itself
        try:
            staged = record.with_name(f"{record.name}.{os.getpid()}.tmp")
            staged.write_text(json.dumps(known))
            os.replace(staged, record)
        except OSError:
            pass
        return choice


def _read(record: Path) -> dict:
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


_holding = threading.local()  # the records this thread has its turn on (a measurement that keeps a choice in
                              # the same record must not wait for itself)


@contextlib.contextmanager
def _turn(record: Path) -> Iterator[None]:
    """This process's turn on ``record``: an exclusive lock on ``record.lock``, where the OS has flock and
    the folder can be written (elsewhere no turn is taken, and a lost key is measured again later)."""
    held = _holding.__dict__.setdefault("records", set())
    try:
        import fcntl

        lock = None if record in held else open(record.with_name(record.name + ".lock"), "a")
    except (ImportError, OSError):
        lock = None
    if lock is None:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(record)
        try:
            yield
        finally:
            held.discard(record)
