"""The GPU path's entry point as registered operators: ``droprnn::gpu_layer`` runs one cell over a whole
sequence (``lstm.forward``, ``gru.forward`` or ``simple.forward``: a time loop of Triton step kernels and
cuBLAS products, replayed from a CUDA graph), ``droprnn::gpu_layer_backward`` its backward. A schema, a fake
implementation (shapes from shapes, symbolic batch and time included) and autograd registered on the
operator let ``torch.compile`` and ``torch.export`` keep the loop whole.

An operator takes tensors and numbers, not the plan's objects, so the masks travel encoded: tensors as
they are, and the counter-based masks of a plan drawn on CUDA (:class:`~droprnn.random.CounterMask`, never
stored) as their shared seed plus, in ``counters``, [recurrent masks' count, their rate, the update mask's
rate, zoneout rates of h and c] -- 0 where that mask is a tensor or absent. Zoneout's inference expectation
is a 0-d tensor, as the plan holds it.

This module imports no Triton: the operators are registered with ``import droprnn``; the kernels load when
one first runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...cells import CellWeights, LSTMCell
from ...dropout.plan import RECURRENT_STREAM, UPDATE_STREAM, ZONEOUT_STREAMS, CellMasks
from ...random import CounterMask
from .. import CELL_KINDS, activation_codes, eager, math_cell, reference
from ..products import counter_tensor

Tensor = torch.Tensor
States = tuple[Tensor, ...]

GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
_TENSOR_INPUTS = 15  # x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection, h0, c0, 5 masks, seed, valid
_DIFFERENTIABLE = 8  # x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection, h0, c0


def carry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in and carry states in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saving(x: Tensor, w: CellWeights, states: States) -> bool:
    """Whether a backward may follow this layer's call (then the forward keeps what the backward reads)."""
    tensors = (x, w.kernel, w.input_bias, w.recurrent_kernel, w.recurrent_bias, w.projection, *states)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dense(t: Any, dtype: torch.dtype) -> Optional[Tensor]:
    """A mask read from memory: ``t`` as a contiguous tensor in ``dtype``, a CounterMask made into its tensor."""
    if isinstance(t, CounterMask):
        t = counter_tensor(t)
    return None if t is None else t.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------- the call
def layer(cell, x: Tensor, w: CellWeights, states: States, masks: CellMasks,
          valid: Optional[Tensor]) -> tuple[Tensor, States]:
    """One cell over x (B, T, D) on the GPU: its carried h sequence (B, T, H) and final states."""
    h, c_last, *_ = gpu_layer(*arguments(cell, x, w, states, masks, valid))
    hs = h[:, 1:]  # slot 0 holds h0
    return hs, ((hs[:, -1], c_last) if isinstance(cell, LSTMCell) else (hs[:, -1],))


def arguments(cell, x: Tensor, w: CellWeights, states: States, masks: CellMasks, valid: Optional[Tensor]) -> tuple:
    """The arguments of ``droprnn::gpu_layer`` for one cell's call."""
    from .precision import float32_precision

    kind = CELL_KINDS[type(cell)]
    dtype, lstm = x.dtype, kind == "lstm"
    reset_after = kind == "gru" and cell.reset_after
    rec, update, zoneout, seed, counters = _encoded(masks, dtype, len(states))
    return (
        x.contiguous(), w.kernel, w.input_bias, w.recurrent_kernel, w.recurrent_bias if reset_after else None,
        w.projection, states[0].contiguous(), states[1].contiguous() if lstm else None, dense(masks.input, dtype),
        rec, update, zoneout[0], zoneout[1], seed, valid, kind, *activation_codes(cell), reset_after, counters,
        saving(x, w, states), float32_precision(x) or "",
    )


