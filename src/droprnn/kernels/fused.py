"""The fused CPU path: the same contract as :func:`droprnn.kernels.reference.run`, faster.

Per cell (stacked cells run one after another: cell k's states at masked steps are discarded anyway,
so feeding it cell k-1's carried states equals the reference's per-step interleaving):

1. the input projections of all timesteps in one large product (``cell.project_inputs``: input masks,
   per-gate or per-step, fold into it; autograd differentiates it);
2. the recurrence in C++ (``kernels/cpu/*.cpp``): per step one small product per mask block and one fused
   pass for the gates, masks, zoneout and step mask; its backward computes gate gradients from saved
   activations;
3. the recurrent-kernel gradient with one large product per gate over all timesteps, after the loop.

The outputs follow from the carried states: a masked step carries h, so "repeat the previous output" is h
itself once a real step has been seen, and zero before; ``zero_output_for_mask`` zeroes masked steps.
The hand-written backward is not itself differentiable; when a graph of the gradient is asked for
(``create_graph=True``, e.g. double backward), the backward instead differentiates the same recurrence
written with the cell's own step in plain autograd ops -- slower, and exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import activations
from ..cells import CellWeights, GRUCell, LSTMCell, SimpleRNNCell
from ..dropout.plan import CellMasks, DropoutPlan
from . import cpu

Tensor = torch.Tensor
States = tuple[Tensor, ...]

# Activation codes of kernels/cpu/common.h.
ACTIVATION_CODES = {
    activations.get("tanh"): 0,
    activations.get("sigmoid"): 1,
    activations.get("hard_sigmoid"): 2,
    activations.get("relu"): 3,
    activations.get("linear"): 4,
}
SUPPORTED_CELLS = (LSTMCell, GRUCell, SimpleRNNCell)


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


def _none_if_empty(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _previous_states(initial: Tensor, sequence: Tensor) -> Tensor:
    """(B, T, F): the state entering each step."""
    return torch.cat([initial.unsqueeze(1), sequence[:, :-1]], dim=1)


def _kernel_grad(h_prev: Tensor, masks: Optional[Tensor], d_out: Tensor, blocks: int) -> Tensor:
    """Σ over batch and time of (h_prev ⊙ mask_g)ᵀ d_out_g, gate by gate: the recurrent kernel's gradient."""
    width = h_prev.shape[-1]
    flat = d_out.reshape(-1, d_out.shape[-1])
    if masks is None:
        return h_prev.reshape(-1, width).T @ flat
    masks = masks.permute(1, 2, 0, 3) if masks.dim() == 4 else masks.unsqueeze(2)  # (m, B, T|1, H)
    if masks.shape[0] == 1:
        return (h_prev * masks[0]).reshape(-1, width).T @ flat
    return torch.cat(
        [(h_prev * m).reshape(-1, width).T @ block.reshape(-1, block.shape[-1])
         for m, block in zip(masks, d_out.chunk(blocks, dim=-1))],
        dim=1,
    )


