"""Bad input and faults: nothing crashes the process, corrupts state or returns a silently wrong number.

Each test is one case an adversarial pass over the public API reproduced. What could kill the
interpreter (the C++ entry points given wrong shapes, damaged cached libraries) runs in a subprocess, so a
regression fails a test instead of ending the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import droprnn
from droprnn import GRU, LSTM, Bidirectional, DroprnnError, Masking, Sequential, SimpleRNN
from droprnn import nn as dnn
from droprnn.kernels import cpu

needs_fused = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=f"no fused kernels: {cpu.unavailable_reason()}")
F64 = torch.float64


def run_script(script: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------- 1. parameter shapes
LAYERS = {
    "lstm": lambda **kw: LSTM(4, input_size=3, **kw),
    "gru": lambda **kw: GRU(4, input_size=3, **kw),
    "gru_reset_before": lambda **kw: GRU(4, input_size=3, reset_after=False, **kw),
    "simple_rnn": lambda **kw: SimpleRNN(4, input_size=3, **kw),
}


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("parameter, shape", [("recurrent_kernel", (5, None)), ("recurrent_kernel", (64, None)),
                                              ("kernel", (2, None)), ("bias", (7,))])
def test_a_replaced_parameter_of_another_shape_is_refused(name, impl, parameter, shape):
    """The fused kernels index memory by these shapes: a wrong one once returned garbage or wrote out of
    bounds (free(): invalid next size). Now every path refuses it, naming the parameter."""
    layer = LAYERS[name](impl=impl, return_sequences=True)
    width = layer.cell.gates * 4
    setattr(layer.cell, parameter, nn.Parameter(torch.randn(*(width if s is None else s for s in shape))))
    with pytest.raises(DroprnnError, match=f"parameter `{parameter}` expected shape"):
        layer(torch.randn(2, 3, 3)).sum().backward()


def test_a_parameter_resized_in_place_is_refused():
    layer = LSTM(4, input_size=3)
    layer.cell.recurrent_kernel.data = torch.randn(9, 16)
    with pytest.raises(DroprnnError, match=r"recurrent_kernel` expected shape \(4, 16\), got \(9, 16\)"):
        layer(torch.randn(2, 3, 3))


@pytest.mark.parametrize("cls", [dnn.LSTM, dnn.GRU, dnn.RNN])
def test_a_replaced_torch_style_parameter_is_refused(cls):
    module = cls(3, 4)
    rows = module.weight_hh_l0.shape[0]
    module.weight_hh_l0 = nn.Parameter(torch.randn(rows, 9))
    with pytest.raises(DroprnnError, match=rf"weight_hh_l0` expected shape \({rows}, 4\), got \({rows}, 9\)"):
        module(torch.randn(5, 2, 3))


def test_mixed_parameter_dtypes_are_named():
    layer = LSTM(4, input_size=3)
    layer.cell.kernel.data = layer.cell.kernel.data.double()
    with pytest.raises(DroprnnError, match="parameter `recurrent_kernel` of cell 0 expected torch.float64"):
        layer(torch.randn(2, 3, 3))


CPP_ENTRY_POINTS = r"""
import torch, droprnn
from droprnn.kernels import cpu
assert cpu.load(), cpu.unavailable_reason()
ops = torch.ops.droprnn_cpu
B, T, D, U = 2, 3, 5, 4

def valid(cell):
    G = {"lstm": 4, "lstm_proj": 4, "gru": 3, "simple": 1}[cell]
    H = 3 if cell == "lstm_proj" else U  # a projection makes h narrower than the units
    t = lambda *s: torch.randn(*s)
    m = lambda *s: (torch.rand(*s) > 0.3).float()
    forward = dict(xw=t(B, T, G, U), R=t(G, H, U),
                   bias=t(G * U), h0=t(B, H), rec=m(G, B, H), zone=m(T, B, H), valid=m(B, T))
    if cell == "gru":
        forward["rbias"] = t(G * U)
    backward = dict(dhs=t(B, T, H), R=t(H, G * U), kernel=t(D, G * U), x=t(B, T, D), h0=t(B, H), hs=t(B, T, H),
                    gates=t(B, T, G, U), inner=t(B, T, U), input_mask=m(G, B, D), rec=m(G, B, H), zone=m(T, B, H),
                    valid=m(B, T))
    if cell == "lstm_proj":
        forward["P"], backward["P"] = t(U, H), t(U, H)
    if cell == "simple":  # its backward reads neither
        del backward["gates"], backward["inner"]
    return forward, backward

