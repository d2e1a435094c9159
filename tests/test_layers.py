"""Behaviour of droprnn's layers, cells, initializers, activations and CLI (pure droprnn + torch, no Keras)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import droprnn
from droprnn import (
    GRU, LSTM, RNN, Bidirectional, Dense, DroprnnError, Dropout, Embedding, GRUCell, LSTMCell, Masking,
    Sequential, SimpleRNN, SimpleRNNCell, TimeDistributed, activations, initializers,
)

B, T, D, U = 3, 5, 4, 6

LAYERS = {"lstm": LSTM, "gru": GRU, "simple_rnn": SimpleRNN}
N_STATES = {"lstm": 2, "gru": 1, "simple_rnn": 1}


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **kw)


def clone_weights(src, dst):
    dst.set_weights(src.get_weights())
    return dst


def lstm_step_by_hand(x_t, h, c, kernel, recurrent_kernel, bias):
    """One Keras LSTM step (gates i, f, c, o) written out, to pin down the meaning of [h, c]."""
    z = x_t @ kernel + h @ recurrent_kernel + bias
    zi, zf, zc, zo = z.chunk(4, dim=-1)
    c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zc)
    h_new = torch.sigmoid(zo) * torch.tanh(c_new)
    return h_new, c_new


def simple_rnn_by_hand(x, cell):
    """The SimpleRNN recurrence on (B, T, D), from the cell's Keras weights; returns (B, T, U)."""
    h = torch.zeros(x.shape[0], cell.units)
    out = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ cell.kernel + cell.bias + h @ cell.recurrent_kernel)
        out.append(h)
    return torch.stack(out, dim=1)


# ============================================================================ the question droprnn answers
def test_the_keras_users_seed_example_runs_verbatim():
    features_size = 7
    model = Sequential()
    model.add(GRU(units=512, return_sequences=True, dropout=0.5, input_shape=(None, features_size)))
    model.add(Dropout(0.5))
    y = model(torch.randn(8, 30, features_size))
    assert y.shape == (8, 30, 512)
    assert torch.isfinite(y).all()
    # the GRU was built from input_shape, before any call, with Keras's weight shapes
    gru = model[0]
    assert [w.shape for w in gru.get_weights()] == [(features_size, 1536), (512, 1536), (2, 1536)]


# ============================================================================ input size and lazy build
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("how", ["input_shape", "input_size"])
def test_declared_input_size_builds_now(kind, how):
    layer = LAYERS[kind](U, **({"input_shape": (None, D)} if how == "input_shape" else {"input_size": D}))
    assert layer.built and layer.input_size == D
    assert layer.cell.kernel.shape[0] == D
    assert layer(torch.randn(B, T, D)).shape == (B, U)


def test_input_shape_and_input_size_disagreeing_raises():
    with pytest.raises(DroprnnError, match="input_shape"):
        LSTM(U, input_shape=(None, D), input_size=D + 1)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_lazy_build_on_first_call(kind):
    layer = LAYERS[kind](U)
    assert not layer.built
    assert list(layer.parameters()) == []
    with pytest.raises(DroprnnError, match="weights do not exist yet"):
        layer.get_weights()
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = layer(x)
    assert layer.built and layer.input_size == D
    params = list(layer.parameters())
    assert len(params) == 3 and all(p.dtype == torch.float64 for p in params)
    assert y.dtype == torch.float64
    # a later call with another feature size is refused
    with pytest.raises(DroprnnError, match="features"):
        layer(torch.randn(B, T, D + 1, dtype=torch.float64))


def test_lazy_build_uses_the_input_device():
    layer = LSTM(U, return_sequences=True)
    y = layer(torch.randn(B, T, D, device="meta"))
    assert layer.cell.kernel.device.type == "meta"
    assert y.device.type == "meta" and y.shape == (B, T, U)


def test_get_weights_before_build_raises_for_dense_and_bidirectional():
    with pytest.raises(DroprnnError):
        Dense(3).get_weights()
    with pytest.raises(DroprnnError):
        Bidirectional(LSTM(3)).get_weights()


# ============================================================================ output shapes
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
def test_output_shapes(kind, return_sequences, return_state):
    layer = LAYERS[kind](U, return_sequences=return_sequences, return_state=return_state)
    result = layer(torch.randn(B, T, D))
    out_shape = (B, T, U) if return_sequences else (B, U)
    if not return_state:
        assert torch.is_tensor(result) and result.shape == out_shape
        return
    assert isinstance(result, tuple) and len(result) == 1 + N_STATES[kind]
    output, *states = result
    assert output.shape == out_shape
    assert all(s.shape == (B, U) for s in states)
    # the output of the last step is the final h
    last = output[:, -1] if return_sequences else output
    close(last, states[0])


def test_stacked_cells_return_per_cell_state_tuples():
    layer = RNN([LSTMCell(5), GRUCell(4), SimpleRNNCell(3)], return_sequences=True, return_state=True)
    output, lstm_states, gru_states, rnn_states = layer(torch.randn(B, T, D))
    assert output.shape == (B, T, 3)
    assert isinstance(lstm_states, tuple) and [s.shape for s in lstm_states] == [(B, 5), (B, 5)]
    assert isinstance(gru_states, tuple) and [s.shape for s in gru_states] == [(B, 4)]
    assert isinstance(rnn_states, tuple) and [s.shape for s in rnn_states] == [(B, 3)]
    close(output[:, -1], rnn_states[0])
    # each cell is built on the previous cell's output size
    assert [c.input_size for c in layer.cells] == [D, 5, 4]


