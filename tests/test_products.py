"""The large products around the GPU time loops (droprnn.kernels.gpu.products), on the CPU without Triton.

Per-gate masks make one product per gate; small ones run batched over the gates (one masked copy
(G, B, T, D), one bmm), large ones one gate at a time. Both routes are held here to the products written
out gate by gate in float64, for every mask layout the time loops pass: per sequence (G, B, D), per step
(T, G, B, D) as a tensor or a CounterMask, a shared mask, none, and column slices of wider gradients.
"""

from __future__ import annotations

import pytest
import torch

from droprnn.kernels import products
from droprnn.random import CounterMask

F64 = torch.float64
B, T, D, U = 3, 5, 6, 4


@pytest.fixture(params=["batched", "one gate at a time"])
def route(request, monkeypatch):
    monkeypatch.setattr(products, "BATCHED_LIMIT", 1 << 30 if request.param == "batched" else 0)
    return request.param


def make_masks(layout: str, gates: int, width: int):
    g = torch.Generator().manual_seed(7)
    if layout == "none":
        return None
    if layout == "shared":
        return (torch.rand(1, B, width, generator=g, dtype=F64) > 0.3).to(F64) / 0.7
    if layout == "per sequence":
        return (torch.rand(gates, B, width, generator=g, dtype=F64) > 0.3).to(F64) / 0.7
    if layout == "per step":
        return (torch.rand(T, gates, B, width, generator=g, dtype=F64) > 0.3).to(F64) / 0.7
    if layout == "counter":
        return CounterMask(torch.tensor([11, 12]), 0, (T, gates, B, width), 0.3, "dropout", F64)
    raise AssertionError(layout)


def mask_of_gate(masks, g: int) -> torch.Tensor:
    """Gate g's mask against (B, T, width), written plainly: ones without masks."""
    if masks is None:
        return torch.ones(())
    dense = masks.materialize() if isinstance(masks, CounterMask) else masks
    index = g if dense.shape[-3] > 1 else 0
    if dense.dim() == 4:
        return dense[:, index].permute(1, 0, 2)
    return dense[index].unsqueeze(1)


LAYOUTS = ["none", "shared", "per sequence", "per step", "counter"]


@pytest.mark.parametrize("gates", [1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_projections_and_their_gradients_equal_the_gate_by_gate_products(route, gates, layout, with_bias):
    if gates == 1 and layout in ("per sequence", "per step", "counter"):
        layout = "shared"  # a one-gate cell has one mask
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    kernel = torch.randn(gates * U, D, generator=g, dtype=F64).t()  # a transposed view, as droprnn.nn passes
    bias = torch.randn(gates * U, generator=g, dtype=F64) if with_bias else None
    masks = make_masks(layout, gates, D)
    gate_major = products.per_gate(masks)
    out = torch.full((gates, B, T, U) if gate_major else (B, T, gates * U), float("nan"), dtype=F64)

    products.project(x, kernel, bias, masks, out=out, gates=gates)
    cols = [slice(k * U, (k + 1) * U) for k in range(gates)]
    expected = [(x * mask_of_gate(masks, k)) @ kernel[:, cols[k]] + (0 if bias is None else bias[cols[k]])
                for k in range(gates)]
    got = [out[k] if gate_major else out[..., cols[k]] for k in range(gates)]
    for k in range(gates):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)

    dz = torch.randn(B, T, gates * U, generator=g, dtype=F64)
    dx, dkernel = products.input_grads(x, kernel, masks, dz, True, True, gates)
    want_dx = sum((dz[..., cols[k]] @ kernel[:, cols[k]].t()) * mask_of_gate(masks, k) for k in range(gates))
    want_dk = torch.cat([((x * mask_of_gate(masks, k)).reshape(B * T, D).t() @ dz[..., cols[k]].reshape(B * T, U))
                         for k in range(gates)], dim=1)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dkernel, want_dk, rtol=1e-12, atol=1e-12)
    only_x, no_kernel = products.input_grads(x, kernel, masks, dz, True, False, gates)
    no_x, only_kernel = products.input_grads(x, kernel, masks, dz, False, True, gates)
    assert no_kernel is None and no_x is None
    torch.testing.assert_close(only_x, want_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(only_kernel, want_dk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout, chosen", [(layout, chosen) for layout in LAYOUTS for chosen in (None, (0, 1), (2,))
                                            if chosen is None or layout not in ("none", "shared")])