def _encoded(masks: CellMasks, dtype: torch.dtype, states: int) -> tuple:
    """(recurrent, update, zoneout (h, c), seed, counters) of a cell's masks, as the operators take them:
    counter-based masks sharing one seed (what ``draw_plan`` makes) as the seed and their numbers, any other
    counter-based mask made into its tensor, tensors contiguous in ``dtype``."""
    zones = tuple(masks.zoneout or ()) + (None,) * (2 - len(masks.zoneout or ()))
    shared = [m for m in (masks.recurrent, masks.update, *zones) if isinstance(m, CounterMask)]
    seed = shared[0].seed if shared else None

    def split(mask: Any) -> tuple[Optional[Tensor], float]:
        if isinstance(mask, CounterMask) and mask.seed is seed:
            return None, mask.rate
        return dense(mask, dtype), 0.0

    rec, rec_rate = split(masks.recurrent)
    update, update_rate = split(masks.update)
    zoneout, zone_rates = zip(*(split(z) for z in zones))
    rec_count = float(masks.recurrent.shape[1]) if rec_rate else 0.0
    return rec, update, zoneout, seed, [rec_count, rec_rate, update_rate, *zone_rates]


def _decoded(x: Tensor, h0: Tensor, units: int, recurrent_mask: Optional[Tensor], update_mask: Optional[Tensor],
             zoneout: tuple, seed: Optional[Tensor], counters: list[float], states: int) -> tuple:
    """The recurrent masks and Noise the time loops take, from the operator's arguments (see ``_encoded``)."""
    from .noise import Noise

    batch, steps = x.shape[:2]
    rec_count, rec_rate, update_rate, *zone_rates = counters
    rec = recurrent_mask
    if rec_rate:
        rec = CounterMask(seed, RECURRENT_STREAM, (steps, int(rec_count), batch, h0.shape[1]), rec_rate, "dropout",
                          x.dtype)
    update = update_mask
    if update_rate:
        update = CounterMask(seed, UPDATE_STREAM, (steps, batch, units), update_rate, "dropout", x.dtype)
    zones = []
    for k, (z, rate, size) in enumerate(zip(zoneout[:states], zone_rates, (h0.shape[1], units))):
        if rate:
            zones.append(CounterMask(seed, ZONEOUT_STREAMS[k], (steps, batch, size), rate, "keep", x.dtype))
        else:  # inference's expectation goes to the kernels as a number
            zones.append(float(z) if z is not None and z.dim() == 0 else z)
    return rec, Noise(update, tuple(zones), seed)


def _cell_module(cell: str):
    from . import gru, lstm, simple  # imports Triton

    return {"lstm": lstm, "gru": gru, "simple_rnn": simple}[cell]


