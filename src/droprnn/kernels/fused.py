"""The fused CPU path: the same contract as :func:`droprnn.kernels.reference.run`, faster.

Per cell (stacked cells run one after another: cell k's states at masked steps are discarded anyway,
so feeding it cell k-1's carried states equals the reference's per-step interleaving):

1. the input projections of all timesteps in one large product with the bias fused in; per-gate input
   masks make it one batched product over the gates, written gate-major (G, B, T, U) and read by the
   kernel in that layout, so nothing is concatenated;
2. the recurrence in C++ (``kernels/cpu/*.cpp``): per step one small product per panel of the recurrent
   kernel and one fused pass for the gates, masks, zoneout and step mask; its backward computes gate
   gradients from saved activations;
3. a backward in C++ that walks the steps once: the gate gradients from saved activations, and the
   gradient carried to the step before. The weight gradients and the input gradient are formed one of
   two ways. Where the weight gradients fit in cache, in the loop: accumulated step by step (masks
   applied in cache, per-thread sums), so no masked copy of a sequence is ever made. Where they do not
   (``_DEFER_BYTES``), a step's rank-B update of them runs at memory speed, so the loop hands back the
   gate gradients of every step instead and they are a few large products after it (``products.py``,
   as on the GPU), at the BLAS's speed: a 650-unit LSTM's backward at batch 20 took 57 ms instead of 83.

The outputs follow from the carried states: a masked step carries h, so "repeat the previous output" is h
itself once a real step has been seen, and zero before; ``zero_output_for_mask`` zeroes masked steps.

The hand-written backward is not itself differentiable; when a graph of the gradient is asked for
(``create_graph=True``, e.g. double backward), the backward instead differentiates the same recurrence
written with the cell's own step in plain autograd ops -- slower, and exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..cells import CellWeights, GRUCell, LSTMCell
from ..dropout.plan import CellMasks, DropoutPlan
from . import ACTIVATION_CODES, SUPPORTED_CELLS, cpu, products, reference

Tensor = torch.Tensor
States = tuple[Tensor, ...]

# A recurrent kernel up to this size stays one panel (it fits in L2 with room to spare).
_ONE_PANEL_BYTES = 512 * 1024
# Weight gradients (recurrent and input kernel together) above this size, and above _DEFER_BYTES_PER_ROW
# per sequence of the batch, are formed after the backward loop in large products instead of step by step
# in it (see the module docstring). Measured on 2 cores (Xeon, AVX-512), T = 35: at 512 KiB and below, or
# with 64 rows at 2 MiB, the loop was as fast or faster (0.6-1.0x); at 1.2 MiB and 20 rows the products
# took 1.3-1.5x less, at 13 MiB (650 units) 1.45-1.6x less with 20 rows and 1.25-1.3x with 64.
_DEFER_BYTES = 1024 * 1024
_DEFER_BYTES_PER_ROW = 48 * 1024


def unsupported_reason(cells: Sequence[torch.nn.Module], x: Tensor, weights: Sequence[CellWeights]) -> Optional[str]:
    """Why the fused path cannot run this call (None when it can). Decided from the arguments alone."""
    if x.device.type != "cpu":
        return f"the fused CPU kernels take CPU tensors; this input is on {x.device}"
    if x.dtype not in (torch.float32, torch.float64):
        return f"the fused kernels run float32 and float64; this input is {x.dtype}"
    for k, (cell, w) in enumerate(zip(cells, weights)):
        if type(cell) not in SUPPORTED_CELLS:
            return f"cell {k} is a {type(cell).__name__}; the fused kernels know LSTMCell, GRUCell and SimpleRNNCell"
        for name in ("activation", "recurrent_activation"):
            fn = getattr(cell, name, None)
            if fn is not None and fn not in ACTIVATION_CODES:
                return (f"cell {k}'s {name} {getattr(fn, '__name__', fn)!r} is not fused "
                        "(fused: tanh, sigmoid, hard_sigmoid, relu, linear)")
        if w.projection is not None:
            return f"cell {k} has a projection (proj_size); the fused LSTM has none yet"
    return cpu.unavailable_reason()


# ---------------------------------------------------------------------------------------------- layouts
def _per_gate(masks: Optional[Tensor]) -> bool:
    return masks is not None and masks.shape[-3] > 1


def _buffer(shape: Sequence[int], like: Tensor) -> Optional[Tensor]:
    """An ``out=`` buffer from the kernels' block cache (kernels/cpu/pool.cpp): a sequence-sized tensor
    allocated afresh each step costs its page faults again. None while autograd records (for double
    backward), which ``out=`` does not support -- the ops then allocate as usual."""
    return None if torch.is_grad_enabled() else torch.ops.droprnn.empty(list(shape), like.dtype)


def _project(x: Tensor, weights: CellWeights, masks: Optional[Tensor], gates: int) -> Tensor:
    """Input projections of all steps as a (B, T, G, U) view, bias fused into the product.

    Per-gate masks give a gate-major tensor (G, B, T, U) (viewed as (B, T, G, U)), one product per gate,
    with one gate's masked copy of x alive at a time.
    """
    batch, steps, features = x.shape
    kernel, bias = weights.kernel, weights.input_bias
    units = kernel.shape[1] // gates
    if _per_gate(masks):  # (G, B, D): per sequence (per-step input masks are always shared)
        out = _buffer((gates, batch * steps, units), x)
        scratch = _buffer(x.shape, x)
        parts = []
        for g in range(gates):
            masked = torch.mul(x, masks[g].unsqueeze(1), out=scratch).view(batch * steps, features)
            k = kernel[:, g * units:(g + 1) * units]
            target = None if out is None else out[g]
            if bias is None:
                parts.append(torch.mm(masked, k, out=target))
            else:
                parts.append(torch.addmm(bias[g * units:(g + 1) * units], masked, k, out=target))
        out = torch.stack(parts) if out is None else out
        return out.view(gates, batch, steps, units).permute(1, 2, 0, 3)
    if masks is not None:  # one mask for all gates: (1, B, D) per sequence or (T, 1, B, D) per step
        mask = masks[:, 0].permute(1, 0, 2) if masks.dim() == 4 else masks[0].unsqueeze(1)
        x = torch.mul(x, mask, out=_buffer(x.shape, x))
    flat = x.reshape(batch * steps, features)
    out = _buffer((batch * steps, gates * units), x)
    out = torch.mm(flat, kernel, out=out) if bias is None else torch.addmm(bias, flat, kernel, out=out)
    return out.view(batch, steps, gates, units)


def _panels(R: Tensor, gates: int, per_gate: bool) -> Tensor:
    """The recurrent kernel (H, G·U) as contiguous panels (P, H, N): one, or one per gate."""
    hidden, width = R.shape
    if gates == 1 or not per_gate and R.numel() * R.element_size() <= _ONE_PANEL_BYTES:
        return R.contiguous().unsqueeze(0)  # R may be a transposed view (droprnn.nn keeps torch's layout)
    return R.view(hidden, gates, width // gates).permute(1, 0, 2).contiguous()


def _defers_weight_grads(x: Tensor, R: Tensor) -> bool:
    """Whether the backward forms the weight gradients after its loop: where they outgrow the cache, and a
    step's update of them (rank B) is too thin to run at the BLAS's speed."""
    size = (R.shape[0] + x.shape[2]) * R.shape[1] * x.element_size()
    return size > max(_DEFER_BYTES, _DEFER_BYTES_PER_ROW * x.shape[0])


def _grads_after_loop(cell, x: Tensor, kernel: Tensor, input_masks: Optional[Tensor], h0: Tensor, hs: Tensor,
                      rec: Optional[Tensor], dz: Tensor, wanted: Sequence[bool]) -> tuple:
    """dx, dK, db, dR and the GRU's d rb from the gate gradients of every step dz (B, T, G·U) (the GRU's
    with a fourth block, the candidate product's side: see gru.cpp), in large products, one gate at a time
    (on the CPU batching them saves no launches and costs memory)."""
    want_x, want_kernel, want_bias, want_R, want_rbias = wanted
    gru = isinstance(cell, GRUCell)
    side = dz[..., 3 * cell.units:] if gru else None
    dz = dz[..., :cell.gates * cell.units]
    dbias = dz.sum(dim=(0, 1)) if want_bias else None
    dR = drbias = None
    if want_R:
        previous = torch.cat([h0.unsqueeze(1), hs[:, :-1]], dim=1)  # the states step t's product read
        if gru:
            dR = products.gru_recurrent_kernel_grad(previous, rec, dz, side, cell.reset_after, batch_gates=False)
        else:
            dR = products.recurrent_kernel_grad(previous, rec, dz, batch_gates=False)
    if want_rbias:
        drbias = products.gru_recurrent_bias_grad(dz, side)
    dx, dkernel = products.input_grads(x, kernel, input_masks, dz, want_x, want_kernel, cell.gates, batch_gates=False)
    return dx, dkernel, dbias, dR, drbias


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


# ---------------------------------------------------------------------------------------------- double backward
def _plain_recurrence(cell, xw: Tensor, weights: CellWeights, states: States, masks: CellMasks,
                      valid: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The fused recurrence in plain autograd ops (the cell's own step): the path for double backward."""
    batch, steps = xw.shape[:2]
    projected = xw.reshape(batch, steps, -1)
    sequences = []
    for t in range(steps):
        _, new = cell.step(projected[:, t], states, weights, masks.at(t))
        if valid is not None:
            keep = valid[:, t, None]
            new = tuple(keep * fresh + (1 - keep) * old for fresh, old in zip(new, states))
        states = new
        sequences.append(new)
    return tuple(torch.stack([s[j] for s in sequences], dim=1) for j in range(len(states)))