def call(cell, f, b, which):
    if cell == "lstm_proj":
        cell = "lstm"
    if which == "inference":
        if cell == "lstm":
            return ops.lstm_inference(f["xw"].clone(), f["R"], f["bias"], f["h0"], torch.randn(B, U), f["rec"], None,
                                      f["zone"], None, f["valid"], 0, 1, False, f.get("P"))
        if cell == "gru":
            return ops.gru_inference(f["xw"].clone(), f["R"], f["bias"], f["rbias"], f["h0"], f["rec"], None,
                                     f["zone"], f["valid"], 0, 1, True, False)
        return ops.simple_rnn_inference(f["xw"].clone(), f["R"], f["bias"], f["h0"], f["rec"][:1], f["zone"],
                                        f["valid"], 0, False)
    if cell == "lstm" and which == "forward":
        return ops.lstm_forward(f["xw"].clone(), f["R"], f["bias"], f["h0"], f.get("c0", torch.randn(B, U)), f["rec"], None,
                                f["zone"], None, f["valid"], 0, 1, f.get("P"))
    if cell == "lstm":
        return ops.lstm_backward(b["dhs"], torch.randn(B, U), b["R"], b["kernel"], b["x"], b["h0"], torch.randn(B, U),
                                 b["hs"], b["inner"], b["gates"], b["input_mask"], b["rec"], None, b["zone"], None,
                                 b["valid"], 0, 1, True, True, True, True, False, b.get("P"))
    if cell == "gru" and which == "forward":
        return ops.gru_forward(f["xw"].clone(), f["R"], f["bias"], f["rbias"], f["h0"], f["rec"], None, f["zone"],
                               f["valid"], 0, 1, True)
    if cell == "gru":
        return ops.gru_backward(b["dhs"], b["R"], b["kernel"], b["x"], b["h0"], b["hs"], b["gates"], b["inner"],
                                b["input_mask"], b["rec"], None, b["zone"], b["valid"], 0, 1, True, True, True, True,
                                True, True, False)
    if which == "forward":
        return ops.simple_rnn_forward(f["xw"].clone(), f["R"], f["bias"], f["h0"], f["rec"][:1], f["zone"], f["valid"], 0)
    return ops.simple_rnn_backward(b["dhs"], b["R"], b["kernel"], b["x"], b["h0"], b["hs"], b["hs"].clone(),
                                   b["input_mask"][:1], b["rec"][:1], b["zone"], b["valid"], 0, True, True, True, True,
                                   False)

def mutations(tensor):
    like = dict(dtype=tensor.dtype)
    yield "bigger", torch.randn(*[s + 7 for s in tensor.shape], **like) if tensor.dim() else torch.randn(3, **like)
    yield "smaller", torch.randn(*[max(s - 1, 1) for s in tensor.shape], **like) if tensor.dim() else torch.randn(3, **like)
    yield "one more axis", tensor.unsqueeze(0).expand(3, *tensor.shape)
    yield "float64", tensor.double()
    if tensor.dim() >= 2:
        yield "transposed", tensor.transpose(-1, -2)
    yield "meta", torch.empty(tensor.shape, device="meta")

# Each operand of a product out = a @ b made wrong in every way: (checked, raised). a and b mutated in a way
# read_anyhow names may be accepted (the op reads them in any dtype or strides).
def mutate_product(op, name, read_anyhow):
    counts = [0, 0]
    operands = dict(a=torch.randn(5, 3), b=torch.randn(3, 4), out=torch.empty(5, 4))
    op(**operands)
    for argument in operands:
        for label, bad in mutations(operands[argument]):
            counts[0] += 1
            try:
                op(**{**operands, argument: bad})
            except (RuntimeError, IndexError, TypeError, NotImplementedError):
                counts[1] += 1
                continue
            if argument != "out" and label in read_anyhow:
                continue
            print("ACCEPTED", name, argument, label, tuple(bad.shape))
    return tuple(counts)

