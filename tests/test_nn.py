"""``droprnn.nn.LSTM`` / ``GRU`` / ``RNN``: the torch-style drop-in front.

With every droprnn dropout off the modules must compute what ``torch.nn`` computes (outputs, final
states and the gradients w.r.t. input, initial state and every parameter), keep torch's parameter names
and state_dict layout, and accept torch's call forms (batch_first, unbatched, PackedSequence, hx).
``dropout`` keeps torch's between-layer meaning; the keyword-only extras add Keras-style cell dropout,
the other recurrent dropout modes and zoneout. Bad arguments raise ``DroprnnError`` naming the module.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import droprnn
from droprnn.dropout import modes as registry
from droprnn import DroprnnError
from droprnn import nn as dnn
from droprnn.random import SeedStream, derived_seed, keep_mask

D_IN, H = 3, 5

# kind -> (torch class, droprnn class, extra constructor kwargs)
KINDS = {
    "LSTM": (torch.nn.LSTM, dnn.LSTM, {}),
    "GRU": (torch.nn.GRU, dnn.GRU, {}),
    "RNN_TANH": (torch.nn.RNN, dnn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (torch.nn.RNN, dnn.RNN, {"nonlinearity": "relu"}),
}
ALL_KINDS = list(KINDS)

RECURRENT_MODES = list(registry.RECURRENT)
UPDATE_MODES = set(registry.UPDATE_MODES)


def tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}


def make_torch(kind, input_size=D_IN, hidden=H, **kw):
    cls, _, extra = KINDS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about dropout with num_layers=1
        return cls(input_size, hidden, **extra, **kw)


def make_ours(kind, input_size=D_IN, hidden=H, **kw):
    _, cls, extra = KINDS[kind]
    return cls(input_size, hidden, **extra, **kw)


def pair(kind, dtype=torch.float32, input_size=D_IN, hidden=H, extras=None, **kw):
    """A torch module and a droprnn module with the torch module's weights (strict load)."""
    reference = make_torch(kind, input_size, hidden, **kw).to(dtype)
    ours = make_ours(kind, input_size, hidden, **kw, **(extras or {})).to(dtype)
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference, ours


def state_shapes(kind, num_layers, bidirectional, batch, proj_size=0, unbatched=False):
    n = num_layers * (2 if bidirectional else 1)
    shapes = [(n, batch, proj_size or H)]
    if kind == "LSTM":
        shapes.append((n, batch, H))
    return [s[:1] + s[2:] for s in shapes] if unbatched else shapes


def as_states(kind, hn):
    return tuple(hn) if kind == "LSTM" else (hn,)