def test_stacked_cells_equal_layers_applied_one_after_another():
    x = torch.randn(B, T, D)
    stacked = RNN([LSTMCell(5), GRUCell(4)], return_sequences=True, input_size=D)
    first = LSTM(5, return_sequences=True, input_size=D)
    second = GRU(4, return_sequences=True, input_size=5)
    w = stacked.get_weights()
    first.set_weights(w[:3])
    second.set_weights(w[3:])
    close(stacked(x), second(first(x)))


def test_stacked_initial_state_per_cell():
    layer = RNN([LSTMCell(5), GRUCell(4)], return_state=True, input_size=D)
    x = torch.randn(B, T, D)
    init = [[torch.randn(B, 5), torch.randn(B, 5)], [torch.randn(B, 4)]]
    _, s1, s2 = layer(x, initial_state=init)
    first = RNN(LSTMCell(5), return_sequences=True, return_state=True, input_size=D)
    first.set_weights(layer.get_weights()[:3])
    y1, h1, c1 = first(x, initial_state=init[0])
    second = GRU(4, return_state=True, input_size=5)
    second.set_weights(layer.get_weights()[3:])
    _, h2 = second(y1, initial_state=init[1])
    close(s1[0], h1)
    close(s1[1], c1)
    close(s2[0], h2)


# ============================================================================ Bidirectional
@pytest.mark.parametrize("merge_mode,width", [("concat", 2 * U), ("sum", U), ("ave", U), ("mul", U)])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_bidirectional_merge_widths(merge_mode, width, return_sequences):
    bi = Bidirectional(GRU(U, return_sequences=return_sequences), merge_mode=merge_mode)
    y = bi(torch.randn(B, T, D))
    assert y.shape == ((B, T, width) if return_sequences else (B, width))


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul", None])
def test_bidirectional_merge_values(merge_mode):
    x = torch.randn(B, T, D)
    bi = Bidirectional(SimpleRNN(U, return_sequences=True), merge_mode=merge_mode, input_size=D)
    fwd = simple_rnn_by_hand(x, bi.forward_layer.cell)
    bwd = simple_rnn_by_hand(x.flip(1), bi.backward_layer.cell).flip(1)
    expected = {
        "concat": torch.cat([fwd, bwd], -1), "sum": fwd + bwd, "ave": (fwd + bwd) / 2, "mul": fwd * bwd,
    }
    y = bi(x)
    if merge_mode is None:
        assert isinstance(y, tuple) and len(y) == 2
        close(y[0], fwd)
        close(y[1], bwd)
    else:
        close(y, expected[merge_mode])


def test_bidirectional_backward_copy_has_its_own_weights_and_direction():
    bi = Bidirectional(LSTM(U), input_size=D)
    assert bi.backward_layer.go_backwards and not bi.forward_layer.go_backwards
    assert not torch.equal(bi.forward_layer.cell.kernel, bi.backward_layer.cell.kernel)
    w = bi.get_weights()
    assert len(w) == 6
    np.testing.assert_array_equal(w[0], bi.forward_layer.cell.kernel.detach().numpy())
    np.testing.assert_array_equal(w[3], bi.backward_layer.cell.kernel.detach().numpy())


def test_bidirectional_last_output_without_sequences():
    x = torch.randn(B, T, D)
    bi = Bidirectional(SimpleRNN(U), input_size=D)
    fwd = simple_rnn_by_hand(x, bi.forward_layer.cell)
    bwd = simple_rnn_by_hand(x.flip(1), bi.backward_layer.cell)
    # backward "last output" is the state after consuming x_0
    close(bi(x), torch.cat([fwd[:, -1], bwd[:, -1]], -1))


@pytest.mark.parametrize("merge_mode", ["concat", None])
def test_bidirectional_return_state_ordering(merge_mode):
    x = torch.randn(B, T, D)
    bi = Bidirectional(LSTM(U, return_sequences=True, return_state=True), merge_mode=merge_mode, input_size=D)
    result = bi(x)
    if merge_mode is None:
        assert len(result) == 6
        y_f, y_b, fh, fc, bh, bc = result
    else:
        assert len(result) == 5
        y, fh, fc, bh, bc = result
        y_f, y_b = y[..., :U], y[..., U:]
    _, fh_ref, fc_ref = bi.forward_layer(x)
    _, bh_ref, bc_ref = bi.backward_layer(x)
    close(fh, fh_ref)
    close(fc, fc_ref)
    close(bh, bh_ref)
    close(bc, bc_ref)
    # time alignment: forward ends at t = T-1, backward (flipped back) ends at t = 0
    close(y_f[:, -1], fh)
    close(y_b[:, 0], bh)


def test_bidirectional_initial_state_halves():
    x = torch.randn(B, T, D)
    bi = Bidirectional(LSTM(U, return_state=True), input_size=D)
    init = [torch.randn(B, U) for _ in range(4)]
    y, fh, fc, bh, bc = bi(x, initial_state=init)
    y_f, fh_ref, fc_ref = bi.forward_layer(x, initial_state=init[:2])
    y_b, bh_ref, bc_ref = bi.backward_layer(x, initial_state=init[2:])
    close(y, torch.cat([y_f, y_b], -1))
    close((fh, fc, bh, bc), (fh_ref, fc_ref, bh_ref, bc_ref))
    # and the given states matter
    assert not torch.allclose(y, bi(x)[0])