raised = checked = 0
# With bfloat16 products (where the CPU has them) the recurrent kernel comes in bfloat16.
low_modes = (False, True) if ops.bf16_products() else (False,)
for cell, which, low in [(c, w, l) for c in ("lstm", "lstm_proj", "gru", "simple")
                         for w in ("forward", "inference", "backward") for l in low_modes]:
    f, b = valid(cell)
    if low and cell == "lstm_proj":
        continue  # a projection does not run with bfloat16 products (checked below)
    if low:
        f["R"], b["R"] = f["R"].bfloat16(), b["R"].bfloat16()
    call(cell, f, b, which)  # the valid call runs
    args = b if which == "backward" else f
    for name in list(args):
        for label, bad in mutations(args[name]):
            f2, b2 = dict(f), dict(b)
            (b2 if which == "backward" else f2)[name] = bad
            checked += 1
            try:
                call(cell, f2, b2, which)
            except (RuntimeError, IndexError, TypeError, NotImplementedError):
                raised += 1
                continue
            if label in ("transposed",) and bad.shape == args[name].shape:  # a square one may be fine
                raised += 1
                continue
            print("ACCEPTED", cell, which, low, name, label, tuple(bad.shape))
if ops.bf16_products():
    f, b = valid("lstm_proj")
    for which in ("forward", "inference", "backward"):
        checked += 1
        try:
            call("lstm_proj", {**f, "R": f["R"].bfloat16()}, {**b, "R": b["R"].bfloat16()}, which)
            print("ACCEPTED a projection with bfloat16 products", which)
        except RuntimeError:
            raised += 1
    c, r = mutate_product(ops.bf16_mm, "bf16_mm", ("float64", "transposed"))  # a, b: any dtype and strides
    checked, raised = checked + c, raised + r
c, r = mutate_product(ops.float_mm, "float_mm", ())
checked, raised = checked + c, raised + r
print("CHECKED", checked, "RAISED", raised)
for sizes in ([-1, 5], [1 << 40, 1 << 40]):
    try:
        ops.empty(sizes, torch.float32)
        print("ACCEPTED empty", sizes)
    except RuntimeError:
        pass
