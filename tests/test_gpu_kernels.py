"""The Triton GPU kernels (LSTM, GRU in both reset_after forms, SimpleRNN) against the reference loop, run on
the CPU by Triton's interpreter (TRITON_INTERPRET=1), plus the dispatch rules around them.

The oracle is ``impl="reference"``: every comparison runs the same layer weights on the same input with the
SAME dropout plan (drawn once, passed as ``dropout_plan=``) through ``impl="gpu"`` and ``impl="reference"``
and compares the returned outputs and states and the gradients of a fixed random loss with respect to the
input, the initial states and every parameter. Section 4 covers the CUDA graphs of the time loops: their
bookkeeping and the replayed path on the CPU, the real capture on a CUDA machine (skipped without one).
Section 5 covers the GRU and float16 / bfloat16.

Tolerances (as tests/test_fused.py)
- float64: gpu == reference within 1e-10 (abs and rel); the kernels compute float64 in float64.
- float32, float16, bfloat16: both runs in that dtype are judged against a float64 reference run of the same
  (rounded) weights, input, states and masks. Per tensor, with ``scale = max|r64|``, ``err_ref = max|r - r64|``
  (the reference loop's own error in that dtype), ``err_gpu = max|g - r64|``:
  ``err_gpu <= max(rtol * scale, 2 * err_ref)``, rtol 1e-5 for float32, 5e-3 for float16 and 2e-2 for
  bfloat16 (8 significant bits: its rounding unit is 3.9e-3). Triton's interpreter rounds float32 to bfloat16
  toward zero where the GPU rounds to nearest even, a bias the steps accumulate: there bfloat16 gets
  ``max(3e-2 * scale, 3 * err_ref)``; the CUDA tests hold it to the GPU bound.
Every gpu run happens with ``torch.utils.deterministic.fill_uninitialized_memory``, so ``torch.empty`` hands
out NaN: an element a kernel forgot to write shows up as NaN, and the results are checked for NaN.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is defined, so the variable is set here, at
collection, before droprnn's kernels module is first imported (droprnn itself may already be imported: the
kernels load on first use). If that module was somehow imported earlier in this process without the
variable, the in-process tests skip and ``test_whole_file_in_a_fresh_interpreter`` runs this file again in a
subprocess instead. Shapes stay tiny: the interpreter runs every program of every launch in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles droprnn's kernels (see the module docstring)

import contextlib  # noqa: E402
import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import droprnn  # noqa: E402
from droprnn import (  # noqa: E402
    GRU, LSTM, RNN, CellMasks, DropoutPlan, DroprnnError, GRUCell, LSTMCell, SimpleRNN, SimpleRNNCell,
)
from droprnn.kernels import dispatch, fused, gpu  # noqa: E402
from kernel_oracle import (  # noqa: E402
    assert_f64_equal, built_with_random_weights, call_for, cast_plan, draw_plans, flat, holey_mask, loss_weights,
    make_initial_state, rebuild, run, spy_on, uninitialized_is_nan,
)

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
IN_PROCESS = gpu.interpreting()
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="droprnn's Triton kernels were compiled for the GPU before this module set "
    "TRITON_INTERPRET=1; test_whole_file_in_a_fresh_interpreter runs these tests instead",
)
_SRC = str(Path(droprnn.__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------------- helpers
def make_cell(kind: str, units: int, **options):
    """An LSTMCell ("lstm"), a GRUCell ("gru": reset_after, "gru-rb": reset_before) or a SimpleRNNCell
    ("simple", which has no recurrent_activation)."""
    if kind == "simple":
        options.pop("recurrent_activation", None)
        return SimpleRNNCell(units, **options)
    return LSTMCell(units, **options) if kind == "lstm" else GRUCell(units, reset_after=kind == "gru", **options)


def make_layer(D: int, U: int, dtype, *, mode=None, acts=("tanh", "sigmoid"), stacked=False, seed=0,
               weight_scale=0.6, cell="lstm", **layer_kw):
    """A built LSTM or GRU layer (``cell``: see make_cell) -- or two stacked cells of different widths, of the
    kinds in ``stacked`` (True: two of ``cell``) -- with random N(0, weight_scale²) weights."""
    mode = dict(mode or {})
    act, rec_act = acts
    if stacked:
        kinds = (cell, cell) if stacked is True else stacked
        cells = [make_cell(kind, width, activation=act, recurrent_activation=rec_act, **mode)
                 for kind, width in zip(kinds, (U, U - 2))]
        layer = RNN(cells, **layer_kw)
    elif cell == "lstm":
        layer = LSTM(U, activation=act, recurrent_activation=rec_act, **mode, **layer_kw)
    elif cell == "simple":
        layer = SimpleRNN(U, activation=act, **mode, **layer_kw)
    else:
        layer = GRU(U, activation=act, recurrent_activation=rec_act, reset_after=cell == "gru", **mode, **layer_kw)
    return built_with_random_weights(layer, D, dtype, seed, weight_scale)


def random_input(B: int, T: int, D: int, dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5000 + seed)
    return torch.randn(B, T, D, generator=gen, dtype=F64).to(dtype)


def run_impl(layer, impl, *args, **kwargs):
    """Run a deep copy of ``layer`` with ``impl``; check it really took that kernel."""
    layer = copy.deepcopy(layer)
    layer.impl = impl
    with uninitialized_is_nan() if impl == "gpu" else contextlib.nullcontext():
        result = run(layer, *args, **kwargs)
    assert layer.last_kernel is not None and layer.last_kernel.name == impl, layer.last_kernel
    return result


# (rtol, times the reference loop's own error) per dtype: see the module docstring.
TOLERANCE = {F32: (1e-5, 2), F16: (5e-3, 2), BF16: (3e-2, 3) if IN_PROCESS else (2e-2, 2)}


def assert_close_to_exact(got, ref, exact, dtype):
    """gpu and reference runs in ``dtype`` against the float64 run: see the module docstring."""
    rtol, factor = TOLERANCE[dtype]
    got, ref, exact = got[0] + got[1], ref[0] + ref[1], exact[0] + exact[1]
    assert len(got) == len(ref) == len(exact)
    for k, (g, r, e) in enumerate(zip(got, ref, exact)):
        assert g.dtype == dtype and g.shape == e.shape, (k, g.dtype, g.shape, e.shape)
        assert not torch.isnan(g).any(), f"tensor #{k}: NaN in the gpu result (an element never written)"
        if not e.numel():
            continue
        scale = e.abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        err_gpu = (g.double() - e).abs().max().item()
        bound = max(rtol * scale, factor * err_ref, torch.finfo(F32).tiny)
        assert err_gpu <= bound, f"tensor #{k}: gpu {dtype} error {err_gpu:.3g} > {bound:.3g} (scale {scale:.3g})"


def compare(layer, x, plans, *, initial_state=None, **kwargs):
    """gpu == reference (see the module docstring); returns the float64 reference result."""
    ref = run_impl(layer, "reference", x, plans, initial_state=initial_state, **kwargs)
    got = run_impl(layer, "gpu", x, plans, initial_state=initial_state, **kwargs)
    if x.dtype == F64:
        assert_f64_equal(got, ref)
        exact = ref
    else:
        init64 = None if initial_state is None else rebuild(initial_state, [t.double() for t in flat(initial_state)])
        exact = run_impl(copy.deepcopy(layer).double(), "reference", x.double(), [cast_plan(p, F64) for p in plans],
                         initial_state=init64, **kwargs)
        assert_close_to_exact(got, ref, exact, x.dtype)
    # Non-vacuity: some output and the input gradient are nonzero.
    outputs, grads = exact
    assert any(o.abs().max() > 0 for o in outputs if o.numel())
    assert grads[0].abs().max() > 0
    return exact


# ----------------------------------------------------------------------------------------------- 1. equality
MODES = {
    "none": {},
    "keras_both": dict(dropout=0.3, recurrent_dropout=0.3),  # per-gate input and recurrent masks
    "keras_input_only": dict(dropout=0.3),  # one shared input mask
    "keras_recurrent_only": dict(recurrent_dropout=0.3),
    "tied": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="tied"),  # shared recurrent mask
    "input_shared": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="shared"),
    "input_per_gate_tied": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_gate",
                                recurrent_dropout_mode="tied"),
    "input_per_step": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_step"),
    "weights": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="weights"),  # DropConnect
    "weights_per_unit": dict(recurrent_dropout=0.4, recurrent_dropout_mode="weights_per_unit"),
    "per_step": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),  # (T, 4, B, U)
    "update": dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="update"),  # Semeniuta et al.
    "update_per_step": dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step"),
    "zoneout": dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.4),  # with Keras's masks
    "zoneout_c_only": dict(zoneout_c=0.5),
}
# Which mask each mode is about, and its first dimension (m, or T for per-step masks).
EXPECTED_MASK = {
    "keras_both": ("recurrent", 4), "keras_input_only": ("input", 1), "keras_recurrent_only": ("recurrent", 4),
    "tied": ("recurrent", 1), "input_shared": ("input", 1), "input_per_gate_tied": ("input", 4),
    "input_per_step": ("input", "T"), "weights": ("recurrent_kernel", None),
    "weights_per_unit": ("recurrent_kernel", None), "per_step": ("recurrent", "T"), "update": ("update", 3),
    "update_per_step": ("update", "T"), "zoneout": ("zoneout", None), "zoneout_c_only": ("zoneout", None),
}


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode_name", list(MODES))
def test_dropout_modes_gpu_equals_reference(mode_name, dtype):
    B, T, D, U = 3, 4, 3, 5
    seed = list(MODES).index(mode_name)
    layer = make_layer(D, U, dtype, mode=MODES[mode_name], seed=seed, return_sequences=True, return_state=True,
                       go_backwards=seed % 2 == 1)
    x = torch.randn(B, T, D, dtype=dtype)
    plans = draw_plans(layer, B, T)
    if mode_name in EXPECTED_MASK:  # the plan holds the kind of mask the mode is about
        field, first = EXPECTED_MASK[mode_name]
        mask = getattr(plans[0].cells[0], field)
        assert mask is not None
        if first is not None:
            assert mask.shape[0] == (T if first == "T" else first)
    else:
        assert plans[0].empty
    compare(layer, x, plans, initial_state=make_initial_state(layer, B, dtype, seed), mask=holey_mask(B, T, seed))


OPTIONS = {
    "one_step_one_sequence": dict(shape=(1, 1)),
    "one_step": dict(shape=(3, 1), initial_state=True),
    "one_sequence": dict(shape=(1, 4), initial_state=True),
    "lengths": dict(lengths=[4, 0, 2]),
    "lengths_go_backwards": dict(lengths=[4, 0, 2], layer=dict(go_backwards=True)),
    "mask_holes_initial_state": dict(mask=True, initial_state=True),
    "zero_output_for_mask": dict(mask=True, layer=dict(zero_output_for_mask=True)),
    "last_output": dict(lengths=[4, 1, 3], layer=dict(return_sequences=False)),
    "only_final_states_in_loss": dict(initial_state=True, lengths=[4, 0, 3], loss_on=[1, 2],
                                      layer=dict(return_sequences=False, return_state=True)),
    "stateful_two_calls": dict(calls=2, mask=True, layer=dict(stateful=True, return_state=True)),
    "frozen_recurrent_kernel": dict(freeze="recurrent_kernel"),
    "frozen_kernel_and_bias": dict(freeze=("kernel", "bias"), mask=True),
    "no_bias": dict(mask=True, mode=dict(use_bias=False)),
}


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_gpu_equals_reference(option, dtype):
    spec = OPTIONS[option]
    B, T = spec.get("shape", (3, 4))
    D, U = 3, 5
    seed = list(OPTIONS).index(option)
    layer_kw = {"return_sequences": True, **spec.get("layer", {})}
    mode = dict(dropout=0.2, recurrent_dropout=0.3, **spec.get("mode", {}))
    layer = make_layer(D, U, dtype, mode=mode, seed=seed, **layer_kw)
    if "use_bias" in mode:
        assert layer.cell.bias is None
    for name in [spec["freeze"]] if isinstance(spec.get("freeze"), str) else spec.get("freeze", ()):
        getattr(layer.cell, name).requires_grad_(False)
    x = torch.randn(B, T, D, dtype=dtype)
    calls = spec.get("calls", 1)
    kwargs = dict(calls=calls, loss_on=spec.get("loss_on"))
    if "lengths" in spec:
        kwargs["lengths"] = spec["lengths"]
    if spec.get("mask"):
        kwargs["mask"] = holey_mask(B, T, seed)
    init = make_initial_state(layer, B, dtype, seed) if spec.get("initial_state") else None
    exact = compare(layer, x, draw_plans(layer, B, T) * calls, initial_state=init, **kwargs)
    if option == "stateful_two_calls":  # the second call started from the first call's final states
        n = len(exact[0]) // 2
        assert not torch.allclose(exact[0][0], exact[0][n])


# (activation, recurrent_activation, weight scale). Unbounded gates (linear / relu) grow the states
# geometrically with large weights: small weights for them. The large weights of "tanh-hard_sigmoid" push
# many gate inputs outside hard_sigmoid's linear band [-3, 3], where its gradient is exactly zero.
ACTIVATIONS = [("relu", "hard_sigmoid", 0.35), ("hard_sigmoid", "tanh", 0.35), ("linear", "relu", 0.35),
               ("sigmoid", "linear", 0.35), ("tanh", "hard_sigmoid", 2.5)]


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("acts", ACTIVATIONS, ids=["-".join(map(str, a)) for a in ACTIVATIONS])
def test_activations_gpu_equals_reference(acts, dtype):
    B, T, D, U = 3, 4, 3, 5
    act, rec_act, scale = acts
    seed = ACTIVATIONS.index(acts)
    layer = make_layer(D, U, dtype, mode=dict(dropout=0.2, recurrent_dropout=0.2), acts=(act, rec_act), seed=seed,
                       weight_scale=scale, return_sequences=True, return_state=True)
    x = torch.randn(B, T, D, dtype=dtype)
    if scale > 1:  # the saturated band really is reached
        z = x @ layer.cell.kernel.detach() + layer.cell.bias.detach()
        assert ((z < -3) | (z > 3)).float().mean() > 0.2
    compare(layer, x, draw_plans(layer, B, T), initial_state=make_initial_state(layer, B, dtype, seed),
            mask=holey_mask(B, T, seed))


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["forwards", "backwards"])
def test_stacked_cells_gpu_equals_reference(go_backwards, dtype):
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, dtype, mode=dict(dropout=0.3, recurrent_dropout=0.3), stacked=True, seed=7,
                       return_sequences=True, return_state=True, go_backwards=go_backwards)
    x = torch.randn(B, T, D, dtype=dtype)
    compare(layer, x, draw_plans(layer, B, T), initial_state=make_initial_state(layer, B, dtype, 7),
            mask=holey_mask(B, T, 7))


@in_process
def test_plan_with_expanded_masks_in_another_dtype():
    """A plan passed in by the user may hold broadcast views, in another dtype: read as the reference does."""
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), return_sequences=True)
    plan = layer.draw_dropout_plan(B, steps=T, dtype=F32).cells[0]
    plan = DropoutPlan((CellMasks(input=plan.input[..., :1].expand(plan.input.shape),
                                  recurrent=plan.recurrent[:, :1].expand(plan.recurrent.shape)),))
    assert not plan.cells[0].input.is_contiguous() and plan.cells[0].input.dtype == F32
    compare(layer, torch.randn(B, T, D, dtype=F64), [plan])


@in_process
@pytest.mark.parametrize("module_class", ["LSTM", "GRU", "LSTM-proj"])
def test_torch_front_gpu_equals_reference(module_class):
    """droprnn.nn keeps torch's weight layout (transposed views in Keras layout): two layers, both directions
    (and torch's proj_size)."""
    torch.manual_seed(5)
    options = dict(proj_size=2) if module_class == "LSTM-proj" else {}
    module = getattr(droprnn.nn, module_class.split("-")[0])(
        3, 5, num_layers=2, bidirectional=True, batch_first=True, input_dropout=0.3, recurrent_dropout=0.3, seed=11,
        **options).double()
    x = torch.randn(3, 4, 3, dtype=F64)
    results = {}
    for impl in ("reference", "gpu"):
        m = copy.deepcopy(module)
        m.impl = impl
        xx = x.clone().requires_grad_(True)
        with uninitialized_is_nan() if impl == "gpu" else contextlib.nullcontext():
            tensors = flat(m(xx))
            loss = sum((t * w).sum() for t, w in zip(tensors, loss_weights(tensors)))
            grads = torch.autograd.grad(loss, [xx, *m.parameters()])
        assert m.last_kernel.name == impl
        results[impl] = [t.detach() for t in tensors] + list(grads)
    for a, b in zip(results["gpu"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- 2. autograd
@in_process
def test_retain_graph_backward_twice_gives_the_same_gradients():
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), impl="gpu", return_sequences=True)
    x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    y = layer(x, lengths=[4, 2, 3], training=True)
    loss = (y * loss_weights([y])[0]).sum()
    first = torch.autograd.grad(loss, [x, *layer.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *layer.parameters()])
    assert layer.last_kernel.name == "gpu"
    for a, b in zip(first, second):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)


