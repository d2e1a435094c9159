"""The fused CPU kernels against the reference loop, kernel dispatch, and explain().

The oracle is ``impl="reference"``: every comparison runs the same layer weights on the same input with the
SAME dropout plan (drawn once and passed as ``dropout_plan=``) through ``impl="fused"`` and
``impl="reference"``, and compares the forward outputs, final states and the gradients with respect to the
input, the initial states and every parameter.

Tolerances
- float64: fused == reference within 1e-10 (abs and rel).
- float32: both float32 runs (fused and reference) are judged against a float64 reference run of the same
  weights, input, initial states and masks cast to float64. For each compared tensor (output, state or
  gradient) let ``scale = max|r64|``, ``err_ref = max|r32 - r64|`` and ``err_fused = max|f32 - r64|``; we
  require ``err_fused <= max(1e-5 * scale, 2 * err_ref)``: the fused kernel is accurate to 1e-5 relative to
  the tensor's magnitude, or -- where float32 itself loses more than that (saturated gates, long chains) --
  at most twice as inaccurate as float32 PyTorch ops doing the reference computation. The criterion is not
  vacuous: the float64 reference is checked to be nonzero where it must be, the runs are checked to have
  taken the kernel they claim (``layer.last_kernel``), and on these small, well-conditioned cases
  ``err_ref`` is 1e-7..1e-6 relative (measured; the fused error stays below a third of the bound), so any
  real difference (a wrong mask, step or gate) fails.

Every fused run happens with ``torch.use_deterministic_algorithms(True)`` and
``torch.utils.deterministic.fill_uninitialized_memory = True``, so ``torch.empty`` / ``at::empty`` hand out
NaN-filled memory: an output or gradient element the kernel forgot to write shows up as NaN.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import droprnn
from droprnn import (
    GRU, LSTM, RNN, Bidirectional, CellMasks, DropoutPlan, DroprnnError, GRUCell, LSTMCell, SimpleRNN,
)
from droprnn.kernels import cpu, fused
from kernel_oracle import (
    assert_f64_equal, cast_plan, draw_plans, flat, holey_mask, loss_weights, make_initial_state, make_layer,
    random_input, rebuild, run_impl, spy_on, stable_seed, state_sizes, uninitialized_is_nan,
)

F32, F64 = torch.float32, torch.float64

_REASON = cpu.unavailable_reason()
# Without a compiler (or when switched off from outside) the fused kernels legitimately do not exist and the
# comparisons cannot run; any other reason (a failed build) must fail the suite loudly, not skip it.
needs_fused = pytest.mark.skipif(
    _REASON is not None and ("no C++ compiler" in _REASON or "DROPRNN_DISABLE_FUSED" in _REASON),
    reason=f"fused kernels unavailable here: {_REASON}",
)


# ----------------------------------------------------------------------------------------------- helpers
KINDS = ["lstm", "gru", "gru_reset_before", "simple", "stacked", "lstm_proj"]


@pytest.fixture(params=["in loop", "after loop"])
def weight_grads(request, monkeypatch):
    """Both ways the backward forms the weight and input gradients (fused._DEFER_BYTES): accumulated in the
    C++ loop (what these small shapes get), or from every step's gate gradients after it (large layers)."""
    if request.param == "after loop":
        monkeypatch.setattr(fused, "_DEFER_BYTES", 0)
        monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0)
    return request.param


def assert_f32_close(f32, r32, r64):
    """See the module docstring: fused float32 within max(1e-5 relative, 2x float32 reference's error)."""
    got = f32[0] + f32[1]
    ref = r32[0] + r32[1]
    exact = r64[0] + r64[1]
    assert len(got) == len(ref) == len(exact)
    for k, (f, r, e) in enumerate(zip(got, ref, exact)):
        assert f.dtype == F32 and f.shape == e.shape, (k, f.dtype, f.shape, e.shape)
        assert not torch.isnan(f).any(), f"tensor #{k}: NaN in the fused result (an element never written)"
        scale = e.abs().max().item() if e.numel() else 0.0
        err_ref = (r.double() - e).abs().max().item() if e.numel() else 0.0
        err_fused = (f.double() - e).abs().max().item() if e.numel() else 0.0
        bound = max(1e-5 * scale, 2 * err_ref, torch.finfo(F32).tiny)
        assert err_fused <= bound, (
            f"tensor #{k}: fused float32 error {err_fused:.3g} > bound {bound:.3g} "
            f"(scale {scale:.3g}, float32 reference error {err_ref:.3g})"
        )


def compare(layer, x, plans, *, initial_state=None, **kwargs):
    """fused == reference (see the module docstring for the criterion); returns the reference result."""
    dtype = x.dtype
    ref = run_impl(layer, "reference", x, plans, initial_state=initial_state, **kwargs)
    got = run_impl(layer, "fused", x, plans, initial_state=initial_state, **kwargs)
    if dtype == F64:
        assert_f64_equal(got, ref)
        exact = ref
    else:
        layer64 = copy.deepcopy(layer).double()
        init64 = None if initial_state is None else rebuild(initial_state, [t.double() for t in flat(initial_state)])
        exact = run_impl(layer64, "reference", x.double(), [cast_plan(p, F64) for p in plans],
                         initial_state=init64, **kwargs)
        assert_f32_close(got, ref, exact)
    # Non-vacuity: the outputs, the input gradient and the recurrent kernels' gradients are not all zero.
    outputs, grads = exact
    assert any(o.abs().max() > 0 for o in outputs if o.numel())
    input_masks = [p.cells[0].input for p in plans if p.cells[0].input is not None]
    all_inputs_dropped = bool(input_masks) and all(not m.any() for m in input_masks)  # tiny D, small B: possible
    assert grads[0].abs().max() > 0 or all_inputs_dropped or (
        kwargs.get("lengths") is not None and max(kwargs["lengths"]) == 0)
    return exact