"""


@needs_fused
def test_the_cpp_entry_points_check_what_they_rely_on():
    """Every tensor argument of every C++ entry point (forward, inference, backward), made bigger, smaller, of another rank, dtype, layout
    or device: each call raises instead of touching memory it does not own (run in a subprocess, so a
    crash fails the test)."""
    result = run_script(CPP_ENTRY_POINTS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACCEPTED" not in result.stdout, result.stdout
    checked = int(result.stdout.split("CHECKED")[1].split()[0])
    assert checked > 300


# ---------------------------------------------------------------------------------------------- 2, 3. the kernel cache
@needs_fused
def test_a_damaged_cached_library_is_detected_before_it_is_loaded(tmp_path):
    """Truncated, overwritten or empty libraries, or a missing record, never reach dlopen."""
    built = Path(cpu.library_path())
    key = cpu._key(cpu._compiler())
    target = tmp_path / "droprnn_cpu.so"
    shutil.copy(built, target)
    shutil.copy(built.with_name("droprnn_cpu.json"), tmp_path / "droprnn_cpu.json")
    assert cpu._damage(target, key) is None
    assert "another build" in cpu._damage(target, "0" * 16)
    data = built.read_bytes()
    for damaged in (data[: len(data) // 2], data[:1000] + b"\x0f\x0b" * 8 + data[1016:], b""):
        target.write_bytes(damaged)
        assert "checksum" in cpu._damage(target, key)
    target.write_bytes(data)
    (tmp_path / "droprnn_cpu.json").unlink()
    assert "record" in cpu._damage(target, key)


@needs_fused
def test_a_truncated_cached_library_is_rebuilt_and_said(tmp_path):
    """A fresh process finds the cached library cut in half: it rebuilds it (no SIGBUS), runs fused, and
    explain() says what it repaired."""
    cache = tmp_path / "cache"
    key = cpu._key(cpu._compiler())
    target = cache / "kernels" / key / "droprnn_cpu.so"
    target.parent.mkdir(parents=True)
    shutil.copy(cpu.library_path(), target)
    shutil.copy(Path(cpu.library_path()).with_name("droprnn_cpu.json"), target.with_name("droprnn_cpu.json"))
    # The build kept its objects, so the repair is a link; one object is damaged too, and recompiled.
    shutil.copytree(Path(cpu.library_path()).parent / "objects", target.parent / "objects")
    damaged = target.parent / "objects" / "pool.cpp.o"
    damaged.write_bytes(damaged.read_bytes()[:100])
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    untouched = {obj.name: obj.stat().st_mtime_ns for obj in (target.parent / "objects").glob("*.o") if obj != damaged}
    script = """
        import torch, droprnn
        layer = droprnn.LSTM(4, input_size=3)
        layer(torch.randn(2, 3, 3))
        print(droprnn.explain(layer))
    """
    result = run_script(script, env={"DROPRNN_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused CPU kernel" in result.stdout and "was rebuilt" in result.stdout and "checksum" in result.stdout
    assert cpu._damage(target, key) is None
    assert set(cpu._kept_objects(target.parent)) == set(cpu.SOURCES)
    assert {name: (target.parent / "objects" / name).stat().st_mtime_ns for name in untouched} == untouched


@needs_fused
def test_an_unwritable_cache_falls_back_to_a_per_user_folder_and_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    temporary = tmp_path / "tmp"
    key = cpu._key(cpu._compiler())
    uid = os.getuid()
    fallback = temporary / f"droprnn-{uid}" / "kernels" / key  # prepared, so no build is needed here
    fallback.mkdir(parents=True)
    shutil.copy(cpu.library_path(), fallback / "droprnn_cpu.so")
    shutil.copy(Path(cpu.library_path()).with_name("droprnn_cpu.json"), fallback / "droprnn_cpu.json")
    script = """
        import torch, droprnn
        layer = droprnn.GRU(4, input_size=3)
        layer(torch.randn(2, 3, 3))
        print(droprnn.explain(layer))
    """
    result = run_script(script, env={"DROPRNN_CACHE": str(blocker / "cache"), "TMPDIR": str(temporary)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(fallback) in result.stdout and "cannot be written" in result.stdout
    assert result.stderr.count("cannot be written") == 1  # said once


# ---------------------------------------------------------------------------------------------- 4. NaN padding
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_nan_and_inf_in_padded_steps_touch_nothing(name, impl):
    """Outputs and every gradient are finite, and equal those of the same batch padded with zeros."""
    torch.manual_seed(0)
    layer = LAYERS[name](impl=impl, return_sequences=True, return_state=True, dropout=0.2, recurrent_dropout=0.2)
    clean = torch.randn(3, 5, 3)
    lengths = torch.tensor([5, 2, 0])
    poisoned = clean.clone()
    poisoned[1, 2:] = float("nan")
    poisoned[2, :] = float("inf")
    plan = layer.draw_dropout_plan(3, steps=5)
    results = []
    for x in (clean, poisoned):
        padded = x.clone()
        padded[1, 2:] = padded[1, 2:] if x is poisoned else 0.0
        padded[2, :] = padded[2, :] if x is poisoned else 0.0
        padded.requires_grad_(True)
        out = layer(padded, lengths=lengths, dropout_plan=plan)
        sum(o.sum() for o in out).backward()
        results.append([o.detach() for o in out] + [padded.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad()
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_nan_padding_through_a_packed_sequence():
    module = dnn.LSTM(3, 4, batch_first=True, recurrent_dropout=0.2)
    x = torch.randn(2, 5, 3)
    x[1, 3:] = float("nan")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    output, (h, c) = module(packed)
    assert torch.isfinite(output.data).all() and torch.isfinite(h).all() and torch.isfinite(c).all()


def test_masking_nan_marks_nan_padded_steps():
    """Masking(float('nan')): NaN padding (as sktime's .ts files have) masks its steps."""
    torch.manual_seed(0)
    model = Sequential([Masking(float("nan")), LSTM(4, input_shape=(None, 3))])
    x = torch.randn(2, 5, 3)
    x[1, 3:] = float("nan")
    y = model(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], model[1](x[1:2, :3])[0])


