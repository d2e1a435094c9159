"""torch.compile on droprnn models: the fused kernels stay whole inside compiled programs (registered
operators), compiled results equal eager ones, fullgraph=True holds, dynamic=True serves new shapes
without recompiling.

Masks: compiled training is compared with eager training on the same masks -- with ``dropout_plan=`` for
layers, and for whole models with Inductor's ``fallback_random`` (the compiled program then draws from
torch's global RNG in eager's order). Most programs here are built with the ``aot_eager`` backend (Dynamo,
the operators' fake implementations and AOTAutograd, without Inductor's code generation: fast); the
user's path, Inductor, is exercised by the tests marked so in their names. Shapes are small: compiling
is the slow part.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.testing import CompileCounterWithBackend

import droprnn
from droprnn import (
    GRU, LSTM, RNN, Bidirectional, Dense, DroprnnError, GRUCell, LSTMCell, Masking, Sequential, SimpleRNN,
    SimpleRNNCell,
)
from droprnn import nn as dnn
from droprnn.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=f"no fused kernels: {cpu.unavailable_reason()}")

D = 4


def mixed_model() -> Sequential:
    """Every cell and a wrapper in one model: LSTM(dropout, recurrent_dropout) -> Bidirectional(GRU) -> SimpleRNN
    -> Dense, built by Sequential from the first layer's input shape."""
    return Sequential([
        LSTM(6, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, input_shape=(None, D)),
        Bidirectional(GRU(5, return_sequences=True, recurrent_dropout=0.2)),
        SimpleRNN(4, dropout=0.2),
        Dense(3),
    ])


MODELS = {
    "lstm": lambda: LSTM(6, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, zoneout_h=0.1, input_size=D),
    "gru": lambda: GRU(5, dropout=0.3, recurrent_dropout=0.3, input_size=D),
    "gru_reset_before": lambda: GRU(5, reset_after=False, recurrent_dropout=0.3, recurrent_dropout_mode="per_step",
                                    input_size=D),
    "simple_rnn": lambda: SimpleRNN(5, return_sequences=True, dropout=0.2, recurrent_dropout=0.3, input_size=D),
    "bidirectional": lambda: Bidirectional(LSTM(5, return_sequences=True, recurrent_dropout=0.3), input_size=D),
    "stacked": lambda: RNN([LSTMCell(5, recurrent_dropout=0.3), GRUCell(4, dropout=0.2), SimpleRNNCell(3)],
                           return_sequences=True, input_size=D),
    "sequential": mixed_model,
    "masking": lambda: Sequential([Masking(0.0), LSTM(5, recurrent_dropout=0.3, input_shape=(None, D))]),
    "nn_lstm": lambda: dnn.LSTM(D, 5, num_layers=2, bidirectional=True, batch_first=True, dropout=0.2,
                                input_dropout=0.2, recurrent_dropout=0.2),
    "nn_gru": lambda: dnn.GRU(D, 5, batch_first=True, recurrent_dropout=0.2),
    "nn_rnn": lambda: dnn.RNN(D, 5, nonlinearity="relu", batch_first=True, recurrent_dropout=0.2),
}
TAKES_LENGTHS = ("lstm", "gru", "gru_reset_before", "simple_rnn", "bidirectional", "stacked", "sequential")


def make(name: str):
    torch.manual_seed(0)
    return MODELS[name]()


def tensors(tree) -> list:
    if torch.is_tensor(tree):
        return [tree]
    return [t for item in tree for t in tensors(item)]


def loss_of(out) -> torch.Tensor:
    return sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in tensors(out))


def assert_close_all(got: list, want: list, tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def train_step(model, x, **kwargs) -> list:
    """Outputs, the input's gradient and every parameter's gradient of one step on a fixed loss."""
    x = x.clone().requires_grad_(True)
    out = model(x, **kwargs)
    loss_of(out).backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return [t.detach() for t in tensors(out)] + grads


@pytest.fixture
def same_random_draws():
    """Compiled programs draw from torch's global RNG in eager's order (so masks match eager's)."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def programs_built(counter: CompileCounterWithBackend) -> int:
    """The programs a backend received (Dynamo may first hand it an empty one when it restarts a trace)."""
    return sum(any(node.op == "call_function" for node in gm.graph.nodes) for gm in counter.graphs)


def lengths_for(name: str, batch: int, steps: int) -> dict:
    if name not in TAKES_LENGTHS:
        return {}
    return {"lengths": torch.tensor([steps, max(steps - 2, 0), 1, steps - 1][:batch])}


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_step_equals_eager(name, same_random_draws):
    """fullgraph=True, with dropout on: outputs and every gradient equal eager's on the same masks."""
    eager, compiled = make(name), make(name)
    program = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 6, D)
    if name == "masking":
        x[1, 4:] = 0.0  # padding the Masking layer finds
    kwargs = lengths_for(name, 4, 6)
    for _ in range(2):  # the second call reuses the program
        torch.manual_seed(11)
        want = train_step(eager, x, **kwargs)
        torch.manual_seed(11)
        got = train_step(program, x, **kwargs)
        assert_close_all(got, want)


def test_compiled_training_with_given_masks_equals_eager():
    """A layer given the same DropoutPlan compiled and eager gives the same numbers (per-gate and per-step
    masks, zoneout, a step mask)."""
    eager = LSTM(5, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, zoneout_c=0.2, input_size=D)
    compiled = copy.deepcopy(eager)
    program = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 7, D)
    plan = eager.draw_dropout_plan(3, steps=7)
    want = train_step(eager, x, dropout_plan=plan, lengths=torch.tensor([7, 3, 5]))
    got = train_step(program, x, dropout_plan=plan, lengths=torch.tensor([7, 3, 5]))
    assert_close_all(got, want)