# ---------------------------------------------------------------------------------------------- the operators
def _gpu_layer(
    x: Tensor, kernel: Tensor, input_bias: Optional[Tensor], recurrent_kernel: Tensor,
    recurrent_bias: Optional[Tensor], projection: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
    input_mask: Optional[Tensor], recurrent_mask: Optional[Tensor], update_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], counter_seed: Optional[Tensor], valid: Optional[Tensor],
    cell: str, activation: int, recurrent_activation: int, reset_after: bool, counters: list[float], saving: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One cell (``cell``: "lstm", "gru" or "simple_rnn") over a whole sequence with the GPU kernels.

    Arguments as ``droprnn::fused_layer`` plus the LSTM's ``projection`` (U, H) or None, the masks encoded as
    the module docstring says, ``saving`` (whether a backward may follow: else nothing is kept for it) and
    ``precision``, the float32 products' ("" for none; ``precision.float32_precision``).

    Returns (h (B, T + 1, H) with h0 in slot 0, c_last (B, U) for the LSTM, and what the backward reads --
    LSTM: gates, the c sequence, r with a projection; GRU: gates, side; SimpleRNN: pre -- absent (0-d zeros)
    where not applicable or not saving).
    """
    units = recurrent_kernel.shape[1] // GATES[cell]
    lstm = cell == "lstm"
    rec, noise = _decoded(x, h0, units, recurrent_mask, update_mask, (zoneout_h, zoneout_c), counter_seed, counters,
                          2 if lstm else 1)
    codes, module = (activation, recurrent_activation), _cell_module(cell)
    x, mask = x.contiguous(), None if input_mask is None else input_mask.contiguous()
    h0, precision = h0.contiguous(), precision or None
    c_last = eager.absent(x)
    if lstm:
        h, c_last, saved = module.forward(x, kernel, input_bias, recurrent_kernel, projection, h0, c0.contiguous(),
                                          mask, rec, noise, valid, codes, saving, precision)
    elif cell == "gru":
        h, saved = module.forward(x, kernel, input_bias, recurrent_kernel, recurrent_bias, h0, mask, rec, noise, valid,
                                  codes, reset_after, saving, precision)
    else:
        h, saved = module.forward(x, kernel, input_bias, recurrent_kernel, h0, mask, rec, noise, valid, codes, saving,
                                  precision)
    saved = [eager.absent(x) if t is None else t for t in saved]
    return (h, c_last, *saved, *(eager.absent(x) for _ in range(3 - len(saved))))


def _gpu_layer_fake(x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection, h0, c0, input_mask,
                    recurrent_mask, update_mask, zoneout_h, zoneout_c, counter_seed, valid, cell, activation,
                    recurrent_activation, reset_after, counters, saving, precision):
    batch, steps, _ = x.shape
    gates = GATES[cell]
    units, hidden = recurrent_kernel.shape[1] // gates, h0.shape[1]
    h = x.new_empty(batch, steps + 1, hidden)
    c_last = x.new_empty(batch, units) if cell == "lstm" else eager.absent(x)
    saved = []
    if saving:
        if cell == "simple_rnn":
            saved = [x.new_empty(batch, steps, units)]
        else:
            gate_major = input_mask is not None and input_mask.shape[-3] > 1
            saved = [x.new_empty(gates, batch, steps, units) if gate_major else x.new_empty(batch, steps, gates * units)]
            if cell == "lstm":
                saved.append(x.new_empty(batch, steps + 1, units, dtype=carry_dtype(x.dtype)))
                if projection is not None:
                    saved.append(x.new_empty(batch, steps, units))
            else:
                saved.append(x.new_empty(batch, steps, units))
    return (h, c_last, *saved, *(eager.absent(x) for _ in range(3 - len(saved))))


def _gpu_layer_backward(
    grad_h: Tensor, grad_c_last: Optional[Tensor], x: Tensor, kernel: Tensor, input_bias: Optional[Tensor],
    recurrent_kernel: Tensor, recurrent_bias: Optional[Tensor], projection: Optional[Tensor], h0: Tensor,
    c0: Optional[Tensor], input_mask: Optional[Tensor], recurrent_mask: Optional[Tensor],
    update_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
    counter_seed: Optional[Tensor], valid: Optional[Tensor], h: Tensor, saved0: Tensor, saved1: Tensor,
    saved2: Tensor, cell: str, activation: int, recurrent_activation: int, reset_after: bool, counters: list[float],
    precision: str, wanted: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`gpu_layer`'s h and c_last: (dx, d kernel, d input_bias, d recurrent_kernel,
    d recurrent_bias, d projection, d h0, d c0); ``wanted`` says which of the first six to form (each is
    absent when not wanted or not applicable, as is d c0 without a c0). h and saved0..2 are the forward's."""
    if len(wanted) != 6:
        raise ValueError(f"droprnn::gpu_layer_backward: `wanted` expected 6 flags, got {len(wanted)}")
    units = recurrent_kernel.shape[1] // GATES[cell]
    lstm = cell == "lstm"
    rec, noise = _decoded(x, h0, units, recurrent_mask, update_mask, (zoneout_h, zoneout_c), counter_seed, counters,
                          2 if lstm else 1)
    codes, module, precision = (activation, recurrent_activation), _cell_module(cell), precision or None
    present = (x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection)
    want = [w and t is not None for w, t in zip(wanted, present)]
    d_hs = grad_h[:, 1:]
    mask = None if input_mask is None else input_mask.contiguous()
    dx = dk = db = dR = drb = dP = dc0 = None
    if lstm:
        d_c_last = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        saved = (saved0, saved1, saved2) if projection is not None else (saved0, saved1)
        dx, dk, db, dR, dP, dh0, dc0 = module.backward(
            (*want[:4], want[5], True, True), d_hs, d_c_last, x, kernel, input_bias, recurrent_kernel, projection,
            mask, rec, noise, valid, codes, h, saved, precision)
    elif cell == "gru":
        dx, dk, db, dR, drb, dh0 = module.backward(
            (*want[:5], True), d_hs, x, kernel, input_bias, recurrent_kernel, recurrent_bias, mask, rec, noise, valid,
            codes, reset_after, h, (saved0, saved1), precision)
    else:
        dx, dk, db, dR, dh0 = module.backward(
            (*want[:4], True), d_hs, x, kernel, input_bias, recurrent_kernel, mask, rec, noise, valid, codes, h,
            (saved0,), precision)
    dh0 = dh0 + grad_h[:, 0].to(dh0.dtype)  # h's slot 0 is h0 itself
    return tuple(eager.absent(x) if g is None else g.contiguous() for g in (dx, dk, db, dR, drb, dP, dh0, dc0))


