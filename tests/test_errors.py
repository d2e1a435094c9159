"""Bad input raises ``droprnn.DroprnnError`` (a ``ValueError``) with a one-line message that names the layer,
the argument, what was expected and what was received.

Messages follow ``"<Class> '<name>': argument `<arg>` expected <form>, got <value>."`` (cells say
``"<Class>Cell of '<layer name>'"``). Each test matches the parts in order with a regex built by :func:`rx`.
Bad inputs that escape as a raw torch/Python error (or are silently accepted) are strict xfails marked BUG.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import droprnn as d
from droprnn import DroprnnError

B, T, D, U = 2, 4, 3, 4


def rx(*parts) -> str:
    """A regex matching the literal ``parts`` in this order, anything between them."""
    return ".*".join(re.escape(str(p)) for p in parts)


def seq(batch=B, steps=T, features=D):
    return torch.randn(batch, steps, features)


# kind -> (layer class, cell class name, state names)
KINDS = {
    "LSTM": (d.LSTM, "LSTMCell", ("h", "c")),
    "GRU": (d.GRU, "GRUCell", ("h",)),
    "SimpleRNN": (d.SimpleRNN, "SimpleRNNCell", ("h",)),
}
ALL_KINDS = list(KINDS)


def make(kind, **kwargs):
    """A named recurrent layer: errors must quote the name 'my_<kind>'."""
    cls = KINDS[kind][0]
    return cls(U, name=f"my_{kind.lower()}", **kwargs)


def layer_where(kind):
    return f"{kind} 'my_{kind.lower()}'"


def cell_where(kind):
    return f"{KINDS[kind][1]} of 'my_{kind.lower()}'"


# ====================================================================== inputs: rank, timesteps, features
BAD_RANK_SHAPES = [(B, D), (B, T, D, 1), (D,)]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("shape", BAD_RANK_SHAPES, ids=lambda s: f"{len(s)}d")
def test_wrong_input_rank(kind, shape):
    layer = make(kind)
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`inputs`", "(batch, time, features)", f"shape {shape}")):
        layer(torch.zeros(shape))


@pytest.mark.parametrize("shape", BAD_RANK_SHAPES, ids=lambda s: f"{len(s)}d")
def test_wrong_input_rank_bidirectional(shape):
    layer = d.Bidirectional(d.LSTM(U, name="fw"), name="bi")
    with pytest.raises(DroprnnError, match=rx("LSTM 'fw'", "`inputs`", "(batch, time, features)", f"shape {shape}")):
        layer(torch.zeros(shape))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zero_timesteps(kind):
    layer = make(kind)
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`inputs`", "at least one timestep", f"shape ({B}, 0, {D})")):
        layer(torch.zeros(B, 0, D))


def test_zero_timesteps_bidirectional():
    with pytest.raises(DroprnnError, match=rx("GRU 'fw'", "`inputs`", "at least one timestep", f"shape ({B}, 0, {D})")):
        d.Bidirectional(d.GRU(U, name="fw"))(torch.zeros(B, 0, D))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("built_by", ["input_shape", "input_size", "first_call"])
def test_feature_size_differs_from_built(kind, built_by):
    if built_by == "input_shape":
        layer = make(kind, input_shape=(None, D))
    elif built_by == "input_size":
        layer = make(kind, input_size=D)
    else:
        layer = make(kind)
        layer(seq())  # builds for D features
    assert layer.input_size == D
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`inputs`", f"{D} features", f"shape ({B}, {T}, {D + 2})")):
        layer(seq(features=D + 2))
    assert layer.input_size == D  # the failed call did not rebuild the layer


@pytest.mark.parametrize("built_by", ["input_shape", "first_call"])
def test_feature_size_differs_bidirectional(built_by):
    if built_by == "input_shape":
        layer = d.Bidirectional(d.LSTM(U, name="fw"), input_shape=(None, D))
    else:
        layer = d.Bidirectional(d.LSTM(U, name="fw"))
        layer(seq())
    with pytest.raises(DroprnnError, match=rx("LSTM 'fw'", "`inputs`", f"{D} features", f"shape ({B}, {T}, {D + 1})")):
        layer(seq(features=D + 1))


def test_non_tensor_input():
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "expected a tensor input", "got str")):
        make("LSTM")("not a tensor")
    with pytest.raises(DroprnnError, match=rx("GRU 'my_gru'", "expected a tensor input", "got NoneType")):
        make("GRU")(None)


def test_dense_feature_mismatch_and_other_input_checks():
    with pytest.raises(DroprnnError, match=rx("Dense 'head'", "`inputs`", "4 features", "shape (2, 5)")):
        d.Dense(3, input_size=4, name="head")(torch.zeros(2, 5))
    with pytest.raises(DroprnnError, match=rx("TimeDistributed 'td'", "`inputs`", "(batch, time, ...)", "shape (2, 5)")):
        d.TimeDistributed(d.Dense(3), name="td")(torch.zeros(2, 5))
    with pytest.raises(DroprnnError, match=rx("Masking 'masking'", "`inputs`", "(batch, time, features)", "shape (5,)")):
        d.Masking()(torch.zeros(5))
    with pytest.raises(DroprnnError, match=rx("Sequential 'sequential'", "no layers")):
        d.Sequential()(seq())


# ====================================================================== rates
BAD_CELL_RATES = [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None]


def _got(value):
    """How the message quotes a rejected rate: numbers as floats, anything else by repr."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"got {float(value)!r}"
    return f"got {value!r}"


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("argument", ["dropout", "recurrent_dropout"])
@pytest.mark.parametrize("value", BAD_CELL_RATES, ids=repr)
def test_cell_rate_outside_half_open_interval(kind, argument, value):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), f"`{argument}`", "a float in [0, 1)", _got(value))):
        make(kind, **{argument: value})


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_cell_rate_one_is_rejected_on_purpose_with_a_reason(kind):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "`dropout`", "[0, 1)", "got 1.0", "drops everything")):
        make(kind, dropout=1)


