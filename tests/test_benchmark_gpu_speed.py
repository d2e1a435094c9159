"""The GPU benchmark's parts that need no GPU: its baseline rows and hand loop run on CPU tensors, and its
summary table computes the speed-ups the GPU targets are stated in. A GPU run is scarce: a crash in these would waste it."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_speed(benchmark_script):
    return benchmark_script("gpu_speed")


def test_the_default_run_times_the_hand_loop_but_not_the_reference(gpu_speed):
    assert "hand" in gpu_speed.DEFAULT_VARIANTS and "rd" in gpu_speed.DEFAULT_VARIANTS
    assert "ref" not in gpu_speed.DEFAULT_VARIANTS


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple"])
def test_hand_loop_trains_on_the_inputs_it_was_given(gpu_speed, cell):
    x = torch.randn(3, 5, 4, requires_grad=True)
    step = gpu_speed._hand_loop(cell, x, units=6)
    step()
    first = x.grad.clone()
    assert first.shape == x.shape and first.abs().sum() > 0
    step()  # fresh masks each call: the gradient accumulates a different second term
    assert not torch.allclose(x.grad, 2 * first)


def test_cudnn_rows_train_torch_nn_and_restore_torchs_switches(gpu_speed):
    before = torch.backends.cudnn.allow_tf32
    for variant in ("cudnn", "cudnn-fp32"):  # the second turns TF32 off inside its step only
        step = gpu_speed.make_step("gru", variant, (2, 4, 3, 5), torch.device("cpu"))
        step()
        assert torch.backends.cudnn.allow_tf32 == before
        (module,) = [c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.GRU)]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), "forward + backward"


def test_summary_reports_ratios_to_cudnn_and_speedups_of_rd(gpu_speed):
    shape = (64, 100, 256, 256)
    rows = [{"cell": "lstm", "shape": list(shape), "variant": v, "ms": ms}
            for v, ms in [("cudnn", 5.0), ("rd", 4.0), ("rd-eager", 20.0), ("hand", 60.0)]]
    table = gpu_speed.summary(rows, "lstm", [shape])
    head, _, line = table.splitlines()
    assert "hand/rd" in head and "eager/graphs rd" in head
    # rd 4.00 (0.80), rd-eager 20.00 (4.00), hand 60.00 (12.00), then eager/graphs 5.00, hand/rd 15.00
    assert [float(n) for n in line.split()[-2:]] == [5.0, 15.0]
    assert "4.00 ( 0.80)" in line and "60.00 (12.00)" in line


def test_summary_leaves_an_untimed_speedup_as_nan(gpu_speed):
    shape = (1, 1000, 256, 256)
    rows = [{"cell": "gru", "shape": list(shape), "variant": v, "ms": 10.0} for v in ("cudnn", "rd")]
    line = gpu_speed.summary(rows, "gru", [shape]).splitlines()[2]
    assert [math.isnan(float(n)) for n in line.split()[-2:]] == [True, True]


def test_the_compiled_row_is_timed_at_the_first_shapes_only(gpu_speed):
    timed = [gpu_speed.timed_at("rd-compiled", shape, i) for i, shape in enumerate(gpu_speed.SHAPES)]
    assert timed == [i < gpu_speed.COMPILED_SHAPES for i in range(len(gpu_speed.SHAPES))]
    assert gpu_speed.baseline("rd-compiled") == "cudnn"
