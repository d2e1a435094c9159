"""Counter-based per-step masks (droprnn.random.CounterMask): what CUDA plans hold for the masks a time loop
uses per step, made from (seed, stream, index) where they are needed instead of stored.

Here on the CPU, without Triton: the integer hash against plain Python arithmetic, the masks' statistics,
their slices, seeded reproducibility, and the plan around them -- drawn on a "counter device" (the tests
add "cpu" to ``plan.COUNTER_DEVICES``), checked, made into tensors, and run by the reference loop and the
fused CPU kernel, which must agree with the same plan made into tensors. tests/test_gpu_kernels.py holds
the Triton kernels to the same masks, bit for bit.
"""

from __future__ import annotations

import math
import random as pyrandom

import pytest
import torch

import droprnn
from droprnn import DroprnnError
from droprnn.dropout import plan as plan_module
from droprnn.kernels import fused
from droprnn.random import (COUNTER_BITS, STREAM_STEP, CounterMask, _mix_u32, _mul_u32, counter_bits,
                            counter_threshold)
from kernel_oracle import call_for, flat, loss_weights

F32, F64 = torch.float32, torch.float64
MASK32 = 0xFFFFFFFF


@pytest.fixture
def counter_cpu(monkeypatch):
    """Plans drawn on the CPU hold counter-based masks, as CUDA plans do."""
    monkeypatch.setattr(plan_module, "COUNTER_DEVICES", frozenset({"cuda", "cpu"}))


def seed(a: int, b: int) -> torch.Tensor:
    return torch.tensor([a, b], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- the hash
def _mix_python(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def test_32_bit_products_and_mixing_equal_python_integers():
    rng = pyrandom.Random(0)
    values = [0, 1, MASK32, 0x80000000, 0xFFFF, 0x10000] + [rng.getrandbits(32) for _ in range(2000)]
    x = torch.tensor(values, dtype=torch.int64)
    for constant in (0x7FEB352D, 0x846CA68B, MASK32, 1):
        assert _mul_u32(x, constant).tolist() == [(v * constant) & MASK32 for v in values]
    assert _mix_u32(x).tolist() == [_mix_python(v) for v in values]


def test_counter_bits_equal_the_documented_recipe():
    rng = pyrandom.Random(1)
    s0, s1, stream = rng.getrandbits(32), rng.getrandbits(32), 3
    indices = [0, 1, 2, MASK32, 1 << 32, (1 << 32) + 5, (7 << 32) + 123, rng.getrandbits(40)]
    got = counter_bits(seed(s0, s1), stream, torch.tensor(indices)).tolist()
    words = (s1 + stream * STREAM_STEP) & MASK32
    want = [_mix_python(_mix_python(_mix_python((i & MASK32) ^ s0) ^ words) ^ (i >> 32)) >> (32 - COUNTER_BITS)
            for i in indices]
    assert got == want
    assert all(0 <= v < (1 << COUNTER_BITS) for v in got)


# ----------------------------------------------------------------------------------------------- the masks
def test_dropout_masks_keep_at_the_rate_with_the_inverted_scale():
    rate = 0.3
    mask = CounterMask(seed(12345, 678), 0, (40, 4, 32, 16), rate, "dropout", F32).materialize()
    assert mask.shape == (40, 4, 32, 16) and mask.dtype == F32
    assert set(mask.unique().tolist()) == {0.0, float(torch.tensor(1.0) / (1 - rate))}
    keep = (mask != 0).double().mean().item()
    assert abs(keep - (1 - rate)) <= 5 * math.sqrt(rate * (1 - rate) / mask.numel())


def test_zoneout_indicators_are_one_at_the_rate():
    rate = 0.15
    d = CounterMask(seed(9, 99), 2, (50, 20, 24), rate, "keep", F64).materialize()
    assert set(d.unique().tolist()) == {0.0, 1.0}
    assert abs(d.mean().item() - rate) <= 5 * math.sqrt(rate * (1 - rate) / d.numel())


def test_steps_gates_streams_and_seeds_are_independent():
    """Two masks agree on about p² + (1-p)² of their entries when independent (0.58 at p = 0.3)."""
    p = 0.3
    base = CounterMask(seed(1, 2), 0, (30, 4, 16, 32), p, "dropout", F32)
    m = base.materialize() != 0
    expected = p * p + (1 - p) * (1 - p)
    n = m[0].numel()
    bound = 5 * math.sqrt(expected * (1 - expected) / n)
    pairs = [(m[0], m[1]), (m[5, 0], m[5, 3]), (m[:, :, 0], m[:, :, 1]),
             (m, CounterMask(seed(1, 2), 1, base.shape, p, "dropout", F32).materialize() != 0),  # another stream
             (m, CounterMask(seed(1, 3), 0, base.shape, p, "dropout", F32).materialize() != 0),  # another seed
             (m, CounterMask(seed(2, 2), 0, base.shape, p, "dropout", F32).materialize() != 0)]
    for a, b in pairs:
        agree = (a == b).double().mean().item()
        assert abs(agree - expected) <= bound * math.sqrt(n / a.numel()) + 1e-12, agree


def test_slices_equal_the_whole_mask():
    mask = CounterMask(seed(5, 6), 0, (7, 3, 4, 5), 0.4, "dropout", F64)
    whole = mask.materialize()
    for t in range(7):
        assert torch.equal(mask[t], whole[t])
    for g in range(3):
        assert torch.equal(mask.gate(g), whole[:, g])
    assert mask.dim() == 4 and mask.to(F32).materialize().dtype == F32
    assert torch.equal(mask.to(F32).materialize(), whole.float())


def test_threshold_rounds_the_rate_to_24_bits():
    assert counter_threshold(0.0) == 0 and counter_threshold(1.0) == 1 << 24
    assert counter_threshold(0.25) == 1 << 22


# ----------------------------------------------------------------------------------------------- the plan
PER_STEP_MODES = {
    "per_step": dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step"),
    "update_per_step": dict(recurrent_dropout=0.3, recurrent_dropout_mode="update_per_step"),
    "zoneout": dict(dropout=0.2, recurrent_dropout=0.25, zoneout_h=0.3),
}


def make_layer(kind: str, seed_value=None, **mode):
    extra = dict(zoneout_c=0.2) if kind == "lstm" and "zoneout_h" in mode else {}
    layer_class = {"lstm": droprnn.LSTM, "gru": droprnn.GRU}[kind]
    layer = layer_class(5, return_sequences=True, return_state=True, input_size=3, dtype=F64, seed=seed_value,
                        **mode, **extra)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=gen, dtype=F64))
    return layer