DOUBLE_BACKWARD = {
    "lstm": ("lstm", dict(dropout=0.3, recurrent_dropout=0.3)),
    "gru": ("gru", dict(dropout=0.3, recurrent_dropout=0.3)),
    "gru-rb": ("gru-rb", dict(dropout=0.3, recurrent_dropout=0.3)),
    "lstm-per_step-zoneout": ("lstm", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.3,
                                           zoneout_c=0.2)),
    "gru-rb-update_per_step-zoneout": ("gru-rb", dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.3,
                                                      recurrent_dropout_mode="update_per_step")),
    # the same with counter-based masks (section 6)
    "lstm-per_step-zoneout-counter": ("lstm", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                                   zoneout_h=0.3, zoneout_c=0.2)),
    "gru-update_per_step-zoneout-counter": ("gru", dict(recurrent_dropout=0.3, zoneout_h=0.3,
                                                        recurrent_dropout_mode="update_per_step")),
    "simple": ("simple", dict(dropout=0.3, recurrent_dropout=0.3)),
    "lstm-zoneout-inference": ("lstm", dict(dropout=0.3, zoneout_h=0.3, zoneout_c=0.2)),  # the rates themselves
    "lstm-proj-zoneout-counter": ("lstm", dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                               zoneout_h=0.3, proj_size=2)),
    "simple-per_step-zoneout-counter": ("simple", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                                       zoneout_h=0.3)),
}


@in_process
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD))
def test_double_backward_equals_reference(case, request):
    """create_graph=True differentiates the plain-ops recurrence: Hessian-vector products as the reference."""
    B, T, D, U = 2, 3, 3, 4
    cell, mode = DOUBLE_BACKWARD[case]
    if case.endswith("counter"):
        request.getfixturevalue("counter_cpu")
    layer = make_layer(D, U, F64, mode=mode, cell=cell, return_sequences=True)
    x = torch.randn(B, T, D, dtype=F64)
    plan = layer.draw_dropout_plan(B, steps=T, training=not case.endswith("inference"))
    assert plan.cells[0].counter_based == case.endswith("counter")
    results = {}
    for impl in ("reference", "gpu"):
        m = copy.deepcopy(layer)
        m.impl = impl
        xx = x.clone().requires_grad_(True)
        leaves = [xx, *m.parameters()]
        y = m(xx, lengths=[3, 2], dropout_plan=plan)
        grads = torch.autograd.grad((y * loss_weights([y])[0]).sum(), leaves, create_graph=True)
        vs = loss_weights(grads)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        results[impl] = torch.autograd.grad(dot, leaves)
        assert m.last_kernel.name == impl
    for a, b in zip(results["gpu"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert any(a.abs().max() > 0 for a in results["gpu"])


@in_process
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_inference_without_autograd_equals_reference(no_grad):
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), return_sequences=True,
                       return_state=True)
    x = torch.randn(B, T, D, dtype=F64)
    outputs = {}
    for impl in ("reference", "gpu"):
        m = copy.deepcopy(layer).eval()
        m.impl = impl
        with no_grad(), uninitialized_is_nan() if impl == "gpu" else contextlib.nullcontext():
            outputs[impl] = m(x, lengths=[4, 1, 0])
        assert m.last_kernel.name == impl
    for a, b in zip(outputs["gpu"], outputs["reference"]):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- 3. dispatch
