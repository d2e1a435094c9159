"""How fast is droprnn's GPU path (Triton kernels, issue 7), and is it right? One run checks, then times.

1. Checks (small shapes, on the GPU): ``impl="gpu"`` against ``impl="reference"`` with the same dropout
   plan, outputs, final states and every gradient -- float64 within 1e-10, and float32 within
   max(1e-5 relative, 2x the float32 reference's own error against float64) -- for each supported mask
   kind, step masks, go_backwards, initial states, stacked cells and the other activations, for LSTM and
   GRU (both reset_after forms); plus ``retain_graph`` and double backward. Buffers are NaN-filled, so an
   unwritten element fails.
2. Timings: per cell (``--cells``: lstm, gru) and (batch, time, input, units) shape, the median
   milliseconds of a training step (forward + backward, CUDA-synchronised, after warm-up) and the ratio to
   torch.nn.LSTM / torch.nn.GRU (cuDNN) in the same dtype. Rows (``--variants``, ids first):
   - ``cudnn``        torch.nn with torch's defaults (TF32 allowed in cuDNN); cannot do recurrent dropout;
   - ``cudnn-fp32``   the same with ``torch.backends.cudnn.allow_tf32 = False``;
   - ``rd``           droprnn LSTM / GRU(dropout=0.25, recurrent_dropout=0.25) (Keras's per-gate masks),
                      impl="gpu", a fresh plan each step as in training; time loops from CUDA graphs;
   - ``rd-eager``     the same with ``DROPRNN_CUDA_GRAPHS=0``: the eager loops (what graphs bought);
   - ``rd-fp32``      ``rd`` with ``torch.backends.cudnn.allow_tf32 = False``: droprnn's float32 products
                      follow torch's switch for its RNNs, so this is full float32 (compare ``cudnn-fp32``);
   - ``rd-step``      ``rd`` with ``recurrent_dropout_mode="per_step"`` (fresh recurrent masks every step,
                      counter-based: made inside the step kernels);
   - ``rd-step-stored``  the same with the masks drawn as a (T, G, B, U) tensor and read from memory (what
                      counter-based masks save);
   - ``zoneout``      ``rd`` plus zoneout 0.1 on h (and the LSTM's c);
   - ``rd-compiled``  ``rd`` under ``torch.compile`` (Inductor, default options; the GPU path is the registered
                      operator droprnn::gpu_layer inside the compiled program), at the first COMPILED_SHAPES
                      shapes; the compile happens in the warm-up and is not timed;
   - ``plain``, ``plain-eager``  the same without dropout, graphs and eager;
   - ``cudnn-bf16``, ``rd-bf16``, ``plain-bf16``  cuDNN, ``rd`` and ``plain`` in bfloat16, at the
                      BF16_SHAPES only; their ratios are to ``cudnn-bf16``;
   - ``hand``         what a PyTorch user writes: a Python loop over torch.nn.LSTMCell / GRUCell with
                      variational masks (one input and one state mask per sequence); issue 7 asks droprnn
                      rd to be at least 10x faster than it (the summary's ``hand/rd`` column);
   - ``ref``          droprnn's reference loop with the same dropout (first two shapes only; not by default).
   Each row repeats up to 20 times, fewer for slow rows (about ROW_SECONDS each); ``--max-seconds``
   stops the timings (skipping the remaining rows, said so) once the run has taken that long.
   Per cell and shape also one correctness line: max |gpu - reference| of the outputs and the input
   gradient, same plan, float32 with TF32 off, through the graphs; and whether graphs and eager loops
   agree bit for bit.
   A summary table per cell closes the run.

    python benchmarks/gpu_speed.py                  # checks + all shapes, both cells (about 2 minutes on an H200)
    python benchmarks/gpu_speed.py --shapes 1       # checks + the first shape only (smoke run)
    python benchmarks/gpu_speed.py --no-checks --cells gru --variants rd,rd-eager,rd-fp32
    python benchmarks/gpu_speed.py --variants hand,ref --shapes 2   # the slow columns alone
    python benchmarks/gpu_speed.py --json out.json --max-seconds 120
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Optional

# cuBLAS is deterministic only with a fixed workspace; the checks switch deterministic mode on (for the
# NaN fill of torch.empty), so this must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

SHAPES = [(64, 100, 256, 256), (64, 100, 512, 512), (128, 200, 1024, 1024), (32, 500, 256, 256), (1, 1000, 256, 256)]
BF16_SHAPES = [(64, 100, 512, 512), (128, 200, 1024, 1024)]  # where the bfloat16 rows are timed
CELLS = ("lstm", "gru", "simple")  # simple: droprnn.SimpleRNN against torch.nn.RNN (tanh); not by default
DEFAULT_CELLS = ("lstm", "gru")
LAYERS = {"lstm": "LSTM", "gru": "GRU", "simple": "SimpleRNN"}  # droprnn's layer per cell (looked up on use)
RATE = 0.25
REFERENCE_SHAPES = 2  # the reference loop is timed at the first shapes only
COMPILED_SHAPES = 2  # so is the compiled layer: each shape compiles a program
ROW_SECONDS = 0.6  # a row repeats until about this long (at least 3 times, at most 20)


# ---------------------------------------------------------------------------------------------- checks
@contextlib.contextmanager
def nan_filled_memory():
    import torch

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = was[2]


def _training_step(layer, impl, x, plan, init, mask, create_graph=False):
    """Returned tensors and gradients (x, initial states, parameters) of a fixed random loss."""
    import torch

    layer = copy.deepcopy(layer)
    layer.impl = impl
    x = x.detach().clone().requires_grad_(True)
    leaves = [t.detach().clone().requires_grad_(True) for t in init]
    per_cell, start = [], 0
    for cell in layer.cells:
        per_cell.append(leaves[start:start + len(cell.state_size)])
        start += len(cell.state_size)
    with nan_filled_memory() if impl == "gpu" else contextlib.nullcontext():
        out = layer(x, mask=mask, initial_state=per_cell[0] if len(per_cell) == 1 else per_cell, dropout_plan=plan)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        out = [t for o in out for t in (o if isinstance(o, (tuple, list)) else [o])]
        gen = torch.Generator(device=x.device).manual_seed(3)
        # Drawn in float64 and rounded: the same loss weights in every dtype (randn in another dtype draws others).
        loss = sum((o * torch.randn(o.shape, generator=gen, device=x.device, dtype=torch.float64).to(o.dtype)).sum()
                   for o in out)
        wrt = [x, *leaves, *layer.parameters()]
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph)
    assert layer.last_kernel.name == impl, layer.last_kernel
    return [o.detach() for o in out] + [g.detach() for g in grads]


def _check_layer(kind: str, options, units: int):
    """The layer of one check: kind "lstm", "gru" (reset_after), "gru-rb" (reset_before), "simple", or
    "stacked" (options: the cells)."""
    from droprnn import GRU, LSTM, RNN, SimpleRNN

    if kind == "stacked":
        return RNN(options, return_sequences=True, return_state=True)
    if kind == "lstm":
        return LSTM(units, return_sequences=True, return_state=True, **options)
    if kind == "simple":
        return SimpleRNN(units, return_sequences=True, return_state=True, **options)
    return GRU(units, reset_after=kind == "gru", return_sequences=True, return_state=True, **options)


def run_checks(device) -> bool:
    """gpu == reference on the GPU for every supported mode; prints one line per case."""
    import torch

    from droprnn import LSTM, GRUCell, LSTMCell

    B, T, D, U = 5, 7, 6, 9
    per_gate = dict(dropout=0.3, recurrent_dropout=0.3)
    cases = {
        "no dropout": ("lstm", dict()),
        "keras per-gate masks": ("lstm", per_gate),
        "input mask only": ("lstm", dict(dropout=0.3)),
        "tied recurrent mask": ("lstm", dict(per_gate, recurrent_dropout_mode="tied")),
        "per-step input masks": ("lstm", dict(per_gate, input_dropout_mode="per_step")),
        "per-gate input, tied": ("lstm", dict(per_gate, input_dropout_mode="per_gate", recurrent_dropout_mode="tied")),
        "DropConnect": ("lstm", dict(per_gate, recurrent_dropout_mode="weights")),
        "relu / hard_sigmoid": ("lstm", dict(per_gate, activation="relu", recurrent_activation="hard_sigmoid")),
        "go_backwards, zero_output": ("lstm", dict(per_gate, go_backwards=True, zero_output_for_mask=True)),
        "stacked": ("stacked", lambda: [LSTMCell(U, **per_gate), LSTMCell(U - 2, dropout=0.3)]),
        "GRU keras per-gate masks": ("gru", per_gate),
        "GRU reset_before, keras masks": ("gru-rb", per_gate),
        "GRU tied, per-step input": ("gru", dict(per_gate, recurrent_dropout_mode="tied",
                                                 input_dropout_mode="per_step")),
        "GRU reset_before, tied, no bias": ("gru-rb", dict(per_gate, recurrent_dropout_mode="tied", use_bias=False)),
        "GRU DropConnect, go_backwards": ("gru-rb", dict(per_gate, recurrent_dropout_mode="weights", go_backwards=True,
                                                         zero_output_for_mask=True)),
        "GRU relu / hard_sigmoid": ("gru", dict(per_gate, activation="relu", recurrent_activation="hard_sigmoid")),
        "LSTM + GRU stacked": ("stacked", lambda: [LSTMCell(U, **per_gate), GRUCell(U - 2, reset_after=False,
                                                                                     **per_gate)]),
        "per-step recurrent masks": ("lstm", dict(per_gate, recurrent_dropout_mode="per_step")),
        "update masks per step": ("lstm", dict(per_gate, recurrent_dropout_mode="update_per_step")),
        "zoneout h and c, keras masks": ("lstm", dict(per_gate, zoneout_h=0.2, zoneout_c=0.3)),
        "GRU per-step recurrent masks": ("gru", dict(per_gate, recurrent_dropout_mode="per_step")),
        "GRU reset_before per-step, zoneout": ("gru-rb", dict(per_gate, recurrent_dropout_mode="per_step",
                                                              zoneout_h=0.2)),
        "GRU update masks, zoneout": ("gru", dict(per_gate, recurrent_dropout_mode="update", zoneout_h=0.2)),
        "SimpleRNN keras masks": ("simple", per_gate),
        "LSTM proj_size, keras masks": ("lstm", dict(per_gate, proj_size=5)),
        "LSTM proj_size, per-step, zoneout": ("lstm", dict(per_gate, proj_size=4, recurrent_dropout_mode="per_step",
                                                            zoneout_h=0.2, zoneout_c=0.1)),
        "SimpleRNN per-step masks, zoneout": ("simple", dict(per_gate, recurrent_dropout_mode="per_step",
                                                              zoneout_h=0.2)),
    }
    ok = True
    for name, (kind, options) in cases.items():
        for dtype in (torch.float64, torch.float32):
            torch.manual_seed(0)
            layer = _check_layer(kind, options() if callable(options) else options, U)
            layer.build(D, dtype=dtype, device=device)
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(0.5 * torch.randn(p.shape, dtype=dtype, device=device))
            x = torch.randn(B, T, D, dtype=dtype, device=device)
            init = [0.5 * torch.randn(B, s, dtype=dtype, device=device) for c in layer.cells for s in c.state_size]
            mask = torch.rand(B, T, device=device) > 0.3
            mask[0, 0], mask[-1] = False, False
            plan = layer.draw_dropout_plan(B, steps=T, training=True)
            _training_step(layer, "gpu", x, plan, init, mask)  # loops are captured on a key's 2nd call:
            got = _training_step(layer, "gpu", x, plan, init, mask)  # this one replays the CUDA graphs
            ref = _training_step(layer, "reference", x, plan, init, mask)
            if dtype == torch.float64:
                err = max((a - b).abs().max().item() for a, b in zip(got, ref))
                nan = any(torch.isnan(a).any().item() for a in got)
                passed = err <= 1e-10 and not nan
                detail = f"max |gpu - ref| {err:.2e} (bound 1e-10)"
            else:
                exact = _training_step(copy.deepcopy(layer).double(), "reference", x.double(),
                                       plan.to(torch.float64), [t.double() for t in init], mask)
                worst, passed = 0.0, True
                for g, r, e in zip(got, ref, exact):
                    scale = e.abs().max().item()
                    bound = max(1e-5 * scale, 2 * (r.double() - e).abs().max().item(), 1e-30)
                    err = (g.double() - e).abs().max().item()
                    passed &= err <= bound and not torch.isnan(g).any().item()
                    worst = max(worst, err / bound)
                detail = f"worst error / bound {worst:.2f}"
            ok &= passed
            print(f"  {'PASS' if passed else 'FAIL'}  {name:32} {str(dtype):14} {detail}", flush=True)
    # retain_graph and double backward
    torch.manual_seed(1)
    layer = LSTM(U, dropout=0.3, recurrent_dropout=0.3, return_sequences=True, impl="gpu")
    layer.build(D, dtype=torch.float64, device=device)
    x = torch.randn(B, T, D, dtype=torch.float64, device=device, requires_grad=True)
    loss = layer(x, training=True).pow(2).sum()
    first = torch.autograd.grad(loss, [x, *layer.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *layer.parameters()])
    passed = all(torch.equal(a, b) for a, b in zip(first, second))
    ok &= passed
    print(f"  {'PASS' if passed else 'FAIL'}  retain_graph: two backward passes agree", flush=True)
    plan = layer.draw_dropout_plan(B, steps=T)
    hvps = []
    for impl in ("gpu", "reference"):
        m = copy.deepcopy(layer)
        m.impl = impl
        xx = x.detach().clone().requires_grad_(True)
        g = torch.autograd.grad(m(xx, dropout_plan=plan).pow(2).sum(), xx, create_graph=True)[0]
        hvps.append(torch.autograd.grad(g.sum(), xx)[0])
    err = (hvps[0] - hvps[1]).abs().max().item()
    passed = err <= 1e-10
    ok &= passed
    print(f"  {'PASS' if passed else 'FAIL'}  double backward (Hessian-vector product) {err:.2e}", flush=True)
    return ok


# ---------------------------------------------------------------------------------------------- timings
# Rows of the table: id -> what is timed. "rd": dropout = recurrent_dropout = RATE (Keras's per-gate masks).
VARIANTS = {
    "cudnn": "torch.nn (cuDNN)",
    "cudnn-fp32": "torch.nn (cuDNN), TF32 off",
    "rd": "droprnn gpu rd",
    "rd-eager": "droprnn gpu rd, eager",
    "rd-fp32": "droprnn gpu rd, TF32 off",
    "rd-step": "droprnn gpu, per-step rd",
    "rd-step-stored": "droprnn gpu, per-step rd, stored masks",
    "zoneout": "droprnn gpu rd + zoneout",
    "rd-compiled": "droprnn gpu rd, torch.compile",
    "plain": "droprnn gpu",
    "plain-eager": "droprnn gpu, eager",
    "cudnn-bf16": "torch.nn (cuDNN), bf16",
    "rd-bf16": "droprnn gpu rd, bf16",
    "plain-bf16": "droprnn gpu, bf16",
    "hand": "hand loop rd",
    "ref": "droprnn ref rd",
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "ref"]


def baseline(variant: str) -> str:
    """The cuDNN row a variant's ratio is taken to: the one in its dtype."""
    return "cudnn-bf16" if variant.endswith("bf16") else "cudnn"