@pytest.mark.parametrize("cell_cls", [d.LSTMCell, d.GRUCell, d.SimpleRNNCell])
def test_bare_cell_rate_checked(cell_cls):
    with pytest.raises(DroprnnError, match=rx(f"{cell_cls.__name__}:", "`recurrent_dropout`", "[0, 1)", "got -0.5")):
        cell_cls(U, recurrent_dropout=-0.5)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999])
def test_cell_rates_inside_interval_accepted(kind, value):
    layer = make(kind, dropout=value, recurrent_dropout=value)
    assert layer.dropout == layer.recurrent_dropout == float(value)


@pytest.mark.parametrize("cls", [d.Dropout, d.SpatialDropout1D])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("inf"), "0.5", True], ids=repr)
def test_dropout_rate_outside_closed_interval(cls, value):
    where = f"{cls.__name__} 'drop'"
    with pytest.raises(DroprnnError, match=rx(where, "`rate`", "a float in [0, 1]", _got(value))):
        cls(value, name="drop")


def test_dropout_rate_one_allowed_and_drops_everything():
    x = torch.randn(2, 3, 4)
    assert torch.equal(d.Dropout(1.0)(x, training=True), torch.zeros_like(x))
    assert torch.equal(d.Dropout(1.0)(x, training=False), x)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0, "x"], ids=repr)
def test_alpha_dropout_rate_one_rejected(value):
    # At rate 1 the affine correction ((1 - p)(1 + p·α'²))^(-1/2) is undefined.
    with pytest.raises(DroprnnError, match=rx("AlphaDropout 'ad'", "`rate`", "a float in [0, 1)", _got(value))):
        d.AlphaDropout(value, name="ad")


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0, "x"], ids=repr)
def test_gaussian_dropout_rate(value):
    with pytest.raises(DroprnnError, match=rx("GaussianDropout 'gd'", "`rate`", "a float in [0, 1)", _got(value))):
        d.GaussianDropout(value, name="gd")


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", False], ids=repr)
def test_gaussian_noise_stddev_outside_closed_interval(value):
    with pytest.raises(DroprnnError, match=rx("GaussianNoise 'gn'", "`stddev`", "a float in [0, 1]", _got(value))):
        d.GaussianNoise(value, name="gn")


def test_gaussian_noise_stddev_one_allowed():
    assert d.GaussianNoise(1.0).stddev == 1.0


# ====================================================================== units, input_shape, input_size
BAD_UNITS = [0, -1, 2.5, "4", True, None]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("units", BAD_UNITS, ids=repr)
def test_units_not_positive_int(kind, units):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "`units`", "an int > 0", f"got {units!r}")):
        KINDS[kind][0](units, name=f"my_{kind.lower()}")


@pytest.mark.parametrize("units", BAD_UNITS, ids=repr)
def test_units_not_positive_int_dense_and_cells(units):
    with pytest.raises(DroprnnError, match=rx("Dense 'head'", "`units`", "an int > 0", f"got {units!r}")):
        d.Dense(units, name="head")
    with pytest.raises(DroprnnError, match=rx("LSTMCell:", "`units`", "an int > 0", f"got {units!r}")):
        d.LSTMCell(units)


@pytest.mark.parametrize("argument", ["input_dim", "output_dim"])
def test_embedding_sizes(argument):
    kwargs = {"input_dim": 10, "output_dim": 4, argument: 0}
    with pytest.raises(DroprnnError, match=rx("Embedding 'emb'", f"`{argument}`", "an int > 0", "got 0")):
        d.Embedding(**kwargs, name="emb")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_input_shape_inconsistent_with_input_size(kind):
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`input_shape` says 3", "`input_size` says 5")):
        make(kind, input_shape=(None, 3), input_size=5)


def test_input_shape_inconsistent_with_input_size_bidirectional():
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`input_shape` says 3", "`input_size` says 5")):
        d.Bidirectional(d.LSTM(U), input_shape=(None, 3), input_size=5, name="bi")


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(
    "input_shape, argument, expected, got",
    [
        ("abc", "input_shape", "a tuple such as (None, features)", "'abc'"),
        (3, "input_shape", "a tuple such as (None, features)", "3"),
        ((), "input_shape", "a tuple such as (None, features)", "()"),
        ((None, None), "input_shape[-1]", "an int > 0", "None"),
        ((None, 0), "input_shape[-1]", "an int > 0", "0"),
        ((None, 2.5), "input_shape[-1]", "an int > 0", "2.5"),
    ],
    ids=["str", "int", "empty", "none-features", "zero-features", "float-features"],
)
def test_bad_input_shape(kind, input_shape, argument, expected, got):
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), f"`{argument}`", expected, f"got {got}")):
        make(kind, input_shape=input_shape)


@pytest.mark.parametrize("input_size", [0, -3, 1.5], ids=repr)
def test_bad_input_size(input_size):
    with pytest.raises(DroprnnError, match=rx("GRU 'my_gru'", "`input_size`", "an int > 0", f"got {input_size!r}")):
        make("GRU", input_size=input_size)


# ====================================================================== noise_shape
X3 = (2, 4, 5)


