"""float32 products by whichever library runs them faster on this machine, decided per shape.

``torch.mm`` calls the BLAS torch was built with (MKL in the x86 wheels); ``float_mm`` (mm.cpp) calls
oneDNN's brgemm micro-kernel, as the recurrences do. Which is faster depends on the CPU and the shape, by
wide margins, measured on 2 threads:

- on an AMD EPYC Zen 5 (family 26), MKL ran (700, 650) @ (650, 10000) at 178 GFLOP/s and brgemm at 420,
  near the FMA units' peak; a Penn Treebank LSTM's per-gate weight gradient, (650, 700) @ (700, 650) from a
  transposed operand, took 3.1 ms by MKL and 1.5 by brgemm with the copy that makes the operand row-major;
- on a Zen 4, whose AVX-512 units are half as wide, brgemm was 17% faster at that weight gradient and 8%
  slower at the input gradient beside it; at (6400, 256) @ (256, 2048) it was 25% slower;
- on a Xeon, MKL was the faster for the fused kernels' input projections.

So the first product of each shape is timed both ways, and the faster kept beside the built library
(``shapes.json``), where every later process reads it: results then repeat bit for bit. A shape is the
operands' layouts (a transposed operand is copied for brgemm, and the copy is part of what is timed), the
rows and the inner dimension rounded up to a power of two (they grow with batch and sequence length), the
columns, and the thread count. ``$DROPRNN_PRODUCTS=torch|brgemm`` forces either.

Used by ``Dense`` (kernels/dense.py) and by the products after the fused kernels' backward loops
(kernels/fused.py). The fused kernels' input projections keep one machine-wide choice
(:func:`machine.products_choice`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from . import machine

Tensor = torch.Tensor

RECORD = "shapes.json"
# Below this many FLOPs (tens of microseconds) the two differ by microseconds: no timing, no record, torch.mm.
MIN_FLOPS = 1e7
_known: dict[str, bool] = {}  # shape key -> brgemm is the faster (this process's copy of the record)


def mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a (M, K) @ b (K, N), float32 CPU matrices of any strides (``out`` with unit stride along its
    rows), by the faster library for this shape here. Needs the kernels loaded."""
    if _row_major(out) and brgemm_faster(a, b):
        return _brgemm(a, b, out)
    return torch.mm(a, b, out=out)


def brgemm_faster(a: Tensor, b: Tensor) -> bool:
    """Whether brgemm runs ``a @ b`` faster here (timing the shape if it is new); False where the kernels are
    not loaded."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (a, b)):
        return False
    forced = os.environ.get(machine.PRODUCTS_ENV, "")
    if forced in ("torch", "brgemm"):
        return forced == "brgemm"
    if 2 * a.shape[0] * a.shape[1] * b.shape[1] < MIN_FLOPS:
        return False
    from . import library_path

    if library_path() is None:  # no float_mm to run
        return False
    key = shape_key(a, b)
    if key not in _known:
        out = a.new_empty(a.shape[0], b.shape[1])
        _known[key] = machine.kept_choice(
            Path(library_path()).parent / RECORD, key,
            lambda: "brgemm" if second_faster(lambda: torch.mm(a, b, out=out), lambda: _brgemm(a, b, out)) else "torch",
            ("torch", "brgemm")) == "brgemm"
    return _known[key]


def shape_key(a: Tensor, b: Tensor) -> str:
    """What a timed choice is kept under: layouts ("n" row-major, "t" not), rows and inner dimension rounded
    up to a power of two, columns, threads."""
    layout = "".join("n" if _row_major(t) else "t" for t in (a, b))
    rows, inner = (1 << max(size - 1, 0).bit_length() for size in a.shape)
    return f"{layout} {rows}x{inner}x{b.shape[1]}x{torch.get_num_threads()}"


def second_faster(first: Callable[[], object], second: Callable[[], object], rounds: int = 3) -> bool:
    """Whether ``second()`` beats ``first()`` by 5%: the best of ``rounds`` interleaved timings each, after
    a warm-up round (oneDNN generates its kernel on the first call)."""
    best = [float("inf")] * 2
    for _ in range(rounds + 1):
        for k, run in enumerate((first, second)):
            started = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - started)
    return best[1] < 0.95 * best[0]


def _row_major(t: Tensor) -> bool:
    """What float_mm reads as it is: unit stride along a row, rows that do not overlap."""
    rows, cols = t.shape
    return (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols)


def _brgemm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    torch.ops.droprnn_cpu.float_mm(a if _row_major(a) else a.contiguous(), b if _row_major(b) else b.contiguous(),
                                   out)
    return out
