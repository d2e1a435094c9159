"""Stacked cells on the GPU: each cell's layer Function (``lstm.py``, ``gru.py``) over the whole sequence,
one cell after another -- LSTM, GRU and SimpleRNN cells mixed freely.

Running a cell over all steps before the next starts equals the reference's per-step interleaving
(:func:`droprnn.kernels.reference.run`): a cell's states at masked steps are held, so the next cell sees
the same carried h sequence either way (as in ``kernels/fused.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...cells import CellWeights, GRUCell, LSTMCell, SimpleRNNCell
from ...dropout.plan import DropoutPlan
from .. import reference
from . import gru, lstm, simple
from .loops import States

Tensor = torch.Tensor

_LAYERS = {LSTMCell: lstm.layer, GRUCell: gru.layer, SimpleRNNCell: simple.layer}


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
    """Same arguments and results as :func:`droprnn.kernels.reference.run`, for stacked LSTM, GRU and SimpleRNN cells."""
    x, step_mask, weights = reference.prepare(cells, x, step_mask, plan, weights, go_backwards)
    valid = None if step_mask is None else step_mask.to(x.dtype).contiguous()
    layer_input = x
    finals: list[States] = []
    for cell, w, masks, states in zip(cells, weights, plan.cells, initial_states):
        layer_input, final = _LAYERS[type(cell)](cell, layer_input, w, tuple(states), masks, valid)
        finals.append(final)
    return (*reference.finish(layer_input, valid, zero_output_for_mask, return_sequences), finals)