def test_cpu_plans_hold_tensors_by_default():
    plan = make_layer("lstm", **PER_STEP_MODES["zoneout"]).draw_dropout_plan(3, steps=4)
    assert not plan.cells[0].counter_based
    assert all(torch.is_tensor(z) for z in plan.cells[0].zoneout)
    assert plan.materialized() is plan


@pytest.mark.parametrize("mode", list(PER_STEP_MODES))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_counter_plans_hold_one_seed_per_cell_and_call(kind, mode, counter_cpu):
    layer = make_layer(kind, **PER_STEP_MODES[mode])
    masks = layer.draw_dropout_plan(3, steps=4).cells[0]
    counters = [m for m in (masks.recurrent, masks.update, *(masks.zoneout or ())) if isinstance(m, CounterMask)]
    assert counters and masks.counter_based
    assert all(m.seed is counters[0].seed for m in counters)
    assert len({m.stream for m in counters}) == len(counters)  # each kind its own stream
    made = masks.materialized()
    for m in (made.recurrent, made.update, *(made.zoneout or ())):
        assert m is None or torch.is_tensor(m)
    another = layer.draw_dropout_plan(3, steps=4).cells[0]
    assert not torch.equal(another.materialized().recurrent if mode == "per_step" else
                           (another.materialized().update if mode == "update_per_step"
                            else another.materialized().zoneout[0]),
                           made.recurrent if mode == "per_step" else
                           (made.update if mode == "update_per_step" else made.zoneout[0]))


def test_seeded_layers_draw_the_same_counter_masks(counter_cpu):
    plans = [make_layer("gru", seed_value=42, **PER_STEP_MODES["per_step"]).draw_dropout_plan(4, steps=6)
             for _ in range(2)]
    a, b = (p.cells[0].recurrent.materialize() for p in plans)
    assert torch.equal(a, b)


def test_check_plan_takes_counter_masks_and_names_a_wrong_shape(counter_cpu):
    layer = make_layer("lstm", **PER_STEP_MODES["per_step"])
    good = layer.draw_dropout_plan(3, steps=4)
    layer(torch.randn(3, 4, 3, dtype=F64), dropout_plan=good)  # accepted
    bad = layer.draw_dropout_plan(3, steps=5)
    with pytest.raises(DroprnnError, match="recurrent masks"):
        layer(torch.randn(3, 4, 3, dtype=F64), dropout_plan=bad)


def _run(layer, impl, x, plan):
    layer.impl = impl
    x = x.detach().clone().requires_grad_(True)
    out = flat(layer(x, dropout_plan=plan, lengths=[4, 2, 3]))
    params = list(layer.parameters())
    loss = sum((o * w).sum() for o, w in zip(out, loss_weights(out)))
    grads = torch.autograd.grad(loss, [x, *params])
    assert layer.last_kernel.name == impl
    return [o.detach() for o in out] + list(grads)


@pytest.mark.parametrize("mode", list(PER_STEP_MODES))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kernels_run_counter_plans_as_their_tensors(kind, mode, counter_cpu):
    """The reference loop (making each step's slice) and the fused kernel (making the tensors first) give
    what the reference loop gives with the plan made into tensors."""
    layer = make_layer(kind, **PER_STEP_MODES[mode])
    x = torch.randn(3, 4, 3, dtype=F64)
    plan = layer.draw_dropout_plan(3, steps=4)
    assert plan.cells[0].counter_based
    want = _run(layer, "reference", x, plan.materialized())
    impls = ["reference"] + (["fused"] if fused.unsupported_reason(call_for(layer, x)) is None
                             else [])
    for impl in impls:
        got = _run(layer, impl, x, plan)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert any(g.abs().max() > 0 for g in want[len(want) // 2:])
