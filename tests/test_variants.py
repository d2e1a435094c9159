"""The recurrent-dropout variants on LSTM, GRU (reset_after True and False) and SimpleRNN.

For each variant (``recurrent_dropout_mode`` keras / tied / per_step / update / update_per_step / weights /
weights_per_unit, ``input_dropout_mode`` keras / shared / per_gate / per_step, ``zoneout_h`` / ``zoneout_c``,
LSTM ``proj_size``):

1. the defining property on the recorded masks (``last_dropout_plan``) and by its effect;
2. equality with an independent float64 reference loop written here from the equations (per-gate weight
   slices, no droprnn math), fed with the recorded masks, go_backwards and length masks included;
3. ``torch.autograd.gradcheck`` through ``torch.func.functional_call`` with a fixed, replayed plan;
4. eval mode (identity for dropout, expectation for zoneout; ``training=True`` overrides);
5. the errors for invalid combinations; 6. combinations and stacked cells; 7. seeds; 8. proj_size.

Reference conventions (the plan's, see droprnn.dropout.plan): per-step masks carry a leading time axis indexed by the
PROCESSING step (after the go_backwards reversal); zoneout indicator d = 1 keeps the old value,
``new = d * old + (1 - d) * fresh``, applied before the sequence-mask carry; the step output is the zoned h.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import droprnn
from droprnn.dropout import modes as registry
from droprnn import DropoutPlan, DroprnnError

F64 = torch.float64
B, T, D, U = 3, 5, 4, 3
TOL = 1e-10

KINDS = ["lstm", "gru", "gru_v1", "simple"]  # gru: reset_after=True (default), gru_v1: reset_after=False
GATES = {"lstm": 4, "gru": 3, "gru_v1": 3, "simple": 1}
REC_MODES = list(registry.RECURRENT)
INPUT_MODES = list(registry.INPUT)
UPDATE_MODES = registry.UPDATE_MODES
PER_STEP_REC = tuple(name for name, mode in registry.RECURRENT.items() if mode.per_step)


def rec_cases(kinds=KINDS, modes=REC_MODES):
    return [(k, m) for k in kinds for m in modes if not (k == "simple" and m in UPDATE_MODES)]


def EXPECTED_SHAPES(g, H):  # noqa: N802 - a table, written out by hand: the plan's shapes are what is tested
    return {"keras": (g, B, H), "tied": (1, B, H), "per_step": (T, g, B, H), "update": (B, U),
            "update_per_step": (T, B, U), "weights": (H, g * U), "weights_per_unit": (H, 1)}


def test_every_registered_mode_has_its_expected_mask_shape_here():
    assert set(EXPECTED_SHAPES(4, U)) == set(registry.RECURRENT), "a new mode needs its row in EXPECTED_SHAPES"


# ----------------------------------------------------------------------------------------------------------
# Construction helpers
# ----------------------------------------------------------------------------------------------------------
def randomize(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make(kind, units=U, input_size=D, weight_seed=0, **kwargs):
    """A float64 layer with random weights (biases included), returning sequences and states."""
    opts = dict(return_sequences=True, return_state=True, input_size=input_size, dtype=F64)
    opts.update(kwargs)
    if kind == "lstm":
        layer = droprnn.LSTM(units, **opts)
    elif kind == "gru":
        layer = droprnn.GRU(units, **opts)
    elif kind == "gru_v1":
        layer = droprnn.GRU(units, reset_after=False, **opts)
    else:
        layer = droprnn.SimpleRNN(units, **opts)
    randomize(layer, weight_seed)
    return layer


def twin_of(kind, layer, units=U, **kwargs):
    """The same layer without any dropout / zoneout, with the same weights."""
    twin = make(kind, units=units, **kwargs)
    twin.load_state_dict(layer.state_dict())
    return twin


def data(*shape, seed=1, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def init_states(kind, batch=B, units=U, proj=0, seed=20):
    h = data(batch, proj or units, seed=seed, scale=0.7)
    if kind == "lstm":
        return [h, data(batch, units, seed=seed + 1, scale=1.5)]
    return [h]


def weights_of(cell):
    """A cell's parameters as plain float64 tensors in Keras layout: K, R, b (and P)."""
    ws = [p.detach().clone() for p in cell.keras_weights()]
    return SimpleNamespace(K=ws[0], R=ws[1], b=ws[2], P=ws[3] if len(ws) > 3 else None)


def replace_masks(plan, k=0, **fields):
    cells = list(plan.cells)
    cells[k] = dataclasses.replace(cells[k], **fields)
    return DropoutPlan(tuple(cells))


def dropout_values_ok(mask, p):
    return bool(torch.all((mask == 0) | (mask == 1.0 / (1.0 - p))))


def as_list(out):
    return [out] if torch.is_tensor(out) else list(out)


# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------------------
def _pick(masks, g):
    """Gate g's mask from an (m, B, F) stack (m == 1: shared); None: no mask."""
    if masks is None:
        return None
    return masks[0] if masks.shape[0] == 1 else masks[g]


def _m(v, masks, g):
    m = _pick(masks, g)
    return v if m is None else v * m


def _cols(w, g, u):
    return w[..., g * u:(g + 1) * u]


def ref_step(kind, W, x, states, m_in, m_rec, m_upd, R):
    """One transition (before zoneout). R is the (possibly DropConnect-masked) recurrent kernel."""
    K, b = W.K, W.b
    if kind == "lstm":
        h, c = states
        u = c.shape[-1]
        z = [_m(x, m_in, g) @ _cols(K, g, u) + _cols(b, g, u) + _m(h, m_rec, g) @ _cols(R, g, u) for g in range(4)]
        i, f, o = torch.sigmoid(z[0]), torch.sigmoid(z[1]), torch.sigmoid(z[3])
        g_ = torch.tanh(z[2])
        if m_upd is not None:
            g_ = g_ * m_upd
        c_new = f * c + i * g_
        h_new = o * torch.tanh(c_new)
        if W.P is not None:
            h_new = h_new @ W.P
        return [h_new, c_new]
    if kind in ("gru", "gru_v1"):
        (h,) = states
        u = h.shape[-1]
        b_in = b[0] if kind == "gru" else b
        xz, xr, xh = (_m(x, m_in, g) @ _cols(K, g, u) + _cols(b_in, g, u) for g in range(3))
        if kind == "gru":
            hz, hr, hh = (_m(h, m_rec, g) @ _cols(R, g, u) + _cols(b[1], g, u) for g in range(3))
            z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            cand = torch.tanh(xh + r * hh)
        else:
            z = torch.sigmoid(xz + _m(h, m_rec, 0) @ _cols(R, 0, u))
            r = torch.sigmoid(xr + _m(h, m_rec, 1) @ _cols(R, 1, u))
            cand = torch.tanh(xh + (r * _m(h, m_rec, 2)) @ _cols(R, 2, u))
        if m_upd is not None:
            cand = cand * m_upd
        return [z * h + (1 - z) * cand]
    (h,) = states
    assert m_upd is None
    return [torch.tanh(_m(x, m_in, 0) @ K + b + _m(h, m_rec, 0) @ R)]


