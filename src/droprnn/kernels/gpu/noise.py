"""How the step kernels receive the noise besides the input masks: the constexpr codes of recurrent,
update and zoneout masks (per sequence, per step from a tensor, made from the counter, or an expectation).
Part of a loop's key: a captured loop keeps its constexprs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from ...random import CounterMask

Tensor = torch.Tensor


def counter_constants(mask: CounterMask) -> tuple[int, float]:
    """(THRESH, SCALE) of a counter-based mask for the kernels: its threshold, and its kept value as the
    mask's dtype holds it (what ``CounterMask.materialize`` computes)."""
    return mask.threshold, float(torch.ones((), dtype=mask.dtype) / (1.0 - mask.rate))


def rec_modes(rec: Any) -> tuple:
    """The recurrent masks' constexprs (REC_MODE, REC_THRESH, REC_SCALE): mode 0 per sequence (m, B, U) (or
    none), 1 per step (T, m, B, U) read from a tensor, 2 per step made from the counter."""
    if isinstance(rec, CounterMask):
        return (2, *counter_constants(rec))
    return (1 if rec is not None and rec.dim() == 4 else 0, 0, 1.0)


class Noise(NamedTuple):
    """What the step kernels apply besides the input and recurrent masks, as a cell's forward receives it."""

    update: Any = None  # the cell update's mask: (B, U) per sequence, (T, B, U) per step, or a CounterMask
    zoneout: tuple = ()  # per state: None, the keep-old indicators (T, B, U) or a CounterMask, or a float rate
    seed: Optional[Tensor] = None  # the counter seed shared by the call's counter-based masks (recurrent ones too)

    def modes(self) -> tuple:
        """The kernels' constexprs, part of the loop key (a captured loop keeps its constexprs):
        (UPDATE: 0 none, 1 per sequence, 2 per step, 3 counter-based; UPD_THRESH; UPD_SCALE), and per state
        (ZONE, RATE, THRESH): ZONE 0 none, 1 drawn indicators, 2 the expectation RATE, 3 counter-based."""
        if isinstance(self.update, CounterMask):
            update = (3, *counter_constants(self.update))
        else:
            update = (0 if self.update is None else self.update.dim() - 1, 0, 1.0)
        zones = tuple((0, 0.0, 0) if z is None else (2, float(z), 0) if isinstance(z, float)
                      else (3, 0.0, z.threshold) if isinstance(z, CounterMask) else (1, 0.0, 0)
                      for z in self.zoneout)
        return update, zones

    def zone(self, k: int) -> Optional[Tensor]:
        """State k's zoneout indicators as a tensor, or None (none, counter-based, or the expectation)."""
        z = self.zoneout[k] if k < len(self.zoneout) else None
        return z if torch.is_tensor(z) else None
