"""``Dense``'s product, x @ kernel + bias, by whichever library runs this machine's float32 products faster.

A language model's softmax layer is most of its work: in a medium Penn Treebank window, (700, 650) @
(650, 10000) forward, and the same shapes twice backward. On an AMD EPYC (Zen 4, 2 threads, torch 2.13)
torch's ``F.linear`` ran the forward at 121 GFLOP/s and the kernel's gradient at 121, where droprnn's
brgemm product (``float_mm``, kernels/cpu/mm.cpp) ran both at 205-215; on a Xeon MKL was the faster. So
the choice is the one the fused kernels already make for their input projections, measured once per
machine (:func:`cpu.projection_products`), and ``F.linear`` stays wherever it is not clearly the same
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

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu
from .eager import watched

Tensor = torch.Tensor

# Below this many FLOPs (about 0.5 ms at 200 GFLOP/s) F.linear: the Function's overhead would not vanish.
MIN_FLOPS = 1e8


def linear(x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (..., D) @ kernel (D, U) + bias (U,) → (..., U)."""
    if why_f_linear(x, kernel, bias) is None:
        return _BrgemmLinear.apply(x, kernel, bias)
    return F.linear(x, kernel.t(), bias)


def why_f_linear(x: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why this call's product is ``F.linear``'s, or None where it is brgemm's."""
    float32_cpu = all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (x, kernel, bias))
    if not float32_cpu:
        return "not float32 on the CPU"
    if torch.is_autocast_enabled("cpu"):
        return "under autocast"
    # before any comparison of sizes: under a compiler or exporter one would become a guard
    if torch.jit.is_tracing() or watched((x, kernel, bias)):
        return "traced, compiled, exported or transformed"
    flops = 2 * x.numel() * kernel.shape[1] if kernel.dim() == 2 else 0
    if flops < MIN_FLOPS or flops == 0 or x.dim() == 0 or kernel.stride(1) != 1:
        return f"a product under {MIN_FLOPS:.0e} FLOPs"
    if cpu.library_path() is None:
        return "the fused CPU kernels are not loaded (a recurrent layer's first call loads them)"
    if cpu.projection_products() != "brgemm":
        return "torch's float32 products are the faster on this machine, measured once"
    return None


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