def test_inductor_training_of_a_mixed_model(same_random_draws):
    """The mixed model, compiled as a user would (Inductor, default options): the fused operators run
    inside the program, forward and backward, and the step equals eager's."""
    eager, compiled = mixed_model(), mixed_model()
    compiled.load_state_dict(eager.state_dict())
    seen = CompileCounterWithBackend("inductor")
    program = torch.compile(compiled, backend=seen)
    x = torch.randn(3, 5, D)
    torch.manual_seed(3)
    want = train_step(eager, x)
    torch.manual_seed(3)
    got = train_step(program, x)
    assert_close_all(got, want)
    assert programs_built(seen) == 1  # one program: no graph break
    targets = {str(node.target) for graph in seen.graphs for node in graph.graph.nodes}
    assert "droprnn.fused_layer.default" in targets or "droprnn.fused_layer" in targets
    assert compiled[0].last_kernel.name == "fused"


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("name", ["sequential", "nn_lstm", "stacked", "masking"])
def test_inference_fullgraph_dynamic_serves_new_shapes_without_recompiling(name):
    model = make(name).eval()
    counter = CompileCounterWithBackend("aot_eager")
    program = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    # (sizes 0 and 1 are always specialised by PyTorch's dynamic shapes: one more program for them)
    for batch, steps in [(2, 5), (3, 8), (5, 3), (7, 2)]:
        x = torch.randn(batch, steps, D)
        with torch.no_grad():
            assert_close_all(tensors(program(x)), tensors(model(x)))
    assert programs_built(counter) == 1


def test_inductor_inference_fullgraph_with_lengths():
    model = mixed_model().eval()
    program = torch.compile(model, fullgraph=True, dynamic=True)
    for batch, steps in [(3, 6), (4, 9)]:
        x = torch.randn(batch, steps, D)
        lengths = torch.randint(0, steps + 1, (batch,))
        with torch.no_grad():
            assert_close_all([program(x, lengths=lengths)], [model(x, lengths=lengths)])


def test_compiled_lengths_out_of_range_still_raise():
    model = torch.compile(LSTM(3, input_size=D).eval(), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="lengths"):
        model(torch.randn(2, 4, D), lengths=torch.tensor([4, 5]))


# ---------------------------------------------------------------------------------------------- state, seeds
def test_stateful_layer_carries_states_across_compiled_calls():
    eager = LSTM(5, stateful=True, return_sequences=True, input_size=D).eval()
    compiled = copy.deepcopy(eager)
    program = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        x = torch.randn(2, 4, D)
        assert_close_all([program(x)], [eager(x)])
    assert_close_all(list(compiled.states[0]), list(eager.states[0]))


def test_seeded_layers_draw_reproducibly_when_compiled():
    """Compiled seeded layers draw counter-based masks: the same seed gives the same masks in a fresh
    program, independent of the global RNG; not eager's masks (the README says so)."""
    def run(seed_of_global: int):
        torch._dynamo.reset()
        torch.manual_seed(0)
        layer = LSTM(5, return_sequences=True, dropout=0.4, recurrent_dropout=0.4, seed=7, input_size=D)
        program = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.manual_seed(seed_of_global)
        x = torch.ones(3, 4, D)
        return program(x), program(x), layer

    first, second, layer = run(1)
    again_first, again_second, _ = run(2)
    torch.testing.assert_close(first, again_first, rtol=0, atol=0)
    torch.testing.assert_close(second, again_second, rtol=0, atol=0)
    assert not torch.equal(first, second)  # each call draws new masks
    assert int(layer.cell.seed_stream.compiled_counter) > 0 and layer.cell.seed_stream.counter == 0
    eager = LSTM(5, return_sequences=True, dropout=0.4, recurrent_dropout=0.4, seed=7, input_size=D)
    eager.load_state_dict(layer.state_dict())
    assert not torch.equal(eager(torch.ones(3, 4, D), training=True), first)


# ---------------------------------------------------------------------------------------------- errors
def test_fullgraph_on_a_layer_without_weights_says_how_to_fix_it():
    program = torch.compile(GRU(4), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="input_shape=/input_size="):
        program(torch.randn(2, 3, D))


def test_sequential_builds_every_layer_from_the_first_input_shape():
    model = mixed_model()
    assert all(layer.built for layer in model.layers)
    assert model[1].forward_layer.input_size == 6 and model[2].input_size == 10 and model[3].input_size == 4


def test_first_compiled_call_in_a_fresh_process_builds_the_kernels_outside_the_program(tmp_path):
    """Whether the fused kernels exist is decided once, outside the program being traced (building them
    spawns the compiler): a fresh process can compile with fullgraph=True before any eager call."""
    script = textwrap.dedent("""
        import sys, torch, droprnn
        assert "torch._dynamo" not in sys.modules  # import droprnn does not load the compiler
        layer = droprnn.LSTM(5, recurrent_dropout=0.2, input_size=4)
        program = torch.compile(layer, backend="aot_eager", fullgraph=True)
        y = program(torch.randn(2, 3, 4))
        print(layer.last_kernel.name, tuple(y.shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["fused", "(2,", "5)"]