def timed_at(variant: str, shape, index: int) -> bool:
    """Whether ``variant`` is timed at the ``index``-th shape."""
    if variant.endswith("bf16"):
        return tuple(shape) in BF16_SHAPES
    if variant == "rd-compiled":
        return index < COMPILED_SHAPES
    return variant != "ref" or index < REFERENCE_SHAPES


@contextlib.contextmanager
def settings(graphs: bool = True, cudnn_tf32: Optional[bool] = None, stored_masks: bool = False):
    """Run with droprnn's CUDA graphs on or off (DROPRNN_CUDA_GRAPHS), torch's TF32 switches as given, and
    per-step masks drawn as tensors instead of counter-based (``stored_masks``)."""
    import torch

    from droprnn.dropout import plan as droprnn_plan
    from droprnn.kernels.gpu import graphs as droprnn_graphs

    was = (os.environ.get(droprnn_graphs.ENV_SWITCH), torch.backends.cudnn.allow_tf32, droprnn_plan.COUNTER_DEVICES)
    if stored_masks:
        droprnn_plan.COUNTER_DEVICES = frozenset()
    os.environ[droprnn_graphs.ENV_SWITCH] = "1" if graphs else "0"
    if cudnn_tf32 is not None:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    try:
        yield
    finally:
        if was[0] is None:
            os.environ.pop(droprnn_graphs.ENV_SWITCH)
        else:
            os.environ[droprnn_graphs.ENV_SWITCH] = was[0]
        torch.backends.cudnn.allow_tf32 = was[1]
        droprnn_plan.COUNTER_DEVICES = was[2]


