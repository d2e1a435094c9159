"""Training-mode dropout of the recurrent layers and the dropout-family layers.

The recurrent layers are held to an independent float64 reference written here from the Keras equations
(per-gate weight slices, implementation=1 semantics: gate g sees ``x * m_x[g]`` and ``h(t-1) * m_h[g]``
on its own block of columns; c(t-1) and the h(t-1) of GRU's ``z * h`` are never masked), fed with the
masks the layer recorded in ``last_dropout_plan``.
"""

from __future__ import annotations

import math

import pytest
import torch

import droprnn
from droprnn import CellMasks, DropoutPlan

F64 = torch.float64
B, T, D, U = 3, 5, 4, 3
TOL = 1e-10


# ----------------------------------------------------------------------------------------------------------
# Independent reference (float64, step by step, per-gate slices)
# ----------------------------------------------------------------------------------------------------------
def _gate_mask(masks, g):
    """Mask for gate g from an (m, B, F) stack, m == 1 shared; None means no dropout."""
    if masks is None:
        return None
    return masks[0] if masks.shape[0] == 1 else masks[g]


def _masked(v, masks, g):
    m = _gate_mask(masks, g)
    return v if m is None else v * m


def _cols(w, g, u):
    return w[..., g * u:(g + 1) * u]


def ref_lstm_step(x, states, w, m_in, m_rec):
    K, R, b = w
    h, c = states
    u = R.shape[0]
    z = [_masked(x, m_in, g) @ _cols(K, g, u) + _cols(b, g, u) + _masked(h, m_rec, g) @ _cols(R, g, u)
         for g in range(4)]
    i, f, o = torch.sigmoid(z[0]), torch.sigmoid(z[1]), torch.sigmoid(z[3])
    c_new = f * c + i * torch.tanh(z[2])
    h_new = o * torch.tanh(c_new)
    return h_new, (h_new, c_new)


def ref_gru_step(x, states, w, m_in, m_rec, reset_after):
    K, R, b = w
    (h,) = states
    u = R.shape[0]
    b_in = b[0] if reset_after else b
    xz, xr, xh = (_masked(x, m_in, g) @ _cols(K, g, u) + _cols(b_in, g, u) for g in range(3))
    if reset_after:
        b_rec = b[1]
        hz, hr, hh = (_masked(h, m_rec, g) @ _cols(R, g, u) + _cols(b_rec, g, u) for g in range(3))
        z = torch.sigmoid(xz + hz)
        r = torch.sigmoid(xr + hr)
        cand = torch.tanh(xh + r * hh)
    else:
        z = torch.sigmoid(xz + _masked(h, m_rec, 0) @ _cols(R, 0, u))
        r = torch.sigmoid(xr + _masked(h, m_rec, 1) @ _cols(R, 1, u))
        cand = torch.tanh(xh + (r * _masked(h, m_rec, 2)) @ _cols(R, 2, u))
    h_new = z * h + (1 - z) * cand
    return h_new, (h_new,)


def ref_simple_step(x, states, w, m_in, m_rec, activation=torch.tanh):
    K, R, b = w
    (h,) = states
    pre = _masked(x, m_in, 0) @ K + _masked(h, m_rec, 0) @ R
    if b is not None:
        pre = pre + b
    h_new = activation(pre)
    return h_new, (h_new,)


STEPS = {
    "lstm": ref_lstm_step,
    "gru": lambda *a: ref_gru_step(*a, reset_after=True),
    "gru_v1": lambda *a: ref_gru_step(*a, reset_after=False),
    "simple": ref_simple_step,
}
N_STATES = {"lstm": 2, "gru": 1, "gru_v1": 1, "simple": 1}
GATES = {"lstm": 4, "gru": 3, "gru_v1": 3, "simple": 1}


def ref_run(kinds, weights, x, init_states, plan, step_mask=None, go_backwards=False):
    """Keras's generic loop: processing order outputs, masked steps hold every state and repeat the
    previous output (zeros before the first step)."""
    batch, steps, _ = x.shape
    states = [tuple(s) for s in init_states]
    prev_out = None
    outs = []
    order = range(steps - 1, -1, -1) if go_backwards else range(steps)
    for t in order:
        y = x[:, t]
        new_states = []
        for k, kind in enumerate(kinds):
            masks = plan.cells[k]
            y, s = STEPS[kind](y, states[k], weights[k], masks.input, masks.recurrent)
            new_states.append(s)
        if prev_out is None:
            prev_out = torch.zeros_like(y)
        if step_mask is not None:
            keep = step_mask[:, t:t + 1]
            new_states = [tuple(torch.where(keep, n, o) for n, o in zip(ns, os_))
                          for ns, os_ in zip(new_states, states)]
            y = torch.where(keep, y, prev_out)
        states = new_states
        prev_out = y
        outs.append(y)
    return torch.stack(outs, 1), prev_out, states


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def make_cell(kind, units, dropout=0.0, recurrent_dropout=0.0, **kw):
    if kind == "lstm":
        return droprnn.LSTMCell(units, dropout=dropout, recurrent_dropout=recurrent_dropout, **kw)
    if kind in ("gru", "gru_v1"):
        return droprnn.GRUCell(units, dropout=dropout, recurrent_dropout=recurrent_dropout,
                               reset_after=(kind == "gru"), **kw)
    return droprnn.SimpleRNNCell(units, dropout=dropout, recurrent_dropout=recurrent_dropout, **kw)