def _timed(mask, t, per_sequence_dim):
    if mask is None or mask.dim() == per_sequence_dim:
        return mask
    return mask[t]


def ref_run(kinds, Ws, masks, x, init, go_backwards=False, lengths=None):
    """Stacked reference loop. masks: per cell an object with input/recurrent/update/recurrent_kernel/zoneout.

    Returns (outputs (B, T, O) in processing order, final states per cell)."""
    batch, steps, _ = x.shape
    order = list(range(steps))[::-1] if go_backwards else list(range(steps))
    keep = None if lengths is None else torch.arange(steps)[None, :] < torch.as_tensor(lengths)[:, None]
    states = [list(s) for s in init]
    prev = None
    outs = []
    for t, src in enumerate(order):  # t: processing step (indexes per-step masks); src: original time index
        y = x[:, src]
        fresh_all = []
        for k, (kind, W, M) in enumerate(zip(kinds, Ws, masks)):
            R = W.R if M.recurrent_kernel is None else W.R * M.recurrent_kernel
            fresh = ref_step(kind, W, y, states[k], _timed(M.input, t, 3), _timed(M.recurrent, t, 3),
                             _timed(M.update, t, 2), R)
            if M.zoneout is not None:
                for j, d in enumerate(M.zoneout):
                    if d is not None:
                        d = d if d.dim() == 0 else d[t]
                        fresh[j] = d * states[k][j] + (1 - d) * fresh[j]
            fresh_all.append(fresh)
            y = fresh[0]
        if keep is not None:
            kt = keep[:, src, None]
            fresh_all = [[torch.where(kt, n, o) for n, o in zip(fr, old)] for fr, old in zip(fresh_all, states)]
            y = torch.where(kt, y, torch.zeros_like(y) if prev is None else prev)
        states = fresh_all
        prev = y
        outs.append(y)
    return torch.stack(outs, dim=1), states


def masks_of(cell_masks):
    """Plain container of a recorded CellMasks (the reference reads only the tensors)."""
    return SimpleNamespace(**{f: getattr(cell_masks, f) for f in ("input", "recurrent", "update", "recurrent_kernel", "zoneout")})


