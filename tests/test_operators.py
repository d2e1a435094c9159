"""The registered operators behind the fused kernels pass torch.library.opcheck: schema (no input
mutated or aliased), fake implementation (shapes, dtypes and strides of every output, symbolic sizes),
autograd registration, and AOTAutograd's traced forward and backward against eager."""

from __future__ import annotations

import pytest
import torch

from droprnn.kernels import cpu, eager, fused

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=f"no fused kernels: {cpu.unavailable_reason()}")

F64 = torch.float64
B, T, D, U = 3, 5, 4, 6


def layer_args(cell: str, *, per_gate: bool, per_step: bool, zoneout: bool, valid: bool, reset_after: bool = True,
               grad: bool = True, seed: int = 0) -> tuple:
    """Arguments of droprnn::fused_layer for one cell: weights, states and every kind of mask."""
    generator = torch.Generator().manual_seed(seed)
    gates = fused.GATES[cell]

    def normal(*shape):
        return torch.randn(*shape, dtype=F64, generator=generator).requires_grad_(grad)

    def keep(*shape, rate=0.3):
        return (torch.rand(*shape, dtype=F64, generator=generator) > rate).to(F64) / (1 - rate)

    masks = gates if per_gate else 1
    recurrent_mask = keep(T, masks, B, U) if per_step else keep(masks, B, U)
    return (
        normal(B, T, D), normal(D, gates * U), normal(gates * U), normal(U, gates * U),
        normal(gates * U) if cell == "gru" and reset_after else None, normal(B, U),
        normal(B, U) if cell == "lstm" else None,
        keep(masks, B, D), recurrent_mask, keep(B, U) if cell != "simple_rnn" else None,
        (torch.rand(T, B, U, generator=generator) < 0.2).to(F64) if zoneout else None,
        (torch.rand(T, B, U, generator=generator) < 0.2).to(F64) if zoneout and cell == "lstm" else None,
        (torch.rand(B, T, generator=generator) > 0.3).to(F64) if valid else None,
        cell, 0, 1, reset_after,
    )


CASES = [
    dict(cell=cell, per_gate=per_gate, per_step=per_step, zoneout=zoneout, valid=valid, reset_after=reset_after)
    for cell in ("lstm", "gru", "simple_rnn")
    for per_gate, per_step, zoneout, valid in ((False, False, False, False), (True, True, True, True))
    for reset_after in ((True, False) if cell == "gru" else (True,))
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_layer_passes_opcheck(case):
    torch.library.opcheck(torch.ops.droprnn.fused_layer.default, layer_args(**case))


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("wanted", [[True] * 5, [False, True, False, True, False]], ids=["all", "weights"])
def test_fused_layer_backward_passes_opcheck(case, wanted, monkeypatch):
    args = layer_args(**case, grad=False)
    hs, _, saved, other = torch.ops.droprnn.fused_layer(*args)
    grad_hs = torch.randn_like(hs)
    grad_c = torch.randn(B, U, dtype=F64) if case["cell"] == "lstm" else None
    backward_args = (grad_hs, grad_c, *args[:13], hs, saved, other, *args[13:], wanted)
    torch.library.opcheck(torch.ops.droprnn.fused_layer_backward.default, backward_args)
    # The other way to form the weight gradients (after the loop, in large products) too.
    monkeypatch.setattr(fused, "_DEFER_BYTES", 0)
    monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0)
    torch.library.opcheck(torch.ops.droprnn.fused_layer_backward.default, backward_args)


