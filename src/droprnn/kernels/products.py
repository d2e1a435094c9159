"""The large products around the time loops, through torch: cuBLAS for the GPU kernels (``kernels/gpu/``),
the CPU's BLAS for the fused kernels' backward at large sizes (``kernels/fused.py``).

Before the loop the input projections of all steps, P = (x ⊙ m_x^g) @ K_g + b_g (GPU); after the backward
loop the weight and input gradients from the gate gradients dz of all steps. All in the input dtype
(cuBLAS accumulates half-precision products in float32). G is the cell's gate count (LSTM 4, GRU 3). The
fused CPU kernels pass ``matmul(a, b, out)``, their product (whichever library runs the shape faster:
kernels/cpu/faster_product.py), where a and b may be transposed views.

Per-gate masks (Keras's) make one product per gate. Where the G masked copies of x (or h) are small they
are made at once, (G, B, T, D), and the G products are one batched product: a few launches instead of a
few per gate, which is what a small layer's time goes to on a GPU (a medium Penn Treebank window: 113
launches outside the CUDA graphs instead of 183). Above ``BATCHED_LIMIT`` elements, where the launches no
longer matter but G copies would, the gates go one at a time with one gate's masked copy alive; so do the
CPU's (``batch_gates=False``: no launches to save, and the peak memory of a medium Penn Treebank layer's
step went from 49 to 39 MB at the same speed).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..random import CounterMask

Tensor = torch.Tensor

BATCHED_LIMIT = 1 << 24  # elements of the (G, B, T, D) masked copies: 64 MiB in float32
Matmul = Callable[[Tensor, Tensor, Tensor], Any]  # matmul(a, b, out): out = a @ b


def product(a: Tensor, b: Tensor, matmul: Optional[Matmul], out: Optional[Tensor] = None) -> Tensor:
    """a @ b, into ``out`` (a new tensor where None), by ``matmul`` where given, else torch's ``@``."""
    if matmul is None:
        result = a @ b
        return result if out is None else out.copy_(result)
    out = a.new_empty(a.shape[0], b.shape[1]) if out is None else out
    matmul(a, b, out)
    return out


def counter_tensor(mask: CounterMask, gate: Optional[int] = None) -> Tensor:
    """``mask.materialize()``, or ``mask.gate(gate)``: on CUDA (and in Triton's interpreter) by one Triton
    pass, since torch's integer ops take about fifty passes over the tensor (kernels/gpu/counter.py)."""
    if _triton_makes(mask):
        from .gpu import counter

        return counter.made(mask, gate)
    return mask.materialize() if gate is None else mask.gate(gate)


def _triton_makes(mask: CounterMask) -> bool:
    from . import gpu

    return (mask.device.type == "cuda" or gpu.interpreting()) and gpu.unavailable_reason() is None


def time_mask(masks: Any, g: int) -> Tensor:
    """Mask g of masks (m, B, D) or per step (T, m, B, D) -- a tensor or a CounterMask, made here one gate
    at a time -- broadcastable against x (B, T, D)."""
    if isinstance(masks, CounterMask):
        return counter_tensor(masks, g).permute(1, 0, 2)
    if masks.dim() == 4:
        return masks[:, g].permute(1, 0, 2)
    return masks[g].unsqueeze(1)


def gate_masks(masks: Any, gates: Sequence[int]) -> Tensor:
    """Masks ``gates`` (consecutive) of masks (m, B, D) or per step (T, m, B, D) -- a tensor or a
    CounterMask -- as (k, B, T or 1, D), broadcastable against x (B, T, D) with a gate axis in front."""
    chosen = slice(gates[0], gates[-1] + 1)
    if list(gates) != list(range(chosen.start, chosen.stop)):
        raise ValueError(f"gate_masks takes consecutive gates, got {tuple(gates)}")
    if isinstance(masks, CounterMask):
        masks = counter_tensor(masks)
    if masks.dim() == 4:
        return masks[:, chosen].permute(1, 2, 0, 3)
    return masks[chosen].unsqueeze(2)


def per_gate(masks: Any) -> bool:
    """Whether ``masks`` ((m, B, ·) or per step (T, m, B, ·)) hold one mask per gate."""
    return masks is not None and masks.shape[-3] > 1


def batched(x: Tensor, gates: int, batch_gates: bool = True) -> bool:
    """Whether one batched product serves ``gates`` masked copies of x: asked for, and under BATCHED_LIMIT."""
    return batch_gates and gates * x.numel() <= BATCHED_LIMIT