# ---------------------------------------------------------------------------------------------- the layer function
class _FusedLayer(torch.autograd.Function):
    """One cell over a whole sequence -- input projection and recurrence -- as one autograd node.

    Keeping the projection inside means neither the projections nor any masked copy are saved: the C++
    backward recomputes what it needs in cache, and a training step keeps less than the reference loop.
    Returns the h sequence (B, T, H), and for LSTM the last cell state (B, U).
    """

    @staticmethod
    def forward(ctx, x, kernel, input_bias, R, rbias, h0, c0, input_masks, rec, upd, zoneout_h, zoneout_c, valid, cell):
        act = ACTIVATION_CODES[cell.activation]
        rec_act = ACTIVATION_CODES.get(getattr(cell, "recurrent_activation", None), act)
        # The bias is added inside the kernel (a broadcast copy of it would be a whole extra pass here).
        xw = _project(x, CellWeights(kernel, R), input_masks, cell.gates)
        bias = None if input_bias is None else input_bias.contiguous()
        # The LSTM and GRU kernels write the activated gates over xw (saved: xw); the GRU's second result
        # is inner_h (reset_after), the SimpleRNN's the fresh h'.
        c_seq, other = None, None
        if isinstance(cell, LSTMCell):
            panels = _panels(R, 4, _per_gate(rec))
            hs, c_seq = torch.ops.droprnn.lstm_forward(
                xw, panels, bias, h0, c0, rec, upd, zoneout_h, zoneout_c, valid, act, rec_act)
            saved = xw
        elif isinstance(cell, GRUCell):
            panels = _panels(R, 3, _per_gate(rec) or not cell.reset_after)
            hs, other = torch.ops.droprnn.gru_forward(
                xw, panels, bias, rbias, h0, rec, upd, zoneout_h, valid, act, rec_act, cell.reset_after)
            saved = xw
        else:
            hs, saved = torch.ops.droprnn.simple_rnn_forward(
                xw, _panels(R, 1, False), bias, h0, rec, zoneout_h, valid, act)
        ctx.save_for_backward(x, kernel, input_bias, R, rbias, h0, c0, hs, c_seq, saved, other, input_masks, rec, upd,
                              zoneout_h, zoneout_c, valid)
        ctx.cell, ctx.acts = cell, (act, rec_act)
        if c_seq is None:
            return (hs,)
        # Only the last cell state leaves the layer: its gradient is (B, U), not a (B, T, U) of zeros.
        return hs, c_seq[:, -1].clone()

    @staticmethod
    def backward(ctx, *grads):
        (x, kernel, input_bias, R, rbias, h0, c0, hs, c_seq, saved, other, input_masks, rec, upd,
         zoneout_h, zoneout_c, valid) = ctx.saved_tensors
        cell, (act, rec_act) = ctx.cell, ctx.acts
        lstm = isinstance(cell, LSTMCell)
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-ops recurrence instead
            masks = CellMasks(recurrent=rec, update=upd, zoneout=(zoneout_h, zoneout_c) if lstm else (zoneout_h,))

            def build(x, kernel, input_bias, R, rbias, h0, c0):
                xw = _project(x, CellWeights(kernel, R, input_bias), input_masks, cell.gates)
                states = (h0, c0) if lstm else (h0,)
                sequences = _plain_recurrence(cell, xw, CellWeights(None, R, recurrent_bias=rbias), states, masks, valid)
                return (sequences[0], sequences[1][:, -1]) if lstm else (sequences[0],)

            return reference.differentiable_grads(ctx, (x, kernel, input_bias, R, rbias, h0, c0), grads, build)

        # The C++ backward forms the weight gradients in its time loop, or hands back every step's gate
        # gradients dz for large products after it (_defers_weight_grads).
        needs = ctx.needs_input_grad
        wanted = (needs[0], needs[1], needs[2] and input_bias is not None, needs[3], rbias is not None and needs[4])
        defer = _defers_weight_grads(x, R) and any(wanted)
        in_loop = (False,) * 5 if defer else wanted
        dhs = _zeros_if_none(grads[0], hs)
        if isinstance(cell, GRUCell):
            dx, dkernel, dbias, dR, drb, dh0, dc0, dz = torch.ops.droprnn.gru_backward(
                dhs, R, kernel, x, h0, hs, saved, other, input_masks, rec, upd, zoneout_h, valid, act, rec_act,
                cell.reset_after, *in_loop, defer)
        elif lstm:
            dx, dkernel, dbias, dR, drb, dh0, dc0, dz = torch.ops.droprnn.lstm_backward(
                dhs, _zeros_if_none(grads[1], c0), R, kernel, x, h0, c0, hs, c_seq, saved, input_masks, rec, upd,
                zoneout_h, zoneout_c, valid, act, rec_act, *in_loop[:4], defer)
        else:
            dx, dkernel, dbias, dR, drb, dh0, dc0, dz = torch.ops.droprnn.simple_rnn_backward(
                dhs, R, kernel, x, h0, hs, saved, input_masks, rec, zoneout_h, valid, act, *in_loop[:4], defer)
        if defer:
            dx, dkernel, dbias, dR, drb = _grads_after_loop(cell, x, kernel, input_masks, h0, hs, rec, dz, wanted)
        return dx, dkernel, dbias, dR, drb, dh0, dc0, None, None, None, None, None, None, None