def make_step(cell: str, variant: str, shape, device):
    """A zero-argument training step (forward + backward) for one row of the table (a VARIANTS id)."""
    import torch

    import droprnn

    torch.manual_seed(0)
    batch, steps, features, units = shape
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    x = torch.randn(batch, steps, features, device=device, dtype=dtype, requires_grad=True)
    if variant.startswith("cudnn"):
        module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "simple": torch.nn.RNN}[cell](features, units,
                                                                                           batch_first=True)
        module = module.to(device=device, dtype=dtype)
        tf32 = False if variant == "cudnn-fp32" else None  # None: torch's default (TF32 allowed in cuDNN)

        def step():
            with settings(cudnn_tf32=tf32):
                out, _ = module(x)
                out.sum().backward()

        return step
    if variant == "hand":
        return _hand_loop(cell, x, units)
    rates = {} if variant.startswith("plain") else {"dropout": RATE, "recurrent_dropout": RATE}
    if variant.startswith("rd-step"):
        rates["recurrent_dropout_mode"] = "per_step"
    if variant == "zoneout":
        rates.update(zoneout_h=0.1, **({"zoneout_c": 0.1} if cell == "lstm" else {}))
    impl = "reference" if variant == "ref" else "gpu"
    layer_class = getattr(droprnn, LAYERS[cell])  # GRU: reset_after, torch.nn.GRU's form
    layer = layer_class(units, return_sequences=True, input_size=features, impl=impl, device=device, dtype=dtype,
                        **rates)
    run = torch.compile(layer) if variant == "rd-compiled" else layer
    options = dict(graphs=not variant.endswith("eager"), cudnn_tf32=False if variant == "rd-fp32" else None,
                   stored_masks=variant == "rd-step-stored")

    def step():
        with settings(**options):
            run(x, training=True).sum().backward()

    return step


