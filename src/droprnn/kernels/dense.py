"""``Dense``'s product, x @ kernel + bias, by whichever library runs it faster here, timed per shape.

A language model's softmax layer is most of its work: in a medium Penn Treebank window, (700, 650) @
(650, 10000) forward, and the same shapes twice backward. torch's ``F.linear`` and droprnn's brgemm product
(``float_mm``) differ there by up to 2.4x, which way depending on the CPU and the shape, so each product is
timed once per shape and kept (:mod:`.cpu.faster_product`): the forward, the kernel's gradient (which follows
the forward's choice) and the input's gradient (timed on its own: brgemm needs the kernel transposed into a
copy first, which on a Zen 4 cost what it saved and on a Zen 5 a sixth of what it saved).
``$DROPRNN_PRODUCTS=torch|brgemm`` forces either. ``F.linear`` stays wherever it is not clearly the same
computation in plain eager code:

- not float32 on the CPU, under autocast, or with the kernels not loaded yet (a ``Dense`` alone never
  builds them);
- under a compiler, exporter, ``torch.jit.trace``, tensor mode, ``torch.func`` transform or tensor subclass
  (what those see is ``F.linear``, as in ``torch.nn.Linear``);
- products too small for a Python ``autograd.Function``'s overhead (tens of microseconds) to vanish.

A backward asked to build a graph (``create_graph=True``) runs in torch's ops, so higher derivatives work as
through ``F.linear``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu
from .cpu import faster_product, machine
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
    if not faster_product.brgemm_faster(x.reshape(-1, x.shape[-1]).detach(), kernel.detach()):
        forced = os.environ.get(machine.PRODUCTS_ENV, "") == "torch"
        return f"torch's product was the faster for this shape here{' (forced)' if forced else ', timed once'}"
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
        graph = torch.is_grad_enabled()  # create_graph: a backward made of differentiable ops
        if need_x:
            dx = torch.mm(grad, kernel.t()) if graph else faster_product.mm(grad, kernel.t(), rows.new_empty(rows.shape))
            dx = dx.view(x.shape)
        if need_kernel:
            if graph:
                dkernel = torch.mm(rows.t(), grad)
            else:
                dkernel = kernel.new_empty(kernel.shape)
                torch.ops.droprnn_cpu.float_mm(rows.t().contiguous(), grad, dkernel)
        if need_bias and ctx.has_bias:
            dbias = grad.sum(0)
        return dx, dkernel, dbias
