"""Finite-difference gradient checks (float64) of the cells and layers with both dropouts on and FIXED masks.

Masks are fixed (a plan drawn once, or ``CellMasks`` built by hand) so the function being checked is
deterministic. Gradients are taken w.r.t. inputs, initial states and the parameters (kernel,
recurrent_kernel, bias) substituted with ``torch.func.functional_call``.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import droprnn
from droprnn import CellMasks

F64 = torch.float64
B, T, D, U = 2, 3, 3, 2
PARAM_NAMES = ("kernel", "recurrent_kernel", "bias")


def _rand(*shape, scale=0.7):
    return (torch.randn(*shape, dtype=F64) * scale).requires_grad_()


def _mask(m, batch, feats, p):
    """Fixed inverted-dropout masks (m, batch, feats) with at least one zero and one kept entry per mask."""
    keep = torch.rand(m, batch, feats) >= p
    keep[:, 0, 0] = False
    keep[:, -1, -1] = True
    return keep.to(F64) / (1 - p)


def _check_uses_every_input(f, inputs):
    """gradcheck passes trivially for an input the function ignores; make sure each one matters."""
    outs = f(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * torch.randn_like(o)).sum() for o in outs)
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    for i, g in enumerate(grads):
        assert g is not None and bool(g.abs().sum() > 0), f"output does not depend on input {i}"


CELLS = {
    "lstm": lambda **kw: droprnn.LSTMCell(U, input_size=D, dtype=F64, **kw),
    "gru": lambda **kw: droprnn.GRUCell(U, reset_after=True, input_size=D, dtype=F64, **kw),
    "gru_v1": lambda **kw: droprnn.GRUCell(U, reset_after=False, input_size=D, dtype=F64, **kw),
    "simple": lambda **kw: droprnn.SimpleRNNCell(U, input_size=D, dtype=F64, **kw),
}
GATES = {"lstm": 4, "gru": 3, "gru_v1": 3, "simple": 1}
N_STATES = {"lstm": 2, "gru": 1, "gru_v1": 1, "simple": 1}


def _cell_function(cell, masks, n_states, prefix=""):
    def f(x, *rest):
        states = rest[:n_states]
        params = dict(zip((prefix + n for n in PARAM_NAMES), rest[n_states:]))
        out, new_states = functional_call(cell, params, (x, states, masks))
        return (out, *new_states)
    return f


def _cell_inputs(kind, cell):
    x = _rand(B, D)
    states = [_rand(B, U) for _ in range(N_STATES[kind])]
    params = [_rand(*p.shape) for p in (cell.kernel, cell.recurrent_kernel, cell.bias)]
    return (x, *states, *params)


def _cell_masks(kind, shared_input=False):
    g = GATES[kind]
    return CellMasks(input=_mask(1 if shared_input else g, B, D, 0.4), recurrent=_mask(g, B, U, 0.3))


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_gradcheck_with_fixed_masks(kind):
    cell = CELLS[kind](dropout=0.4, recurrent_dropout=0.3)
    masks = _cell_masks(kind)
    inputs = _cell_inputs(kind, cell)
    f = _cell_function(cell, masks, N_STATES[kind])
    _check_uses_every_input(f, inputs)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_gradcheck_with_masks_from_a_drawn_plan(kind):
    """The masks a layer would draw (per gate, both dropouts) used as fixed data for the cell."""
    cell = CELLS[kind](dropout=0.4, recurrent_dropout=0.3)
    layer = droprnn.RNN(cell)
    plan = layer.draw_dropout_plan(B, training=True)
    masks = plan.cells[0]
    assert masks.input.shape == (GATES[kind], B, D) and masks.recurrent.shape == (GATES[kind], B, U)
    f = _cell_function(cell, masks, N_STATES[kind])
    inputs = _cell_inputs(kind, cell)
    _check_uses_every_input(f, inputs)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_v1"])
def test_gradient_is_zero_for_dropped_input_features(kind):
    """With one shared input mask, a dropped feature of a sample gets exactly zero gradient; kept ones don't."""
    cell = CELLS[kind](dropout=0.5)
    masks = CellMasks(input=_mask(1, B, D, 0.5))
    x, *rest = _cell_inputs(kind, cell)
    out, _ = functional_call(cell, dict(zip(PARAM_NAMES, rest[N_STATES[kind]:])),
                             (x, tuple(rest[:N_STATES[kind]]), masks))
    (grad,) = torch.autograd.grad(out.sum(), x)
    dropped = masks.input[0] == 0
    assert bool((grad[dropped] == 0).all())
    assert bool((grad[~dropped] != 0).all())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_gradgradcheck(kind):
    cell = CELLS[kind](dropout=0.4, recurrent_dropout=0.3)
    f = _cell_function(cell, _cell_masks(kind), N_STATES[kind])
    assert gradgradcheck(f, _cell_inputs(kind, cell), eps=1e-6, atol=1e-6, rtol=1e-4)


