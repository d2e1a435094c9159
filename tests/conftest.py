import os

# Keras (a test dependency) must run on its torch backend; set before anything imports it.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_global_rng():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def benchmark_script():
    """Loads ``<folder>/<name>.py`` (benchmarks/ by default, or experiments/) as a module, as the tests of
    those scripts read them (the scripts are no package)."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str, folder: str = "benchmarks"):
        path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered as an import would (pickling and dataclasses look there)
        spec.loader.exec_module(module)
        return module

    return load
