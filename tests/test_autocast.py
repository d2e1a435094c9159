"""Under torch.autocast droprnn's recurrent layers run their kernel with autocast off, in the parameters'
dtype (the fused kernels with their products in bfloat16, tests/test_bf16.py), and return outputs and
states in the autocast dtype -- what torch.nn.LSTM returns there -- and explain() says so."""

from __future__ import annotations

import pytest
import torch

import droprnn
from droprnn import GRU, LSTM, SimpleRNN
from droprnn import nn as dnn

BF16 = torch.bfloat16


def test_lstm_under_cpu_autocast_returns_what_torch_nn_lstm_returns():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(6, 8, batch_first=True)
    ours = dnn.LSTM(6, 8, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 6)
    with torch.autocast("cpu", dtype=BF16):
        want, (want_h, want_c) = reference(x)
        got, (got_h, got_c) = ours(x)
    for g, w in ((got, want), (got_h, want_h), (got_c, want_c)):
        assert g.dtype == w.dtype == BF16
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=3e-2)  # torch computes in bfloat16
    text = droprnn.explain(ours)
    assert "fused CPU kernel" in text and "autocast" in text and "bfloat16" in text
    # products in bfloat16 where the CPU has them (accuracy: tests/test_bf16.py), the rest in float32
    assert ("products in bfloat16" in text) == ours.last_kernel.bf16_products


@pytest.mark.parametrize("make", [
    lambda: LSTM(5, return_sequences=True, return_state=True, recurrent_dropout=0.2, input_size=4),
    lambda: GRU(5, return_sequences=True, return_state=True, input_size=4),
    lambda: SimpleRNN(5, return_sequences=True, return_state=True, input_size=4),
], ids=["lstm", "gru", "simple_rnn"])
def test_keras_layers_under_autocast_train(make):
    layer = make()
    x = torch.randn(2, 6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        out, *states = layer(x, lengths=torch.tensor([6, 3]))
        assert out.dtype == BF16 and all(s.dtype == BF16 for s in states)
        loss = out.float().square().sum()
    loss.backward()
    assert x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all()) and x.grad.abs().max() > 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert layer.last_kernel.autocast == BF16 and layer.last_kernel.name == "fused"
    plain = layer(x.detach(), lengths=torch.tensor([6, 3]))[0]  # outside autocast: float32, nothing recorded
    assert plain.dtype == torch.float32 and layer.last_kernel.autocast is None


def test_autocast_for_another_device_changes_nothing_here():
    layer = LSTM(5, input_size=4)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        y = layer(torch.randn(2, 3, 4))
    assert y.dtype == torch.float32