@pytest.mark.parametrize("cls", [d.Dropout, d.AlphaDropout])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("noise_shape", [(3, 1, 5), (None, 2, None), (2, 4, 3)])
def test_noise_shape_not_broadcastable(cls, training, noise_shape):
    layer = cls(0.5, noise_shape=noise_shape, name="drop")
    with pytest.raises(DroprnnError, match=rx(f"{cls.__name__} 'drop'", "`noise_shape`", str(noise_shape), "does not broadcast", str(X3))):
        layer(torch.ones(X3), training=training)


@pytest.mark.parametrize("noise_shape", [(None, 1), (None, 1, None, 1), (1,)])
def test_noise_shape_wrong_length(noise_shape):
    layer = d.Dropout(0.5, noise_shape=noise_shape, name="drop")
    with pytest.raises(DroprnnError, match=rx("Dropout 'drop'", "`noise_shape`", "expected 3 entries", str(X3), f"got {noise_shape}")):
        layer(torch.ones(X3), training=True)


@pytest.mark.parametrize(
    "noise_shape", ["abc", 5, (None, 0, None), (None, -1, None), (None, 1.5, None), (None, True, None), ("a",)], ids=repr
)
def test_noise_shape_not_a_tuple_of_positive_ints(noise_shape):
    with pytest.raises(DroprnnError, match=rx("Dropout 'drop'", "`noise_shape`", "a tuple of positive ints or None", f"got {noise_shape!r}")):
        d.Dropout(0.5, noise_shape=noise_shape, name="drop")


def test_noise_shape_good_forms_accepted():
    x = torch.ones(X3)
    for noise_shape in [(None, 1, None), (2, 1, 5), [None, None, 1], (1, 1, 1)]:
        assert d.Dropout(0.5, noise_shape=noise_shape)(x, training=True).shape == x.shape


@pytest.mark.parametrize("shape", [(2, 5), (2, 4, 5, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_spatial_dropout_needs_3d(shape, training):
    layer = d.SpatialDropout1D(0.5, name="sd")
    with pytest.raises(DroprnnError, match=rx("SpatialDropout1D 'sd'", "`inputs`", "(batch, time, features)", f"shape {shape}")):
        layer(torch.ones(shape), training=training)


# ====================================================================== initial_state
def test_lstm_initial_state_one_tensor():
    layer = make("LSTM")
    h = torch.zeros(B, U)
    for given in (h, [h], (h,)):
        with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`initial_state`", "expected 2 tensors [h, c]", "LSTMCell", "got 1")):
            layer(seq(), initial_state=given)


def test_lstm_initial_state_three_tensors():
    h = torch.zeros(B, U)
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`initial_state`", "expected 2 tensors [h, c]", "got 3")):
        make("LSTM")(seq(), initial_state=[h, h, h])


@pytest.mark.parametrize("kind", ["GRU", "SimpleRNN"])
def test_single_state_layer_given_two(kind):
    h = torch.zeros(B, U)
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`initial_state`", "expected 1 tensors [h]", KINDS[kind][1], "got 2")):
        make(kind)(seq(), initial_state=[h, h])


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("bad", ["batch", "units", "rank"])
@pytest.mark.parametrize("which", [0, -1], ids=["first_state", "last_state"])
def test_initial_state_wrong_shape(kind, bad, which):
    names = KINDS[kind][2]
    states = [torch.zeros(B, U) for _ in names]
    wrong = {"batch": (B + 1, U), "units": (B, U + 1), "rank": (B, 1, U)}[bad]
    states[which] = torch.zeros(wrong)
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`initial_state`", f"state {names[which]} of shape ({B}, {U})", f"got {wrong}")):
        make(kind)(seq(), initial_state=states)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_initial_state_entries_not_tensors(kind):
    names = KINDS[kind][2]
    states = [np.zeros((B, U), dtype=np.float32) for _ in names]
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`initial_state`", f"state h of shape ({B}, {U})", "got ndarray")):
        make(kind)(seq(), initial_state=states)


@pytest.mark.parametrize("given, got", [(5, "int"), ("h", "str"), ({"h": 1}, "dict")], ids=["int", "str", "dict"])
def test_initial_state_not_a_tensor(given, got):
    with pytest.raises(DroprnnError, match=rx("GRU 'my_gru'", "`initial_state`", "a tensor or a list of tensors", f"got {got}")):
        make("GRU")(seq(), initial_state=given)


def _stacked():
    return d.RNN([d.SimpleRNNCell(U), d.SimpleRNNCell(3)], name="stack")


@pytest.mark.parametrize("count", [1, 3])
def test_stacked_initial_state_not_one_entry_per_cell(count):
    given = [[torch.zeros(B, U)]] * count
    with pytest.raises(DroprnnError, match=rx("RNN 'stack'", "`initial_state`", "one entry", "per stacked cell (2)")):
        _stacked()(seq(), initial_state=given)


def test_stacked_initial_state_tensor_rejected():
    with pytest.raises(DroprnnError, match=rx("RNN 'stack'", "`initial_state`", "per stacked cell (2)", "got torch.Tensor")):
        _stacked()(seq(), initial_state=torch.zeros(B, U))


def test_stacked_initial_state_second_cell_wrong_units():
    given = [[torch.zeros(B, U)], [torch.zeros(B, U)]]  # the second cell has 3 units
    with pytest.raises(DroprnnError, match=rx("RNN 'stack'", "`initial_state`", f"state h of shape ({B}, 3)", f"got ({B}, {U})")):
        _stacked()(seq(), initial_state=given)


def test_stacked_initial_state_message_reports_count_received():
    with pytest.raises(DroprnnError, match=rx("RNN 'stack'", "`initial_state`", "(2)", "got a list of 1")):
        _stacked()(seq(), initial_state=[[torch.zeros(B, U)]])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_bidirectional_initial_state_wrong_count(count):
    # LSTM needs [h, c] per direction: 4 tensors.
    layer = d.Bidirectional(d.LSTM(U), name="bi")
    expected = "a list of 4 states [forward h, forward c, backward h, backward c]"
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`initial_state`", expected, f"got {count} states")):
        layer(seq(), initial_state=[torch.zeros(B, U)] * count)


def test_bidirectional_initial_state_not_a_list():
    layer = d.Bidirectional(d.GRU(U), name="bi")
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`initial_state`", "[forward h, backward h]",
                                              "got torch.Tensor")):
        layer(seq(), initial_state=torch.zeros(B, U))


def test_bidirectional_stacked_initial_state_counts_cells():
    layer = d.Bidirectional(d.RNN([d.LSTMCell(U), d.GRUCell(U)]), name="bi")
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "a list of 4 states", "forward cell 0's states")):
        layer(seq(), initial_state=[torch.zeros(B, U)] * 2)


