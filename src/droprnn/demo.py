"""``droprnn demo``: where each Keras dropout placement drops, drawn from real layer calls.

For one input sequence it runs each placement once in training mode, reads back which entries were
dropped (from the layer's dropout plan, or by pushing ones through a dropout layer) and prints a
time × feature picture per placement, then checks the properties the pictures show.
"""

from __future__ import annotations

import torch

from .layers.dropout import Dropout, SpatialDropout1D
from .layers.recurrent import GRU

DROPPED, KEPT = "#", "."


def _picture(dropped: torch.Tensor) -> list[str]:
    """(T, F) booleans → one text row per timestep."""
    return ["".join(DROPPED if d else KEPT for d in row) for row in dropped.tolist()]


def _dropout_layer_pattern(layer: Dropout, shape: tuple[int, ...]) -> torch.Tensor:
    return layer(torch.ones(shape), training=True)[0] == 0


def placements(steps: int, features: int, units: int, rate: float, seed: int) -> list[tuple[str, str, torch.Tensor]]:
    """(code, what the picture shows, dropped (T, F) booleans) for each placement, on sample 0."""
    shape_in, shape_out = (2, steps, features), (2, steps, units)
    # Each placement gets its own seed: equal seeds would draw equal first masks and hide the differences.
    seeds = iter(range(seed, seed + 1_000_000, 1009))
    # A few steps of a small GRU: the reference loop answers at once (no first-use kernel build).
    gru = GRU(units, return_sequences=True, dropout=rate, recurrent_dropout=rate, seed=next(seeds), input_size=features,
              impl="reference")
    gru(torch.randn(shape_in), training=True)
    masks = gru.last_dropout_plan.cells[0]
    over_time = lambda mask: (mask[0] == 0).expand(steps, -1)  # noqa: E731 - a mask reused at every step
    rows = [
        ("Dropout(rate) after the GRU", "GRU outputs: a fresh pattern at every step",
         _dropout_layer_pattern(Dropout(rate, seed=next(seeds)), shape_out)),
        ("Dropout(rate, noise_shape=(None, 1, None))", "GRU outputs: one pattern reused at every step",
         _dropout_layer_pattern(Dropout(rate, noise_shape=(None, 1, None), seed=next(seeds)), shape_out)),
        ("Dropout(rate, noise_shape=(None, None, 1))", "inputs: whole timesteps zeroed",
         _dropout_layer_pattern(Dropout(rate, noise_shape=(None, None, 1), seed=next(seeds)), shape_in)),
        ("SpatialDropout1D(rate) on the input", "inputs: whole channels zeroed for all steps",
         _dropout_layer_pattern(SpatialDropout1D(rate, seed=next(seeds)), shape_in)),
        ("GRU(dropout=rate)  [update gate z]", "inputs entering the kernel, constant over time",
         over_time(masks.input[0])),
        ("GRU(dropout=rate)  [reset gate r]", "the same inputs, the r gate's own mask",
         over_time(masks.input[1])),
        ("GRU(recurrent_dropout=rate)  [gate z]", "h(t-1) entering the recurrent kernel; state itself kept",
         over_time(masks.recurrent[0])),
        ("GRU(recurrent_dropout=rate)  [gate r]", "h(t-1) for the r gate: its own mask",
         over_time(masks.recurrent[1])),
    ]
    return rows


def run(steps: int = 12, features: int = 10, units: int = 10, rate: float = 0.5, seed: int = 0) -> None:
    print(f"droprnn demo: which entries each placement drops (rate {rate}, one sequence of {steps} steps)")
    print(f"pictures: rows = timesteps, columns = features or units, {DROPPED} = dropped, {KEPT} = kept\n")
    rows = placements(steps, features, units, rate, seed)
    for group in (rows[:4], rows[4:]):
        for number, (code, what, dropped) in enumerate(group, start=rows.index(group[0]) + 1):
            constant = "same at every step" if bool((dropped == dropped[0]).all()) else "changes over time"
            print(f"  ({number}) {code}: {what} [{float(dropped.float().mean()):.0%} dropped, {constant}]")
        print()
        width = max(len(p) for p in _picture(group[0][2]))
        header = "   ".join(f"({rows.index(r) + 1})".ljust(width) for r in group)
        print("  " + header)
        for lines in zip(*(_picture(r[2]) for r in group)):
            print("  " + "   ".join(line.ljust(width) for line in lines))
        print()
    print(
        "A recurrent layer has two dropout sites: `dropout` masks the step input, `recurrent_dropout` masks\n"
        "h(t-1) where it feeds the gates (never the carried state). Keras draws those masks once per\n"
        "sequence and reuses them at every step; a Dropout layer only ever touches the tensor it is given."
    )
