"""The fused CPU path: the same contract as :func:`droprnn.kernels.reference.run`, faster.

Per cell (stacked cells run one after another, :func:`droprnn.kernels.call.stacked`):

1. the input projections of all timesteps in one large product; per-gate input masks make it one product
   per gate, written gate-major (G, B, T, U) and read by the kernel in that layout, so nothing is
   concatenated;
2. the recurrence in C++ (``kernels/cpu/*.cpp``): per step one small product per panel of the recurrent
   kernel and one fused pass for the gates, bias, masks, zoneout and step mask;
3. a backward in C++ that walks the steps once: the gate gradients from saved activations, and the
   gradient carried to the step before. The weight gradients and the input gradient are formed one of
   two ways. Where the weight gradients fit in cache, in the loop: accumulated step by step (masks
   applied in cache, per-thread sums), so no masked copy of a sequence is ever made. Where they do not
   (``_DEFER_BYTES``), a step's rank-B update of them runs at memory speed, so the loop hands back the
   gate gradients of every step instead and they are a few large products after it (``products.py``,
   as on the GPU), at the BLAS's speed: a 650-unit LSTM's backward at batch 20 took 57 ms instead of 83.

A cell over a sequence is one registered operator, ``droprnn::fused_layer`` (its backward
``droprnn::fused_layer_backward``): a schema, a fake implementation that gives the output shapes from the
input shapes (symbolic batch and time included) and autograd registered on the operator, so
``torch.compile`` and ``torch.export`` keep the fused kernel whole inside the programs they build. Eager
code calls the same functions without the dispatcher (``kernels/eager.py``). The
forward returns what its backward reads besides the inputs (the activated gates, the LSTM's c sequence, the
GRU's recurrent products); nothing else is saved, no projection and no masked copy.

The outputs follow from the carried states: a masked step carries h, so "repeat the previous output" is h
itself once a real step has been seen, and zero before; ``zero_output_for_mask`` zeroes masked steps.

With no backward to follow (``no_grad``, ``inference_mode``) a cell runs ``droprnn::fused_layer_inference``
instead: nothing is kept for a backward, and with ``return_sequences=False`` only the last h is written.

bfloat16 (a bfloat16 layer, or float32 under ``torch.autocast("cpu", dtype=torch.bfloat16)``) runs the
same kernels in float32 with every product in bfloat16 (:func:`bf16_products`): the recurrent kernel is
packed per gate for oneDNN's brgemm, h is rounded once per step and mask, and the accumulation, states and
gate math stay in float32 (``kernels/cpu/bf16.h``).

An LSTM with ``proj_size`` passes its projection P (U, H) to the same kernels: each step adds one product,
h = (o * act(c)) @ P, and the backward one product through P per step, with P's gradient formed in its
loop (the other weight gradients as above). It runs in float32 even under bfloat16 autocast.

The hand-written backward is not itself differentiable; when a graph of the gradient is asked for
(``create_graph=True``, e.g. double backward), the backward instead differentiates the same recurrence
written with the cell's own step in plain autograd ops -- slower, and exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch

from ..cells import CellWeights, GRUCell, LSTMCell
from ..dropout.plan import CellMasks
from . import CELL_KINDS, activation_codes, constant_when_compiled, cpu, eager, math_cell, products, reference, unknown_cell
from .call import RecurrentCall, Result, stacked
from .cpu import faster_product

Tensor = torch.Tensor
States = tuple[Tensor, ...]

NAME = "fused"
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}

# From this machine's caches (kernels/cpu/machine.py). A recurrent kernel up to _ONE_PANEL_BYTES stays one
# panel (it fits in L2 with room to spare). Weight gradients (recurrent and input kernel together) above
# _DEFER_BYTES, and above _DEFER_BYTES_PER_ROW per sequence of the batch, are formed after the backward loop
# in large products instead of step by step in it (see the module docstring). Measured on 2 cores of a Xeon
# (L1d 48 KiB, L2 2 MiB: 512 KiB, 1 MiB and 48 KiB), T = 35: at 512 KiB and below, or with 64 rows at 2 MiB,
# the loop was as fast or faster (0.6-1.0x); at 1.2 MiB and 20 rows the products took 1.3-1.5x less, at
# 13 MiB (650 units) 1.45-1.6x less with 20 rows and 1.25-1.3x with 64.
_BLOCKING = cpu.machine.blocking()
_ONE_PANEL_BYTES = _BLOCKING.one_panel_bytes
_DEFER_BYTES = _BLOCKING.defer_bytes
_DEFER_BYTES_PER_ROW = _BLOCKING.defer_bytes_per_row


@constant_when_compiled
def _library_reason() -> Optional[str]:
    # Decided once per process (it may build the kernels): compiled programs take the answer as a constant.
    return cpu.unavailable_reason()


def unsupported_reason(call: RecurrentCall) -> Optional[str]:
    """Why the fused path cannot run this call (None when it can). Decided from the call alone."""
    x = call.x
    if x.device.type != "cpu":
        return f"the fused CPU kernels take CPU tensors; this input is on {x.device}"
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return f"the fused kernels run float32, float64 and bfloat16; this input is {x.dtype}"
    unknown = unknown_cell(call.cells)
    if unknown is not None:
        return f"the fused kernels cannot run it: {unknown}"
    return _library_reason()


@constant_when_compiled
def _bf16_available() -> bool:
    return bool(cpu.load() and torch.ops.droprnn_cpu.bf16_products())


_ENGINES = {"brgemm": "AMX, through oneDNN's brgemm", "avx512_bf16": "AVX512-BF16, droprnn's micro-kernel"}


def bf16_engine_text() -> str:
    """What runs this CPU's bfloat16 products, in words."""
    return _ENGINES.get(torch.ops.droprnn_cpu.bf16_engine(), "none") if cpu.load() else "none"