@pytest.fixture
def spy_gpu(monkeypatch):
    return spy_on(monkeypatch, gpu)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Make auto treat CPU tensors as it treats CUDA ones (the interpreter then runs the kernels)."""
    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)


@in_process
def test_auto_picks_gpu_for_cuda_tensors(pretend_cuda, spy_gpu):
    layer = make_layer(3, 4, F32, mode=dict(dropout=0.2, recurrent_dropout=0.2), stacked=True)
    assert layer.impl == "auto"
    layer(torch.randn(2, 3, 3), lengths=[3, 1])
    assert layer.last_kernel.name == "gpu" and layer.last_kernel.reason is None
    assert len(spy_gpu) == 1
    text = droprnn.explain(layer)
    assert "Triton GPU kernel" in text and "interpreted" in text


def test_auto_on_cpu_keeps_its_cpu_choice(spy_gpu):
    """TRITON_INTERPRET=1 does not make auto run the Triton kernels on CPU tensors."""
    layer = make_layer(3, 4, F32, mode=dict(dropout=0.2, recurrent_dropout=0.2))
    x = torch.randn(2, 3, 3)
    layer(x)
    expected = "fused" if fused.unsupported_reason(call_for(layer, x)) is None else "reference"
    assert layer.last_kernel.name == expected
    assert not spy_gpu
    assert "Triton" not in droprnn.explain(layer, x)


class MyLSTMCell(LSTMCell):
    pass


UNSUPPORTED = {
    "custom_cell": (lambda: RNN(MyLSTMCell(4)), F32, "MyLSTMCell"),
    "simple_rnn_elu": (lambda: SimpleRNN(4, activation="elu"), F32, "elu"),
    "elu": (lambda: LSTM(4, activation="elu"), F32, "elu"),
    "gru_after_custom_cell": (lambda: RNN([GRUCell(4), MyLSTMCell(3)]), F32, "MyLSTMCell"),
}


@in_process
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_calls_fall_back_with_the_reason(case, pretend_cuda, spy_gpu):
    factory, dtype, cause = UNSUPPORTED[case]
    x = torch.randn(2, 3, 3, dtype=dtype)
    layer = factory()
    layer(x, training=True)
    assert layer.last_kernel.name == "reference"
    assert cause in layer.last_kernel.reason and "Triton" in layer.last_kernel.reason
    assert not spy_gpu
    assert cause in droprnn.explain(layer) and cause in droprnn.explain(factory(), x)
    # insisting raises, naming the cause
    strict = factory()
    strict.impl = "gpu"
    with pytest.raises(DroprnnError, match="impl='gpu'") as info:
        strict(x, training=True)
    assert cause in str(info.value)
    assert not spy_gpu


@in_process
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru-rb", "simple"])
def test_every_mode_a_cell_draws_runs_on_the_gpu(cell, pretend_cuda, spy_gpu):
    """No dropout mode sends an LSTM, GRU or SimpleRNN back to the reference loop, in training or inference."""
    rec_modes = ("keras", "tied", "per_step", "weights", "weights_per_unit")
    if cell != "simple":  # SimpleRNN has no cell update to mask
        rec_modes += ("update", "update_per_step")
    modes = [dict(recurrent_dropout=0.3, recurrent_dropout_mode=mode) for mode in rec_modes]
    modes += [dict(dropout=0.3, input_dropout_mode="per_step"), dict(zoneout_h=0.2)]
    if cell == "lstm":
        modes.append(dict(zoneout_c=0.2))
    for mode in modes:
        layer = make_layer(3, 4, F32, mode=mode, cell=cell)
        for training in (True, False):
            layer(torch.randn(2, 3, 3), training=training)
            assert layer.last_kernel.name == "gpu", (mode, training, layer.last_kernel)
    assert len(spy_gpu) == 2 * len(modes)


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru-rb"])
def test_hand_made_shared_per_step_recurrent_masks(cell, dtype):
    """A plan of one recurrent mask per step shared by the gates, (T, 1, B, U): no mode draws it, a user may."""
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, dtype, mode=dict(recurrent_dropout=0.3), cell=cell, seed=31, return_sequences=True,
                       return_state=True, go_backwards=cell == "gru")
    gen = torch.Generator().manual_seed(31)
    rec = (torch.rand(T, 1, B, U, generator=gen) > 0.4).to(dtype) / 0.6
    plans = [DropoutPlan((CellMasks(recurrent=rec),))]
    compare(layer, random_input(B, T, D, dtype, 31), plans, initial_state=make_initial_state(layer, B, dtype, 31),
            mask=holey_mask(B, T, 31))


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru-rb"])
def test_inference_zoneout_uses_its_expectation(cell, dtype):
    """In inference zoneout mixes old and new states by the rate itself (a constexpr of the kernels)."""
    B, T, D, U = 3, 4, 3, 5
    mode = dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3, **(dict(zoneout_c=0.6) if cell == "lstm" else {}))
    layer = make_layer(D, U, dtype, mode=mode, cell=cell, seed=32, return_sequences=True, return_state=True)
    plans = draw_plans(layer, B, T, training=False)
    assert all(z.dim() == 0 for z in plans[0].cells[0].zoneout)
    compare(layer, random_input(B, T, D, dtype, 32), plans, initial_state=make_initial_state(layer, B, dtype, 32),
            mask=holey_mask(B, T, 32))


def test_dtypes_the_kernels_do_not_run_are_named():
    layer = GRU(4, input_size=3)
    x = torch.randn(2, 3, 3)
    assert gpu.unsupported_reason(call_for(layer, x.to(torch.float8_e4m3fn))) is not None
    assert "float8_e4m3fn" in gpu.unsupported_reason(call_for(layer, x.to(torch.float8_e4m3fn)))


def test_without_triton_the_reason_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gpu, "interpreting", lambda: True)  # CPU tensors pass the device check
    monkeypatch.setattr(gpu, "_triton_reason", {})
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    reason = gpu.unavailable_reason()
    assert reason is not None and "pip install triton" in reason
    layer = LSTM(4, input_size=3)
    assert gpu.unsupported_reason(call_for(layer, torch.randn(2, 3, 3))) == reason


def test_interpreter_switched_on_too_late_is_explained(monkeypatch):
    monkeypatch.setattr(gpu, "interpreting", lambda: False)
    layer = LSTM(4, input_size=3)
    reason = gpu.unsupported_reason(call_for(layer, torch.randn(2, 3, 3)))
    assert "TRITON_INTERPRET=1 was set after" in reason


def test_impl_gpu_is_a_known_impl():
    assert "gpu" in dispatch.IMPLS
    assert LSTM(4, impl="gpu").impl == "gpu"
    with pytest.raises(DroprnnError, match="'gpu'"):
        LSTM(4, impl="triton")


def _run_script(script: str, env_updates: dict, unset=("TRITON_INTERPRET",), timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_updates)
    env["PYTHONPATH"] = _SRC + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_cpu_without_the_interpreter_in_a_fresh_process():
    """Without TRITON_INTERPRET: `import droprnn` loads no Triton, impl='gpu' on CPU raises a clear error,
    auto keeps its CPU choice; setting the variable later (Triton already imported) makes the kernels run,
    forward and backward."""
    out = _run_script("""
        import os, sys, torch, droprnn
        print("TRITON_LOADED", "triton" in sys.modules)
        x = torch.randn(2, 3, 3)
        auto = droprnn.LSTM(4)
        auto(x)
        print("AUTO", auto.last_kernel.name)
        strict = droprnn.LSTM(4, impl="gpu")
        try:
            strict(x)
        except droprnn.DroprnnError as error:
            print("RAISED", error)
        import triton  # imported before the variable is set, as another test file might
        os.environ["TRITON_INTERPRET"] = "1"
        x.requires_grad_(True)
        y = strict(x)
        y.sum().backward()  # the backward kernels call more helpers (Triton's own @jit ones would fail here)
        print("LATE", strict.last_kernel.name, tuple(y.shape), bool(torch.isfinite(y).all()),
              bool(torch.isfinite(x.grad).all() and x.grad.abs().max() > 0))
    """, {})
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["TRITON_LOADED"] == "False"
    assert lines["AUTO"] in ("fused", "reference")
    assert "impl='gpu' cannot run this call" in lines["RAISED"] and "CUDA" in lines["RAISED"]
    assert lines["LATE"] == "gpu (2, 4) True True"


@pytest.mark.skipif(IN_PROCESS, reason="the in-process tests ran")
def test_whole_file_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


OPERATOR_CASES = {
    "lstm": dict(cell="lstm", mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2, zoneout_c=0.1)),
    "lstm-per-step-proj": dict(cell="lstm", mode=dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                                     zoneout_c=0.2, proj_size=2)),
    "gru-update": dict(cell="gru", mode=dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step")),
    "gru-rb": dict(cell="gru-rb", mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.1)),
    "simple": dict(cell="simple", mode=dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.2)),
}


@in_process
@pytest.mark.parametrize("counter", [False, True], ids=["tensor-masks", "counter-masks"])
@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_gpu_layer_passes_opcheck(case, counter, monkeypatch):
    """droprnn::gpu_layer: schema, fake implementation, autograd registration and AOTAutograd against eager,
    with masks as tensors and as counter-based masks (what plans drawn on CUDA hold)."""
    from droprnn.dropout import plan as plan_module
    from droprnn.kernels.gpu import operator

    if counter:
        monkeypatch.setattr(plan_module, "COUNTER_DEVICES", frozenset({"cuda", "cpu"}))
    layer = make_layer(3, 4, F64, **OPERATOR_CASES[case])
    cell = layer.cell
    x = random_input(2, 3, 3, F64).requires_grad_(True)
    states = tuple(torch.randn(2, size, dtype=F64, requires_grad=True) for size in cell.state_size)
    masks = layer.draw_dropout_plan(2, steps=3).cells[0]
    assert masks.counter_based == counter
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)
    args = operator.arguments(cell, x, masks.weights_for(cell.weights()), states, masks, valid)
    torch.library.opcheck(torch.ops.droprnn.gpu_layer.default, args)
    # Its backward, on the forward's results, every gradient wanted.
    with torch.no_grad():
        h, c_last, *saved = torch.ops.droprnn.gpu_layer(*args)
    grad_c = torch.randn_like(c_last) if cell.state_size[1:] else None
    backward_args = (torch.randn_like(h), grad_c, *(a.detach() if torch.is_tensor(a) else a for a in args[:15]), h,
                     *saved, *args[15:20], args[21], [True] * 6)
    torch.library.opcheck(torch.ops.droprnn.gpu_layer_backward.default, backward_args)


@in_process
def test_gpu_layers_compile_whole():
    """torch.compile(fullgraph=True) keeps the GPU kernels' operator whole; training on given masks equals eager."""
    layer = make_layer(3, 4, F32, mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.1), stacked=("lstm", "gru"),
                       return_sequences=True)
    layer.impl = "gpu"
    twin = copy.deepcopy(layer)
    program = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = random_input(2, 3, 3, F32)
    plan = layer.draw_dropout_plan(2, steps=3)
    got, want = [], []
    for model, out in ((program, got), (layer, want)):
        xs = x.clone().requires_grad_(True)
        y = model(xs, dropout_plan=plan, lengths=torch.tensor([3, 2]))
        y.square().sum().backward()
        out += [y.detach(), xs.grad] + [p.grad for p in (twin if model is program else layer).parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert twin.last_kernel.name == "gpu"


# ----------------------------------------------------------------------------------------------- 4. CUDA graphs
# The time loops replay from CUDA graphs on the GPU (kernels/gpu/graphs.py). On the CPU the bookkeeping is
# tested directly, and the replayed path itself -- static buffers, copies in and out, one entry shared by
# calls and layers -- runs with a stand-in for the capture that keeps the loop as a Python callable and
# calls it on replay (a real graph replays the same launches on the same buffers). The real capture is
# tested by test_cuda_graphs_equal_the_eager_loops, in a fresh process on a CUDA machine.
from droprnn.kernels.gpu import graphs  # noqa: E402


class FakeEntry:
    device = torch.device("cpu")

    def __init__(self, name):
        self.name = name


def test_graph_cache_captures_a_key_on_its_second_call():
    built, released = [], []
    cache = graphs.GraphCache(capacity=3, capture_on_call=2, release=released.append)

    def build(name):
        built.append(name)
        return FakeEntry(name)

    assert cache.lookup("a", lambda: build("a")) is None  # first call: eager
    assert not built and len(cache) == 0
    entry = cache.lookup("a", lambda: build("a"))
    assert entry.name == "a" and built == ["a"]
    assert cache.lookup("a", lambda: build("a")) is entry and built == ["a"]  # captured once
    assert not released


def test_graph_cache_is_a_bounded_lru():
    released = []
    cache = graphs.GraphCache(capacity=3, capture_on_call=1, release=lambda e: released.append(e.name))
    for name in "abc":
        cache.lookup(name, lambda: FakeEntry(name))
    cache.lookup("a", lambda: FakeEntry("a2"))  # a hit: a becomes the most recent
    cache.lookup("d", lambda: FakeEntry("d"))
    assert cache.keys() == ["c", "a", "d"] and released == ["b"]
    for k in range(20):  # variable lengths: memory stays bounded
        cache.lookup(("T", k), lambda: FakeEntry(k))
    assert len(cache) == 3 and len(released) == 21
    cache.clear()
    assert len(cache) == 0 and len(released) == 24
    with pytest.raises(ValueError, match="capacity"):
        graphs.GraphCache(capacity=0)


def test_graph_cache_forgets_old_call_counts():
    cache = graphs.GraphCache(capacity=2, capture_on_call=2, release=lambda e: None)
    for k in range(1000):
        assert cache.lookup(k, lambda: FakeEntry(k)) is None
    assert len(cache._calls) <= 16 and len(cache) == 0


def test_graph_cache_falls_back_to_eager_when_a_capture_fails():
    cache = graphs.GraphCache(capacity=2, capture_on_call=1, release=lambda e: None)

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="eager loop instead"):
        assert cache.lookup("k", broken) is None
    assert cache.lookup("k", lambda: FakeEntry("k")) is None  # remembered: no second try
    cache.clear()
    assert cache.lookup("k", lambda: FakeEntry("k")).name == "k"


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_switch_chooses_the_eager_loops(monkeypatch, value):
    monkeypatch.setenv(graphs.ENV_SWITCH, value)
    assert not graphs.enabled()
    reason = graphs.unusable_reason(torch.zeros(1))
    assert reason is not None and graphs.ENV_SWITCH in reason
    assert "eager" in graphs.describe()
    monkeypatch.setattr(gpu, "interpreting", lambda: False)
    assert "eager time loops" in gpu.describe()