def _gpu_layer_backward_fake(grad_h, grad_c_last, x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection,
                             h0, c0, input_mask, recurrent_mask, update_mask, zoneout_h, zoneout_c, counter_seed, valid,
                             h, saved0, saved1, saved2, cell, activation, recurrent_activation, reset_after, counters,
                             precision, wanted):
    def like(t: Optional[Tensor], want: bool = True) -> Tensor:
        return t.new_empty(t.shape) if want and t is not None else eager.absent(x)

    present = (x, kernel, input_bias, recurrent_kernel, recurrent_bias, projection)
    return (*(like(t, w) for t, w in zip(present, wanted)), like(h0), like(c0 if cell == "lstm" else None))


def _setup_context(ctx, inputs, output) -> None:
    # The outputs kept for the backward get no gradient: do not fill sequence-sized zeros for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS], *output)
    ctx.options = inputs[_TENSOR_INPUTS:]


def _backward(ctx, grad_h, grad_c_last, *_saved_grads):
    (x, kernel, input_bias, R, rbias, P, h0, c0, input_mask, rec, upd, zh, zc, seed, valid,
     h, _, saved0, saved1, saved2) = ctx.saved_tensors
    cell, act, rec_act, reset_after, counters, _saving, precision = ctx.options
    lstm = cell == "lstm"
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-ops recurrence instead
        units = R.shape[1] // GATES[cell]
        recurrent, noise = _decoded(x, h0, units, rec, upd, (zh, zc), seed, counters, 2 if lstm else 1)
        zones = tuple(torch.tensor(z, dtype=x.dtype, device=x.device) if isinstance(z, float) else z
                      for z in noise.zoneout)  # inference's rates back as the plan holds them
        masks = CellMasks(recurrent=recurrent, update=noise.update,
                          zoneout=zones if any(z is not None for z in zones) else None)
        math = math_cell(cell, units, act, rec_act, reset_after)

        def build(x, kernel, input_bias, R, rbias, P, h0, c0):
            sequences = reference.plain_layer(math, x, CellWeights(kernel, R, input_bias, rbias, P),
                                              (h0, c0) if lstm else (h0,), input_mask, masks, valid)
            return (torch.cat([h0.unsqueeze(1), sequences[0]], dim=1), *sequences[1:])

        return reference.differentiable_grads(ctx, (x, kernel, input_bias, R, rbias, P, h0, c0),
                                              (grad_h, grad_c_last), build)
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    grads = gpu_layer_backward(
        grad_h, grad_c_last if lstm else None, x, kernel, input_bias, R, rbias, P, h0, c0, input_mask, rec, upd, zh,
        zc, seed, valid, h, saved0, saved1, saved2, cell, act, rec_act, reset_after, counters, precision,
        list(needs[:6]))
    present = (x, kernel, input_bias, R, rbias, P, h0, c0)
    return (*(g if need and t is not None else None for g, need, t in zip(grads, needs, present)),
            *(None,) * (len(needs) - _DIFFERENTIABLE))


gpu_layer_backward = eager.register("droprnn::gpu_layer_backward", _gpu_layer_backward, _gpu_layer_backward_fake)
gpu_layer = eager.register("droprnn::gpu_layer", _gpu_layer, _gpu_layer_fake, None, _setup_context, _backward)
