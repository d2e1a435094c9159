"""The Keras benchmark's steps run (a long run should not die on a typo): Keras's layer, droprnn.keras's and
droprnn's PyTorch loop, on a tiny shape."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("droprnn.keras needs Keras on its torch backend", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def keras_speed(benchmark_script):
    return benchmark_script("keras_speed")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_every_column_measures_a_positive_time(keras_speed, kind):
    import droprnn.keras

    shape = (2, 3, 4, 5)
    for layer_class in (getattr(keras.layers, kind), getattr(droprnn.keras, kind)):
        assert keras_speed.keras_step_ms(layer_class, shape, steps=2) > 0
    assert keras_speed.torch_step_ms(kind, shape, steps=2) > 0