def test_graphs_need_cuda_tensors(monkeypatch):
    monkeypatch.delenv(graphs.ENV_SWITCH, raising=False)
    assert graphs.enabled()
    assert "CUDA" in graphs.unusable_reason(torch.zeros(1))
    assert "CUDA graphs" in graphs.describe()
    monkeypatch.setattr(gpu, "interpreting", lambda: False)
    assert "CUDA graphs" in gpu.describe()


@in_process
def test_describe_says_the_interpreter_runs_eager_loops():
    assert "eager time loops" in gpu.describe() and "interpreted" in gpu.describe()


@in_process
def test_loop_key_holds_what_the_captured_work_depends_on():
    from droprnn.kernels.gpu.loops import loop_key
    from droprnn.kernels.gpu.noise import Noise

    B, T, D, U = 2, 3, 4, 5
    x = torch.zeros(B, T, D)
    per_gate, shared = torch.ones(4, B, D), torch.ones(1, B, D)
    rec4, rec1, valid = torch.ones(4, B, U), torch.ones(1, B, U), torch.ones(B, T)

    def key(cell="lstm", backward=False, x=x, units=U, input_masks=per_gate, rec=rec4, valid=valid, codes=(0, 1),
            **flags):
        return loop_key(cell, backward, x, units, input_masks, rec, valid, codes, **flags)

    base = key()
    assert base == key(x=torch.zeros(B, T, D + 3))  # D: the input projection runs outside the loop
    assert base == key(input_masks=torch.ones(T, 4, B, D))  # per step, per gate
    variants = [key(cell="gru"), key(cell="gru-reset-before"), key(backward=True), key(x=torch.zeros(B + 1, T, D)),
                key(x=torch.zeros(B, T + 1, D)), key(units=U + 1), key(x=x.double()), key(x=x.to(BF16)),
                key(x=x.half()), key(input_masks=shared), key(rec=rec1), key(rec=None), key(valid=None),
                key(codes=(3, 2)), key(backward=True, has_dhs=True), key(cell="gru", has_recurrent_bias=True),
                key(rec=torch.ones(T, 4, B, U)), key(rec=torch.ones(T, 1, B, U)),
                key(noise=Noise(update=torch.ones(B, U))), key(noise=Noise(update=torch.ones(T, B, U))),
                key(noise=Noise(zoneout=(torch.ones(T, B, U), None))),
                key(noise=Noise(zoneout=(None, torch.ones(T, B, U)))),
                key(noise=Noise(zoneout=(0.3, None))), key(noise=Noise(zoneout=(0.4, None)))]
    assert len({base, *variants}) == len(variants) + 1
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if previous == "highest" else "highest")
        assert key() != base  # TF32 or not
    finally:
        torch.set_float32_matmul_precision(previous)


NEW_TF32_API = hasattr(torch.backends, "fp32_precision")


@pytest.mark.skipif(not NEW_TF32_API, reason="torch < 2.9 has no per-backend TF32 switches")
@pytest.mark.parametrize("switch", ["torch.backends.cuda.matmul", "torch.backends"])
@in_process
def test_torch_per_backend_tf32_switches_are_read_without_raising(switch):
    """Once a user sets torch >= 2.9's fp32_precision switches, torch.get_float32_matmul_precision() raises;
    a layer call must still run (and the loop key must see TF32, since a captured product keeps it)."""
    from droprnn.kernels.gpu.loops import loop_key

    x = torch.zeros(2, 3, 4)
    target = torch.backends.cuda.matmul if switch == "torch.backends.cuda.matmul" else torch.backends
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "none"  # torch's defaults
        base = loop_key("lstm", False, x, 5, None, None, None, (0, 1))
        target.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):  # what droprnn must not call
            torch.get_float32_matmul_precision()
        assert loop_key("lstm", False, x, 5, None, None, None, (0, 1)) != base
        layer = LSTM(3, dropout=0.2, recurrent_dropout=0.2, impl="gpu")
        assert layer(torch.randn(2, 4, 5)).shape == (2, 3)
        assert layer.last_kernel.name == "gpu"
        target.fp32_precision = "none"
        assert loop_key("lstm", False, x, 5, None, None, None, (0, 1)) == base
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@contextlib.contextmanager
def tf32_switches():
    """Restore torch's TF32 switches (legacy and per-backend) after a test that sets them."""
    legacy = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    per_backend = {}
    if NEW_TF32_API:
        per_backend = {(torch.backends, "fp32_precision"): torch.backends.fp32_precision,
                       (torch.backends.cuda.matmul, "fp32_precision"): torch.backends.cuda.matmul.fp32_precision,
                       (torch.backends.cudnn, "fp32_precision"): torch.backends.cudnn.fp32_precision,
                       (torch.backends.cudnn.rnn, "fp32_precision"): torch.backends.cudnn.rnn.fp32_precision}
    try:
        yield
    finally:
        for (where, name), value in per_backend.items():
            setattr(where, name, "none")
        torch.set_float32_matmul_precision(legacy[0])
        torch.backends.cudnn.allow_tf32 = legacy[1]
        for (where, name), value in per_backend.items():
            setattr(where, name, value)


