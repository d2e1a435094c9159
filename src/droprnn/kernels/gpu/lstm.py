"""LSTM on the GPU: cuBLAS products through torch, and one Triton kernel per step for everything else.

The plain version of this recurrence -- the oracle it is tested against -- is
:func:`droprnn.kernels.reference.run` with :meth:`droprnn.LSTMCell.transition`. Per cell (stacked cells
run one after another, as in ``kernels/fused.py``: a cell's states at masked steps are held, so feeding
it the previous cell's carried h sequence equals the reference's per-step interleaving)::

    forward
        P       = (x ⊙ m_x^g) @ K_g + b_g            all steps in one product (one per gate with per-gate
                                                      input masks), written (B, T, 4, U) or (4, B, T, U)
        for t in 0 … T-1:
            Z   = (h_{t-1} ⊙ m_h^g) @ R_g             cuBLAS: torch.mm (no / shared mask) or torch.bmm over
                                                      the 4 gates (per-gate masks), into a fixed buffer
            kernel _forward_step: i, f, o = σ(P_t + Z), g = φ(P_t + Z); c_t = f c_{t-1} + i g;
                  h_t = o φ(c_t); hold h, c where the step is masked; write the activated gates over P_t
                  (saved for the backward), c_t, h_t, and h_t ⊙ m_h^g -- the next step's product input
    backward (t = T-1 … 0)
        kernel _backward_step: dh = dH_t + carry + Σ_g Q_g ⊙ m_h^g; gate gradients dz from the saved
                  activations; dc carried through f; masked steps pass dh and dc on and have dz = 0
        Q       = dz_t @ R_gᵀ                         cuBLAS, as in the forward
    after the loop, large products: dR_g = (H_prev ⊙ m_h^g)ᵀ dZ_g, dK_g = (x ⊙ m_x^g)ᵀ dZ_g,
        db = Σ dZ, dx = Σ_g (dZ_g K_gᵀ) ⊙ m_x^g

Saved for the backward: the activated gates (over the projections), the h and c sequences -- never a
(T, B, H) mask. The kernels compute in float32 for float32 tensors and in float64 for float64 ones;
results are stored in the input dtype. A backward that must itself be differentiable (``create_graph=True``,
double backward) differentiates the same recurrence written with the cell's own step in plain autograd
ops instead: slower, and exact.

Time loops in CUDA graphs (``graphs.py``). Two launches per step and direction (a product and a Triton
kernel) cost the host about 100-200 µs per step, whatever the width, so the eager loops are bound by
the host. Each direction's loop is therefore captured once per key (``_LoopKey``: device, dtype, B, T,
U, mask layout and count, step mask, dH present, activations, float32 matmul precision, stream) on its
second call, and replayed after that: a :class:`_Loop` owns static buffers, each call writes its inputs
into them (the projections directly), replays, and copies out what outlives the call (the saved gates,
h and c, dc0), so calls sharing a key -- two layers, two calls before a backward, ``retain_graph`` --
never see each other's data. Eager instead: CPU tensors (Triton's interpreter), a stream already being
captured (a user's own graph), ``DROPRNN_CUDA_GRAPHS=0``. At most ``graphs.CACHE_SIZE`` loops are kept.

Speed (``benchmarks/gpu_speed.py``, NVIDIA H200, torch 2.11 + CUDA 13.0, cuDNN 9.19, Triton 3.6, float32):
median ms of a training step (forward + backward), and × torch.nn.LSTM (cuDNN, which has no recurrent
dropout) with torch's default settings; all columns from one run::

    shape (B, T, D, U)      cuDNN  gpu rd       gpu rd eager  gpu          gpu eager     gpu rd TF32  cuDNN no TF32
    (64, 100, 256, 256)      5.4    5.3 (0.98)   32.2 (5.9)    3.2 (0.59)   29.2 (5.4)    5.9 (1.08)   6.2 (1.15)
    (64, 100, 512, 512)      6.7    7.2 (1.08)   34.0 (5.1)    5.0 (0.76)   31.4 (4.7)    5.9 (0.89)   6.5 (0.98)
    (128, 200, 1024, 1024)  13.7   37.8 (2.75)   59.0 (4.3)   34.2 (2.49)   60.6 (4.4)   15.3 (1.12)  38.5 (2.80)
    (32, 500, 256, 256)     19.7   14.0 (0.71)  120.5 (6.1)   10.9 (0.55)  128.6 (6.5)   11.6 (0.59)  23.4 (1.19)
    (1, 1000, 256, 256)     36.2   13.6 (0.38)  223.9 (6.2)    9.7 (0.27)  189.4 (5.2)   12.9 (0.36)  36.9 (1.02)

"rd": dropout = recurrent_dropout = 0.25 (Keras's per-gate masks); "eager": ``DROPRNN_CUDA_GRAPHS=0``;
"TF32": ``torch.set_float32_matmul_precision("high")``, TF32 products. Graphs and eager loops agree bit
for bit. With graphs a step costs about 14 µs forward + backward at B = 1 (224 µs eager). The largest
shape is bound by the products, not the host: torch's defaults let cuDNN use TF32 but keep cuBLAS in
full float32 -- with TF32 off cuDNN takes as long as these kernels (38.5 ms), with TF32 products these
kernels take 1.12× cuDNN. (An earlier run: a Python loop over torch.nn.LSTMCell with variational masks
took 10-20× cuDNN, droprnn's reference loop 26-29×.)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ...cells import CellWeights, StepMasks
from ...dropout.plan import DropoutPlan
from ...errors import DroprnnError
from .. import reference
from . import ACTIVATION_CODES, graphs, plan_reason

Tensor = torch.Tensor
States = tuple[Tensor, ...]

GATES = 4
# Units per program: a (B, ceil(U / BLOCK)) grid; 128 keeps enough programs for small batches on big GPUs.
_MAX_BLOCK = 128


# ---------------------------------------------------------------------------------------------- Triton
# Only Triton builtins here (tl.exp, tl.where, …), no tl.sigmoid: the library's own @jit helpers are
# compiled for the GPU when Triton is imported before TRITON_INTERPRET=1 is set, and would then refuse to
# run inside an interpreted kernel.
@triton.jit
def _activate(x, CODE: tl.constexpr):
    """The activation with code CODE (gpu.ACTIVATION_CODES) of x."""
    if CODE == 0:  # tanh, from exp(-2|x|) so that it never overflows
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0.0, -y, y)
    elif CODE == 1:  # sigmoid
        return 1.0 / (1.0 + tl.exp(-x))
    elif CODE == 2:  # hard_sigmoid, Keras 3: relu6(x + 3) / 6
        return tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif CODE == 3:  # relu
        return tl.maximum(x, 0.0)
    else:  # linear
        return x


@triton.jit
def _through(grad, y, CODE: tl.constexpr):
    """grad · f'(x), from the activation's output y = f(x) (torch's derivatives, boundaries included)."""
    if CODE == 0:
        return grad * (1.0 - y * y)
    elif CODE == 1:
        return grad * (1.0 - y) * y
    elif CODE == 2:  # relu6's gradient is zero at both corners
        return tl.where((y > 0.0) & (y < 1.0), grad / 6.0, 0.0)
    elif CODE == 3:
        return tl.where(y > 0.0, grad, 0.0)
    else:
        return grad


# Every buffer the step kernels touch is contiguous in a layout fixed by the sizes (B, T, U) and the
# constexprs, so a launch passes pointers and four sizes only: each argument costs launch time on the host,
# and the per-step launches are what bounds a short-sequence step. Offsets start from the int64 batch index,
# so they are computed in 64 bits. The layouts (g: gate, k: mask, t: step):
#   gates      (B, T, 4, U), or (4, B, T, U) when GATE_MAJOR (per-gate input masks): the projections,
#              overwritten in place by the activated gates i, f, g, o
#   product    (4, B, U) when N_MASKS == 4 (one product per gate), else (B, 4, U); dz_step likewise
#   h, c       (B, T + 1, U): slot 0 holds the initial state, slot t + 1 the state after step t
#   masks      (m, B, U) recurrent masks; masked_h and back (m, B, U) with m = max(N_MASKS, 1)
#   valid      (B, T) 0/1; dhs (B, T, U); dz (B, T, 4, U)
@triton.jit
def _gate_offset(b, t, g, B, T, U, GATE_MAJOR: tl.constexpr):
    if GATE_MAJOR:
        return ((g * B + b) * T + t) * U
    else:
        return ((b * T + t) * 4 + g) * U


@triton.jit
def _per_gate_offset(b, g, B, U, N_MASKS: tl.constexpr):
    """Offset of (gate g, sequence b) in a step's product / dz_step."""
    if N_MASKS == 4:
        return (g * B + b) * U
    else:
        return (b * 4 + g) * U


@triton.jit(do_not_specialize=["t"])
def _forward_step(
    gates_ptr, product_ptr, h_ptr, c_ptr, masked_h_ptr, masks_ptr, valid_ptr, t, B, U, T,
    GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, HAS_VALID: tl.constexpr, ACT: tl.constexpr,
    REC_ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One forward step for the units [BLOCK·j, BLOCK·(j+1)) of sequence b (program (b, j))."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = u < U
    gi = gates_ptr + _gate_offset(b, t, 0, B, T, U, GATE_MAJOR) + u
    gf = gates_ptr + _gate_offset(b, t, 1, B, T, U, GATE_MAJOR) + u
    gc = gates_ptr + _gate_offset(b, t, 2, B, T, U, GATE_MAJOR) + u
    go = gates_ptr + _gate_offset(b, t, 3, B, T, U, GATE_MAJOR) + u
    pi = product_ptr + _per_gate_offset(b, 0, B, U, N_MASKS) + u
    pf = product_ptr + _per_gate_offset(b, 1, B, U, N_MASKS) + u
    pc = product_ptr + _per_gate_offset(b, 2, B, U, N_MASKS) + u
    po = product_ptr + _per_gate_offset(b, 3, B, U, N_MASKS) + u
    zi = tl.load(gi, mask=inside).to(COMPUTE) + tl.load(pi, mask=inside).to(COMPUTE)
    zf = tl.load(gf, mask=inside).to(COMPUTE) + tl.load(pf, mask=inside).to(COMPUTE)
    zc = tl.load(gc, mask=inside).to(COMPUTE) + tl.load(pc, mask=inside).to(COMPUTE)
    zo = tl.load(go, mask=inside).to(COMPUTE) + tl.load(po, mask=inside).to(COMPUTE)
    i = _activate(zi, REC_ACT)
    f = _activate(zf, REC_ACT)
    g = _activate(zc, ACT)
    o = _activate(zo, REC_ACT)
    before = (b * (T + 1) + t) * U + u  # slot t: the states before this step
    after = before + U
    c_prev = tl.load(c_ptr + before, mask=inside).to(COMPUTE)
    c = f * c_prev + i * g
    h = o * _activate(c, ACT)
    if HAS_VALID:  # a masked step holds both states
        keep = tl.load(valid_ptr + b * T + t) != 0
        h_prev = tl.load(h_ptr + before, mask=inside).to(COMPUTE)
        c = tl.where(keep, c, c_prev)
        h = tl.where(keep, h, h_prev)
    dtype = h_ptr.dtype.element_ty
    tl.store(gi, i.to(dtype), mask=inside)
    tl.store(gf, f.to(dtype), mask=inside)
    tl.store(gc, g.to(dtype), mask=inside)
    tl.store(go, o.to(dtype), mask=inside)
    tl.store(c_ptr + after, c.to(dtype), mask=inside)
    h_out = h.to(dtype)
    tl.store(h_ptr + after, h_out, mask=inside)
    # The next step's product input, so that no separate pass multiplies the masks in.
    if N_MASKS == 0:
        tl.store(masked_h_ptr + b * U + u, h_out, mask=inside)
    else:
        for k in tl.static_range(N_MASKS):
            m = tl.load(masks_ptr + (k * B + b) * U + u, mask=inside)
            tl.store(masked_h_ptr + (k * B + b) * U + u, h_out * m, mask=inside)


@triton.jit(do_not_specialize=["t"])
def _backward_step(
    gates_ptr, c_ptr, valid_ptr, dhs_ptr, back_ptr, masks_ptr, dh_ptr, dc_ptr, dz_ptr, dz_step_ptr, t, B, U, T,
    GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DHS: tl.constexpr,
    ACT: tl.constexpr, REC_ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One backward step: gate gradients and the carries dh (direct, through held steps) and dc, in place.

    ``back`` holds the gradient of the step after this one through its recurrent product, per mask:
    Q_g = dz_g @ R_gᵀ; it reaches h as Σ_g Q_g ⊙ m_g.
    """
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = u < U
    dh = tl.load(dh_ptr + b * U + u, mask=inside).to(COMPUTE)
    if HAS_DHS:
        dh += tl.load(dhs_ptr + (b * T + t) * U + u, mask=inside).to(COMPUTE)
    if N_MASKS == 0:
        dh += tl.load(back_ptr + b * U + u, mask=inside).to(COMPUTE)
    else:
        for k in tl.static_range(N_MASKS):
            q = tl.load(back_ptr + (k * B + b) * U + u, mask=inside).to(COMPUTE)
            m = tl.load(masks_ptr + (k * B + b) * U + u, mask=inside).to(COMPUTE)
            dh += q * m
    i = tl.load(gates_ptr + _gate_offset(b, t, 0, B, T, U, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    f = tl.load(gates_ptr + _gate_offset(b, t, 1, B, T, U, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    g = tl.load(gates_ptr + _gate_offset(b, t, 2, B, T, U, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    o = tl.load(gates_ptr + _gate_offset(b, t, 3, B, T, U, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    before = (b * (T + 1) + t) * U + u
    c_prev = tl.load(c_ptr + before, mask=inside).to(COMPUTE)
    c = tl.load(c_ptr + before + U, mask=inside).to(COMPUTE)
    tc = _activate(c, ACT)
    dc_next = tl.load(dc_ptr + b * U + u, mask=inside).to(COMPUTE)
    dc = dc_next + _through(dh * o, tc, ACT)
    dzi = _through(dc * g, i, REC_ACT)
    dzf = _through(dc * c_prev, f, REC_ACT)
    dzc = _through(dc * i, g, ACT)
    dzo = _through(dh * tc, o, REC_ACT)
    dc_prev = dc * f
    dh_held = tl.full((BLOCK,), 0.0, COMPUTE)
    if HAS_VALID:  # a masked step held h and c: their gradients pass on, and its gates get none
        keep = tl.load(valid_ptr + b * T + t) != 0
        dzi = tl.where(keep, dzi, 0.0)
        dzf = tl.where(keep, dzf, 0.0)
        dzc = tl.where(keep, dzc, 0.0)
        dzo = tl.where(keep, dzo, 0.0)
        dc_prev = tl.where(keep, dc_prev, dc_next)
        dh_held = tl.where(keep, dh_held, dh)
    dtype = dz_ptr.dtype.element_ty
    z = dz_ptr + (b * T + t) * 4 * U + u
    tl.store(z, dzi.to(dtype), mask=inside)
    tl.store(z + U, dzf.to(dtype), mask=inside)
    tl.store(z + 2 * U, dzc.to(dtype), mask=inside)
    tl.store(z + 3 * U, dzo.to(dtype), mask=inside)
    tl.store(dz_step_ptr + _per_gate_offset(b, 0, B, U, N_MASKS) + u, dzi.to(dtype), mask=inside)
    tl.store(dz_step_ptr + _per_gate_offset(b, 1, B, U, N_MASKS) + u, dzf.to(dtype), mask=inside)
    tl.store(dz_step_ptr + _per_gate_offset(b, 2, B, U, N_MASKS) + u, dzc.to(dtype), mask=inside)
    tl.store(dz_step_ptr + _per_gate_offset(b, 3, B, U, N_MASKS) + u, dzo.to(dtype), mask=inside)
    tl.store(dc_ptr + b * U + u, dc_prev.to(dtype), mask=inside)
    tl.store(dh_ptr + b * U + u, dh_held.to(dtype), mask=inside)


# Whether Triton compiled the kernels above for its CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(_forward_step).__name__ == "InterpretedFunction"
_COMPUTE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _block(units: int) -> int:
    return min(triton.next_power_of_2(units), _MAX_BLOCK)


# ---------------------------------------------------------------------------------------------- products
def _time_mask(masks: Tensor, g: int) -> Tensor:
    """Mask g of input masks (m, B, D) or per step (T, m, B, D), broadcastable against x (B, T, D)."""
    if masks.dim() == 4:
        return masks[:, g].permute(1, 0, 2)
    return masks[g].unsqueeze(1)


def _per_gate(masks: Optional[Tensor]) -> bool:
    return masks is not None and masks.shape[-3] == GATES


def _project(x: Tensor, kernel: Tensor, bias: Optional[Tensor], masks: Optional[Tensor], out: Tensor) -> Tensor:
    """Input projections of all steps with the bias, written into ``out``: x (B, T, D) -> (B, T, 4U), or
    gate-major (4, B, T, U) with per-gate masks (one product per gate, one masked copy of x alive at a time).
    ``out`` is a time loop's gates buffer, so that a captured loop's static buffer is filled without a copy."""
    batch, steps, features = x.shape
    units = kernel.shape[1] // GATES
    if _per_gate(masks):
        scratch = torch.empty_like(x)
        for g in range(GATES):
            cols = slice(g * units, (g + 1) * units)
            masked = torch.mul(x, _time_mask(masks, g), out=scratch).view(batch * steps, features)
            target = out[g].view(batch * steps, units)
            if bias is None:
                torch.mm(masked, kernel[:, cols], out=target)
            else:
                torch.addmm(bias[cols], masked, kernel[:, cols], out=target)
        return out
    if masks is not None:
        x = x * _time_mask(masks, 0)
    flat = x.reshape(batch * steps, features)
    target = out.view(batch * steps, GATES * units)
    if bias is None:
        torch.mm(flat, kernel, out=target)
    else:
        torch.addmm(bias, flat, kernel, out=target)
    return out


def _input_grads(x: Tensor, kernel: Tensor, masks: Optional[Tensor], dz: Tensor, need_x: bool,
                 need_kernel: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dx (B, T, D) and dK (D, 4U) from the gate gradients dz (B, T, 4U), in large products."""
    batch, steps, features = x.shape
    units = kernel.shape[1] // GATES
    flat_dz = dz.view(batch * steps, GATES * units)
    dx = dkernel = None
    if _per_gate(masks):
        dx = torch.zeros_like(x) if need_x else None
        dkernel = kernel.new_empty(kernel.shape) if need_kernel else None
        scratch = torch.empty_like(x) if need_kernel else None
        for g in range(GATES):
            cols = slice(g * units, (g + 1) * units)
            mask = _time_mask(masks, g)
            if need_kernel:
                masked = torch.mul(x, mask, out=scratch).view(batch * steps, features)
                dkernel[:, cols] = masked.t() @ flat_dz[:, cols]
            if need_x:
                dx.addcmul_((flat_dz[:, cols] @ kernel[:, cols].t()).view(batch, steps, features), mask)
        return dx, dkernel
    mask = None if masks is None else _time_mask(masks, 0)
    if need_kernel:
        masked = x if mask is None else x * mask
        dkernel = masked.reshape(batch * steps, features).t() @ flat_dz
    if need_x:
        dx = (flat_dz @ kernel.t()).view(batch, steps, features)
        if mask is not None:
            dx = dx.mul_(mask)
    return dx, dkernel


def _recurrent_kernel_grad(h_buffer: Tensor, masks: Optional[Tensor], dz: Tensor) -> Tensor:
    """dR (H, 4U) = Σ_t (h_{t-1} ⊙ m_g)ᵀ dz_g: the h sequence shifted by one step against dz (B, T, 4U)."""
    batch, steps, width = dz.shape
    units = width // GATES
    previous = h_buffer[:, :steps]
    flat_dz = dz.view(batch * steps, width)
    if not _per_gate(masks):
        masked = previous if masks is None else previous * masks[0].unsqueeze(1)
        return masked.reshape(batch * steps, -1).t() @ flat_dz
    grad = dz.new_empty(previous.shape[-1], width)
    scratch = dz.new_empty(previous.shape)
    for g in range(GATES):
        cols = slice(g * units, (g + 1) * units)
        masked = torch.mul(previous, masks[g].unsqueeze(1), out=scratch).view(batch * steps, -1)
        grad[:, cols] = masked.t() @ flat_dz[:, cols]
    return grad


# ---------------------------------------------------------------------------------------------- double backward
def _plain_layer(cell, x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor, h0: Tensor, c0: Tensor,
                 input_masks: Optional[Tensor], rec: Optional[Tensor], valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """What _LstmLayer computes, in the cell's own plain autograd ops: (h sequence (B, T, U), last c (B, U))."""
    weights = CellWeights(kernel, R, bias)
    projected = cell.project_inputs(x, weights, input_masks)
    states, sequence = (h0, c0), []
    for t in range(x.shape[1]):
        _, new = cell.step(projected[:, t], states, weights, StepMasks(recurrent=rec))
        if valid is not None:
            keep = valid[:, t, None] != 0
            new = tuple(torch.where(keep, fresh, old) for fresh, old in zip(new, states))
        states = new
        sequence.append(new[0])
    return torch.stack(sequence, dim=1), states[1]


def _differentiable_grads(ctx, inputs: tuple, masks: tuple, grad_outputs: tuple) -> tuple:
    """The backward as a graph autograd can differentiate again (``create_graph=True``).

    ``inputs`` are the saved (x, kernel, bias, R, h0, c0) -- still attached to the caller's graph, so the
    gradients built here reach it; ``masks`` are (input masks, recurrent masks, valid).
    """
    wanted = [k for k, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[k]]
    with torch.enable_grad():
        outputs = _plain_layer(ctx.cell, *inputs, *masks)
        grads = torch.autograd.grad(
            outputs, [inputs[k] for k in wanted],
            [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grad_outputs)],
            create_graph=True, allow_unused=True,
        )
    result: list[Optional[Tensor]] = [None] * len(ctx.needs_input_grad)
    for k, grad in zip(wanted, grads):
        result[k] = grad
    return tuple(result)


# ---------------------------------------------------------------------------------------------- time loops
class _LoopKey(NamedTuple):
    """Everything a time loop's buffers and launches depend on. Calls with equal keys can replay one
    captured loop, so this is the key of :class:`graphs.GraphCache` (``D`` is absent: the input
    projection runs before the loop, outside the graph)."""

    backward: bool
    device: torch.device
    dtype: torch.dtype
    batch: int
    steps: int
    units: int
    gate_major: bool  # per-gate input masks: the gates are laid out (4, B, T, U)
    n_masks: int  # recurrent masks: 0, 1 (shared) or 4 (per gate: one product per gate)
    has_valid: bool  # a step mask (B, T)
    has_dhs: bool  # backward: a gradient arrives for the h sequence (always False forward)
    codes: tuple  # (activation, recurrent_activation) codes, constexprs of the kernels
    matmul_precision: str  # a captured cuBLAS call keeps the float32 precision (TF32 or not) of its capture
    stream: int  # the stream that orders the use of an entry's buffers: another stream gets its own entry


def _loop_key(backward: bool, x: Tensor, units: int, input_masks: Optional[Tensor], rec: Optional[Tensor],
              valid: Optional[Tensor], codes: tuple, has_dhs: bool = False) -> _LoopKey:
    """The key of the forward (or backward) time loop of a call on x (B, T, D) with these masks."""
    batch, steps, _ = x.shape
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    return _LoopKey(backward, x.device, x.dtype, batch, steps, units, _per_gate(input_masks),
                    0 if rec is None else rec.shape[0], valid is not None, has_dhs, tuple(codes),
                    torch.get_float32_matmul_precision(), stream)


class _Loop:
    """Buffers of one time loop and its launches. A *static* loop (one that a CUDA graph replays) owns
    every buffer, and ``load`` copies a call's inputs into them; an eager loop takes the call's inputs as
    they are and allocates its working buffers only."""

    def __init__(self, key: _LoopKey, static: bool):
        self.key, self.static, self.device = key, static, key.device
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.lock = threading.Lock()

    def _new(self, *shape: int) -> Tensor:
        # Static buffers start at zero: the warm-up before capture runs a step on them, on defined values.
        allocate = torch.zeros if self.static else torch.empty
        return allocate(shape, dtype=self.key.dtype, device=self.key.device)

    def _take(self, name: str, value: Optional[Tensor]) -> None:
        """Input ``name`` of this call: copied into the static buffer, or taken as it is (contiguous)."""
        if value is None:
            return
        if self.static:
            getattr(self, name).copy_(value)
        else:
            setattr(self, name, value.contiguous())

    def _recurrent(self, R: Tensor, panels: Tensor) -> None:
        """The recurrent kernel as the products take it: ``panels`` (4, U, U) with per-gate masks, else R
        (U, 4U) itself -- left as it is in an eager loop (a transposed view from droprnn.nn, say), as before."""
        if self.static:
            self.R.copy_(panels if self.key.n_masks == GATES else R)
        else:
            self.R = panels.contiguous() if self.key.n_masks == GATES else R

    def steps(self) -> range:
        raise NotImplementedError

    def run(self, steps: range) -> None:
        raise NotImplementedError


class _ForwardLoop(_Loop):
    """The forward time loop (layouts: the comment above the kernels).

    gates (B, T, 4U) or (4, B, T, U), filled with the projections by ``load`` and overwritten with the
    activated gates; h, c (B, T + 1, U); masked_h (m, B, U); product (B, 4U) or (4, B, U); R (U, 4U) or
    the panels R_g (4, U, U); rec (m, B, U) or None; valid (B, T) or None.
    """

    def __init__(self, key: _LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U, m = key.batch, key.steps, key.units, key.n_masks
        self.gates = self._new(GATES, B, T, U) if key.gate_major else self._new(B, T, GATES * U)
        self.h = self._new(B, T + 1, U)
        self.c = self._new(B, T + 1, U)
        self.masked_h = self._new(max(m, 1), B, U)  # h_{t-1} ⊙ m_g, the product's input
        self.product = self._new(GATES, B, U) if m == GATES else self._new(B, GATES * U)
        self.R = (self._new(GATES, U, U) if m == GATES else self._new(U, GATES * U)) if static else None
        self.rec = self._new(m, B, U) if static and m else None
        self.valid = self._new(B, T) if static and key.has_valid else None

    def load(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor], input_masks: Optional[Tensor], R: Tensor,
             h0: Tensor, c0: Tensor, rec: Optional[Tensor], valid: Optional[Tensor]) -> None:
        units = self.key.units
        _project(x, kernel, bias, input_masks, out=self.gates)
        self.h[:, 0] = h0
        self.c[:, 0] = c0
        if rec is None:
            self.masked_h[0] = h0
        else:
            torch.mul(h0, rec, out=self.masked_h)
        self._recurrent(R, R.reshape(units, GATES, units).permute(1, 0, 2))
        self._take("rec", rec)
        self._take("valid", valid)

    def steps(self) -> range:
        return range(self.key.steps)

    def run(self, steps: range) -> None:
        key = self.key
        block = _block(key.units)
        launch = _forward_step[(key.batch, triton.cdiv(key.units, block))]
        constants = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks, HAS_VALID=key.has_valid, ACT=key.codes[0],
                         REC_ACT=key.codes[1], COMPUTE=_COMPUTE[key.dtype], BLOCK=block)
        masks_arg = self.masked_h if self.rec is None else self.rec  # any tensor where the kernel never reads it
        valid_arg = self.masked_h if self.valid is None else self.valid
        h_for_mm = self.masked_h[0]
        for t in steps:
            if key.n_masks == GATES:  # one product per gate: (4, B, U) @ (4, U, U) -> (4, B, U)
                torch.bmm(self.masked_h, self.R, out=self.product)
            else:  # (B, U) @ (U, 4U) -> (B, 4U)
                torch.mm(h_for_mm, self.R, out=self.product)
            launch(self.gates, self.product, self.h, self.c, self.masked_h, masks_arg, valid_arg, t, key.batch,
                   key.units, key.steps, **constants)


class _BackwardLoop(_Loop):
    """The backward time loop, from step T-1 down to 0.

    Inputs: gates and c as the forward left them, valid (B, T) or None, d_hs (B, T, U) or None, rec
    (m, B, U) or None, R (U, 4U) or the panels R_gᵀ (4, U, U). Working buffers: back (m, B, U), the
    Q_g of the step after; dh (B, U), the gradient carried through held steps; dc (B, U); dz (B, T, 4U);
    dz_step (B, 4U) or (4, B, U).
    """

    def __init__(self, key: _LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U, m = key.batch, key.steps, key.units, key.n_masks
        if static:
            self.gates = self._new(GATES, B, T, U) if key.gate_major else self._new(B, T, GATES * U)
            self.c = self._new(B, T + 1, U)
            self.R = self._new(GATES, U, U) if m == GATES else self._new(U, GATES * U)
        self.valid = self._new(B, T) if static and key.has_valid else None
        self.d_hs = self._new(B, T, U) if static and key.has_dhs else None
        self.rec = self._new(m, B, U) if static and m else None
        self.back = self._new(max(m, 1), B, U)
        self.dh = self._new(B, U)
        self.dc = self._new(B, U)
        self.dz = self._new(B, T, GATES * U)
        self.dz_step = self._new(GATES, B, U) if m == GATES else self._new(B, GATES * U)

    def load(self, gates: Tensor, c_buffer: Tensor, valid: Optional[Tensor], d_hs: Optional[Tensor],
             rec: Optional[Tensor], R: Tensor, d_c_last: Optional[Tensor]) -> None:
        units = self.key.units
        self._take("gates", gates)
        self._take("c", c_buffer)
        self._take("valid", valid)
        self._take("d_hs", d_hs)  # e.g. the expanded ones of out.sum(): copied into contiguous memory
        self._take("rec", rec)
        self._recurrent(R, R.reshape(units, GATES, units).permute(1, 2, 0))
        self.back.zero_()  # no step after the last
        self.dh.zero_()
        if d_c_last is None:
            self.dc.zero_()
        else:
            self.dc.copy_(d_c_last)

    def steps(self) -> range:
        return range(self.key.steps - 1, -1, -1)

    def run(self, steps: range) -> None:
        key = self.key
        block = _block(key.units)
        launch = _backward_step[(key.batch, triton.cdiv(key.units, block))]
        constants = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks, HAS_VALID=key.has_valid,
                         HAS_DHS=key.has_dhs, ACT=key.codes[0], REC_ACT=key.codes[1], COMPUTE=_COMPUTE[key.dtype],
                         BLOCK=block)
        valid_arg = self.dh if self.valid is None else self.valid
        dhs_arg = self.dh if self.d_hs is None else self.d_hs
        masks_arg = self.dh if self.rec is None else self.rec
        R_t = self.R if key.n_masks == GATES else self.R.t()  # R_gᵀ panels, or (4U, U)
        back_for_mm = self.back[0]
        for t in steps:
            launch(self.gates, self.c, valid_arg, dhs_arg, self.back, masks_arg, self.dh, self.dc, self.dz,
                   self.dz_step, t, key.batch, key.units, key.steps, **constants)
            if key.n_masks == GATES:
                torch.bmm(self.dz_step, R_t, out=self.back)
            else:
                torch.mm(self.dz_step, R_t, out=back_for_mm)


_GRAPHS = graphs.GraphCache()


def clear_graph_cache() -> None:
    """Free every captured loop and its buffers (they are rebuilt on demand)."""
    _GRAPHS.clear()


def _captured(loop_class: type, key: _LoopKey) -> _Loop:
    """A static loop for ``key``, its steps captured in a CUDA graph."""
    # Not inference tensors even when built inside torch.inference_mode(): later calls in training
    # write into them.
    with torch.inference_mode(False):
        loop = loop_class(key, static=True)
        steps = loop.steps()
        loop.graph = graphs.capture(key.device, loop=lambda: loop.run(steps), warm_up=lambda: loop.run(steps[:1]))
    return loop


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run_loop(loop_class: type, key: _LoopKey, x: Tensor, inputs: tuple, finish: Callable[[_Loop], Any]) -> Any:
    """Load ``inputs`` into a time loop, run all its steps, and return ``finish(loop)``.

    The steps are replayed from a captured loop when graphs can be used (graphs.unusable_reason) and the
    cache has one for ``key``; ``finish`` must then copy out whatever outlives the call, since the next
    replay overwrites the buffers (the entry's lock keeps another thread out until it has). Else they
    run eagerly, on buffers of this call's own.
    """
    if graphs.unusable_reason(x) is None:
        with _current_device(key.device):  # capture and replay launch on the current device's streams
            entry = _GRAPHS.lookup(key, lambda: _captured(loop_class, key))
            if entry is not None:
                with entry.lock:
                    entry.load(*inputs)
                    entry.graph.replay()
                    return finish(entry)
    loop = loop_class(key, static=False)
    loop.load(*inputs)
    loop.run(loop.steps())
    return finish(loop)


def _gradients(needs: tuple, loop: _BackwardLoop, x: Tensor, kernel: Tensor, bias: Optional[Tensor],
               h_buffer: Tensor, input_masks: Optional[Tensor], rec: Optional[Tensor]) -> tuple:
    """dx, dkernel, dbias, dR, dh0, dc0 (None where not needed) from a finished backward loop: large
    products over dz. None of them is a view of the loop's buffers (dc0 is copied out of a static loop)."""
    dz = loop.dz
    dh0 = dc0 = dbias = dR = None
    if needs[4]:
        dh0 = loop.dh + (loop.back[0] if rec is None else (loop.back * rec).sum(0))
    if needs[5]:
        dc0 = loop.dc.clone() if loop.static else loop.dc
    if bias is not None and needs[2]:
        dbias = dz.sum(dim=(0, 1))
    if needs[3]:
        dR = _recurrent_kernel_grad(h_buffer, rec, dz)
    dx, dkernel = _input_grads(x, kernel, input_masks, dz, needs[0], needs[1])
    return dx, dkernel, dbias, dR, dh0, dc0


# ---------------------------------------------------------------------------------------------- the layer function
class _LstmLayer(torch.autograd.Function):
    """One LSTM cell over a whole sequence -- input projection and recurrence -- as one autograd node.

    Inputs: x (B, T, D), kernel (D, 4U), bias (4U,) or None, R (U, 4U) (DropConnect applied), h0, c0
    (B, U), input masks (m, B, D) / (T, m, B, D) or None, recurrent masks (m, B, U) or None, valid (B, T)
    of 0/1 or None, the cell, its activation codes, and ``saving``: whether a backward may follow (inside
    forward, autograd's own flags say so even under no_grad). Returns the carried h sequence (B, T, U)
    and the last c (B, U).
    """

    @staticmethod
    def forward(ctx, x, kernel, bias, R, h0, c0, input_masks, rec, valid, cell, codes, saving):
        rec = None if rec is None else rec.contiguous()
        key = _loop_key(False, x, R.shape[1] // GATES, input_masks, rec, valid, codes)

        def finish(loop: _ForwardLoop):
            gates, h, c = loop.gates, loop.h, loop.c
            if loop.static:  # the next replay overwrites these buffers: copy out what outlives the call
                if not saving:
                    return h[:, 1:].clone(), c[:, -1].clone(), (None, None, None)
                gates, h, c = gates.clone(), h.clone(), c.clone()
            return h[:, 1:], c[:, -1].clone(), (gates, h, c)

        h_sequence, c_last, (gates, h_buffer, c_buffer) = _run_loop(
            _ForwardLoop, key, x, (x, kernel, bias, input_masks, R, h0, c0, rec, valid), finish)
        ctx.save_for_backward(x, kernel, bias, R, gates, h_buffer, c_buffer, input_masks, rec, valid, h0, c0)
        ctx.cell, ctx.codes = cell, codes
        return h_sequence, c_last

    @staticmethod
    def backward(ctx, d_hs, d_c_last):
        x, kernel, bias, R, gates, h_buffer, c_buffer, input_masks, rec, valid, h0, c0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-ops recurrence instead
            return _differentiable_grads(ctx, (x, kernel, bias, R, h0, c0), (input_masks, rec, valid), (d_hs, d_c_last))
        key = _loop_key(True, x, R.shape[1] // GATES, input_masks, rec, valid, ctx.codes, has_dhs=d_hs is not None)
        needs = ctx.needs_input_grad

        def finish(loop: _BackwardLoop):  # dz is consumed here, before any other replay can overwrite it
            return _gradients(needs, loop, x, kernel, bias, h_buffer, input_masks, rec)

        grads = _run_loop(_BackwardLoop, key, x, (gates, c_buffer, valid, d_hs, rec, R, d_c_last), finish)
        return (*grads, None, None, None, None, None, None)


def _saving(x: Tensor, w: CellWeights, states: States) -> bool:
    """Whether a backward may follow this layer's call (then the forward keeps what the backward reads)."""
    tensors = (x, w.kernel, w.input_bias, w.recurrent_kernel, *states)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def run(
    cells: Sequence[torch.nn.Module],
    x: Tensor,
    initial_states: Sequence[States],
    plan: DropoutPlan,
    step_mask: Optional[Tensor] = None,
    *,
    weights: Optional[Sequence[CellWeights]] = None,
    go_backwards: bool = False,
    zero_output_for_mask: bool = False,
    return_sequences: bool = True,
) -> tuple[Optional[Tensor], Tensor, list[States]]:
    """Same arguments and results as :func:`droprnn.kernels.reference.run`, for stacked LSTMCells."""
    reason = plan_reason(plan)
    if reason is not None:  # only a hand-made plan gets here: dispatch judges drawn plans by the layer's modes
        raise DroprnnError(f"impl='gpu' cannot run this dropout plan: {reason}. Use impl='reference'.")
    x, step_mask, weights = reference.prepare(cells, x, step_mask, plan, weights, go_backwards)
    dtype = x.dtype
    valid = None if step_mask is None else step_mask.to(dtype).contiguous()
    layer_input = x
    finals: list[States] = []
    for cell, w, masks, states in zip(cells, weights, plan.cells, initial_states):
        codes = (ACTIVATION_CODES[cell.activation], ACTIVATION_CODES[cell.recurrent_activation])
        h_sequence, last_c = _LstmLayer.apply(
            layer_input.contiguous(), w.kernel, w.input_bias, w.recurrent_kernel, states[0].contiguous(),
            states[1].contiguous(), _contiguous(masks.input, dtype), _contiguous(masks.recurrent, dtype), valid,
            cell, codes, _saving(layer_input, w, states),
        )
        finals.append((h_sequence[:, -1], last_c))
        layer_input = h_sequence
    outputs = layer_input
    if valid is not None:
        # Masked steps repeat the previous output (zero before the first real step), or are zero.
        shown = valid if zero_output_for_mask else valid.cummax(dim=1).values
        outputs = outputs * shown.unsqueeze(-1)
    return (outputs if return_sequences else None), outputs[:, -1], finals