# ====================================================================== mask and lengths
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("shape", [(B, T + 1), (B + 1, T), (B, T, 1), (B * T,)])
def test_mask_shape_mismatch(kind, shape):
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`mask`", f"({B}, {T})", f"shape {shape}")):
        make(kind)(seq(), mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(
    "lengths, expected, got",
    [
        ([1, 2, 3], f"integers of shape ({B},)", "shape (3,)"),
        ([[1], [2]], f"integers of shape ({B},)", "shape (2, 1)"),
        (torch.tensor([1.0, 2.0]), f"integers of shape ({B},)", "torch.float32"),
        ([1.5, 2.0], f"integers of shape ({B},)", "float"),
        ([-1, 2], f"values in [0, {T}]", "[-1, 2]"),
        ([T + 1, 2], f"values in [0, {T}]", f"[{T + 1}, 2]"),
    ],
    ids=["too-many", "2d", "float-tensor", "float-list", "negative", "beyond-T"],
)
def test_bad_lengths(kind, lengths, expected, got):
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`lengths`", expected, got)):
        make(kind)(seq(), lengths=lengths)


def test_lengths_boundaries_accepted():
    y = make("LSTM")(seq(), lengths=[0, T])
    assert y.shape == (B, U)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_mask_and_lengths_both(kind):
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "`mask`", "`lengths`", "not both")):
        make(kind)(seq(), mask=torch.ones(B, T, dtype=torch.bool), lengths=[T, T])


def test_bidirectional_mask_and_lengths_checked():
    layer = d.Bidirectional(d.GRU(U, name="fw"))
    with pytest.raises(DroprnnError, match=rx("GRU 'fw'", "`mask`", f"({B}, {T})", f"shape ({B}, {T + 1})")):
        layer(seq(), mask=torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(DroprnnError, match=rx("GRU 'fw'", "`lengths`", f"values in [0, {T}]", f"[{T + 3}, 1]")):
        layer(seq(), lengths=[T + 3, 1])
    with pytest.raises(DroprnnError, match=rx("GRU 'fw'", "not both")):
        layer(seq(), mask=torch.ones(B, T, dtype=torch.bool), lengths=[1, 1])


def test_sequential_mask_and_lengths_both():
    with pytest.raises(DroprnnError, match=rx("Sequential 'model'", "`mask`", "`lengths`", "not both")):
        d.Sequential([d.LSTM(U)], name="model")(seq(), mask=torch.ones(B, T, dtype=torch.bool), lengths=[1, 1])


@pytest.mark.parametrize("lengths", [[T + 1, 2], [-1, 2], [1.5, 2.0]], ids=["beyond-T", "negative", "float"])
def test_sequential_bad_lengths(lengths):
    with pytest.raises(DroprnnError, match=rx("`lengths`")):
        d.Sequential([d.LSTM(U)], name="model")(seq(), lengths=lengths)


@pytest.mark.parametrize("kwargs", [{"lengths": "ab"}, {"mask": [[1, 0, 1, 1], [1]]}], ids=["lengths-str", "mask-ragged"])
def test_non_numeric_lengths_or_mask(kwargs):
    argument = next(iter(kwargs))
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", f"`{argument}`")):
        make("LSTM")(seq(), **kwargs)


# ====================================================================== stateful
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_stateful_batch_size_change(kind):
    layer = make(kind, stateful=True)
    layer(seq(batch=2))
    with pytest.raises(DroprnnError, match=rx(layer_where(kind), "stateful", "batch size 2", "batch size 3", "reset_state()")):
        layer(seq(batch=3))
    layer.reset_state()
    assert layer(seq(batch=3)).shape == (3, U)  # the advice in the message works


def test_stateful_batch_size_change_bidirectional():
    layer = d.Bidirectional(d.LSTM(U, stateful=True, name="fw"))
    layer(seq(batch=2))
    with pytest.raises(DroprnnError, match=rx("LSTM 'fw'", "batch size 2", "batch size 1", "reset_state()")):
        layer(seq(batch=1))


# ====================================================================== activations, initializers
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unknown_activation_lists_valid_names(kind):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "`activation`", "expected one of", "relu", "sigmoid", "tanh", "got 'tanhh'")):
        make(kind, activation="tanhh")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unknown_recurrent_activation(kind):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "`recurrent_activation`", "hard_sigmoid", "got 'hardsigmoid'")):
        make(kind, recurrent_activation="hardsigmoid")