def check_against_reference(kind, layer, x, init, out, go_backwards=False, lengths=None):
    plan = layer.last_dropout_plan
    seq, states = ref_run([kind], [weights_of(layer.cell)], [masks_of(plan.cells[0])], x, [init], go_backwards, lengths)
    out = as_list(out)
    torch.testing.assert_close(out[0], seq, atol=TOL, rtol=0)
    assert len(out) - 1 == len(states[0])
    for got, want in zip(out[1:], states[0]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


LENGTHS = torch.tensor([5, 3, 1])


# ----------------------------------------------------------------------------------------------------------
# 1. Defining properties on the recorded masks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,mode", rec_cases())
def test_recurrent_mode_mask_layout(kind, mode):
    p_in, p_rec = 0.3, 0.4
    layer = make(kind, dropout=p_in, recurrent_dropout=p_rec, recurrent_dropout_mode=mode)
    layer(data(B, T, D), training=True)
    cm = layer.last_dropout_plan.cells[0]
    g, H = GATES[kind], U
    kinds_present = {f for f in ("recurrent", "update", "recurrent_kernel") if getattr(cm, f) is not None}
    expected_field = registry.RECURRENT[mode].site
    assert kinds_present == {expected_field}
    assert cm.zoneout is None
    expected_shape = EXPECTED_SHAPES(g, H)[mode]
    mask = getattr(cm, expected_field)
    assert tuple(mask.shape) == expected_shape
    assert mask.dtype == F64
    assert dropout_values_ok(mask, p_rec)
    # Keras's per-gate input masks only come with Keras-style recurrent masks; every other mode shares one.
    assert tuple(cm.input.shape) == ((g if mode == "keras" else 1), B, D)
    assert dropout_values_ok(cm.input, p_in)


@pytest.mark.parametrize("kind,mode", rec_cases(modes=["per_step", "update_per_step"]))
def test_per_step_recurrent_masks_are_fresh_each_step_and_per_gate(kind, mode):
    p = 0.5
    layer = make(kind, recurrent_dropout=p, recurrent_dropout_mode=mode)
    plan = layer.draw_dropout_plan(16, steps=6)
    mask = plan.cells[0].recurrent if mode == "per_step" else plan.cells[0].update
    assert mask.shape[0] == 6
    for t in range(1, 6):  # 16 * 3 (* gates) fair coins: equal by chance with probability <= 2**-48
        assert not torch.equal(mask[t], mask[0])
    if mode == "per_step" and GATES[kind] > 1:
        for gate in range(1, GATES[kind]):
            assert not torch.equal(mask[:, gate], mask[:, 0])
    assert dropout_values_ok(mask, p)
    assert bool((mask == 0).any()) and bool((mask != 0).any())


@pytest.mark.parametrize("kind,rd,mode", [(k, rd, m) for k in KINDS for rd in (0.0, 0.3) for m in INPUT_MODES]
                         + [(k, 0.3, "keras-with-tied") for k in ("lstm", "gru")])
def test_input_mode_mask_layout(kind, rd, mode):
    p = 0.35
    rec_mode = "tied" if mode == "keras-with-tied" else "keras"
    mode = "keras" if mode == "keras-with-tied" else mode
    layer = make(kind, dropout=p, recurrent_dropout=rd, input_dropout_mode=mode, recurrent_dropout_mode=rec_mode)
    layer(data(B, T, D), training=True)
    m = layer.last_dropout_plan.cells[0].input
    g = GATES[kind]
    expected = {
        "keras": (g if rd > 0 and rec_mode == "keras" else 1, B, D),
        "shared": (1, B, D),
        "per_gate": (g, B, D),
        "per_step": (T, 1, B, D),
    }[mode]
    assert tuple(m.shape) == expected
    assert dropout_values_ok(m, p)


@pytest.mark.parametrize("kind", KINDS)
def test_input_per_step_fresh_and_per_gate_distinct(kind):
    layer = make(kind, dropout=0.5, input_dropout_mode="per_step")
    m = layer.draw_dropout_plan(16, steps=5).cells[0].input
    assert tuple(m.shape) == (5, 1, 16, D)
    assert all(not torch.equal(m[t], m[0]) for t in range(1, 5))
    if GATES[kind] > 1:
        layer = make(kind, dropout=0.5, input_dropout_mode="per_gate")
        m = layer.draw_dropout_plan(16, steps=5).cells[0].input
        assert all(not torch.equal(m[gate], m[0]) for gate in range(1, GATES[kind]))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_per_step_keep_rate_within_binomial_bounds(kind):
    p = 0.3
    layer = make(kind, units=8, recurrent_dropout=p, recurrent_dropout_mode="per_step")
    m = layer.draw_dropout_plan(100, steps=20).cells[0].recurrent
    n = m.numel()
    keep = (m != 0).double().mean().item()
    assert abs(keep - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("kind,mode", rec_cases())
def test_identical_samples_see_one_mask_only_in_weights_modes(kind, mode):
    """DropConnect is one mask for the whole batch; every other scheme draws per sample."""
    batch = 8
    layer = make(kind, recurrent_dropout=0.5, recurrent_dropout_mode=mode, return_state=False)
    x = data(1, T, D).expand(batch, T, D).contiguous()
    h0 = data(1, U, seed=3).expand(batch, U).contiguous()
    init = [h0, h0.clone()] if kind == "lstm" else [h0]
    out = layer(x, initial_state=init, training=True)
    spread = (out - out[0]).abs().max().item()
    if mode.startswith("weights"):
        assert spread < 1e-13  # equal up to the rounding of batched products
    else:
        assert spread > 1e-6


@pytest.mark.parametrize("kind,mode", rec_cases(modes=["weights", "weights_per_unit"]))
def test_weights_modes_leave_parameter_unchanged_and_equal_a_masked_kernel(kind, mode):
    p = 0.5
    layer = make(kind, recurrent_dropout=p, recurrent_dropout_mode=mode)
    param = layer.cell.recurrent_kernel
    before = param.detach().clone()
    x, init = data(B, T, D), init_states(kind)
    out = layer(x, initial_state=init, training=True)
    M = layer.last_dropout_plan.cells[0].recurrent_kernel
    assert layer.cell.recurrent_kernel is param
    assert torch.equal(param.detach(), before)
    assert dropout_values_ok(M, p)
    if mode == "weights_per_unit":
        assert tuple(M.shape) == (U, 1)  # whole rows: one value per unit of h(t-1), for all columns
    # Effect: the same as a dropout-free twin whose recurrent kernel is R * M (broadcast over columns).
    twin = twin_of(kind, layer)
    with torch.no_grad():
        twin.cell.recurrent_kernel.mul_(M)
    if mode == "weights_per_unit":
        dropped = (M[:, 0] == 0)
        assert bool((twin.cell.recurrent_kernel[dropped] == 0).all())
    for a, b in zip(as_list(out), as_list(twin(x, initial_state=init))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # One mask per call: later calls draw others (some of 8 differ; coincidence odds <= 2**-(8*3)).
    later = []
    for _ in range(8):
        layer(x, training=True)
        later.append(layer.last_dropout_plan.cells[0].recurrent_kernel)
    assert any(not torch.equal(M, M2) for M2 in later)


def test_weights_per_unit_mask_varies_across_units_over_many_calls():
    layer = make("lstm", units=8, recurrent_dropout=0.5, recurrent_dropout_mode="weights_per_unit")
    seen = torch.stack([layer.draw_dropout_plan(2).cells[0].recurrent_kernel[:, 0] for _ in range(20)])
    assert tuple(seen.shape) == (20, 8)
    assert bool((seen == 0).any()) and bool((seen == 2.0).any())
    assert not all(torch.equal(seen[i], seen[0]) for i in range(20))


@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_lstm_update_mode_zero_mask_keeps_memory(mode):
    """Semeniuta: a dropped update leaves c = f * c(t-1): memory is decayed by the forget gate, never erased."""
    layer = make("lstm", recurrent_dropout=0.5, recurrent_dropout_mode=mode)
    x1 = data(B, 1, D)
    h0, c0 = init_states("lstm")
    plan = layer.draw_dropout_plan(B, steps=1)
    plan = replace_masks(plan, update=torch.zeros_like(plan.cells[0].update))
    _, h1, c1 = layer(x1, initial_state=[h0, c0], dropout_plan=plan)
    W = weights_of(layer.cell)
    zf = x1[:, 0] @ W.K[:, U:2 * U] + W.b[U:2 * U] + h0 @ W.R[:, U:2 * U]
    torch.testing.assert_close(c1, torch.sigmoid(zf) * c0, atol=TOL, rtol=0)
    assert bool((c1 != 0).all())
    # Over several steps: c keeps its sign and shrinks, h = o * tanh(c) stays nonzero.
    plan = layer.draw_dropout_plan(B, steps=T)
    plan = replace_masks(plan, update=torch.zeros_like(plan.cells[0].update))
    _, hT, cT = layer(data(B, T, D), initial_state=[h0, c0], dropout_plan=plan)
    assert bool((torch.sign(cT) == torch.sign(c0)).all())
    assert bool((cT.abs() < c0.abs()).all())
    assert bool((hT != 0).all())


@pytest.mark.parametrize("kind", ["gru", "gru_v1"])
@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_gru_update_mode_zero_mask_keeps_memory(kind, mode):
    """With the candidate dropped, h(t) = z * h(t-1): same sign, shrinking, never reset."""
    layer = make(kind, recurrent_dropout=0.5, recurrent_dropout_mode=mode)
    h0 = init_states(kind)[0]
    plan = layer.draw_dropout_plan(B, steps=T)
    plan = replace_masks(plan, update=torch.zeros_like(plan.cells[0].update))
    seq, _ = layer(data(B, T, D), initial_state=[h0], dropout_plan=plan)
    prev = h0
    for t in range(T):
        ratio = seq[:, t] / prev
        assert bool(((ratio > 0) & (ratio < 1)).all())
        prev = seq[:, t]


@pytest.mark.parametrize("kind,mode", rec_cases(modes=["keras", "tied", "per_step", "weights", "weights_per_unit"]))
def test_all_zero_recurrent_masks_only_cut_the_recurrent_kernel(kind, mode):
    """Recurrent masks (and DropConnect) never touch the carried state: all-zero masks = a zero recurrent
    kernel, while c (LSTM) and the h(t-1) of GRU's z * h(t-1) still carry."""
    layer = make(kind, recurrent_dropout=0.5, recurrent_dropout_mode=mode)
    x, init = data(B, T, D), init_states(kind)
    plan = layer.draw_dropout_plan(B, steps=T)
    field = "recurrent_kernel" if mode.startswith("weights") else "recurrent"
    plan = replace_masks(plan, **{field: torch.zeros_like(getattr(plan.cells[0], field))})
    out = layer(x, initial_state=init, dropout_plan=plan)
    twin = twin_of(kind, layer)
    with torch.no_grad():
        twin.cell.recurrent_kernel.zero_()
    for a, b in zip(as_list(out), as_list(twin(x, initial_state=init))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.equal(layer.cell.recurrent_kernel, twin.cell.recurrent_kernel)  # the layer's own is intact


@pytest.mark.parametrize("kind", KINDS)
def test_zoneout_indicators_layout_and_rate(kind):
    rate_h, rate_c = 0.3, 0.65
    extra = {"zoneout_c": rate_c} if kind == "lstm" else {}
    layer = make(kind, units=8, zoneout_h=rate_h, **extra)
    batch, steps = 400, 50
    plan = layer.draw_dropout_plan(batch, steps=steps)
    cm = plan.cells[0]
    assert cm.input is cm.recurrent is cm.update is cm.recurrent_kernel is None
    rates = (rate_h, rate_c) if kind == "lstm" else (rate_h,)
    assert len(cm.zoneout) == len(rates)
    for d, rate in zip(cm.zoneout, rates):
        assert tuple(d.shape) == (steps, batch, 8)
        assert d.dtype == F64
        assert bool(((d == 0) | (d == 1)).all())
        n = d.numel()
        assert abs(d.mean().item() - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)  # d = 1: keep the old value
        # per step, sample and unit: not constant along any axis
        assert not torch.equal(d[1], d[0]) and not torch.equal(d[:, 1], d[:, 0]) and not torch.equal(d[..., 1], d[..., 0])
    if kind == "lstm":
        assert not torch.equal(cm.zoneout[0], cm.zoneout[1])


@pytest.mark.parametrize("which", ["h", "c"])
def test_lstm_zoneout_one_state_only(which):
    layer = make("lstm", **{f"zoneout_{which}": 0.4})
    zo = layer.draw_dropout_plan(B, steps=T).cells[0].zoneout
    assert (zo[0] is None) == (which == "c") and (zo[1] is None) == (which == "h")
    layer.eval()
    out = layer(data(B, T, D))
    zo = layer.last_dropout_plan.cells[0].zoneout
    present = zo[0] if which == "h" else zo[1]
    assert present.dim() == 0 and present.item() == pytest.approx(0.4)
    assert zo[1 if which == "h" else 0] is None
    assert out[0].shape == (B, T, U)


@pytest.mark.parametrize("kind", KINDS)
def test_zoneout_all_keep_freezes_states_and_none_keep_is_plain(kind):
    extra = {"zoneout_c": 0.5} if kind == "lstm" else {}
    layer = make(kind, zoneout_h=0.5, **extra)
    x, init = data(B, T, D), init_states(kind)
    plan = layer.draw_dropout_plan(B, steps=T)
    ones = replace_masks(plan, zoneout=tuple(torch.ones_like(d) for d in plan.cells[0].zoneout))
    seq, *states = layer(x, initial_state=init, dropout_plan=ones)
    for t in range(T):
        assert torch.equal(seq[:, t], init[0])  # the output is the zoned h
    for s, s0 in zip(states, init):
        assert torch.equal(s, s0)
    zeros = replace_masks(plan, zoneout=tuple(torch.zeros_like(d) for d in plan.cells[0].zoneout))
    twin = twin_of(kind, layer)
    for a, b in zip(layer(x, initial_state=init, dropout_plan=zeros), twin(x, initial_state=init)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_lstm_zoneout_c_only_keeps_c_but_not_h():
    layer = make("lstm", zoneout_c=0.5)
    x, init = data(B, T, D), init_states("lstm")
    plan = layer.draw_dropout_plan(B, steps=T)
    plan = replace_masks(plan, zoneout=(None, torch.ones_like(plan.cells[0].zoneout[1])))
    seq, h, c = layer(x, initial_state=init, dropout_plan=plan)
    assert torch.equal(c, init[1])
    assert not torch.equal(h, init[0])
    check_against_reference("lstm", layer, x, init, (seq, h, c))


# ----------------------------------------------------------------------------------------------------------
# 2. Equality with the independent reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind,mode", rec_cases())
def test_recurrent_modes_match_reference(kind, mode, go_backwards, lengths):
    layer = make(kind, dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode=mode, go_backwards=go_backwards)
    x, init = data(B, T, D), init_states(kind)
    out = layer(x, lengths=lengths, initial_state=init, training=True)
    check_against_reference(kind, layer, x, init, out, go_backwards, lengths)
    # and the masks matter: the result differs from the dropout-free twin
    twin = twin_of(kind, layer, go_backwards=go_backwards)
    assert not torch.allclose(out[0], twin(x, lengths=lengths, initial_state=init)[0])


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("rd", [0.0, 0.4])
@pytest.mark.parametrize("kind,mode", [(k, m) for k in KINDS for m in INPUT_MODES])
def test_input_modes_match_reference(kind, mode, rd, go_backwards, lengths):
    layer = make(kind, dropout=0.4, recurrent_dropout=rd, input_dropout_mode=mode, go_backwards=go_backwards)
    x, init = data(B, T, D), init_states(kind)
    out = layer(x, lengths=lengths, initial_state=init, training=True)
    check_against_reference(kind, layer, x, init, out, go_backwards, lengths)


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind", KINDS)
def test_zoneout_matches_reference(kind, go_backwards, lengths):
    extra = {"zoneout_c": 0.3} if kind == "lstm" else {}
    layer = make(kind, zoneout_h=0.4, go_backwards=go_backwards, **extra)
    x, init = data(B, T, D), init_states(kind)
    out = layer(x, lengths=lengths, initial_state=init, training=True)
    check_against_reference(kind, layer, x, init, out, go_backwards, lengths)


@pytest.mark.parametrize("kind,mode", rec_cases(modes=["per_step", "update_per_step"]) + [("lstm", "input_per_step")])
def test_per_step_masks_are_indexed_by_processing_step(kind, mode):
    """go_backwards with per-step masks equals the forward layer on the reversed input with the SAME plan."""
    if mode == "input_per_step":
        kw = dict(dropout=0.5, input_dropout_mode="per_step", zoneout_h=0.3)
    else:
        kw = dict(recurrent_dropout=0.5, recurrent_dropout_mode=mode)
    fwd = make(kind, **kw)
    bwd = make(kind, go_backwards=True, **kw)
    x, init = data(B, T, D), init_states(kind)
    plan = fwd.draw_dropout_plan(B, steps=T)
    a = fwd(x.flip(1), initial_state=init, dropout_plan=plan)
    b = bwd(x, initial_state=init, dropout_plan=plan)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 3. gradcheck with a fixed plan
# ----------------------------------------------------------------------------------------------------------
GRAD_VARIANTS = {
    **{f"rec_{m}": dict(dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode=m) for m in REC_MODES},
    **{f"in_{m}": dict(dropout=0.4, input_dropout_mode=m, recurrent_dropout=0.3, recurrent_dropout_mode="tied")
       for m in ("shared", "per_gate", "per_step")},
    "zoneout": dict(zoneout_h=0.4, zoneout_c=0.3),
    "zoneout_eval": dict(zoneout_h=0.4, zoneout_c=0.3),
    "proj_weights_zoneout": dict(recurrent_dropout=0.4, recurrent_dropout_mode="weights", zoneout_h=0.3, proj_size=1),
}


def grad_cases():
    cases = []
    for kind in KINDS:
        for name, kw in GRAD_VARIANTS.items():
            if kind == "simple" and ("update" in name):
                continue
            if kind != "lstm" and ("zoneout_c" in kw or "proj_size" in kw):
                kw = {k: v for k, v in kw.items() if k not in ("zoneout_c", "proj_size")}
                if name.startswith("proj"):
                    continue
            cases.append(pytest.param(kind, name, kw, id=f"{kind}-{name}"))
    return cases


@pytest.mark.parametrize("kind,name,kw", grad_cases())
def test_gradcheck_with_fixed_plan(kind, name, kw):
    b, t, d, u = 2, 3, 2, 2
    per_step = any(v in ("per_step", "update_per_step") for v in kw.values()) or "zoneout" in name
    layer = make(kind, units=u, input_size=d, go_backwards=per_step, **kw)
    plan = layer.draw_dropout_plan(b, steps=t, training=(name != "zoneout_eval"))
    assert not plan.empty
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    proj = kw.get("proj_size", 0)
    init = [s.detach().clone().requires_grad_(True) for s in init_states(kind, batch=b, units=u, proj=proj)]
    x = data(b, t, d).requires_grad_(True)
    lengths = torch.tensor([3, 2])
    n_init = len(init)

    def f(x, *rest):
        states, ps = list(rest[:n_init]), rest[n_init:]
        return torch.func.functional_call(
            layer, dict(zip(names, ps)), (x,),
            {"dropout_plan": plan, "lengths": lengths, "initial_state": states},
        )

    assert torch.autograd.gradcheck(f, (x, *init, *params), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# 4. Eval mode
# ----------------------------------------------------------------------------------------------------------
EVAL_VARIANTS = [(k, dict(dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode=m)) for k, m in rec_cases()] + [
    (k, dict(dropout=0.4, recurrent_dropout=0.2, input_dropout_mode=m)) for k in KINDS for m in INPUT_MODES
]


@pytest.mark.parametrize("kind,kw", EVAL_VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(
    str(x) for x in v.values()))
def test_dropout_variants_are_identity_at_eval_and_training_true_overrides(kind, kw):
    layer = make(kind, **kw)
    twin = twin_of(kind, layer)
    x, init = data(B, T, D), init_states(kind)
    layer.eval()
    out = layer(x, initial_state=init, lengths=LENGTHS)
    assert layer.last_dropout_plan.empty
    for a, b in zip(out, twin(x, initial_state=init, lengths=LENGTHS)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    layer.train()
    out = layer(x, initial_state=init, training=False)
    assert layer.last_dropout_plan.empty
    layer.eval()
    out = layer(x, initial_state=init, training=True)
    assert not layer.last_dropout_plan.empty
    assert not torch.allclose(out[0], twin(x, initial_state=init)[0])
    check_against_reference(kind, layer, x, init, out)


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_zoneout_at_eval_uses_the_expectation(kind, go_backwards):
    rate_h, rate_c = 0.35, 0.6
    extra = {"zoneout_c": rate_c} if kind == "lstm" else {}
    layer = make(kind, zoneout_h=rate_h, go_backwards=go_backwards, **extra).eval()
    x, init = data(B, T, D), init_states(kind)
    out = layer(x, initial_state=init, lengths=LENGTHS)
    zo = layer.last_dropout_plan.cells[0].zoneout
    rates = (rate_h, rate_c) if kind == "lstm" else (rate_h,)
    assert len(zo) == len(rates)
    for d, r in zip(zo, rates):
        assert d.dim() == 0 and d.item() == pytest.approx(r, abs=1e-15)
    # Reference with the expectation written here: new = rate * old + (1 - rate) * fresh.
    M = SimpleNamespace(input=None, recurrent=None, update=None, recurrent_kernel=None,
                        zoneout=tuple(torch.tensor(r, dtype=F64) for r in rates))
    seq, states = ref_run([kind], [weights_of(layer.cell)], [M], x, [init], go_backwards, LENGTHS)
    torch.testing.assert_close(out[0], seq, atol=TOL, rtol=0)
    for a, b in zip(out[1:], states[0]):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    twin = twin_of(kind, layer, go_backwards=go_backwards)
    assert not torch.allclose(out[0], twin(x, initial_state=init, lengths=LENGTHS)[0])
    # Deterministic at eval; training=True draws 0/1 indicators instead.
    again = layer(x, initial_state=init, lengths=LENGTHS)
    assert torch.equal(again[0], out[0])
    trained = layer(x, initial_state=init, training=True)
    for d in layer.last_dropout_plan.cells[0].zoneout:
        assert tuple(d.shape[:2]) == (T, B) and bool(((d == 0) | (d == 1)).all())
    check_against_reference(kind, layer, x, init, trained, go_backwards)


# ----------------------------------------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------------------------------------
LAYER_CLASSES = {"lstm": droprnn.LSTM, "gru": droprnn.GRU, "simple": droprnn.SimpleRNN}
CELL_CLASSES = {"lstm": droprnn.LSTMCell, "gru": droprnn.GRUCell, "simple": droprnn.SimpleRNNCell}


@pytest.mark.parametrize("bad", ["bogus", "Keras", "per-step", "", None, 3])
@pytest.mark.parametrize("argument,modes", [("recurrent_dropout_mode", REC_MODES), ("input_dropout_mode", INPUT_MODES)])
@pytest.mark.parametrize("kind", list(LAYER_CLASSES))
def test_unknown_mode_lists_every_valid_mode(kind, argument, modes, bad):
    with pytest.raises(DroprnnError) as info:
        LAYER_CLASSES[kind](3, name="my_rnn", **{argument: bad})
    msg = str(info.value)
    assert "'my_rnn'" in msg and f"`{argument}`" in msg and repr(bad) in msg
    for mode in modes:
        assert repr(mode) in msg
    with pytest.raises(DroprnnError) as info:
        CELL_CLASSES[kind](3, **{argument: bad})
    assert f"`{argument}`" in str(info.value) and all(repr(m) in str(info.value) for m in modes)


@pytest.mark.parametrize("make_it", [
    lambda mode: droprnn.SimpleRNN(3, name="srnn", recurrent_dropout=0.2, recurrent_dropout_mode=mode),
    lambda mode: droprnn.SimpleRNNCell(3, name="srnn", recurrent_dropout_mode=mode),
], ids=["layer", "cell"])
@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_update_modes_rejected_on_simple_rnn(make_it, mode):
    with pytest.raises(DroprnnError) as info:
        make_it(mode)
    msg = str(info.value)
    assert "'srnn'" in msg and "`recurrent_dropout_mode`" in msg and repr(mode) in msg
    for valid in ("keras", "tied", "per_step", "weights"):
        assert repr(valid) in msg


@pytest.mark.parametrize("mode", [m for m in REC_MODES if m not in UPDATE_MODES])
def test_simple_rnn_accepts_the_other_modes(mode):
    layer = make("simple", recurrent_dropout=0.3, recurrent_dropout_mode=mode)
    layer(data(B, T, D), training=True)
    assert not layer.last_dropout_plan.empty


@pytest.mark.parametrize("value", [0.1, 0.5, 1.0, -0.2])
@pytest.mark.parametrize("cls", [droprnn.GRU, droprnn.SimpleRNN])
def test_zoneout_c_rejected_where_there_is_no_cell_state(cls, value):
    with pytest.raises(DroprnnError) as info:
        cls(3, name="no_c", zoneout_c=value)
    msg = str(info.value)
    assert "'no_c'" in msg and "`zoneout_c`" in msg and "zoneout_h" in msg


@pytest.mark.parametrize("value", [0, 0.0])
@pytest.mark.parametrize("cls", [droprnn.GRU, droprnn.SimpleRNN])
def test_zoneout_c_zero_accepted(cls, value):
    layer = cls(3, zoneout_c=value, input_size=2)
    assert layer(torch.randn(2, 4, 2)).shape == (2, 3)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
@pytest.mark.parametrize("kind,argument", [("lstm", "zoneout_h"), ("lstm", "zoneout_c"), ("gru", "zoneout_h"),
                                           ("simple", "zoneout_h")])
def test_zoneout_rate_outside_unit_interval_raises(kind, argument, value):
    with pytest.raises(DroprnnError) as info:
        LAYER_CLASSES[kind](3, name="zo", **{argument: value})
    msg = str(info.value)
    assert "'zo'" in msg and f"`{argument}`" in msg and "[0, 1)" in msg


@pytest.mark.parametrize("value", [-1, 3, 4, 1.5, True, "1"])
def test_invalid_proj_size_raises(value):
    with pytest.raises(DroprnnError) as info:
        droprnn.LSTM(3, name="proj", proj_size=value)
    msg = str(info.value)
    assert "'proj'" in msg and "`proj_size`" in msg and repr(value) in msg


@pytest.mark.parametrize("steps", [T - 2, T + 1])
@pytest.mark.parametrize("kind,kw", [
    ("lstm", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step")),
    ("gru", dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step")),
    ("simple", dict(dropout=0.3, input_dropout_mode="per_step")),
    ("lstm", dict(zoneout_h=0.3, zoneout_c=0.2)),
    ("gru", dict(zoneout_h=0.3)),
], ids=["lstm-per_step", "gru-update_per_step", "simple-input_per_step", "lstm-zoneout", "gru-zoneout"])
def test_replayed_plan_with_wrong_step_count_raises(kind, kw, steps):
    layer = make(kind, name="replay", **kw)
    plan = layer.draw_dropout_plan(B, steps=steps)
    with pytest.raises(DroprnnError) as info:
        layer(data(B, T, D), dropout_plan=plan)
    msg = str(info.value)
    assert "'replay'" in msg and "`dropout_plan`" in msg


def test_replayed_zoneout_plan_with_wrong_batch_raises():
    layer = make("gru", name="replay", zoneout_h=0.3)
    plan = layer.draw_dropout_plan(B + 1, steps=T)
    with pytest.raises(DroprnnError, match="dropout_plan"):
        layer(data(B, T, D), dropout_plan=plan)


@pytest.mark.parametrize("shape", [(U, 4 * U + 1), (U + 1, 1), (4 * U,)])
def test_replayed_dropconnect_mask_of_wrong_shape_raises(shape):
    layer = make("lstm", name="replay", recurrent_dropout=0.3, recurrent_dropout_mode="weights")
    plan = replace_masks(layer.draw_dropout_plan(B), recurrent_kernel=torch.ones(shape, dtype=F64))
    with pytest.raises(DroprnnError, match="dropout_plan"):
        layer(data(B, T, D), dropout_plan=plan)


# ----------------------------------------------------------------------------------------------------------
# 6. Combinations
# ----------------------------------------------------------------------------------------------------------
COMBOS = {
    "lstm-weights-zoneout": ("lstm", dict(dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode="weights",
                                          zoneout_h=0.3, zoneout_c=0.2)),
    "lstm-update_step-in_step-zoneout": ("lstm", dict(dropout=0.3, input_dropout_mode="per_step",
                                                      recurrent_dropout=0.4, recurrent_dropout_mode="update_per_step",
                                                      zoneout_h=0.25)),
    "lstm-keras-pergate-zoneout_c": ("lstm", dict(dropout=0.2, recurrent_dropout=0.3, zoneout_c=0.4)),
    "gru-per_unit-in_step-zoneout": ("gru", dict(dropout=0.3, input_dropout_mode="per_step", recurrent_dropout=0.4,
                                                 recurrent_dropout_mode="weights_per_unit", zoneout_h=0.3)),
    "gru_v1-update-per_gate-zoneout": ("gru_v1", dict(dropout=0.3, input_dropout_mode="per_gate",
                                                      recurrent_dropout=0.4, recurrent_dropout_mode="update",
                                                      zoneout_h=0.3)),
    "gru_v1-per_step-zoneout": ("gru_v1", dict(dropout=0.2, recurrent_dropout=0.4, recurrent_dropout_mode="per_step",
                                               zoneout_h=0.3)),
    "simple-weights-in_step-zoneout": ("simple", dict(dropout=0.3, input_dropout_mode="per_step",
                                                      recurrent_dropout=0.4, recurrent_dropout_mode="weights",
                                                      zoneout_h=0.3)),
    "lstm-proj-tied-zoneout": ("lstm", dict(dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode="tied",
                                            zoneout_h=0.3, zoneout_c=0.2, proj_size=2)),
}


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", list(COMBOS))
def test_combinations_match_reference(case, go_backwards):
    kind, kw = COMBOS[case]
    layer = make(kind, go_backwards=go_backwards, **kw)
    x, init = data(B, T, D), init_states(kind, proj=kw.get("proj_size", 0))
    out = layer(x, lengths=LENGTHS, initial_state=init, training=True)
    cm = layer.last_dropout_plan.cells[0]
    assert cm.zoneout is not None
    check_against_reference(kind, layer, x, init, out, go_backwards, LENGTHS)
    # eval: dropout off, zoneout expectation
    layer.eval()
    out = layer(x, lengths=LENGTHS, initial_state=init)
    rates = [kw.get("zoneout_h", 0.0)] + ([kw.get("zoneout_c", 0.0)] if kind == "lstm" else [])
    M = SimpleNamespace(input=None, recurrent=None, update=None, recurrent_kernel=None,
                        zoneout=tuple(torch.tensor(r, dtype=F64) if r else None for r in rates))
    seq, states = ref_run([kind], [weights_of(layer.cell)], [M], x, [init], go_backwards, LENGTHS)
    torch.testing.assert_close(out[0], seq, atol=TOL, rtol=0)
    for a, b in zip(out[1:], states[0]):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def stacked_layer(go_backwards=False, **extra):
    cells = [
        droprnn.LSTMCell(U, dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode="per_step", zoneout_c=0.2,
                         input_size=D, dtype=F64),
        droprnn.GRUCell(4, dropout=0.25, recurrent_dropout=0.3, recurrent_dropout_mode="tied",
                        input_dropout_mode="per_step", zoneout_h=0.35, input_size=U, dtype=F64),
        droprnn.SimpleRNNCell(2, recurrent_dropout=0.3, recurrent_dropout_mode="weights_per_unit", zoneout_h=0.2,
                              input_size=4, dtype=F64),
    ]
    layer = droprnn.RNN(cells, return_sequences=True, return_state=True, go_backwards=go_backwards, **extra)
    randomize(layer, 4)
    return layer


STACK_KINDS = ["lstm", "gru", "simple"]


def stacked_init():
    return [init_states("lstm", seed=30), init_states("gru", units=4, seed=40), init_states("simple", units=2, seed=50)]


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
def test_stacked_cells_with_variants_match_reference(go_backwards, lengths):
    layer = stacked_layer(go_backwards)
    x, init = data(B, T, D), stacked_init()
    out = layer(x, lengths=lengths, initial_state=init, training=True)
    plan = layer.last_dropout_plan
    c0, c1, c2 = plan.cells
    assert tuple(c0.recurrent.shape) == (T, 4, B, U) and tuple(c0.input.shape) == (1, B, D)
    assert c0.zoneout[0] is None and tuple(c0.zoneout[1].shape) == (T, B, U)
    assert tuple(c1.input.shape) == (T, 1, B, U) and tuple(c1.recurrent.shape) == (1, B, 4)
    assert tuple(c1.zoneout[0].shape) == (T, B, 4)
    assert tuple(c2.recurrent_kernel.shape) == (2, 1) and c2.input is None
    seq, states = ref_run(STACK_KINDS, [weights_of(c) for c in layer.cells], [masks_of(c) for c in plan.cells],
                          x, init, go_backwards, lengths)
    torch.testing.assert_close(out[0], seq, atol=TOL, rtol=0)
    assert len(out) == 4
    for got, want in zip(out[1:], states):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_stacked_cells_with_variants_eval_and_gradcheck():
    layer = stacked_layer()
    x, init = data(B, T, D), stacked_init()
    layer.eval()
    out = layer(x, lengths=LENGTHS, initial_state=init)
    M = lambda zo: SimpleNamespace(input=None, recurrent=None, update=None, recurrent_kernel=None,  # noqa: E731
                                   zoneout=tuple(None if r is None else torch.tensor(r, dtype=F64) for r in zo))
    seq, states = ref_run(STACK_KINDS, [weights_of(c) for c in layer.cells],
                          [M((None, 0.2)), M((0.35,)), M((0.2,))], x, init, False, LENGTHS)
    torch.testing.assert_close(out[0], seq, atol=TOL, rtol=0)
    for got, want in zip(out[1:], states):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    # gradcheck (tiny batch, fixed training plan)
    b = 2
    plan = layer.draw_dropout_plan(b, steps=3, training=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    xs = data(b, 3, D).requires_grad_(True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"dropout_plan": plan})[0]

    assert torch.autograd.gradcheck(f, (xs, *params), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# 7. Seeds
# ----------------------------------------------------------------------------------------------------------
SEED_VARIANTS = [(k, dict(dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode=m, zoneout_h=0.3))
                 for k, m in rec_cases()] + \
                [(k, dict(dropout=0.3, input_dropout_mode=m, recurrent_dropout=0.2)) for k in KINDS for m in INPUT_MODES] + \
                [("lstm", dict(zoneout_h=0.2, zoneout_c=0.4, proj_size=2))]


def plan_tensors(plan):
    out = []
    for cm in plan.cells:
        for f in ("input", "recurrent", "update", "recurrent_kernel"):
            out.append(getattr(cm, f))
        out.extend(cm.zoneout or ())
    return out


@pytest.mark.parametrize("kind,kw", SEED_VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(
    str(x) for x in v.values()))
def test_same_seed_same_masks_every_mode(kind, kw):
    a, b, c = (make(kind, seed=s, **kw) for s in (7, 7, 8))
    x = data(B, T, D)
    for _ in range(2):  # and the streams stay in step over calls
        ya, yb, yc = (m(x, training=True) for m in (a, b, c))
        pa, pb, pc = (plan_tensors(m.last_dropout_plan) for m in (a, b, c))
        assert any(t is not None for t in pa)
        for u, v in zip(pa, pb):
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u, v)
        assert torch.equal(ya[0], yb[0])
        assert any(u is not None and not torch.equal(u, w) for u, w in zip(pa, pc))


@pytest.mark.parametrize("kind,rates,counts", [
    ("lstm", (0.3, 0.4), (4, 4)), ("lstm", (0.3, 0.0), (1, 0)), ("lstm", (0.0, 0.4), (0, 4)),
    ("gru", (0.3, 0.4), (3, 3)), ("gru", (0.3, 0.0), (1, 0)), ("gru_v1", (0.3, 0.4), (3, 3)),
    ("simple", (0.3, 0.4), (1, 1)), ("simple", (0.3, 0.0), (1, 0)),
])
def test_keras_default_mask_counts_regression(kind, rates, counts):
    layer = make(kind, dropout=rates[0], recurrent_dropout=rates[1])
    assert layer.cell.recurrent_dropout_mode == "keras" and layer.cell.input_dropout_mode == "keras"
    layer(data(B, T, D), training=True)
    cm = layer.last_dropout_plan.cells[0]
    got = (0 if cm.input is None else cm.input.shape[0], 0 if cm.recurrent is None else cm.recurrent.shape[0])
    assert got == counts
    assert cm.update is None and cm.recurrent_kernel is None and cm.zoneout is None
    if cm.input is not None:
        assert cm.input.dim() == 3  # per sequence
    if cm.recurrent is not None:
        assert cm.recurrent.dim() == 3
        if counts[1] > 1:
            assert not torch.equal(cm.recurrent[0], cm.recurrent[1])


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
def test_keras_masks_unchanged_when_zoneout_is_added(kind):
    """Extra variants draw after Keras's masks, so a seeded Keras-mode layer keeps Keras's masks."""
    extra = {"zoneout_c": 0.2} if kind == "lstm" else {}
    plain = make(kind, dropout=0.3, recurrent_dropout=0.4, seed=99)
    zoned = make(kind, dropout=0.3, recurrent_dropout=0.4, seed=99, zoneout_h=0.3, **extra)
    x = data(B, T, D)
    plain(x, training=True)
    zoned(x, training=True)
    p, z = plain.last_dropout_plan.cells[0], zoned.last_dropout_plan.cells[0]
    assert torch.equal(p.input, z.input) and torch.equal(p.recurrent, z.recurrent)
    assert z.zoneout is not None


# ----------------------------------------------------------------------------------------------------------
# 8. LSTM proj_size
# ----------------------------------------------------------------------------------------------------------
def test_proj_size_shapes_and_weights():
    P = 2
    layer = make("lstm", proj_size=P)
    seq, h, c = layer(data(B, T, D), initial_state=None)
    assert seq.shape == (B, T, P) and h.shape == (B, P) and c.shape == (B, U)
    ws = layer.get_weights()
    assert [w.shape for w in ws] == [(D, 4 * U), (P, 4 * U), (4 * U,), (U, P)]
    assert (ws[-1] == layer.cell.projection.detach().numpy()).all()
    twin = make("lstm", proj_size=P, weight_seed=5)
    twin.set_weights(ws)
    for a, b in zip(twin(data(B, T, D)), layer(data(B, T, D))):
        assert torch.equal(a, b)
    last = droprnn.LSTM(U, proj_size=P, input_size=D)(torch.randn(B, T, D))
    assert last.shape == (B, P)
    with pytest.raises(DroprnnError):
        layer.set_weights(ws[:3])


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("mode", REC_MODES)
def test_proj_size_matches_reference(mode, go_backwards):
    P = 2
    layer = make("lstm", proj_size=P, dropout=0.3, recurrent_dropout=0.4, recurrent_dropout_mode=mode,
                 zoneout_h=0.2, zoneout_c=0.3, go_backwards=go_backwards)
    x, init = data(B, T, D), init_states("lstm", proj=P)
    out = layer(x, lengths=LENGTHS, initial_state=init, training=True)
    cm = layer.last_dropout_plan.cells[0]
    if mode in ("keras", "tied", "per_step"):
        assert cm.recurrent.shape[-2:] == (B, P)  # recurrent masks sit on the projected h(t-1)
    if mode == "weights":
        assert tuple(cm.recurrent_kernel.shape) == (P, 4 * U)
    if mode == "weights_per_unit":
        assert tuple(cm.recurrent_kernel.shape) == (P, 1)
    if mode.startswith("update"):
        assert cm.update.shape[-2:] == (B, U)
    assert tuple(cm.zoneout[0].shape) == (T, B, P) and tuple(cm.zoneout[1].shape) == (T, B, U)
    check_against_reference("lstm", layer, x, init, out, go_backwards, LENGTHS)