# ----------------------------------------------------------------------------------------------- 1. equality
MODES = {
    "none": {},
    "keras_both": dict(dropout=0.3, recurrent_dropout=0.3),
    "keras_input_only": dict(dropout=0.3),
    "keras_recurrent_only": dict(recurrent_dropout=0.3),
    "tied": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="tied"),
    "per_step": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),
    "update": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="update"),
    "update_per_step": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step"),
    "weights": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="weights"),
    "weights_per_unit": dict(recurrent_dropout=0.4, recurrent_dropout_mode="weights_per_unit"),
    "input_shared": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="shared"),
    "input_per_gate": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_gate",
                           recurrent_dropout_mode="tied"),
    "input_per_step": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_step",
                           recurrent_dropout_mode="per_step"),
    "input_per_step_only": dict(dropout=0.3, input_dropout_mode="per_step"),
    "zoneout_h": dict(zoneout_h=0.3),
    "zoneout_c": dict(zoneout_c=0.4),
    "zoneout_hc_dropout": dict(dropout=0.2, recurrent_dropout=0.2, zoneout_h=0.3, zoneout_c=0.4),
    "zoneout_update": dict(recurrent_dropout=0.3, recurrent_dropout_mode="update", zoneout_h=0.25, zoneout_c=0.25),
    "zoneout_inference": dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.4),  # training=False
}


def _mode_applies(kind: str, mode_name: str) -> bool:
    if kind == "simple" and MODES[mode_name].get("recurrent_dropout_mode", "").startswith("update"):
        return False  # SimpleRNN rejects the update modes (the stacked case gives its SimpleRNNCell "tied")
    if kind not in ("lstm", "stacked", "lstm_proj") and mode_name == "zoneout_c":
        return False
    return True


MODE_CASES = [(k, m) for k in KINDS for m in MODES if _mode_applies(k, m)]


@needs_fused
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,mode_name", MODE_CASES)
def test_dropout_modes_fused_equals_reference(kind, mode_name, dtype, weight_grads):
    B, T, D, U = 3, 5, 3, 5
    seed = stable_seed(kind, mode_name)
    # every mode runs backwards for about half of the layer kinds (per-step masks follow processing order)
    go_backwards = (KINDS.index(kind) + list(MODES).index(mode_name)) % 2 == 1
    layer = make_layer(kind, D, U, dtype, mode=MODES[mode_name], seed=seed, return_sequences=True,
                       return_state=True, go_backwards=go_backwards)
    x = torch.randn(B, T, D, dtype=dtype)
    plans = draw_plans(layer, B, T, training=mode_name != "zoneout_inference")
    first = plans[0].cells[0]
    if mode_name == "zoneout_inference":
        assert all(z is None or z.dim() == 0 for m in plans[0].cells for z in (m.zoneout or ()))
        assert first.zoneout is not None
    else:
        # the plan holds the kind of mask the mode is about (so the comparison exercises it)
        expected = {"update": "update", "update_per_step": "update", "weights": "recurrent_kernel",
                    "weights_per_unit": "recurrent_kernel", "per_step": "recurrent", "tied": "recurrent",
                    "input_per_step": "input", "input_per_step_only": "input", "input_per_gate": "input",
                    "zoneout_h": "zoneout", "zoneout_c": "zoneout"}.get(mode_name)
        if expected:
            assert getattr(first, expected) is not None
        if mode_name in ("per_step", "input_per_step"):
            assert first.recurrent.dim() == 4 and first.recurrent.shape[0] == T
        if mode_name.startswith("input_per_step"):
            assert first.input.dim() == 4 and first.input.shape[0] == T
        assert plans[0].empty == (mode_name == "none")
    compare(layer, x, plans, initial_state=make_initial_state(layer, B, dtype, seed), mask=holey_mask(B, T, seed))


OPTIONS = {
    "plain": {},
    "go_backwards": dict(layer=dict(go_backwards=True)),
    "lengths": dict(lengths=True),  # includes a 0-length and a full-length row
    "lengths_go_backwards": dict(lengths=True, layer=dict(go_backwards=True)),
    "mask_holes": dict(mask=True),
    "mask_holes_go_backwards": dict(mask=True, layer=dict(go_backwards=True)),
    "initial_state": dict(initial_state=True),
    "initial_state_and_mask": dict(initial_state=True, mask=True),
    "zero_output_for_mask": dict(mask=True, layer=dict(zero_output_for_mask=True)),
    "last_output": dict(lengths=True, layer=dict(return_sequences=False)),
    "last_output_mask_zero_output": dict(mask=True, layer=dict(return_sequences=False, zero_output_for_mask=True)),
    "return_state": dict(layer=dict(return_state=True)),
    "only_final_states_in_loss": dict(initial_state=True, lengths=True, loss_on="states",
                                      layer=dict(return_sequences=False, return_state=True)),
    "stateful_two_calls": dict(calls=2, mask=True, layer=dict(stateful=True, return_state=True)),
    "frozen_recurrent_kernel": dict(freeze="recurrent_kernel"),
    "no_bias": dict(mask=True, mode=dict(use_bias=False)),
}


