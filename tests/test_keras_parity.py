"""Parity with Keras 3 on its torch backend.

Every test builds the Keras layer, gives it random weights, copies them into the droprnn layer with
``set_weights(keras_layer.get_weights())`` and compares outputs, states and input gradients (float32).
Inference: 1e-5. Seeded training-mode dropout: the same masks draw for draw, 1e-6.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("parity tests need Keras on its torch backend", allow_module_level=True)

import droprnn  # noqa: E402

# Keras variables trip a NumPy 2 copy-keyword DeprecationWarning on every get_weights().
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

B, T, D, U = 3, 7, 5, 3  # odd sizes, all different, so a transposed or mis-split weight shows

KINDS = {  # id -> (layer class name, kwargs shared by both libraries)
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "gru_v1": ("GRU", {"reset_after": False}),
    "simple": ("SimpleRNN", {}),
}

LAYER_CASES = {
    **KINDS,
    "lstm_nobias": ("LSTM", {"use_bias": False}),
    "lstm_relu_hardsig": ("LSTM", {"activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    "lstm_no_forget_bias": ("LSTM", {"unit_forget_bias": False}),
    "gru_nobias": ("GRU", {"use_bias": False}),
    "gru_v1_nobias": ("GRU", {"reset_after": False, "use_bias": False}),
    "gru_relu_hardsig": ("GRU", {"activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    "gru_v1_hardsig": ("GRU", {"reset_after": False, "recurrent_activation": "hard_sigmoid"}),
    "simple_nobias": ("SimpleRNN", {"use_bias": False}),
    "simple_relu": ("SimpleRNN", {"activation": "relu"}),
}

MASKS = {  # (B, T) = (3, 7), True = real step
    "right_pad": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]],
    "left_pad": [[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]],
    "holes": [[0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 0]],
    "one_row_empty": [[1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]],
}


# ---------------------------------------------------------------------------------------------- helpers
def mask_tensor(name):
    return torch.tensor(MASKS[name], dtype=torch.bool)


def flat(outputs):
    """Nested lists/tuples of tensors -> flat list (Keras returns lists of states, droprnn tuples)."""
    if torch.is_tensor(outputs):
        return [outputs]
    return [t for item in outputs for t in flat(item)]


def randomize(keras_layer, seed=0, scale=0.6):
    """Random normal weights (biases included, so every bias path counts) on the Keras layer."""
    rng = np.random.default_rng(seed)
    keras_layer.set_weights([(scale * rng.standard_normal(w.shape)).astype("float32") for w in keras_layer.get_weights()])


def pair(kind, weight_seed=0, randomize_weights=True, **kwargs):
    """A built Keras layer (random weights) and the droprnn layer of the same kind with its weights."""
    k = getattr(keras.layers, kind)(U, **kwargs)
    k.build((B, T, D))
    if randomize_weights:
        randomize(k, weight_seed)
    d = getattr(droprnn, kind)(U, input_size=D, **kwargs)
    d.set_weights(k.get_weights())
    return k, d


def assert_parity(keras_fn, droprnn_fn, inputs, atol=1e-5, grad_atol=1e-5, seed=0, grads=True):
    """Same outputs (flattened) and same gradients of a fixed random weighting w.r.t. every input."""
    ks = [t.detach().clone().requires_grad_(True) for t in inputs]
    ds = [t.detach().clone().requires_grad_(True) for t in inputs]
    yk, yd = flat(keras_fn(*ks)), flat(droprnn_fn(*ds))
    assert len(yk) == len(yd)
    for i, (a, b) in enumerate(zip(yk, yd)):
        assert tuple(a.shape) == tuple(b.shape), f"output {i}: keras {tuple(a.shape)} vs droprnn {tuple(b.shape)}"
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.to(b.dtype), atol=atol, rtol=0, msg=lambda m: f"output {i}: {m}")
    if not grads:
        return yk, yd
    g = torch.Generator().manual_seed(seed + 99)
    weights = [torch.randn(y.shape, generator=g) for y in yd]
    gk = torch.autograd.grad(sum((y * w).sum() for y, w in zip(yk, weights)), ks, allow_unused=True)
    gd = torch.autograd.grad(sum((y * w).sum() for y, w in zip(yd, weights)), ds, allow_unused=True)
    for i, (a, b) in enumerate(zip(gk, gd)):
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        torch.testing.assert_close(b, a, atol=grad_atol, rtol=0, msg=lambda m: f"grad of input {i}: {m}")
    return yk, yd


def data(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "state"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_inference(case, return_sequences, return_state, go_backwards):
    kind, kwargs = LAYER_CASES[case]
    flags = dict(return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    k, d = pair(kind, **kwargs, **flags)
    yk, _ = assert_parity(lambda x: k(x, training=False), lambda x: d(x, training=False), [data(B, T, D)])
    assert len(yk) == 1 + return_state * (2 if kind == "LSTM" else 1)


@pytest.mark.parametrize("shape", [(1, T, D), (B, 1, D), (1, 1, 1)], ids=["batch1", "time1", "all1"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_degenerate_shapes(kind, shape):
    name, kwargs = KINDS[kind]
    k = getattr(keras.layers, name)(U, return_sequences=True, return_state=True, **kwargs)
    k.build(shape)
    randomize(k)
    d = getattr(droprnn, name)(U, return_sequences=True, return_state=True, input_size=shape[-1], **kwargs)
    d.set_weights(k.get_weights())
    assert_parity(lambda x: k(x, training=False), lambda x: d(x, training=False), [data(*shape)])


@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("zero_output", [False, True], ids=["repeat", "zero_out"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_mask(kind, mask, zero_output, go_backwards, return_sequences):
    name, kwargs = KINDS[kind]
    k, d = pair(
        name, **kwargs, return_sequences=return_sequences, return_state=True, go_backwards=go_backwards,
        zero_output_for_mask=zero_output,
    )
    m = mask_tensor(mask)
    assert_parity(lambda x: k(x, mask=m, training=False), lambda x: d(x, mask=m, training=False), [data(B, T, D)])
    # droprnn's lengths= is the same mask for right padding
    if mask == "right_pad":
        lengths = m.sum(1)
        torch.testing.assert_close(d(data(B, T, D), lengths=lengths)[0], d(data(B, T, D), mask=m)[0], atol=0, rtol=0)


@pytest.mark.parametrize("mask", [None, "left_pad", "holes"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_initial_state(kind, go_backwards, mask):
    """Gradients flow to the initial states too; a masked first step outputs 0 (torch), not h0."""
    name, kwargs = KINDS[kind]
    k, d = pair(name, **kwargs, return_sequences=True, return_state=True, go_backwards=go_backwards)
    m = None if mask is None else mask_tensor(mask)
    n_states = 2 if name == "LSTM" else 1
    inputs = [data(B, T, D)] + [3.0 * data(B, U, seed=10 + i) for i in range(n_states)]
    assert_parity(
        lambda x, *s: k(x, initial_state=list(s), mask=m, training=False),
        lambda x, *s: d(x, initial_state=list(s), mask=m, training=False),
        inputs,
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_stateful(kind):
    # Outputs only: Keras assigns its state variables in place after the call, so autograd cannot go
    # back through a stateful Keras call.
    name, kwargs = KINDS[kind]
    k, d = pair(name, **kwargs, stateful=True, return_sequences=True, return_state=True)
    x1, x2, x3 = data(B, T, D, seed=1), data(B, T, D, seed=2), data(B, T, D, seed=3)
    kcall, dcall = (lambda x: k(x, training=False)), (lambda x: d(x, training=False))
    assert_parity(kcall, dcall, [x1], grads=False)
    second, _ = assert_parity(kcall, dcall, [x2], grads=False)
    # the second call really started from the carried states: a fresh layer on x2 differs
    fresh = getattr(droprnn, name)(U, input_size=D, return_sequences=True, return_state=True, **kwargs)
    fresh.set_weights(k.get_weights())
    assert (fresh(x2)[0] - second[0]).abs().max() > 1e-3
    k.reset_state()
    d.reset_state()
    after_reset, _ = assert_parity(kcall, dcall, [x3], grads=False)
    torch.testing.assert_close(after_reset[0], fresh(x3)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- stacked cells
def stacked_pair(return_sequences, return_state, go_backwards=False, weight_seed=0, **cell_kwargs):
    """keras.layers.RNN([LSTMCell(4), GRUCell(3)]) and droprnn.RNN([LSTMCell(4), GRUCell(3)])."""
    lstm_kw, gru_kw = cell_kwargs.get("lstm", {}), cell_kwargs.get("gru", {})
    flags = dict(return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    k = keras.layers.RNN([keras.layers.LSTMCell(4, **lstm_kw), keras.layers.GRUCell(U, **gru_kw)], **flags)
    k.build((B, T, D))
    randomize(k, weight_seed)
    d = droprnn.RNN([droprnn.LSTMCell(4, **lstm_kw), droprnn.GRUCell(U, **gru_kw)], input_size=D, **flags)
    d.set_weights(k.get_weights())
    return k, d


@pytest.mark.parametrize("mask", [None, "holes"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "state"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
def test_stacked_cells(return_sequences, return_state, go_backwards, mask):
    k, d = stacked_pair(return_sequences, return_state, go_backwards)
    assert [w.shape for w in d.get_weights()] == [(D, 16), (4, 16), (16,), (4, 9), (U, 9), (2, 9)]
    m = None if mask is None else mask_tensor(mask)
    yk, _ = assert_parity(lambda x: k(x, mask=m, training=False), lambda x: d(x, mask=m, training=False), [data(B, T, D)])
    assert len(yk) == 1 + return_state * 3  # output, LSTM h, c, GRU h


def test_stacked_cells_initial_state():
    k, d = stacked_pair(True, True)
    inputs = [data(B, T, D), data(B, 4, seed=2), data(B, 4, seed=3), data(B, U, seed=4)]
    m = mask_tensor("left_pad")
    assert_parity(
        lambda x, h, c, g: k(x, initial_state=[[h, c], [g]], mask=m, training=False),
        lambda x, h, c, g: d(x, initial_state=[[h, c], [g]], mask=m, training=False),
        inputs,
    )


# ---------------------------------------------------------------------------------------------- Bidirectional
@pytest.mark.parametrize("mask", [None, "holes"])
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "state"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul", None])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional(kind, merge_mode, return_sequences, return_state, mask):
    name, kwargs = KINDS[kind]
    flags = dict(return_sequences=return_sequences, return_state=return_state)
    k = keras.layers.Bidirectional(getattr(keras.layers, name)(U, **kwargs, **flags), merge_mode=merge_mode)
    k.build((B, T, D))
    randomize(k)
    d = droprnn.Bidirectional(getattr(droprnn, name)(U, **kwargs, **flags), merge_mode=merge_mode, input_size=D)
    d.set_weights(k.get_weights())
    m = None if mask is None else mask_tensor(mask)
    yk, _ = assert_parity(lambda x: k(x, mask=m, training=False), lambda x: d(x, mask=m, training=False), [data(B, T, D)])
    n_states = (2 if name == "LSTM" else 1) * 2 * return_state
    assert len(yk) == (2 if merge_mode is None else 1) + n_states


def test_bidirectional_initial_state():
    k = keras.layers.Bidirectional(keras.layers.LSTM(U, return_sequences=True, return_state=True))
    k.build((B, T, D))
    randomize(k)
    d = droprnn.Bidirectional(droprnn.LSTM(U, return_sequences=True, return_state=True), input_size=D)
    d.set_weights(k.get_weights())
    inputs = [data(B, T, D)] + [data(B, U, seed=s) for s in (5, 6, 7, 8)]
    m = mask_tensor("left_pad")
    assert_parity(
        lambda x, *s: k(x, initial_state=list(s), mask=m, training=False),
        lambda x, *s: d(x, initial_state=list(s), mask=m, training=False),
        inputs,
    )


# ---------------------------------------------------------------------------------------------- seeded training
TRAINING_CASES = {
    f"{kind}-{which}": (kind, rates)
    for kind in KINDS
    for which, rates in {
        "dropout": {"dropout": 0.3},
        "recurrent": {"recurrent_dropout": 0.4},
        "both": {"dropout": 0.3, "recurrent_dropout": 0.4},
    }.items()
}


@pytest.mark.parametrize("mask", [None, "holes"])
@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_seeded_training_matches_keras(case, mask):
    """Same seed -> same masks per call; fresh masks next call; an inference call keeps the streams in step."""
    kind, rates = TRAINING_CASES[case]
    name, kwargs = KINDS[kind]
    k, d = pair(name, **kwargs, **rates, seed=1234, return_sequences=True, return_state=True)
    m = None if mask is None else mask_tensor(mask)
    train_k, train_d = (lambda x: k(x, mask=m, training=True)), (lambda x: d(x, mask=m, training=True))
    x = data(B, T, D)
    first, _ = assert_parity(train_k, train_d, [x], atol=1e-6)
    second, _ = assert_parity(train_k, train_d, [x], atol=1e-6)
    assert (first[0] - second[0]).abs().max() > 1e-3, "the second call must draw fresh masks"
    inference, _ = assert_parity(lambda x: k(x, mask=m, training=False), lambda x: d(x, mask=m, training=False), [x])
    assert (inference[0] - second[0]).abs().max() > 1e-3, "training=True must apply dropout"
    assert_parity(train_k, train_d, [x], atol=1e-6)


def test_seeded_training_stacked_cells():
    k, d = stacked_pair(
        True, True,
        lstm={"dropout": 0.3, "recurrent_dropout": 0.2, "seed": 11}, gru={"dropout": 0.25, "recurrent_dropout": 0.35, "seed": 12},
    )
    train_k, train_d = (lambda x: k(x, training=True)), (lambda x: d(x, training=True))
    x = data(B, T, D)
    assert_parity(train_k, train_d, [x], atol=1e-6)
    assert_parity(lambda x: k(x, training=False), lambda x: d(x, training=False), [x])
    assert_parity(train_k, train_d, [x], atol=1e-6)


DROPOUT_LAYERS = {
    "dropout": ("Dropout", {"rate": 0.4}),
    "dropout_time_shared": ("Dropout", {"rate": 0.4, "noise_shape": (None, 1, None)}),
    "dropout_timesteps": ("Dropout", {"rate": 0.4, "noise_shape": (None, None, 1)}),
    "spatial1d": ("SpatialDropout1D", {"rate": 0.4}),
    "gaussian_dropout": ("GaussianDropout", {"rate": 0.4}),
    "gaussian_noise": ("GaussianNoise", {"stddev": 0.5}),
    "alpha_dropout": ("AlphaDropout", {"rate": 0.4}),
}


@pytest.mark.parametrize("case", list(DROPOUT_LAYERS))
def test_seeded_dropout_layers_match_keras(case):
    name, kwargs = DROPOUT_LAYERS[case]
    k = getattr(keras.layers, name)(**kwargs, seed=77)
    d = getattr(droprnn, name)(**kwargs, seed=77)
    x = data(B, T, D) + 0.1
    first, _ = assert_parity(lambda x: k(x, training=True), lambda x: d(x, training=True), [x], atol=1e-6)
    second, _ = assert_parity(lambda x: k(x, training=True), lambda x: d(x, training=True), [x], atol=1e-6)
    assert (first[0] - second[0]).abs().max() > 1e-3, "each call draws new noise"
    assert (first[0] - x).abs().max() > 1e-3, "training=True must change the input"


@pytest.mark.parametrize("case", list(DROPOUT_LAYERS))
def test_dropout_layers_identity_at_inference(case):
    name, kwargs = DROPOUT_LAYERS[case]
    k, d = getattr(keras.layers, name)(**kwargs), getattr(droprnn, name)(**kwargs)
    x = data(B, T, D)
    torch.testing.assert_close(torch.as_tensor(k(x, training=False)), x, atol=0, rtol=0)
    torch.testing.assert_close(d(x, training=False), x, atol=0, rtol=0)
    torch.testing.assert_close(d.eval()(x), x, atol=0, rtol=0)
    assert (d.train()(x) - x).abs().max() > 1e-3  # training=None follows .train()


# ---------------------------------------------------------------------------------------------- initializers
def glorot_bound(fan_in, fan_out):
    return (6.0 / (fan_in + fan_out)) ** 0.5


def check_initial_weights(kind, weights, kwargs, units):
    """Keras 3's default initializers, as statistics (both libraries must satisfy them)."""
    kernel, recurrent, *bias = [torch.as_tensor(np.asarray(w), dtype=torch.float64) for w in weights]
    k = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[kind]
    assert tuple(kernel.shape) == (D, k * units) and tuple(recurrent.shape) == (units, k * units)
    # glorot_uniform over the whole fused kernel: fan_out = k·U; spread over (nearly) the whole interval
    bound = glorot_bound(D, k * units)
    assert kernel.abs().max() <= bound + 1e-7
    assert kernel.abs().max() > 0.8 * bound
    # centred: the mean of n uniform draws on (-bound, bound) has deviation bound / sqrt(3n); 5 of them is
    # a miss once in millions of draws (a fixed 0.25 * bound failed about once in 30 for SimpleRNN's 30 draws)
    assert abs(kernel.mean()) < 5 * bound / (3 * kernel.numel()) ** 0.5
    # orthogonal over the whole (U, k·U) matrix: orthonormal rows (per-gate blocks would give R R^T = k·I)
    torch.testing.assert_close(recurrent @ recurrent.T, torch.eye(units, dtype=torch.float64), atol=1e-5, rtol=0)
    if k > 1:
        block = recurrent[:, :units]
        assert (block @ block.T - torch.eye(units, dtype=torch.float64)).abs().max() > 1e-2
    if kwargs.get("use_bias", True) is False:
        assert bias == []
        return
    (bias,) = bias
    if kind == "GRU" and kwargs.get("reset_after", True):
        assert tuple(bias.shape) == (2, 3 * units)
    else:
        assert tuple(bias.shape) == (k * units,)
    expected = torch.zeros_like(bias)
    if kind == "LSTM" and kwargs.get("unit_forget_bias", True):
        expected[units:2 * units] = 1.0
    assert torch.equal(bias, expected)


