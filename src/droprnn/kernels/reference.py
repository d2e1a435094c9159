"""The reference time loop: plain PyTorch ops and autograd. The source of truth every fast path equals.

For stacked cells c_0 … c_{n-1} with weights W_k, a sequence x (B, T, D) and the plan's masks M_k::

    x   = reversed(x) over time if go_backwards (the step mask too)
    W_k = W_k with the DropConnect mask on its recurrent kernel (drawn once per call)
    P   = c_0.project_inputs(x, W_0, input masks of c_0)        one product for all timesteps
    for t in 0 … T-1:
        y = P[:, t]
        for each cell c_k:
            y = c_k.project_inputs(y, W_k, M_k.input_at(t))     for k > 0
            y, s_k' = c_k.step(y, s_k, W_k, M_k.at(t))          recurrent / update masks, zoneout
        where the step is masked (mask[:, t] False): every state keeps its old value (s_k' = s_k) and the
        output repeats the previous output (zeros before the first step), or is zero with
        ``zero_output_for_mask``
    outputs stay in processing order (reversed when go_backwards, as Keras)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..cells import CellWeights, with_gate_kernels
from ..dropout.plan import CellMasks
from .call import RecurrentCall, Result

Tensor = torch.Tensor
States = tuple[Tensor, ...]

NAME = "reference"


def unsupported_reason(call: RecurrentCall) -> Optional[str]:
    """None: the reference loop runs every call."""
    return None


def run(call: RecurrentCall) -> Result:
    """Run ``call.cells`` over ``call.x`` (see :class:`~droprnn.kernels.call.RecurrentCall`).

    Returns (outputs (B, T, O) or None when not ``return_sequences``, last output (B, O), final states).
    """
    x, step_mask, weights = call.in_processing_order()
    cells, masks = call.cells, call.plan.cells
    weights = [with_gate_kernels(w, cell.gates, m.recurrent) for w, cell, m in zip(weights, cells, masks)]
    # unbind once: indexing projected[:, t] per step would make autograd build a full-size zero
    # gradient for every step (select_backward), which dominated the reference loop's backward.
    projected = cells[0].project_inputs(x, weights[0], masks[0].input).unbind(1)
    states = [tuple(s) for s in call.initial_states]
    previous_output: Optional[Tensor] = None
    outputs: list[Tensor] = []
    for t in range(x.shape[1]):
        y = projected[t]
        new_states = []
        for k, cell in enumerate(cells):
            if k > 0:
                y = cell.project_inputs(y, weights[k], masks[k].input_at(t))
            y, cell_states = cell.step(y, states[k], weights[k], masks[k].at(t))
            new_states.append(cell_states)
        if step_mask is not None:
            keep = step_mask[:, t, None]
            new_states = [
                tuple(torch.where(keep, new, old) for new, old in zip(fresh, held))
                for fresh, held in zip(new_states, states)
            ]
            if call.zero_output_for_mask or previous_output is None:
                y = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
            else:
                y = torch.where(keep, y, previous_output)
        states = new_states
        previous_output = y
        if call.return_sequences:
            outputs.append(y)
    sequence = torch.stack(outputs, dim=1) if call.return_sequences else None
    return sequence, previous_output, states


# ---------------------------------------------------------------------------------------------- shared by the fast kernels
def plain_layer(cell, x: Tensor, weights: CellWeights, states: States, input_masks: Optional[Tensor],
                masks: CellMasks, valid: Optional[Tensor]) -> tuple[Tensor, ...]:
    """What a fast kernel's layer operator computes for one cell, in the cell's own plain autograd ops: the
    carried h sequence (B, T, H), then the last value of every other state (the LSTM's c). ``valid``: (B, T)
    of 0/1 or None. The path for double backward, which the hand-written backwards do not support."""
    weights = with_gate_kernels(weights, cell.gates, masks.recurrent)
    projected = cell.project_inputs(x, weights, input_masks).unbind(1)
    sequence = []
    for t in range(x.shape[1]):
        _, new = cell.step(projected[t], states, weights, masks.at(t))
        if valid is not None:
            keep = valid[:, t, None] != 0
            new = tuple(torch.where(keep, fresh, old) for fresh, old in zip(new, states))
        states = new
        sequence.append(new[0])
    return (torch.stack(sequence, dim=1), *states[1:])


def differentiable_grads(ctx, inputs: tuple, grad_outputs: tuple, build: Callable[..., tuple]) -> tuple:
    """A fast kernel's backward when autograd must differentiate it again (``create_graph=True``): the
    gradients of ``build(*inputs)`` -- the same recurrence in plain autograd ops -- with respect to the
    ``inputs`` (the operator's first arguments, still attached to the caller's graph). Slower than the
    kernels, and exact. Returns one entry per operator input (None where not wanted).
    """
    wanted = [k for k, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[k]]
    with torch.enable_grad():
        outputs = build(*inputs)
        grads = torch.autograd.grad(
            outputs, [inputs[k] for k in wanted],
            [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grad_outputs)],
            create_graph=True, allow_unused=True,
        )
    result: list[Optional[Tensor]] = [None] * len(ctx.needs_input_grad)
    for k, grad in zip(wanted, grads):
        result[k] = grad
    return tuple(result)