def test_recurrent_kernel_gradient_equals_the_gate_by_gate_products(route, layout, chosen):
    """The GRU asks for column blocks of some gates (per-gate masks only), from a column slice of a wider
    gradient buffer."""
    gates, H = 3, 5
    g = torch.Generator().manual_seed(4)
    h_buffer = torch.randn(B, T + 1, H, generator=g, dtype=F64)
    previous = h_buffer[:, :T]  # not contiguous, as the loops pass it
    masks = make_masks(layout, gates, H)
    blocks = list(range(gates)) if chosen is None else list(chosen)
    wide = torch.randn(B, T, (gates + 1) * U, generator=g, dtype=F64)
    grads = wide[..., U:U + len(blocks) * U]  # a column slice

    got = products.recurrent_kernel_grad(previous, masks, grads, gates=chosen)
    want = torch.cat([(previous * mask_of_gate(masks, k)).reshape(B * T, H).t()
                      @ grads[..., n * U:(n + 1) * U].reshape(B * T, U) for n, k in enumerate(blocks)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batched_route_is_taken_under_the_limit_only_and_when_asked_for(monkeypatch):
    x = torch.zeros(B, T, D)
    monkeypatch.setattr(products, "BATCHED_LIMIT", 4 * x.numel())
    assert products.batched(x, 4) and not products.batched(x, 5)
    assert not products.batched(x, 4, batch_gates=False)  # the CPU's choice


@pytest.mark.parametrize("layout", ["per sequence", "per step", "counter"])
def test_batch_gates_false_gives_the_batched_results(layout):
    gates = 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    kernel = torch.randn(D, gates * U, generator=g, dtype=F64)
    dz = torch.randn(B, T, gates * U, generator=g, dtype=F64)
    masks = make_masks(layout, gates, D)
    side = torch.randn(B, T, U, generator=g, dtype=F64)
    for one_at_a_time, batched in [
        (products.input_grads(x, kernel, masks, dz, True, True, gates, batch_gates=False),
         products.input_grads(x, kernel, masks, dz, True, True, gates)),
        ([products.recurrent_kernel_grad(x, masks, dz, batch_gates=False)], [products.recurrent_kernel_grad(x, masks, dz)]),
        ([products.gru_recurrent_kernel_grad(x, masks, dz, side, True, batch_gates=False)],
         [products.gru_recurrent_kernel_grad(x, masks, dz, side, True)]),
    ]:
        for a, b in zip(one_at_a_time, batched):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gate_masks_refuse_gates_that_are_not_consecutive():
    with pytest.raises(ValueError, match="consecutive gates, got \\(0, 2\\)"):
        products.gate_masks(torch.ones(3, B, D), (0, 2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_empty_batch_gives_zero_gradients(route, layout):
    gates = 4
    x = torch.zeros(0, T, D, dtype=F64)
    masks = {"none": None, "shared": torch.ones(1, 0, D, dtype=F64), "per sequence": torch.ones(gates, 0, D, dtype=F64),
             "per step": torch.ones(T, gates, 0, D, dtype=F64),
             "counter": CounterMask(torch.tensor([1, 2]), 0, (T, gates, 0, D), 0.3, "dropout", F64)}[layout]
    kernel = torch.randn(D, gates * U, dtype=F64)
    dz = torch.zeros(0, T, gates * U, dtype=F64)
    dx, dkernel = products.input_grads(x, kernel, masks, dz, True, True, gates)
    assert dx.shape == x.shape and dkernel.shape == kernel.shape and not dkernel.any()
    dR = products.recurrent_kernel_grad(x, masks, dz)
    assert dR.shape == (D, gates * U) and not dR.any()
