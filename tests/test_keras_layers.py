"""droprnn.keras: Keras 3 layers (torch backend) whose loop runs droprnn, held to Keras's own layers.

Each test builds Keras's layer and droprnn.keras's with the same arguments and seed, copies the weights
across and compares outputs, states and gradients (float32, 1e-5): the masks are the ones Keras draws, so
seeded training calls match draw for draw.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("droprnn.keras needs Keras on its torch backend", allow_module_level=True)

import droprnn  # noqa: E402
import droprnn.keras as dk  # noqa: E402
from droprnn.errors import DroprnnError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

B, T, D, U = 3, 7, 5, 4
CASES = {
    "lstm": ("LSTM", {}),
    "lstm_nobias_relu": ("LSTM", {"use_bias": False, "activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    "gru": ("GRU", {}),
    "gru_v1": ("GRU", {"reset_after": False}),
    "simple": ("SimpleRNN", {}),
}
DROPOUTS = {"none": {}, "input": {"dropout": 0.3}, "both": {"dropout": 0.3, "recurrent_dropout": 0.4}}
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)


def pair(kind, **kwargs):
    """Keras's layer and droprnn.keras's, built, with the same weights and seed."""
    theirs = getattr(keras.layers, kind)(U, seed=7, **kwargs)
    ours = getattr(dk, kind)(U, seed=7, **kwargs)
    x = torch.randn(B, T, D)
    theirs(x)
    ours(x)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(-0.5, 0.5, w.shape).astype("float32") for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return theirs, ours


def outputs(layer, x, **kwargs):
    out = layer(x, **kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dropout", DROPOUTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_states_equal_keras_layer(case, dropout, training):
    kind, options = CASES[case]
    for flags in ({"return_sequences": True, "return_state": True}, {"go_backwards": True, "return_state": True}, {}):
        theirs, ours = pair(kind, **options, **DROPOUTS[dropout], **flags)
        x = torch.randn(B, T, D)
        for call in range(2):  # the second call draws fresh masks from both seed streams alike
            assert_close(outputs(ours, x, training=training), outputs(theirs, x, training=training))


@pytest.mark.parametrize("case", CASES)
def test_masked_steps_and_initial_states_equal_keras_layer(case):
    kind, options = CASES[case]
    theirs, ours = pair(kind, **options, dropout=0.2, recurrent_dropout=0.3, return_sequences=True,
                        return_state=True)
    x = torch.randn(B, T, D)
    states = [torch.randn(B, U) for _ in range(2 if kind == "LSTM" else 1)]
    for training in (False, True):
        got = outputs(ours, x, mask=MASK, initial_state=states, training=training)
        assert_close(got, outputs(theirs, x, mask=MASK, initial_state=states, training=training))


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_keras_layer(case):
    kind, options = CASES[case]
    theirs, ours = pair(kind, **options, dropout=0.2, recurrent_dropout=0.3, return_sequences=True)
    x = torch.randn(B, T, D)
    weight = torch.randn(B, T, U)
    grads = []
    for layer in (theirs, ours):
        leaf = x.clone().requires_grad_(True)
        params = [v.value for v in layer.trainable_variables]
        (layer(leaf, training=True) * weight).sum().backward()
        grads.append([leaf.grad.clone()] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    assert_close(grads[1], grads[0])


def test_dropout_is_applied_in_training_only():
    _, ours = pair("LSTM", dropout=0.5, recurrent_dropout=0.5)
    x = torch.randn(B, T, D)
    assert not torch.allclose(ours(x, training=True), ours(x, training=False))
    torch.testing.assert_close(ours(x, training=False), ours(x, training=False))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_the_weights_are_keras_own_in_names_shapes_and_order(kind):
    theirs, ours = pair(kind, dropout=0.1)
    assert [(v.path.split("/", 1)[1], tuple(v.shape)) for v in ours.weights] == [
        (v.path.split("/", 1)[1], tuple(v.shape)) for v in theirs.weights]
    assert isinstance(ours, getattr(keras.layers, kind))


def test_the_fused_kernel_runs_the_loop():
    _, ours = pair("LSTM", dropout=0.2, recurrent_dropout=0.2)
    ours(torch.randn(B, T, D), training=True)
    assert "fused CPU kernel" in droprnn.explain(ours._loop)


def test_a_saved_model_loads_back_with_its_options_and_predicts_the_same(tmp_path):
    model = keras.Sequential([
        keras.Input((T, D)),
        dk.LSTM(U, dropout=0.2, recurrent_dropout=0.2, return_sequences=True, zoneout_c=0.1, seed=1),
        dk.GRU(U, recurrent_dropout=0.1, recurrent_dropout_mode="tied", seed=2),
        keras.layers.Dense(2),
    ])
    x = np.random.default_rng(1).standard_normal((B, T, D)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[0]) is dk.LSTM and loaded.layers[0].zoneout_c == 0.1
    assert loaded.layers[1].recurrent_dropout_mode == "tied"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(model.predict(x, verbose=0)), atol=1e-6)


def test_config_round_trip_keeps_droprnn_options():
    layer = dk.LSTM(U, recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.1, impl="reference")
    config = layer.get_config()
    assert {k: config[k] for k in ("recurrent_dropout_mode", "zoneout_h", "impl")} == {
        "recurrent_dropout_mode": "per_step", "zoneout_h": 0.1, "impl": "reference"}
    again = dk.LSTM.from_config(config)
    assert again.get_config() == config


def test_fit_lowers_the_loss_and_evaluate_and_predict_run():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10, 3)).astype("float32")
    y = x.sum(axis=(1, 2), keepdims=False)[:, None].astype("float32") / 10
    model = keras.Sequential([keras.Input((10, 3)), dk.LSTM(16, dropout=0.1, recurrent_dropout=0.1),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert np.isfinite(model.evaluate(x, y, verbose=0))
    assert model.predict(x[:5], verbose=0).shape == (5, 1)


def test_bidirectional_and_masking_equal_keras():
    def model(layer_class):
        return keras.Sequential([keras.Input((T, D)), keras.layers.Masking(0.0),
                                 keras.layers.Bidirectional(layer_class(U, dropout=0.2, recurrent_dropout=0.2, seed=3,
                                                                        return_sequences=True))])

    theirs, ours = model(keras.layers.LSTM), model(dk.LSTM)
    ours.set_weights(theirs.get_weights())
    x = torch.randn(B, T, D)
    x[1, 4:] = 0.0  # masked by Masking
    assert type(ours.layers[-1].backward_layer) is dk.LSTM
    for training in (False, True):
        assert_close([ours(x, training=training)], [theirs(x, training=training)])


def test_stateful_layers_carry_states_as_keras():
    theirs, ours = pair("GRU", stateful=True, recurrent_dropout=0.2, return_sequences=True)
    theirs.reset_state()  # the states the build calls left came from other weights
    ours.reset_state()
    for _ in range(3):
        x = torch.randn(B, T, D)
        assert_close([ours(x, training=True)], [theirs(x, training=True)])


def test_droprnn_placements_draw_their_own_masks_from_the_seed():
    x = torch.randn(B, T, D)
    a = dk.LSTM(U, recurrent_dropout=0.5, recurrent_dropout_mode="tied", zoneout_h=0.2, seed=5)
    b = dk.LSTM(U, recurrent_dropout=0.5, recurrent_dropout_mode="tied", zoneout_h=0.2, seed=5)
    a(x)
    b(x)
    b.set_weights(a.get_weights())
    torch.testing.assert_close(a(x, training=True), b(x, training=True))
    assert not torch.allclose(a(x, training=True), a(x, training=False))


def test_bad_droprnn_options_are_named():
    with pytest.raises(DroprnnError, match="recurrent_dropout_mode"):
        dk.LSTM(U, recurrent_dropout=0.2, recurrent_dropout_mode="sideways")
    with pytest.raises(DroprnnError, match="zoneout_h"):
        dk.GRU(U, zoneout_h=1.5)


def test_another_backend_is_refused_with_the_way_to_the_torch_one(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(DroprnnError, match="KERAS_BACKEND=torch"):
        dk.LSTM(U)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_a_mixed_bfloat16_policy_runs_bfloat16_products_close_to_keras(kind):
    """Keras's "mixed_bfloat16" (float32 variables, bfloat16 computation) runs under torch's autocast: the
    products in bfloat16, so the result is Keras's own to bfloat16's precision, not to float32's."""
    theirs, ours = pair(kind, dtype="mixed_bfloat16", return_sequences=True)
    x = torch.randn(B, T, D)
    got, want = ours(x), theirs(x)
    assert got.dtype == torch.bfloat16 and ours.weights[0].dtype == "float32"
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert ours._loop.last_kernel.bf16_products, ours._loop.last_kernel