@needs_fused
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_options_fused_equals_reference(kind, option, dtype, weight_grads):
    B, T, D, U = 4, 6, 3, 5
    spec = OPTIONS[option]
    seed = stable_seed(kind, option)
    layer_kw = dict(return_sequences=True)
    layer_kw.update(spec.get("layer", {}))
    mode = dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.1, **spec.get("mode", {}))
    layer = make_layer(kind, D, U, dtype, mode=mode, seed=seed, **layer_kw)
    if "use_bias" in mode:
        assert all(cell.bias is None for cell in layer.cells)
    if spec.get("freeze"):
        for cell in layer.cells:
            getattr(cell, spec["freeze"]).requires_grad_(False)
    x = torch.randn(B, T, D, dtype=dtype)
    calls = spec.get("calls", 1)
    kwargs = dict(calls=calls)
    if spec.get("lengths"):
        kwargs["lengths"] = [T, 0, 2, T - 1]
    if spec.get("mask"):
        kwargs["mask"] = holey_mask(B, T, seed)
    if spec.get("loss_on") == "states":
        n_states = sum(len(s) for s in state_sizes(layer))
        kwargs["loss_on"] = list(range(1, 1 + n_states))
    init = make_initial_state(layer, B, dtype, seed) if spec.get("initial_state") else None
    # Stateful: both calls replay the same plan, so their outputs differ only through the carried states.
    plans = draw_plans(layer, B, T) * calls
    exact = compare(layer, x, plans, initial_state=init, **kwargs)
    if option == "stateful_two_calls":
        # The second call really started from the first call's final states (not from zeros).
        outputs = exact[0]
        n = len(outputs) // 2
        assert not torch.allclose(outputs[0], outputs[n])


ACTIVATIONS = [("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("hard_sigmoid", "tanh"), ("linear", "relu"),
               ("sigmoid", "linear")]


@needs_fused
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("acts", ACTIVATIONS, ids=["-".join(a) for a in ACTIVATIONS])
@pytest.mark.parametrize("kind", KINDS)
def test_activations_fused_equals_reference(kind, acts, dtype):
    B, T, D, U = 3, 5, 4, 5
    seed = stable_seed(kind, *acts)
    # Unbounded "gates" (linear / relu recurrent activations) grow the states geometrically with large
    # weights; smaller weights keep float32 well-conditioned enough for the comparison to mean something.
    layer = make_layer(kind, D, U, dtype, mode=dict(dropout=0.2, recurrent_dropout=0.2), acts=acts, seed=seed,
                       weight_scale=0.35, return_sequences=True, return_state=True)
    x = torch.randn(B, T, D, dtype=dtype)
    compare(layer, x, draw_plans(layer, B, T), lengths=[T, 3, 1])


def _random_case(k: int):
    rng = random.Random(k)
    B = [1, 1, 2, 3, 5, 7][k % 6]  # batch 1; smaller than / not divisible by the thread counts below
    T = [1, 2, 7][k % 3]
    D = rng.choice([1, 3, 6])
    U = rng.choice([1, 2, 5, 8]) if T > 1 else 5  # (U = T = 1 with zoneout can make everything zero: vacuous)
    kind = KINDS[k % len(KINDS)]
    mode_name = rng.choice([m for m in MODES if _mode_applies(kind, m) and m != "zoneout_inference"])
    threads = [1, 2, 3][k % 3]
    return B, T, D, U, kind, mode_name, threads, rng


@needs_fused
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", range(18))
def test_random_shapes_and_thread_counts(k, dtype, weight_grads):
    B, T, D, U, kind, mode_name, threads, rng = _random_case(k)
    layer = make_layer(kind, D, U, dtype, mode=MODES[mode_name], seed=k, return_sequences=rng.random() < 0.7,
                       return_state=True, go_backwards=rng.random() < 0.5,
                       zero_output_for_mask=rng.random() < 0.3)
    x = torch.randn(B, T, D, dtype=dtype)
    lengths = [rng.randint(0, T) for _ in range(B)]
    lengths[0] = T
    init = make_initial_state(layer, B, dtype, k) if rng.random() < 0.5 else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(layer, x, draw_plans(layer, B, T), initial_state=init, lengths=lengths if rng.random() < 0.6 else None)
    finally:
        torch.set_num_threads(previous)


@needs_fused
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_empty_batch(kind, dtype, weight_grads):
    """Float32 runs oneDNN's brgemm, which threw (aborting the process) on an empty batch."""
    layer = make_layer(kind, 3, 4, dtype, mode=dict(dropout=0.2, recurrent_dropout=0.2), return_sequences=True)
    for impl in ("reference", "fused"):
        x = torch.randn(0, 3, 3, dtype=dtype, requires_grad=True)
        layer.impl = impl
        y = layer(x)
        assert layer.last_kernel.name == impl
        assert y.shape == (0, 3, layer.output_size)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
        layer.zero_grad(set_to_none=True)


@needs_fused
@pytest.mark.parametrize("merge_mode", ["concat", None])
def test_bidirectional_seeded_training_fused_equals_reference(merge_mode):
    """No plan given: a seeded layer draws the same masks whichever kernel then runs them."""
    B, T, D, U = 3, 4, 3, 5
    bi = Bidirectional(LSTM(U, dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2, seed=11, return_sequences=True,
                            return_state=True), merge_mode=merge_mode)
    bi.build(D, dtype=F64)
    x = torch.randn(B, T, D, dtype=F64)
    results, plans = {}, {}
    for impl in ("reference", "fused"):
        layer = copy.deepcopy(bi)
        layer.forward_layer.impl = layer.backward_layer.impl = impl
        xi = x.clone().requires_grad_(True)
        with uninitialized_is_nan() if impl == "fused" else contextlib.nullcontext():
            out = flat(layer(xi, lengths=[4, 0, 2], training=True))
            loss = sum((o * w).sum() for o, w in zip(out, loss_weights(out)))
            grads = torch.autograd.grad(loss, [xi, *layer.parameters()])
        assert layer.forward_layer.last_kernel.name == layer.backward_layer.last_kernel.name == impl
        results[impl] = ([o.detach() for o in out], list(grads))
        plans[impl] = [sub.last_dropout_plan.cells[0] for sub in (layer.forward_layer, layer.backward_layer)]
    for a, b in zip(plans["reference"], plans["fused"]):
        assert torch.equal(a.recurrent, b.recurrent) and torch.equal(a.zoneout[0], b.zoneout[0])
    assert_f64_equal(results["fused"], results["reference"])


@needs_fused
@pytest.mark.parametrize("kind", KINDS)
def test_inference_under_no_grad_fused_equals_reference(kind):
    layer = make_layer(kind, 3, 5, F32, mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.2),
                       return_sequences=True).eval()
    x = torch.randn(4, 6, 3)
    out = {}
    for impl in ("reference", "fused"):
        layer.impl = impl
        with torch.inference_mode():
            out[impl] = layer(x, lengths=[6, 0, 3, 1])
        assert layer.last_kernel.name == impl
    torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-5, atol=1e-6)


