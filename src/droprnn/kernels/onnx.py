"""ONNX's own recurrent operators, for ``torch.onnx.export``: each cell becomes one ``LSTM``, ``GRU`` or
``RNN`` node, so runtimes use their optimised kernels, with batch and time left dynamic.

Keras's weights are mapped at export (``torch.onnx.ops.symbolic_multi_out`` writes the node itself):

=========  ============================================  =================================================
cell       ONNX operator                                 mapping
=========  ============================================  =================================================
LSTM       ``LSTM``, activations (f, g, h) =             gates i, f, c, o -> ONNX's i, o, f, c; W = Kᵀ,
           (recurrent_activation, activation, act.)      R = Rᵀ (H = units), B = [b; 0]
GRU        ``GRU``, ``linear_before_reset`` =             gates z, r, h are ONNX's; B = [b; rb]
           ``reset_after``, activations (f, g)           (reset_after), [b; 0] (reset_before)
SimpleRNN  ``RNN``, activations (f)                      W = Kᵀ, R = Rᵀ, B = [b; 0]
=========  ============================================  =================================================

Activations: tanh ``Tanh``, sigmoid ``Sigmoid``, hard_sigmoid ``HardSigmoid`` (alpha 1/6, beta 1/2: Keras
3's relu6(x + 3) / 6), relu ``Relu``, linear ``Affine`` (alpha 1, beta 0).

``lengths=`` (and ``droprnn.nn``'s PackedSequence) become the operator's ``sequence_lens``; the outputs are
then completed around the node as the reference defines them at padded steps (the last real output
repeated, or zeros). With ``go_backwards`` the node runs in ONNX's ``reverse`` direction over the real
steps of each sequence, which is Keras's order with the padding first.

Not here -- exported as ONNX's ``Scan`` over the reference step instead (:mod:`droprnn.kernels.scan`),
exact and slower: a step ``mask=`` (any pattern: ONNX's operators take lengths only), zoneout's inference
expectation, ``proj_size``, dropout masks (a model exported in training mode), dtypes other than float32,
other activations and cell subclasses.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..cells import CellWeights, GRUCell, LSTMCell, SimpleRNNCell
from . import ACTIVATION_NAMES, activation_codes, unknown_cell
from .call import RecurrentCall, Result, finish

Tensor = torch.Tensor

NAME = "onnx"
_OPERATORS = {LSTMCell: "LSTM", GRUCell: "GRU", SimpleRNNCell: "RNN"}
# ONNX activation, alpha, beta, by droprnn's activation names.
_ACTIVATIONS = {
    "tanh": ("Tanh", None, None),
    "sigmoid": ("Sigmoid", None, None),
    "hard_sigmoid": ("HardSigmoid", 1.0 / 6.0, 0.5),
    "relu": ("Relu", None, None),
    "linear": ("Affine", 1.0, 0.0),
}


def unsupported_reason(call: RecurrentCall) -> Optional[str]:
    """Why ONNX's operators cannot compute this call (None when they can)."""
    if call.x.dtype != torch.float32:
        return f"ONNX's recurrent operators are exported in float32 here; this input is {call.x.dtype}"
    if call.step_mask is not None and call.lengths is None:
        return "a step mask (mask=): ONNX's recurrent operators take sequence lengths only (lengths= exports to them)"
    unknown = unknown_cell(call.cells)
    if unknown is not None:
        return f"ONNX's recurrent operators cannot express it: {unknown}"
    for k, w in enumerate(call.weights):
        if w.projection is not None:
            return f"cell {k} has a projection (proj_size), which ONNX's LSTM lacks"
    for k, masks in enumerate(call.plan.cells):
        if masks.zoneout is not None:
            return f"cell {k} has zoneout, whose inference expectation ONNX's operators cannot express"
        if not masks.empty:
            return f"cell {k} has dropout masks (a training-mode call); ONNX's operators have no dropout"
    return None


