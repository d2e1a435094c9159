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

from typing import Callable, Optional, Sequence

import torch

from ..cells import CellWeights
from ..dropout.plan import DropoutPlan

Tensor = torch.Tensor
States = tuple[Tensor, ...]


def prepare(
    cells: Sequence[torch.nn.Module], x: Tensor, step_mask: Optional[Tensor], plan: DropoutPlan,
    weights: Optional[Sequence[CellWeights]], go_backwards: bool,
) -> tuple[Tensor, Optional[Tensor], list[CellWeights]]:
    """What every kernel does first: reverse time for go_backwards (inputs and step mask), take each
    cell's own weights unless given, and apply the plan's DropConnect masks (autograd reaches R through
    them)."""
    if go_backwards:
        x = x.flip(1)
        step_mask = None if step_mask is None else step_mask.flip(1)
    weights = [cell.weights() for cell in cells] if weights is None else list(weights)
    return x, step_mask, [m.weights_for(w) for m, w in zip(plan.cells, weights)]


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
    """Run ``cells`` over ``x``.

    Args:
        x: (B, T, D) inputs, T >= 1.
        initial_states: one tuple of (B, state size) tensors per cell.
        plan: the masks of this call, one :class:`CellMasks` per cell.
        step_mask: (B, T) bool, True where the step is real; None for all steps.
        weights: per cell, the :class:`CellWeights` to use; default: each cell's own parameters.

    Returns:
        (outputs (B, T, O) or None when not ``return_sequences``, last output (B, O), final states).
    """
    x, step_mask, weights = prepare(cells, x, step_mask, plan, weights, go_backwards)
    masks = plan.cells
    projected = cells[0].project_inputs(x, weights[0], masks[0].input)
    states = [tuple(s) for s in initial_states]
    previous_output: Optional[Tensor] = None
    outputs: list[Tensor] = []
    for t in range(x.shape[1]):
        y = projected[:, t]
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
            if zero_output_for_mask or previous_output is None:
                y = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
            else:
                y = torch.where(keep, y, previous_output)
        states = new_states
        previous_output = y
        if return_sequences:
            outputs.append(y)
    sequence = torch.stack(outputs, dim=1) if return_sequences else None
    return sequence, previous_output, states


# ---------------------------------------------------------------------------------------------- shared by the fast kernels
def finish(outputs: Tensor, valid: Optional[Tensor], zero_output_for_mask: bool,
           return_sequences: bool) -> tuple[Optional[Tensor], Tensor]:
    """A fast kernel's (sequence or None, last output) from the last cell's carried h sequence (B, T, H).

    A kernel that runs one cell over all steps carries h through masked steps; the reference's outputs
    repeat the previous output there (zero before the first real step), or are zero with
    ``zero_output_for_mask``. ``valid``: (B, T) of 0/1 in the outputs' dtype, or None.
    """
    if valid is not None:
        shown = valid if zero_output_for_mask else valid.cummax(dim=1).values
        outputs = outputs * shown.unsqueeze(-1)
    return (outputs if return_sequences else None), outputs[:, -1]


def differentiable_grads(ctx, inputs: tuple, grad_outputs: tuple, build: Callable[..., tuple]) -> tuple:
    """A fast kernel's backward when autograd must differentiate it again (``create_graph=True``): the
    gradients of ``build(*inputs)`` -- the same recurrence in plain autograd ops -- with respect to the
    ``inputs`` (the autograd.Function's first arguments, still attached to the caller's graph). Slower
    than the kernels, and exact. Returns one entry per Function input (None where not wanted).
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