# ---------------------------------------------------------------------------------------------- 5, 6. state
def test_mc_predict_on_a_stateful_model_starts_every_pass_from_the_same_states():
    torch.manual_seed(0)
    layer = LSTM(4, stateful=True, input_size=3)
    layer.eval()
    layer(torch.randn(2, 6, 3))  # carry some states
    held = [s.clone() for s in layer.states[0]]
    x = torch.randn(2, 6, 3)
    mean, std = droprnn.mc_predict(layer, x, samples=5)  # no dropout: every pass is the same pass
    assert torch.equal(std, torch.zeros_like(std))
    for before, after in zip(held, layer.states[0]):
        assert torch.equal(before, after)  # the layer holds what it held
    torch.testing.assert_close(mean, layer(x))


def test_set_weights_checks_everything_before_writing():
    layer = LSTM(4, input_size=3)
    before = layer.get_weights()
    bad = [w + 1 for w in before[:2]] + [np.zeros(5)]
    with pytest.raises(DroprnnError, match="array 2 expected shape"):
        layer.set_weights(bad)
    assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), before))
    with pytest.raises(DroprnnError, match="`weights` expected a list of 3 arrays"):
        layer.set_weights(None)
    with pytest.raises(DroprnnError, match="array 0 expected numbers"):
        layer.set_weights([[[1.0], [2.0, 3.0]], before[1], before[2]])


# ---------------------------------------------------------------------------------------------- 8. small silent cases
@pytest.mark.parametrize("value", ["no", 0.5, 1, "False"])
def test_training_must_be_a_bool(value):
    with pytest.raises(DroprnnError, match="argument `training` expected True, False or None"):
        LSTM(4, input_size=3, dropout=0.5)(torch.randn(2, 3, 3), training=value)
    with pytest.raises(DroprnnError, match="`training`"):
        droprnn.Dropout(0.5)(torch.randn(2, 3), training=value)


def test_a_variant_listed_twice_is_refused():
    from droprnn.lab.config import LabConfig

    with pytest.raises(DroprnnError, match="lists 'none' more than once"):
        LabConfig(variants="none, none")


# ---------------------------------------------------------------------------------------------- unclear errors made clear
def test_inputs_that_are_no_numbers_are_named():
    layer = LSTM(4, input_size=3)
    with pytest.raises(DroprnnError, match="`inputs` expected a tensor, or an array of numbers of one shape"):
        layer([[[1.0, 2.0, 3.0]], [[1.0, 2.0]]])
    with pytest.raises(DroprnnError, match="`inputs` expected real numbers"):
        layer(torch.randn(2, 3, 3, dtype=torch.complex64))
    for noise in (droprnn.GaussianNoise(0.1), droprnn.GaussianDropout(0.1), droprnn.AlphaDropout(0.1)):
        with pytest.raises(DroprnnError, match="floating-point tensor"):
            noise(torch.ones(2, 3, dtype=torch.int64), training=True)
    with pytest.raises(DroprnnError, match="`mask_value` expected a number"):
        Masking("x")


def test_initial_states_and_plans_that_cannot_be_used_are_named():
    layer = LSTM(4, input_size=3)
    with pytest.raises(DroprnnError, match="meta device"):
        layer(torch.randn(2, 3, 3), initial_state=[torch.empty(2, 4, device="meta")] * 2)
    trained = LSTM(4, input_size=3, dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode="weights")
    plan = trained.draw_dropout_plan(2, steps=3)
    x = torch.randn(2, 3, 3)
    for impl in ("auto", "reference"):  # a float64 plan (DropConnect masks too) is read in the input's dtype
        trained.impl = impl
        out = trained(x, dropout_plan=plan.to(F64))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, trained(x, dropout_plan=plan), rtol=0, atol=0)
    with pytest.raises(DroprnnError, match="on cpu .as the input., got them on meta"):
        trained(x, dropout_plan=trained.draw_dropout_plan(2, steps=3, device="meta"))
    with pytest.raises(DroprnnError, match="as a floating tensor, got a torch.bool tensor"):
        trained(x, dropout_plan=droprnn.DropoutPlan((droprnn.CellMasks(input=torch.ones(1, 2, 3, dtype=torch.bool)),)))
    per_step_per_gate = droprnn.CellMasks(input=torch.ones(3, 4, 2, 3))
    with pytest.raises(DroprnnError, match="input masks of cell 0 with shape"):
        trained(torch.randn(2, 3, 3), dropout_plan=droprnn.DropoutPlan((per_step_per_gate,)))