def test_mc_predict_refuses_keras_models_whose_passes_would_all_be_the_same():
    """Keras's dropout reads each call's `training` argument, not torch's flags: mc_predict says so instead of
    returning a zero spread."""
    model = keras.Sequential([keras.Input((T, D)), dk.LSTM(U, dropout=0.3, recurrent_dropout=0.3),
                              keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    x = torch.randn(B, T, D)
    with pytest.raises(DroprnnError, match="Keras layer.*training=True"):
        droprnn.mc_predict(model, x, samples=3)
    with pytest.raises(DroprnnError, match=r"Keras layer \(LSTM\)"):
        droprnn.mc_dropout_mode(torch.nn.Sequential(dk.LSTM(U, dropout=0.3))).__enter__()
    passes = torch.stack([model(x, training=True) for _ in range(3)])  # the way the message gives
    assert bool((passes.std(0) > 0).all())


def test_from_keras_keeps_droprnn_keras_options():
    """A Keras model with droprnn.keras layers converts to droprnn layers with the same placements: the
    options are not dropped for Keras's defaults, and seeded training calls draw the same masks."""
    model = keras.Sequential([
        keras.Input((T, D)),
        dk.LSTM(U, dropout=0.2, recurrent_dropout=0.3, recurrent_dropout_mode="tied", input_dropout_mode="shared",
                zoneout_h=0.05, zoneout_c=0.1, return_sequences=True, seed=3),
        dk.GRU(U, recurrent_dropout=0.2, recurrent_dropout_mode="weights", seed=4),
    ])
    converted = droprnn.from_keras(model)
    lstm, gru = converted.layers
    assert (lstm.cell.recurrent_dropout_mode, lstm.cell.input_dropout_mode, lstm.cell.zoneout_h,
            lstm.cell.zoneout_c) == ("tied", "shared", 0.05, 0.1)
    assert gru.cell.recurrent_dropout_mode == "weights"
    alone = droprnn.from_keras(model.layers[1])  # a droprnn.keras layer is a Keras layer
    assert isinstance(alone, droprnn.GRU) and alone.cell.recurrent_dropout_mode == "weights"
    x = torch.randn(B, T, D)
    torch.testing.assert_close(converted(x, training=True), model(x, training=True), atol=1e-5, rtol=1e-5)


def test_from_keras_says_which_training_settings_it_drops_and_keeps_frozen_layers_frozen():
    frozen = keras.layers.Dense(2)
    model = keras.Sequential([
        keras.Input((T, D)),
        keras.layers.LSTM(U, kernel_regularizer=keras.regularizers.L2(0.01),
                          recurrent_constraint=keras.constraints.MaxNorm(3.0), return_sequences=True),
        keras.layers.GRU(U),
        frozen,
    ])
    frozen.trainable = False
    with pytest.warns(UserWarning, match=r"layer 'lstm.*kernel_regularizer=L2.*recurrent_constraint=MaxNorm") as caught:
        converted = droprnn.from_keras(model)
    assert len([w for w in caught if "from_keras" in str(w.message)]) == 1  # the GRU and Dense drop nothing
    lstm, gru, dense = converted.layers
    assert all(p.requires_grad for p in [*lstm.parameters(), *gru.parameters()])
    assert not any(p.requires_grad for p in dense.parameters())


def test_options_and_rates_set_after_build_reach_the_loop():
    """droprnn's options and the cell's rates, set on a built layer, are what its next call runs (the loop is
    remade from them), and a bad one is refused at that call by name."""
    _, ours = pair("LSTM", return_sequences=True)
    x = torch.randn(B, T, D)
    before = ours(x, training=False)
    ours.zoneout_h = 0.5  # in inference, zoneout mixes in the previous h by its rate
    assert ours._loop.cells[0].zoneout_h == 0.0
    after = ours(x, training=False)
    assert ours._loop.cells[0].zoneout_h == 0.5 and not torch.allclose(after, before)
    ours.cell.recurrent_dropout = 0.3
    ours(x, training=True)
    assert ours._loop.cells[0].recurrent_dropout == 0.3
    ours.recurrent_dropout_mode = "tide"
    with pytest.raises(DroprnnError, match="recurrent_dropout_mode.*'tide'"):
        ours(x, training=True)
