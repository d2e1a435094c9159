"""The dropout plan: every mask a recurrent layer call will use, drawn before the time loop runs.

Masks are data. The loop receives them and never draws on its own, so a test can record or replace
them, a fast kernel can be held to the reference with the same masks, and MC dropout re-draws them.

Keras 3's recipe (``keras/src/layers/rnn/dropout_rnn_cell.py`` with ``RNN.call``):

- one draw per layer call, reused at every timestep; masks are (B, features), independent per sample
  and feature, entries 0 or 1/(1-p) (inverted dropout);
- with ``recurrent_dropout > 0`` one input mask per gate and one recurrent mask per gate (4 for LSTM,
  3 for GRU); otherwise a single input mask shared by all gates;
- draw order: a cell's input masks in gate order, then its recurrent masks, then the next stacked cell;
- outside training nothing is applied, but a seeded stream still advances by the draws Keras would make,
  so a seeded layer stays in step with Keras across inference calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import DroprnnError, fail, type_name
from ..random import dropout_mask

Tensor = torch.Tensor


@dataclass(frozen=True)
class CellMasks:
    """The masks of one cell for one layer call.

    input:     (m, B, D) multipliers of the step input, m == 1 (shared by all gates) or m == gates.
    recurrent: (m, B, U) multipliers of h(t-1) where it enters the recurrent kernel.
    Either is None when that dropout is off (or not training).
    """

    input: Optional[Tensor] = None
    recurrent: Optional[Tensor] = None

    @property
    def empty(self) -> bool:
        return self.input is None and self.recurrent is None


@dataclass(frozen=True)
class DropoutPlan:
    """The masks of every cell of one layer call, in stacking order."""

    cells: tuple[CellMasks, ...]

    @property
    def empty(self) -> bool:
        return all(masks.empty for masks in self.cells)


def draw_cell_masks(
    cell: Any, batch: int, input_size: int, training: bool, dtype: torch.dtype, device: torch.device
) -> CellMasks:
    """Draw ``cell``'s masks for a batch of ``batch`` sequences with ``input_size`` features per step."""
    dropout = getattr(cell, "dropout", 0.0)
    recurrent_dropout = getattr(cell, "recurrent_dropout", 0.0)
    gates = getattr(cell, "gates", 1)
    stream = getattr(cell, "seed_stream", None)
    # Keras's rule: recurrent dropout switches the cell to per-gate masks for inputs and state alike.
    input_count = gates if recurrent_dropout > 0 else 1
    draws = (input_count if dropout > 0 else 0) + (gates if recurrent_dropout > 0 else 0)
    if not training or draws == 0:
        if stream is not None:
            stream.skip(draws)
        return CellMasks()

    def stacked(count: int, features: int, rate: float) -> Tensor:
        return torch.stack([dropout_mask((batch, features), rate, stream, dtype, device) for _ in range(count)])

    input_masks = stacked(input_count, input_size, dropout) if dropout > 0 else None
    recurrent_masks = stacked(gates, cell.units, recurrent_dropout) if recurrent_dropout > 0 else None
    return CellMasks(input_masks, recurrent_masks)


def draw_plan(
    cells: Sequence[Any], batch: int, input_size: int, training: bool, dtype: torch.dtype, device: torch.device
) -> DropoutPlan:
    """Draw the masks of stacked ``cells`` (cell k > 0 sees the previous cell's output size)."""
    drawn = []
    for cell in cells:
        drawn.append(draw_cell_masks(cell, batch, input_size, training, dtype, device))
        input_size = cell.output_size
    return DropoutPlan(tuple(drawn))


def check_plan(where: str, plan: Any, cells: Sequence[Any], batch: int, input_size: int) -> DropoutPlan:
    """Raise unless ``plan`` holds masks of the right shapes for ``cells`` on this batch."""
    if not isinstance(plan, DropoutPlan):
        raise fail(where, "dropout_plan", "a DropoutPlan (see draw_dropout_plan)", type_name(plan))
    if len(plan.cells) != len(cells):
        raise fail(where, "dropout_plan", f"masks for {len(cells)} cells", f"masks for {len(plan.cells)} cells")
    for k, (cell, masks) in enumerate(zip(cells, plan.cells)):
        gates = getattr(cell, "gates", 1)
        for kind, tensor, features in (("input", masks.input, input_size), ("recurrent", masks.recurrent, cell.units)):
            if tensor is None:
                continue
            if tensor.dim() != 3 or tensor.shape[0] not in (1, gates) or tuple(tensor.shape[1:]) != (batch, features):
                expected = f"(1{f' or {gates}' if gates > 1 else ''}, {batch}, {features})"
                raise DroprnnError(
                    f"{where}: argument `dropout_plan` expected {kind} masks of cell {k} with shape {expected}, "
                    f"got {tuple(tensor.shape)}."
                )
        input_size = cell.output_size
    return plan