def mix_tf32_switches():
    """The state where torch.get_float32_matmul_precision() raises: the legacy switch says full float32, the
    global per-backend one (inherited by cuBLAS) says TF32."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()


def test_float32_products_follow_torch_rnn_tf32_switch():
    """droprnn's float32 products on CUDA run at the precision torch lets its own RNNs (cuDNN) use: TF32 by
    default ("high"), full float32 ("highest") with cudnn.allow_tf32 off -- whatever the matmul switch says."""
    from types import SimpleNamespace

    from droprnn.kernels.gpu.precision import float32_precision, rnn_allows_tf32

    cuda32 = SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"))  # no CUDA needed to decide
    with tf32_switches():
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        assert rnn_allows_tf32() and float32_precision(cuda32) == "high"
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("high")
        assert not rnn_allows_tf32() and float32_precision(cuda32) == "highest"
        assert float32_precision(SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda"))) is None
        assert float32_precision(torch.zeros(1)) is None  # CPU tensors (the interpreter): nothing set
        if NEW_TF32_API:
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
            assert not rnn_allows_tf32()
            torch.backends.cudnn.rnn.fp32_precision = "tf32"
            assert rnn_allows_tf32()
            mix_tf32_switches()
            assert float32_precision(cuda32) is None


def test_products_precision_sets_and_restores_torch_switches_exactly():
    from droprnn.kernels.gpu.precision import products_precision

    with tf32_switches():
        torch.set_float32_matmul_precision("highest")
        if NEW_TF32_API:
            torch.backends.cuda.matmul.fp32_precision = "none"
        with products_precision("high"):
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "highest"
        if NEW_TF32_API:
            assert torch.backends.cuda.matmul.fp32_precision == "none"
        with products_precision(None):
            assert torch.get_float32_matmul_precision() == "highest"
        torch.set_float32_matmul_precision("medium")
        with products_precision("highest"):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
        if NEW_TF32_API:
            mix_tf32_switches()
            with products_precision("highest"):  # leaves everything alone
                assert torch.backends.cuda.matmul.fp32_precision == "tf32"


@in_process
@pytest.mark.parametrize("make", [lambda: LSTM(4, dropout=0.2, recurrent_dropout=0.2), lambda: GRU(4, dropout=0.2),
                                  lambda: SimpleRNN(4, recurrent_dropout=0.2)], ids=["lstm", "gru", "simple"])
def test_backward_products_run_at_the_forwards_precision(make, monkeypatch):
    """The backward's products use the precision the forward took, even if torch's switch changed between."""
    from droprnn.kernels.gpu import gru, loops, lstm, precision, simple

    keys = []
    real = loops.run_loop
    for module in (lstm, gru, simple):
        monkeypatch.setattr(module, "run_loop", lambda cls, key, *a: keys.append(key) or real(cls, key, *a))
    monkeypatch.setattr(precision, "float32_precision", lambda x: "highest")
    layer = make()
    layer.impl = "gpu"
    y = layer(torch.randn(2, 3, 5))
    monkeypatch.setattr(precision, "float32_precision", lambda x: "high")
    y.sum().backward()
    assert [(key.backward, key.precision) for key in keys] == [(False, "highest"), (True, "highest")]
    assert keys[0].matmul_settings == keys[1].matmul_settings == "float32 products at highest"


class FakeGraph:
    """Stands in for a captured loop on the CPU: replay() runs the loop again on the static buffers."""

    def __init__(self, loop):
        self.loop, self.replays = loop, 0

    def replay(self):
        self.replays += 1
        self.loop()


@pytest.fixture
def replayed(monkeypatch):
    """Send CPU calls down the graph path (captured on the first call), with FakeGraph as the capture."""
    from droprnn.kernels.gpu import loops

    made = []

    def capture(device, loop, warm_up):
        warm_up()
        made.append(FakeGraph(loop))
        return made[-1]

    cache = graphs.GraphCache(capacity=4, capture_on_call=1)
    monkeypatch.setattr(loops, "_GRAPHS", cache)
    monkeypatch.setattr(graphs, "unusable_reason", lambda x: None)
    monkeypatch.setattr(graphs, "capture", capture)
    return cache, made


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode_name", ["none", "keras_both", "tied", "input_per_step", "weights", "per_step",
                                       "update_per_step", "zoneout"])
def test_replayed_loops_equal_reference(mode_name, dtype, replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    seed = list(MODES).index(mode_name)
    layer = make_layer(D, U, dtype, mode=MODES[mode_name], seed=seed, return_sequences=True, return_state=True,
                       go_backwards=seed % 2 == 1)
    x = torch.randn(B, T, D, dtype=dtype)
    compare(layer, x, draw_plans(layer, B, T), initial_state=make_initial_state(layer, B, dtype, seed),
            mask=holey_mask(B, T, seed))
    assert len(cache) == 2 and [g.replays for g in made] == [1, 1]  # the forward loop and the backward loop


@in_process
def test_replayed_two_calls_before_backward_and_two_layers_sharing_a_key(replayed):
    """The second call replays over the first call's buffers before either backward: what the first
    saved must survive. Two stacked cells of one width share their entries the same way."""
    cache, made = replayed
    B, T, U = 3, 4, 5
    cells = [LSTMCell(U, dropout=0.3, recurrent_dropout=0.3), LSTMCell(U, dropout=0.3, recurrent_dropout=0.3)]
    layer = RNN(cells, return_sequences=True, return_state=True)
    layer.build(U, dtype=F64)  # D == U: both cells have the same loop key
    x = torch.randn(B, T, U, dtype=F64)
    compare(layer, x, draw_plans(layer, B, T, calls=2), calls=2, mask=holey_mask(B, T, 3))
    assert len(cache) == 2  # one forward entry, one backward entry, for both cells and both calls
    assert sorted(g.replays for g in made) == [4, 4]


@in_process
def test_replayed_retain_graph_and_a_first_call_in_inference_mode(replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), impl="gpu", return_sequences=True)
    x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    with torch.inference_mode():  # the forward entry is built here; training below writes into it
        layer(x.detach(), lengths=[4, 2, 3])
    plan = layer.draw_dropout_plan(B, steps=T)
    y = layer(x, lengths=[4, 2, 3], dropout_plan=plan)
    loss = (y * loss_weights([y])[0]).sum()
    first = torch.autograd.grad(loss, [x, *layer.parameters()], retain_graph=True)
    layer(torch.randn_like(x), lengths=[4, 2, 3])  # another replay between the two backward passes
    second = torch.autograd.grad(loss, [x, *layer.parameters()])
    layer.impl = "reference"
    xx = x.detach().clone().requires_grad_(True)
    ref_y = layer(xx, lengths=[4, 2, 3], dropout_plan=plan)
    expected = torch.autograd.grad((ref_y * loss_weights([ref_y])[0]).sum(), [xx, *layer.parameters()])
    for a, b, c in zip(first, second, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    assert len(cache) == 2 and sum(g.replays for g in made) == 5  # 3 forward, 2 backward


# ----------------------------------------------------------------------------------------------- 5. GRU, half precision
# Each case: the layer's dropout mode, then what else it varies; "expect" names the mask the mode is about and its
# first dimension (m, or "T" per step), so the case cannot pass on an empty plan.
GRU_CASES = {
    "none": ({}, dict(mask=True, initial_state=True)),
    "keras_both": (dict(dropout=0.3, recurrent_dropout=0.3), dict(mask=True, initial_state=True,
                                                                 expect=("recurrent", 3))),
    "recurrent_only_lengths_backwards": (dict(recurrent_dropout=0.3), dict(lengths=[4, 0, 2], expect=("recurrent", 3),
                                                                          layer=dict(go_backwards=True))),
    "tied_shared_input_zero_output": (dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="tied",
                                           input_dropout_mode="shared"),
                                      dict(mask=True, expect=("recurrent", 1), layer=dict(zero_output_for_mask=True))),
    "per_gate_input_only": (dict(dropout=0.3, input_dropout_mode="per_gate"), dict(initial_state=True,
                                                                                  expect=("input", 3))),
    "input_per_step": (dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_step"),
                       dict(initial_state=True, mask=True, expect=("input", "T"))),
    "weights_no_bias_backwards": (dict(dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="weights",
                                       use_bias=False), dict(mask=True, expect=("recurrent_kernel", None),
                                                             layer=dict(go_backwards=True))),
    "relu_hard_sigmoid": (dict(dropout=0.2, recurrent_dropout=0.2), dict(acts=("relu", "hard_sigmoid"), scale=0.35,
                                                                         mask=True, initial_state=True)),
    "last_output": (dict(dropout=0.2, recurrent_dropout=0.3), dict(lengths=[4, 1, 3],
                                                                   layer=dict(return_sequences=False))),
    "per_step_backwards": (dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),
                           dict(mask=True, initial_state=True, expect=("recurrent", "T"), layer=dict(go_backwards=True))),
    "update": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="update"), dict(mask=True, expect=("update", 3))),
    "update_per_step_lengths": (dict(dropout=0.2, recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step"),
                                dict(initial_state=True, lengths=[4, 0, 2], expect=("update", "T"))),
    "zoneout": (dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3), dict(mask=True, initial_state=True,
                                                                             expect=("zoneout", None))),
}


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("form", ["gru", "gru-rb"], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("case", list(GRU_CASES))
def test_gru_gpu_equals_reference(case, form, dtype):
    mode, spec = GRU_CASES[case]
    layer = run_case(form, mode, spec, dtype, seed=list(GRU_CASES).index(case))
    assert layer.cell.reset_after == (form == "gru")


def run_case(cell: str, mode: dict, spec: dict, dtype, seed: int):
    """One case of a cell's table (GRU_CASES, SIMPLE_CASES): the layer's dropout ``mode``; ``spec`` varies the
    call and names the mask the mode is about ("expect": field and first dimension, m or "T") so that the case
    cannot pass on an empty plan. Compares gpu and reference; returns the layer."""
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, dtype, mode=mode, cell=cell, acts=spec.get("acts", ("tanh", "sigmoid")), seed=seed,
                       weight_scale=spec.get("scale", 0.6), **{"return_sequences": True, "return_state": True,
                                                               **spec.get("layer", {})})
    plans = draw_plans(layer, B, T)
    assert plans[0].cells[0].counter_based == bool(spec.get("counter"))
    if "expect" in spec:
        field, first = spec["expect"]
        drawn = getattr(plans[0].cells[0], field)
        assert drawn is not None and (first is None or drawn.shape[0] == (T if first == "T" else first))
    init = make_initial_state(layer, B, dtype, seed) if spec.get("initial_state") else None
    compare(layer, random_input(B, T, D, dtype, seed), plans, initial_state=init, lengths=spec.get("lengths"),
            mask=holey_mask(B, T, seed) if spec.get("mask") else None)
    return layer


@in_process
@pytest.mark.parametrize("kinds, dtype", [(("gru", "gru-rb"), F64), (("lstm", "gru"), F32), (("gru-rb", "lstm"), F64),
                                         (("simple", "lstm"), F64), (("gru", "simple"), F32)],
                         ids=["gru-gru_rb-f64", "lstm-gru-f32", "gru_rb-lstm-f64", "simple-lstm-f64", "gru-simple-f32"])
def test_stacked_gru_and_mixed_cells_gpu_equals_reference(kinds, dtype):
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, dtype, mode=dict(dropout=0.3, recurrent_dropout=0.3), stacked=kinds, seed=9,
                       return_sequences=True, return_state=True, go_backwards=kinds[0] == "lstm")
    compare(layer, random_input(B, T, D, dtype, 9), draw_plans(layer, B, T),
            initial_state=make_initial_state(layer, B, dtype, 9), mask=holey_mask(B, T, 9))


HALF_MODES = {"keras": dict(dropout=0.3, recurrent_dropout=0.3),
              "proj": dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2, proj_size=4),
              "per_step_zoneout": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                       zoneout_h=0.2)}


HALF_CASES = [(cell, mode) for cell in ("lstm", "gru", "gru-rb", "simple") for mode in HALF_MODES
              if mode != "proj" or cell == "lstm"]  # proj_size is the LSTM's


@in_process
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell, mode", HALF_CASES, ids=[f"{c}-{m}" for c, m in HALF_CASES])
def test_half_precision_against_float64(cell, dtype, mode):
    """Tensors in float16 / bfloat16 in, the same dtype out (outputs, states and every gradient), as close to
    the float64 reference as the module docstring's bound says."""
    B, T, D, U = 3, 6, 4, 6
    seed = 20 + ["lstm", "gru", "gru-rb", "simple"].index(cell)
    layer = make_layer(D, U, dtype, mode=HALF_MODES[mode], cell=cell, seed=seed,
                       weight_scale=0.5, return_sequences=True, return_state=True)
    compare(layer, random_input(B, T, D, dtype, seed), draw_plans(layer, B, T),
            initial_state=make_initial_state(layer, B, dtype, seed), mask=holey_mask(B, T, seed))


