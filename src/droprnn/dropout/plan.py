"""The dropout plan: every mask a recurrent layer call will use, drawn before the time loop runs.

Masks are data. The loop receives them and never draws on its own, so a test can record or replace
them, a fast kernel can be held to the reference with the same masks, and MC dropout re-draws them.

Keras 3's recipe (``recurrent_dropout_mode="keras"``, ``input_dropout_mode="keras"``; see
``keras/src/layers/rnn/dropout_rnn_cell.py`` with ``RNN.call``):

- one draw per layer call, reused at every timestep; masks are (B, features), independent per sample
  and feature, entries 0 or 1/(1-p) (inverted dropout);
- with ``recurrent_dropout > 0`` one input mask per gate and one recurrent mask per gate (4 for LSTM,
  3 for GRU); otherwise a single input mask shared by all gates;
- draw order: a cell's input masks in gate order, then its recurrent masks, then the next stacked cell;
- outside training nothing is applied, but a seeded stream still advances by the draws Keras would make,
  so a seeded layer stays in step with Keras across inference calls.

The other modes (:mod:`droprnn.dropout.modes`) draw after Keras's masks: update masks, DropConnect masks,
then zoneout indicators. Per-step masks carry a leading time axis (T, ...), indexed by processing step.

On CUDA the masks a time loop uses per step -- per-step recurrent and update masks, zoneout indicators --
are :class:`~droprnn.random.CounterMask` objects: one seed per cell and call, each entry made from (seed,
index) inside the GPU kernels' steps, so no (T, B, H) tensor is stored. ``materialized()`` turns them into
tensors (the CPU kernels do so); on the CPU they are drawn as tensors from torch's generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch

from ..errors import DroprnnError, fail, type_name
from ..random import CounterMask, draw_seed, dropout_mask, keep_mask
from .modes import INPUT, RECURRENT

Tensor = torch.Tensor

# Devices whose plans hold counter-based per-step masks (the GPU kernels make them inside their steps).
COUNTER_DEVICES = frozenset({"cuda"})
# The counter stream of each kind of per-step mask (one seed per cell and call serves all of them); the GPU
# kernels read these numbers (kernels/gpu/triton_helpers.py: STREAM_RECURRENT, STREAM_UPDATE, STREAM_ZONEOUT_H/C).
RECURRENT_STREAM, UPDATE_STREAM, ZONEOUT_STREAMS = 0, 1, (2, 3)


class StepMasks(NamedTuple):
    """The masks of one timestep (see :meth:`CellMasks.at`): what a cell's step reads."""

    recurrent: Optional[Tensor] = None  # (m, B, H) on h(t-1) where it meets the recurrent kernel
    update: Optional[Tensor] = None  # (B, U) on the cell update
    zoneout: Optional[tuple[Optional[Tensor], ...]] = None  # per state: keep-old indicator or its expectation


