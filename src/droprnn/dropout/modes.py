"""The named dropout schemes a recurrent cell can use: one record per mode, the single list of them.

Everything else reads these records: the plan draws a mode's masks from its record (:mod:`droprnn.dropout.plan`
dispatches on ``site``, ``per_step`` and ``per_gate``), the cells check names against them, the layers'
docstrings, error messages and the README's table of variants are made from them, and the tests take
their lists of modes from here.

Adding a mode that reuses a mask site (a recurrent mask, an update mask, a recurrent-kernel mask) is one
record below, plus the kernels' handling if its masks have a new shape (docs/architecture.md has the recipe).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import DroprnnError

SITES = ("input", "recurrent", "update", "recurrent_kernel")  # the CellMasks fields a mode's masks fill


@dataclass(frozen=True)
class Mode:
    """One dropout scheme of a cell's ``input_dropout_mode`` or ``recurrent_dropout_mode``.

    site:       the :class:`~droprnn.dropout.plan.CellMasks` field its masks fill
    per_step:   a fresh mask at every step (else one per sequence, reused at every step)
    per_gate:   one mask per gate; None for "keras" input dropout, which is per gate exactly when Keras's
                recurrent dropout is on
    per_unit:   a recurrent-kernel mask over whole rows (a unit's outgoing weights) rather than entries
    title, where, shared_over, paper: the README's columns; meaning: the one line errors and docs print
    """

    name: str
    title: str
    site: str
    meaning: str
    where: str
    shared_over: str
    paper: str
    per_step: bool = False
    per_gate: Optional[bool] = False
    per_unit: bool = False

    @property
    def shared_by_batch(self) -> bool:
        """One mask for every sequence of the batch: the recurrent kernel's (DropConnect)."""
        return self.site == "recurrent_kernel"

    @property
    def needs_update(self) -> bool:
        """It masks a cell update (LSTM's g, GRU's candidate), which SimpleRNN does not have."""
        return self.site == "update"


RECURRENT: dict[str, Mode] = {m.name: m for m in (
    Mode("keras", "recurrent dropout (Keras)", "recurrent",
         meaning="one mask per gate on h(t-1) where it enters the recurrent kernel, drawn once per sequence (Keras "
                 "3 >= 3.8; Gal & Ghahramani's untied variant)",
         where="h(t-1) before the recurrent kernel, one mask per gate; never the carried state",
         shared_over="time",
         paper="Gal & Ghahramani 2016 (untied); Keras ≥ 3.8",
         per_gate=True),
    Mode("tied", "tied recurrent dropout", "recurrent",
         meaning="one mask on h(t-1) shared by all gates, drawn once per sequence (Gal & Ghahramani's tied "
                 "variant)",
         where="h(t-1) before the recurrent kernel",
         shared_over="time, gates",
         paper="Gal & Ghahramani 2016 (tied)"),
    Mode("per_step", "per-step recurrent dropout", "recurrent",
         meaning="one mask per gate on h(t-1), drawn afresh at every step (the naive scheme)",
         where="h(t-1) before the recurrent kernel, per gate",
         shared_over="nothing",
         paper="the naive scheme (Zaremba et al. warn against it)",
         per_step=True, per_gate=True),
    Mode("update", "update dropout", "update",
         meaning="one mask on the cell update (LSTM's g, GRU's candidate) per sequence; memory is never erased "
                 "(Semeniuta et al. 2016)",
         where="LSTM's candidate g (`c = f·c + i·(g⊙m)`), GRU's candidate ĥ; memory is never erased",
         shared_over="time",
         paper="Semeniuta et al. 2016"),
    Mode("update_per_step", "update dropout, per step", "update",
         meaning="as 'update', with a fresh mask at every step",
         where="as above",
         shared_over="nothing",
         paper="Semeniuta et al. 2016",
         per_step=True),
    Mode("weights", "DropConnect on recurrent weights", "recurrent_kernel",
         meaning="DropConnect on recurrent_kernel: one mask over the matrix per call, shared by the batch (Wan et "
                 "al. 2013; AWD-LSTM's WeightDrop)",
         where="entries of `recurrent_kernel`",
         shared_over="time, batch",
         paper="Wan et al. 2013; Merity et al. 2017 (AWD-LSTM's WeightDrop)"),
    Mode("weights_per_unit", "DropConnect per unit", "recurrent_kernel",
         meaning="DropConnect on whole rows of recurrent_kernel (one unit's outgoing weights), per call, shared by "
                 "the batch",
         where="whole rows of `recurrent_kernel` (a unit's outgoing weights)",
         shared_over="time, batch",
         paper="—",
         per_unit=True),
)}

INPUT: dict[str, Mode] = {m.name: m for m in (
    Mode("keras", "input dropout (Keras)", "input",
         meaning="as Keras: one mask per gate when Keras-style recurrent dropout is on, else one shared mask; "
                 "drawn once per sequence",
         where="x(t) before the input kernel; one mask per gate when Keras recurrent dropout is on",
         shared_over="time",
         paper="Gal & Ghahramani 2016",
         per_gate=None),
    Mode("shared", "input, one mask for all gates", "input",
         meaning="one mask shared by all gates, drawn once per sequence",
         where="x(t)",
         shared_over="time, gates",
         paper="Gal & Ghahramani 2016 (tied)"),
    Mode("per_gate", "input, one mask per gate", "input",
         meaning="one mask per gate, drawn once per sequence",
         where="x(t), per gate",
         shared_over="time",
         paper="Gal & Ghahramani 2016 (untied)",
         per_gate=True),
    Mode("per_step", "input, fresh every step", "input",
         meaning="one mask shared by all gates, drawn afresh at every step (Keras 2's cuDNN-path behaviour)",
         where="x(t)",
         shared_over="gates",
         paper="Keras 2's cuDNN path; Zaremba et al. 2014 style",
         per_step=True),
)}

# name -> meaning, as errors list them
RECURRENT_MODES: dict[str, str] = {name: m.meaning for name, m in RECURRENT.items()}
INPUT_MODES: dict[str, str] = {name: m.meaning for name, m in INPUT.items()}
UPDATE_MODES = tuple(name for name, m in RECURRENT.items() if m.needs_update)
WEIGHT_MODES = tuple(name for name, m in RECURRENT.items() if m.shared_by_batch)


def cells_share_masks_over_batch(cells: Iterable[Any]) -> bool:
    """Whether any of these cells draws, in training, one mask for the whole batch (the DropConnect modes mask
    the weights once per call), so that its batch rows are not independent stochastic passes."""
    return any(c.recurrent_dropout > 0 and c.recurrent_dropout_mode in WEIGHT_MODES for c in cells)


def check_mode(where: str, argument: str, value: object, modes: dict[str, str]) -> str:
    if not isinstance(value, str) or value not in modes:
        listing = "\n".join(f"  {name!r}: {meaning}" for name, meaning in modes.items())
        raise DroprnnError(f"{where}: argument `{argument}` expected one of the modes below, got {value!r}.\n{listing}")
    return value


def layer_doc(update: str, zoneout_c: str = "") -> str:
    """The "beyond Keras" part of a recurrent layer's docstring. ``update``: what the layer's update is."""
    def listing(argument: str, modes: dict[str, Mode], tail: str = "") -> str:
        text = f"{argument}: " + ", ".join(f'"{name}" ({_short(m)})' for name, m in modes.items()) + tail + "."
        return textwrap.fill(text, 108, initial_indent=" " * 8, subsequent_indent=" " * 12)

    return f"""
    Beyond Keras (defaults reproduce Keras exactly; see the README's dropout table):
{listing("recurrent_dropout_mode", RECURRENT, f"; the update modes mask {update}")}
{listing("input_dropout_mode", INPUT)}
        zoneout_h{zoneout_c}: per step, sample and unit, keep the previous value with this probability
            (Krueger et al. 2016); inference uses the expectation.
"""


def _short(mode: Mode) -> str:
    """A mode's meaning up to its first ';' or ' (' -- the docstrings' short form."""
    text = mode.meaning
    for stop in ("; ", " ("):
        text = text.split(stop)[0]
    return text


def readme_rows() -> list[str]:
    """The README's dropout-table rows of the modes (input modes, then recurrent ones), as markdown."""
    rows = []
    for family, rate, modes in (("input", "dropout", INPUT), ("recurrent", "recurrent_dropout", RECURRENT)):
        for name, m in modes.items():
            flag = f"`{rate}=p`" if name == "keras" else f'`{rate}=p, {family}_dropout_mode="{name}"`'
            rows.append(f"| {m.title} | {m.where} | {m.shared_over} | {m.paper} | {flag} |")
    return rows