LAYERS = {
    "lstm": lambda **kw: droprnn.LSTM(U, **kw),
    "gru": lambda **kw: droprnn.GRU(U, reset_after=True, **kw),
    "gru_v1": lambda **kw: droprnn.GRU(U, reset_after=False, **kw),
}


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_gradcheck_with_fixed_plan_lengths_and_go_backwards(kind, go_backwards):
    layer = LAYERS[kind](dropout=0.4, recurrent_dropout=0.3, return_sequences=True, return_state=True,
                         go_backwards=go_backwards, input_size=D, dtype=F64)
    plan = layer.draw_dropout_plan(B, training=True)
    assert not plan.empty
    lengths = torch.tensor([T, 2])
    n = N_STATES[kind]

    def f(x, *rest):
        states, params = list(rest[:n]), rest[n:]
        named = {f"cell.{name}": p for name, p in zip(PARAM_NAMES, params)}
        return functional_call(layer, named, (x,), dict(lengths=lengths, initial_state=states, dropout_plan=plan))

    cell = layer.cell
    inputs = (_rand(B, T, D), *[_rand(B, U) for _ in range(n)],
              *[_rand(*p.shape) for p in (cell.kernel, cell.recurrent_kernel, cell.bias)])
    # the fixed plan makes repeated calls identical (a precondition of finite differences)
    first, second = f(*inputs), f(*inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _check_uses_every_input(f, inputs)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_stacked_layer_gradcheck_with_fixed_plan():
    cells = [droprnn.LSTMCell(U, dropout=0.3, recurrent_dropout=0.3),
             droprnn.GRUCell(U, dropout=0.3, recurrent_dropout=0.3)]
    layer = droprnn.RNN(cells, return_sequences=True, input_size=D, dtype=F64)
    plan = layer.draw_dropout_plan(B, training=True)
    assert plan.cells[1].input.shape == (3, B, U)
    lengths = torch.tensor([2, T])

    def f(x, *params):
        named = {f"cell.cells.{k}.{name}": p
                 for k in range(2) for name, p in zip(PARAM_NAMES, params[3 * k:3 * k + 3])}
        return functional_call(layer, named, (x,), dict(lengths=lengths, dropout_plan=plan))

    inputs = (_rand(B, T, D), *[_rand(*p.shape) for p in layer.keras_weights()])
    _check_uses_every_input(f, inputs)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_layer_gradgradcheck_small():
    layer = droprnn.GRU(U, dropout=0.4, recurrent_dropout=0.3, return_sequences=True, input_size=D, dtype=F64)
    plan = layer.draw_dropout_plan(B, training=True)

    def f(x, kernel):
        return functional_call(layer, {"cell.kernel": kernel}, (x,), dict(lengths=torch.tensor([T, 2]),
                                                                           dropout_plan=plan))

    assert gradgradcheck(f, (_rand(B, T, D), _rand(D, 3 * U)), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_plan_gradient_matches_manual_chain_rule_for_simple_rnn():
    """d/dx of a one-step linear SimpleRNN with masks is K masked by the input mask: exact check."""
    cell = droprnn.SimpleRNNCell(U, activation=None, input_size=D, dtype=F64)
    m = _mask(1, B, D, 0.5)
    x = _rand(B, D)
    h = _rand(B, U)
    out, _ = cell(x, (h,), CellMasks(input=m, recurrent=_mask(1, B, U, 0.5)))
    w = torch.randn(B, U, dtype=F64)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(gx, (w @ cell.kernel.detach().T) * m[0], rtol=0, atol=1e-14)