@dataclass(frozen=True)
class CellMasks:
    """The masks of one cell for one layer call (None where that kind of noise is off).

    input:            (m, B, D), or (T, m, B, D) drawn per step; multiplies the step input. m == 1: shared
                      by all gates; m == gates: one per gate.
    recurrent:        (m, B, H), or (T, m, B, H) per step; multiplies h(t-1) where it meets the recurrent kernel.
    update:           (B, U), or (T, B, U) per step; multiplies the cell update (Semeniuta et al.).
    recurrent_kernel: (H, k·U), or (H, 1) per unit; multiplies the recurrent kernel (DropConnect).
    zoneout:          per state, None or the keep-old indicator: (T, B, size) of 0/1 in training, a 0-d
                      tensor holding the zoneout rate (its expectation) in inference.
    A per-step recurrent or update mask and a zoneout indicator may be a :class:`~droprnn.random.CounterMask`
    (plans drawn on CUDA): shaped like its tensor, made on demand (``materialized()``).
    """

    input: Optional[Tensor] = None
    recurrent: Optional[Tensor] = None
    update: Optional[Tensor] = None
    recurrent_kernel: Optional[Tensor] = None
    zoneout: Optional[tuple[Optional[Tensor], ...]] = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in ("input", "recurrent", "update", "recurrent_kernel", "zoneout"))

    @staticmethod
    def _at(mask: Optional[Tensor], t: int, per_sequence_dim: int) -> Optional[Tensor]:
        if mask is None or mask.dim() == per_sequence_dim:
            return mask
        return mask[t]

    def input_at(self, t: int) -> Optional[Tensor]:
        """The input masks of processing step t, (m, B, D)."""
        return self._at(self.input, t, 3)

    def at(self, t: int):
        """The :class:`StepMasks` of processing step t."""
        zoneout = None
        if self.zoneout is not None:  # per step in training; a constant expectation in inference
            zoneout = tuple(z if z is None or z.dim() == 0 else z[t] for z in self.zoneout)
        return StepMasks(self._at(self.recurrent, t, 3), self._at(self.update, t, 2), zoneout)

    def weights_for(self, weights):
        """``weights`` with the DropConnect mask applied to the recurrent kernel (once per call)."""
        if self.recurrent_kernel is None:
            return weights
        return weights._replace(recurrent_kernel=weights.recurrent_kernel * self.recurrent_kernel)

    def _map(self, fn) -> "CellMasks":
        def each(mask):
            return None if mask is None else fn(mask)

        zoneout = None if self.zoneout is None else tuple(each(z) for z in self.zoneout)
        return CellMasks(each(self.input), each(self.recurrent), each(self.update), each(self.recurrent_kernel), zoneout)

    def materialized(self) -> "CellMasks":
        """These masks with every :class:`~droprnn.random.CounterMask` made into its tensor."""
        return self._map(lambda mask: mask.materialize() if isinstance(mask, CounterMask) else mask)

    def to(self, dtype: torch.dtype) -> "CellMasks":
        """These masks in ``dtype`` (the entries of a float64 rerun of a float32 call, say)."""
        return self._map(lambda mask: mask.to(dtype))

    @property
    def counter_based(self) -> bool:
        return any(isinstance(m, CounterMask) for m in (self.recurrent, self.update, *(self.zoneout or ())))


@dataclass(frozen=True)
class DropoutPlan:
    """The masks of every cell of one layer call, in stacking order."""

    cells: tuple[CellMasks, ...]

    @property
    def empty(self) -> bool:
        return all(masks.empty for masks in self.cells)

    def to(self, dtype: torch.dtype) -> "DropoutPlan":
        """This plan's masks in ``dtype``."""
        return DropoutPlan(tuple(masks.to(dtype) for masks in self.cells))

    def masks(self) -> list[Any]:
        """Every mask of the plan (tensors and CounterMasks), in no particular order."""
        found = []
        for cell in self.cells:
            found += [m for m in (cell.input, cell.recurrent, cell.update, cell.recurrent_kernel) if m is not None]
            found += [z for z in cell.zoneout or () if z is not None]
        return found

    def materialized(self) -> "DropoutPlan":
        """This plan with its counter-based masks made into tensors (itself when it has none)."""
        if not any(masks.counter_based for masks in self.cells):
            return self
        return DropoutPlan(tuple(masks.materialized() for masks in self.cells))


def _keras_draw_counts(cell: Any) -> tuple[int, int]:
    """(input masks, recurrent masks) Keras would draw for this cell in one call."""
    dropout, recurrent_dropout, gates = cell.dropout, cell.recurrent_dropout, cell.gates
    inputs = (gates if recurrent_dropout > 0 else 1) if dropout > 0 else 0
    return inputs, (gates if recurrent_dropout > 0 else 0)


def _input_mask_count(cell: Any) -> int:
    mode = INPUT[cell.input_dropout_mode]
    per_gate = mode.per_gate
    if per_gate is None:  # Keras: per gate exactly when its own recurrent dropout is on
        per_gate = cell.recurrent_dropout > 0 and cell.recurrent_dropout_mode == "keras"
    return cell.gates if per_gate else 1