def _hand_loop(cell: str, x, units: int):
    """Variational dropout as users write it: masks drawn per sequence, a Python loop over time."""
    import torch

    batch, steps, features = x.shape
    lstm = cell == "lstm"
    module = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "simple": torch.nn.RNNCell}[cell](features, units)
    module = module.to(x.device)

    def step():
        keep = 1 - RATE
        input_mask = torch.bernoulli(torch.full((batch, features), keep, device=x.device)) / keep
        state_mask = torch.bernoulli(torch.full((batch, units), keep, device=x.device)) / keep
        h = torch.zeros(batch, units, device=x.device)
        c = torch.zeros(batch, units, device=x.device)
        outputs = []
        for t in range(steps):
            if lstm:
                h, c = module(x[:, t] * input_mask, (h * state_mask, c))
            else:  # the mask on the h that meets the recurrent kernel; torch's GRUCell also updates from it
                h = module(x[:, t] * input_mask, h * state_mask)
            outputs.append(h)
        torch.stack(outputs, 1).sum().backward()

    return step


def median_ms(step, warmup: int = 2, max_repeats: int = 20) -> float:
    """Median milliseconds of ``step`` between CUDA events, after warm-up (which captures the CUDA graphs:
    a loop is captured on its second call); repeated up to ``max_repeats`` times, fewer when a step is slow
    (about ROW_SECONDS in all, at least 3 times)."""
    import torch

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = [timed()]
    repeats = max(3, min(max_repeats, int(ROW_SECONDS * 1000 / max(times[0], 1e-3))))
    times += [timed() for _ in range(repeats - 1)]
    return statistics.median(times)