def wants_bf16_products(call: RecurrentCall, autocast: Optional[torch.dtype] = None) -> bool:
    """Whether this call asks for bfloat16 products: a bfloat16 call, or a float32 one under
    ``torch.autocast`` to bfloat16 (``autocast``, or ``call.autocast``), and no LSTM projection (a projected
    LSTM runs in float32)."""
    wanted = call.x.dtype == torch.bfloat16 or (call.x.dtype == torch.float32 and
                                                 torch.bfloat16 in (autocast, call.autocast))
    return wanted and not any(w.projection is not None for w in call.weights)


def bf16_products(call: RecurrentCall, autocast: Optional[torch.dtype] = None) -> bool:
    """Whether this call's products run in bfloat16 (float32 accumulation, states and gate math): it asks
    for them (:func:`wants_bf16_products`) and this CPU runs bfloat16 products: PyTorch's brgemm on AMX,
    else droprnn's AVX512-BF16 micro-kernel (``kernels/cpu/bf16_dot.h``)."""
    return wants_bf16_products(call, autocast) and _bf16_available()


def run(call: RecurrentCall) -> Result:
    """Same arguments and results as :func:`droprnn.kernels.reference.run`.

    A bfloat16 call runs in float32 with bfloat16 products where the CPU has them (:func:`bf16_products`),
    else wholly in float32; its results are rounded to bfloat16 once, at the end."""
    bf16 = bf16_products(call)
    low = call.x.dtype if call.x.dtype == torch.bfloat16 else None
    if low is not None:
        call = _in_float32(call)
    if _backward_may_follow(call):
        result = stacked(call, functools.partial(_layer, bf16=bf16))
    else:
        result = stacked(call, functools.partial(_inference_layer, bf16=bf16), last_only=not call.return_sequences)
    if low is None:
        return result
    sequence, last, finals = result
    return (None if sequence is None else sequence.to(low), last.to(low),
            [tuple(s.to(low) for s in states) for states in finals])