def draw_cell_masks(
    cell: Any, batch: int, input_size: int, training: bool, dtype: torch.dtype, device: torch.device, steps: int = 1
) -> CellMasks:
    """Draw ``cell``'s masks for ``batch`` sequences of ``steps`` steps with ``input_size`` features."""
    stream, gates, hidden = cell.seed_stream, cell.gates, cell.state_size[0]
    dropout, recurrent_dropout, zoneout_rates = cell.dropout, cell.recurrent_dropout, cell.zoneout_rates
    input_mode, recurrent_mode = cell.input_dropout_mode, cell.recurrent_dropout_mode
    if not training:
        if input_mode == recurrent_mode == "keras":
            stream.skip(sum(_keras_draw_counts(cell)))
        zoneout = tuple(None if not rate else torch.tensor(rate, dtype=dtype, device=device) for rate in zoneout_rates)
        return CellMasks(zoneout=zoneout if any(zoneout_rates) else None)

    def mask(shape: tuple[int, ...], rate: float) -> Tensor:
        return dropout_mask(shape, rate, stream, dtype, device)

    counter_seed: list[Tensor] = []  # drawn once, when the first per-step mask of this call needs it

    def per_step(stream_id: int, shape: tuple[int, ...], rate: float, kind: str = "dropout") -> Any:
        """A mask drawn per step: counter-based on COUNTER_DEVICES, else a tensor from torch's generators."""
        if device.type not in COUNTER_DEVICES:
            if kind == "keep":
                return (~keep_mask(shape, rate, stream, device)).to(dtype)
            return mask(shape, rate)
        if not counter_seed:
            counter_seed.append(draw_seed(stream, device))
        return CounterMask(counter_seed[0], stream_id, shape, rate, kind, dtype)

    def per_gate(count: int, shape: tuple[int, ...], rate: float) -> Tensor:
        if stream.seed is None:  # the global RNG: one draw for all gates (fewer kernel launches)
            return mask((count, *shape), rate)
        # One draw per gate, in gate order: Keras's sequence of draws, so seeded masks match Keras's.
        return torch.stack([mask(shape, rate) for _ in range(count)])

    masks: dict[str, Any] = {}
    if dropout > 0:
        if INPUT[input_mode].per_step:  # one mask for all gates at each step
            masks["input"] = mask((steps, 1, batch, input_size), dropout)
        else:
            masks["input"] = per_gate(_input_mask_count(cell), (batch, input_size), dropout)
    p = recurrent_dropout
    if p > 0:  # the mode's record says where its masks go and how they are drawn
        mode = RECURRENT[recurrent_mode]
        if mode.site == "recurrent":
            count = gates if mode.per_gate else 1
            if mode.per_step:
                drawn = per_step(RECURRENT_STREAM, (steps, count, batch, hidden), p)
            else:
                drawn = per_gate(count, (batch, hidden), p)
        elif mode.site == "update":
            shape = (batch, cell.units)
            drawn = per_step(UPDATE_STREAM, (steps, *shape), p) if mode.per_step else mask(shape, p)
        else:  # the recurrent kernel (DropConnect): its entries, or whole rows
            drawn = mask((hidden, 1) if mode.per_unit else (hidden, gates * cell.units), p)
        masks[mode.site] = drawn
    if any(zoneout_rates):
        masks["zoneout"] = tuple(
            None if not rate else per_step(ZONEOUT_STREAMS[k], (steps, batch, size), rate, kind="keep")
            for k, (rate, size) in enumerate(zip(zoneout_rates, cell.state_size))
        )
    return CellMasks(**masks)


def draw_plan(
    cells: Sequence[Any], batch: int, input_size: int, training: bool, dtype: torch.dtype, device: torch.device,
    steps: int = 1,
) -> DropoutPlan:
    """Draw the masks of stacked ``cells`` (cell k > 0 sees the previous cell's output size)."""
    drawn = []
    for cell in cells:
        drawn.append(draw_cell_masks(cell, batch, input_size, training, dtype, device, steps))
        input_size = cell.output_size
    return DropoutPlan(tuple(drawn))


