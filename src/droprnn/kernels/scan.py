"""The reference step inside torch's ``scan``: the kernel exporters keep whole.

``torch.export`` and ``torch.onnx.export`` trace a program; the reference loop's Python ``for`` over the
steps would be unrolled into a program of one fixed length. Written as ``scan`` (a higher-order operator:
a step function applied along the time axis), the loop stays one node: ``torch.export`` keeps the length
symbolic, and ``torch.onnx.export`` writes ONNX's ``Scan``. The math is the reference's, step for step
(:func:`droprnn.kernels.reference.run`): each cell's :meth:`~droprnn.Cell.step` on the plan's masks of
that step, states held and outputs repeated (or zeroed) at masked steps. The step function receives the
step's slices of what changes over time (projected inputs, step mask, masks drawn per step).

Used only while a program is exported (``droprnn.kernels.dispatch``); it runs anything the reference
runs, so nothing falls back from here.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..cells import StepMasks
from ..dropout.plan import CellMasks
from .call import RecurrentCall, Result

Tensor = torch.Tensor

NAME = "scan"


def unsupported_reason(call: RecurrentCall) -> Optional[str]:
    """None: every call the reference runs runs here."""
    return None


def run(call: RecurrentCall) -> Result:
    """Same arguments and results as :func:`droprnn.kernels.reference.run`."""
    from torch._higher_order_ops.scan import scan  # loads the compiler: only when a program is exported

    x, step_mask, weights = call.in_processing_order()
    cells = call.cells
    plans = [m.materialized() for m in call.plan.cells]
    projected = cells[0].project_inputs(x, weights[0], plans[0].input)
    # What changes from step to step is scanned (time first); the rest the step function reads as it is.
    scanned = [projected.transpose(0, 1)] + ([] if step_mask is None else [step_mask.transpose(0, 1)])
    per_step = [_StepMasks(m, scanned, first=k == 0) for k, m in enumerate(plans)]
    sizes = [len(states) for states in call.initial_states]
    first = [s for states in call.initial_states for s in states]
    previous = x.new_zeros(x.shape[0], cells[-1].output_size)  # "the previous output" before any step

    def step(carry: list[Tensor], inputs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        held, previous = _split(carry[:-1], sizes), carry[-1]
        y, fresh = inputs[0], []
        for k, cell in enumerate(cells):
            input_masks, masks = per_step[k].at(inputs)
            if k > 0:
                y = cell.project_inputs(y, weights[k], input_masks)
            y, states = cell.step(y, held[k], weights[k], masks)
            fresh.append(states)
        if step_mask is not None:
            keep = inputs[1].unsqueeze(-1)
            fresh = [tuple(torch.where(keep, new, old) for new, old in zip(f, h)) for f, h in zip(fresh, held)]
            shown = torch.zeros_like(y) if call.zero_output_for_mask else previous
            y = torch.where(keep, y, shown)
        # No output of the step may alias another (y is often the first state itself).
        return [s for states in fresh for s in states] + [y.clone()], y.clone()

    carry, outputs = scan(step, first + [previous], scanned)
    sequence = outputs.transpose(0, 1) if call.return_sequences else None
    return sequence, carry[-1], _split(carry[:-1], sizes)


class _StepMasks:
    """A cell's masks for the step function: masks drawn per step are appended to ``scanned`` (the step
    function receives their slice), the others are read as they are."""

    def __init__(self, masks: CellMasks, scanned: list[Tensor], first: bool) -> None:
        def slot(mask: Optional[Tensor], per_sequence_dims: int):
            if mask is None or mask.dim() <= per_sequence_dims:  # absent, per sequence, or a 0-d expectation
                return lambda inputs: mask
            scanned.append(mask)
            index = len(scanned) - 1
            return lambda inputs: inputs[index]

        self.input = slot(None if first else masks.input, 3)  # the first cell's are in its projections
        self.recurrent = slot(masks.recurrent, 3)
        self.update = slot(masks.update, 2)
        self.zoneout = None if masks.zoneout is None else [slot(z, 2) for z in masks.zoneout]

    def at(self, inputs: list[Tensor]) -> tuple[Optional[Tensor], StepMasks]:
        """The input masks and the step masks of the step whose slices are ``inputs``."""
        zoneout = None if self.zoneout is None else tuple(z(inputs) for z in self.zoneout)
        return self.input(inputs), StepMasks(self.recurrent(inputs), self.update(inputs), zoneout)


def _split(flat: list[Tensor], sizes: list[int]) -> list[tuple[Tensor, ...]]:
    """Per cell, its states, from all cells' states in one list."""
    out, start = [], 0
    for size in sizes:
        out.append(tuple(flat[start:start + size]))
        start += size
    return out
