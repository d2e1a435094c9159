"""How the step kernels receive the noise besides the input masks: the constexpr codes of recurrent,
update and zoneout masks (per sequence, per step from a tensor, made from the counter, or an expectation).
Part of a loop's key: a captured loop keeps its constexprs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from ...random import CounterMask

Tensor = torch.Tensor

# The codes the step kernels branch on (constexprs; triton_helpers.py hands the same names to the kernels).
REC_PER_SEQUENCE, REC_PER_STEP, REC_COUNTER = 0, 1, 2  # recurrent masks: (m, B, U) or none; (T, m, B, U); counter
UPDATE_NONE, UPDATE_PER_SEQUENCE, UPDATE_PER_STEP, UPDATE_COUNTER = 0, 1, 2, 3  # (B, U); (T, B, U); counter
ZONE_NONE, ZONE_DRAWN, ZONE_EXPECTATION, ZONE_COUNTER = 0, 1, 2, 3  # (T, B, U) indicators; the rate; counter


def counter_constants(mask: CounterMask) -> tuple[int, float]:
    """(THRESH, SCALE) of a counter-based mask for the kernels: its threshold, and its kept value as the
    mask's dtype holds it (what ``CounterMask.materialize`` computes)."""
    return mask.threshold, float(torch.ones((), dtype=mask.dtype) / (1.0 - mask.rate))


def rec_modes(rec: Any) -> tuple:
    """The recurrent masks' constexprs (REC_MODE, one of the REC_* codes; REC_THRESH, REC_SCALE)."""
    if isinstance(rec, CounterMask):
        return (REC_COUNTER, *counter_constants(rec))
    return (REC_PER_STEP if rec is not None and rec.dim() == 4 else REC_PER_SEQUENCE, 0, 1.0)


class Noise(NamedTuple):
    """What the step kernels apply besides the input and recurrent masks, as a cell's forward receives it."""

    update: Any = None  # the cell update's mask: (B, U) per sequence, (T, B, U) per step, or a CounterMask
    zoneout: tuple = ()  # per state: None, the keep-old indicators (T, B, U) or a CounterMask, or a float rate
    seed: Optional[Tensor] = None  # the counter seed shared by the call's counter-based masks (recurrent ones too)

    def modes(self) -> tuple:
        """The kernels' constexprs, part of the loop key (a captured loop keeps its constexprs):
        (UPDATE, one of the UPDATE_* codes; UPD_THRESH; UPD_SCALE), and per state (ZONE, one of the ZONE_*
        codes; RATE, the expectation for ZONE_EXPECTATION; THRESH, the counter's for ZONE_COUNTER)."""
        if isinstance(self.update, CounterMask):
            update = (UPDATE_COUNTER, *counter_constants(self.update))
        elif self.update is None:
            update = (UPDATE_NONE, 0, 1.0)
        else:
            update = (UPDATE_PER_SEQUENCE if self.update.dim() == 2 else UPDATE_PER_STEP, 0, 1.0)
        zones = tuple((ZONE_NONE, 0.0, 0) if z is None else (ZONE_EXPECTATION, float(z), 0) if isinstance(z, float)
                      else (ZONE_COUNTER, 0.0, z.threshold) if isinstance(z, CounterMask) else (ZONE_DRAWN, 0.0, 0)
                      for z in self.zoneout)
        return update, zones

    def zone(self, k: int) -> Optional[Tensor]:
        """State k's zoneout indicators as a tensor, or None (none, counter-based, or the expectation)."""
        z = self.zoneout[k] if k < len(self.zoneout) else None
        return z if torch.is_tensor(z) else None