def make_layer(kind, units=U, dropout=0.0, recurrent_dropout=0.0, seed=None, dtype=F64, input_size=D, **kw):
    common = dict(dropout=dropout, recurrent_dropout=recurrent_dropout, seed=seed, return_sequences=True,
                  return_state=True, input_size=input_size, dtype=dtype, **kw)
    if kind == "lstm":
        return droprnn.LSTM(units, **common)
    if kind in ("gru", "gru_v1"):
        return droprnn.GRU(units, reset_after=(kind == "gru"), **common)
    return droprnn.SimpleRNN(units, **common)


def randomize(layer, scale=0.6, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return layer


def layer_weights(layer, kinds):
    ws = [torch.as_tensor(w, dtype=F64) for w in layer.get_weights()]
    assert len(ws) == 3 * len(kinds)
    return [tuple(ws[3 * k:3 * k + 3]) for k in range(len(kinds))]


def split_result(result):
    """(output, states) from a one-cell RNN's return_state result."""
    out, *states = result
    return out, tuple(states)


def scale_of(p, dtype):
    return torch.tensor(1.0, dtype=dtype) / (1 - p)


def assert_mask_values(m, p):
    s = scale_of(p, m.dtype)
    assert bool(((m == 0) | (m == s)).all()), "mask entries must be 0 or 1/(1-p)"


def expected_counts(kind, dropout, recurrent_dropout):
    g = GATES[kind]
    n_in = (g if recurrent_dropout > 0 else 1) if dropout > 0 else 0
    n_rec = g if recurrent_dropout > 0 else 0
    return n_in, n_rec


RATES = [(0.3, 0.0), (0.0, 0.4), (0.3, 0.4)]
KINDS = ["lstm", "gru", "gru_v1", "simple"]
VARIANTS = ["plain", "backwards", "lengths", "backwards_lengths_init"]


# ----------------------------------------------------------------------------------------------------------
# 1. Training outputs equal the reference with the recorded masks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rates", RATES, ids=lambda r: f"d{r[0]}-rd{r[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_training_output_matches_reference(kind, rates, variant):
    p, rp = rates
    backwards = "backwards" in variant
    layer = randomize(make_layer(kind, dropout=p, recurrent_dropout=rp, go_backwards=backwards))
    x = torch.randn(B, T, D, dtype=F64)
    kwargs = {}
    lengths = None
    if "lengths" in variant:
        lengths = torch.tensor([T, 2, 0])
        kwargs["lengths"] = lengths
    n_states = N_STATES[kind]
    init = tuple(torch.randn(B, U, dtype=F64) for _ in range(n_states))
    if "init" in variant:
        kwargs["initial_state"] = list(init)
    else:
        init = tuple(torch.zeros(B, U, dtype=F64) for _ in range(n_states))

    result = layer(x, training=True, **kwargs)
    out, states = split_result(result)
    plan = layer.last_dropout_plan
    assert isinstance(plan, DropoutPlan) and len(plan.cells) == 1

    # plan structure: (m, B, F) masks, m as Keras, entries 0 or 1/(1-p)
    n_in, n_rec = expected_counts(kind, p, rp)
    cm = plan.cells[0]
    if n_in:
        assert tuple(cm.input.shape) == (n_in, B, D)
        assert cm.input.dtype == F64
        assert_mask_values(cm.input, p)
    else:
        assert cm.input is None
    if n_rec:
        assert tuple(cm.recurrent.shape) == (n_rec, B, U)
        assert_mask_values(cm.recurrent, rp)
    else:
        assert cm.recurrent is None

    step_mask = None if lengths is None else torch.arange(T)[None, :] < lengths[:, None]
    ref_seq, ref_last, ref_states = ref_run([kind], layer_weights(layer, [kind]), x, [init], plan,
                                            step_mask, go_backwards=backwards)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref_seq, rtol=0, atol=TOL)
    assert len(states) == n_states
    for got, want in zip(states, ref_states[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)

    # the masks mattered: the no-dropout reference is different
    empty = DropoutPlan((CellMasks(),))
    nodrop_seq, _, _ = ref_run([kind], layer_weights(layer, [kind]), x, [init], empty, step_mask, backwards)
    assert (nodrop_seq - ref_seq).abs().max() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_double_converted_layer_matches_reference(kind):
    """A float32 layer converted with .double() runs in float64 and still equals the reference."""
    layer = make_layer(kind, dropout=0.25, recurrent_dropout=0.35, dtype=torch.float32)
    layer = randomize(layer.double())
    x = torch.randn(B, T, D, dtype=F64)
    out, states = split_result(layer(x, training=True))
    plan = layer.last_dropout_plan
    assert plan.cells[0].input.dtype == F64
    init = [tuple(torch.zeros(B, U, dtype=F64) for _ in range(N_STATES[kind]))]
    ref_seq, _, ref_states = ref_run([kind], layer_weights(layer, [kind]), x, init, plan)
    torch.testing.assert_close(out, ref_seq, rtol=0, atol=TOL)
    for got, want in zip(states, ref_states[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("backwards", [False, True])
def test_stacked_cells_match_reference_and_mask_shapes(backwards):
    kinds = ["lstm", "gru_v1", "simple"]
    units = [5, 4, 2]
    rates = [(0.3, 0.2), (0.25, 0.35), (0.2, 0.0)]
    cells = [make_cell(k, u, dropout=p, recurrent_dropout=rp) for k, u, (p, rp) in zip(kinds, units, rates)]
    layer = droprnn.RNN(cells, return_sequences=True, return_state=True, go_backwards=backwards,
                        input_size=D, dtype=F64)
    randomize(layer)
    x = torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([T, 3, 1])
    out, *final = layer(x, lengths=lengths, training=True)
    plan = layer.last_dropout_plan
    assert len(plan.cells) == 3
    in_sizes = [D] + units[:-1]
    for k, (kind, (p, rp)) in enumerate(zip(kinds, rates)):
        n_in, n_rec = expected_counts(kind, p, rp)
        cm = plan.cells[k]
        assert tuple(cm.input.shape) == (n_in, B, in_sizes[k])  # cell k > 0: (m, B, units_{k-1})
        if n_rec:
            assert tuple(cm.recurrent.shape) == (n_rec, B, units[k])
        else:
            assert cm.recurrent is None
    init = [tuple(torch.zeros(B, u, dtype=F64) for _ in range(N_STATES[k])) for k, u in zip(kinds, units)]
    step_mask = torch.arange(T)[None, :] < lengths[:, None]
    ref_seq, _, ref_states = ref_run(kinds, layer_weights(layer, kinds), x, init, plan, step_mask, backwards)
    torch.testing.assert_close(out, ref_seq, rtol=0, atol=TOL)
    assert len(final) == 3
    for got_cell, want_cell in zip(final, ref_states):
        for got, want in zip(got_cell, want_cell):
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# 2. Mask statistics and structure
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rates", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.3, 0.3)],
                         ids=lambda r: f"d{r[0]}-rd{r[1]}")
def test_mask_counts_and_distinct_per_gate(kind, rates):
    p, rp = rates
    layer = make_layer(kind, dropout=p, recurrent_dropout=rp)
    x = torch.randn(16, 2, D, dtype=F64)
    layer(x, training=True)
    cm = layer.last_dropout_plan.cells[0]
    n_in, n_rec = expected_counts(kind, p, rp)
    if p == 0 and rp == 0:
        assert cm.input is None and cm.recurrent is None and layer.last_dropout_plan.empty
        return
    for masks, n, feats in ((cm.input, n_in, D), (cm.recurrent, n_rec, U)):
        if n == 0:
            assert masks is None
            continue
        assert tuple(masks.shape) == (n, 16, feats)
        for a in range(n):
            for b in range(a + 1, n):
                assert not torch.equal(masks[a], masks[b]), f"gate masks {a} and {b} are identical"


def test_masks_differ_across_samples_features_and_calls():
    layer = make_layer("lstm", dropout=0.5, recurrent_dropout=0.5)
    x = torch.randn(64, 2, D, dtype=F64)
    layer(x, training=True)
    first = layer.last_dropout_plan.cells[0]
    for masks in (first.input, first.recurrent):
        m = masks[0]
        rows_differ = (m != m[0:1]).any(dim=1).sum().item()
        assert rows_differ > 32, "masks must be drawn per sample"
        cols_differ = (m != m[:, 0:1]).any(dim=0).sum().item()
        assert cols_differ >= 1, "masks must be drawn per feature"
    layer(x, training=True)
    second = layer.last_dropout_plan.cells[0]
    assert not torch.equal(first.input, second.input)
    assert not torch.equal(first.recurrent, second.recurrent)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.7])