def correctness(cell: str, shape, device) -> dict:
    """Same plan, float32 with TF32 off: max |gpu - reference| of the outputs and the input gradient (through
    the CUDA graphs), max |graphs - eager| of both, and max |output|."""
    import torch

    import droprnn

    torch.manual_seed(1)
    batch, steps, features, units = shape
    layer_class = getattr(droprnn, LAYERS[cell])
    layer = layer_class(units, dropout=RATE, recurrent_dropout=RATE, return_sequences=True, input_size=features,
                        device=device)
    x = torch.randn(batch, steps, features, device=device)
    plan = layer.draw_dropout_plan(batch, steps=steps)
    weights = torch.linspace(-1, 1, batch * steps * units, device=device).view(batch, steps, units)

    def run(impl, graphs=True, calls=1):
        layer.impl = impl
        with settings(graphs=graphs, cudnn_tf32=False):  # full float32, as the reference loop's products
            for _ in range(calls):  # a loop is captured on its second call: the last call replays it
                xx = x.clone().requires_grad_(True)
                y = layer(xx, dropout_plan=plan)
                (grad,) = torch.autograd.grad((y * weights).sum(), xx)
        assert layer.last_kernel.name == impl
        return y.detach(), grad

    (y_graphs, g_graphs), (y_eager, g_eager) = run("gpu", calls=2), run("gpu", graphs=False)
    y_ref, g_ref = run("reference")
    return {"output": (y_graphs - y_ref).abs().max().item(), "input_grad": (g_graphs - g_ref).abs().max().item(),
            "graphs_vs_eager": max((y_graphs - y_eager).abs().max().item(), (g_graphs - g_eager).abs().max().item()),
            "bitwise": bool(torch.equal(y_graphs, y_eager) and torch.equal(g_graphs, g_eager)),
            "scale": y_ref.abs().max().item()}


