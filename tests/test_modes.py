"""The mode registry (droprnn.dropout.modes) is what the rest reads: the README's table, the layers'
docstrings, the errors, and the plan's masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import droprnn
from droprnn.dropout import modes as registry
from droprnn.dropout.plan import draw_cell_masks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_table_has_every_mode_as_the_registry_says():
    text = README.read_text()
    for row in registry.readme_rows():
        assert row in text, f"the README's dropout table lacks or differs from: {row}"


def test_layer_docstrings_and_errors_list_every_mode():
    for layer in (droprnn.LSTM, droprnn.GRU, droprnn.SimpleRNN):
        assert all(f'"{name}"' in layer.__doc__ for name in [*registry.RECURRENT, *registry.INPUT])
    with pytest.raises(droprnn.DroprnnError) as error:
        droprnn.LSTM(3, recurrent_dropout_mode="sideways")
    assert all(repr(name) in str(error.value) for name in registry.RECURRENT)


@pytest.mark.parametrize("name", list(registry.RECURRENT))
def test_each_recurrent_mode_fills_its_site_and_no_other(name):
    mode = registry.RECURRENT[name]
    cell = droprnn.LSTMCell(5, recurrent_dropout=0.3, recurrent_dropout_mode=name, input_size=4)
    masks = draw_cell_masks(cell, 3, 4, True, torch.float64, torch.device("cpu"), steps=6)
    assert {site for site in registry.SITES if getattr(masks, site) is not None} == {mode.site}
    drawn = getattr(masks, mode.site)
    assert drawn.shape[0] == 6 if mode.per_step else drawn.shape[0] != 6
    if mode.site == "recurrent":
        assert drawn.shape[-3] == (4 if mode.per_gate else 1)
    assert mode.shared_by_batch == (3 not in drawn.shape), "DropConnect's mask has no batch axis"


@pytest.mark.parametrize("name", list(registry.INPUT))
def test_each_input_mode_draws_its_masks_per_step_and_per_gate_as_recorded(name):
    mode = registry.INPUT[name]
    for recurrent in (0.0, 0.3):  # Keras's input masks are per gate exactly when its recurrent dropout is on
        cell = droprnn.LSTMCell(5, dropout=0.3, recurrent_dropout=recurrent, input_dropout_mode=name, input_size=4)
        drawn = draw_cell_masks(cell, 3, 4, True, torch.float64, torch.device("cpu"), steps=6).input
        per_gate = mode.per_gate if mode.per_gate is not None else recurrent > 0
        assert drawn.shape[-3] == (4 if per_gate else 1)
        assert (drawn.dim() == 4) == mode.per_step


def test_simple_rnn_refuses_exactly_the_modes_that_need_an_update():
    for name, mode in registry.RECURRENT.items():
        if mode.needs_update:
            with pytest.raises(droprnn.DroprnnError, match="update"):
                droprnn.SimpleRNNCell(4, recurrent_dropout=0.2, recurrent_dropout_mode=name)
        else:
            droprnn.SimpleRNNCell(4, recurrent_dropout=0.2, recurrent_dropout_mode=name)