def _in_float32(call: RecurrentCall) -> RecurrentCall:
    """The call with its tensors in float32 (autograd carries the gradients back to bfloat16)."""
    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.float()

    return dataclasses.replace(
        call, x=call.x.float(), weights=tuple(CellWeights(*(up(t) for t in w)) for w in call.weights),
        initial_states=tuple(tuple(up(s) for s in states) for states in call.initial_states))


def _backward_may_follow(call: RecurrentCall) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [call.x, *(t for w in call.weights for t in w), *(s for states in call.initial_states for s in states)]
    return any(t is not None and t.requires_grad for t in tensors)


def _arguments(cell, x: Tensor, weights: CellWeights, states: States, masks: CellMasks, valid: Optional[Tensor],
               bf16: bool) -> tuple:
    """The operators' arguments for one cell's call."""
    masks = masks.materialized()  # the C++ kernels read every mask from a tensor
    dtype, lstm = x.dtype, isinstance(cell, LSTMCell)
    zoneout = [_contiguous(z, dtype) for z in masks.zoneout or ()] + [None, None]
    reset_after = isinstance(cell, GRUCell) and cell.reset_after
    return (
        x.contiguous(), weights.kernel, weights.input_bias, weights.recurrent_kernel,
        weights.recurrent_bias if reset_after else None, states[0].contiguous(),
        states[1].contiguous() if lstm else None, _contiguous(masks.input, dtype),
        _contiguous(masks.recurrent, dtype), _contiguous(masks.update, dtype), zoneout[0], zoneout[1], valid,
        CELL_KINDS[type(cell)], *activation_codes(cell), reset_after, bf16, weights.projection,
    )


def _layer(cell, x: Tensor, weights: CellWeights, states: States, masks: CellMasks,
           valid: Optional[Tensor], bf16: bool = False) -> tuple[Tensor, States]:
    """One cell over the sequence: its carried h sequence (B, T, H) and final states."""
    hs, c_last, _, _ = fused_layer(*_arguments(cell, x, weights, states, masks, valid, bf16))
    return hs, ((hs[:, -1], c_last) if isinstance(cell, LSTMCell) else (hs[:, -1],))


def _inference_layer(cell, x: Tensor, weights: CellWeights, states: States, masks: CellMasks, valid: Optional[Tensor],
                     all_steps: bool = True, bf16: bool = False) -> tuple[Tensor, States]:
    """:func:`_layer` with no backward to follow; with ``all_steps`` false, h is the last step's (B, H)."""
    *arguments, _, projection = _arguments(cell, x, weights, states, masks, valid, bf16)
    h, c_last = fused_layer_inference(*arguments, all_steps, bf16, projection)
    last = h[:, -1] if all_steps else h
    return h, ((last, c_last) if isinstance(cell, LSTMCell) else (last,))