def run(module, kind, x, hx, out_w, state_w):
    """Forward, then backward of a fixed random weighting of output and final states.

    Returns (output, states, grad input, grads of hx, {param name: grad})."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    hx_leaves = None
    if hx is None:
        out, hn = module(x)
    else:
        hx_leaves = [h.detach().clone().requires_grad_(True) for h in hx]
        out, hn = module(x, tuple(hx_leaves) if kind == "LSTM" else hx_leaves[0])
    states = as_states(kind, hn)
    loss = (out * out_w).sum() + sum((s * w).sum() for s, w in zip(states, state_w))
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, states, x.grad, [h.grad for h in hx_leaves] if hx_leaves else [], grads


def assert_same_run(ref, ours, dtype):
    (o1, s1, gx1, gh1, gp1), (o2, s2, gx2, gh2, gp2) = ref, ours
    t = tol(dtype)
    torch.testing.assert_close(o2, o1, **t)
    assert len(s1) == len(s2)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(b, a, **t)
    torch.testing.assert_close(gx2, gx1, **t)
    assert len(gh1) == len(gh2)
    for a, b in zip(gh1, gh2):
        torch.testing.assert_close(b, a, **t)
    assert list(gp1) == list(gp2)
    for name in gp1:
        assert gp1[name] is not None and gp2[name] is not None, name
        torch.testing.assert_close(gp2[name], gp1[name], **t, msg=lambda m, n=name: f"grad of {n}: {m}")


def check_parity(kind, *, num_layers=1, bias=True, batch_first=False, bidirectional=False, proj_size=0,
                 hx_given=False, unbatched=False, steps=4, batch=3, dtype=torch.float32, train=True):
    kw = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if proj_size:
        kw["proj_size"] = proj_size
    ref, ours = pair(kind, dtype, **kw)
    ref.train(train)
    ours.train(train)
    g = torch.Generator().manual_seed(7)
    if unbatched:
        x = torch.randn(steps, D_IN, generator=g, dtype=dtype)
    elif batch_first:
        x = torch.randn(batch, steps, D_IN, generator=g, dtype=dtype)
    else:
        x = torch.randn(steps, batch, D_IN, generator=g, dtype=dtype)
    shapes = state_shapes(kind, num_layers, bidirectional, batch, proj_size, unbatched)
    hx = [torch.randn(s, generator=g, dtype=dtype) for s in shapes] if hx_given else None
    out_features = (proj_size or H) * (2 if bidirectional else 1)
    out_shape = x.shape[:-1] + (out_features,)
    out_w = torch.randn(out_shape, generator=g, dtype=dtype)
    state_w = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    r = run(ref, kind, x, hx, out_w, state_w)
    o = run(ours, kind, x, hx, out_w, state_w)
    assert o[0].shape == out_shape
    assert [tuple(s.shape) for s in o[1]] == [tuple(s) for s in shapes]
    assert_same_run(r, o, dtype)
    return r, o


# ====================================================================== 1. parity with torch.nn
@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbd", "btd"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_float32(kind, num_layers, bias, batch_first, bidirectional, hx_given):
    check_parity(kind, num_layers=num_layers, bias=bias, batch_first=batch_first,
                 bidirectional=bidirectional, hx_given=hx_given)


@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False), (True, False, True)],
                         ids=["bias-btd-hx", "nobias-tbd-nohx", "bias-tbd-hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_float64(kind, num_layers, bidirectional, flags):
    bias, batch_first, hx_given = flags
    check_parity(kind, num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                 hx_given=hx_given, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("proj_size", [1, 3])
def test_parity_lstm_proj_size(proj_size, num_layers, bidirectional, bias, hx_given, dtype):
    check_parity("LSTM", num_layers=num_layers, bias=bias, bidirectional=bidirectional, proj_size=proj_size,
                 hx_given=hx_given, batch_first=bool(num_layers % 2), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True),
                                    dict(num_layers=2, bias=False)], ids=["plain", "2bi", "bf", "2nobias"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_unbatched(kind, config, hx_given, dtype):
    check_parity(kind, unbatched=True, hx_given=hx_given, dtype=dtype, **config)


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
def test_parity_unbatched_lstm_proj(hx_given):
    check_parity("LSTM", unbatched=True, hx_given=hx_given, proj_size=2, num_layers=2, bidirectional=True)


@pytest.mark.parametrize("steps,batch", [(1, 1), (1, 3), (4, 1)], ids=["T1B1", "T1", "B1"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_batch_one_time_one(kind, bidirectional, steps, batch):
    for batch_first in (False, True):
        check_parity(kind, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, hx_given=True,
                     steps=steps, batch=batch)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_eval_mode(kind):
    check_parity(kind, num_layers=2, bidirectional=True, hx_given=True, train=False)


def test_parity_default_dtype_modules_match_torch_construction():
    """dtype= and device= factory kwargs as in torch."""
    ours = dnn.LSTM(D_IN, H, num_layers=2, proj_size=2, dtype=torch.float64, device="cpu")
    ref = torch.nn.LSTM(D_IN, H, num_layers=2, proj_size=2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]


# ---------------------------------------------------------------------- PackedSequence
def check_packed(kind, lengths, enforce_sorted, *, num_layers=2, bidirectional=True, hx_given=True,
                 proj_size=0, dtype=torch.float32):
    kw = dict(num_layers=num_layers, bidirectional=bidirectional)
    if proj_size:
        kw["proj_size"] = proj_size
    ref, ours = pair(kind, dtype, **kw)
    g = torch.Generator().manual_seed(3)
    batch, steps = len(lengths), max(lengths)
    padded = torch.randn(batch, steps, D_IN, generator=g, dtype=dtype)
    shapes = state_shapes(kind, num_layers, bidirectional, batch, proj_size)
    hx = [torch.randn(s, generator=g, dtype=dtype) for s in shapes] if hx_given else None
    state_w = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    results = []
    out_w = None
    for module in (ref, ours):
        module.zero_grad(set_to_none=True)
        x = padded.clone().requires_grad_(True)
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=enforce_sorted)
        hx_leaves = [h.clone().requires_grad_(True) for h in hx] if hx_given else None
        if hx_given:
            out, hn = module(packed, tuple(hx_leaves) if kind == "LSTM" else hx_leaves[0])
        else:
            out, hn = module(packed)
        assert isinstance(out, PackedSequence)
        if out_w is None:
            out_w = torch.randn(out.data.shape, generator=g, dtype=dtype)
        states = as_states(kind, hn)
        loss = (out.data * out_w).sum() + sum((s * w).sum() for s, w in zip(states, state_w))
        loss.backward()
        results.append((out, states, x.grad, [h.grad for h in hx_leaves] if hx_leaves else [],
                        {n: p.grad for n, p in module.named_parameters()}))
    (o1, *rest1), (o2, *rest2) = results
    t = tol(dtype)
    torch.testing.assert_close(o2.batch_sizes, o1.batch_sizes)
    torch.testing.assert_close(o2.data, o1.data, **t)
    for index_name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(o1, index_name), getattr(o2, index_name)
        if a is None:
            assert b is None or torch.equal(b, torch.arange(batch)), index_name
        else:
            assert b is not None and torch.equal(a, b), index_name
    p1, l1 = pad_packed_sequence(o1, batch_first=True)
    p2, l2 = pad_packed_sequence(o2, batch_first=True)
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(p2, p1, **t)
    assert_same_run((o1.data, *rest1), (o2.data, *rest2), dtype)
    return results


PACKED_LENGTHS = {False: [3, 5, 1, 4], True: [5, 4, 3, 1]}


@pytest.mark.parametrize("hx_given", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_packed(kind, enforce_sorted, bidirectional, hx_given):
    check_packed(kind, PACKED_LENGTHS[enforce_sorted], enforce_sorted, bidirectional=bidirectional,
                 hx_given=hx_given)


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_parity_packed_lstm_proj_float64(enforce_sorted):
    check_packed("LSTM", PACKED_LENGTHS[enforce_sorted], enforce_sorted, proj_size=2, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_h_n_is_each_sequences_last_valid_state(kind):
    """h_n of a packed batch is, per sequence, the final state of that sequence run alone (unpadded)."""
    _, ours = pair(kind, num_layers=2, bidirectional=True)
    lengths = [2, 5, 3]
    seqs = [torch.randn(n, D_IN) for n in lengths]
    _, hn = ours(pack_sequence(seqs, enforce_sorted=False))
    hn = as_states(kind, hn)
    for b, s in enumerate(seqs):
        out_alone, hn_alone = ours(s)  # unbatched
        for full, alone in zip(hn, as_states(kind, hn_alone)):
            torch.testing.assert_close(full[:, b], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_sorted_input_keeps_none_indices(kind):
    ref, ours = pair(kind)
    packed = pack_sequence([torch.randn(n, D_IN) for n in (4, 3, 1)], enforce_sorted=True)
    out_ref, _ = ref(packed)
    out_ours, _ = ours(packed)
    assert out_ref.sorted_indices is None and out_ref.unsorted_indices is None
    assert out_ours.sorted_indices is None and out_ours.unsorted_indices is None


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_packed_tied_lengths_keep_input_order(enforce_sorted):
    ref, ours = pair("GRU", hidden=3)
    seqs = [torch.randn(n, D_IN) for n in [5] * 20 + [3] * 20]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out_ref, h_ref = ref(packed)
    out_ours, h_ours = ours(packed)
    torch.testing.assert_close(h_ours, h_ref, atol=1e-5, rtol=1e-5)  # h_n is in original order: fine
    torch.testing.assert_close(out_ours.data, out_ref.data, atol=1e-5, rtol=1e-5)


# ====================================================================== 2. state_dict, names, all_weights
STATE_CONFIGS = [
    (kind, layers, bias, bi, proj)
    for kind in ALL_KINDS for layers in (1, 2, 3) for bias in (True, False) for bi in (False, True)
    for proj in ((0, 2) if kind == "LSTM" else (0,))
]


def config_id(c):
    kind, layers, bias, bi, proj = c
    return f"{kind}-L{layers}-{'b' if bias else 'nob'}-{'bi' if bi else 'uni'}" + (f"-p{proj}" if proj else "")


def config_kwargs(c):
    _, layers, bias, bi, proj = c
    kw = dict(num_layers=layers, bias=bias, bidirectional=bi)
    if proj:
        kw["proj_size"] = proj
    return kw


@pytest.mark.parametrize("config", STATE_CONFIGS, ids=config_id)
def test_state_dict_layout_identical(config):
    kind = config[0]
    kw = config_kwargs(config)
    ref, ours = make_torch(kind, **kw), make_ours(kind, **kw)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)  # same keys, same order
    assert [(k, v.shape, v.dtype) for k, v in sd_ours.items()] == [(k, v.shape, v.dtype) for k, v in sd_ref.items()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # all_weights: one list per layer x direction, same order and shapes as torch's, the module's own Parameters
    assert len(ours.all_weights) == len(ref.all_weights)
    for mine, theirs in zip(ours.all_weights, ref.all_weights):
        assert [w.shape for w in mine] == [w.shape for w in theirs]
        assert all(isinstance(w, torch.nn.Parameter) for w in mine)
    params = list(ours.parameters())
    flat = [w for group in ours.all_weights for w in group]
    assert len(flat) == len(params) and all(a is b for a, b in zip(flat, params))


@pytest.mark.parametrize("config", [c for c in STATE_CONFIGS if c[1] != 3], ids=config_id)
def test_checkpoints_load_both_ways(config):
    kind = config[0]
    kw = config_kwargs(config)
    x = torch.randn(4, 2, D_IN)
    # torch -> droprnn: load unchanged (strict), same outputs
    ref, ours = make_torch(kind, **kw), make_ours(kind, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    # droprnn -> torch: a fresh droprnn module's state_dict loads into a fresh torch module (strict)
    ours2, ref2 = make_ours(kind, **kw), make_torch(kind, **kw)
    ref2.load_state_dict(ours2.state_dict(), strict=True)
    for k, v in ours2.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v)
    torch.testing.assert_close(ref2(x)[0], ours2(x)[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_mismatch_is_rejected_like_torch():
    """A checkpoint of a different configuration does not load silently."""
    ours = dnn.LSTM(D_IN, H, num_layers=2)
    with pytest.raises(RuntimeError):
        ours.load_state_dict(torch.nn.LSTM(D_IN, H, num_layers=1).state_dict(), strict=True)
    with pytest.raises(RuntimeError):
        ours.load_state_dict(torch.nn.LSTM(D_IN, H + 1, num_layers=2).state_dict(), strict=True)


def test_extras_do_not_change_state_dict():
    plain = torch.nn.LSTM(D_IN, H, num_layers=2, bidirectional=True)
    extra = dnn.LSTM(D_IN, H, num_layers=2, bidirectional=True, dropout=0.3, input_dropout=0.2,
                     recurrent_dropout=0.2, recurrent_dropout_mode="weights", zoneout_h=0.1, zoneout_c=0.1, seed=4)
    assert list(extra.state_dict()) == list(plain.state_dict())
    extra.load_state_dict(plain.state_dict(), strict=True)


def test_reset_parameters_uses_torch_init_bounds():
    torch.manual_seed(0)
    ours = dnn.GRU(D_IN, 16, num_layers=2, bidirectional=True)
    bound = 1 / 16 ** 0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound
        assert p.std() > bound / 4  # not zeros / not a degenerate init


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_flatten_parameters_is_a_noop(kind):
    ours = make_ours(kind, num_layers=2, bidirectional=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    params_before = list(ours.parameters())
    x = torch.randn(3, 2, D_IN)
    out_before = ours(x)[0]
    assert ours.flatten_parameters() is None
    assert all(a is b for a, b in zip(params_before, ours.parameters()))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])
    torch.testing.assert_close(ours(x)[0], out_before, atol=0, rtol=0)


@pytest.mark.parametrize("config", [c for c in STATE_CONFIGS if c[1] != 3], ids=config_id)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbd", "btd"])
def test_repr_has_torchs_fields(config, batch_first):
    kind = config[0]
    kw = dict(config_kwargs(config), batch_first=batch_first)
    ref, ours = make_torch(kind, **kw), make_ours(kind, **kw)
    r_ref, r_ours = repr(ref), repr(ours)
    assert r_ours.startswith(type(ref).__name__ + "(")
    fields = lambda r: set(re.match(r"\w+\((.*)\)$", r).group(1).split(", "))  # noqa: E731
    assert fields(r_ref) <= fields(r_ours)
    if not config[4]:  # torch places proj_size first; otherwise the text is torch's, except relu
        if config[0] == "RNN_RELU":
            assert r_ours == r_ref[:-1] + ", nonlinearity='relu')"
        else:
            assert r_ours == r_ref


def test_repr_shows_extras():
    text = repr(dnn.LSTM(D_IN, H, num_layers=2, dropout=0.25, input_dropout=0.1, recurrent_dropout=0.2,
                         zoneout_h=0.05, zoneout_c=0.15))
    for part in ("LSTM(3, 5", "num_layers=2", "dropout=0.25", "input_dropout=0.1", "recurrent_dropout=0.2",
                 "zoneout_h=0.05", "zoneout_c=0.15"):
        assert part in text, (part, text)


# ====================================================================== 3. between-layer dropout (torch's)
def layer_modules(kind, ours, bidirectional):
    """torch single-layer modules holding each layer of ``ours``."""
    layers = []
    for layer in range(ours.num_layers):
        in_size = D_IN if layer == 0 else H * (2 if bidirectional else 1)
        single = make_torch(kind, in_size, H, bidirectional=bidirectional)
        ours_sd = ours.state_dict()
        single.load_state_dict({k: ours_sd[k.replace("_l0", f"_l{layer}")] for k in single.state_dict()}, strict=True)
        layers.append(single)
    return layers


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_between_layer_dropout_is_torchs(kind, num_layers, bidirectional):
    """Training: a fresh element-wise inverted-dropout mask on every layer's output but the last;
    rebuilt here from torch single-layer modules and the module's between-layer stream."""
    p, seed = 0.4, 11
    ref, ours = pair(kind, num_layers=num_layers, bidirectional=bidirectional, dropout=p,
                     extras=dict(seed=seed))
    x = torch.randn(4, 3, D_IN)  # (T, B, D)
    ours.train()
    out_train, _ = ours(x)
    # expected: torch layer by layer; the masks come from the between-layer stream (one draw per gap),
    # drawn on droprnn's internal (B, T, F) layout
    stream = SeedStream(derived_seed(seed, 0x5EED))
    h = x
    for index, single in enumerate(layer_modules(kind, ours, bidirectional)):
        h, _ = single(h)
        if index < num_layers - 1:
            keep = keep_mask(tuple(h.transpose(0, 1).shape), p, stream, h.device).transpose(0, 1)
            h = torch.where(keep, h / (1 - p), torch.zeros(()))
    torch.testing.assert_close(out_train, h, atol=1e-5, rtol=1e-5)
    # eval: no dropout, equal to torch's eval output
    ours.eval()
    ref.eval()
    out_eval, hn_eval = ours(x)
    ref_eval, ref_hn = ref(x)
    torch.testing.assert_close(out_eval, ref_eval, atol=1e-5, rtol=1e-5)
    for a, b in zip(as_states(kind, hn_eval), as_states(kind, ref_hn)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (out_train - out_eval).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_between_layer_dropout_train_differs_from_eval_unseeded(kind):
    torch.manual_seed(5)
    ours = make_ours(kind, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, D_IN)
    ours.train()
    a, _ = ours(x)
    b, _ = ours(x)
    ours.eval()
    e, _ = ours(x)
    assert (a - e).abs().max() > 1e-3
    assert (a - b).abs().max() > 1e-3  # a fresh mask per call
    # the global RNG drives unseeded modules: same torch seed, same training output
    ours.train()
    torch.manual_seed(99)
    c1, _ = ours(x)
    torch.manual_seed(99)
    c2, _ = ours(x)
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_between_layer_dropout_no_effect_with_one_layer(kind):
    """As torch does, the module warns that the rate does nothing, and says where droprnn's masks are."""
    with pytest.warns(UserWarning, match="acts between stacked layers only.*input_dropout=.*recurrent_dropout="):
        ref, ours = pair(kind, num_layers=1, dropout=0.5, bidirectional=True)
    x = torch.randn(4, 2, D_IN)
    ours.train()
    ref.train()
    out_train, hn_train = ours(x)
    torch.testing.assert_close(out_train, ref(x)[0], atol=1e-5, rtol=1e-5)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], out_train, atol=0, rtol=0)