def test_activation_not_callable():
    with pytest.raises(DroprnnError, match=rx("GRUCell of 'my_gru'", "`recurrent_activation`", "a name or a callable", "got 5")):
        make("GRU", recurrent_activation=5)
    with pytest.raises(DroprnnError, match=rx("Dense 'head'", "`activation`", "expected one of", "relu", "got 'rleu'")):
        d.Dense(3, activation="rleu", name="head")


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("argument", ["kernel_initializer", "recurrent_initializer", "bias_initializer"])
def test_unknown_initializer_lists_valid_names(kind, argument):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), f"`{argument}`", "expected one of", "glorot_uniform", "orthogonal", "zeros", "got 'glorot_unifrom'")):
        make(kind, **{argument: "glorot_unifrom"})


def test_initializer_not_callable_and_embedding_initializer():
    with pytest.raises(DroprnnError, match=rx("LSTMCell of 'my_lstm'", "`kernel_initializer`", "a name or a callable", "got 3")):
        make("LSTM", kernel_initializer=3)
    with pytest.raises(DroprnnError, match=rx("Embedding 'emb'", "`embeddings_initializer`", "uniform", "got 'unform'")):
        d.Embedding(10, 4, embeddings_initializer="unform", name="emb")


# ====================================================================== wrapper / cell structure
@pytest.mark.parametrize("merge_mode", ["concatenate", "avg", "", 1])
def test_bad_merge_mode(merge_mode):
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`merge_mode`", "'concat', 'sum', 'ave', 'mul' or None", f"got {merge_mode!r}")):
        d.Bidirectional(d.LSTM(U), merge_mode=merge_mode, name="bi")


@pytest.mark.parametrize(
    "layer, got",
    [(torch.nn.LSTM(3, 4), "torch.nn.modules.rnn.LSTM"), (d.Dense(3), "droprnn.layers.core.Dense"),
     (d.LSTMCell(4), "droprnn.cells.LSTMCell"), ("lstm", "str")],
    ids=["torch-LSTM", "Dense", "cell", "str"],
)
def test_bidirectional_on_non_rnn(layer, got):
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`layer`", "a droprnn recurrent layer", f"got {got}")):
        d.Bidirectional(layer, name="bi")


@pytest.mark.parametrize("go_backwards", [False, True])
def test_backward_layer_same_direction(go_backwards):
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`backward_layer`", f"go_backwards={not go_backwards}", f"got {go_backwards}")):
        d.Bidirectional(d.LSTM(U, go_backwards=go_backwards), backward_layer=d.LSTM(U, go_backwards=go_backwards), name="bi")


@pytest.mark.parametrize("attr", ["return_sequences", "return_state", "stateful"])
def test_backward_layer_flag_mismatch(attr):
    backward = d.GRU(U, go_backwards=True, **{attr: True})
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", f"`backward_layer.{attr}`", "False", "got True")):
        d.Bidirectional(d.GRU(U), backward_layer=backward, name="bi")


def test_backward_layer_not_rnn():
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "`backward_layer`", "a droprnn recurrent layer", "got droprnn.layers.core.Dense")):
        d.Bidirectional(d.GRU(U), backward_layer=d.Dense(U), name="bi")


@pytest.mark.parametrize("merge_mode", ["sum", "ave", "mul"])
def test_backward_layer_units_mismatch_with_elementwise_merge(merge_mode):
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "backward_layer", "4", "5")):
        layer = d.Bidirectional(d.LSTM(4), backward_layer=d.LSTM(5, go_backwards=True), merge_mode=merge_mode, name="bi")
        layer(seq())


@pytest.mark.parametrize(
    "cell, got",
    [(torch.nn.LSTMCell(3, 4), "torch.nn.modules.rnn.LSTMCell"), (torch.nn.GRUCell(3, 4), "torch.nn.modules.rnn.GRUCell"),
     (d.LSTM(4), "droprnn.layers.recurrent.LSTM")],
    ids=["torch-LSTMCell", "torch-GRUCell", "layer"],
)
def test_rnn_given_non_cell(cell, got):
    with pytest.raises(DroprnnError, match=rx("RNN 'rnn'", "`cell`", "a droprnn cell", f"got {got}")):
        d.RNN(cell)
    with pytest.raises(DroprnnError, match=rx("RNN 'rnn'", "`cell`", "a droprnn cell", f"got {got}")):
        d.RNN([d.LSTMCell(4), cell])


def test_rnn_given_no_cells():
    with pytest.raises(DroprnnError, match=rx("RNN 'rnn'", "`cell`", "non-empty list of cells", "got []")):
        d.RNN([])


def test_foreign_module_named_unambiguously():
    with pytest.raises(DroprnnError, match=r"got .*torch\.nn"):
        d.RNN(torch.nn.LSTMCell(3, 4))
    with pytest.raises(DroprnnError, match=r"got .*torch\.nn"):
        d.Bidirectional(torch.nn.LSTM(3, 4))


def test_sequential_and_time_distributed_need_modules():
    with pytest.raises(DroprnnError, match=rx("Sequential 'model'", "`layer`", "an nn.Module", "got str")):
        d.Sequential(["lstm"], name="model")
    with pytest.raises(DroprnnError, match=rx("TimeDistributed 'td'", "`layer`", "an nn.Module", "got function")):
        d.TimeDistributed(lambda x: x, name="td")