def test_bidirectional_odd_initial_state_raises():
    bi = Bidirectional(GRU(U), input_size=D)
    with pytest.raises(DroprnnError, match="initial_state"):
        bi(torch.randn(B, T, D), initial_state=[torch.zeros(B, U)] * 3)


def test_bidirectional_masked_sequences_zero_padding_in_both_directions():
    x = torch.randn(2, T, D)
    lengths = torch.tensor([T, 3])
    bi = Bidirectional(GRU(U, return_sequences=True), input_size=D)
    y = bi(x, lengths=lengths)
    assert torch.all(y[1, 3:] == 0)  # zero_output_for_mask forced on both sub-layers
    # the unpadded part equals running the short sequence alone
    close(y[1:, :3], bi(x[1:, :3]))


# ============================================================================ go_backwards
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("return_sequences", [False, True])
def test_go_backwards_equals_forward_on_reversed_input(kind, return_sequences):
    x = torch.randn(B, T, D)
    back = LAYERS[kind](U, go_backwards=True, return_sequences=return_sequences, input_size=D)
    fwd = clone_weights(back, LAYERS[kind](U, return_sequences=return_sequences, input_size=D))
    close(back(x), fwd(x.flip(1)))


def test_go_backwards_sequences_stay_in_processing_order():
    # identity SimpleRNN (linear, kernel 1, no recurrence): outputs are the inputs in processing order
    layer = SimpleRNN(1, activation="linear", kernel_initializer="ones", recurrent_initializer="zeros",
                      go_backwards=True, return_sequences=True, input_size=1)
    y = layer(torch.tensor([[[1.0], [2.0], [3.0]]]))
    assert y.flatten().tolist() == [3.0, 2.0, 1.0]


# ============================================================================ masking semantics
@pytest.mark.parametrize("kind", list(LAYERS))
def test_masked_steps_carry_every_state(kind):
    torch.manual_seed(0)
    x = torch.randn(2, T, D)
    mask = torch.tensor([[True, True, False, True, True], [True, False, True, False, True]])
    layer = LAYERS[kind](U, return_sequences=True, return_state=True, input_size=D)
    seq, *states = layer(x, mask=mask)
    for i in range(2):
        # dropping the masked steps altogether gives the same final states (h and c)
        _, *ref_states = layer(x[i : i + 1, mask[i]])
        for s, r in zip(states, ref_states):
            close(s[i : i + 1], r)
        # a masked step repeats the previous output
        for t in range(1, T):
            if not mask[i, t]:
                assert torch.equal(seq[i, t], seq[i, t - 1])


def test_masked_lstm_cell_state_is_held_not_just_h():
    x = torch.randn(1, 3, D)
    layer = LSTM(U, return_state=True, input_size=D)
    _, h_all, c_all = layer(x, mask=torch.tensor([[True, True, False]]))
    _, h2, c2 = layer(x[:, :2])
    close(h_all, h2)
    close(c_all, c2)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_zero_output_for_mask(kind):
    x = torch.randn(2, T, D)
    mask = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    plain = LAYERS[kind](U, return_sequences=True, return_state=True, input_size=D)
    zeroing = clone_weights(plain, LAYERS[kind](U, return_sequences=True, return_state=True,
                                                 zero_output_for_mask=True, input_size=D))
    seq_p, *st_p = plain(x, mask=mask)
    seq_z, *st_z = zeroing(x, mask=mask)
    assert torch.all(seq_z[~mask] == 0)
    close(seq_z[mask], seq_p[mask])
    close(st_z, st_p)  # states are unaffected by the flag
    # return_sequences=False: last step masked -> last output is zero with the flag, previous output without
    last_z = clone_weights(plain, LAYERS[kind](U, zero_output_for_mask=True, input_size=D))(x, mask=mask)
    last_p = clone_weights(plain, LAYERS[kind](U, input_size=D))(x, mask=mask)
    assert torch.all(last_z[0] == 0)
    close(last_p[0], seq_p[0, 3])
    close(last_z[1], last_p[1])