def test_keep_rate_within_binomial_bounds(p):
    batch, feats = 4000, 25
    layer = droprnn.LSTM(feats, dropout=p, recurrent_dropout=p, input_size=feats, dtype=torch.float32)
    layer(torch.randn(batch, 1, feats), training=True)
    cm = layer.last_dropout_plan.cells[0]
    n = batch * feats
    bound = 5 * math.sqrt(p * (1 - p) / n)
    for masks in (cm.input, cm.recurrent):
        assert masks.shape[0] == 4
        for m in masks:
            keep = (m != 0).double().mean().item()
            assert abs(keep - (1 - p)) < bound, (keep, 1 - p, bound)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [0.3, 0.1, 0.5])
def test_nonzero_mask_values_are_exactly_inverse_keep(dtype, p):
    layer = make_layer("gru", dropout=p, recurrent_dropout=p, dtype=dtype)
    layer(torch.randn(50, 2, D, dtype=dtype), training=True)
    cm = layer.last_dropout_plan.cells[0]
    s = scale_of(p, dtype)
    for masks in (cm.input, cm.recurrent):
        assert masks.dtype == dtype
        nonzero = masks[masks != 0]
        assert nonzero.numel() > 0
        assert bool((nonzero == s).all())


def _identity_simple_rnn(p=0.0, rp=0.0, recurrent_identity=False, features=10):
    layer = droprnn.SimpleRNN(features, activation=None, dropout=p, recurrent_dropout=rp,
                              return_sequences=True, input_size=features, dtype=F64)
    with torch.no_grad():
        layer.cell.kernel.copy_(torch.eye(features, dtype=F64))
        layer.cell.recurrent_kernel.copy_(torch.eye(features, dtype=F64) if recurrent_identity
                                          else torch.zeros(features, features, dtype=F64))
        layer.cell.bias.zero_()
    return layer


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_input_mask_constant_over_time_by_effect(p):
    """kernel = I, recurrent kernel = 0, no bias, linear: output_t = x_t * mask, the same mask at all t."""
    layer = _identity_simple_rnn(p=p)
    x = torch.rand(32, 6, 10, dtype=F64) + 0.5
    y = layer(x, training=True)
    dropped = y == 0
    assert dropped.any() and (~dropped).any()
    for t in range(x.shape[1]):
        assert torch.equal(dropped[:, t], dropped[:, 0]), f"dropped features at t={t} differ from t=0"
    s = scale_of(p, F64)
    torch.testing.assert_close(y, x * torch.where(dropped, 0.0, s), rtol=0, atol=1e-15)
    m = layer.last_dropout_plan.cells[0].input
    assert tuple(m.shape) == (1, 32, 10)
    assert torch.equal(~dropped[:, 0], m[0] != 0)


