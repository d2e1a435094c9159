"""The Penn Treebank window benchmark on the CPU: it counts the windows an epoch trains as lab.ptb.train
does, and times the same training step (lab.ptb.train_window) the runs take, so its projections are of the
real thing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from droprnn.lab import ptb


@pytest.fixture(scope="module")
def ptb_window(benchmark_script):
    return benchmark_script("ptb_window")


@pytest.mark.parametrize("name", ["zaremba-small", "zaremba-medium"])
def test_windows_per_epoch_are_the_windows_training_takes(ptb_window, name):
    preset = ptb.PRESETS[name]
    data = ptb.batchify(np.zeros(ptb_window.TOKENS["train"], dtype=np.int64), preset.batch_size)
    assert ptb_window.windows_per_epoch(preset) == sum(1 for _ in ptb.segments(data, preset.bptt, whole=False))


def test_a_window_trains_the_model(ptb_window):
    preset = dataclasses.replace(ptb.PRESETS["tiny"], units=8)
    torch.manual_seed(0)
    model = ptb.build_model(preset, vocabulary=50)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(50, (preset.batch_size, preset.bptt + 1))
    loss = ptb.train_window(model.train(), list(model.parameters()), ids[:, :-1], ids[:, 1:], preset, lr=0.5)
    assert loss.dtype == torch.float64 and 0 < loss.item() < float("inf")
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_the_reference_path_is_the_one_timed(ptb_window):
    from droprnn.layers.recurrent import RNN

    model = ptb.build_model(dataclasses.replace(ptb.PRESETS["tiny"], units=8), vocabulary=50)
    ptb_window.set_impl(model, "reference")
    rnns = [m for m in model.modules() if isinstance(m, RNN)]
    assert len(rnns) == 2 and all(m.impl == "reference" for m in rnns)
