import os

# Keras (a test dependency) must run on its torch backend; set before anything imports it.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_global_rng():
    torch.manual_seed(1234)
    yield