def test_recurrent_mask_constant_over_time_by_effect():
    """kernel = I, recurrent = I, linear, x = 1: h_t = 1 + m * h_{t-1}. A feature whose mask is 0 stays at 1
    for every t; a kept one grows as 1 + s + s^2 + ...; a per-step mask would mix the two."""
    p = 0.5
    layer = _identity_simple_rnn(rp=p, recurrent_identity=True)
    x = torch.ones(40, 5, 10, dtype=F64)
    y = layer(x, training=True)
    m = layer.last_dropout_plan.cells[0].recurrent[0]
    s = float(scale_of(p, F64))
    dropped = m == 0
    assert dropped.any() and (~dropped).any()
    for t in range(5):
        kept_value = sum(s ** k for k in range(t + 1))
        expected = torch.where(dropped, torch.tensor(1.0, dtype=F64), torch.tensor(kept_value, dtype=F64))
        torch.testing.assert_close(y[:, t], expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_v1"])
def test_dropped_inputs_have_no_effect_at_any_step(kind):
    """With one shared input mask, perturbing a dropped feature of a sample at every timestep leaves the
    output unchanged; perturbing a kept feature changes it."""
    layer = randomize(make_layer(kind, dropout=0.5))
    x = torch.randn(8, T, D, dtype=F64)
    out, *_ = layer(x, training=True)
    plan = layer.last_dropout_plan
    m = plan.cells[0].input
    assert m.shape[0] == 1
    dropped = (m[0] == 0)[:, None, :].expand(-1, T, -1)
    assert dropped.any() and (~dropped).any()
    noise = torch.randn_like(x)
    out_dropped, *_ = layer(x + noise * dropped, dropout_plan=plan)
    torch.testing.assert_close(out_dropped, out, rtol=0, atol=0)
    out_kept, *_ = layer(x + noise * (~dropped), dropout_plan=plan)
    assert (out_kept - out).abs().max() > 1e-6


def test_replayed_plan_reproduces_output_and_is_per_call():
    layer = randomize(make_layer("lstm", dropout=0.3, recurrent_dropout=0.3))
    x = torch.randn(B, T, D, dtype=F64)
    out1, *_ = layer(x, training=True)
    plan = layer.last_dropout_plan
    out_replay, *_ = layer(x, dropout_plan=plan)
    assert layer.last_dropout_plan is plan
    torch.testing.assert_close(out_replay, out1, rtol=0, atol=0)
    drawn = layer.draw_dropout_plan(B)
    assert tuple(drawn.cells[0].input.shape) == (4, B, D)
    assert tuple(drawn.cells[0].recurrent.shape) == (4, B, U)
    out2, *_ = layer(x, dropout_plan=drawn)
    assert not torch.equal(out2, out1)


# ----------------------------------------------------------------------------------------------------------
# 3. Training switch
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_applies_nothing(kind):
    layer = randomize(make_layer(kind, dropout=0.4, recurrent_dropout=0.4))
    plain = make_layer(kind)
    plain.set_weights(layer.get_weights())
    x = torch.randn(B, T, D, dtype=F64)
    want = plain(x)
    layer.eval()
    got = layer(x)
    assert layer.last_dropout_plan.empty
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    layer.train()
    got_false = layer(x, training=False)  # training=False overrides train mode
    assert layer.last_dropout_plan.empty
    for g, w in zip(got_false, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    got_train = layer(x)  # train mode follows .train()
    assert not layer.last_dropout_plan.empty
    assert not torch.equal(got_train[0], want[0])


@pytest.mark.parametrize("kind", KINDS)
def test_training_true_overrides_eval_mode(kind):
    layer = randomize(make_layer(kind, dropout=0.4, recurrent_dropout=0.4)).eval()
    x = torch.randn(B, T, D, dtype=F64)
    ev = layer(x)
    out, *states = layer(x, training=True)
    plan = layer.last_dropout_plan
    assert not plan.empty
    assert not torch.equal(out, ev[0])
    init = [tuple(torch.zeros(B, U, dtype=F64) for _ in range(N_STATES[kind]))]
    ref_seq, _, _ = ref_run([kind], layer_weights(layer, [kind]), x, init, plan)
    torch.testing.assert_close(out, ref_seq, rtol=0, atol=TOL)


def test_seeded_stream_advances_in_eval_like_keras():
    """Keras draws the masks even at inference, so a seeded layer's next training call uses later draws."""
    x = torch.randn(B, T, D, dtype=F64)
    a = randomize(make_layer("lstm", dropout=0.3, recurrent_dropout=0.3, seed=11))
    b = randomize(make_layer("lstm", dropout=0.3, recurrent_dropout=0.3, seed=11))
    b_first, *_ = b(x, training=True)
    b_second, *_ = b(x, training=True)
    a(x, training=False)
    a_train, *_ = a(x, training=True)
    torch.testing.assert_close(a_train, b_second, rtol=0, atol=0)
    assert not torch.equal(a_train, b_first)


# ----------------------------------------------------------------------------------------------------------
# 4. Recurrent masks never touch the carried state
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_zero_recurrent_masks_cut_only_the_recurrent_kernel(kind):
    layer = randomize(make_layer(kind, dropout=0.0, recurrent_dropout=0.5))
    x = torch.randn(B, T, D, dtype=F64)
    init = [torch.randn(B, U, dtype=F64) * 2 for _ in range(N_STATES[kind])]
    zeros_plan = DropoutPlan((CellMasks(recurrent=torch.zeros(GATES[kind], B, U, dtype=F64)),))
    out, *states = layer(x, initial_state=init, dropout_plan=zeros_plan)

    # h(t-1) reaches nothing through R: same as a layer whose recurrent kernel is zero (no dropout)
    no_r = make_layer(kind)
    weights = layer.get_weights()
    weights[1] = weights[1] * 0
    no_r.set_weights(weights)
    out_no_r, *states_no_r = no_r(x, initial_state=init)
    torch.testing.assert_close(out, out_no_r, rtol=0, atol=TOL)
    for g, w in zip(states, states_no_r):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL)

    # and equals the reference
    ref_seq, _, ref_states = ref_run([kind], layer_weights(layer, [kind]), x, [tuple(init)], zeros_plan)
    torch.testing.assert_close(out, ref_seq, rtol=0, atol=TOL)

    # the carried state still matters (c for LSTM, z * h(t-1) for GRU): a different initial state changes
    # the first output although the recurrent kernel is cut off
    if kind != "simple":
        init2 = [s + 1.0 for s in init]
        out2, *_ = layer(x, initial_state=init2, dropout_plan=zeros_plan)
        assert (out2[:, 0] - out[:, 0]).abs().max() > 1e-6
    else:
        init2 = [s + 1.0 for s in init]
        out2, *_ = layer(x, initial_state=init2, dropout_plan=zeros_plan)
        torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_lstm_cell_state_carries_under_zero_recurrent_masks():
    """c(t) = f c(t-1) + i g: with all recurrent masks zero, c must still accumulate (a masked c would reset)."""
    layer = randomize(make_layer("lstm", recurrent_dropout=0.5))
    x = torch.randn(B, T, D, dtype=F64)
    h0, c0 = torch.randn(B, U, dtype=F64), torch.randn(B, U, dtype=F64)
    zeros_plan = DropoutPlan((CellMasks(recurrent=torch.zeros(4, B, U, dtype=F64)),))
    out, h, c = layer(x, initial_state=[h0, c0], dropout_plan=zeros_plan)
    K, R, bias = layer_weights(layer, ["lstm"])[0]
    c_run = c0
    for t in range(T):
        z = x[:, t] @ K + bias  # h contributes nothing
        i, f, g, o = torch.sigmoid(z[:, :U]), torch.sigmoid(z[:, U:2 * U]), torch.tanh(z[:, 2 * U:3 * U]), \
            torch.sigmoid(z[:, 3 * U:])
        c_run = f * c_run + i * g
        torch.testing.assert_close(out[:, t], o * torch.tanh(c_run), rtol=0, atol=TOL)
    torch.testing.assert_close(c, c_run, rtol=0, atol=TOL)
    # a reset c would be i * g only: make sure that differs, so the check above can fail
    assert (c - i * g).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------------------
# 5. Seeds
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_same_training_output(kind):
    x = torch.randn(B, T, D, dtype=F64)
    a = randomize(make_layer(kind, dropout=0.3, recurrent_dropout=0.3, seed=42))
    b = make_layer(kind, dropout=0.3, recurrent_dropout=0.3, seed=42)
    b.set_weights(a.get_weights())
    torch.manual_seed(1)
    ya = [a(x, training=True)[0] for _ in range(2)]
    torch.manual_seed(2)  # the global RNG must not matter to seeded layers
    yb = [b(x, training=True)[0] for _ in range(2)]
    for u, v in zip(ya, yb):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not torch.equal(ya[0], ya[1]), "each call draws fresh masks"
    c = make_layer(kind, dropout=0.3, recurrent_dropout=0.3, seed=43)
    c.set_weights(a.get_weights())
    yc = c(x, training=True)[0]
    assert not torch.equal(yc, ya[0])


@pytest.mark.parametrize("kind", ["lstm", "simple"])
def test_unseeded_layer_follows_torch_manual_seed(kind):
    layer = randomize(make_layer(kind, dropout=0.3, recurrent_dropout=0.3))
    x = torch.randn(B, T, D, dtype=F64)
    torch.manual_seed(123)
    y1 = layer(x, training=True)[0]
    y_next = layer(x, training=True)[0]
    torch.manual_seed(123)
    y2 = layer(x, training=True)[0]
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y1, y_next)
    torch.manual_seed(124)
    assert not torch.equal(layer(x, training=True)[0], y1)