# ====================================================================== weights
@pytest.mark.parametrize("kind, shapes", [
    ("LSTM", [(D, 4 * U), (U, 4 * U), (4 * U,)]),
    ("GRU", [(D, 3 * U), (U, 3 * U), (2, 3 * U)]),
    ("SimpleRNN", [(D, U), (U, U), (U,)]),
])
def test_set_weights_wrong_count_and_shape(kind, shapes):
    layer = make(kind, input_size=D)
    good = [np.zeros(s, dtype=np.float32) for s in shapes]
    for count in (2, 4, 0):
        weights = (good + good)[:count]
        with pytest.raises(DroprnnError, match=rx(layer_where(kind), "set_weights", "expected 3 arrays", str(shapes[0]), f"got {count}")):
            layer.set_weights(weights)
    for i in range(3):
        bad = list(good)
        wrong = shapes[i][:-1] + (shapes[i][-1] + 1,)
        bad[i] = np.zeros(wrong, dtype=np.float32)
        with pytest.raises(DroprnnError, match=rx(layer_where(kind), f"set_weights array {i}", f"expected shape {shapes[i]}", f"got {wrong}")):
            layer.set_weights(bad)
    layer.set_weights(good)  # the right ones are accepted


def test_set_weights_gru_reset_after_false_bias_shape():
    layer = d.GRU(U, reset_after=False, input_size=D, name="g")
    weights = [np.zeros((D, 3 * U)), np.zeros((U, 3 * U)), np.zeros((2, 3 * U))]
    with pytest.raises(DroprnnError, match=rx("GRU 'g'", "set_weights array 2", f"expected shape ({3 * U},)", f"got (2, {3 * U})")):
        layer.set_weights(weights)


def test_set_weights_bidirectional_wrong_count():
    layer = d.Bidirectional(d.LSTM(U), input_size=D, name="bi")
    with pytest.raises(DroprnnError, match=rx("Bidirectional 'bi'", "set_weights", "expected 6 arrays", "got 3")):
        layer.set_weights(layer.get_weights()[:3])


@pytest.mark.parametrize("bad", [np.array(["a"] * (4 * U)), None], ids=["str-array", "None"])
def test_set_weights_non_numeric(bad):
    layer = make("LSTM", input_size=D)
    weights = layer.get_weights()
    weights[2] = bad
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "set_weights array 2")):
        layer.set_weights(weights)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("method", ["get_weights", "set_weights"])
def test_weights_before_build(kind, method):
    layer = make(kind)
    call = layer.get_weights if method == "get_weights" else (lambda: layer.set_weights([]))
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "weights do not exist yet", "input_size=", "call the layer once")):
        call()


def test_weights_before_build_bidirectional_and_dense():
    with pytest.raises(DroprnnError, match=rx("LSTMCell of 'fw'", "weights do not exist yet")):
        d.Bidirectional(d.LSTM(U, name="fw")).get_weights()
    with pytest.raises(DroprnnError, match=rx("Dense 'head'", "weights do not exist yet", "input_shape=")):
        d.Dense(3, name="head").get_weights()


@pytest.mark.parametrize("ids, got", [([[1, 10]], "ids in [1, 10]"), ([[-1, 3]], "ids in [-1, 3]"), ([[0, 99]], "ids in [0, 99]")])
def test_embedding_ids_out_of_range(ids, got):
    layer = d.Embedding(10, 4, name="emb")
    with pytest.raises(DroprnnError, match=rx("Embedding 'emb'", "`inputs`", "ids in [0, 9]", f"got {got}")):
        layer(torch.tensor(ids))


@pytest.mark.parametrize("ids", [[[1, 10]], [[-1, 3]]])
def test_embedding_range_check_queued_on_the_device(ids):
    """On CUDA the check is queued on the device instead (no host wait per call); it names the layer and the
    range. On the CPU the queued form raises at once, so its message is tested here."""
    layer = d.Embedding(10, 4, name="emb")
    with pytest.raises(RuntimeError, match=rx("Embedding 'emb'", "`inputs`", "ids in [0, 9]")):
        layer._assert_ids_in_range(torch.tensor(ids))
    layer._assert_ids_in_range(torch.tensor([[0, 9]]))  # in range: nothing happens


# ====================================================================== seeds
BAD_SEEDS = ["1", 1.5, True, [1]]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_recurrent_seed_not_int(kind, seed):
    with pytest.raises(DroprnnError, match=rx(cell_where(kind), "`seed`", "an int or None", f"got {seed!r}")):
        make(kind, seed=seed)


@pytest.mark.parametrize("factory, where", [
    (lambda s: d.Dropout(0.5, seed=s, name="n"), "Dropout 'n'"),
    (lambda s: d.SpatialDropout1D(0.5, seed=s, name="n"), "SpatialDropout1D 'n'"),
    (lambda s: d.AlphaDropout(0.5, seed=s, name="n"), "AlphaDropout 'n'"),
    (lambda s: d.GaussianDropout(0.5, seed=s, name="n"), "GaussianDropout 'n'"),
    (lambda s: d.GaussianNoise(0.5, seed=s, name="n"), "GaussianNoise 'n'"),
], ids=["Dropout", "SpatialDropout1D", "AlphaDropout", "GaussianDropout", "GaussianNoise"])
@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_dropout_layer_seed_not_int(factory, where, seed):
    with pytest.raises(DroprnnError, match=rx(where, "`seed`", "an int or None", f"got {seed!r}")):
        factory(seed)


