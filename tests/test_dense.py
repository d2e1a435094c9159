"""Dense's product through brgemm (kernels/dense.py) where this machine runs it faster: held to F.linear
forward and backward, with higher derivatives, and F.linear kept wherever something else is watching."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import droprnn
from droprnn.kernels import cpu, dense
from droprnn.kernels.cpu import faster_product

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=str(cpu.unavailable_reason()))


@pytest.fixture
def brgemm(monkeypatch):
    """The brgemm path taken at any size, whatever this machine measures."""
    monkeypatch.setattr(dense, "MIN_FLOPS", 0)
    monkeypatch.setenv("DROPRNN_PRODUCTS", "brgemm")


def took_brgemm(y: torch.Tensor) -> bool:
    fn = y.grad_fn
    while fn is not None and "BrgemmLinear" not in type(fn).__name__ and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn is not None and "BrgemmLinear" in type(fn).__name__


def pair(shape, units, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = droprnn.Dense(units, use_bias=bias, input_size=shape[-1])
    x = torch.randn(*shape, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (12, 33), (7,), (2, 1, 3, 40)], ids=str)
def test_brgemm_path_equals_f_linear_forward_and_backward(brgemm, shape, bias):
    layer, x = pair(shape, 19, bias)
    y = layer(x)
    assert took_brgemm(y)
    want = F.linear(x, layer.kernel.t(), layer.bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    torch.testing.assert_close(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g),
                               rtol=1e-5, atol=1e-5)


def test_brgemm_path_with_a_frozen_kernel_a_strided_input_and_no_input_gradient(brgemm):
    layer, x = pair((6, 11), 9)
    layer.kernel.requires_grad_(False)
    strided = torch.randn(11, 6).t()  # not contiguous
    y = layer(strided)
    assert took_brgemm(y)
    torch.testing.assert_close(y, F.linear(strided, layer.kernel.t(), layer.bias), rtol=1e-5, atol=1e-5)
    (db,) = torch.autograd.grad(y.sum(), [layer.bias])
    torch.testing.assert_close(db, torch.full((9,), 6.0))


def test_brgemm_path_has_second_derivatives(brgemm):
    layer, x = pair((4, 5, 6), 8)
    y = layer(x)
    assert took_brgemm(y)
    want = F.linear(x, layer.kernel.t(), layer.bias)
    params = [x, layer.kernel]

    def second(out):
        first = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in first), params)

    torch.testing.assert_close(second(y), second(want), rtol=1e-4, atol=1e-5)


def test_f_linear_where_brgemm_would_not_be_the_same_computation_in_plain_eager_code(brgemm):
    layer, x = pair((4, 5, 6), 8)
    assert took_brgemm(layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and not took_brgemm(y)
    assert not took_brgemm(droprnn.Dense(8, input_size=6, dtype=torch.float64)(x.double()))
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(layer, (x,))
    assert "aten::linear" in str(traced.graph)  # not a Python Function the trace cannot look into
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-5)
    per_row = torch.func.vmap(lambda row: layer(row))(x)
    torch.testing.assert_close(per_row, layer(x), rtol=1e-5, atol=1e-5)
    grads = torch.func.grad(lambda k: torch.func.functional_call(layer, {"kernel": k}, (x,)).sum())(layer.kernel)
    torch.testing.assert_close(grads, x.detach().reshape(-1, 6).sum(0)[:, None].expand(6, 8), rtol=1e-5, atol=1e-5)


def test_a_dense_layer_alone_never_builds_the_kernels(brgemm, monkeypatch):
    monkeypatch.setattr(cpu, "library_path", lambda: None)  # as in a process where no recurrent layer ran yet
    layer, x = pair((4, 6), 8)
    assert not took_brgemm(layer(x))
    assert "F.linear (the fused CPU kernels are not loaded" in droprnn.explain(layer, x)


def test_explain_names_the_product_and_why(brgemm, monkeypatch):
    layer, x = pair((4, 6), 8)
    assert droprnn.explain(layer, x) == (f"{layer.where}: brgemm (droprnn's float_mm), the faster float32 products "
                                         "on this machine (measured once)")
    assert "pass an input" in droprnn.explain(layer)
    assert droprnn.explain(droprnn.Dense(8, input_size=6, dtype=torch.float64), x.double()).endswith(
        "F.linear (not float32 on the CPU)")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert droprnn.explain(layer, x).endswith("F.linear (under autocast)")
    monkeypatch.setenv("DROPRNN_PRODUCTS", "torch")
    assert droprnn.explain(layer, x).endswith("F.linear (torch's product was the faster for this shape here (forced))")
    monkeypatch.setattr(dense, "MIN_FLOPS", 1e8)
    assert droprnn.explain(layer, x).endswith("F.linear (a product too small to gain)")


def test_each_shape_is_timed_once_and_runs_the_faster_product(monkeypatch, tmp_path):
    """Dense asks kernels/cpu/faster_product.py (whose own tests hold the timing and the record) per shape."""
    monkeypatch.setattr(dense, "MIN_FLOPS", 0)
    monkeypatch.setattr(faster_product, "MIN_FLOPS", 0)
    monkeypatch.delenv("DROPRNN_PRODUCTS", raising=False)
    monkeypatch.setattr(faster_product, "_known", {})
    monkeypatch.setattr(cpu, "library_path", lambda: str(tmp_path / "droprnn_cpu.so"))  # its record goes beside
    timed = []

    def brgemm_wins_the_second_shape(first, second, rounds=3):
        timed.append(1)
        return len(timed) == 2

    monkeypatch.setattr(faster_product, "second_faster", brgemm_wins_the_second_shape)
    layer, _ = pair((4, 6), 8)
    small, large = torch.randn(3, 5, 6), torch.randn(6, 5, 6)  # 15 and 30 rows: buckets of 16 and 32
    assert not took_brgemm(layer(small)) and took_brgemm(layer(large))
    assert not took_brgemm(layer(torch.randn(16, 6))) and took_brgemm(layer(torch.randn(17, 6)))
    assert len(timed) == 2, "one timing per bucket of rows"
    assert "timed once" in droprnn.explain(layer, small) and "brgemm" in droprnn.explain(layer, large)
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / faster_product.RECORD).read_text()) == {f"nn 16x8x8x{threads}": "torch",
                                                                         f"nn 32x8x8x{threads}": "brgemm"}


def test_small_products_stay_with_f_linear(monkeypatch):
    monkeypatch.setenv("DROPRNN_PRODUCTS", "brgemm")
    layer, x = pair((4, 6), 8)
    assert not took_brgemm(layer(x))
    assert dense.MIN_FLOPS > 2 * 4 * 6 * 8


def test_empty_batches_stay_with_f_linear(brgemm):
    layer, _ = pair((4, 6), 8)
    x = torch.randn(0, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8) and not took_brgemm(y)
    y.sum().backward()
    assert x.grad.shape == (0, 6) and not layer.kernel.grad.any()