INFERENCE_SHAPES = [  # (B, T, threads): batch 1 on 2 threads takes the LSTM's split of the units
    (4, 6, 2), (1, 5, 2), (3, 1, 1),
]


@needs_fused
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("outputs", ["sequences", "last", "last_zero_output"])
@pytest.mark.parametrize("kind,mode_name", MODE_CASES)
def test_inference_kernel_equals_reference(kind, mode_name, outputs, dtype, monkeypatch):
    """With no backward to follow the fused path runs its inference kernel (nothing kept for a backward;
    with return_sequences=False only the last step written): it equals the reference, masks as drawn in
    training (MC dropout runs so) or in inference, with lengths, on one and two threads."""
    monkeypatch.setattr(fused, "_layer", lambda *a, **k: pytest.fail("the training kernel ran without a backward"))
    training = mode_name != "zoneout_inference"
    for B, T, threads in INFERENCE_SHAPES:
        seed = stable_seed(kind, mode_name, outputs, B)
        layer = make_layer(kind, 3, 5, dtype, mode=MODES[mode_name], seed=seed, return_state=True,
                           return_sequences=outputs == "sequences", zero_output_for_mask=outputs == "last_zero_output")
        x = random_input(B, T, 3, dtype, seed)
        init = make_initial_state(layer, B, dtype, seed)
        plan = layer.draw_dropout_plan(B, steps=T, training=training)
        lengths = [T, 0, max(T - 2, 1), 1][:B]
        results = {}
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for impl in ("reference", "fused"):
                layer.impl = impl
                context = uninitialized_is_nan() if impl == "fused" else contextlib.nullcontext()
                with torch.no_grad(), context:
                    results[impl] = flat(layer(x, lengths=lengths, initial_state=init, dropout_plan=plan))
                assert layer.last_kernel.name == impl
        finally:
            torch.set_num_threads(previous)
        for got, want in zip(results["fused"], results["reference"], strict=True):
            assert not torch.isnan(got).any()
            tolerance = 1e-10 if dtype == F64 else 2e-6
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@needs_fused
def test_thread_count_does_not_change_results():
    """Results do not depend on how the batch is split over threads (bit-for-bit in float64 is not
    required; 1e-10 is)."""
    layer = make_layer("lstm", 3, 6, F64, mode=dict(dropout=0.2, recurrent_dropout=0.3), return_sequences=True)
    x = torch.randn(7, 5, 3, dtype=F64)
    plans = draw_plans(layer, 7, 5)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_impl(layer, "fused", x, plans, lengths=[5, 0, 3, 5, 1, 2, 4]))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert_f64_equal(other, results[0])