# ====================================================================== dropout plans
def test_dropout_plan_wrong_number_of_cells():
    stacked = d.RNN([d.LSTMCell(U, dropout=0.5), d.LSTMCell(U, dropout=0.5)], input_size=D, name="stack")
    single = make("LSTM", dropout=0.5, input_size=D)
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`dropout_plan`", "masks for 1 cells", "got masks for 2 cells")):
        single(seq(), dropout_plan=stacked.draw_dropout_plan(B))
    with pytest.raises(DroprnnError, match=rx("RNN 'stack'", "`dropout_plan`", "masks for 2 cells", "got masks for 1 cells")):
        stacked(seq(), dropout_plan=single.draw_dropout_plan(B))


def test_draw_dropout_plan_before_build():
    with pytest.raises(DroprnnError, match=rx("GRU 'my_gru'", "dropout masks", "input size")):
        make("GRU", dropout=0.5).draw_dropout_plan(B)


def test_dropout_plan_not_a_plan():
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`dropout_plan`")):
        make("LSTM", dropout=0.5, input_size=D)(seq(), dropout_plan=[])


@pytest.mark.parametrize("plan_batch", [B + 1, 1])
def test_dropout_plan_for_another_batch(plan_batch):
    layer = make("LSTM", dropout=0.5, recurrent_dropout=0.5, input_size=D)
    plan = layer.draw_dropout_plan(plan_batch)
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`dropout_plan`", f"{B}", f"{plan_batch}")):
        layer(seq(), dropout_plan=plan)


@pytest.mark.parametrize("source", ["other-features", "gru-plan"])
def test_dropout_plan_for_another_layer(source):
    layer = make("LSTM", dropout=0.5, input_size=D)
    other = (d.LSTM(U, dropout=0.5, input_size=D + 2) if source == "other-features"
             else d.GRU(U, dropout=0.5, recurrent_dropout=0.5, input_size=D))
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`dropout_plan`")):
        layer(seq(), dropout_plan=other.draw_dropout_plan(B))


@pytest.mark.parametrize("batch", [-1, 2.5], ids=repr)
def test_draw_dropout_plan_bad_batch(batch):
    with pytest.raises(DroprnnError, match=rx("LSTM 'my_lstm'", "`batch`", f"got {batch!r}")):
        make("LSTM", dropout=0.5, input_size=D).draw_dropout_plan(batch)


# ====================================================================== cells called directly
@pytest.mark.parametrize("case", ["features", "state-count", "state-shape"])
def test_cell_call_validates(case):
    cell = d.LSTMCell(U, input_size=D)
    x, h = torch.zeros(B, D), torch.zeros(B, U)
    if case == "features":
        args = (torch.zeros(B, D + 2), [h, h])
    elif case == "state-count":
        args = (x, [h])
    else:
        args = (x, [torch.zeros(B + 1, U)] * 2)
    with pytest.raises(DroprnnError, match=rx("LSTMCell")):
        cell(*args)


# ====================================================================== the error type and message form
def _bad_calls():
    """One representative bad input per family: (id, thunk)."""
    h = torch.zeros(B, U)

    def stateful_change():
        layer = make("GRU", stateful=True)
        layer(seq())
        layer(seq(batch=B + 1))

    return [
        ("rank", lambda: make("LSTM")(torch.zeros(B, D))),
        ("timesteps", lambda: make("GRU")(torch.zeros(B, 0, D))),
        ("features", lambda: make("SimpleRNN", input_size=D)(seq(features=D + 1))),
        ("rate", lambda: make("LSTM", dropout=1.0)),
        ("dropout-rate", lambda: d.Dropout(1.5)),
        ("stddev", lambda: d.GaussianNoise(-1.0)),
        ("units", lambda: d.GRU(0)),
        ("input_shape", lambda: make("LSTM", input_shape=(None, 3), input_size=4)),
        ("noise_shape", lambda: d.Dropout(0.5, noise_shape=(3, 1, 5))(torch.ones(X3), training=True)),
        ("spatial", lambda: d.SpatialDropout1D(0.5)(torch.ones(2, 5))),
        ("initial_state", lambda: make("LSTM")(seq(), initial_state=[h])),
        ("bi-initial_state", lambda: d.Bidirectional(d.LSTM(U))(seq(), initial_state=[h])),
        ("mask", lambda: make("LSTM")(seq(), mask=torch.ones(B, T + 1))),
        ("lengths", lambda: make("LSTM")(seq(), lengths=[T + 1, 0])),
        ("mask+lengths", lambda: make("LSTM")(seq(), mask=torch.ones(B, T), lengths=[1, 1])),
        ("stateful", stateful_change),
        ("activation", lambda: make("LSTM", activation="nope")),
        ("initializer", lambda: make("LSTM", kernel_initializer="nope")),
        ("merge_mode", lambda: d.Bidirectional(d.LSTM(U), merge_mode="cat")),
        ("bi-non-rnn", lambda: d.Bidirectional(torch.nn.LSTM(3, 4))),
        ("backward_layer", lambda: d.Bidirectional(d.LSTM(U), backward_layer=d.LSTM(U))),
        ("rnn-non-cell", lambda: d.RNN(torch.nn.LSTMCell(3, 4))),
        ("set_weights", lambda: make("LSTM", input_size=D).set_weights([])),
        ("get_weights", lambda: make("LSTM").get_weights()),
        ("embedding", lambda: d.Embedding(5, 2)(torch.tensor([[7]]))),
        ("seed", lambda: make("LSTM", seed="7")),
        ("dropout_plan", lambda: make("LSTM", input_size=D)(seq(), dropout_plan=d.DropoutPlan(()))),
    ]