def test_between_layer_dropout_does_not_touch_final_states_of_last_layer_inputs_in_eval():
    """Final states: training with dropout changes h_n of layers after the first only."""
    ours = dnn.LSTM(D_IN, H, num_layers=2, dropout=0.5, seed=1)
    x = torch.randn(4, 2, D_IN)
    _, (h_train, c_train) = ours.train()(x)
    _, (h_eval, c_eval) = ours.eval()(x)
    torch.testing.assert_close(h_train[0], h_eval[0], atol=0, rtol=0)  # layer 0 sees no dropout
    torch.testing.assert_close(c_train[0], c_eval[0], atol=0, rtol=0)
    assert (h_train[1] - h_eval[1]).abs().max() > 1e-3


# ====================================================================== 4. droprnn extras
def extras_cases():
    cases = []
    for kind in ALL_KINDS:
        cases.append((kind, dict(input_dropout=0.3)))
        for mode in ("shared", "per_gate", "per_step"):
            cases.append((kind, dict(input_dropout=0.3, input_dropout_mode=mode)))
        for mode in RECURRENT_MODES:
            if kind.startswith("RNN") and mode in UPDATE_MODES:
                continue
            cases.append((kind, dict(recurrent_dropout=0.3, recurrent_dropout_mode=mode)))
        cases.append((kind, dict(zoneout_h=0.3)))
        if kind == "LSTM":
            cases.append(("LSTM", dict(zoneout_c=0.3)))
            cases.append(("LSTM", dict(zoneout_h=0.2, zoneout_c=0.2, input_dropout=0.2, recurrent_dropout=0.2)))
    return cases