@in_process
@pytest.mark.parametrize("form", ["gru", "gru-rb"], ids=["reset_after", "reset_before"])
def test_replayed_gru_loops_equal_reference(form, replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3), cell=form, seed=11,
                       return_sequences=True, return_state=True)
    compare(layer, random_input(B, T, D, F64, 11), draw_plans(layer, B, T, calls=2), calls=2,
            initial_state=make_initial_state(layer, B, F64, 11), mask=holey_mask(B, T, 11))
    assert len(cache) == 2 and [g.replays for g in made] == [2, 2]  # two calls through one entry each way


@in_process
def test_replayed_half_precision_mixed_stack(replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F16, mode=dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="tied"),
                       stacked=("gru-rb", "lstm"), seed=12, return_sequences=True, return_state=True)
    compare(layer, random_input(B, T, D, F16, 12), draw_plans(layer, B, T),
            initial_state=make_initial_state(layer, B, F16, 12), mask=holey_mask(B, T, 12))
    assert len(cache) == 4 and all(g.replays == 1 for g in made)


def _checks_on_cuda(part: str):
    """On a CUDA device, in a fresh process (the kernels must be compiled for the GPU, so TRITON_INTERPRET
    must not be set): part "lstm", graph path == eager path for the LSTM; part "gru-half", for the GRU (both
    forms) and float16 / bfloat16, graphs == eager and gpu == reference -- float64 within 1e-10, half precision
    against float64 within the bound of the module docstring. Prints a line per check and raises on the
    first failure."""
    import copy
    import os

    import torch

    from droprnn import GRU, LSTM, RNN, CellMasks, DropoutPlan, GRUCell, LSTMCell
    from droprnn.kernels.gpu import graphs
    from droprnn.kernels.gpu import loops as kernels

    device = torch.device("cuda")
    kernels._GRAPHS = graphs.GraphCache(capture_on_call=1)  # capture on the first call of a key

    def switch(on):
        os.environ[graphs.ENV_SWITCH] = "1" if on else "0"

    def make(options, dtype, D=6, U=9, cells=None, seed=0, kind="lstm"):
        torch.manual_seed(seed)
        if cells:
            layer = RNN(cells, return_sequences=True, return_state=True)
        elif kind == "lstm":
            layer = LSTM(U, return_sequences=True, return_state=True, **options)
        else:
            layer = GRU(U, reset_after=kind == "gru", return_sequences=True, return_state=True, **options)
        layer.build(D, dtype=dtype, device=device)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(0.5 * torch.randn(p.shape, dtype=dtype, device=device))
        layer.impl = "gpu"
        return layer

    def inputs(layer, B, T, D, dtype, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(B, T, D, dtype=dtype, device=device, generator=gen)
        init = [0.5 * torch.randn(B, s, dtype=dtype, device=device, generator=gen)
                for c in layer.cells for s in c.state_size]
        mask = torch.rand(B, T, device=device, generator=gen) > 0.3
        mask[0, 0], mask[-1] = False, False
        return x, init, mask

    def train(layer, x, init, mask, plans, graphs_on, impl="gpu"):
        """Outputs and gradients of a fixed loss over len(plans) calls (the first from ``init``)."""
        switch(graphs_on)
        layer.impl = impl
        x = x.detach().clone().requires_grad_(True)
        leaves = [t.detach().clone().requires_grad_(True) for t in init]
        per_cell, start = [], 0
        for cell in layer.cells:
            per_cell.append(leaves[start:start + len(cell.state_size)])
            start += len(cell.state_size)
        per_cell = per_cell[0] if len(per_cell) == 1 else per_cell
        out = []
        for k, plan in enumerate(plans):
            result = layer(x, mask=mask, initial_state=per_cell if k == 0 else None, dropout_plan=plan)
            out += [t for r in result for t in (r if isinstance(r, (list, tuple)) else [r])]
        gen = torch.Generator(device=device).manual_seed(7)
        # Drawn in float64 and rounded: the same loss weights in every dtype (randn in another dtype draws others).
        loss = sum((o * torch.randn(o.shape, generator=gen, device=device, dtype=torch.float64).to(o.dtype)).sum()
                   for o in out)
        grads = torch.autograd.grad(loss, [x, *leaves, *layer.parameters()])
        assert layer.last_kernel.name == impl, layer.last_kernel
        layer.impl = "gpu"
        return [o.detach() for o in out] + list(grads)

    def same(name, got, want, bound=1e-6):
        worst, bitwise = 0.0, True
        for a, b in zip(got, want):
            assert not torch.isnan(a).any(), f"{name}: NaN"
            bitwise &= torch.equal(a, b)
            scale = max(b.abs().max().item(), 1.0)
            worst = max(worst, (a - b).abs().max().item() / scale)
        assert worst <= bound, f"{name}: differs by {worst:.3g} (relative) > {bound}"
        print(f"PASS {name:52} {'bit for bit' if bitwise else f'max relative difference {worst:.2e}'}", flush=True)

    B, T, D, U = 5, 7, 6, 9
    if part == "gru-half":
        def as_float64(plan):
            return DropoutPlan(tuple(CellMasks(*(None if t is None else t.double() for t in (
                m.input, m.recurrent, m.update, m.recurrent_kernel))) for m in plan.cells))

        def near_float64(name, layer, x, init, mask, plans, got, rtol):
            """got and the reference loop, both in the layer's dtype, against the reference in float64."""
            ref = train(layer, x, init, mask, plans, False, impl="reference")
            exact = train(copy.deepcopy(layer).double(), x.double(), [t.double() for t in init], mask,
                          [as_float64(p) for p in plans], False, impl="reference")
            worst = 0.0
            for g, r, e in zip(got, ref, exact):
                assert g.dtype == x.dtype and not torch.isnan(g).any(), f"{name}: {g.dtype}, NaN"
                err_ref, err_gpu = (r.double() - e).abs().max().item(), (g.double() - e).abs().max().item()
                bound = max(rtol * e.abs().max().item(), 2 * err_ref, 1e-30)
                worst = max(worst, err_gpu / bound)
            assert worst <= 1, f"{name}: error {worst:.2f} x the bound"
            print(f"PASS {name:52} largest error / bound {worst:.2f}", flush=True)

        def graphs_equal_eager(name, layer, dtype, seed):
            x, init, mask = inputs(layer, B, T, D, dtype, seed=seed)
            plans = [layer.draw_dropout_plan(B, steps=T, training=True)]
            kernels._GRAPHS.clear()
            eager = train(layer, x, init, mask, plans, graphs_on=False)
            replayed = train(layer, x, init, mask, plans, graphs_on=True)
            assert len(kernels._GRAPHS) == 2 * len(layer.cells), kernels._GRAPHS.keys()
            same(f"{name}: graphs == eager", replayed, eager)
            return replayed, (x, init, mask, plans)

        gru_modes = {
            "keras per-gate masks": dict(dropout=0.3, recurrent_dropout=0.3),
            "tied, per-step input": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="tied",
                                         input_dropout_mode="per_step"),
            "DropConnect, go_backwards, no bias": dict(dropout=0.3, recurrent_dropout=0.3, use_bias=False,
                                                       recurrent_dropout_mode="weights", go_backwards=True),
        }
        for kind in ("gru", "gru-rb"):
            for name, options in gru_modes.items():
                layer = make(options, torch.float64, kind=kind)
                replayed, (x, init, mask, plans) = graphs_equal_eager(f"{kind}, {name}", layer, torch.float64, 1)
                same(f"{kind}, {name}: == reference", replayed,
                     train(layer, x, init, mask, plans, False, impl="reference"), bound=1e-10)
        layer = make({}, torch.float64, cells=[LSTMCell(U, dropout=0.3, recurrent_dropout=0.3),
                                               GRUCell(U - 2, reset_after=False, recurrent_dropout=0.3)])
        replayed, (x, init, mask, plans) = graphs_equal_eager("LSTM + GRU stacked", layer, torch.float64, 2)
        same("LSTM + GRU stacked: == reference", replayed, train(layer, x, init, mask, plans, False, impl="reference"),
             bound=1e-10)
        for kind in ("lstm", "gru", "gru-rb"):
            for dtype, rtol in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3)):
                layer = make(dict(dropout=0.3, recurrent_dropout=0.3), dtype, kind=kind)
                replayed, inputs_ = graphs_equal_eager(f"{kind}, {dtype}", layer, dtype, 3)
                near_float64(f"{kind}, {dtype}: against float64", layer, *inputs_, replayed, rtol)
        os.environ.pop(graphs.ENV_SWITCH)
        print("ALL PASSED")
        return

    modes = {
        "no dropout": {},
        "keras per-gate masks": dict(dropout=0.3, recurrent_dropout=0.3),
        "tied recurrent mask": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="tied"),
        "per-step input masks": dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_step"),
        "DropConnect, go_backwards": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="weights",
                                          go_backwards=True),
        "relu / hard_sigmoid": dict(dropout=0.3, recurrent_dropout=0.3, activation="relu",
                                    recurrent_activation="hard_sigmoid"),
    }
    for name, options in modes.items():
        for dtype in (torch.float32, torch.float64):
            layer = make(options, dtype)
            x, init, mask = inputs(layer, B, T, D, dtype, seed=1)
            plans = [layer.draw_dropout_plan(B, steps=T, training=True)]
            kernels._GRAPHS.clear()
            eager = train(layer, x, init, mask, plans, graphs_on=False)
            assert len(kernels._GRAPHS) == 0, "DROPRNN_CUDA_GRAPHS=0 still captured"
            replayed = train(layer, x, init, mask, plans, graphs_on=True)
            assert len(kernels._GRAPHS) == 2, kernels._GRAPHS.keys()  # forward and backward captured
            same(f"{name}, {dtype}", replayed, eager)
            x2, init2, mask2 = inputs(layer, B, T, D, dtype, seed=2)  # new inputs through the same graphs
            same(f"{name}, {dtype}, second call", train(layer, x2, init2, mask2, plans, True),
                 train(layer, x2, init2, mask2, plans, False))

    # Two calls before the backward (gradient accumulation over the sequence) and two cells sharing a key.
    layer = make({}, torch.float32, D=U, cells=[LSTMCell(U, dropout=0.3, recurrent_dropout=0.3),
                                                LSTMCell(U, dropout=0.3, recurrent_dropout=0.3)])
    x, init, mask = inputs(layer, B, T, U, torch.float32, seed=3)
    plans = [layer.draw_dropout_plan(B, steps=T, training=True) for _ in range(2)]
    kernels._GRAPHS.clear()
    replayed = train(layer, x, init, mask, plans, True)
    assert len(kernels._GRAPHS) == 2, kernels._GRAPHS.keys()
    same("two calls, two cells sharing a key", replayed, train(layer, x, init, mask, plans, False))

    # retain_graph, with another replay between the two backward passes
    layer = make(dict(dropout=0.3, recurrent_dropout=0.3), torch.float32)
    x, init, mask = inputs(layer, B, T, D, torch.float32, seed=4)
    plan = layer.draw_dropout_plan(B, steps=T, training=True)
    grads = {}
    for on in (False, True):
        switch(on)
        xx = x.detach().clone().requires_grad_(True)
        y = layer(xx, mask=mask, dropout_plan=plan)[0]
        loss = (y * torch.linspace(-1, 1, y.numel(), device=device).view(y.shape)).sum()
        first = torch.autograd.grad(loss, [xx, *layer.parameters()], retain_graph=True)
        layer(torch.randn_like(x), mask=mask)
        second = torch.autograd.grad(loss, [xx, *layer.parameters()])
        same(f"retain_graph, graphs {'on' if on else 'off'}: 2nd == 1st", second, first, bound=0.0)
        grads[on] = first
    same("retain_graph: graphs == eager", grads[True], grads[False])

    # Separate backward passes in the reverse order of their forwards
    switch(True)
    layer = make(dict(dropout=0.3, recurrent_dropout=0.3), torch.float32)
    xs = [inputs(layer, B, T, D, torch.float32, seed=s)[0].requires_grad_(True) for s in (5, 6)]
    plan = layer.draw_dropout_plan(B, steps=T, training=True)
    grads = {}
    for on in (True, False):
        switch(on)
        ys = [layer(xx, dropout_plan=plan)[0] for xx in xs]
        grads[on] = [torch.autograd.grad(ys[k].pow(2).sum(), xs[k])[0] for k in (1, 0)]
    same("two forwards, backwards in reverse order", grads[True], grads[False])

    # A first call in inference mode builds the forward entry; training then writes into it.
    switch(True)
    kernels._GRAPHS.clear()
    layer = make(dict(dropout=0.3, recurrent_dropout=0.3), torch.float32)
    x, init, mask = inputs(layer, B, T, D, torch.float32, seed=8)
    with torch.inference_mode():
        layer(x, mask=mask, training=False)
    plans = [layer.draw_dropout_plan(B, steps=T, training=True)]
    same("inference first, then training", train(layer, x, init, mask, plans, True),
         train(layer, x, init, mask, plans, False))

    # A user capturing their own graph: our loops go into it eagerly (no capture of our own inside).
    switch(True)
    layer = make(dict(dropout=0.3, recurrent_dropout=0.3), torch.float32)
    static_x = torch.randn(B, T, D, device=device)
    plan = layer.draw_dropout_plan(B, steps=T, training=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            layer(static_x, dropout_plan=plan)
    torch.cuda.current_stream().wait_stream(side)
    kernels._GRAPHS.clear()
    user_graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(user_graph):
        static_y = layer(static_x, dropout_plan=plan)[0]
    assert len(kernels._GRAPHS) == 0, "captured a graph inside the user's capture"
    new_x = torch.randn(B, T, D, device=device)
    static_x.copy_(new_x)
    user_graph.replay()
    with torch.no_grad():
        direct = layer(new_x, dropout_plan=plan)[0]
    same("inside a user's CUDA graph capture", [static_y], [direct])

    # The cache stays bounded when every call has another length.
    switch(True)
    kernels._GRAPHS = graphs.GraphCache()
    layer = make(dict(dropout=0.3, recurrent_dropout=0.3), torch.float32)
    for steps in range(1, 14):
        for _ in range(2):
            layer(torch.randn(B, steps, D, device=device))[0].sum().backward()
    assert len(kernels._GRAPHS) == graphs.CACHE_SIZE, len(kernels._GRAPHS)
    print(f"PASS {'13 lengths: the cache holds ' + str(graphs.CACHE_SIZE) + ' loops':52}", flush=True)
    os.environ.pop(graphs.ENV_SWITCH)
    print("ALL PASSED")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests above cover the "
                    "bookkeeping and the replayed path with a stand-in for the capture)")