def _contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _contiguous(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------- layouts
def _per_gate(masks: Optional[Tensor]) -> bool:
    return masks is not None and masks.shape[-3] > 1


def _mm(a: Tensor, b: Tensor, out: Tensor, bf16: bool) -> Tensor:
    """out = a @ b; with ``bf16`` in the recurrences' bfloat16 products (float32 accumulation and result);
    in float32 by whichever library this machine runs faster (:func:`cpu.projection_products`)."""
    if bf16:
        torch.ops.droprnn_cpu.bf16_mm(a, b, out)
        return out
    if (a.dtype == torch.float32 and a.stride(-1) == 1 and b.stride(-1) == 1
            and cpu.projection_products() == "brgemm"):
        torch.ops.droprnn_cpu.float_mm(a, b, out)
        return out
    return torch.mm(a, b, out=out)


def _project(x: Tensor, kernel: Tensor, masks: Optional[Tensor], gates: int, bf16: bool = False) -> Tensor:
    """Input projections of all steps as a (B, T, G, U) view, without the bias (the kernels add it):
    :func:`products.project`, into buffers from the kernels' block cache (kernels/cpu/pool.cpp), one gate's
    masked copy of x alive at a time. Per-gate masks give a gate-major tensor (G, B, T, U) underneath.
    ``bf16``: bfloat16 products (see :func:`bf16_products`).
    """
    batch, steps, _ = x.shape
    units = kernel.shape[1] // gates

    def new(shape, dtype, device=None) -> Tensor:
        return torch.ops.droprnn_cpu.empty(list(shape), dtype)

    gate_major = _per_gate(masks)
    out = new((gates, batch, steps, units) if gate_major else (batch, steps, gates, units), x.dtype)
    products.project(x, kernel, None, masks, out, gates, batch_gates=False, new=new,
                     matmul=lambda a, b, target: _mm(a, b, target, bf16))
    return out.permute(1, 2, 0, 3) if gate_major else out


def _panels(R: Tensor, gates: int, per_gate: bool, bf16: bool = False) -> Tensor:
    """The recurrent kernel (H, G·U) as contiguous panels (P, H, N): one, or one per gate. For bfloat16
    products, in bfloat16 and any strides (the kernels pack it per gate themselves)."""
    hidden, width = R.shape
    if bf16:  # in any layout: the kernels pack each gate themselves
        low = R.to(torch.bfloat16)
        return low.unsqueeze(0) if gates == 1 or not per_gate else low.view(hidden, gates, -1).permute(1, 0, 2)
    if gates == 1 or not per_gate and R.numel() * R.element_size() <= _ONE_PANEL_BYTES:
        return R.contiguous().unsqueeze(0)  # R may be a transposed view (droprnn.nn keeps torch's layout)
    return R.view(hidden, gates, width // gates).permute(1, 0, 2).contiguous()


def _defers_weight_grads(x: Tensor, R: Tensor, bf16: bool = False) -> bool:
    """Whether the backward forms the weight gradients after its loop: where they outgrow the cache, and a
    step's update of them (rank B) is too thin to run at the BLAS's speed. With bfloat16 products the
    products after the loop run several times faster than the float32 updates in it, so only the cache
    decides (measured: at (64, 100, 128, 256) after the loop is 1.15x faster, at (32, 100, 64, 128) and
    (16, 200, 32, 64) in the loop is 1.05-1.35x faster)."""
    size = (R.shape[0] + x.shape[2]) * R.shape[1] * x.element_size()
    return size > (_DEFER_BYTES if bf16 else max(_DEFER_BYTES, _DEFER_BYTES_PER_ROW * x.shape[0]))


def _grads_after_loop(kind: str, reset_after: bool, x: Tensor, kernel: Tensor, input_masks: Optional[Tensor],
                      h0: Tensor, hs: Tensor, rec: Optional[Tensor], dz: Tensor, wanted: Sequence[bool],
                      bf16: bool = False) -> tuple:
    """dx, dK and dR from the gate gradients of every step dz (B, T, G·U) (the GRU's with a fourth block, the
    candidate product's side: see gru.cpp), in large products, one gate at a time (on the CPU batching them
    saves no launches and costs memory); in float32 each by the library that runs its shape faster here
    (:mod:`.cpu.faster_product`). ``wanted``: which of the three. The biases' gradients are sums, which the
    C++ loop accumulates in the call's type. ``bf16``: the products in bfloat16 (torch's, with float32
    accumulation; dz arrives in bfloat16), the gradients returned in float32."""
    if bf16:
        low = [None if t is None else t.to(torch.bfloat16) for t in (x, kernel, input_masks, h0, hs, rec, dz)]
        grads = _grads_after_loop(kind, reset_after, *low[:6], low[6], wanted)
        return tuple(None if g is None else g.float() for g in grads)
    want_x, want_kernel, want_R = wanted
    matmul = faster_product.mm if x.dtype == torch.float32 else None
    gates = GATES[kind]
    units = kernel.shape[1] // gates
    gru = kind == "gru"
    side = dz[..., 3 * units:] if gru else None
    dz = dz[..., :gates * units]
    dR = None
    if want_R:
        previous = torch.cat([h0.unsqueeze(1), hs[:, :-1]], dim=1)  # the states step t's product read
        if gru:
            dR = products.gru_recurrent_kernel_grad(previous, rec, dz, side, reset_after, batch_gates=False,
                                                    matmul=matmul)
        else:
            dR = products.recurrent_kernel_grad(previous, rec, dz, batch_gates=False, matmul=matmul)
    dx, dkernel = products.input_grads(x, kernel, input_masks, dz, want_x, want_kernel, gates, batch_gates=False,
                                       matmul=matmul)
    return dx, dkernel, dR


# ---------------------------------------------------------------------------------------------- the operators
def _require_library(op: str) -> None:
    if not cpu.load():
        raise RuntimeError(f"droprnn::{op}: {cpu.unavailable_reason()}")


def _gates_buffer(x: Tensor, units: int, gates: int, input_mask: Optional[Tensor]) -> Tensor:
    """A tensor laid out as ``_project`` writes the projections (and the kernels the gates over them)."""
    batch, steps, _ = x.shape
    if _per_gate(input_mask):
        return x.new_empty(gates, batch, steps, units).permute(1, 2, 0, 3)
    return x.new_empty(batch, steps, gates, units)


def _fused_layer(
    x: Tensor, kernel: Tensor, input_bias: Optional[Tensor], recurrent_kernel: Tensor,
    recurrent_bias: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], input_mask: Optional[Tensor],
    recurrent_mask: Optional[Tensor], update_mask: Optional[Tensor], zoneout_h: Optional[Tensor],
    zoneout_c: Optional[Tensor], valid: Optional[Tensor], cell: str, activation: int, recurrent_activation: int,
    reset_after: bool, bf16_products: bool = False, projection: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One cell (``cell``: "lstm", "gru" or "simple_rnn") over a whole sequence, fused.

    x (B, T, D); kernel (D, G·U); input_bias (G·U,) or None; recurrent_kernel (H, G·U) with DropConnect
    applied; recurrent_bias (G·U,): the reset_after GRU's, else None; h0 (B, H); c0 (B, U) for the LSTM;
    masks as :class:`~droprnn.dropout.plan.CellMasks` holds them, as tensors; valid (B, T) of 0/1 or None;
    activation codes as ``kernels.ACTIVATION_NAMES`` numbers them; ``bf16_products``: the products in
    bfloat16 (float32 tensors; see :func:`bf16_products`); ``projection`` (U, H): an LSTM's ``proj_size``
    projection (h = (o * act(c)) @ P), or None.

    Returns (hs (B, T, H): the carried h sequence; c_last (B, U): the LSTM's last c, else absent (a 0-d
    zero); and what the backward reads: the activated gates in the projections' layout (the SimpleRNN's
    fresh h' with zoneout, else absent: hs is h'), and the LSTM's c sequence or the reset_after GRU's
    recurrent products (B, T, U), else absent).
    """
    _require_library("fused_layer")
    gates, bf16 = GATES[cell], bf16_products
    xw = _project(x.contiguous(), kernel, input_mask, gates, bf16)
    bias = None if input_bias is None else input_bias.contiguous()
    R, h0 = recurrent_kernel, h0.contiguous()
    kernels = torch.ops.droprnn_cpu
    if cell == "lstm":
        hs, c_seq = kernels.lstm_forward(xw, _panels(R, 4, _per_gate(recurrent_mask), bf16), bias, h0, c0.contiguous(),
                                         recurrent_mask, update_mask, zoneout_h, zoneout_c, valid, activation,
                                         recurrent_activation, _contiguous_or_none(projection))
        # The LSTM kernel writes the activated gates over xw: no second sequence-sized buffer.
        return hs, c_seq[:, -1].clone(), xw, c_seq
    if cell == "gru":
        panels = _panels(R, 3, _per_gate(recurrent_mask) or not reset_after, bf16)
        rbias = None if recurrent_bias is None else recurrent_bias.contiguous()
        hs, inner = kernels.gru_forward(xw, panels, bias, rbias, h0, recurrent_mask, update_mask, zoneout_h, valid,
                                        activation, recurrent_activation, reset_after)
        return hs, eager.absent(x), xw, inner if reset_after else eager.absent(x)
    hs, fresh = kernels.simple_rnn_forward(xw, _panels(R, 1, False, bf16), bias, h0, recurrent_mask, zoneout_h,
                                           valid, activation)
    # Without zoneout the kernel's fresh h' is hs itself (an output may not be returned twice).
    return hs, eager.absent(x), fresh if zoneout_h is not None else eager.absent(x), eager.absent(x)


def _fused_layer_fake(x, kernel, input_bias, recurrent_kernel, recurrent_bias, h0, c0, input_mask, recurrent_mask,
                      update_mask, zoneout_h, zoneout_c, valid, cell, activation, recurrent_activation, reset_after,
                      bf16_products=False, projection=None):
    batch, steps, _ = x.shape
    gates = GATES[cell]
    units = recurrent_kernel.shape[1] // gates
    hs = x.new_empty(batch, steps, h0.shape[1])
    if cell == "simple_rnn":
        fresh = x.new_empty(batch, steps, units) if zoneout_h is not None else eager.absent(x)
        return hs, eager.absent(x), fresh, eager.absent(x)
    saved = _gates_buffer(x, units, gates, input_mask)
    if cell == "lstm":
        return hs, x.new_empty(batch, units), saved, x.new_empty(batch, steps, units)
    return hs, eager.absent(x), saved, x.new_empty(batch, steps, units) if reset_after else eager.absent(x)


def _fused_layer_backward(
    grad_hs: Tensor, grad_c_last: Optional[Tensor], x: Tensor, kernel: Tensor, input_bias: Optional[Tensor],
    recurrent_kernel: Tensor, recurrent_bias: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
    input_mask: Optional[Tensor], recurrent_mask: Optional[Tensor], update_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], valid: Optional[Tensor], hs: Tensor, saved: Tensor,
    other: Tensor, cell: str, activation: int, recurrent_activation: int, reset_after: bool, wanted: list[bool],
    bf16_products: bool = False, projection: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`fused_layer`'s hs and c_last: (dx, d kernel, d input_bias, d recurrent_kernel,
    d recurrent_bias, d h0, d c0, d projection). ``wanted`` says which of the first five to form (each is
    absent, a 0-d zero, when not wanted or not applicable, as are d c0 without a c0 and d projection without
    one). ``saved`` and ``other`` are the forward's."""
    _require_library("fused_layer_backward")
    if len(wanted) != 5:
        raise ValueError(f"droprnn::fused_layer_backward: `wanted` expected 5 flags, got {len(wanted)}")
    wanted = [wanted[0], wanted[1], wanted[2] and input_bias is not None, wanted[3],
              wanted[4] and recurrent_bias is not None]
    R, kernels, bf16 = recurrent_kernel, torch.ops.droprnn_cpu, bf16_products
    grad_hs = grad_hs.contiguous()
    # The C++ backward forms the weight gradients in its time loop, or hands back every step's gate
    # gradients dz for large products after it (_defers_weight_grads; in bfloat16 those are bfloat16
    # products, and dz comes back in bfloat16, rounded in the loop). The biases' gradients (sums) and a
    # projection's gradient are always formed in the loop.
    products_wanted = (wanted[0], wanted[1], wanted[3])
    defer = _defers_weight_grads(x, R, bf16) and any(products_wanted)
    if bf16:
        R = R.to(torch.bfloat16)
    in_loop = (False, False, wanted[2], False, wanted[4]) if defer else tuple(wanted)
    if cell == "gru":
        dx, dkernel, dbias, dR, drb, dh0, dc0, dz = kernels.gru_backward(
            grad_hs, R, kernel, x, h0, hs, saved, other if reset_after else None, input_mask, recurrent_mask,
            update_mask, zoneout_h, valid, activation, recurrent_activation, reset_after, *in_loop, defer)
    elif cell == "lstm":
        dc_last = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.contiguous()
        dx, dkernel, dbias, dR, dP, dh0, dc0, dz = kernels.lstm_backward(
            grad_hs, dc_last, R, kernel, x, h0, c0, hs, other, saved, input_mask, recurrent_mask, update_mask,
            zoneout_h, zoneout_c, valid, activation, recurrent_activation, *in_loop[:4], defer,
            _contiguous_or_none(projection))
        drb = None
    else:
        dx, dkernel, dbias, dR, drb, dh0, dc0, dz = kernels.simple_rnn_backward(
            grad_hs, R, kernel, x, h0, hs, saved if zoneout_h is not None else hs, input_mask, recurrent_mask, zoneout_h, valid, activation,
            *in_loop[:4], defer)
    if defer:
        dx, dkernel, dR = _grads_after_loop(cell, reset_after, x, kernel, input_mask, h0, hs, recurrent_mask, dz,
                                            products_wanted, bf16)
    if cell != "lstm":
        dP = None
    return tuple(eager.absent(x) if g is None else g.contiguous() for g in (dx, dkernel, dbias, dR, drb, dh0, dc0, dP))