def summary(rows: list, cell: str, shapes: list) -> str:
    """One line per shape: ms (× cuDNN in the same dtype) of each variant timed, then two speed-ups of
    droprnn rd: over its eager loops (what the CUDA graphs bought) and over the hand loop."""
    ms = {(tuple(r["shape"]), r["variant"]): r["ms"] for r in rows if r["cell"] == cell}
    timed = [v for v in VARIANTS if any((tuple(s), v) in ms for s in shapes)]
    speedups = {"eager/graphs rd": "rd-eager", "hand/rd": "hand"}
    head = (f"{'shape (B, T, D, U)':22}" + "".join(f"{v:>18}" for v in timed)
            + "".join(f"{name:>17}" for name in speedups))
    lines = [head, "-" * len(head)]
    for shape in map(tuple, shapes):
        cells = []
        for v in timed:
            t, base = ms.get((shape, v)), ms.get((shape, baseline(v)))
            cells.append(f"{'':>18}" if t is None or base is None else f"{t:10.2f} ({t / base:5.2f})")
        for slower in speedups.values():
            gain = ms.get((shape, slower), float("nan")) / ms.get((shape, "rd"), float("nan"))
            cells.append(f"{gain:17.2f}")
        lines.append(f"{str(shape):22}" + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="time only the first N shapes")
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated rows to time, of: {', '.join(VARIANTS)} (the cuDNN rows their "
                        "ratios need are always timed)")
    parser.add_argument("--no-checks", action="store_true", help="skip the equality checks")
    parser.add_argument("--max-seconds", type=float, help="stop timing (skip the remaining rows) after this long")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    requested = [v for v in args.variants.split(",") if v]
    variants = list(dict.fromkeys([baseline(v) for v in requested] + ["cudnn"] + requested))
    unknown = [v for v in variants if v not in VARIANTS]
    cells = [c for c in args.cells.split(",") if c]
    if unknown or any(c not in CELLS for c in cells):
        parser.error(f"unknown variant(s) or cell(s); variants: {', '.join(VARIANTS)}; cells: {', '.join(CELLS)}")

    import torch

    if not torch.cuda.is_available():
        print("gpu_speed.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
              "the Triton kernels are tested on the CPU by tests/test_gpu_kernels.py instead.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_speed.py times the compiled kernels: unset TRITON_INTERPRET.", file=sys.stderr)
        return 2
    import triton

    from droprnn.kernels import gpu

    device = torch.device("cuda")
    machine = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
               f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"machine: {machine}")
    print(f"kernel: {gpu.describe()}\n")
    result = {"machine": machine, "checks_passed": None, "rows": [], "correctness": [], "skipped": [], "failed": []}
    if not args.no_checks:
        print("checks: impl='gpu' == impl='reference' (same plan), outputs, states and every gradient; TF32 off")
        with settings(cudnn_tf32=False):  # droprnn's float32 products follow it; the reference's stay full float32
            result["checks_passed"] = run_checks(device)
        print()

    def out_of_time() -> bool:
        return args.max_seconds is not None and time.monotonic() - started > args.max_seconds

    header = f"{'cell':5} {'shape (B,T,D,U)':22} {'variant':28} {'ms':>9} {'× cuDNN':>8}"
    print(header)
    print("-" * len(header))
    shapes = SHAPES[:args.shapes]
    for index, shape in enumerate(shapes):  # shape-major: a time limit cuts the same shapes from every cell
        for cell in cells:
            times = {}
            for variant in variants:
                if not timed_at(variant, shape, index):
                    continue
                if out_of_time():
                    result["skipped"].append({"cell": cell, "shape": shape, "variant": variant})
                    continue
                try:
                    step = make_step(cell, variant, shape, device)
                    times[variant] = median_ms(step)
                except Exception as error:  # one row's failure must not cost the rest of a lent GPU's run
                    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    result["failed"].append({"cell": cell, "shape": shape, "variant": variant, "error": message})
                    print(f"{cell:5} {str(shape):22} {VARIANTS[variant]:28} FAILED {message[:300]}", flush=True)
                step = None
                gpu.clear_graph_cache()
                torch.cuda.empty_cache()
            for variant, ms in times.items():
                base = times.get(baseline(variant), float("nan"))
                result["rows"].append({"cell": cell, "shape": shape, "variant": variant, "ms": ms, "ratio": ms / base})
                print(f"{cell:5} {str(shape):22} {VARIANTS[variant]:28} {ms:9.2f} {ms / base:8.2f}", flush=True)
            if out_of_time():
                continue
            check = correctness(cell, shape, device)
            gpu.clear_graph_cache()
            result["correctness"].append({"cell": cell, "shape": shape, **check})
            same = "bit for bit" if check["bitwise"] else f"max |graphs - eager| {check['graphs_vs_eager']:.2e}"
            print(f"{cell:5} {str(shape):22} check: max |gpu - reference| output {check['output']:.2e} (of max |y| "
                  f"{check['scale']:.2f}), input gradient {check['input_grad']:.2e}; graphs == eager {same}\n",
                  flush=True)
    if result["skipped"]:
        print(f"--max-seconds {args.max_seconds:g}: {len(result['skipped'])} rows not timed "
              f"(first: {result['skipped'][0]})")
    for cell in cells:
        print(f"\n{cell.upper()}: ms (× cuDNN in the same dtype), {torch.cuda.get_device_name(device)}; "
              "'eager/graphs rd': the speed-up CUDA graphs bring; 'hand/rd': droprnn rd's over the hand loop")
        print(summary(result["rows"], cell, shapes))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["checks_passed"] in (None, True) and not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