def test_first_step_masked_outputs_zero_even_with_initial_state():
    x = torch.randn(1, 3, D)
    layer = GRU(U, return_sequences=True, return_state=True, input_size=D)
    h0 = torch.full((1, U), 0.7)
    mask = torch.tensor([[False, True, True]])
    seq, h = layer(x, mask=mask, initial_state=h0)
    assert torch.all(seq[0, 0] == 0)
    seq_ref, h_ref = layer(x[:, 1:], initial_state=h0)  # the masked first step kept h0
    close(seq[:, 1:], seq_ref)
    close(h, h_ref)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fully_masked_sample_returns_initial_state(kind):
    x = torch.randn(2, T, D)
    layer = LAYERS[kind](U, return_state=True, input_size=D)
    init = [torch.randn(2, U) for _ in range(N_STATES[kind])]
    mask = torch.tensor([[False] * T, [True] * T])
    out, *states = layer(x, mask=mask, initial_state=init)
    for s, s0 in zip(states, init):
        assert torch.equal(s[0], s0[0])
        assert not torch.allclose(s[1], s0[1])
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_lengths_equal_boolean_mask(kind):
    x = torch.randn(B, T, D)
    lengths = torch.tensor([T, 2, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    layer = LAYERS[kind](U, return_sequences=True, return_state=True, input_size=D)
    close(layer(x, lengths=lengths), layer(x, mask=mask))
    close(layer(x, lengths=lengths.tolist()), layer(x, mask=mask))


def test_integer_01_mask_equals_bool_mask():
    x = torch.randn(B, T, D)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    layer = LSTM(U, return_sequences=True, input_size=D)
    y_int = layer(x, mask=mask)
    close(y_int, layer(x, mask=mask.bool()))
    assert not torch.allclose(y_int, layer(x))


def test_mask_and_lengths_together_raise():
    layer = LSTM(U, input_size=D)
    with pytest.raises(DroprnnError, match="not both"):
        layer(torch.randn(B, T, D), mask=torch.ones(B, T, dtype=torch.bool), lengths=[T] * B)


@pytest.mark.parametrize("bad", [[T + 1, 1, 1], [-1, 1, 1], [1.5, 1, 1]])
def test_bad_lengths_raise(bad):
    with pytest.raises(DroprnnError, match="lengths"):
        GRU(U, input_size=D)(torch.randn(B, T, D), lengths=torch.tensor(bad))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_right_padded_last_output_equals_unpadded_sequence(kind):
    lengths = [5, 2, 3]
    x = torch.randn(3, 5, D)
    for i, n in enumerate(lengths):
        x[i, n:] = 9.0  # garbage in the padding must not leak
    layer = LAYERS[kind](U, input_size=D)
    y = layer(x, lengths=torch.tensor(lengths))
    for i, n in enumerate(lengths):
        close(y[i : i + 1], layer(x[i : i + 1, :n]))


def test_stacked_mask_holds_all_cells_states():
    layer = RNN([LSTMCell(4), GRUCell(3)], return_state=True, input_size=D)
    x = torch.randn(1, T, D)
    mask = torch.tensor([[True, False, True, True, False]])
    _, s1, s2 = layer(x, mask=mask)
    _, r1, r2 = layer(x[:, mask[0]])
    close((s1, s2), (r1, r2))


# ============================================================================ Masking / Embedding / Sequential masks
def test_masking_compute_mask_and_zeroing():
    x = torch.randn(2, 4, 3)
    x[0, 1] = 0.0
    x[1, 3] = 0.0
    x[1, 0, 0] = 0.0  # one zero feature does not mask the step
    layer = Masking(0.0)
    mask = layer.compute_mask(x)
    assert torch.equal(mask, (x != 0).any(-1))
    assert mask.tolist() == [[True, False, True, True], [True, True, True, False]]
    y = layer(x)
    assert torch.equal(y, x)  # masked steps were already zero
    x2 = torch.full((1, 3, 2), -1.0)
    x2[0, 1] = torch.tensor([-1.0, 5.0])
    y2 = Masking(-1.0)(x2)
    assert Masking(-1.0).compute_mask(x2).tolist() == [[False, True, False]]
    assert torch.equal(y2, torch.tensor([[[0.0, 0.0], [-1.0, 5.0], [0.0, 0.0]]]))


def test_sequential_masking_then_lstm_equals_lstm_with_mask():
    x = torch.randn(B, T, D)
    x[0, 3:] = 0.0
    x[2, 1] = 0.0
    lstm = LSTM(U, input_size=D)
    model = Sequential([Masking(0.0), lstm])
    mask = (x != 0).any(-1)
    y = model(x)
    close(y, lstm(x, mask=mask))
    assert not torch.allclose(y, lstm(x))


def test_embedding_mask_zero_passed_to_the_next_rnn():
    ids = torch.tensor([[3, 5, 2, 0, 0], [1, 1, 1, 1, 1], [7, 0, 4, 0, 0]])
    emb = Embedding(10, D, mask_zero=True)
    gru = GRU(U, input_size=D)
    model = Sequential([emb, gru])
    y = model(ids)
    close(y, gru(emb(ids), mask=ids != 0))
    assert not torch.allclose(y, gru(emb(ids)))
    assert torch.equal(emb.compute_mask(ids), ids != 0)
    assert Embedding(10, D).compute_mask(ids) is None


def test_mask_passes_through_a_return_sequences_lstm_to_the_next():
    ids = torch.tensor([[3, 5, 2, 0, 0], [6, 1, 8, 9, 1]])
    emb = Embedding(10, D, mask_zero=True)
    first = LSTM(U, return_sequences=True, input_size=D)
    second = LSTM(3, input_size=U)
    model = Sequential([emb, first, second])
    mask = ids != 0
    expected = second(first(emb(ids), mask=mask), mask=mask)
    close(model(ids), expected)
    assert not torch.allclose(model(ids), second(first(emb(ids), mask=mask)))
    # a non-sequence RNN ends the mask
    assert LSTM(U).compute_mask(emb(ids), mask) is None
    assert torch.equal(first.compute_mask(emb(ids), mask), mask)


def test_dense_passes_the_mask_through():
    x = torch.randn(B, T, D)
    x[1, 2:] = 0.0
    dense = Dense(5, input_size=D, bias_initializer="ones")  # padding no longer 0 after Dense
    lstm = LSTM(U, input_size=5)
    model = Sequential([Masking(0.0), dense, lstm])
    mask = (x != 0).any(-1)
    assert torch.equal(dense.compute_mask(x, mask), mask)
    close(model(x), lstm(dense(x), mask=mask))
    assert not torch.allclose(model(x), lstm(dense(x)))


def test_sequential_lengths_argument():
    x = torch.randn(B, T, D)
    lstm = LSTM(U, input_size=D)
    model = Sequential([lstm])
    close(model(x, lengths=torch.tensor([5, 2, 3])), lstm(x, lengths=torch.tensor([5, 2, 3])))


def test_plain_torch_module_ends_the_mask():
    x = torch.randn(B, T, D)
    x[0, 3:] = 0.0
    lstm = LSTM(U, input_size=D)
    model = Sequential([Masking(0.0), torch.nn.Identity(), lstm])
    close(model(x), lstm(x))


# ============================================================================ stateful
@pytest.mark.parametrize("kind", list(LAYERS))
def test_stateful_second_call_continues_from_first(kind):
    x1, x2 = torch.randn(B, 3, D), torch.randn(B, 4, D)
    stateful = LAYERS[kind](U, stateful=True, return_state=True, input_size=D)
    plain = clone_weights(stateful, LAYERS[kind](U, return_state=True, input_size=D))
    stateful(x1)
    y2, *s2 = stateful(x2)
    y_ref, *s_ref = plain(torch.cat([x1, x2], dim=1))
    close(y2, y_ref)
    close(s2, s_ref)


def test_stateful_states_are_detached():
    layer = LSTM(U, stateful=True, input_size=D)
    x1 = torch.randn(B, T, D, requires_grad=True)
    x2 = torch.randn(B, T, D, requires_grad=True)
    layer(x1).sum().backward()  # frees the first call's graph
    x1.grad = None
    layer(x2).sum().backward()  # must not reach back into the freed graph
    assert x1.grad is None
    assert x2.grad is not None and x2.grad.abs().sum() > 0
    assert all(not s.requires_grad for cell_states in layer.states for s in cell_states)


def test_stateful_reset_state_starts_from_zeros():
    x = torch.randn(B, T, D)
    layer = GRU(U, stateful=True, input_size=D)
    first = layer(x)
    assert not torch.allclose(layer(x), first)  # carried state changes the result
    layer.reset_state()
    close(layer(x), first)
    layer.reset_states()  # Keras 2 name
    close(layer(x), first)


def test_stateful_batch_size_is_fixed_until_reset():
    layer = LSTM(U, stateful=True, input_size=D)
    layer(torch.randn(B, T, D))
    with pytest.raises(DroprnnError, match="batch size"):
        layer(torch.randn(B + 1, T, D))
    layer.reset_state()
    assert layer(torch.randn(B + 1, T, D)).shape == (B + 1, U)


# ============================================================================ initial_state
def test_lstm_initial_state_is_h_then_c():
    x = torch.randn(B, 1, D)
    layer = LSTM(U, return_state=True, input_size=D)
    h0, c0 = torch.randn(B, U), torch.randn(B, U)
    y, h, c = layer(x, initial_state=[h0, c0])
    cell = layer.cell
    h_ref, c_ref = lstm_step_by_hand(x[:, 0], h0, c0, cell.kernel, cell.recurrent_kernel, cell.bias)
    close(h, h_ref)
    close(c, c_ref)
    close(y, h_ref)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_initial_state_is_respected(kind):
    x = torch.randn(B, T, D)
    layer = LAYERS[kind](U, input_size=D)
    zeros = [torch.zeros(B, U) for _ in range(N_STATES[kind])]
    ones = [torch.ones(B, U) for _ in range(N_STATES[kind])]
    close(layer(x, initial_state=zeros), layer(x))
    assert not torch.allclose(layer(x, initial_state=ones), layer(x))


def test_gru_accepts_a_single_tensor_initial_state():
    x = torch.randn(B, T, D)
    layer = GRU(U, input_size=D)
    h0 = torch.randn(B, U)
    close(layer(x, initial_state=h0), layer(x, initial_state=[h0]))


@pytest.mark.parametrize("bad", [[torch.zeros(B, U)], [torch.zeros(B, U + 1), torch.zeros(B, U)]])
def test_bad_initial_state_raises(bad):
    with pytest.raises(DroprnnError, match="initial_state"):
        LSTM(U, input_size=D)(torch.randn(B, T, D), initial_state=bad)


# ============================================================================ training switch
def test_train_eval_switch_and_training_override():
    x = torch.randn(B, T, D)
    layer = LSTM(U, dropout=0.5, recurrent_dropout=0.5, input_size=D)
    no_dropout = clone_weights(layer, LSTM(U, input_size=D))
    layer.eval()
    close(layer(x), no_dropout(x))  # eval: no dropout at all
    assert not torch.allclose(layer(x, training=True), no_dropout(x))  # forced on
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, no_dropout(x))
    assert not torch.allclose(a, b)  # fresh masks per call
    close(layer(x, training=False), no_dropout(x))  # forced off


def test_sequential_passes_training_to_children():
    x = torch.randn(B, T, D)
    model = Sequential([GRU(U, dropout=0.5, return_sequences=True, input_size=D), Dropout(0.5)])
    reference = clone_weights(model[0], GRU(U, return_sequences=True, input_size=D))
    model.eval()
    assert not model[0].training and not model[1].training
    close(model(x), reference(x))
    y_forced = model(x, training=True)
    assert not torch.allclose(y_forced, reference(x))
    # the Dropout child ran in training: about half the entries are exactly zero
    assert 0.3 < float((y_forced == 0).float().mean()) < 0.7
    model.train()
    assert model[0].training and model[1].training
    assert not torch.allclose(model(x), reference(x))
    close(model(x, training=False), reference(x))


# ============================================================================ dtypes
def test_float64_layer_by_dtype_argument_and_by_double():
    x = torch.randn(B, T, D, dtype=torch.float64)
    a = LSTM(U, dtype=torch.float64, input_size=D)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    assert a(x).dtype == torch.float64
    b = clone_weights(a, LSTM(U, input_size=D)).double()
    assert all(p.dtype == torch.float64 for p in b.parameters())
    close(a(x), b(x))
    assert b(x.float()).dtype == torch.float64  # input cast to the layer's dtype


def test_bfloat16_forward_is_close_to_float32():
    x = torch.randn(B, T, D)
    layer = GRU(U, return_sequences=True, input_size=D)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    y = half(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    close(y.float(), layer(x), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_integer_input_is_cast_to_float(kind):
    x = torch.randint(0, 3, (B, T, D))
    lazy = LAYERS[kind](U)
    y = lazy(x)
    assert y.dtype == torch.get_default_dtype()
    assert lazy.cell.kernel.dtype == torch.get_default_dtype()
    close(y, lazy(x.float()))


def test_float64_input_to_float32_layer_gives_float32():
    x = torch.randn(B, T, D, dtype=torch.float64)
    layer = LSTM(U, input_size=D)
    y = layer(x)
    assert y.dtype == torch.float32
    close(y, layer(x.float()))


def test_numpy_input_accepted():
    x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
    layer = SimpleRNN(U, input_size=D)
    close(layer(x), layer(torch.from_numpy(x)))


# ============================================================================ state_dict
@pytest.mark.parametrize("kind", list(LAYERS))
def test_state_dict_keys_and_reload(kind):
    layer = LAYERS[kind](U, input_size=D)
    assert set(layer.state_dict()) == {"cell.kernel", "cell.recurrent_kernel", "cell.bias"}
    fresh = LAYERS[kind](U, input_size=D)
    x = torch.randn(B, T, D)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    close(fresh(x), layer(x))


def test_state_dict_keys_stacked_and_no_bias():
    stacked = RNN([LSTMCell(4), GRUCell(3)], input_size=D)
    assert set(stacked.state_dict()) == {
        f"cell.cells.{i}.{name}" for i in (0, 1) for name in ("kernel", "recurrent_kernel", "bias")
    }
    assert set(LSTM(U, use_bias=False, input_size=D).state_dict()) == {"cell.kernel", "cell.recurrent_kernel"}


def test_to_float64_keeps_results():
    x = torch.randn(B, T, D)
    layer = LSTM(U, return_sequences=True, input_size=D)
    y32 = layer(x)
    layer.to(torch.float64)
    assert layer.cell.kernel.dtype == torch.float64
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    close(y64.float(), y32, atol=1e-5, rtol=1e-4)


# ============================================================================ get/set weights
@pytest.mark.parametrize("kind,shapes", [
    ("lstm", [(D, 4 * U), (U, 4 * U), (4 * U,)]),
    ("gru", [(D, 3 * U), (U, 3 * U), (2, 3 * U)]),
    ("simple_rnn", [(D, U), (U, U), (U,)]),
])
def test_get_set_weights_round_trip(kind, shapes):
    layer = LAYERS[kind](U, input_size=D)
    weights = layer.get_weights()
    assert [w.shape for w in weights] == shapes
    assert all(isinstance(w, np.ndarray) for w in weights)
    new = [np.random.default_rng(i).normal(size=s).astype(np.float32) for i, s in enumerate(shapes)]
    layer.set_weights(new)
    for got, want in zip(layer.get_weights(), new):
        np.testing.assert_array_equal(got, want)
    # get_weights returns copies
    layer.get_weights()[0][:] = 0
    assert np.any(layer.get_weights()[0] != 0)


def test_gru_reset_before_bias_shape():
    assert [w.shape for w in GRU(U, reset_after=False, input_size=D).get_weights()][2] == (3 * U,)


def test_set_weights_wrong_count_or_shape_names_the_layer():
    layer = LSTM(U, input_size=D, name="encoder")
    w = layer.get_weights()
    with pytest.raises(DroprnnError, match="encoder") as info:
        layer.set_weights(w[:2])
    assert "3" in str(info.value) and "2" in str(info.value)
    with pytest.raises(DroprnnError, match="encoder") as info:
        layer.set_weights([w[0], w[1], np.zeros(3 * U, np.float32)])
    assert str((4 * U,)) in str(info.value) and str((3 * U,)) in str(info.value)
    # nothing changed by the failed calls
    for got, want in zip(layer.get_weights(), w):
        np.testing.assert_array_equal(got, want)


def test_droprnn_error_is_a_value_error():
    assert issubclass(DroprnnError, ValueError)


# ============================================================================ Dense / TimeDistributed
def test_dense_on_3d_input():
    x = torch.randn(B, T, D)
    dense = Dense(5, activation="relu", input_size=D)
    y = dense(x)
    assert y.shape == (B, T, 5)
    for t in range(T):
        close(y[:, t], torch.relu(x[:, t] @ dense.kernel + dense.bias))
    assert [w.shape for w in dense.get_weights()] == [(D, 5), (5,)]


def test_time_distributed_dense_equals_dense():
    x = torch.randn(B, T, D)
    dense = Dense(5, activation="tanh")
    td = TimeDistributed(dense)
    y = td(x)
    assert y.shape == (B, T, 5)
    close(y, dense(x))
    assert len(td.get_weights()) == 2


# ============================================================================ initializers
INIT_NAMES = [
    "glorot_uniform", "glorot_normal", "orthogonal", "zeros", "ones", "he_normal", "he_uniform", "lecun_normal",
    "lecun_uniform", "random_normal", "random_uniform", "truncated_normal", "identity", "variance_scaling",
    "uniform", "normal",
]


@pytest.mark.parametrize("name", INIT_NAMES)
def test_initializer_names_resolve(name):
    init = initializers.get(name)
    assert isinstance(init, initializers.Initializer)
    w = init((16, 16))
    assert w.shape == (16, 16) and w.dtype == torch.get_default_dtype() and torch.isfinite(w).all()
    assert init((4, 8), dtype=torch.float64).dtype == torch.float64
    # usable as a layer initializer by name
    layer = SimpleRNN(16, kernel_initializer=name, input_size=16)
    assert layer.cell.kernel.shape == (16, 16)


def test_initializer_values():
    shape = (40, 60)
    assert torch.all(initializers.get("zeros")(shape) == 0)
    assert torch.all(initializers.get("ones")(shape) == 1)
    assert torch.equal(initializers.get("identity")((5, 5)), torch.eye(5))
    glorot = initializers.get("glorot_uniform")(shape)
    limit = (6 / (40 + 60)) ** 0.5
    assert glorot.abs().max() <= limit and glorot.abs().max() > 0.9 * limit
    he = initializers.get("he_normal")((400, 300))
    assert abs(float(he.std()) - (2 / 400) ** 0.5) < 0.1 * (2 / 400) ** 0.5
    assert he.abs().max() <= 2 * (2 / 400) ** 0.5 / 0.8796 + 1e-6  # truncated at two std of the base normal


def test_lstm_glorot_kernel_uses_fused_fan_out():
    layer = LSTM(U, input_size=D)
    limit = (6 / (D + 4 * U)) ** 0.5
    assert float(layer.cell.kernel.detach().abs().max()) <= limit


def test_unknown_initializer_raises_listing_names():
    with pytest.raises(DroprnnError) as info:
        LSTM(U, kernel_initializer="glorot_unifrom")
    msg = str(info.value)
    assert "glorot_unifrom" in msg and "kernel_initializer" in msg
    for name in ("glorot_uniform", "orthogonal", "zeros", "he_normal"):
        assert name in msg


def test_keras_style_callable_initializer():
    seen = {}

    def half(shape, dtype=None):
        seen["shape"] = shape
        return np.full(shape, 0.5)

    layer = LSTM(U, kernel_initializer=half, input_size=D)
    assert seen["shape"] == (D, 4 * U)
    assert torch.all(layer.cell.kernel == 0.5) and layer.cell.kernel.dtype == torch.float32

    def no_dtype(shape):
        return torch.full(shape, -2.0)

    assert torch.all(GRU(U, recurrent_initializer=no_dtype, input_size=D).cell.recurrent_kernel == -2.0)


def test_torch_inplace_initializer_accepted():
    layer = LSTM(U, kernel_initializer=torch.nn.init.xavier_uniform_, input_size=D)
    k = layer.cell.kernel.detach()
    assert k.shape == (D, 4 * U)
    limit = (6 / (D + 4 * U)) ** 0.5
    assert 0 < float(k.abs().max()) <= limit
    assert k.std() > 0.3 * limit
    layer = GRU(U, recurrent_initializer=torch.nn.init.zeros_, input_size=D)
    assert torch.all(layer.cell.recurrent_kernel == 0)


def test_orthogonal_on_wide_matrix_has_orthonormal_rows():
    w = initializers.Orthogonal()((U, 4 * U)).double()
    close(w @ w.T, torch.eye(U, dtype=torch.float64), atol=1e-5, rtol=0)
    # and it is the whole matrix, not per-gate blocks: a single (U, U) block is not orthogonal
    block = w[:, :U]
    assert not torch.allclose(block @ block.T, torch.eye(U, dtype=torch.float64), atol=1e-3)
    # the layer's default recurrent kernel is such a matrix
    r = LSTM(U, input_size=D).cell.recurrent_kernel.detach().double()
    close(r @ r.T, torch.eye(U, dtype=torch.float64), atol=1e-5, rtol=0)
    tall = initializers.Orthogonal(gain=2.0)((8, 3)).double()
    close(tall.T @ tall, 4 * torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_lstm_unit_forget_bias():
    layer = LSTM(U, bias_initializer=initializers.Constant(0.03), input_size=D)
    expected = torch.tensor([0.03] * U + [1.0] * U + [0.03] * 2 * U)
    close(layer.cell.bias.detach(), expected)
    assert torch.all(LSTM(U, unit_forget_bias=False, input_size=D).cell.bias == 0)
    with_ufb_zero = LSTM(U, input_size=D).cell.bias.detach()
    close(with_ufb_zero, torch.tensor([0.0] * U + [1.0] * U + [0.0] * 2 * U))


def test_gru_constant_bias_fills_both_rows():
    bias = GRU(U, bias_initializer=initializers.Constant(0.2), input_size=D).cell.bias
    assert bias.shape == (2, 3 * U) and torch.allclose(bias, torch.full((2, 3 * U), 0.2))


@pytest.mark.parametrize("make", [
    lambda s: initializers.GlorotUniform(seed=s),
    lambda s: initializers.Orthogonal(seed=s),
    lambda s: initializers.RandomNormal(seed=s),
    lambda s: initializers.HeNormal(seed=s),
])
def test_seeded_initializers_are_reproducible(make):
    a = make(7)((5, 8))
    torch.manual_seed(999)  # the global RNG does not matter
    b = make(7)((5, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, make(8)((5, 8)))
    k1 = LSTM(3, kernel_initializer=make(7), input_size=D).cell.kernel
    k2 = LSTM(3, kernel_initializer=make(7), input_size=D).cell.kernel
    assert torch.equal(k1, k2)


def test_unseeded_initializers_follow_the_global_rng():
    torch.manual_seed(5)
    a = LSTM(U, input_size=D).get_weights()
    torch.manual_seed(5)
    b = LSTM(U, input_size=D).get_weights()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ============================================================================ activations
def test_activation_names():
    x = torch.linspace(-5, 5, 41)
    close(activations.get("tanh")(x), torch.tanh(x))
    close(activations.get("sigmoid")(x), torch.sigmoid(x))
    close(activations.get("relu")(x), torch.relu(x))
    assert torch.equal(activations.get("linear")(x), x)
    assert torch.equal(activations.get(None)(x), x)
    hs = activations.get("hard_sigmoid")
    close(hs(x), torch.clamp(x + 3, 0, 6) / 6)
    # Keras 3 slope 1/6 (Keras 2 used 0.2): hs(1.5) = 0.75, not 0.8
    close(hs(torch.tensor([-4.0, -3.0, 0.0, 1.5, 3.0, 4.0])), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_activation_callable_and_in_layers():
    fn = lambda t: 2 * t  # noqa: E731
    assert activations.get(fn) is fn
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    # linear running sum: h_t = x_t + h_{t-1}
    layer = SimpleRNN(1, activation=None, kernel_initializer="ones", recurrent_initializer="ones",
                      return_sequences=True, input_size=1)
    assert layer(x).flatten().tolist() == [1.0, 3.0, 6.0]
    doubling = SimpleRNN(1, activation=fn, kernel_initializer="ones", recurrent_initializer="zeros",
                         return_sequences=True, input_size=1)
    assert doubling(x).flatten().tolist() == [2.0, 4.0, 6.0]
    relu = SimpleRNN(1, activation="relu", kernel_initializer="ones", recurrent_initializer="zeros",
                     return_sequences=True, input_size=1)
    assert relu(-x).flatten().tolist() == [0.0, 0.0, 0.0]
    hard = LSTM(U, recurrent_activation="hard_sigmoid", input_size=D)
    soft = clone_weights(hard, LSTM(U, input_size=D))
    xx = torch.randn(B, T, D)
    assert not torch.allclose(hard(xx), soft(xx))


def test_unknown_activation_raises_listing_names():
    with pytest.raises(DroprnnError) as info:
        GRU(U, activation="tanhh")
    msg = str(info.value)
    assert "tanhh" in msg and "activation" in msg
    for name in ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear"):
        assert name in msg
    with pytest.raises(DroprnnError, match="recurrent_activation"):
        LSTM(U, recurrent_activation="sigmoidd")


# ============================================================================ CLI
PICTURE_ROW = re.compile(r"^\s+[#.]{10}(\s+[#.]{10}){3}\s*$")


def test_cli_demo_prints_pictures(capsys):
    from droprnn import cli

    assert cli.main(["demo", "--steps", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "#" in out and "." in out
    rows = [line for line in out.splitlines() if PICTURE_ROW.match(line)]
    assert len(rows) == 2 * 4  # two tables of four placements, one row per timestep
    assert cli.main(["demo"]) == 0
    rows12 = [line for line in capsys.readouterr().out.splitlines() if PICTURE_ROW.match(line)]
    assert len(rows12) == 2 * 12  # default 12 steps


def test_cli_rejects_bad_rate():
    from droprnn import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--rate", "1.0"])
    assert info.value.code != 0


def test_python_m_droprnn_demo():
    proc = subprocess.run(
        [sys.executable, "-m", "droprnn", "demo", "--steps", "5"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if PICTURE_ROW.match(line)]
    assert len(rows) == 2 * 5


# ============================================================================ cells used directly
@pytest.mark.parametrize("cell_cls,n_states", [(LSTMCell, 2), (GRUCell, 1), (SimpleRNNCell, 1)])
def test_cell_called_directly_builds_lazily(cell_cls, n_states):
    cell = cell_cls(4)
    assert cell.kernel is None and not cell.built
    x_t = torch.randn(2, 3)
    states = [torch.randn(2, 4) for _ in range(n_states)]
    out, new_states = cell(x_t, states)
    assert cell.built and cell.kernel.shape == (3, 4 * cell.gates)
    assert isinstance(new_states, tuple) and len(new_states) == n_states
    assert torch.equal(out, new_states[0])
    # one cell step equals a one-step layer with the same weights and initial state
    layer = RNN(cell, return_state=True)
    y, *s = layer(x_t[:, None], initial_state=states)
    close(y, out)
    close(tuple(s), new_states)


def test_lstm_cell_step_matches_equations():
    cell = LSTMCell(4)
    x_t, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    out, (h1, c1) = cell(x_t, [h, c])
    h_ref, c_ref = lstm_step_by_hand(x_t, h, c, cell.kernel, cell.recurrent_kernel, cell.bias)
    close(h1, h_ref)
    close(c1, c_ref)
    assert torch.equal(out, h1)


def test_cell_argument_errors():
    with pytest.raises(DroprnnError, match="units"):
        LSTMCell(0)
    with pytest.raises(DroprnnError, match="dropout"):
        GRUCell(3, dropout=1.0)
    with pytest.raises(DroprnnError, match="cell"):
        RNN("not a cell")


def test_public_api_exports():
    for name in ("LSTM", "GRU", "SimpleRNN", "RNN", "Bidirectional", "Sequential", "Dense", "Embedding",
                 "Masking", "TimeDistributed", "Dropout", "DroprnnError", "LSTMCell"):
        assert hasattr(droprnn, name)