def _fused_layer_backward_fake(grad_hs, grad_c_last, x, kernel, input_bias, recurrent_kernel, recurrent_bias, h0, c0,
                               input_mask, recurrent_mask, update_mask, zoneout_h, zoneout_c, valid, hs, saved, other,
                               cell, activation, recurrent_activation, reset_after, wanted, bf16_products=False,
                               projection=None):
    def like(t: Optional[Tensor], want: bool = True) -> Tensor:
        return t.new_empty(t.shape) if want and t is not None else eager.absent(x)

    return (like(x, wanted[0]), like(kernel, wanted[1]), like(input_bias, wanted[2]),
            like(recurrent_kernel, wanted[3]), like(recurrent_bias, wanted[4]), like(h0), like(c0),
            like(projection))


def _fused_layer_inference(
    x: Tensor, kernel: Tensor, input_bias: Optional[Tensor], recurrent_kernel: Tensor,
    recurrent_bias: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], input_mask: Optional[Tensor],
    recurrent_mask: Optional[Tensor], update_mask: Optional[Tensor], zoneout_h: Optional[Tensor],
    zoneout_c: Optional[Tensor], valid: Optional[Tensor], cell: str, activation: int, recurrent_activation: int,
    reset_after: bool, all_steps: bool, bf16_products: bool = False, projection: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fused_layer` with no backward to follow (no autograd): keeps nothing for one -- no gates, no c
    sequence, no recurrent products -- and with ``all_steps`` false writes only the last step's h.

    Returns (h: (B, T, H), or the last step's (B, H) without ``all_steps``; c_last (B, U) for the LSTM, else
    absent).
    """
    _require_library("fused_layer_inference")
    gates, bf16 = GATES[cell], bf16_products
    xw = _project(x.contiguous(), kernel, input_mask, gates, bf16)
    bias = None if input_bias is None else input_bias.contiguous()
    R, h0, kernels = recurrent_kernel, h0.contiguous(), torch.ops.droprnn_cpu
    if cell == "lstm":
        return kernels.lstm_inference(xw, _panels(R, 4, _per_gate(recurrent_mask), bf16), bias, h0, c0.contiguous(),
                                      recurrent_mask, update_mask, zoneout_h, zoneout_c, valid, activation,
                                      recurrent_activation, all_steps, _contiguous_or_none(projection))
    if cell == "gru":
        panels = _panels(R, 3, _per_gate(recurrent_mask) or not reset_after, bf16)
        rbias = None if recurrent_bias is None else recurrent_bias.contiguous()
        return kernels.gru_inference(xw, panels, bias, rbias, h0, recurrent_mask, update_mask, zoneout_h, valid,
                                     activation, recurrent_activation, reset_after, all_steps), eager.absent(x)
    return kernels.simple_rnn_inference(xw, _panels(R, 1, False, bf16), bias, h0, recurrent_mask, zoneout_h, valid,
                                        activation, all_steps), eager.absent(x)


def _fused_layer_inference_fake(x, kernel, input_bias, recurrent_kernel, recurrent_bias, h0, c0, input_mask,
                                recurrent_mask, update_mask, zoneout_h, zoneout_c, valid, cell, activation,
                                recurrent_activation, reset_after, all_steps, bf16_products=False, projection=None):
    batch, steps, _ = x.shape
    units = recurrent_kernel.shape[1] // GATES[cell]
    h = x.new_empty(batch, steps, h0.shape[1]) if all_steps else x.new_empty(batch, h0.shape[1])
    return h, x.new_empty(batch, units) if cell == "lstm" else eager.absent(x)


_DIFFERENTIABLE = 7  # x, kernel, input_bias, recurrent_kernel, recurrent_bias, h0, c0
_PROJECTION = 18  # the operator's argument index of the LSTM's projection, also differentiable


def _setup_context(ctx, inputs, output) -> None:
    # The outputs kept for the backward get no gradient: do not fill sequence-sized zeros for them.
    ctx.set_materialize_grads(False)
    hs, _, saved, other = output
    projection = inputs[18] if len(inputs) > 18 else None
    ctx.save_for_backward(*inputs[:13], hs, saved, other, projection)
    ctx.options = tuple(inputs[13:17])
    ctx.bf16 = bool(inputs[17]) if len(inputs) > 17 else False


def _backward(ctx, grad_hs, grad_c_last, _grad_saved, _grad_other):
    (x, kernel, input_bias, R, rbias, h0, c0, input_mask, rec, upd, zoneout_h, zoneout_c, valid,
     hs, saved, other, P) = ctx.saved_tensors
    cell, act, rec_act, reset_after = ctx.options
    lstm = cell == "lstm"
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-ops recurrence instead
        math = math_cell(cell, R.shape[1] // GATES[cell], act, rec_act, reset_after)
        masks = CellMasks(recurrent=rec, update=upd, zoneout=(zoneout_h, zoneout_c) if lstm else (zoneout_h,))

        def build(x, kernel, input_bias, R, rbias, h0, c0, *rest):
            weights = CellWeights(kernel, R, input_bias, rbias, projection=rest[11] if len(rest) > 11 else None)
            return reference.plain_layer(math, x, weights, (h0, c0) if lstm else (h0,), input_mask, masks, valid)

        # one entry per operator argument; the projection is the last (_PROJECTION)
        inputs = (x, kernel, input_bias, R, rbias, h0, c0) + (None,) * (_PROJECTION - 7) + (P,)
        return reference.differentiable_grads(ctx, inputs[:len(ctx.needs_input_grad)], (grad_hs, grad_c_last), build)
    needs = ctx.needs_input_grad
    present = (x, kernel, input_bias, R, rbias)
    wanted = [needs[k] and present[k] is not None for k in range(5)]
    grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs
    grads = fused_layer_backward(
        grad_hs, grad_c_last if lstm else None, x, kernel, input_bias, R, rbias, h0, c0, input_mask, rec, upd,
        zoneout_h, zoneout_c, valid, hs, saved, other, cell, act, rec_act, reset_after, wanted, ctx.bf16, P)
    wanted += [needs[5], needs[6] and lstm]
    result = [g if want else None for g, want in zip(grads, wanted)] + [None] * (len(needs) - _DIFFERENTIABLE)
    if P is not None and needs[_PROJECTION]:
        result[_PROJECTION] = grads[7]
    return tuple(result)


fused_layer_backward = eager.register("droprnn::fused_layer_backward", _fused_layer_backward,
                                      _fused_layer_backward_fake, "cpu")
fused_layer = eager.register("droprnn::fused_layer", _fused_layer, _fused_layer_fake, "cpu", _setup_context, _backward)
fused_layer_inference = eager.register("droprnn::fused_layer_inference", _fused_layer_inference,
                                       _fused_layer_inference_fake, "cpu")