def run(call: RecurrentCall) -> Result:
    """Same contract as :func:`droprnn.kernels.reference.run`, as ONNX nodes (meaningful only while
    ``torch.onnx.export`` traces: outside it the nodes compute nothing)."""
    x, step_mask, weights = call.in_processing_order()
    lengths = None if call.lengths is None else call.lengths.to(torch.int32)
    valid = None if step_mask is None else step_mask.to(x.dtype)
    # Keras's go_backwards with padding: ONNX's reverse direction over the real steps of the unreversed input.
    reverse = call.go_backwards and lengths is not None
    layer_input = x
    finals = []
    for cell, w, states in zip(call.cells, weights, call.initial_states):
        ys, last_states = _node(cell, w, layer_input.flip(1) if reverse else layer_input, states, lengths, reverse)
        h0 = states[0]
        if reverse:  # processing order: the padding first (the initial state held), then the real steps
            carried = torch.where(step_mask.unsqueeze(-1), ys.flip(1), h0.unsqueeze(1))
        elif lengths is not None:  # ONNX writes zeros past a sequence's length; the reference holds the state
            last = torch.where((lengths > 0).unsqueeze(-1), last_states[0], h0)
            carried = torch.where(step_mask.unsqueeze(-1), ys, last.unsqueeze(1))
        else:
            carried = ys
        final = [carried[:, -1]]
        if len(states) > 1:
            c = last_states[1]
            final.append(c if lengths is None else torch.where((lengths > 0).unsqueeze(-1), c, states[1]))
        finals.append(tuple(final))
        layer_input = carried
    return (*finish(call, layer_input, valid), finals)


def _node(cell, w: CellWeights, x: Tensor, states: tuple[Tensor, ...], lengths: Optional[Tensor],
          reverse: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One ONNX node over x (B, T, D): its h sequence (B, T, H) and its last states ((B, H), LSTM: (B, U))."""
    batch, steps, _ = x.shape
    units, gates = cell.units, cell.gates
    kernel, recurrent = w.kernel, w.recurrent_kernel
    bias = w.input_bias
    recurrent_bias = w.recurrent_bias
    if isinstance(cell, LSTMCell):  # Keras i, f, c, o -> ONNX i, o, f, c
        order = [0, 3, 1, 2]
        kernel, recurrent = _gate_order(kernel, order, units), _gate_order(recurrent, order, units)
        bias = None if bias is None else _gate_order(bias, order, units)
    onnx_bias = None
    if bias is not None or recurrent_bias is not None:
        width = gates * units
        input_part = bias if bias is not None else kernel.new_zeros(width)
        recurrent_part = recurrent_bias if recurrent_bias is not None else kernel.new_zeros(width)
        onnx_bias = torch.cat([input_part, recurrent_part]).unsqueeze(0)
    act, rec_act = (ACTIVATION_NAMES[c] for c in activation_codes(cell))
    names = {LSTMCell: [rec_act, act, act], GRUCell: [rec_act, act], SimpleRNNCell: [act]}[type(cell)]
    attrs = {"hidden_size": units, "direction": "reverse" if reverse else "forward", **_activation_attrs(names)}
    if isinstance(cell, GRUCell):
        attrs["linear_before_reset"] = int(cell.reset_after)
    inputs = [x.transpose(0, 1), kernel.t().unsqueeze(0), recurrent.t().unsqueeze(0), onnx_bias, lengths,
              states[0].unsqueeze(0)]
    lstm = isinstance(cell, LSTMCell)
    if lstm:
        inputs.append(states[1].unsqueeze(0))
    shapes = [[steps, 1, batch, units], [1, batch, units]] + ([[1, batch, units]] if lstm else [])
    outputs = torch.onnx.ops.symbolic_multi_out(
        _OPERATORS[type(cell)], inputs, attrs, dtypes=[x.dtype] * len(shapes), shapes=shapes)
    ys = outputs[0].squeeze(1).transpose(0, 1)
    return ys, tuple(o.squeeze(0) for o in outputs[1:])


def _gate_order(t: Tensor, order: list[int], units: int) -> Tensor:
    """The gate blocks of t's last axis (G·U) in ``order``."""
    blocks = t.split(units, dim=-1)
    return torch.cat([blocks[g] for g in order], dim=-1)


def _activation_attrs(names: list[str]) -> dict:
    """ONNX's activations, activation_alpha and activation_beta for these droprnn activations."""
    onnx = [_ACTIVATIONS[name] for name in names]
    attrs: dict = {"activations": [a for a, _, _ in onnx]}
    alphas = [alpha for _, alpha, _ in onnx if alpha is not None]
    if alphas:
        attrs["activation_alpha"] = alphas
        attrs["activation_beta"] = [beta for _, _, beta in onnx if beta is not None]
    return attrs