INIT_CASES = {
    "lstm": ("LSTM", {}),
    "lstm_no_forget_bias": ("LSTM", {"unit_forget_bias": False}),
    "lstm_nobias": ("LSTM", {"use_bias": False}),
    "gru": ("GRU", {}),
    "gru_v1": ("GRU", {"reset_after": False}),
    "simple": ("SimpleRNN", {}),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_default_initializers_follow_keras(case):
    kind, kwargs = INIT_CASES[case]
    units = 6  # U·k columns ≥ U rows always; 6 makes the orthogonality check non-trivial
    k = getattr(keras.layers, kind)(units, **kwargs)
    k.build((B, T, D))
    check_initial_weights(kind, k.get_weights(), kwargs, units)  # the statistics are Keras's
    d = getattr(droprnn, kind)(units, input_size=D, **kwargs)
    check_initial_weights(kind, d.get_weights(), kwargs, units)
    assert [w.shape for w in d.get_weights()] == [w.shape for w in k.get_weights()]


def test_lstm_forget_bias_with_constant_initializer():
    """The forget block is exactly 1.0; the other blocks keep bias_initializer (Keras code, not docstring)."""
    k = keras.layers.LSTM(U, bias_initializer=keras.initializers.Constant(0.03))
    k.build((B, T, D))
    d = droprnn.LSTM(U, bias_initializer=droprnn.initializers.Constant(0.03), input_size=D)
    expected = np.array([0.03] * U + [1.0] * U + [0.03] * 2 * U, dtype=np.float32)
    np.testing.assert_array_equal(k.get_weights()[2], expected)
    np.testing.assert_array_equal(d.get_weights()[2], expected)


# ---------------------------------------------------------------------------------------------- from_keras
def assert_same_weights(ours, theirs):
    mine, keras_weights = ours.get_weights(), theirs.get_weights()
    assert len(mine) == len(keras_weights)
    for a, b in zip(mine, keras_weights):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_from_keras_embedding_bidirectional_gru():
    vocab, steps = 11, 6
    model = keras.Sequential([
        keras.Input(shape=(steps,), dtype="int32"),
        keras.layers.Embedding(vocab, 4, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(U, return_sequences=True)),
        keras.layers.Dropout(0.5),
        keras.layers.GRU(5),
        keras.layers.Dense(4, activation="softmax"),
    ])
    randomize(model, seed=3)
    ours = droprnn.from_keras(model).eval()
    assert_same_weights(ours, model)
    ids = torch.tensor([
        [3, 5, 2, 7, 1, 9],  # no padding
        [4, 8, 6, 0, 0, 0],  # right padding
        [0, 0, 2, 10, 5, 1],  # left padding: masked first steps
        [0, 7, 0, 3, 0, 0],  # holes
    ])
    expected = model(ids, training=False)
    got = ours(ids)
    torch.testing.assert_close(got, torch.as_tensor(expected), atol=1e-5, rtol=0)
    # the mask matters: the same ids without mask_zero give other outputs
    unmasked = droprnn.Sequential(list(ours.layers)[1:]).eval()
    assert (got - unmasked(ours[0](ids))).abs().max() > 1e-4


def test_from_keras_masking_simple_rnn_time_distributed():
    model = keras.Sequential([
        keras.Input(shape=(T, D)),
        keras.layers.Masking(mask_value=0.0),
        keras.layers.SimpleRNN(U, return_sequences=True, activation="relu"),
        keras.layers.TimeDistributed(keras.layers.Dense(2, activation="tanh")),
        keras.layers.LSTM(4, return_sequences=True, go_backwards=True),
        keras.layers.SpatialDropout1D(0.3),
        keras.layers.Dense(2),
    ])
    randomize(model, seed=4)
    ours = droprnn.from_keras(model).eval()
    assert_same_weights(ours, model)
    x = data(B, T, D)
    x[0, :2] = 0.0  # masked first steps
    x[1, 4:] = 0.0  # right padding
    x[2, 3] = 0.0  # a hole
    assert_parity(lambda x: model(x, training=False), lambda x: ours(x), [x])


def test_from_keras_stacked_cells_rnn():
    model = keras.Sequential([
        keras.Input(shape=(T, D)),
        keras.layers.RNN(
            [keras.layers.LSTMCell(4, recurrent_activation="hard_sigmoid"), keras.layers.GRUCell(U, reset_after=False),
             keras.layers.SimpleRNNCell(2)],
            return_sequences=True,
        ),
        keras.layers.GRU(U),
    ])
    randomize(model, seed=5)
    ours = droprnn.from_keras(model).eval()
    assert_same_weights(ours, model)
    assert_parity(lambda x: model(x, training=False), lambda x: ours(x), [data(B, T, D)])


def test_from_keras_seeded_dropout_trains_like_keras():
    """Seeds carry over: the converted model in training mode draws Keras's masks."""
    model = keras.Sequential([
        keras.Input(shape=(T, D)),
        keras.layers.LSTM(U, dropout=0.3, recurrent_dropout=0.2, seed=21, return_sequences=True),
        keras.layers.Dropout(0.4, noise_shape=(None, 1, None), seed=22),
        keras.layers.GRU(U, dropout=0.2, seed=23),
    ])
    randomize(model, seed=6)
    ours = droprnn.from_keras(model)
    x = data(B, T, D)
    for _ in range(2):
        assert_parity(lambda x: model(x, training=True), lambda x: ours(x, training=True), [x], atol=1e-6)


def test_from_keras_unsupported_layer_is_named():
    model = keras.Sequential([
        keras.Input(shape=(T, D)),
        keras.layers.LSTM(U, return_sequences=True),
        keras.layers.LayerNormalization(name="my_norm"),
    ])
    with pytest.raises(droprnn.DroprnnError, match=r"my_norm.*LayerNormalization"):
        droprnn.from_keras(model)


def test_from_keras_of_an_unbuilt_model_or_a_lambda_activation_is_named():
    unbuilt = keras.Sequential([keras.layers.LSTM(U), keras.layers.Dense(2)])
    with pytest.raises(droprnn.DroprnnError, match="has no weights yet: the Keras model is not built"):
        droprnn.from_keras(unbuilt)
    lam = keras.Sequential([keras.Input(shape=(T, D)), keras.layers.SimpleRNN(U, activation=lambda x: keras.ops.tanh(x),
                                                                                    name="lam")])
    with pytest.raises(droprnn.DroprnnError, match="SimpleRNN 'lam' has an.* use a named activation") as info:
        droprnn.from_keras(lam)
    assert len(str(info.value)) < 400


def test_from_keras_unsupported_cell_is_named():
    class MyCell(keras.layers.SimpleRNNCell):
        pass

    model = keras.Sequential([keras.Input(shape=(T, D)), keras.layers.RNN(MyCell(U))])
    with pytest.raises(droprnn.DroprnnError, match="MyCell"):
        droprnn.from_keras(model)