@needs_fused
@pytest.mark.parametrize("threads", [1, 2])
def test_a_gradient_fading_into_subnormals_equals_reference_and_the_callers_mode_is_kept(threads):
    """The kernels flush subnormals to zero while they run (x86: they cost ~100x an ordinary operation, and
    a gradient fading over hundreds of steps reaches them). The result differs from the reference's by
    less than the smallest normal float; the calling thread computes with subnormals again afterwards."""
    layer = make_layer("gru", 8, 16, F32, weight_scale=0.3, return_sequences=False)
    x = torch.randn(4, 300, 8, generator=torch.Generator().manual_seed(0))
    plans = draw_plans(layer, 4, 300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        grads = [run_impl(layer, impl, x, plans)[1][0] for impl in ("fused", "reference")]  # d x
        tiny = torch.tensor([1e-39]) * 2.0  # computed on this thread after the kernels ran on it
    finally:
        torch.set_num_threads(previous)
    assert grads[1][:, 0].abs().max() < 1e-30, "the gradient at the first step should have faded"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert tiny.item() == pytest.approx(2e-39, rel=1e-3), "the caller's thread must keep computing subnormals"


# ----------------------------------------------------------------------------------------------- plans from users
def _replace(plan: DropoutPlan, field: str, fn) -> DropoutPlan:
    """``plan`` with ``fn`` applied to every tensor of one CellMasks field."""
    def apply(value):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(None if z is None else fn(z) for z in value)
        return fn(value)

    return DropoutPlan(tuple(
        CellMasks(**{f: apply(getattr(m, f)) if f == field else getattr(m, f)
                     for f in ("input", "recurrent", "update", "recurrent_kernel", "zoneout")})
        for m in plan.cells
    ))


NONCONTIGUOUS_CASES = [
    pytest.param("lstm", "zoneout", dict(zoneout_h=0.3, zoneout_c=0.3)),
    pytest.param("gru", "zoneout", dict(zoneout_h=0.3)),
    pytest.param("simple", "zoneout", dict(zoneout_h=0.3)),
    pytest.param("lstm", "recurrent", dict(recurrent_dropout=0.3)),
    pytest.param("gru_reset_before", "recurrent", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step")),
    pytest.param("gru", "update", dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step")),
    pytest.param("lstm", "input", dict(dropout=0.3, recurrent_dropout=0.3)),
    pytest.param("simple", "recurrent_kernel", dict(recurrent_dropout=0.3, recurrent_dropout_mode="weights")),
]


@needs_fused
@pytest.mark.parametrize("kind,field,mode", NONCONTIGUOUS_CASES)
def test_noncontiguous_masks_in_given_plan(kind, field, mode):
    """A plan passed in by the user may hold expanded/strided tensors (check_plan accepts them, e.g. one
    decision per sample expanded over the units); the fused path must read them as the reference does."""
    B, T, D, U = 3, 4, 2, 5
    layer = make_layer(kind, D, U, F64, mode=mode, return_sequences=True)
    x = torch.randn(B, T, D, dtype=F64)
    plan = draw_plans(layer, B, T)[0]
    assert getattr(plan.cells[0], field) is not None
    plan = _replace(plan, field, lambda z: z[..., :1].expand(z.shape))
    assert not all(z.is_contiguous() for z in flat(getattr(plan.cells[0], field)))
    compare(layer, x, [plan])


@needs_fused
def test_plan_in_other_dtype():
    B, T, D, U = 3, 4, 2, 5
    layer = make_layer("lstm", D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2),
                       return_sequences=True)
    x = torch.randn(B, T, D, dtype=F64)
    plan32 = layer.draw_dropout_plan(B, steps=T, dtype=F32)
    compare(layer, x, [plan32])


# ----------------------------------------------------------------------------------------------- 2. every element
# Covered inside every comparison above: fused runs happen under uninitialized_is_nan() and the results are
# checked for NaN. torch.empty (probed in the context manager) and a C++ at::empty / at::empty_like both
# dispatch to aten::empty.memory_format's CPU kernel, where the NaN fill happens.


# ----------------------------------------------------------------------------------------------- 3. dispatch
@pytest.fixture
def spy_fused(monkeypatch):
    return spy_on(monkeypatch, fused)


@needs_fused
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_auto_picks_fused_for_supported_calls(kind, dtype, spy_fused):
    layer = make_layer(kind, 3, 4, dtype, mode=dict(dropout=0.2, recurrent_dropout=0.2, zoneout_h=0.1))
    assert layer.impl == "auto"
    layer(torch.randn(2, 3, 3, dtype=dtype), lengths=[3, 1])
    assert layer.last_kernel.name == "fused"
    assert layer.last_kernel.reason is None
    assert len(spy_fused) == 1
    text = droprnn.explain(layer)
    assert "fused" in text and layer.name in text


class MyLSTMCell(LSTMCell):
    pass


UNSUPPORTED = {
    "float16": (lambda: LSTM(4, dtype=torch.float16), torch.float16, "float16"),
    "elu": (lambda: GRU(4, activation="elu"), F32, "elu"),
    "elu_recurrent": (lambda: LSTM(4, recurrent_activation="elu"), F32, "elu"),
    "callable_activation": (lambda: SimpleRNN(4, activation=lambda t: 2 * t), F32, "activation"),
    "custom_cell": (lambda: RNN(MyLSTMCell(4)), F32, "MyLSTMCell"),
    "custom_cell_in_stack": (lambda: RNN([LSTMCell(4), MyLSTMCell(3)]), F32, "MyLSTMCell"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_auto_falls_back_with_the_reason(case, spy_fused):
    factory, dtype, cause = UNSUPPORTED[case]
    layer = factory()
    x = torch.randn(2, 3, 3, dtype=dtype)
    y = layer(x)
    assert layer.last_kernel.name == "reference"
    assert cause in layer.last_kernel.reason
    assert not spy_fused
    assert y.dtype == dtype
    text = droprnn.explain(layer)
    assert "reference" in text and cause in text
    # explain for an input, before/independently of a call, says the same
    assert cause in droprnn.explain(factory(), x)
    # insisting raises, naming the cause
    strict = factory()
    strict.impl = "fused"
    with pytest.raises(DroprnnError, match="impl='fused'") as info:
        strict(x)
    assert cause in str(info.value)
    assert not spy_fused


def test_impl_fused_constructor_argument_raises_for_unsupported_call():
    layer = LSTM(4, activation="elu", impl="fused")
    with pytest.raises(DroprnnError, match="elu"):
        layer(torch.randn(2, 3, 3))


def test_non_cpu_device_falls_back(spy_fused):
    layer = LSTM(4, input_size=3, device="meta")
    x = torch.randn(2, 3, 3, device="meta")
    assert "meta" in droprnn.explain(layer, x)
    layer(x)
    assert layer.last_kernel.name == "reference" and "meta" in layer.last_kernel.reason
    assert not spy_fused
    layer.impl = "fused"
    with pytest.raises(DroprnnError, match="meta"):
        layer(x)


@pytest.mark.parametrize("bad", ["bogus", "Fused", None, 1])
def test_impl_bogus_raises(bad):
    with pytest.raises(DroprnnError, match="impl"):
        LSTM(4, impl=bad)
    with pytest.raises(DroprnnError, match="impl"):
        RNN(GRUCell(3), impl=bad)


@needs_fused
def test_impl_reference_is_honoured(spy_fused):
    layer = GRU(4, impl="reference")
    layer(torch.randn(2, 3, 3))
    assert layer.last_kernel.name == "reference"
    assert "reference" in layer.last_kernel.reason
    assert not spy_fused
    assert "reference" in droprnn.explain(layer)


def test_explain_before_any_call():
    layer = LSTM(4)
    assert "not called" in droprnn.explain(layer)


@needs_fused
def test_explain_with_input_names_the_kernel():
    layer = LSTM(4)  # not built: explain builds it from x
    text = droprnn.explain(layer, torch.randn(2, 3, 5))
    assert "fused" in text
    assert layer.input_size == 5
    said = droprnn.explain(LSTM(4), torch.randn(2, 3, 5, dtype=torch.bfloat16))
    if fused._bf16_available():
        assert "products in bfloat16" in said
    else:  # an AMD EPYC with AVX512-BF16 but no AMX, for one
        assert "bfloat16 asked for, computed in float32" in said


@needs_fused
def test_bidirectional_explain_gives_two_lines():
    bi = Bidirectional(LSTM(4, return_sequences=True))
    bi(torch.randn(2, 3, 3))
    lines = droprnn.explain(bi).splitlines()
    assert len(lines) == 2
    assert all("fused" in line for line in lines)
    assert bi.forward_layer.name in lines[0] and bi.backward_layer.name in lines[1]
    fallback = Bidirectional(LSTM(4, activation="elu", return_sequences=True))
    fallback(torch.randn(2, 3, 3))
    lines = droprnn.explain(fallback).splitlines()
    assert len(lines) == 2 and all("elu" in line for line in lines)


def test_explain_rejects_other_modules():
    with pytest.raises(DroprnnError):
        droprnn.explain(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------- 4. autograd
@needs_fused
@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_gives_identical_grads(kind):
    layer = make_layer(kind, 3, 4, F64, mode=dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.2),
                       return_sequences=True)
    layer.impl = "fused"
    x = torch.randn(3, 4, 3, dtype=F64, requires_grad=True)
    y = layer(x, lengths=[4, 2, 0])
    assert layer.last_kernel.name == "fused"
    loss = (y * torch.randn_like(y)).sum()
    params = [x, *layer.parameters()]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[0].abs().max() > 0


def _tiny(kind, seed=0):
    layer = make_layer(kind, 2, 2, F64, mode=dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.3),
                       seed=seed, return_sequences=True, return_state=True)
    B, T = 2, 3
    plan = layer.draw_dropout_plan(B, steps=T)
    x = torch.randn(B, T, 2, dtype=F64)
    return layer, plan, x


def _functional(layer, plan, impl, lengths):
    """f(x, h0..., params...) -> flat outputs, running ``layer`` with ``impl`` and the fixed plan."""
    layer = copy.deepcopy(layer)
    layer.impl = impl
    names = [n for n, _ in layer.named_parameters()]
    sizes = state_sizes(layer)

    def f(x, *rest):
        n_states = sum(len(s) for s in sizes)
        states, params = rest[:n_states], rest[n_states:]
        it = iter(states)
        init = [[next(it) for _ in s] for s in sizes]
        init = init[0] if len(init) == 1 else init
        out = torch.func.functional_call(
            layer, dict(zip(names, params)), (x,),
            dict(initial_state=init, lengths=lengths, dropout_plan=plan),
        )
        assert layer.last_kernel.name == impl
        return tuple(flat(out))

    params = [p.detach().clone() for p in layer.parameters()]
    return f, params


@needs_fused
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_gradgradcheck_and_hvp(kind):
    layer, plan, x = _tiny(kind)
    lengths = [3, 1]
    init = [0.3 * torch.randn(2, s, dtype=F64) for sizes in state_sizes(layer) for s in sizes]
    f_fused, params = _functional(layer, plan, "fused", lengths)
    f_ref, _ = _functional(layer, plan, "reference", lengths)
    inputs = [t.clone().requires_grad_(True) for t in (x, *init, *params)]
    # first order: the hand-written backward, numerically
    assert torch.autograd.gradcheck(f_fused, inputs, eps=1e-6, atol=1e-7, fast_mode=kind == "stacked")
    # second order: differentiable gradients (create_graph) through the fused path. The stacked layer has
    # ~200 inputs; its check uses random projections (fast_mode) to stay quick.
    assert torch.autograd.gradgradcheck(f_fused, inputs, eps=1e-6, atol=1e-6, fast_mode=kind == "stacked")

    # Hessian-vector product of a scalar loss equals the reference's
    gen = torch.Generator().manual_seed(7)
    vs = [torch.randn(t.shape, generator=gen, dtype=F64) for t in inputs]

    def hvp(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs = f(*leaves)
        loss = sum((o * w).sum() for o, w in zip(outs, loss_weights(outs)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
        return torch.autograd.grad(dot, leaves, allow_unused=True)

    got, want = hvp(f_fused), hvp(f_ref)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert any(a is not None and a.abs().max() > 0 for a in got)


# ----------------------------------------------------------------------------------------------- 5. disabled
def test_disabled_by_environment_variable_in_subprocess():
    script = textwrap.dedent("""
        import torch, droprnn
        from droprnn.kernels import dispatch
        layer = droprnn.LSTM(4, dropout=0.2, recurrent_dropout=0.2, return_sequences=True)
        y = layer(torch.randn(2, 3, 3), training=True)
        y.sum().backward()
        assert y.shape == (2, 3, 4) and torch.isfinite(y).all()
        assert layer.cell.kernel.grad is not None
        print("KERNEL", layer.last_kernel.name)
        print("REASON", layer.last_kernel.reason)
        print("EXPLAIN", droprnn.explain(layer))
        strict = droprnn.GRU(3, impl="fused")
        try:
            strict(torch.randn(2, 3, 3))
        except droprnn.DroprnnError as error:
            print("RAISED", error)
    """)
    src = str(Path(droprnn.__file__).resolve().parents[1])
    env = dict(os.environ, DROPRNN_DISABLE_FUSED="1")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "KERNEL reference" in out
    reason_line = next(line for line in out.splitlines() if line.startswith("REASON"))
    explain_line = next(line for line in out.splitlines() if line.startswith("EXPLAIN"))
    raised_line = next(line for line in out.splitlines() if line.startswith("RAISED"))
    for line in (reason_line, explain_line, raised_line):
        assert "DROPRNN_DISABLE_FUSED" in line, line
    assert "reference" in explain_line


# ----------------------------------------------------------------------------------------------- 6. memory
# Peak memory of a training step is approximated by the activations autograd keeps for the backward: the
# bytes of the distinct storages packed by saved_tensors_hooks during the forward. This is exact and
# deterministic (no allocator or profiler timing involved), and it is the term that grows with B * T.
# It does not see backward temporaries or the C++ kernels' per-thread work buffers (O(B * U), not O(T)).
# (torch.profiler's [memory] events were tried: their order/sums were not usable for a peak on CPU.)
def _saved_tensor_bytes(layer, x, plan, lengths):
    """Bytes of the distinct storages autograd keeps for backward during one forward, parameters and the
    input excluded (both paths share them)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()  # the graph keeps t alive, so addresses are not reused meanwhile
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, lengths=lengths, dropout_plan=plan)
    shared = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    y.sum().backward()
    return sum(n for ptr, n in storages.items() if ptr not in shared)


MEMORY_CASES = [(kind, mode) for mode in ("none", "keras_both") for kind in KINDS]


@needs_fused
@pytest.mark.parametrize("kind,mode_name", MEMORY_CASES)
def test_fused_saves_no_more_for_backward_than_reference(kind, mode_name):
    B, T, D, U = 8, 20, 16, 24
    layer = make_layer(kind, D, U, F32, mode=MODES[mode_name], return_sequences=True)
    x = torch.randn(B, T, D, requires_grad=True)
    plan = layer.draw_dropout_plan(B, steps=T)
    lengths = [T, T - 3, 5, T, 1, T, 7, 0]
    sizes = {}
    for impl in ("reference", "fused"):
        layer.impl = impl
        sizes[impl] = _saved_tensor_bytes(layer, x, plan, lengths)
        assert layer.last_kernel.name == impl
    # at least the (B, T, U) output sequence is kept by both, so the measurement is not empty
    assert sizes["reference"] >= B * T * U * 4 and sizes["fused"] >= B * T * U * 4
    assert sizes["fused"] <= sizes["reference"], sizes


# ----------------------------------------------------------------------------------------------- block cache
# Sequence-sized tensors of 1 MiB and more (projections, gates, states, gradients, work buffers) come from
# a cache of blocks reused across calls (kernels/cpu/pool.cpp). The shapes above are mostly too small to
# reach it; these are not.
BIG = dict(B=24, T=40, D=48, U=144)  # float64 LSTM gates: 24·40·576·8 B = 4.4 MiB


@needs_fused
@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
def test_large_shapes_through_the_block_cache_equal_reference(kind, weight_grads):
    B, T, D, U = BIG.values()
    cpu.empty_cache()
    layer = make_layer(kind, D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), seed=7, weight_scale=0.05,
                       return_sequences=True, return_state=True)
    rng = random.Random(7)
    lengths = [rng.randint(1, T) for _ in range(B)]
    compare(layer, torch.randn(B, T, D, dtype=F64), draw_plans(layer, B, T), lengths=lengths)
    assert cpu.cached_bytes() >= 1 << 20, "the shapes were meant to go through the block cache"


@needs_fused
def test_reused_blocks_carry_no_stale_values_and_live_outputs_are_never_reused():
    # Two layers of the same sizes take turns, so each call runs in blocks the other one just wrote.
    B, T, D, U = BIG.values()
    layers = [make_layer("lstm", D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), seed=s,
                         weight_scale=0.2, return_sequences=True) for s in (1, 2)]
    x = torch.randn(B, T, D, dtype=F64)
    kept = []
    for turn in range(4):
        layer = layers[turn % 2]
        plan = layer.draw_dropout_plan(B, steps=T, training=True)
        reference = copy.deepcopy(layer)
        reference.impl = "reference"
        want = reference(x, dropout_plan=plan)
        layer.impl = "fused"
        got = layer(x, dropout_plan=plan)
        assert layer.last_kernel.name == "fused"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        kept.append((got, want.clone()))
    for got, want in kept:  # outputs still alive were never handed out again
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@needs_fused
def test_cache_counts_and_empties():
    cpu.empty_cache()
    assert cpu.cached_bytes() == 0
    block = torch.ops.droprnn_cpu.empty([1 << 18], F32)  # exactly 1 MiB
    address = block.data_ptr()
    del block
    assert cpu.cached_bytes() == 1 << 20
    again = torch.ops.droprnn_cpu.empty([1 << 18], F32)
    assert again.data_ptr() == address and cpu.cached_bytes() == 0
    small = torch.ops.droprnn_cpu.empty([1 << 16], F32)  # a quarter of the size: a fresh block, not this one
    del again
    other = torch.ops.droprnn_cpu.empty([1 << 16], F32)
    assert other.data_ptr() != address
    del small, other
    assert cpu.empty_cache() == 1 << 20 and cpu.cached_bytes() == 0


@needs_fused
@pytest.mark.parametrize("megabytes, most", [("0", 0), ("4", 4 << 20)])
def test_cache_limit_from_environment_in_subprocess(megabytes, most):
    script = textwrap.dedent("""
        import torch, droprnn
        from droprnn.kernels import cpu
        layer = droprnn.LSTM(144, dropout=0.3, recurrent_dropout=0.3, return_sequences=True, impl="fused")
        for _ in range(2):
            layer(torch.randn(24, 40, 48), training=True).sum().backward()
        assert layer.last_kernel.name == "fused"
        print("CACHED", cpu.cached_bytes())
    """)
    env = dict(os.environ, DROPRNN_CPU_CACHE_MB=megabytes)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cached = int(result.stdout.split("CACHED")[1])
    assert cached <= most
    if most:
        assert cached > 0


# ----------------------------------------------------------------------------------------------- weight gradients
@needs_fused
@pytest.mark.parametrize("kind", ["lstm", "simple", "gru", "gru_reset_before"])
def test_weight_gradients_after_the_loop_only_where_they_outgrow_the_cache(kind, monkeypatch):
    """Small layers accumulate the weight gradients in the C++ loop; past fused._DEFER_BYTES (and
    _DEFER_BYTES_PER_ROW per sequence) they are formed after it."""
    calls = []
    real = fused._grads_after_loop
    monkeypatch.setattr(fused, "_grads_after_loop", lambda *a: calls.append(1) or real(*a))
    layer = make_layer(kind, 3, 5, F32, mode=dict(dropout=0.3, recurrent_dropout=0.3), return_sequences=True)
    x = torch.randn(2, 4, 3, requires_grad=True)
    layer(x).sum().backward()
    assert calls == []
    monkeypatch.setattr(fused, "_DEFER_BYTES", 0)
    monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0)
    layer(x).sum().backward()
    assert len(calls) == 1
    monkeypatch.setattr(fused, "_DEFER_BYTES", 1 << 20)
    monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 48 << 10)
    gates = layer.cells[0].gates
    R = torch.zeros(650, gates * 650)
    assert fused._defers_weight_grads(torch.zeros(20, 1, 650), R)  # 650 units: 3.3-13 MiB
    assert not fused._defers_weight_grads(torch.zeros(2000, 1, 650), R)  # a step's update is 2000 rows thick
    assert not fused._defers_weight_grads(torch.zeros(1, 1, 32), torch.zeros(32, gates * 32))
    # with bfloat16 products only the cache decides: a thick batch defers too, a small layer does not
    assert fused._defers_weight_grads(torch.zeros(2000, 1, 650), R, bf16=True)
    assert not fused._defers_weight_grads(torch.zeros(2000, 1, 32), torch.zeros(32, gates * 32), bf16=True)


def test_every_registered_mode_is_compared_here():
    """A mode added to the registry (droprnn.dropout.modes) fails here until a case above compares it."""
    from droprnn.dropout import modes as registry

    recurrent = {m.get("recurrent_dropout_mode", "keras") for m in MODES.values() if m.get("recurrent_dropout")}
    inputs = {m.get("input_dropout_mode", "keras") for m in MODES.values() if m.get("dropout")}
    assert recurrent == set(registry.RECURRENT) and inputs == set(registry.INPUT)