def masked_copies(x: Tensor, masks: Any, gates: Sequence[int]) -> Tensor:
    """x (B, T, D) through each of the masks ``gates``: (k, B·T, D), contiguous."""
    batch, steps, features = x.shape
    return torch.mul(x.unsqueeze(0), gate_masks(masks, gates)).view(len(gates), batch * steps, features)


def gate_columns(t: Tensor, gates: int) -> Tensor:
    """The gate axis of a (rows, G·U) matrix split off and put first: (G, rows, U), a view."""
    return t.unflatten(1, (gates, t.shape[1] // gates)).transpose(0, 1)


def project(x: Tensor, kernel: Tensor, bias: Optional[Tensor], masks: Optional[Tensor], out: Tensor,
            gates: int, *, batch_gates: bool = True, matmul: Optional[Matmul] = None,
            new: Callable[..., Tensor] = torch.empty) -> Tensor:
    """Input projections of all steps with the bias, written into ``out``: x (B, T, D) -> (B, T, G·U), or
    gate-major (G, B, T, U) with per-gate masks. ``out`` is a time loop's gates buffer, so that a captured
    loop's static buffer is filled without a copy.

    The fused CPU kernels' form: ``bias`` None (their loops add it), ``batch_gates`` False, ``matmul(a, b,
    out)`` their product (bfloat16 products there), ``new(shape, dtype=, device=)`` their block cache for the
    masked copies of x (a sequence-sized tensor allocated afresh costs its page faults again).
    """
    batch, steps, features = x.shape
    units = kernel.shape[1] // gates
    if matmul is not None and bias is not None:
        raise ValueError("project: a given matmul takes no bias (add it in the loop)")

    def product(a: Tensor, b: Tensor, target: Tensor, b_bias: Optional[Tensor]) -> None:
        if matmul is not None:
            matmul(a, b, target)
        elif b_bias is None:
            torch.mm(a, b, out=target)
        else:
            torch.addmm(b_bias, a, b, out=target)

    if per_gate(masks) and batched(x, gates, batch_gates):
        target = out.view(gates, batch * steps, units)
        masked, panels = masked_copies(x, masks, range(gates)), gate_columns(kernel, gates)
        if bias is None:
            torch.bmm(masked, panels, out=target)
        else:
            torch.baddbmm(bias.view(gates, 1, units), masked, panels, out=target)
        return out
    if per_gate(masks):  # one gate's masked copy of x alive at a time
        scratch = new(tuple(x.shape), dtype=x.dtype, device=x.device)
        for g in range(gates):
            cols = slice(g * units, (g + 1) * units)
            masked = torch.mul(x, time_mask(masks, g), out=scratch).view(batch * steps, features)
            product(masked, kernel[:, cols], out[g].view(batch * steps, units), None if bias is None else bias[cols])
        return out
    if masks is not None:  # one mask for every gate: per sequence (1, B, D) or per step (T, 1, B, D)
        x = torch.mul(x, time_mask(masks, 0), out=new(tuple(x.shape), dtype=x.dtype, device=x.device))
    product(x.reshape(batch * steps, features), kernel, out.view(batch * steps, gates * units), bias)
    return out


def input_grads(x: Tensor, kernel: Tensor, masks: Optional[Tensor], dz: Tensor, need_x: bool, need_kernel: bool,
                gates: int, batch_gates: bool = True, matmul: Optional[Matmul] = None
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dx (B, T, D) and dK (D, G·U) from the gradients of the projections dz (B, T, G·U) (``batch_gates``,
    ``matmul``: see the module docstring)."""
    batch, steps, features = x.shape
    units = kernel.shape[1] // gates
    flat_dz = dz.view(batch * steps, gates * units)
    dx = dkernel = None
    if per_gate(masks) and batched(x, gates, batch_gates):
        dz_gates = gate_columns(flat_dz, gates)  # (G, B·T, U)
        if need_kernel:
            per_gate_grads = torch.bmm(masked_copies(x, masks, range(gates)).transpose(1, 2), dz_gates)
            dkernel = per_gate_grads.transpose(0, 1).reshape(features, gates * units)
        if need_x:
            through = torch.bmm(dz_gates, gate_columns(kernel, gates).transpose(1, 2))  # (G, B·T, D)
            dx = through.view(gates, batch, steps, features).mul_(gate_masks(masks, range(gates))).sum(0)
        return dx, dkernel
    if per_gate(masks):
        dx = torch.zeros_like(x) if need_x else None
        dkernel = kernel.new_empty(kernel.shape) if need_kernel else None
        scratch = torch.empty_like(x) if need_kernel else None
        for g in range(gates):
            cols = slice(g * units, (g + 1) * units)
            mask = time_mask(masks, g)
            if need_kernel:
                masked = torch.mul(x, mask, out=scratch).view(batch * steps, features)
                product(masked.t(), flat_dz[:, cols], matmul, dkernel[:, cols])
            if need_x:
                dx.addcmul_(product(flat_dz[:, cols], kernel[:, cols].t(), matmul).view(batch, steps, features), mask)
        return dx, dkernel
    mask = None if masks is None else time_mask(masks, 0)
    if need_kernel:
        masked = x if mask is None else x * mask
        dkernel = product(masked.reshape(batch * steps, features).t(), flat_dz, matmul)
    if need_x:
        dx = product(flat_dz, kernel.t(), matmul).view(batch, steps, features)
        if mask is not None:
            dx = dx.mul_(mask)
    return dx, dkernel


def recurrent_kernel_grad(previous: Tensor, masks: Any, grads: Tensor, gates: Optional[Sequence[int]] = None,
                          batch_gates: bool = True, matmul: Optional[Matmul] = None) -> Tensor:
    """Columns of dR, (H, k·U) = Σ_t (h_{t-1} ⊙ m_g)ᵀ dz_g, for k gates at once.

    previous: the states the products read, (B, T, H); masks: (G, B, H) one per gate, (1, B, H) shared,
    either per step (T, ·, B, H) (a tensor or a CounterMask), or None; grads: the gradients of the products'
    outputs, (B, T, k·U) -- a column slice of a wider buffer is fine (flattening (B, T) keeps it a view);
    gates: which per-gate masks the k column blocks use, consecutive (default: all of them, in order);
    batch_gates, matmul: see the module docstring.
    """
    batch, steps, width = grads.shape
    flat_grads = grads.reshape(batch * steps, width)
    if not per_gate(masks):
        masked = previous if masks is None else previous * time_mask(masks, 0)
        return product(masked.reshape(batch * steps, previous.shape[-1]).t(), flat_grads, matmul)
    gates = range(masks.shape[-3]) if gates is None else gates
    units = width // len(gates)
    if batched(previous, len(gates), batch_gates):
        per_gate_grads = torch.bmm(masked_copies(previous, masks, gates).transpose(1, 2),
                                   gate_columns(flat_grads, len(gates)))
        return per_gate_grads.transpose(0, 1).reshape(previous.shape[-1], width)
    grad = grads.new_empty(previous.shape[-1], width)
    scratch = grads.new_empty(previous.shape)
    for block, g in enumerate(gates):
        cols = slice(block * units, (block + 1) * units)
        masked = torch.mul(previous, time_mask(masks, g), out=scratch).view(batch * steps, previous.shape[-1])
        product(masked.t(), flat_grads[:, cols], matmul, grad[:, cols])
    return grad


def gru_recurrent_kernel_grad(previous: Tensor, masks: Any, dz: Tensor, side: Tensor, reset_after: bool,
                              batch_gates: bool = True, matmul: Optional[Matmul] = None) -> Tensor:
    """dR (H, 3U) of a GRU from its gate gradients dz (B, T, 3U) (z, r, candidate).

    The z and r columns are products of h_{t-1} ⊙ m_g with dz; the candidate's differ by form -- ``side``
    (B, T, U) is, reset_after, the gradient of its product's output dn ⊙ r (the product reads h ⊙ m_h), and
    reset_before, the product's input a = r ⊙ (h ⊙ m_h) (its output's gradient is dn itself).
    """
    units = dz.shape[-1] // 3
    zr, candidate = slice(0, 2 * units), slice(2 * units, 3 * units)
    if reset_after:
        candidate_grad = recurrent_kernel_grad(previous, masks, side, gates=(2,), batch_gates=batch_gates,
                                               matmul=matmul)
    else:
        candidate_grad = recurrent_kernel_grad(side, None, dz[..., candidate], matmul=matmul)
    zr_grad = recurrent_kernel_grad(previous, masks, dz[..., zr], gates=(0, 1), batch_gates=batch_gates,
                                    matmul=matmul)
    return torch.cat([zr_grad, candidate_grad], dim=1)


def gru_recurrent_bias_grad(dz: Tensor, d_inner: Tensor) -> Tensor:
    """d rb (3U,) of a reset_after GRU: z and r add it to their inputs (dz's first 2U columns), the candidate
    inside r ⊙ (h R_n + rb_n) (its gradient there is d_inner = dn ⊙ r, (B, T, U))."""
    units = dz.shape[-1] // 3
    return torch.cat([dz[..., :2 * units].sum(dim=(0, 1)), d_inner.sum(dim=(0, 1))])