def check_plan(where: str, plan: Any, cells: Sequence[Any], batch: int, input_size: int, steps: int,
               device: Optional[torch.device] = None) -> DropoutPlan:
    """Raise unless ``plan`` holds masks of the right shapes for ``cells`` on this batch, on ``device`` (the
    input's) when given: every kernel takes what passes here (in any floating dtype: see ``DropoutPlan.to``)."""
    if not isinstance(plan, DropoutPlan):
        raise fail(where, "dropout_plan", "a DropoutPlan (see draw_dropout_plan)", type_name(plan))
    if len(plan.cells) != len(cells):
        raise fail(where, "dropout_plan", f"masks for {len(cells)} cells", f"masks for {len(plan.cells)} cells")
    for k, (cell, masks) in enumerate(zip(cells, plan.cells)):
        gates, hidden = getattr(cell, "gates", 1), cell.state_size[0]
        counts = {1, gates}
        # kind -> (tensor, accepted per-sequence shapes (an entry may be a set of sizes), may carry a time axis)
        # (input masks drawn per step are shared by the gates: (T, 1, B, D), as draw_plan makes them)
        timed_input = masks.input is not None and masks.input.dim() == 4
        expectations = {
            "input": (masks.input, [({1} if timed_input else counts, batch, input_size)], True),
            "recurrent": (masks.recurrent, [(counts, batch, hidden)], True),
            "update": (masks.update, [(batch, cell.units)], True),
            "recurrent_kernel": (masks.recurrent_kernel, [(hidden, gates * cell.units), (hidden, 1)], False),
        }
        for kind, (tensor, shapes, timed) in expectations.items():
            if tensor is None:
                continue
            _check_kind(where, k, kind, tensor, device)
            shape = tuple(tensor.shape)
            if timed and len(shape) == len(shapes[0]) + 1 and shape[0] == steps:
                shape = shape[1:]
            if not any(_fits(shape, accepted) for accepted in shapes):
                expected = " or ".join(_show(accepted) for accepted in shapes)
                timing = f" (or with a leading time axis of {steps})" if timed else ""
                raise DroprnnError(
                    f"{where}: argument `dropout_plan` expected {kind} masks of cell {k} with shape "
                    f"{expected}{timing}, got {tuple(tensor.shape)}."
                )
        _check_zoneout(where, k, masks.zoneout, cell, batch, steps)
        for z in masks.zoneout or ():
            if z is not None:
                _check_kind(where, k, "zoneout", z, device)
        input_size = cell.output_size
    return plan


def _check_kind(where: str, k: int, kind: str, mask: Any, device: Optional[torch.device]) -> None:
    """A mask must be a floating tensor (or a CounterMask) on the call's device."""
    if not (torch.is_tensor(mask) or isinstance(mask, CounterMask)) or not mask.dtype.is_floating_point:
        got = f"a {mask.dtype} tensor" if torch.is_tensor(mask) else type_name(mask)
        raise DroprnnError(f"{where}: argument `dropout_plan` expected {kind} masks of cell {k} as a floating "
                           f"tensor, got {got}.")
    if device is not None and mask.device != device:
        raise DroprnnError(
            f"{where}: argument `dropout_plan` expected {kind} masks of cell {k} on {device} (as the input), got "
            f"them on {mask.device}; draw the plan on that device (draw_dropout_plan(..., device=...))."
        )


def _check_zoneout(where: str, k: int, zoneout: Any, cell: Any, batch: int, steps: int) -> None:
    if zoneout is None:
        return
    sizes = cell.state_size
    if not isinstance(zoneout, tuple) or len(zoneout) != len(sizes):
        raise DroprnnError(
            f"{where}: argument `dropout_plan` expected zoneout of cell {k} as a tuple of {len(sizes)} entries "
            f"(one per state), got {type_name(zoneout)}."
        )
    for name, size, z in zip(getattr(cell, "state_names", ("h",) * len(sizes)), sizes, zoneout):
        if z is None or z.dim() == 0:
            continue
        if tuple(z.shape) != (steps, batch, size):
            raise DroprnnError(
                f"{where}: argument `dropout_plan` expected zoneout indicators for state {name} of cell {k} with "
                f"shape ({steps}, {batch}, {size}) or a scalar rate, got {tuple(z.shape)}."
            )


def _fits(shape: tuple[int, ...], accepted: tuple[Any, ...]) -> bool:
    return len(shape) == len(accepted) and all(
        size in entry if isinstance(entry, set) else size == entry for size, entry in zip(shape, accepted)
    )


def _show(accepted: tuple[Any, ...]) -> str:
    entries = [" or ".join(map(str, sorted(e))) if isinstance(e, set) else str(e) for e in accepted]
    return "(" + ", ".join(entries) + ")"
