"""``Dense``'s product, x @ kernel + bias, by whichever library runs it faster here, timed per shape.

A language model's softmax layer is most of its work: in a medium Penn Treebank window, (700, 650) @
(650, 10000) forward, and the same shapes twice backward. On an AMD EPYC (Zen 4, 2 threads, torch 2.13)
torch's ``F.linear`` ran that forward at 121 GFLOP/s and the kernel's gradient at 121, where droprnn's
brgemm product (``float_mm``, kernels/cpu/mm.cpp) ran both at 205-215. At (6400, 256) @ (256, 2048) on the
same CPU brgemm was the slower (75 ms against 60), and on a Xeon MKL was the faster for the fused kernels'
projections. No rule of shapes holds across CPUs, so the first forward product of each shape (rows rounded
up to a power of two, thread count) is timed both ways and the faster kept beside the built library, where
every later process reads it (so results repeat bit for bit); the kernel's gradient follows that choice;
``$DROPRNN_PRODUCTS=torch|brgemm`` forces either. ``F.linear`` stays wherever it is not clearly the same
computation in plain eager code:

- not float32 on the CPU, under autocast, or with the kernels not loaded yet (a ``Dense`` alone never
  builds them);
- under a compiler, exporter, ``torch.jit.trace``, tensor mode, ``torch.func`` transform or tensor subclass
  (what those see is ``F.linear``, as in ``torch.nn.Linear``);
- products too small for a Python ``autograd.Function``'s overhead (tens of microseconds) to vanish.

The input's gradient stays ``torch.mm``: brgemm needs the kernel transposed into a copy first, which costs
what it saves. A backward asked to build a graph (``create_graph=True``) runs in torch's ops, so higher
derivatives work as through ``F.linear``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu
from .cpu import machine
from .eager import watched

Tensor = torch.Tensor

# Below this many FLOPs (about 0.5 ms at 200 GFLOP/s) F.linear: the Function's overhead would not vanish.
MIN_FLOPS = 1e8
_faster: dict[tuple[int, int, int, int], bool] = {}  # (rows bucket, in, out, threads) -> brgemm is the faster


def linear(x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (..., D) @ kernel (D, U) + bias (U,) → (..., U)."""
    if why_f_linear(x, kernel, bias) is None:
        return _BrgemmLinear.apply(x, kernel, bias)
    return F.linear(x, kernel.t(), bias)


def why_f_linear(x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why this call's product is ``F.linear``'s, or None where it is brgemm's (timing the shape if new)."""
    elements = x.numel()
    if type(elements) is not int:  # a symbolic size: traced, compiled or exported (comparing it makes a guard)
        return "traced, compiled, exported or transformed"
    if kernel.dim() != 2 or 2 * elements * kernel.shape[1] < max(MIN_FLOPS, 1) or kernel.stride(1) != 1:
        return "a product too small to gain"  # first: the cheapest, and most calls end here (a constant: compilers)
    float32_cpu = all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (x, kernel, bias))
    if not float32_cpu:
        return "not float32 on the CPU"
    if torch.is_autocast_enabled("cpu"):
        return "under autocast"
    if torch.jit.is_tracing() or watched((x, kernel, bias)):
        return "traced, compiled, exported or transformed"
    if cpu.library_path() is None:
        return "the fused CPU kernels are not loaded (a recurrent layer's first call loads them)"
    forced = os.environ.get(machine.PRODUCTS_ENV, "")
    if forced == "torch" or (forced != "brgemm" and not _brgemm_faster(x, kernel)):
        return f"torch's product was the faster for this shape here{' (forced)' if forced else ', timed once'}"
    return None


def _brgemm_faster(x: Tensor, kernel: Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    key = (1 << (rows - 1).bit_length(), *kernel.shape, torch.get_num_threads())
    if key not in _faster:  # kept beside the built library: every process here then makes the same choice
        _faster[key] = machine.kept_choice(
            Path(cpu.library_path()).parent / "dense.json", "x".join(map(str, key)),
            lambda: "brgemm" if _time_both(x.reshape(-1, x.shape[-1]).detach(), kernel.detach()) else "torch",
            ("torch", "brgemm")) == "brgemm"
    return _faster[key]


def _time_both(rows: Tensor, kernel: Tensor, rounds: int = 3) -> bool:
    """Whether brgemm's product of ``rows`` and ``kernel`` beats torch's here."""
    rows = rows.contiguous()
    out = rows.new_empty(rows.shape[0], kernel.shape[1])
    return _second_faster(lambda: torch.mm(rows, kernel, out=out),
                          lambda: torch.ops.droprnn_cpu.float_mm(rows, kernel, out), rounds)


def _second_faster(first, second, rounds: int) -> bool:
    """Whether ``second()`` beats ``first()`` by 5%: the best of ``rounds`` interleaved timings each, after
    a warm-up round (oneDNN generates its kernel on the first call)."""
    best = [float("inf")] * 2
    for _ in range(rounds + 1):
        for k, run in enumerate((first, second)):
            started = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - started)
    return best[1] < 0.95 * best[0]


class _BrgemmLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = x.new_empty(rows.shape[0], kernel.shape[1])
        torch.ops.droprnn_cpu.float_mm(rows, kernel, out)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, kernel)  # x itself, not rows: a graph-building backward must reach it
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], kernel.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, kernel = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, kernel.shape[1]).contiguous()
        need_x, need_kernel, need_bias = ctx.needs_input_grad
        dx = dkernel = dbias = None
        if need_x:
            dx = torch.mm(grad, kernel.t()).view(x.shape)
        if need_kernel:
            if torch.is_grad_enabled():  # create_graph: a backward made of differentiable ops
                dkernel = torch.mm(rows.t(), grad)
            else:
                dkernel = kernel.new_empty(kernel.shape)
                torch.ops.droprnn_cpu.float_mm(rows.t().contiguous(), grad, dkernel)
        if need_bias and ctx.has_bias:
            dbias = grad.sum(0)
        return dx, dkernel, dbias