# ----------------------------------------------------------------------------------------------------------
# 6. Dropout family
# ----------------------------------------------------------------------------------------------------------
def _positive(*shape, dtype=F64):
    return torch.rand(*shape, dtype=dtype) + 0.5


def test_dropout_default_elementwise_and_scale():
    p = 0.3
    x = _positive(20, 7, 6)
    y = droprnn.Dropout(p)(x, training=True)
    kept = y != 0
    s = scale_of(p, F64)
    torch.testing.assert_close(y[kept], (x / (1 - p))[kept], rtol=0, atol=0)
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(y[kept] / x[kept], s.expand(int(kept.sum())), rtol=1e-15, atol=0)
    # the mask varies over time and features (full noise shape)
    assert not all(torch.equal(kept[:, t], kept[:, 0]) for t in range(7))


def test_dropout_noise_shape_constant_over_time():
    x = _positive(16, 9, 6)
    y = droprnn.Dropout(0.5, noise_shape=(None, 1, None))(x, training=True)
    kept = y != 0
    assert kept.any() and (~kept).any()
    for t in range(9):
        assert torch.equal(kept[:, t], kept[:, 0])
    torch.testing.assert_close(y, torch.where(kept, x / 0.5, 0.0), rtol=0, atol=0)


def test_dropout_noise_shape_drops_whole_timesteps():
    x = _positive(16, 9, 6)
    p = 0.4
    y = droprnn.Dropout(p, noise_shape=(None, None, 1))(x, training=True)
    zero_step = (y == 0).all(-1)
    kept_step = (y != 0).all(-1)
    assert bool((zero_step | kept_step).all()), "each timestep is either dropped entirely or kept entirely"
    assert zero_step.any() and kept_step.any()
    torch.testing.assert_close(y[kept_step], x[kept_step] * scale_of(p, F64), rtol=1e-15, atol=0)