@pytest.mark.parametrize("part", ["lstm", "gru-half"])
def test_cuda_graphs_equal_the_eager_loops(part):
    import inspect

    source = inspect.getsource(_checks_on_cuda) + f"\n_checks_on_cuda({part!r})\n"
    out = _run_script(source, {"PYTHONUNBUFFERED": "1"}, unset=("TRITON_INTERPRET", graphs.ENV_SWITCH), timeout=300)
    print(out)
    assert "ALL PASSED" in out



# ----------------------------------------------------------------------------------------------- 6. counter-based masks
# On CUDA the per-step recurrent and update masks and the zoneout indicators are CounterMask objects: the kernels
# make each entry from (seed, stream, index) inside their steps. The fixture makes CPU plans hold them too, so
# the interpreter runs those kernels; the reference loop makes each step's slice with the same hash in torch.
@pytest.fixture
def counter_cpu(monkeypatch):
    from droprnn.dropout import plan as plan_module

    monkeypatch.setattr(plan_module, "COUNTER_DEVICES", frozenset({"cuda", "cpu"}))


if IN_PROCESS:
    import triton.language as tl

    from droprnn.kernels.gpu.triton_helpers import counter_bits as triton_counter_bits

    @triton.jit
    def _bits_kernel(seed_ptr, index_ptr, out_ptr, N, STREAM: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        inside = offsets < N
        index = tl.load(index_ptr + offsets, mask=inside, other=0)
        tl.store(out_ptr + offsets, triton_counter_bits(seed_ptr, STREAM, index).to(tl.int64), mask=inside)


@in_process
@pytest.mark.parametrize("stream", [0, 1, 3])
def test_triton_counter_bits_equal_torch(stream):
    from droprnn.random import counter_bits

    gen = torch.Generator().manual_seed(stream)
    seed = torch.randint(0, 1 << 32, (2,), generator=gen, dtype=torch.int64)
    index = torch.cat([torch.arange(40), torch.tensor([0xFFFFFFFF, 1 << 32, (1 << 32) + 7, (5 << 32) + 99]),
                       torch.randint(0, 1 << 40, (20,), generator=gen)])
    out = torch.empty_like(index)
    _bits_kernel[(1,)](seed, index, out, index.numel(), STREAM=stream, BLOCK=128)
    assert torch.equal(out, counter_bits(seed, stream, index))


@in_process
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("kind, rate, stream", [("dropout", 0.3, 0), ("dropout", 0.75, 1), ("keep", 0.2, 2)])
def test_counter_masks_made_by_triton_equal_torchs(kind, rate, stream, dtype):
    """kernels/gpu/counter.py makes a whole mask, or one gate's slice at every step, in one pass: the
    weight gradients' products read them so. Bit for bit what CounterMask makes with torch's ops."""
    from droprnn.kernels import products
    from droprnn.kernels.gpu import counter
    from droprnn.random import CounterMask

    seed = torch.tensor([0xDEADBEEF, 12345], dtype=torch.int64)
    mask = CounterMask(seed, stream, (5, 4, 3, 7), rate, kind, dtype)
    whole = counter.made(mask)
    assert whole.dtype == dtype and torch.equal(whole, mask.materialize())
    for g in range(4):
        assert torch.equal(counter.made(mask, g), mask.gate(g))
    assert torch.equal(products.counter_tensor(mask, 2), mask.gate(2))  # the path the products take here
    values = set(whole.unique().tolist())
    assert values == ({0.0, 1.0} if kind == "keep" else {0.0, float(torch.tensor(1 / (1 - rate), dtype=dtype))})
    shared = CounterMask(seed, stream, (6, 1, 2, 5), rate, kind, dtype)  # one mask shared by the gates
    assert torch.equal(counter.made(shared, 0), shared.gate(0))


COUNTER_MODES = {
    "per_step": dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),
    "update_per_step_zoneout": dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step", zoneout_h=0.3),
    "keras_zoneout": dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.4),
    "per_step_tied_zoneout": dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.5,
                                  zoneout_c=0.2),
}


def counter_layer(cell: str, mode: str, dtype, seed: int, **layer_kw):
    options = {k: v for k, v in COUNTER_MODES[mode].items() if cell == "lstm" or k != "zoneout_c"}
    return make_layer(3, 5, dtype, mode=options, cell=cell, seed=seed, return_sequences=True, return_state=True,
                      **layer_kw)


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru-rb"])
@pytest.mark.parametrize("mode", list(COUNTER_MODES))
def test_counter_masks_gpu_equals_reference(mode, cell, dtype, counter_cpu):
    B, T = 3, 4
    seed = 40 + list(COUNTER_MODES).index(mode)
    layer = counter_layer(cell, mode, dtype, seed, go_backwards=mode == "keras_zoneout")
    plans = draw_plans(layer, B, T)
    assert plans[0].cells[0].counter_based
    compare(layer, random_input(B, T, 3, dtype, seed), plans, initial_state=make_initial_state(layer, B, dtype, seed),
            mask=holey_mask(B, T, seed))


