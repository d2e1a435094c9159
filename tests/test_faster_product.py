"""float32 products by the faster library per shape (kernels/cpu/faster_product.py): brgemm's answer held to
torch.mm's for every operand layout, the choice timed once per shape and kept beside the built library, and
the fused kernels' products after their backward loops routed through it, held to the reference loop."""

from __future__ import annotations

import json

import pytest
import torch

import droprnn
from droprnn.kernels import cpu, fused, products
from droprnn.kernels.cpu import faster_product

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=str(cpu.unavailable_reason()))


def operand(rows: int, cols: int, layout: str, seed: int) -> torch.Tensor:
    """(rows, cols) row-major ("n"), a transposed view ("t"), or a column slice of a wider matrix ("s")."""
    g = torch.Generator().manual_seed(seed)
    if layout == "t":
        return torch.randn(cols, rows, generator=g).t()
    if layout == "s":
        return torch.randn(rows, cols + 7, generator=g)[:, 3:3 + cols]
    return torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize("forced", ["brgemm", "torch"])
@pytest.mark.parametrize("a_layout", ["n", "t", "s"])
@pytest.mark.parametrize("b_layout", ["n", "t", "s"])
def test_every_layout_gives_torch_mm_s_product(monkeypatch, forced, a_layout, b_layout):
    monkeypatch.setenv("DROPRNN_PRODUCTS", forced)
    a, b = operand(37, 53, a_layout, 1), operand(53, 29, b_layout, 2)
    wide = torch.full((37, 40), float("nan"))
    out = wide[:, 5:34]  # a column slice: rows with a stride, as the per-gate gradients are written
    assert faster_product.mm(a, b, out) is out
    torch.testing.assert_close(out, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
    assert wide[:, :5].isnan().all() and wide[:, 34:].isnan().all(), "nothing written outside out"


def test_what_brgemm_cannot_take_goes_to_torch(monkeypatch):
    monkeypatch.setenv("DROPRNN_PRODUCTS", "brgemm")
    a, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    assert not faster_product.brgemm_faster(a, b)  # float64
    torch.testing.assert_close(faster_product.mm(a, b, torch.empty(8, 5, dtype=torch.float64)), a @ b)
    a, b = a.float(), b.float()
    out = torch.empty(5, 8).t()  # an output brgemm cannot write row by row
    torch.testing.assert_close(faster_product.mm(a, b, out), a @ b)
    empty = faster_product.mm(torch.randn(0, 6), b, torch.empty(0, 5))
    assert empty.shape == (0, 5)


def test_each_shape_is_timed_once_kept_and_read_back(monkeypatch, tmp_path):
    monkeypatch.delenv("DROPRNN_PRODUCTS", raising=False)
    monkeypatch.setattr(faster_product, "MIN_FLOPS", 0)
    monkeypatch.setattr(faster_product, "_known", {})
    monkeypatch.setattr(cpu, "library_path", lambda: str(tmp_path / "droprnn_cpu.so"))  # the record goes beside
    timed = []

    def brgemm_wins_when_a_is_transposed(first, second, rounds=3):
        first(), second()
        timed.append(len(timed))
        return len(timed) % 2 == 0  # the second shape timed is brgemm's

    monkeypatch.setattr(faster_product, "second_faster", brgemm_wins_when_a_is_transposed)
    row_major, transposed = operand(30, 6, "n", 1), operand(30, 6, "t", 2)
    b = operand(6, 8, "n", 3)
    assert not faster_product.brgemm_faster(row_major, b)
    assert faster_product.brgemm_faster(transposed, b)
    assert not faster_product.brgemm_faster(operand(17, 5, "n", 4), b[:5])  # the same bucket: 32 rows, inner 8
    assert len(timed) == 2, "one timing per shape"
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / faster_product.RECORD).read_text()) == {
        f"nn 32x8x8x{threads}": "torch", f"tn 32x8x8x{threads}": "brgemm"}
    monkeypatch.setattr(faster_product, "_known", {})  # as a new process: it reads the choices instead of timing
    assert faster_product.brgemm_faster(transposed, b) and not faster_product.brgemm_faster(row_major, b)
    assert len(timed) == 2
    monkeypatch.setenv("DROPRNN_PRODUCTS", "torch")
    assert not faster_product.brgemm_faster(transposed, b)