EXTRAS = extras_cases()


def extras_id(case):
    kind, kw = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", EXTRAS, ids=extras_id)
def test_extras_change_training_only(case):
    kind, extras = case
    ref, ours = pair(kind, num_layers=2, bidirectional=True, extras=dict(extras, seed=21))
    x = torch.randn(5, 3, D_IN)
    ref.eval()
    expected, expected_hn = ref(x)
    ours.train()
    out_train, _ = ours(x)
    assert torch.isfinite(out_train).all()
    assert (out_train - expected).abs().max() > 1e-3
    ours.eval()
    out_eval, hn_eval = ours(x)
    if extras.get("zoneout_h", 0) or extras.get("zoneout_c", 0):
        # zoneout's expectation in eval: deterministic, but not torch's output
        torch.testing.assert_close(ours(x)[0], out_eval, atol=0, rtol=0)
        assert (out_eval - expected).abs().max() > 1e-4
    else:
        torch.testing.assert_close(out_eval, expected, atol=1e-5, rtol=1e-5)
        for a, b in zip(as_states(kind, hn_eval), as_states(kind, expected_hn)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _zoneout_reference(kind, ours, x, h0, c0, zh, zc):
    cell_cls = {"LSTM": torch.nn.LSTMCell, "GRU": torch.nn.GRUCell}.get(kind, torch.nn.RNNCell)
    cell_kw = {} if not kind.startswith("RNN") else {"nonlinearity": KINDS[kind][2]["nonlinearity"]}
    cell = cell_cls(D_IN, H, **cell_kw).to(x.dtype)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in ours.state_dict().items()}, strict=True)
    h, c = h0, c0
    outs = []
    for t in range(x.shape[0]):
        if kind == "LSTM":
            h_new, c_new = cell(x[t], (h, c))
            c = zc * c + (1 - zc) * c_new
        else:
            h_new = cell(x[t], h)
        h = zh * h + (1 - zh) * h_new
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zoneout_eval_matches_expectation_reference(kind):
    zh, zc = 0.3, 0.2
    extras = dict(zoneout_h=zh, zoneout_c=zc) if kind == "LSTM" else dict(zoneout_h=zh)
    _, ours = pair(kind, torch.float64, extras=extras)
    ours.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, D_IN, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, 2, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(1, 2, H, generator=g, dtype=torch.float64)
    out, hn = ours(x, (h0, c0) if kind == "LSTM" else h0)
    ref_out, ref_h, ref_c = _zoneout_reference(kind, ours, x, h0[0], c0[0], zh, zc if kind == "LSTM" else 0.0)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    states = as_states(kind, hn)
    torch.testing.assert_close(states[0][0], ref_h, atol=1e-10, rtol=1e-10)
    if kind == "LSTM":
        torch.testing.assert_close(states[1][0], ref_c, atol=1e-10, rtol=1e-10)