def test_dropout_noise_shape_explicit_ints():
    x = _positive(4, 10, 6)
    y = droprnn.Dropout(0.5, noise_shape=(4, 1, 6))(x, training=True)
    kept = y != 0
    for t in range(10):
        assert torch.equal(kept[:, t], kept[:, 0])
    y2 = droprnn.Dropout(0.5, noise_shape=(1, 10, 1))(x, training=True)
    kept2 = y2 != 0
    for b in range(4):
        assert torch.equal(kept2[b], kept2[0]), "a size-1 batch axis shares the mask across samples"
    for f in range(6):
        assert torch.equal(kept2[..., f], kept2[..., 0])
    with pytest.raises(droprnn.DroprnnError):
        droprnn.Dropout(0.5, noise_shape=(4, 3, 6))(x, training=True)


def test_spatial_dropout_1d_drops_whole_channels():
    x = _positive(16, 8, 12)
    p = 0.5
    y = droprnn.SpatialDropout1D(p)(x, training=True)
    zero_ch = (y == 0).all(1)
    kept_ch = (y != 0).all(1)
    assert bool((zero_ch | kept_ch).all())
    assert zero_ch.any() and kept_ch.any()
    per_sample = zero_ch.float()
    assert not bool((per_sample == per_sample[0:1]).all()), "channel masks differ per sample"
    torch.testing.assert_close(y, torch.where(kept_ch[:, None, :], x / (1 - p), 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("layer_cls", [droprnn.Dropout, droprnn.SpatialDropout1D, droprnn.AlphaDropout])
def test_rate_zero_is_identity(layer_cls):
    x = torch.randn(4, 5, 6, dtype=F64)
    assert torch.equal(layer_cls(0.0)(x, training=True), x)


def test_dropout_rate_one_gives_zeros():
    x = torch.randn(4, 5, 6, dtype=F64)
    assert torch.equal(droprnn.Dropout(1.0)(x, training=True), torch.zeros_like(x))
    assert torch.equal(droprnn.SpatialDropout1D(1.0)(x, training=True), torch.zeros_like(x))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_dropout_rate_out_of_range_raises(rate):
    with pytest.raises(droprnn.DroprnnError):
        droprnn.Dropout(rate)


def test_dropout_passes_mask_through_sequential():
    x = torch.randn(4, 6, 3, dtype=F64)
    lengths = torch.tensor([6, 4, 2, 1])
    step_mask = torch.arange(6)[None, :] < lengths[:, None]
    x = torch.where(step_mask[..., None], x, 0.0)  # padded steps are zero vectors for Masking
    drop = droprnn.Dropout(0.5, seed=3)
    assert drop.compute_mask(x, step_mask) is step_mask
    rnn = droprnn.SimpleRNN(4, return_sequences=True, input_size=3, dtype=F64)
    model = droprnn.Sequential([droprnn.Masking(), drop, rnn])

    model.eval()  # Dropout is identity; the RNN must still see the mask Masking made
    got = model(x)
    want = rnn(x, mask=step_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    unmasked = rnn(x)
    assert not torch.equal(got, unmasked)

    model.train()  # Dropout active: output equals dropout (same seed) then the RNN with the original mask
    got_train = model(x)
    twin = droprnn.Dropout(0.5, seed=3)
    want_train = rnn(twin(x, training=True), mask=step_mask, training=True)
    torch.testing.assert_close(got_train, want_train, rtol=0, atol=0)
    # after dropout the features of a real step may all be zero; the mask still comes from the raw input
    assert not torch.equal(got_train, got)


def test_gaussian_dropout_multiplier_statistics():
    p = 0.3
    n = 400_000
    y = droprnn.GaussianDropout(p)(torch.ones(n, dtype=F64), training=True)
    std = math.sqrt(p / (1 - p))
    assert abs(y.mean().item() - 1.0) < 5 * std / math.sqrt(n)
    assert abs(y.std().item() - std) < 5 * std / math.sqrt(2 * n) + 1e-3
    x = torch.randn(1000, dtype=F64)
    y2 = droprnn.GaussianDropout(p)(x, training=True)
    assert not torch.equal(y2, x)


def test_gaussian_noise_std():
    sd = 0.4
    n = 400_000
    x = torch.full((n,), 3.0, dtype=F64)
    y = droprnn.GaussianNoise(sd)(x, training=True) - x
    assert abs(y.mean().item()) < 5 * sd / math.sqrt(n)
    assert abs(y.std().item() - sd) < 5 * sd / math.sqrt(2 * n) + 1e-3


def test_alpha_dropout_moments_and_dropped_value():
    p = 0.2
    n = 400_000
    x = torch.randn(n, dtype=F64)
    y = droprnn.AlphaDropout(p)(x, training=True)
    assert abs(y.mean().item()) < 0.02
    assert abs(y.var().item() - 1.0) < 0.03
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    alpha_p = -alpha * scale
    a = ((1 - p) * (1 + p * alpha_p ** 2)) ** -0.5
    b = -a * alpha_p * p
    dropped_value = a * alpha_p + b
    dropped = (y - dropped_value).abs() < 1e-12
    frac = dropped.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(y[~dropped], a * x[~dropped] + b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda: droprnn.Dropout(0.5), lambda: droprnn.Dropout(0.5, noise_shape=(None, 1, None)),
    lambda: droprnn.SpatialDropout1D(0.5), lambda: droprnn.GaussianDropout(0.5),
    lambda: droprnn.GaussianNoise(0.5), lambda: droprnn.AlphaDropout(0.5),
], ids=["dropout", "dropout_noise_shape", "spatial", "gaussian_dropout", "gaussian_noise", "alpha"])
def test_dropout_family_identity_at_eval(make):
    layer = make()
    x = torch.randn(4, 5, 6, dtype=F64)
    assert not torch.equal(layer(x, training=True), x)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    assert torch.equal(layer(x, training=False), x)
    assert not torch.equal(layer(x), x)  # train mode follows .train()


def test_dropout_family_seeded_reproducible():
    x = torch.randn(4, 5, 6, dtype=F64)
    for make in (lambda s: droprnn.Dropout(0.5, seed=s), lambda s: droprnn.GaussianNoise(0.5, seed=s),
                 lambda s: droprnn.AlphaDropout(0.3, seed=s)):
        a, b, c = make(9), make(9), make(10)
        ya = a(x, training=True)
        assert torch.equal(ya, b(x, training=True))
        assert not torch.equal(ya, c(x, training=True))


# ----------------------------------------------------------------------------------------------------------
# 7. MC dropout
# ----------------------------------------------------------------------------------------------------------
def test_mc_dropout_in_eval_mode():
    model = droprnn.Sequential([
        droprnn.LSTM(8, dropout=0.3, recurrent_dropout=0.3, return_sequences=True, input_size=D, dtype=F64),
        droprnn.Dropout(0.2),
        droprnn.GRU(4, dropout=0.2, recurrent_dropout=0.2, dtype=F64),
        droprnn.Dense(1, dtype=F64),
    ])
    model.eval()
    x = torch.randn(B, T, D, dtype=F64)
    det1, det2 = model(x), model(x)
    torch.testing.assert_close(det1, det2, rtol=0, atol=0)
    y1 = model(x, training=True)
    y2 = model(x, training=True)
    assert not torch.equal(y1, y2)
    samples = torch.stack([model(x, training=True) for _ in range(30)])
    mean = samples.mean(0)
    assert bool(torch.isfinite(mean).all())
    assert samples.std(0).min() > 0
    assert not model.training and not model[0].training
    # the single layer form too
    lstm = model[0]
    a, b = lstm(x, training=True), lstm(x, training=True)
    assert not torch.equal(a, b)


def test_dropout_argument_and_spatial_dropout_draw_the_same_masks_from_the_global_rng():
    """Without recurrent dropout the layer's input mask is one channel mask per sequence, as SpatialDropout1D's:
    from the same global RNG state they are the same draws, on any CPU (torch's scalar-probability Bernoulli
    draws with MKL on Intel CPUs and mt19937 elsewhere, so the masks avoid it)."""
    from droprnn.dropout.plan import draw_cell_masks

    spatial = droprnn.SpatialDropout1D(0.3)
    torch.manual_seed(1)
    channels = spatial(torch.ones(4, 5, 12), training=True)[:, 0] != 0
    cell = droprnn.LSTMCell(8, dropout=0.3, input_size=12)
    torch.manual_seed(1)
    masks = draw_cell_masks(cell, 4, 12, True, torch.float32, torch.device("cpu"))
    assert masks.input.shape == (1, 4, 12)
    assert torch.equal(masks.input[0] != 0, channels)
    assert 0 < int(channels.sum()) < channels.numel()