@in_process
@pytest.mark.parametrize("cell", ["lstm", "gru-rb"])
def test_replayed_counter_loops_take_each_calls_seed(cell, counter_cpu, replayed):
    """A captured loop keeps the seed in a buffer that each call overwrites: two calls, two plans, one entry."""
    cache, made = replayed
    B, T = 3, 4
    layer = counter_layer(cell, "per_step_tied_zoneout", F64, 50)
    plans = draw_plans(layer, B, T, calls=2)
    assert not torch.equal(plans[0].cells[0].zoneout[0].materialize(), plans[1].cells[0].zoneout[0].materialize())
    compare(layer, random_input(B, T, 3, F64, 50), plans, calls=2, mask=holey_mask(B, T, 50))
    assert len(cache) == 2 and [g.replays for g in made] == [2, 2]


@in_process
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_counter_masks_in_half_precision(cell, dtype, counter_cpu):
    """The kept value 1 / (1 - rate) as the dtype rounds it, in the kernels as in the reference's tensors."""
    B, T = 3, 6
    layer = counter_layer(cell, "per_step", dtype, 60)
    compare(layer, random_input(B, T, 3, dtype, 60), draw_plans(layer, B, T),
            initial_state=make_initial_state(layer, B, dtype, 60), mask=holey_mask(B, T, 60))


# ----------------------------------------------------------------------------------------------- 7. SimpleRNN
SIMPLE_CASES = {
    "none": ({}, dict(mask=True, initial_state=True)),
    "keras": (dict(dropout=0.3, recurrent_dropout=0.3), dict(mask=True, initial_state=True, expect=("recurrent", 1))),
    "tied_lengths_backwards": (dict(dropout=0.2, recurrent_dropout=0.3, recurrent_dropout_mode="tied"),
                               dict(lengths=[4, 0, 2], layer=dict(go_backwards=True))),
    "per_step": (dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),
                 dict(mask=True, expect=("recurrent", "T"))),
    "per_step_counter": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.3),
                         dict(mask=True, initial_state=True, counter=True)),
    "input_per_step_zero_output": (dict(dropout=0.3, input_dropout_mode="per_step"),
                                   dict(mask=True, expect=("input", "T"), layer=dict(zero_output_for_mask=True))),
    "weights_no_bias": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="weights", use_bias=False),
                        dict(mask=True, expect=("recurrent_kernel", None))),
    "zoneout": (dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.4), dict(mask=True, expect=("zoneout", None))),
    "relu": (dict(dropout=0.2, recurrent_dropout=0.2), dict(acts=("relu", "sigmoid"), scale=0.35, mask=True)),
    "last_output": (dict(dropout=0.2, recurrent_dropout=0.3), dict(lengths=[4, 1, 3],
                                                                   layer=dict(return_sequences=False))),
}


@in_process
def test_replayed_simple_rnn_loops_equal_reference(replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2), cell="simple",
                       seed=90, return_sequences=True, return_state=True)
    compare(layer, random_input(B, T, D, F64, 90), draw_plans(layer, B, T, calls=2), calls=2,
            initial_state=make_initial_state(layer, B, F64, 90), mask=holey_mask(B, T, 90))
    assert len(cache) == 2 and [g.replays for g in made] == [2, 2]


# ----------------------------------------------------------------------------------------------- 8. LSTM proj_size
# h = (o ⊙ φ(c)) @ P has proj_size units: the recurrent masks, zoneout_h and the carried h are that size.
PROJ_CASES = {
    "none": (dict(proj_size=3), dict(mask=True, initial_state=True)),
    "keras": (dict(dropout=0.3, recurrent_dropout=0.3, proj_size=3), dict(mask=True, initial_state=True,
                                                                          expect=("recurrent", 4))),
    "tied_backwards": (dict(dropout=0.2, recurrent_dropout=0.3, recurrent_dropout_mode="tied", proj_size=2),
                       dict(lengths=[4, 0, 2], layer=dict(go_backwards=True))),
    "per_step_zoneout": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.3, zoneout_c=0.2,
                              proj_size=3), dict(mask=True, initial_state=True, expect=("recurrent", "T"))),
    "per_step_zoneout_counter": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.3,
                                      zoneout_c=0.2, proj_size=3), dict(mask=True, initial_state=True, counter=True)),
    "update_weights_last_output": (dict(recurrent_dropout=0.3, recurrent_dropout_mode="weights", proj_size=2),
                                   dict(lengths=[4, 1, 3], layer=dict(return_sequences=False))),
}


# table -> (cell, cases, seed base)
CASE_TABLES = {"simple": ("simple", SIMPLE_CASES, 80), "proj": ("lstm", PROJ_CASES, 100)}
TABLE_CASES = [(table, case) for table, (_, cases, _) in CASE_TABLES.items() for case in cases]


@in_process
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("table, case", TABLE_CASES, ids=[f"{t}-{c}" for t, c in TABLE_CASES])
def test_simple_rnn_and_projection_cases_gpu_equals_reference(table, case, dtype, request):
    cell, cases, seed = CASE_TABLES[table]
    mode, spec = cases[case]
    if spec.get("counter"):
        request.getfixturevalue("counter_cpu")
    layer = run_case(cell, mode, spec, dtype, seed=seed + list(cases).index(case))
    if "proj_size" in mode:
        assert layer.cell.projection is not None and layer.output_size == mode["proj_size"]


@in_process
def test_replayed_projection_loops_equal_reference(replayed):
    cache, made = replayed
    B, T, D, U = 3, 4, 3, 5
    layer = make_layer(D, U, F64, mode=dict(dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.2, proj_size=3), seed=110,
                       return_sequences=True, return_state=True)
    compare(layer, random_input(B, T, D, F64, 110), draw_plans(layer, B, T, calls=2), calls=2,
            initial_state=make_initial_state(layer, B, F64, 110), mask=holey_mask(B, T, 110))
    assert len(cache) == 2 and [g.replays for g in made] == [2, 2]


@in_process
@pytest.mark.parametrize("cell, mode", [("lstm", "per_step_tied_zoneout"), ("gru-rb", "per_step"),
                                        ("lstm-proj", "keras_zoneout")])
def test_counter_masks_over_two_unit_blocks(cell, mode, counter_cpu):
    """130 units: two programs per sequence (BLOCK 128), the second mostly outside -- each entry's counter
    index must still be its place in the mask."""
    B, T, D, U = 2, 3, 4, 130
    options = {k: v for k, v in COUNTER_MODES[mode].items() if cell.startswith("lstm") or k != "zoneout_c"}
    if cell == "lstm-proj":
        options["proj_size"] = 129
    layer = make_layer(D, U, F64, mode=options, cell=cell.split("-proj")[0], seed=120, weight_scale=0.1,
                       return_sequences=True, return_state=True)
    plans = draw_plans(layer, B, T)
    assert plans[0].cells[0].counter_based
    compare(layer, random_input(B, T, D, F64, 120), plans, initial_state=make_initial_state(layer, B, F64, 120),
            mask=holey_mask(B, T, 120))


def test_every_registered_mode_is_compared_here():
    """A mode added to the registry (droprnn.dropout.modes) fails here until a case above compares it."""
    from droprnn.dropout import modes as registry

    recurrent = {m.get("recurrent_dropout_mode", "keras") for m in MODES.values() if m.get("recurrent_dropout")}
    inputs = {m.get("input_dropout_mode", "keras") for m in MODES.values() if m.get("dropout")}
    assert recurrent == set(registry.RECURRENT) and inputs == set(registry.INPUT)


# ----------------------------------------------------------------------------------------------- 9. droprnn.keras
KERAS_CASES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "gru-reset-before": ("GRU", {"reset_after": False}),
               "simple": ("SimpleRNN", {})}


@in_process
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", KERAS_CASES)
def test_keras_layers_on_the_gpu_kernels_compute_what_keras_computes(case, pretend_cuda, spy_gpu):
    """droprnn.keras's layers hand their loop to the GPU kernels as droprnn's own layers do: with Keras's
    masks (seeded, drawn by Keras) and a padding mask, outputs, states and every gradient equal Keras's own
    layer's."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("droprnn.keras needs Keras on its torch backend")
    import numpy as np

    import droprnn.keras as dk

    B, T, D, U = 3, 5, 4, 6
    kind, options = KERAS_CASES[case]
    options = dict(options, dropout=0.2, recurrent_dropout=0.3, return_sequences=True, return_state=True, seed=7)
    theirs, ours = getattr(keras.layers, kind)(U, **options), getattr(dk, kind)(U, **options)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(130))
    theirs(x), ours(x)
    weights = [np.random.default_rng(131).uniform(-0.5, 0.5, w.shape).astype("float32") for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    results = []
    for layer in (theirs, ours):
        leaf = x.clone().requires_grad_(True)
        params = [v.value for v in layer.trainable_variables]
        out = layer(leaf, mask=mask, training=True)
        weight = torch.Generator().manual_seed(132)
        sum((o * torch.randn(o.shape, generator=weight)).sum() for o in out).backward()
        results.append([o.detach() for o in out] + [leaf.grad] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    assert spy_gpu, "droprnn.keras's layer did not run the GPU kernels"
    assert len(results[1]) == len(results[0])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@in_process
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_keras_mixed_bfloat16_policy_on_the_gpu_kernels_equals_the_reference_loop(kind, pretend_cuda, spy_gpu):
    """Keras's "mixed_bfloat16" policy reaches the GPU kernels as autocast: bfloat16 products, float32
    variables and states, and the same result as droprnn's reference loop under the same policy and masks."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("droprnn.keras needs Keras on its torch backend")
    import numpy as np

    import droprnn.keras as dk

    options = dict(dropout=0.2, recurrent_dropout=0.3, return_sequences=True, seed=9, dtype="mixed_bfloat16")
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(140))
    outputs, grads = [], []
    for impl in ("auto", "reference"):
        layer = getattr(dk, kind)(6, impl=impl, **options)
        layer(x)
        layer.set_weights([np.linspace(-0.5, 0.5, w.size, dtype="float32").reshape(w.shape)
                           for w in layer.get_weights()])
        out = layer(x, training=True)
        out.float().sum().backward()
        kernel = layer.trainable_variables[0].value
        assert kernel.dtype == torch.float32 and out.dtype == torch.bfloat16
        outputs.append(out.detach().float())
        grads.append(kernel.grad.clone())
    assert spy_gpu, "droprnn.keras's layer did not run the GPU kernels"
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], atol=5e-2, rtol=5e-2)