def _contiguous(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _fused_cell(cell, x: Tensor, weights: CellWeights, states: States, masks: CellMasks,
                valid: Optional[Tensor]) -> list[Tensor]:
    """Run one cell over the sequence; returns the h sequence (B, T, H), then (LSTM) the final c (B, U)."""
    dtype = x.dtype
    zoneout = masks.zoneout or (None,) * len(states)
    zoneout = [_contiguous(z, dtype) for z in zoneout] + [None] * (2 - len(zoneout))
    rbias = weights.recurrent_bias if isinstance(cell, GRUCell) and cell.reset_after else None
    c0 = states[1].contiguous() if len(states) > 1 else None
    return list(_FusedLayer.apply(
        x.contiguous(), weights.kernel, weights.input_bias, weights.recurrent_kernel,
        None if rbias is None else rbias.contiguous(), states[0].contiguous(), c0,
        _contiguous(masks.input, dtype), _contiguous(masks.recurrent, dtype), _contiguous(masks.update, dtype),
        zoneout[0], zoneout[1], valid, cell,
    ))


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
    """Same arguments and results as :func:`droprnn.kernels.reference.run`."""
    plan = plan.materialized()  # the C++ kernels read every mask from a tensor
    x, step_mask, weights = reference.prepare(cells, x, step_mask, plan, weights, go_backwards)
    valid = None if step_mask is None else step_mask.to(x.dtype).contiguous()
    layer_input = x
    finals: list[States] = []
    for cell, w, masks, states in zip(cells, weights, plan.cells, initial_states):
        h_sequence, *last_c = _fused_cell(cell, layer_input, w, tuple(states), masks, valid)
        finals.append((h_sequence[:, -1], *last_c))
        layer_input = h_sequence
    return (*reference.finish(layer_input, valid, zero_output_for_mask, return_sequences), finals)
