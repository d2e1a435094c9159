"""bfloat16 on the fused CPU path: products in bfloat16 (oneDNN's brgemm on AMX, droprnn's own micro-kernel
on AVX512-BF16), float32 accumulation, float32 states and gate math.

Two ways in: a float32 layer under ``torch.autocast("cpu", dtype=torch.bfloat16)``, and a bfloat16 layer
(``.bfloat16()``) fed bfloat16 input. Both are judged against a float64 reference run of the same weights,
input, states and masks (the masks drawn once and passed as ``dropout_plan=``).

The bound. For each compared tensor (outputs, states, gradients) let ``scale = max|r64|``. Rounding the
products' operands to bfloat16 (8 bits of mantissa) gives each product a relative error of about
2^-8 · sqrt(K); measured on these cases the fused error is 0.1%..0.8% of ``scale`` for the outputs and
0.2%..1.5% for the gradients. We require ``err <= 3e-2 · scale``, and -- so that the bound is not merely
loose -- no worse than 1.5x the float32 reference loop run under the same autocast plus 0.5% of ``scale``
(that loop rounds its products' results and its gate math to bfloat16 too, so it is the less accurate one).
A wrong mask, step or gate moves results by tens of percent of ``scale`` and fails. The runs are checked to
have taken the fused kernel with bfloat16 products, and their error to be above float32's (the products
really are bfloat16), with NaN-filled fresh memory so an unwritten element shows up.

On a CPU with neither AMX nor AVX512-BF16 the kernels compute in float32 and round the results once; the
last tests hold that path, and the rest skip there. A CPU with both runs this file once more with the
AVX512-BF16 kernel forced (``DROPRNN_BF16_ENGINE``), so each engine is held to the same bounds where it runs.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import droprnn
from droprnn import DroprnnError
from droprnn.kernels import cpu, dispatch, fused
from kernel_oracle import (
    cast_plan, draw_plans, flat, make_layer, random_input, rebuild, run, stable_seed, uninitialized_is_nan,
)

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

_REASON = cpu.unavailable_reason()
needs_fused = pytest.mark.skipif(_REASON is not None and ("no C++ compiler" in _REASON or
                                                          "DROPRNN_DISABLE_FUSED" in _REASON),
                                 reason=f"fused kernels unavailable here: {_REASON}")
_BF16 = _REASON is None and fused._bf16_available()
needs_bf16 = pytest.mark.skipif(not _BF16, reason="this CPU runs no bfloat16 products (AMX or AVX512-BF16)")
pytestmark = needs_fused

RELATIVE_BOUND = 0.1


def _run(layer, impl, x, plans, *, autocast, **kwargs):
    layer = copy.deepcopy(layer)
    layer.impl = impl
    with uninitialized_is_nan(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        result = run(layer, x, plans, **kwargs)
    assert layer.last_kernel.name == impl, layer.last_kernel
    if impl == "fused":
        assert layer.last_kernel.bf16_products == _BF16, layer.last_kernel
    return result


def _autocast_loop(layer, x, plans, forward_only=False, **kwargs):
    """The reference loop's PyTorch ops under autocast (a hand-written loop under autocast): droprnn's
    dispatch, which would turn autocast off around it, is told that none is active."""
    layer = copy.deepcopy(layer)
    layer.impl = "reference"
    with pytest.MonkeyPatch.context() as patch, torch.autocast("cpu", dtype=BF16):
        patch.setattr(dispatch, "_autocast_dtype", lambda x: None)
        if forward_only:
            return [t.clone() for t in flat(layer(x, dropout_plan=plans[0], **kwargs))], []
        return run(layer, x, plans, **kwargs)


def _exact(layer, x, plans, initial_state=None, **kwargs):
    layer64 = copy.deepcopy(layer).double()
    layer64.impl = "reference"
    init64 = None if initial_state is None else rebuild(initial_state, [t.double() for t in flat(initial_state)])
    return run(layer64, x.double(), [cast_plan(p, F64) for p in plans], initial_state=init64, **kwargs)


def _errors(got, exact):
    out = []
    for g, e in zip(got[0] + got[1], exact[0] + exact[1]):
        assert g.shape == e.shape
        assert not torch.isnan(g).any(), "NaN in a bfloat16-path result (an element never written)"
        out.append(((g.double() - e).abs().max().item(), e.abs().max().item()))
    return out


def _check(got, exact, autocast_reference):
    for k, ((err, scale), (err_ref, _)) in enumerate(zip(_errors(got, exact), _errors(autocast_reference, exact))):
        if scale == 0:
            assert err == 0, f"tensor #{k}: {err} where the reference is exactly zero"
            continue
        assert err <= RELATIVE_BOUND * scale, f"tensor #{k}: error {err:.3g} > {RELATIVE_BOUND} x scale {scale:.3g}"
        assert err <= 1.5 * err_ref + 5e-3 * scale, (
            f"tensor #{k}: error {err:.3g} vs the autocast reference loop's {err_ref:.3g} (scale {scale:.3g})")


CASES = {
    # name: (kind, mode, (B, T, D, U), extra layer kwargs)
    "lstm": ("lstm", dict(dropout=0.25, recurrent_dropout=0.25), (4, 9, 6, 12), {}),
    "lstm_wide": ("lstm", dict(recurrent_dropout=0.3), (3, 6, 70, 130), {}),  # units over one 64-column block
    "lstm_batch1": ("lstm", dict(recurrent_dropout=0.3), (1, 7, 5, 70), {}),  # units split over threads
    "lstm_per_gate": ("lstm", dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_gate",
                                   recurrent_dropout_mode="tied"), (3, 6, 5, 7), {}),
    "lstm_per_step": ("lstm", dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode="per_step",
                                   recurrent_dropout_mode="per_step"), (3, 6, 5, 9), {}),
    "lstm_weights": ("lstm", dict(recurrent_dropout=0.3, recurrent_dropout_mode="weights"), (3, 6, 5, 9), {}),
    "lstm_zoneout_update": ("lstm", dict(recurrent_dropout=0.3, recurrent_dropout_mode="update", zoneout_h=0.25,
                                         zoneout_c=0.25), (3, 6, 5, 9), {}),
    "gru": ("gru", dict(dropout=0.25, recurrent_dropout=0.25), (4, 9, 6, 12), {}),
    "gru_wide": ("gru", dict(recurrent_dropout=0.3), (2, 5, 66, 129), {}),
    "gru_batch1": ("gru", dict(), (1, 7, 5, 70), {}),
    "gru_reset_before": ("gru_reset_before", dict(dropout=0.2, recurrent_dropout=0.3), (3, 6, 5, 11), {}),
    "gru_reset_before_per_gate": ("gru_reset_before", dict(recurrent_dropout=0.3, recurrent_dropout_mode="keras",
                                                           input_dropout_mode="per_gate", dropout=0.2),
                                  (2, 5, 4, 65), {}),
    "simple": ("simple", dict(dropout=0.25, recurrent_dropout=0.25), (4, 9, 6, 12), {}),
    "simple_batch1": ("simple", dict(), (1, 6, 3, 67), {}),
    "stacked": ("stacked", dict(dropout=0.2, recurrent_dropout=0.2), (3, 6, 5, 8), {}),
    "lstm_backwards": ("lstm", dict(recurrent_dropout=0.2), (3, 6, 5, 8), dict(go_backwards=True)),
}


def _case(name):
    kind, mode, (B, T, D, U), extra = CASES[name]
    seed = stable_seed("bf16", name)
    torch.manual_seed(seed)
    layer = make_layer(kind, D, U, F32, mode=mode, seed=seed, weight_scale=0.4, return_sequences=True,
                       return_state=True, **extra)
    x = random_input(B, T, D, F32, seed)
    return layer, x, draw_plans(layer, B, T)


@pytest.fixture(params=["in loop", "after loop"])
def weight_grads(request, monkeypatch):
    """Both ways the backward forms the weight gradients: in its loop (float32 updates), or after it in
    bfloat16 products (fused._defers_weight_grads)."""
    monkeypatch.setattr(fused, "_DEFER_BYTES", 0 if request.param == "after loop" else 1 << 40)
    monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0 if request.param == "after loop" else 1 << 40)
    return request.param


@needs_bf16
@pytest.mark.parametrize("name", list(CASES))
def test_autocast_training_equals_the_float64_reference_within_the_bound(name, weight_grads):
    layer, x, plans = _case(name)
    got = _run(layer, "fused", x, plans, autocast=True)
    assert all(t.dtype == BF16 for t in got[0]) and all(g.dtype == F32 for g in got[1])
    exact = _exact(layer, x, plans)
    _check(got, exact, _autocast_loop(layer, x, plans))
    errors = _errors(got, exact)
    assert max(err / scale for err, scale in errors[:1]) > 1e-5, "not bfloat16 products: float32-accurate"


@needs_bf16
@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before", "simple"])
def test_bias_gradients_are_float32_sums_wherever_the_weight_gradients_are_formed(name, monkeypatch):
    """Under autocast the bias gradients are sums of the float32 gate gradients either way: accumulated in
    the loop, or (the GRU's recurrent bias) summed in float32 from dz after it. Only the products go to
    bfloat16; a bfloat16 sum would move them by its rounding, about 4e-3."""
    layer, x, plans = _case(name)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    bias = [1 + i for i, n in enumerate(names) if "bias" in n]  # grads: x's, then the parameters'
    assert bias
    got = {}
    for where, limit in (("in loop", 1 << 40), ("after loop", 0)):
        monkeypatch.setattr(fused, "_DEFER_BYTES", limit)
        monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", limit)
        got[where] = _run(layer, "fused", x, plans, autocast=True)[1]
    for i in bias:
        torch.testing.assert_close(got["after loop"][i], got["in loop"][i], rtol=1e-5, atol=1e-6)
    weights = [i for i in range(1, len(names) + 1) if i not in bias]
    assert any(not torch.allclose(got["after loop"][i], got["in loop"][i], rtol=1e-5, atol=1e-6) for i in weights), \
        "the weight gradients should differ: bfloat16 products after the loop, float32 updates in it"


@needs_bf16
@pytest.mark.parametrize("name", ["lstm", "lstm_wide", "gru_wide", "gru_reset_before", "simple", "stacked"])
def test_bfloat16_layers_train_fused_within_the_bound(name, weight_grads):
    layer, x, plans = _case(name)
    low = copy.deepcopy(layer).to(BF16)
    got = _run(low, "fused", x.to(BF16), [cast_plan(p, BF16) for p in plans], autocast=False)
    assert all(t.dtype == BF16 for t in got[0] + got[1])
    # the reference sees the bfloat16-rounded weights and input the bfloat16 layer holds
    rounded = copy.deepcopy(low).float()
    exact = _exact(rounded, x.to(BF16).float(), plans)
    _check(got, exact, _autocast_loop(rounded, x.to(BF16).float(), plans))


@needs_bf16
@pytest.mark.parametrize("name", ["lstm", "lstm_batch1", "lstm_wide", "gru", "gru_batch1", "gru_reset_before",
                                  "simple_batch1", "stacked"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_autocast_inference_equals_the_float64_reference_within_the_bound(name, return_sequences):
    layer, x, _ = _case(name)
    layer.return_sequences = return_sequences
    layer.eval()
    plans = draw_plans(layer, x.shape[0], x.shape[1], training=False)
    with torch.inference_mode():
        got_layer = copy.deepcopy(layer)
        got_layer.impl = "fused"
        with uninitialized_is_nan(), torch.autocast("cpu", dtype=BF16):
            got = [t.clone() for t in flat(got_layer(x.clone()))]
        assert got_layer.last_kernel.bf16_products
        ref = _autocast_loop(layer, x.clone(), plans, forward_only=True)[0]
    exact = _exact(layer, x, plans)[0]
    _check((got, []), (exact, []), (ref, []))


@needs_bf16
def test_masked_steps_and_initial_states_under_autocast():
    layer, x, plans = _case("lstm")
    B, T = x.shape[:2]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 5:] = False
    gen = torch.Generator().manual_seed(7)
    init = [0.5 * torch.randn(B, 12, generator=gen) for _ in range(2)]
    got = _run(layer, "fused", x, plans, autocast=True, mask=mask, initial_state=init)
    exact = _exact(layer, x, plans, initial_state=init, mask=mask)
    _check(got, exact, _autocast_loop(layer, x, plans, mask=mask, initial_state=init))


@needs_bf16
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_as_accurate_as_torch_nn_in_bfloat16(kind):
    """droprnn.nn against torch.nn, under autocast and as bfloat16 modules, all judged in float64.
    (Under CPU autocast torch.nn.GRU returns float32; droprnn's layers return autocast's dtype.)"""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(48, 96, batch_first=True)
    ours = getattr(droprnn.nn, kind)(48, 96, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 20, 48)
    want = copy.deepcopy(theirs).double()(x.double())[0]
    with torch.autocast("cpu", dtype=BF16):
        theirs_autocast, ours_autocast = theirs(x)[0], ours(x)[0]
    assert "products in bfloat16" in droprnn.explain(ours)
    theirs_bf16 = copy.deepcopy(theirs).to(BF16)(x.to(BF16))[0]
    ours_bf16 = copy.deepcopy(ours).to(BF16)(x.to(BF16))[0]
    assert ours_autocast.dtype == ours_bf16.dtype == theirs_bf16.dtype == BF16

    def err(t):
        return (t.double() - want).abs().max().item()

    assert err(ours_autocast) <= 1.25 * err(theirs_autocast), (err(ours_autocast), err(theirs_autocast))
    assert err(ours_bf16) <= 1.25 * err(theirs_bf16), (err(ours_bf16), err(theirs_bf16))


@needs_bf16
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (64, 64, 64), (70, 130, 129), (3, 200, 65)])
def test_bf16_mm_is_the_exact_product_of_the_rounded_operands(shape):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M * K + N)
    a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    out = torch.full((M, N), float("nan"))
    torch.ops.droprnn_cpu.bf16_mm(a, b, out)
    want = a.to(BF16).double() @ b.to(BF16).double()  # the rounded operands' product, exactly
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@needs_bf16
@pytest.mark.parametrize("bad, message", [
    (lambda: (torch.randn(3, 4), torch.randn(5, 6), torch.empty(3, 6)), "b must have 4 rows"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(3, 5)), "out"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(3, 6, dtype=F64)), "out"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(6, 3).t()), "out"),
    (lambda: (torch.ones(3, 4, dtype=torch.int32), torch.randn(4, 6), torch.empty(3, 6)), "floating"),
    (lambda: (torch.randn(3), torch.randn(3, 6), torch.empty(1, 6)), "a"),
])
def test_bf16_mm_names_bad_arguments(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.droprnn_cpu.bf16_mm(*bad())


@needs_bf16
@pytest.mark.parametrize("offset", [0, 1, 16])
@pytest.mark.parametrize("N", [128, 130, 192])
def test_bf16_mm_writes_exactly_its_result_whatever_its_alignment(offset, N):
    """Whole 64-byte aligned 64-column blocks are written past the caches, the rest as usual: every layout
    gives the same numbers, and the memory around the result is left alone."""
    M, K = 13, 40
    gen = torch.Generator().manual_seed(offset + N)
    a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    buffer = torch.full((offset + M * N + 16,), float("nan"))
    out = buffer[offset:offset + M * N].view(M, N)
    torch.ops.droprnn_cpu.bf16_mm(a, b, out)
    want = a.to(BF16).double() @ b.to(BF16).double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert buffer[:offset].isnan().all() and buffer[offset + M * N:].isnan().all()


@needs_bf16
def test_bf16_mm_reads_any_strides_and_dtype():
    a = torch.randn(7, 20, dtype=F64)[:, ::2]  # (7, 10), strided, float64
    b = torch.randn(5, 10).t()  # (10, 5), transposed
    out = torch.empty(7, 5)
    torch.ops.droprnn_cpu.bf16_mm(a, b, out)
    want = a.to(BF16).double() @ b.to(BF16).double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_without_bf16_products_the_float32_result_is_rounded_once(monkeypatch):
    """The path a CPU without bfloat16 products takes (forced here): float32 throughout, one rounding."""
    monkeypatch.setattr(fused, "_bf16_available", lambda: False)
    layer, x, plans = _case("lstm")
    layer.impl = "fused"
    with torch.autocast("cpu", dtype=BF16):
        got = layer(x, dropout_plan=plans[0])
    assert not layer.last_kernel.bf16_products and "products in bfloat16" not in droprnn.explain(layer)
    assert layer.last_kernel.bf16_in_float32 and "computed in float32" in droprnn.explain(layer)
    plain = layer(x, dropout_plan=plans[0])
    for g, p in zip(flat(got), flat(plain)):
        assert g.dtype == BF16
        torch.testing.assert_close(g, p.to(BF16), rtol=0, atol=0)


def test_float16_is_not_taken_for_bfloat16():
    layer = droprnn.LSTM(4, dtype=torch.float16, impl="fused")
    with pytest.raises(DroprnnError, match="float16"):
        layer(torch.randn(2, 3, 3, dtype=torch.float16))


def _has_avx512_bf16() -> bool:
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX512-BF16")
def test_each_engine_holds_the_bounds_where_it_runs():
    """The AVX512-BF16 micro-kernel, forced where the default is another engine (AMX), passes this file;
    where it is the default (an AMD EPYC) the run above was its run. Forcing "none" gives the float32 path."""
    forced = {**os.environ, "DROPRNN_BF16_ENGINE": "avx512_bf16"}
    probe = [sys.executable, "-c", "import torch; from droprnn.kernels import cpu; cpu.load(); "
             "print(torch.ops.droprnn_cpu.bf16_engine())"]
    default = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert subprocess.run(probe, capture_output=True, text=True, check=True, env=forced).stdout.split()[-1] == "avx512_bf16"
    none = subprocess.run(probe, capture_output=True, text=True, check=True,
                          env={**os.environ, "DROPRNN_BF16_ENGINE": "none"}).stdout.split()[-1]
    assert none == "none"
    if default == "avx512_bf16":
        assert _BF16 and "AVX512-BF16" in fused.bf16_engine_text()
        return
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "not each_engine"], capture_output=True, text=True, env=forced,
                         cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-500:]
