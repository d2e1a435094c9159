"""torch.export and torch.onnx.export of eval-mode droprnn models, with dynamic batch and time: the
exported programs equal eager at other batch sizes and lengths than the ones traced.

torch.export keeps the fused kernel as its registered operator (or the reference step inside ``scan``
where no kernel serves); ONNX gets ONNX's own LSTM, GRU and RNN nodes where they compute the call, ONNX's
Scan over the reference step otherwise (kernels/onnx.py says which). The ONNX files run in onnxruntime.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim

import droprnn
from droprnn import (
    GRU, LSTM, RNN, Bidirectional, Dense, Embedding, GRUCell, LSTMCell, Masking, Sequential, SimpleRNN,
    SimpleRNNCell,
)
from droprnn import nn as dnn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

D = 4
BATCH, TIME = Dim("batch"), Dim("time")
TRACED = (3, 6)  # the example input's (batch, time); every check runs other shapes too
OTHERS = [(5, 9), (2, 2), (1, 13)]


class WithLengths(torch.nn.Module):
    """A model called with lengths, as an exporter sees it (two inputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        return self.model(x, lengths=lengths)


# name: (factory, whether it is called with lengths, the ONNX nodes expected)
MODELS = {
    "lstm": (lambda: LSTM(6, return_sequences=True, return_state=True, dropout=0.3, recurrent_dropout=0.3,
                          input_size=D), False, ["LSTM"]),
    "lstm_activations": (lambda: LSTM(6, activation="linear", recurrent_activation="hard_sigmoid", input_size=D),
                         False, ["LSTM"]),
    "gru": (lambda: GRU(5, return_sequences=True, input_size=D), False, ["GRU"]),
    "gru_reset_before": (lambda: GRU(5, reset_after=False, activation="relu", return_state=True, input_size=D),
                         False, ["GRU"]),
    "simple_rnn": (lambda: SimpleRNN(5, activation="relu", return_sequences=True, input_size=D), False, ["RNN"]),
    "go_backwards": (lambda: GRU(5, go_backwards=True, return_sequences=True, input_size=D), False, ["GRU"]),
    "bidirectional": (lambda: Bidirectional(LSTM(5, return_sequences=True), input_size=D), False, ["LSTM", "LSTM"]),
    "stacked": (lambda: RNN([LSTMCell(5), GRUCell(4, reset_after=False), SimpleRNNCell(3)], return_sequences=True,
                            input_size=D), False, ["LSTM", "GRU", "RNN"]),
    "sequential": (lambda: Sequential([
        LSTM(6, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, input_shape=(None, D)),
        Bidirectional(GRU(5, return_sequences=True)), SimpleRNN(4), Dense(3)]), False, ["LSTM", "GRU", "GRU", "RNN"]),
    "lengths": (lambda: LSTM(6, return_sequences=True, return_state=True, input_size=D), True, ["LSTM"]),
    "lengths_zero_output": (lambda: GRU(6, return_sequences=True, zero_output_for_mask=True, input_size=D), True,
                            ["GRU"]),
    "lengths_backwards": (lambda: LSTM(6, return_sequences=True, go_backwards=True, return_state=True, input_size=D),
                          True, ["LSTM"]),
    "lengths_bidirectional": (lambda: Sequential([Bidirectional(LSTM(5, return_sequences=True), input_size=D),
                                                  SimpleRNN(3)]), True, ["LSTM", "LSTM", "RNN"]),
    # Exported another way: ONNX's Scan over the reference step.
    "masking": (lambda: Sequential([Masking(0.0), LSTM(5, input_shape=(None, D))]), False, ["Scan"]),
    "zoneout": (lambda: LSTM(5, zoneout_h=0.2, zoneout_c=0.1, return_sequences=True, input_size=D), False, ["Scan"]),
    "nn_lstm": (lambda: dnn.LSTM(D, 5, num_layers=2, bidirectional=True, batch_first=True, recurrent_dropout=0.2),
                False, ["LSTM"] * 4),
    "nn_lstm_proj": (lambda: dnn.LSTM(D, 5, proj_size=3, batch_first=True), False, ["Scan"]),
    "nn_gru": (lambda: dnn.GRU(D, 5, num_layers=2, batch_first=True), False, ["GRU", "GRU"]),
    "nn_rnn": (lambda: dnn.RNN(D, 5, nonlinearity="relu", batch_first=True), False, ["RNN"]),
}


def make(name: str) -> tuple[torch.nn.Module, bool]:
    factory, with_lengths, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    return (WithLengths(model) if with_lengths else model), with_lengths


def inputs(batch: int, steps: int, with_lengths: bool, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, D, generator=generator)
    x[0, steps // 2:] = 0.0  # padding, for the Masking model
    if not with_lengths:
        return (x,)
    lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    lengths[-1] = 0 if batch > 1 else lengths[-1]
    return x, lengths


def dynamic(with_lengths: bool) -> tuple:
    return ({0: BATCH, 1: TIME}, {0: BATCH}) if with_lengths else ({0: BATCH, 1: TIME},)


def tensors(tree) -> list:
    if torch.is_tensor(tree):
        return [tree]
    return [t for item in tree for t in tensors(item)]


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_with_dynamic_batch_and_time_equals_eager(name):
    model, with_lengths = make(name)
    program = torch.export.export(model, inputs(*TRACED, with_lengths, 0), dynamic_shapes=dynamic(with_lengths))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    # Time stays dynamic: one node for each recurrence, not a step-by-step unrolled graph.
    assert "droprnn.fused_layer.default" in targets or any("scan" in t for t in targets)
    exported = program.module()
    for k, (batch, steps) in enumerate([TRACED] + OTHERS):
        args = inputs(batch, steps, with_lengths, k + 1)
        for got, want in zip(tensors(exported(*args)), tensors(model(*args)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_exported_program_saves_and_loads(tmp_path):
    model, _ = make("sequential")
    program = torch.export.export(model, inputs(*TRACED, False, 0), dynamic_shapes=dynamic(False))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(4, 11, D)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime_and_equals_eager(name, tmp_path):
    model, with_lengths = make(name)
    onnx_program = torch.onnx.export(model, inputs(*TRACED, with_lengths, 0), dynamic_shapes=dynamic(with_lengths),
                                     dynamo=True)
    assert sorted(n.op_type for n in onnx_program.model.graph if n.op_type in ("LSTM", "GRU", "RNN", "Scan")) == \
        sorted(MODELS[name][2])
    path = tmp_path / "model.onnx"
    onnx_program.save(str(path))
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for k, (batch, steps) in enumerate([TRACED] + OTHERS):
        args = inputs(batch, steps, with_lengths, k + 1)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        want = [t.detach().numpy() for t in tensors(model(*args))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert abs(g - w).max() <= 1e-5, (name, batch, steps)


def test_onnx_kernel_says_why_it_leaves_a_call_to_scan():
    from droprnn.kernels import onnx as onnx_kernel
    from kernel_oracle import call_for

    def reason(layer, x=torch.randn(2, 3, D)):
        return onnx_kernel.unsupported_reason(call_for(layer, x))

    assert reason(LSTM(5, input_size=D)) is None
    assert "proj_size" in reason(LSTM(5, proj_size=2, input_size=D))
    assert "elu" in reason(GRU(5, activation="elu", input_size=D))
    assert "float64" in reason(LSTM(5, input_size=D, dtype=torch.float64), torch.randn(2, 3, D, dtype=torch.float64))
    zoned = LSTM(5, zoneout_h=0.2, input_size=D).eval()
    zoned(torch.randn(2, 3, D))
    call = call_for(zoned, torch.randn(2, 3, D))
    call = type(call)(call.cells, call.weights, call.x, call.initial_states, zoned.last_dropout_plan)
    assert "zoneout" in onnx_kernel.unsupported_reason(call)
    model, _ = make("zoneout")
    torch.onnx.export(model, inputs(*TRACED, False, 0), dynamic_shapes=dynamic(False), dynamo=True)
    model(torch.randn(2, 3, D))  # the fused kernel again once the export is over
    assert model.last_kernel.name == "fused"


def test_embedding_model_exports_to_onnx(tmp_path):
    """A language-model shape: ids -> Embedding -> LSTM -> Dense, ids of dynamic batch and time."""
    torch.manual_seed(0)
    model = Sequential([Embedding(50, 8), LSTM(6, return_sequences=True, input_shape=(None, 8)), Dense(50)]).eval()
    ids = torch.randint(0, 50, (2, 7))
    onnx_program = torch.onnx.export(model, (ids,), dynamic_shapes=({0: BATCH, 1: TIME},), dynamo=True)
    path = tmp_path / "lm.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 50, (3, 12))
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    assert abs(got - model(other).detach().numpy()).max() <= 1e-5


def test_without_the_fused_kernels_programs_keep_time_dynamic():
    """With the fused kernels off (no compiler, or DROPRNN_DISABLE_FUSED=1) an exported program holds the
    reference step inside scan, still with dynamic time, and torch.compile(fullgraph=True) still holds."""
    script = textwrap.dedent("""
        import torch, droprnn
        from torch.export import Dim
        torch.manual_seed(0)
        model = droprnn.Sequential([droprnn.LSTM(5, return_sequences=True, recurrent_dropout=0.2, input_shape=(None, 4)),
                                    droprnn.GRU(3)]).eval()
        dims = ({0: Dim("batch"), 1: Dim("time")},)
        program = torch.export.export(model, (torch.randn(3, 6, 4),), dynamic_shapes=dims)
        assert any("scan" in str(node.target) for node in program.graph.nodes)
        x = torch.randn(5, 11, 4)
        torch.testing.assert_close(program.module()(x), model(x))
        assert model[0].last_kernel.name == "reference" and "DROPRNN_DISABLE_FUSED" in model[0].last_kernel.reason
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x))
        print("OK")
    """)
    env = dict(os.environ, DROPRNN_DISABLE_FUSED="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.split()[-1] == "OK", result.stderr[-3000:]


def test_legacy_exporter_and_torchscript_point_to_export():
    model, _ = make("lstm")
    x = torch.randn(2, 3, D)
    with pytest.raises(droprnn.DroprnnError, match="torch.export"):
        torch.jit.trace(model, (x,))
    with pytest.raises(droprnn.DroprnnError, match="torch.jit.script"):
        torch.jit.script(model)
    with pytest.raises(droprnn.DroprnnError, match="torch.jit.script"):
        torch.jit.script(Sequential([model]))
    with pytest.raises(droprnn.DroprnnError, match="dynamo=True"):
        torch.onnx.export(model, (x,), dynamo=False)
    with pytest.raises(droprnn.DroprnnError, match="torch.export"):
        torch.jit.script(dnn.GRU(D, 3))