@pytest.mark.parametrize("all_steps", [True, False], ids=["all-steps", "last-step"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_layer_inference_passes_opcheck(case, all_steps):
    """The inference operator has no autograd (it runs only where no backward follows): its inputs here
    do not require gradients."""
    args = layer_args(**case, grad=False)
    torch.library.opcheck(torch.ops.droprnn.fused_layer_inference.default, (*args, all_steps))
    h, _ = torch.ops.droprnn.fused_layer_inference(*args, all_steps)
    hs, _, _, _ = torch.ops.droprnn.fused_layer(*args)
    torch.testing.assert_close(h, hs if all_steps else hs[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_eager_calls_equal_the_registered_operators(case):
    """Eager code calls the operators' Python straight (kernels/eager.py); the dispatcher's way gives the
    same numbers, forward, gradients and inference, bit for bit."""
    def run(call):
        args = layer_args(**case)
        hs, c_last, _, _ = call(fused.fused_layer, args)
        grad_hs = torch.randn(hs.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        loss = (hs * grad_hs).sum() + (c_last.sum() if case["cell"] == "lstm" else 0)
        tensors = [a for a in args[:7] if a is not None]
        grads = torch.autograd.grad(loss, tensors)
        with torch.no_grad():
            h, _ = call(fused.fused_layer_inference, (*args, False))
        return hs, c_last, h, grads, type(hs.grad_fn).__name__

    direct = run(lambda operator, args: operator(*args))
    registered = run(lambda operator, args: operator.op(*args))
    assert direct[4] == "_fused_layer_functionBackward" and direct[4] != registered[4]  # each way taken
    for mine, theirs in zip(direct[:3] + tuple(direct[3]), registered[:3] + tuple(registered[3])):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_the_registered_operators_run_wherever_something_watches():
    """Fake tensors (torch.compile, torch.export), tensor subclasses and torch.func transforms see the
    registered operator; plain eager code does not need it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.zeros(2)
    assert not eager.watched((x, None, "lstm", 1))
    with FakeTensorMode():
        assert eager.watched((torch.zeros(2),))

    class Marked(torch.Tensor):
        pass

    assert eager.watched((x, x.as_subclass(Marked)))
    assert torch.func.grad(lambda t: (t * float(eager.watched((t,)))).sum())(torch.ones(2)).sum() == 2


def test_fused_layer_gradients_pass_gradcheck():
    """Against finite differences, through the registered autograd (float64)."""
    args = layer_args("lstm", per_gate=True, per_step=False, zoneout=True, valid=True)

    def first_outputs(*tensors):
        hs, c_last, _, _ = torch.ops.droprnn.fused_layer(*tensors, *args[7:])
        return hs, c_last

    assert torch.autograd.gradcheck(first_outputs, args[:7], atol=1e-6)


@pytest.mark.skipif(not (cpu.unavailable_reason() is None and fused._bf16_available()),
                    reason="this CPU's brgemm has no bfloat16 products")
@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_the_operators_pass_opcheck_with_bfloat16_products(case):
    """The trailing ``bf16_products`` flag (float32 tensors; products in bfloat16): forward, backward
    and inference."""
    args = tuple(a.float().detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                 for a in layer_args(**case))
    torch.library.opcheck(torch.ops.droprnn.fused_layer.default, (*args, True))
    plain = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    hs, _, saved, other = torch.ops.droprnn.fused_layer(*plain, True)
    grad_c = torch.randn(B, U) if case["cell"] == "lstm" else None
    backward_args = (torch.randn_like(hs), grad_c, *plain[:13], hs, saved, other, *plain[13:], [True] * 5, True)
    torch.library.opcheck(torch.ops.droprnn.fused_layer_backward.default, backward_args)
    torch.library.opcheck(torch.ops.droprnn.fused_layer_inference.default, (*plain, True, True))


def projected_lstm_args(*, grad: bool = True, masks: bool = True) -> tuple:
    """droprnn::fused_layer's arguments for an LSTM with a projection (proj_size H < U)."""
    generator = torch.Generator().manual_seed(7)
    H = U // 2

    def normal(*shape):
        return torch.randn(*shape, dtype=F64, generator=generator).requires_grad_(grad)

    def keep(*shape, rate=0.3):
        return (torch.rand(*shape, dtype=F64, generator=generator) > rate).to(F64) / (1 - rate)

    return (
        normal(B, T, D), normal(D, 4 * U), normal(4 * U), normal(H, 4 * U), None, normal(B, H), normal(B, U),
        keep(4, B, D) if masks else None, keep(4, B, H) if masks else None, keep(B, U) if masks else None,
        (torch.rand(T, B, H, generator=generator) < 0.2).to(F64) if masks else None,
        (torch.rand(T, B, U, generator=generator) < 0.2).to(F64) if masks else None,
        (torch.rand(B, T, generator=generator) > 0.3).to(F64) if masks else None,
        "lstm", 0, 1, True, False, normal(U, H),
    )


@pytest.mark.parametrize("masks", [False, True], ids=["plain", "masks"])
@pytest.mark.parametrize("weight_grads", ["in loop", "after loop"])
def test_the_operators_pass_opcheck_with_a_projection(masks, weight_grads, monkeypatch):
    if weight_grads == "after loop":  # the projection's own gradient stays in the loop
        monkeypatch.setattr(fused, "_DEFER_BYTES", 0)
        monkeypatch.setattr(fused, "_DEFER_BYTES_PER_ROW", 0)
    args = projected_lstm_args(masks=masks)
    torch.library.opcheck(torch.ops.droprnn.fused_layer.default, args)
    plain = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    hs, _, saved, other = torch.ops.droprnn.fused_layer(*plain)
    assert hs.shape == (B, T, U // 2)
    backward_args = (torch.randn_like(hs), torch.randn(B, U, dtype=F64), *plain[:13], hs, saved, other,
                     *plain[13:17], [True] * 5, False, plain[18])
    torch.library.opcheck(torch.ops.droprnn.fused_layer_backward.default, backward_args)
    for all_steps in (True, False):
        torch.library.opcheck(torch.ops.droprnn.fused_layer_inference.default,
                              (*plain[:17], all_steps, False, plain[18]))


def test_a_projected_lstm_passes_gradcheck():
    """The projection's gradient too, against finite differences (float64)."""
    args = projected_lstm_args()
    differentiable = [a for k, a in enumerate(args) if k in (0, 1, 2, 3, 5, 6, 18)]

    def outputs_of(x, kernel, bias, R, h0, c0, P):
        hs, c_last, _, _ = torch.ops.droprnn.fused_layer(x, kernel, bias, R, None, h0, c0, *args[7:18], P)
        return hs, c_last

    assert torch.autograd.gradcheck(outputs_of, differentiable, atol=1e-6)