BAD_CALLS = _bad_calls()
LAYER_PREFIX = re.compile(r"^[A-Z][A-Za-z0-9]*( '[^'\n]+'| of '[^'\n]+')?: \S")


def test_droprnn_error_is_a_value_error():
    assert issubclass(DroprnnError, ValueError)
    with pytest.raises(ValueError):
        make("LSTM", dropout=-1)


@pytest.mark.parametrize("thunk", [t for _, t in BAD_CALLS], ids=[i for i, _ in BAD_CALLS])
def test_message_is_one_clear_line(thunk):
    with pytest.raises(DroprnnError) as info:
        thunk()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and "Traceback" not in message
    assert LAYER_PREFIX.match(message), f"message does not start with the layer: {message!r}"
    assert message.endswith("."), message
    assert len(info.value.args) == 1
    # Nothing left only in a chained exception: no implicit cause shown under the message.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


# ---------------------------------------------------------------------------------------------- set later
# Rates, modes and impl are checked whenever they are set, not only in the constructor: a schedule that
# anneals a rate or a study that switches a site off assigns them, and a bad value must not reach the masks
# (a rate of 1 made a layer's output inf/nan, a negative one rescaled it, an unknown mode raised a bare
# KeyError, an unknown impl ran as "auto").
def _nn_lstm():
    from droprnn import nn as dnn

    return dnn.LSTM(D, U, num_layers=2)


LATER = [
    (lambda: d.LSTM(U, input_size=D, recurrent_dropout=0.2).cell, "recurrent_dropout", 1.0,
     rx("LSTMCell of 'lstm'", "`recurrent_dropout`", "[0, 1)", "got 1.0", "drops everything")),
    (lambda: d.LSTM(U, input_size=D).cell, "dropout", -0.1, rx("`dropout`", "got -0.1")),
    (lambda: d.GRU(U, input_size=D).cell, "recurrent_dropout", float("nan"), rx("`recurrent_dropout`", "got nan")),
    (lambda: d.LSTM(U, input_size=D).cell, "zoneout_c", 1.0, rx("`zoneout_c`", "freezes the state")),
    (lambda: d.GRU(U, input_size=D).cell, "zoneout_h", "0.1", rx("`zoneout_h`", "a float", "'0.1'")),
    (lambda: d.LSTM(U, input_size=D).cell, "recurrent_dropout_mode", "tide",
     "(?s)" + rx("`recurrent_dropout_mode`", "one of the modes", "'tide'", "'tied':")),
    (lambda: d.LSTM(U, input_size=D).cell, "input_dropout_mode", None, rx("`input_dropout_mode`", "None")),
    (lambda: d.SimpleRNN(U, input_size=D).cell, "recurrent_dropout_mode", "update",
     rx("SimpleRNNCell", "'update' masks a cell update")),
    (lambda: d.Dropout(0.2), "rate", 1.5, rx("Dropout 'dropout'", "`rate`", "[0, 1]", "1.5")),
    (lambda: d.AlphaDropout(0.2), "rate", 1.0, rx("`rate`", "[0, 1)")),
    (lambda: d.GaussianDropout(0.2), "rate", -1, rx("`rate`", "-1.0")),
    (lambda: d.WordDropout(0.2), "rate", 1.0, rx("WordDropout", "`rate`")),
    (lambda: d.EmbeddingDropout(d.Embedding(10, 3), 0.2), "rate", 2, rx("EmbeddingDropout", "`rate`", "2.0")),
    (_nn_lstm, "dropout", 1.0, rx("droprnn.nn.LSTM", "`dropout`", "got 1.0")),
    (lambda: d.GRU(U, input_size=D), "impl", "fussed", rx("GRU 'gru'", "`impl`", "'fused'", "got 'fussed'")),
    (_nn_lstm, "impl", "cuda", rx("droprnn.nn.LSTM", "`impl`", "'gpu'", "got 'cuda'")),
]


@pytest.mark.parametrize("make, attribute, bad, match", LATER, ids=[f"{i}-{c[1]}" for i, c in enumerate(LATER)])
def test_rates_and_modes_are_checked_when_set_later(make, attribute, bad, match):
    obj = make()
    before = getattr(obj, attribute)
    with pytest.raises(DroprnnError, match=match):
        setattr(obj, attribute, bad)
    assert getattr(obj, attribute) == before  # nothing half-applied


def test_a_rate_set_later_is_the_one_the_next_call_uses():
    layer = d.LSTM(U, input_size=D, dropout=0.3, recurrent_dropout=0.3, return_sequences=True)
    x = seq()
    layer.cell.dropout = layer.cell.recurrent_dropout = 0  # an int is taken as the float it means
    assert isinstance(layer.cell.dropout, float)
    torch.testing.assert_close(layer(x, training=True), layer(x, training=False), rtol=0, atol=0)
    layer.cell.recurrent_dropout_mode = "tied"
    layer.cell.recurrent_dropout = 0.5
    assert layer.draw_dropout_plan(B).cells[0].recurrent.shape[0] == 1  # one mask for all gates


def test_a_cell_pickled_before_its_rates_were_checked_still_reads_them():
    layer = d.LSTM(U, input_size=D, recurrent_dropout=0.2)
    state = layer.cell.__dict__  # as an earlier droprnn pickled it: each rate under its own name
    state["recurrent_dropout"] = state.pop("_recurrent_dropout")
    assert layer.cell.recurrent_dropout == 0.2 and layer(seq(), training=True).shape == (B, U)
    layer.cell.recurrent_dropout = 0.3
    assert layer.cell.recurrent_dropout == 0.3