def test_without_the_kernels_loaded_torch_runs_every_product(monkeypatch):
    monkeypatch.delenv("DROPRNN_PRODUCTS", raising=False)
    monkeypatch.setattr(faster_product, "MIN_FLOPS", 0)
    monkeypatch.setattr(cpu, "library_path", lambda: None)
    a, b = torch.randn(30, 6), torch.randn(6, 8)
    assert not faster_product.brgemm_faster(a, b)
    torch.testing.assert_close(faster_product.mm(a, b, torch.empty(30, 8)), a @ b)


def test_small_products_are_neither_timed_nor_recorded(monkeypatch, tmp_path):
    monkeypatch.delenv("DROPRNN_PRODUCTS", raising=False)
    monkeypatch.setattr(faster_product, "_known", {})
    monkeypatch.setattr(cpu, "library_path", lambda: str(tmp_path / "droprnn_cpu.so"))
    monkeypatch.setattr(faster_product, "second_faster", lambda *a, **k: pytest.fail("timed a small product"))
    assert not faster_product.brgemm_faster(torch.randn(10, 10), torch.randn(10, 10))
    assert not (tmp_path / faster_product.RECORD).exists()


def test_the_timing_keeps_the_faster_and_needs_a_clear_win():
    import time
    slow, fast = (lambda: time.sleep(0.003)), (lambda: None)
    assert faster_product.second_faster(slow, fast, rounds=2)
    assert not faster_product.second_faster(fast, slow, rounds=2)


def test_the_products_after_the_loop_go_through_the_given_matmul():
    B, T, D, U, gates = 3, 4, 5, 6, 4
    g = torch.Generator().manual_seed(0)
    x, dz = torch.randn(B, T, D, generator=g), torch.randn(B, T, gates * U, generator=g)
    kernel = torch.randn(D, gates * U, generator=g)
    masks = (torch.rand(gates, B, D, generator=g) > 0.3).float() / 0.7
    h = torch.randn(B, T, U, generator=g)  # the states the recurrent products read (H = U)
    rec_masks = (torch.rand(gates, B, U, generator=g) > 0.3).float() / 0.7
    shapes = []

    def matmul(a, b, out):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        torch.mm(a, b, out=out)

    for per_gate in (masks, masks[:1], None):
        want = products.input_grads(x, kernel, per_gate, dz, True, True, gates, batch_gates=False)
        got = products.input_grads(x, kernel, per_gate, dz, True, True, gates, batch_gates=False, matmul=matmul)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
    assert shapes.count(((D, B * T), (B * T, U))) == gates and shapes.count(((B * T, U), (U, D))) == gates
    assert shapes.count(((D, B * T), (B * T, gates * U))) == 2 and shapes.count(((B * T, gates * U), (gates * U, D))) == 2
    shapes.clear()
    want = products.recurrent_kernel_grad(h, rec_masks, dz, batch_gates=False)
    torch.testing.assert_close(products.recurrent_kernel_grad(h, rec_masks, dz, batch_gates=False, matmul=matmul), want)
    side = torch.randn(B, T, U, generator=g)
    gru_dz = dz[..., :3 * U]
    for reset_after in (True, False):
        want = products.gru_recurrent_kernel_grad(h, rec_masks[:3], gru_dz, side, reset_after, batch_gates=False)
        got = products.gru_recurrent_kernel_grad(h, rec_masks[:3], gru_dz, side, reset_after, batch_gates=False,
                                                 matmul=matmul)
        torch.testing.assert_close(got, want)
    assert len(shapes) == gates + 2 * 3


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("forced", ["brgemm", "torch"])
def test_fused_backward_after_the_loop_by_either_library_equals_the_reference(monkeypatch, kind, forced):
    monkeypatch.setenv("DROPRNN_PRODUCTS", forced)
    monkeypatch.setattr(fused, "_DEFER_BYTES", 0)  # the weight gradients after the loop, whatever the size
    monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0)
    taken = []
    real = faster_product._brgemm
    monkeypatch.setattr(faster_product, "_brgemm", lambda a, b, out: taken.append(1) or real(a, b, out))
    layer_class = {"lstm": droprnn.LSTM, "gru": droprnn.GRU}[kind]
    grads = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        layer = layer_class(48, input_size=40, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, seed=5,
                            impl=impl)
        x = torch.randn(5, 12, 40, requires_grad=True)
        layer(x, training=True).square().sum().backward()
        assert layer.last_kernel.name == impl
        grads[impl] = [x.grad, *(p.grad for p in layer.parameters())]
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    assert bool(taken) == (forced == "brgemm")