def _plain_recurrence(cell, xw: Tensor, weights: CellWeights, states: States, masks: CellMasks,
                      valid: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The fused recurrence in plain autograd ops (the cell's own step): the path for double backward."""
    sequences = []
    for t in range(xw.shape[1]):
        _, new = cell.step(xw[:, t], states, weights, masks.at(t))
        if valid is not None:
            keep = valid[:, t, None]
            new = tuple(keep * fresh + (1 - keep) * old for fresh, old in zip(new, states))
        states = new
        sequences.append(new)
    return tuple(torch.stack([s[j] for s in sequences], dim=1) for j in range(len(states)))


def _differentiable_grads(ctx, grad_outputs, build) -> tuple:
    """Gradients of ``build(*inputs)`` that autograd can differentiate again (create_graph=True)."""
    inputs = ctx.saved_inputs
    wanted = [i for i, (t, need) in enumerate(zip(inputs, ctx.needs_input_grad)) if need and t is not None]
    with torch.enable_grad():
        outputs = build(*inputs)
        grads = torch.autograd.grad(
            outputs, [inputs[i] for i in wanted],
            [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grad_outputs)],
            create_graph=True, allow_unused=True,
        )
    result = [None] * len(ctx.needs_input_grad)
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, R, h0, c0, rec, upd, zoneout_h, zoneout_c, valid, act, rec_act, cell):
        hs, cs, gates, tc = torch.ops.droprnn.lstm_forward(xw, R, h0, c0, rec, upd, zoneout_h, zoneout_c, valid, act, rec_act)
        ctx.save_for_backward(xw, R, h0, c0, hs, cs, gates, tc, rec, upd, zoneout_h, zoneout_c, valid)
        ctx.acts, ctx.cell = (act, rec_act), cell
        return hs, cs

    @staticmethod
    def backward(ctx, dhs, dcs):
        xw, R, h0, c0, hs, cs, gates, tc, rec, upd, zoneout_h, zoneout_c, valid = ctx.saved_tensors
        if torch.is_grad_enabled():
            ctx.saved_inputs = (xw, R, h0, c0)
            masks = CellMasks(recurrent=rec, update=upd, zoneout=(zoneout_h, zoneout_c))
            grads = _differentiable_grads(ctx, (dhs, dcs), lambda xw, R, h0, c0: _plain_recurrence(
                ctx.cell, xw, CellWeights(None, R), (h0, c0), masks, valid))
            return grads
        dxw, dh0, dc0 = torch.ops.droprnn.lstm_backward(
            _zeros_if_none(dhs, hs), _zeros_if_none(dcs, cs), R.T.contiguous(), h0, c0, hs, cs, gates, tc, rec, upd,
            zoneout_h, zoneout_c, valid, *ctx.acts,
        )
        dR = _kernel_grad(_previous_states(h0, hs), rec, dxw, 4) if ctx.needs_input_grad[1] else None
        return dxw, dR, dh0, dc0, None, None, None, None, None, None, None, None


class _GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, R, rbias, h0, rec, upd, zoneout_h, valid, act, rec_act, reset_after, cell):
        hs, gates = torch.ops.droprnn.gru_forward(xw, R, rbias, h0, rec, upd, zoneout_h, valid, act, rec_act, reset_after)
        ctx.save_for_backward(xw, R, rbias, h0, hs, gates, rec, upd, zoneout_h, valid)
        ctx.options, ctx.cell = (act, rec_act, reset_after, rbias is not None), cell
        return hs

    @staticmethod
    def backward(ctx, dhs):
        xw, R, rbias, h0, hs, gates, rec, upd, zoneout_h, valid = ctx.saved_tensors
        act, rec_act, reset_after, has_rbias = ctx.options
        if torch.is_grad_enabled():
            ctx.saved_inputs = (xw, R, rbias, h0)
            masks = CellMasks(recurrent=rec, update=upd, zoneout=(zoneout_h,))
            return _differentiable_grads(ctx, (dhs,), lambda xw, R, rbias, h0: _plain_recurrence(
                ctx.cell, xw, CellWeights(None, R, recurrent_bias=rbias), (h0,), masks, valid))
        dxw, dinner, dh0 = torch.ops.droprnn.gru_backward(
            dhs.contiguous(), R.T.contiguous(), h0, hs, gates, rec, upd, zoneout_h, valid, act, rec_act, reset_after
        )
        dR = drb = None
        h_prev = _previous_states(h0, hs)
        units = hs.shape[-1]
        if ctx.needs_input_grad[1]:
            if reset_after:
                dR = _kernel_grad(h_prev, rec, dinner, 3)
            else:
                zr_masks = None if rec is None else (rec if rec.shape[-3] == 1 else rec[..., :2, :, :])
                h_masks = None if rec is None else (rec[..., :1, :, :] if rec.shape[-3] == 1 else rec[..., 2:, :, :])
                r = gates[..., units : 2 * units]
                a = r * (h_prev if h_masks is None else h_prev * _broadcast_one(h_masks))
                dR = torch.cat([_kernel_grad(h_prev, zr_masks, dxw[..., : 2 * units], 2),
                                _kernel_grad(a, None, dxw[..., 2 * units :], 1)], dim=1)
        if has_rbias and ctx.needs_input_grad[2]:
            drb = dinner.sum(dim=(0, 1))
        return dxw, dR, drb, dh0, None, None, None, None, None, None, None, None