def test_a_stateful_layer_trains_after_an_inference_mode_call():
    layer = LSTM(4, stateful=True, input_size=3)
    with torch.inference_mode():
        layer(torch.randn(2, 3, 3))
    layer(torch.randn(2, 3, 3)).sum().backward()  # the held inference tensors are copied, not refused
    assert layer.cell.kernel.grad is not None


def test_load_state_dict_builds_an_unbuilt_layer():
    source = Sequential([LSTM(5, input_shape=(None, 3)), droprnn.Dense(2)])
    target = Sequential([LSTM(5), droprnn.Dense(2)])
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(target(x), source(x))


def test_torch_style_modules_name_unknown_arguments():
    with pytest.raises(DroprnnError, match="droprnn.nn.LSTM: unknown argument 'bogus'; it takes input_size"):
        dnn.LSTM(3, 4, bogus=1)


def test_huge_units_are_named():
    with pytest.raises(DroprnnError, match="units=10000000 .* could not be allocated"):
        LSTM(10_000_000, input_size=3)


def test_lab_and_ptb_arguments_that_cannot_work_are_named(tmp_path):
    from droprnn.lab import ptb
    from droprnn.lab.config import LabConfig

    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker, blocker / "below"):
        with pytest.raises(DroprnnError, match="`--out` expected a folder for the run"):
            LabConfig(out=str(out))
        with pytest.raises(DroprnnError, match="`--out` expected a folder"):
            ptb.run("tiny", out=str(out))
    with pytest.raises(DroprnnError, match="`--device` expected cpu or cuda"):
        ptb.run("tiny", out=str(tmp_path / "run"), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DroprnnError, match="no CUDA here|none here"):
            ptb.run("tiny", out=str(tmp_path / "run"), device="cuda")


def test_an_unreachable_ray_address_is_named_at_once(tmp_path):
    pytest.importorskip("ray")
    from droprnn.lab import runner
    from droprnn.lab.config import LabConfig

    config = LabConfig(out=str(tmp_path / "run"), ray="127.0.0.1:1", variants="none", seeds=1, epochs=1)
    with pytest.raises(DroprnnError, match="`--ray` '127.0.0.1:1': nothing answers there"):
        runner._run_ray(config, [], lambda trial: None, None)


def test_a_damaged_ptb_checkpoint_or_one_with_more_epochs_is_named(tmp_path):
    from droprnn.lab import ptb

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"truncated")
    with pytest.raises(DroprnnError, match="cannot be read as a checkpoint"):
        ptb._resume(checkpoint, ptb.PRESETS["tiny"], 0, None, "cpu")
    assert ptb.checkpoint_summary(checkpoint) == "unreadable"  # the line before the run names the damage
    torch.save({"preset": {}, "epochs": [{}] * 3, "model": {}}, checkpoint)
    with pytest.raises(DroprnnError, match="holds 3 finished epochs, more than --epochs 2"):
        ptb._resume(checkpoint, ptb.PRESETS["tiny"], 0, None, "cpu")


def test_damaged_run_files_are_named_or_rerun(tmp_path):
    from droprnn.lab import runner
    from droprnn.lab.config import LabConfig, check_same_trials

    with pytest.raises(DroprnnError, match="holds a run.json that is not a run's settings"):
        check_same_trials([], LabConfig(out=str(tmp_path)), str(tmp_path))
    for content in ("[]", "{", json.dumps({"variant": "none"})):
        trial = tmp_path / "trial.json"
        trial.write_text(content)
        assert runner._read_trial(trial) is None  # tried again, not crashed on


def test_from_keras_of_something_else_is_named():
    with pytest.raises(DroprnnError, match="expected a Keras model or layer, got torch.nn.modules.rnn.LSTM"):
        droprnn.from_keras(torch.nn.LSTM(3, 4))


def test_bidirectional_names_the_states_it_takes():
    layer = Bidirectional(LSTM(4), input_size=3)
    with pytest.raises(DroprnnError, match=r"\[forward h, forward c, backward h, backward c\], got 2 states"):
        layer(torch.randn(2, 3, 3), initial_state=[torch.zeros(2, 4)] * 2)