ALL_EXTRAS = dict(dropout=0.3, input_dropout=0.2, recurrent_dropout=0.25, zoneout_h=0.1)


@pytest.mark.parametrize("mode", ["keras", "per_step", "weights"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_seeded_modules_reproducible(kind, mode):
    extras = dict(ALL_EXTRAS, recurrent_dropout_mode=mode, input_dropout_mode="per_step" if mode == "per_step" else "keras")
    if kind == "LSTM":
        extras["zoneout_c"] = 0.1
    dropout = extras.pop("dropout")
    kw = dict(num_layers=2, bidirectional=True, dropout=dropout)
    a = make_ours(kind, **kw, **extras, seed=123)
    torch.manual_seed(777)  # different global RNG state between the two constructions
    b = make_ours(kind, **kw, **extras, seed=123)
    b.load_state_dict(a.state_dict())
    c = make_ours(kind, **kw, **extras, seed=124)
    c.load_state_dict(a.state_dict())
    x = torch.randn(5, 3, D_IN)
    a.train(), b.train(), c.train()
    torch.manual_seed(1)
    out_a1, hn_a1 = a(x)
    out_a2, _ = a(x)
    torch.manual_seed(2)  # the global RNG must not matter to seeded modules
    out_b1, hn_b1 = b(x)
    out_b2, _ = b(x)
    out_c1, _ = c(x)
    torch.testing.assert_close(out_b1, out_a1, atol=0, rtol=0)
    torch.testing.assert_close(out_b2, out_a2, atol=0, rtol=0)
    for s1, s2 in zip(as_states(kind, hn_a1), as_states(kind, hn_b1)):
        torch.testing.assert_close(s2, s1, atol=0, rtol=0)
    assert (out_a1 - out_a2).abs().max() > 1e-4  # new masks each call
    assert (out_a1 - out_c1).abs().max() > 1e-4  # another seed, other masks


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_layer_and_direction_has_its_own_stream(kind, num_layers, bidirectional):
    ours = make_ours(kind, num_layers=num_layers, bidirectional=bidirectional, recurrent_dropout=0.2, seed=42)
    seeds = [cell.seed_stream.seed for cell in ours._cells] + [ours.between_layers_stream.seed]
    assert len(ours._cells) == num_layers * (2 if bidirectional else 1)
    assert all(isinstance(s, int) for s in seeds)
    assert len(set(seeds)) == len(seeds)
    # streams step by one seed per draw: keep them far apart so no stream replays another's draws
    ordered = sorted(seeds)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 10_000
    unseeded = make_ours(kind, num_layers=num_layers, bidirectional=bidirectional, recurrent_dropout=0.2)
    assert all(cell.seed_stream.seed is None for cell in unseeded._cells)


@pytest.mark.parametrize("mode", ["keras", "tied", "weights"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bidirectional_directions_draw_different_masks(kind, mode):
    """Backward copy with the forward weights on a palindromic input mirrors the forward output exactly
    without dropout; with recurrent dropout it must not (its masks are drawn independently)."""
    ours = make_ours(kind, bidirectional=True, recurrent_dropout=0.4, recurrent_dropout_mode=mode, seed=8)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ours, f"{name}_l0_reverse").copy_(getattr(ours, f"{name}_l0"))
    half = torch.randn(3, 2, D_IN)
    x = torch.cat([half, half.flip(0)])  # x[t] == x[T-1-t]
    ours.eval()
    out, _ = ours(x)
    torch.testing.assert_close(out[..., H:].flip(0), out[..., :H], atol=1e-6, rtol=1e-6)
    ours.train()
    out, _ = ours(x)
    assert (out[..., H:].flip(0) - out[..., :H]).abs().max() > 1e-3


class Head(torch.nn.Module):
    """Selects the output sequence, as mc_predict wants one tensor per call."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.linear = torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 1)

    def forward(self, x):
        return self.linear(self.rnn(x)[0])


@pytest.mark.parametrize("extras", [dict(recurrent_dropout=0.3), dict(input_dropout=0.3), dict(dropout=0.3),
                                    dict(zoneout_h=0.3)], ids=lambda e: next(iter(e)))
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_mc_predict_on_nn_module(kind, extras):
    model = Head(make_ours(kind, num_layers=2, bidirectional=True, seed=3, **extras)).eval()
    x = torch.randn(4, 3, D_IN)
    mean, std, samples = droprnn.mc_predict(model, x, samples=6, return_samples=True)
    assert mean.shape == std.shape == (4, 3, 1) and samples.shape == (6, 4, 3, 1)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert std.max() > 1e-4
    torch.testing.assert_close(mean, samples.mean(0))
    assert not model.training and not model.rnn.training  # flags restored
    assert all(not m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_mc_predict_without_dropout_has_zero_spread(kind):
    model = Head(make_ours(kind, num_layers=2)).eval()
    x = torch.randn(4, 3, D_IN)
    mean, std = droprnn.mc_predict(model, x, samples=3)
    assert torch.equal(std, torch.zeros_like(std))
    torch.testing.assert_close(mean, model(x), atol=1e-6, rtol=1e-6)


def test_mc_predict_on_bare_nn_module_says_to_wrap():
    """A bare module returns (output, states); mc_predict asks for one tensor (a clear DroprnnError)."""
    with pytest.raises(DroprnnError, match="one tensor"):
        droprnn.mc_predict(dnn.LSTM(D_IN, H, recurrent_dropout=0.3), torch.randn(3, 2, D_IN), samples=2)


@pytest.mark.parametrize("kind,mode", [(k, m) for k in ALL_KINDS for m in RECURRENT_MODES
                                       if not (k.startswith("RNN") and m in UPDATE_MODES)])
def test_gradients_flow_with_recurrent_dropout(kind, mode):
    extras = dict(recurrent_dropout=0.3, recurrent_dropout_mode=mode, input_dropout=0.2, seed=5)
    ours = make_ours(kind, num_layers=2, bidirectional=True, dropout=0.2, **extras).train()
    x = torch.randn(4, 3, D_IN, requires_grad=True)
    out, _ = ours(x)
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


GRADCHECK_CASES = [
    ("LSTM", dict(recurrent_dropout=0.3, input_dropout=0.3, zoneout_h=0.3, zoneout_c=0.3)),
    ("LSTM", dict(recurrent_dropout=0.3, recurrent_dropout_mode="weights", proj_size=2)),
    ("GRU", dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step", zoneout_h=0.2)),
    ("RNN_TANH", dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", input_dropout=0.3,
                      input_dropout_mode="per_step")),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=extras_id)
def test_gradcheck_with_dropout(case):
    """Analytic gradients w.r.t. input, hx and every parameter equal finite differences in float64, with
    the masks held fixed (a deep copy of a seeded module redraws the same masks each call)."""
    kind, kw = case
    kw = dict(kw)
    proj = kw.pop("proj_size", 0)
    template = make_ours(kind, 2, 3, num_layers=2, bidirectional=True, dropout=0.3, seed=9,
                         **({"proj_size": proj} if proj else {}), **kw).double().train()
    names = [n for n, _ in template.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in template.parameters())
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    shapes = []
    n = 4
    shapes.append((n, 2, proj or 3))
    if kind == "LSTM":
        shapes.append((n, 2, 3))
    hx = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)

    def f(x, *rest):
        states, weights = rest[: len(shapes)], rest[len(shapes):]
        module = copy.deepcopy(template)
        out, hn = torch.func.functional_call(module, dict(zip(names, weights)),
                                             (x, tuple(states) if kind == "LSTM" else states[0]))
        return (out,) + as_states(kind, hn)

    assert torch.autograd.gradcheck(f, (x, *hx, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    # and the masks really are on: the output differs from the eval output
    out_train = f(x, *hx, *params)[0]
    module = copy.deepcopy(template).eval()
    out_eval, _ = torch.func.functional_call(module, dict(zip(names, params)),
                                             (x, hx if kind == "LSTM" else hx[0]))
    assert (out_train - out_eval).abs().max() > 1e-3


# ====================================================================== 5. errors
def rx(*parts):
    return ".*".join(re.escape(str(p)) for p in parts)


def where(kind):
    return "droprnn.nn." + ("RNN" if kind.startswith("RNN") else kind)


@pytest.mark.parametrize("shape", [(D_IN,), (2, 3, 4, D_IN)], ids=["1d", "4d"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_input_rank(kind, shape):
    ours = make_ours(kind)
    with pytest.raises(DroprnnError, match=rx(where(kind), "`input`", "got shape", shape)):
        ours(torch.randn(shape))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_input_not_a_tensor(kind):
    with pytest.raises(DroprnnError, match=rx(where(kind), "`input`", "list")):
        make_ours(kind)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("form", ["batched", "batch_first", "unbatched", "packed"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_wrong_feature_size(kind, form):
    ours = make_ours(kind, batch_first=form == "batch_first")
    bad = D_IN + 1
    x = {"batched": torch.randn(4, 2, bad), "batch_first": torch.randn(2, 4, bad), "unbatched": torch.randn(4, bad),
         "packed": pack_sequence([torch.randn(3, bad), torch.randn(2, bad)])}[form]
    with pytest.raises(DroprnnError, match=rx(where(kind), "`input`", f"{D_IN} features", "got shape")):
        ours(x)


def bad_hx_cases(kind):
    n, b = 2, 3  # num_layers=2, batch 3
    good_h, good_c = torch.zeros(n, b, H), torch.zeros(n, b, H)
    if kind == "LSTM":
        return {
            "h_layers": (torch.zeros(1, b, H), good_c),
            "h_batch": (torch.zeros(n, b + 1, H), good_c),
            "h_hidden": (torch.zeros(n, b, H + 1), good_c),
            "c_shape": (good_h, torch.zeros(n, b, H - 1)),
            "unbatched_hx_for_batch": (torch.zeros(n, H), torch.zeros(n, H)),
        }
    return {
        "h_layers": torch.zeros(1, b, H),
        "h_batch": torch.zeros(n, b + 1, H),
        "h_hidden": torch.zeros(n, b, H + 1),
        "unbatched_hx_for_batch": torch.zeros(n, H),
    }


@pytest.mark.parametrize("kind,case", [(k, c) for k in ALL_KINDS for c in bad_hx_cases(k)])
def test_error_hx_wrong_shape(kind, case):
    cases = bad_hx_cases(kind)
    ours = make_ours(kind, num_layers=2)
    name = "c_0" if case == "c_shape" else "h_0"
    with pytest.raises(DroprnnError, match=rx(where(kind), "`hx`", name, "got shape")):
        ours(torch.randn(4, 3, D_IN), cases[case])


def test_error_hx_shape_with_proj_size():
    ours = dnn.LSTM(D_IN, H, proj_size=2)
    x = torch.randn(4, 3, D_IN)
    ours(x, (torch.zeros(1, 3, 2), torch.zeros(1, 3, H)))  # right shapes work
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.LSTM", "`hx`", "h_0", "(1, 3, 2)", "got shape (1, 3, 5)")):
        ours(x, (torch.zeros(1, 3, H), torch.zeros(1, 3, H)))
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.LSTM", "`hx`", "c_0", "(1, 3, 5)", "got shape (1, 3, 2)")):
        ours(x, (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)))


def test_error_hx_shape_unbatched():
    ours = dnn.GRU(D_IN, H, num_layers=2)
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.GRU", "`hx`", "(2, 5)", "got shape (2, 1, 5)")):
        ours(torch.randn(4, D_IN), torch.zeros(2, 1, H))


@pytest.mark.parametrize("hx,got", [
    (torch.zeros(1, 2, H), "Tensor"),
    ((torch.zeros(1, 2, H),), "tuple"),
    ((torch.zeros(1, 2, H),) * 3, "tuple"),
    ([torch.zeros(1, 2, H), "c"], "str"),
], ids=["tensor", "1-tuple", "3-tuple", "str_c"])
def test_error_lstm_hx_type(hx, got):
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.LSTM", "`hx`", "got", got)):
        dnn.LSTM(D_IN, H)(torch.randn(4, 2, D_IN), hx)


@pytest.mark.parametrize("kind", ["GRU", "RNN_TANH"])
def test_error_gru_rnn_hx_type(kind):
    with pytest.raises(DroprnnError, match=rx(where(kind), "`hx`", "a tensor h_0", "got tuple")):
        make_ours(kind)(torch.randn(4, 2, D_IN), (torch.zeros(1, 2, H), torch.zeros(1, 2, H)))


@pytest.mark.parametrize("kind", ["GRU", "RNN_TANH", "RNN_RELU"])
def test_error_proj_size_on_gru_rnn(kind):
    with pytest.raises(DroprnnError, match=rx(where(kind), "`proj_size`", "LSTM")):
        make_ours(kind, proj_size=2)


@pytest.mark.parametrize("proj", [H, H + 3, -1, 2.0, True])
def test_error_bad_proj_size(proj):
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.LSTM", "`proj_size`", "got", repr(proj))):
        dnn.LSTM(D_IN, H, proj_size=proj)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "Tanh", None])
def test_error_bad_nonlinearity(nonlinearity):
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.RNN", "`nonlinearity`", "'tanh' or 'relu'", repr(nonlinearity))):
        dnn.RNN(D_IN, H, nonlinearity=nonlinearity)


@pytest.mark.parametrize("kind", ["GRU", "RNN_TANH"])
def test_error_zoneout_c_without_cell_state(kind):
    with pytest.raises(DroprnnError, match=rx(where(kind), "`zoneout_c`", "zoneout_h")):
        make_ours(kind, zoneout_c=0.2)
    make_ours(kind, zoneout_c=0.0)  # zero is accepted, as a no-op


@pytest.mark.parametrize("mode", sorted(UPDATE_MODES))
def test_error_update_modes_on_rnn(mode):
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.RNN", "`recurrent_dropout_mode`", mode)):
        dnn.RNN(D_IN, H, recurrent_dropout=0.2, recurrent_dropout_mode=mode)


@pytest.mark.parametrize("argument,value", [
    ("dropout", -0.1), ("dropout", 1.5), ("dropout", "0.2"), ("recurrent_dropout", -0.5), ("recurrent_dropout", 1.0), ("zoneout_h", -0.2), ("zoneout_h", 1.0),
], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_bad_rates(kind, argument, value):
    with pytest.raises(DroprnnError, match=rx(where(kind), f"`{argument}`", "[0, 1)")):
        make_ours(kind, **{argument: value})


@pytest.mark.parametrize("value", [-0.1, 1.0])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_bad_input_dropout_rejected(kind, value):
    with pytest.raises(DroprnnError, match=rx(where(kind), "[0, 1)", repr(value))):
        make_ours(kind, input_dropout=value)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_error_bad_input_dropout_names_input_dropout(kind):
    with pytest.raises(DroprnnError, match=rx(where(kind), "`input_dropout`", "[0, 1)")):
        make_ours(kind, input_dropout=-0.1)


def test_error_bad_zoneout_c_rate():
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.LSTM", "`zoneout_c`", "[0, 1)")):
        dnn.LSTM(D_IN, H, zoneout_c=-0.1)


@pytest.mark.parametrize("argument,value", [("recurrent_dropout_mode", "bogus"), ("input_dropout_mode", "keras2")])
def test_error_unknown_mode_lists_valid(argument, value):
    with pytest.raises(DroprnnError, match="(?s)" + rx("droprnn.nn.LSTM", f"`{argument}`", repr(value), "'keras'", "'per_step'")):
        dnn.LSTM(D_IN, H, **{argument: value})


@pytest.mark.parametrize("argument,value", [("input_size", 0), ("hidden_size", -2), ("num_layers", 0),
                                            ("num_layers", 1.5)])
def test_error_bad_sizes(argument, value):
    kw = dict(input_size=D_IN, hidden_size=H)
    kw[argument] = value
    with pytest.raises(DroprnnError, match=rx("droprnn.nn.GRU", f"`{argument}`", "an int > 0", repr(value))):
        dnn.GRU(**kw)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        dnn.LSTM(D_IN, H, dropout=-1)


def test_rnn_positional_nonlinearity_like_torch():
    ref = torch.nn.RNN(D_IN, H, 2, "relu")
    ours = dnn.RNN(D_IN, H, 2, "relu")
    assert ours.nonlinearity == "relu" and ours.bias is True
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, D_IN)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


# ====================================================================== 6. swap one import
MODEL_SOURCE = """
import torch
from {lib} import LSTM


class Regressor(torch.nn.Module):
    def __init__(self, **rnn_options):
        super().__init__()
        self.rnn = LSTM(2, 16, num_layers=2, batch_first=True, **rnn_options)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        output, (h_n, c_n) = self.rnn(x)
        return self.head(output[:, -1])
"""


def load_model_class(lib):
    namespace = {}
    exec(compile(MODEL_SOURCE.format(lib=lib), f"<model using {lib}>", "exec"), namespace)
    return namespace["Regressor"]


def test_swap_one_import_trains():
    torch_cls = load_model_class("torch.nn")
    ours_cls = load_model_class("droprnn.nn")
    torch.manual_seed(0)
    reference = torch_cls()
    model = ours_cls(recurrent_dropout=0.25, input_dropout=0.1, seed=0)
    model.load_state_dict(reference.state_dict(), strict=True)  # the torch model's checkpoint loads unchanged
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, 2, generator=g)
    y = x[..., 0].sum(1, keepdim=True) * 0.5 - x[:, -1, 1:] * 0.3  # a small learnable target
    model.eval()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)  # same function with dropout off
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = torch.nn.MSELoss()
    model.eval()
    with torch.no_grad():
        start = loss_fn(model(x), y).item()
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        end = loss_fn(model(x), y).item()
    assert end < 0.5 * start, (start, end)
    # the trained droprnn weights still load into the torch model and give the same eval function
    reference.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), atol=1e-5, rtol=1e-5)
