"""Mask pictures: for one input sequence, which entries each variant's model drops.

The model is run once in training mode on the sequence, layer by layer, and every mask is read back:
a dropout layer's pattern by pushing ones through it, a recurrent layer's from the dropout plan it drew
(``layer.last_dropout_plan``). Per-gate masks are shown as the share of gates that drop an entry (grey
= some gates), so Keras's four independent masks read as what they are.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..layers.dropout import Dropout, EmbeddingDropout, SpatialDropout1D, TimestepDropout
from ..layers.base import Layer
from ..layers.core import Dense, Sequential
from ..layers.recurrent import RNN

Tensor = torch.Tensor


@dataclass(frozen=True)
class Panel:
    """image: (rows, columns) share dropped in [0, 1]; rows are timesteps unless ``rows`` says otherwise."""

    title: str
    image: Tensor
    rows: str = "timestep"
    columns: str = "feature"


def _share(mask: Tensor) -> Tensor:
    """(m, F) masks of one sample → (F,) share of the m masks that drop each entry."""
    return (mask == 0).float().mean(0)


def _over_time(mask: Optional[Tensor], steps: int, per_sequence_dim: int) -> Optional[Tensor]:
    """A gated plan mask of sample 0 as (steps, F) shares: (m, B, F) per sequence or (T, m, B, F) per step."""
    if mask is None:
        return None
    if mask.dim() == per_sequence_dim:
        return _share(mask[:, 0]).expand(steps, -1)
    return torch.stack([_share(m[:, 0]) for m in mask[:steps]])


def _per_gate_note(mask: Tensor, gates: int) -> str:
    """How a panel of ``mask`` reads: one mask for every gate, or shares of the per-gate masks."""
    return f"(grey: dropped for some of the {gates} gates)" if mask.shape[-3] > 1 else "(one mask for every gate)"


def _recurrent_panels(layer: RNN, steps: int) -> list[Panel]:
    masks = layer.last_dropout_plan.cells[0].materialized()
    count = layer.cells[0].gates
    gates = f"{count} gates"
    panels = []
    inputs = _over_time(masks.input, steps, 3)
    if inputs is not None:
        panels.append(Panel(f"`dropout`: input x(t) into the kernel\n{_per_gate_note(masks.input, count)}", inputs))
    recurrent = _over_time(masks.recurrent, steps, 3)
    if recurrent is not None:
        panels.append(Panel(f"`recurrent_dropout`: h(t-1) into the\nrecurrent kernel "
                            f"{_per_gate_note(masks.recurrent, count)}", recurrent, columns="unit"))
    if masks.update is not None:
        update = masks.update[:, 0] if masks.update.dim() == 3 else masks.update[0].expand(steps, -1)
        panels.append(Panel("cell update dropped\n(the memory is kept)", (update[:steps] == 0).float(), columns="unit"))
    if masks.recurrent_kernel is not None:
        kernel = (masks.recurrent_kernel == 0).float()
        panels.append(Panel(f"recurrent kernel entries dropped\n(units × {gates}·units)",
                            kernel.expand(kernel.shape[0], layer.cells[0].recurrent_kernel.shape[1]),
                            rows="unit", columns="gate · unit"))
    for name, indicator in zip(("h", "c"), masks.zoneout or ()):
        if indicator is not None and indicator.dim() == 3:
            panels.append(Panel(f"zoneout: {name} units keeping\ntheir previous value", indicator[:steps, 0].float(),
                                columns="unit"))
    return panels


def mask_panels(model: Sequential, inputs: Tensor, lengths: Tensor) -> list[Panel]:
    """Every mask ``model`` draws for sample 0 of ``inputs`` (B, T, ...) with ``lengths`` (B,), in order."""
    steps = int(lengths[0])
    inputs, lengths = inputs[:1, :steps], lengths[:1]
    panels: list[Panel] = []
    x = inputs
    after_rnn = False  # a dropout layer before the first recurrent layer acts on the input, after it on outputs
    with torch.no_grad():
        for layer in model.layers:
            if isinstance(layer, Dense):
                break
            if isinstance(layer, RNN):
                x = layer(x, lengths=lengths, training=True)
                panels += _recurrent_panels(layer, steps)
                after_rnn = True
            elif isinstance(layer, (Dropout, SpatialDropout1D, TimestepDropout)):
                dropped = (layer(torch.ones_like(x), training=True)[0] == 0).float()
                where = "recurrent layer's output" if after_rnn else "input"
                if dropped.dim() == 1:  # the last output of a recurrent layer: one row
                    dropped = dropped[None]
                panels.append(Panel(f"{type(layer).__name__}{_noise(layer)}:\n{where} entries zeroed", dropped,
                                    rows="timestep" if dropped.shape[0] == steps else "",
                                    columns="unit" if after_rnn else "feature"))
                x = layer(x, training=True)
            elif isinstance(layer, EmbeddingDropout):
                kept = layer.embedding(x)
                x = layer(x, training=True)
                dropped = ((x[0] == 0) & (kept[0] != 0)).float()
                panels.append(Panel("EmbeddingDropout: word types dropped\n(every occurrence of a word)", dropped,
                                    columns="embedding unit"))
            else:
                x = layer(x, training=True) if isinstance(layer, Layer) else layer(x)
    return panels


def _noise(layer: Layer) -> str:
    shape = getattr(layer, "noise_shape", None)
    return f" noise_shape={tuple(shape)}" if shape is not None else ""


def draw(panels: list[Panel], path: Path, title: str) -> Path:
    """One PNG: the panels side by side, dropped entries dark. ``path`` is returned."""
    from .report import _require_matplotlib

    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    count = max(1, len(panels))
    width = max(5.5, 3.3 * count)
    figure = Figure(figsize=(width, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(textwrap.fill(title, int(width * 9)), fontsize=11)  # ~9 characters of 11 pt per inch
    grey = any(bool(((p.image > 0) & (p.image < 1)).any()) for p in panels)
    figure.supxlabel("black: dropped   white: kept" + ("   grey: dropped by some of the per-gate masks" if grey else ""),
                     fontsize=8)
    axes = figure.subplots(1, count, squeeze=False)[0]
    if not panels:
        axes[0].text(0.5, 0.5, "nothing is dropped", ha="center", va="center", fontsize=12)
        axes[0].set_axis_off()
    for ax, panel in zip(axes, panels):
        ax.imshow(panel.image.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_title("\n".join(textwrap.fill(line, 40) for line in panel.title.split("\n")), fontsize=8.5)
        for axis in (ax.xaxis, ax.yaxis):  # rows and columns are steps, units, features: whole numbers
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(panel.columns, fontsize=8)
        ax.set_ylabel(panel.rows, fontsize=8)
        ax.tick_params(labelsize=7)
        if panel.image.shape[0] == 1:  # one row (a last output): a strip, not a square
            ax.set_yticks([])
            ax.set_box_aspect(0.12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_variants(*, layer: str, units: int, features: int, steps: int, rate: float, variants: tuple[str, ...],
                  out: Path, seed: int = 0) -> dict[str, Path]:
    """``droprnn masks``: each variant's mask picture for a random (1, steps, features) sequence, no training."""
    from .variants import VARIANTS, build, model_code

    torch.manual_seed(seed)
    inputs = torch.randn(1, steps, features)
    lengths = torch.tensor([steps])
    images = {}
    for name in variants:
        code = model_code(VARIANTS[name], layer=layer, units=units, rate=rate, inputs=(), classes=2,
                          rnn_input=f"input_size={features}")
        torch.manual_seed(seed)
        panels = mask_panels(build(code), inputs, lengths)
        images[name] = draw(panels, Path(out) / f"{name}.png", f"{VARIANTS[name].title} (rate {rate}, {steps} steps)")
    return images