def _broadcast_one(mask: Tensor) -> Tensor:
    """A single-gate mask (1, B, H) or (T, 1, B, H) as (B, T|1, H)."""
    return mask[:, 0].permute(1, 0, 2) if mask.dim() == 4 else mask[0].unsqueeze(1)


class _SimpleRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, R, h0, rec, zoneout_h, valid, act, cell):
        hs, fresh = torch.ops.droprnn.simple_rnn_forward(xw, R, h0, rec, zoneout_h, valid, act)
        ctx.save_for_backward(xw, R, h0, hs, fresh, rec, zoneout_h, valid)
        ctx.act, ctx.cell = act, cell
        return hs

    @staticmethod
    def backward(ctx, dhs):
        xw, R, h0, hs, fresh, rec, zoneout_h, valid = ctx.saved_tensors
        if torch.is_grad_enabled():
            ctx.saved_inputs = (xw, R, h0)
            masks = CellMasks(recurrent=rec, zoneout=(zoneout_h,))
            return _differentiable_grads(ctx, (dhs,), lambda xw, R, h0: _plain_recurrence(
                ctx.cell, xw, CellWeights(None, R), (h0,), masks, valid))
        dxw, dh0 = torch.ops.droprnn.simple_rnn_backward(
            dhs.contiguous(), R.T.contiguous(), h0, fresh, rec, zoneout_h, valid, ctx.act
        )
        dR = _kernel_grad(_previous_states(h0, hs), rec, dxw, 1) if ctx.needs_input_grad[1] else None
        return dxw, dR, dh0, None, None, None, None, None


def _recurrence(cell, xw: Tensor, weights: CellWeights, states: States, masks, valid: Optional[Tensor]) -> list[Tensor]:
    """Run one cell's recurrence; returns its carried state sequences, (B, T, size) each."""
    rec, upd = _none_if_empty(masks.recurrent), _none_if_empty(masks.update)
    zoneout = masks.zoneout or (None,) * len(states)
    act = ACTIVATION_CODES[cell.activation]
    R = weights.recurrent_kernel
    if isinstance(cell, LSTMCell):
        hs, cs = _LSTMRecurrence.apply(
            xw, R, states[0].contiguous(), states[1].contiguous(), rec, upd, zoneout[0], zoneout[1], valid, act,
            ACTIVATION_CODES[cell.recurrent_activation], cell,
        )
        return [hs, cs]
    if isinstance(cell, GRUCell):
        rbias = weights.recurrent_bias if cell.reset_after else None
        return [_GRURecurrence.apply(
            xw, R, rbias, states[0].contiguous(), rec, upd, zoneout[0], valid, act,
            ACTIVATION_CODES[cell.recurrent_activation], cell.reset_after, cell,
        )]
    return [_SimpleRecurrence.apply(xw, R, states[0].contiguous(), rec, zoneout[0], valid, act, cell)]


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
    if go_backwards:
        x = x.flip(1)
        step_mask = None if step_mask is None else step_mask.flip(1)
    valid = None if step_mask is None else step_mask.to(x.dtype).contiguous()
    weights = [cell.weights() for cell in cells] if weights is None else list(weights)
    weights = [m.weights_for(w) for m, w in zip(plan.cells, weights)]
    layer_input = x
    finals: list[States] = []
    for cell, w, masks, states in zip(cells, weights, plan.cells, initial_states):
        xw = cell.project_inputs(layer_input, w, masks.input).contiguous()
        sequences = _recurrence(cell, xw, w, tuple(states), masks, valid)
        finals.append(tuple(s[:, -1] for s in sequences))
        layer_input = sequences[0]
    outputs = layer_input
    if valid is not None:
        shown = valid if zero_output_for_mask else valid.cummax(dim=1).values
        outputs = outputs * shown.unsqueeze(-1)
    return (outputs if return_sequences else None), outputs[:, -1], finals
