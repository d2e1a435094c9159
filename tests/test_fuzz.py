"""Property-based fuzzing (Hypothesis): random layers, options, dropout modes, lengths (NaN padding included),
dtypes and thread counts run fused == reference on the same masks; random bad arguments end in a
``DroprnnError`` (or a documented torch error), never a crash or a silent result.

Bounded for CI (``DROPRNN_FUZZ_EXAMPLES``, default 25 per property); a longer run, nightly-style::

    DROPRNN_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from droprnn import GRU, LSTM, RNN, DroprnnError, GRUCell, LSTMCell, SimpleRNN, SimpleRNNCell  # noqa: E402
from droprnn.dropout.modes import INPUT_MODES, RECURRENT_MODES, UPDATE_MODES  # noqa: E402
from droprnn.kernels import cpu  # noqa: E402

EXAMPLES = int(os.environ.get("DROPRNN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
ACTIVATIONS = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")
needs_fused = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=f"no fused kernels: {cpu.unavailable_reason()}")


@st.composite
def layers(draw):
    """A random recurrent layer configuration (one cell or a stack of two) and its call."""
    kind = draw(st.sampled_from(["lstm", "gru", "gru_reset_before", "simple", "stacked"]))
    units = draw(st.integers(1, 6))
    mode = draw(st.sampled_from(sorted(RECURRENT_MODES)))
    if kind == "simple" and mode in UPDATE_MODES:
        mode = "tied"
    options = dict(
        dropout=draw(st.sampled_from([0.0, 0.3])), recurrent_dropout=draw(st.sampled_from([0.0, 0.4])),
        recurrent_dropout_mode=mode, input_dropout_mode=draw(st.sampled_from(sorted(INPUT_MODES))),
        zoneout_h=draw(st.sampled_from([0.0, 0.25])),
    )
    activation = draw(st.sampled_from(ACTIVATIONS))
    recurrent_activation = draw(st.sampled_from(ACTIVATIONS))
    return dict(
        kind=kind, units=units, options=options, activation=activation, recurrent_activation=recurrent_activation,
        zoneout_c=draw(st.sampled_from([0.0, 0.2])) if kind == "lstm" else 0.0,
        go_backwards=draw(st.booleans()), return_sequences=draw(st.booleans()),
        zero_output_for_mask=draw(st.booleans()), training=draw(st.booleans()),
        batch=draw(st.integers(1, 4)), steps=draw(st.integers(1, 6)), features=draw(st.integers(1, 5)),
        lengths=draw(st.booleans()), nan_padding=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        threads=draw(st.sampled_from([1, 2])), dtype=draw(st.sampled_from(["float64", "float32"])),
    )


def build(case: dict, impl: str):
    kind, units, options = case["kind"], case["units"], dict(case["options"])
    acts = dict(activation=case["activation"], recurrent_activation=case["recurrent_activation"])
    flags = dict(go_backwards=case["go_backwards"], return_sequences=case["return_sequences"], return_state=True,
                 zero_output_for_mask=case["zero_output_for_mask"], impl=impl)
    if kind == "lstm":
        return LSTM(units, **acts, **options, zoneout_c=case["zoneout_c"], **flags)
    if kind in ("gru", "gru_reset_before"):
        return GRU(units, **acts, **options, reset_after=kind == "gru", **flags)
    if kind == "simple":
        return SimpleRNN(units, activation=case["activation"], **options, **flags)
    cells = [LSTMCell(units, **acts, **options), GRUCell(units + 1, **acts, **options),
             SimpleRNNCell(2, activation=case["activation"], **{**options, "recurrent_dropout_mode": "tied"})]
    return RNN(cells, **flags)


def run(layer, x, plan, lengths):
    x = x.clone().requires_grad_(True)
    out = layer(x, lengths=lengths, dropout_plan=plan)
    tensors = [out] if torch.is_tensor(out) else [t for item in out for t in ([item] if torch.is_tensor(item) else item)]
    loss = sum((t * torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in tensors)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    return [t.detach() for t in tensors] + [g for g in grads if g is not None]


@needs_fused
@FUZZ
@given(case=layers())
def test_fused_equals_reference_on_random_configurations(case):
    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    reference = build(case, "reference")
    batch, steps, features = case["batch"], case["steps"], case["features"]
    reference.build(features, dtype=dtype)
    fused = build(case, "fused")
    fused.build(features, dtype=dtype)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(batch, steps, features, dtype=dtype)
    lengths = torch.randint(0, steps + 1, (batch,)) if case["lengths"] else None
    if lengths is not None and case["nan_padding"]:
        for b, length in enumerate(lengths.tolist()):
            x[b, length:] = float("nan")
    plan = reference.draw_dropout_plan(batch, steps=steps, training=case["training"])
    threads = torch.get_num_threads()
    torch.set_num_threads(case["threads"])
    try:
        got = run(fused, x, plan, lengths)
    finally:
        torch.set_num_threads(threads)
    want = run(reference, x, plan, lengths)
    assert fused.last_kernel.name == "fused" and reference.last_kernel.name == "reference"
    # Linear and relu activations may legitimately overflow; such draws say nothing about the kernels.
    assume(all(bool(torch.isfinite(w).all()) for w in want))
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    for g, w in zip(got, want, strict=True):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance * scale)


# ---------------------------------------------------------------------------------------------- bad arguments
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-2, 4), max_size=3), st.just(torch.zeros(2)), st.just(object()),
)


@FUZZ
@given(argument=st.sampled_from(["units", "dropout", "recurrent_dropout", "zoneout_h", "recurrent_dropout_mode",
                                 "input_dropout_mode", "activation", "seed", "impl", "input_size", "proj_size"]),
       value=ODD_VALUES, kind=st.sampled_from(["LSTM", "GRU", "SimpleRNN"]))
def test_bad_constructor_arguments_raise_droprnn_errors(argument, value, kind):
    cls = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": SimpleRNN}[kind]
    kwargs = {"units": 3, argument: value}
    if argument == "proj_size" and kind != "LSTM":
        return
    try:
        layer = cls(**kwargs)
    except DroprnnError:
        return
    # Accepted: then it must work.
    out = layer(torch.randn(2, 3, layer.input_size or 4))
    assert torch.isfinite(out).all() or argument == "activation"


@FUZZ
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16, torch.complex64]),
       lengths=st.one_of(st.none(), st.lists(st.integers(-2, 6), min_size=0, max_size=4)),
       state=st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3)),
       impl=st.sampled_from(["auto", "reference"]))
def test_bad_calls_raise_droprnn_errors_or_work(shape, dtype, lengths, state, impl):
    layer = LSTM(3, input_size=4, impl=impl, return_sequences=True, dropout=0.2, recurrent_dropout=0.2)
    x = torch.zeros(shape, dtype=dtype)
    initial = None if state is None else [torch.zeros(state), torch.zeros(state)]
    try:
        out = layer(x, lengths=lengths, initial_state=initial)
    except DroprnnError:
        return
    assert torch.isfinite(out).all()
