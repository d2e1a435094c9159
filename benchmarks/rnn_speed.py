"""Does recurrent dropout cost anything? Forward+backward time and peak memory, side by side.

One run prints the CPU (model and caches) and up to four tables (``--tables``), per (batch, time, input,
units) shape and for LSTM and GRU, each row's median milliseconds and its ratio to ``torch.nn``:

- ``train``: a training step (forward and backward), the rows below, against ``torch.nn`` without dropout;
- ``inference``: eval mode under ``torch.inference_mode`` -- ``torch.nn``, ``droprnn`` (its inference
  kernel) and ``droprnn ref`` (the reference loop) -- at the four shapes plus batch 1, (1, 100, 64, 128)
  and (1, 1000, 32, 64);
- ``bf16-train`` / ``bf16-inference``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
  ``droprnn rd`` / ``droprnn`` against ``torch.nn`` under the same autocast;
- ``proj-train`` / ``proj-inference`` (LSTM only): ``proj_size = units // 2``, no dropout -- ``torch.nn``
  (which has no oneDNN path for projections), ``droprnn`` and ``droprnn ref``.

The training table's rows:

- ``torch.nn``            torch.nn.LSTM / GRU (oneDNN), which cannot do recurrent dropout at all;
- ``droprnn rd``          droprnn with dropout=0.25, recurrent_dropout=0.25 (Keras's per-gate masks);
- ``droprnn rd compiled`` the same layer under ``torch.compile`` (Inductor, default options): the fused
                          kernel runs inside the compiled program as its registered operator;
- ``droprnn``             droprnn without dropout;
- ``droprnn ref rd``      droprnn's reference loop (impl="reference") with the same dropout;
- ``hand loop rd``        what a PyTorch user writes by hand with the same (per-gate) masks: a Python loop,
                          per-gate products (no ``torch.nn`` cell takes per-gate masks);
- ``droprnn ref tied``    the reference loop with one input and one state mask shared by all gates
                          (``recurrent_dropout_mode="tied"``, ``input_dropout_mode="shared"``);
- ``hand loop tied``      the same masks by hand: a loop of ``torch.nn.LSTMCell`` / ``GRUCell`` calls;
- ``keras-jax rd``        Keras 3 LSTM/GRU(dropout=0.25, recurrent_dropout=0.25) on JAX (jit), in a
                          subprocess, when JAX and Keras are installed.

Each shape also gets a ``products floor`` row: the time the layer's matrix products alone take at the best
rate this machine reaches on a product (measured at the start on three sizes, float32 or bfloat16 as the
table runs, the faster of torch.mm and droprnn's own products): input and recurrent products, and for
training their two gradient products each. No implementation of the same arithmetic is much faster, and
every implementation also spends time on the gates' pointwise math (sigmoids, tanh, the state update) that
the floor leaves out; where the floor is near or above 0.9× ``torch.nn``, a 0.9× target cannot be met
there.

Peak memory: the peak resident-memory growth of one training step (after a warm-up step), measured in a
fresh subprocess per row (Linux: /proc/self/status).

    python benchmarks/rnn_speed.py                 # every table at the issue's shapes, 2 threads
    python benchmarks/rnn_speed.py --tables inference,bf16-inference
    python benchmarks/rnn_speed.py --quick         # one small shape, for a smoke run
    python benchmarks/rnn_speed.py --json out.json
    python benchmarks/rnn_speed.py --markdown out.json   # that run's tables in Markdown, for the docs
    python benchmarks/rnn_speed.py --shapes 20,35,650,650 --layers LSTM   # other shapes (this one: a
                                                   # medium Penn Treebank layer)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(32, 100, 64, 128), (64, 100, 128, 256), (16, 200, 32, 64), (128, 50, 256, 512)]
RATE = 0.25
TRAIN_VARIANTS = ["torch.nn", "droprnn rd", "droprnn rd compiled", "droprnn", "droprnn ref rd", "hand loop rd",
                  "droprnn ref tied", "hand loop tied"]
HAND_LOOPS = {"droprnn ref rd", "hand loop rd", "droprnn ref tied", "hand loop tied"}
# table: (shapes, variants, the slow variants that run a third of the rounds, memory measured)
TABLES = {
    "train": (SHAPES, TRAIN_VARIANTS, HAND_LOOPS, True),
    "inference": (SHAPES + [(1, 100, 64, 128), (1, 1000, 32, 64)], ["torch.nn", "droprnn", "droprnn ref"],
                  {"droprnn ref"}, True),
    "bf16-train": (SHAPES, ["torch.nn", "droprnn rd"], set(), False),
    "bf16-inference": (SHAPES, ["torch.nn", "droprnn"], set(), False),
    "proj-train": (SHAPES, ["torch.nn", "droprnn", "droprnn ref"], {"droprnn ref"}, False),
    "proj-inference": (SHAPES, ["torch.nn", "droprnn", "droprnn ref"], {"droprnn ref"}, False),
}
LSTM_ONLY = {"proj-train", "proj-inference"}  # torch.nn.GRU has no proj_size


# ---------------------------------------------------------------------------------------------- steps
def make_step(kind: str, variant: str, shape, seed: int = 0, table: str = "train"):
    """A zero-argument step for one row of a table: a training step (forward + backward), or a forward in
    eval mode under ``torch.inference_mode``; under bfloat16 autocast for the bf16 tables."""
    import contextlib

    import torch

    import droprnn

    torch.manual_seed(seed)
    batch, steps, features, units = shape
    if table != "train":
        inference = table.endswith("inference")
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if table.startswith("bf16")
                    else contextlib.nullcontext())
        rates = {"dropout": RATE, "recurrent_dropout": RATE} if variant.endswith(" rd") else {}
        projection = {"proj_size": units // 2} if table in LSTM_ONLY else {}
        if variant == "torch.nn":
            module = getattr(torch.nn, kind)(features, units, batch_first=True, **projection)
        else:
            module = getattr(droprnn, kind)(units, return_sequences=True, input_size=features,
                                            impl="reference" if variant == "droprnn ref" else "auto", **rates,
                                            **projection)
        x = torch.randn(batch, steps, features, requires_grad=not inference)
        if inference:
            module.eval()

        def step():
            with autocast, (torch.inference_mode() if inference else contextlib.nullcontext()):
                out = module(x)
                out = out[0] if isinstance(out, tuple) else out
                if not inference:
                    out.float().sum().backward()

        return step
    x = torch.randn(batch, steps, features, requires_grad=True)
    if variant == "torch.nn":
        module = getattr(torch.nn, kind)(features, units, batch_first=True)

        def step():
            out, _ = module(x)
            out.sum().backward()

        return step
    if variant.startswith("hand loop"):
        return _hand_loop(kind, x, units, tied=variant.endswith("tied"))
    rates = {} if variant == "droprnn" else {"dropout": RATE, "recurrent_dropout": RATE}
    if variant.endswith("tied"):
        rates.update(recurrent_dropout_mode="tied", input_dropout_mode="shared")
    impl = "reference" if variant.startswith("droprnn ref") else "auto"
    layer = getattr(droprnn, kind)(units, return_sequences=True, input_size=features, impl=impl, **rates)
    run = torch.compile(layer) if variant == "droprnn rd compiled" else layer  # compiled at the warm-up step

    def step():
        run(x, training=True).sum().backward()

    return step


def _hand_loop(kind: str, x, units: int, tied: bool):
    """The loop a PyTorch user writes by hand for variational dropout, with the same masks as the droprnn row it
    is set against: masks drawn once per sequence and a Python loop over time.

    ``tied``: one input and one state mask shared by every gate, so each step is a ``torch.nn.LSTMCell`` /
    ``GRUCell`` call (C++ gate math) -- droprnn's ``recurrent_dropout_mode="tied", input_dropout_mode="shared"``
    (``GRUCell`` also carries the masked h into ``z * h``, which Keras does not; the work is the same).
    Otherwise Keras's masks, one per gate on the input and on h(t-1) where each meets its kernel, which no
    ``torch.nn`` cell takes: the step is written out (:func:`per_gate_loop`).
    """
    import torch

    batch, steps, features = x.shape
    gates = 4 if kind == "LSTM" else 3
    cell = (torch.nn.LSTMCell if kind == "LSTM" else torch.nn.GRUCell)(features, units)
    keep = 1 - RATE

    def masks(count: int, width: int):
        return torch.bernoulli(torch.full((count, batch, width), keep)) / keep

    def tied_step():
        input_mask, state_mask = masks(1, features)[0], masks(1, units)[0]
        h = torch.zeros(batch, units)
        c = torch.zeros(batch, units)
        outputs = []
        for t in range(steps):
            if gates == 4:
                h, c = cell(x[:, t] * input_mask, (h * state_mask, c))
            else:
                h = cell(x[:, t] * input_mask, h * state_mask)
            outputs.append(h)
        torch.stack(outputs, 1).sum().backward()

    def per_gate_step():
        outputs = per_gate_loop(cell, x, masks(gates, features), masks(gates, units))
        outputs.sum().backward()

    return tied_step if tied else per_gate_step


def per_gate_loop(cell, x, input_masks, state_masks):
    """The hand loop's recurrence with one mask per gate: per-gate products, the input projections of all steps
    formed before the loop. ``cell``: a ``torch.nn.LSTMCell`` / ``GRUCell`` (its weights); x (B, T, D),
    input_masks (G, B, D), state_masks (G, B, U). Returns h of every step (B, T, U)."""
    import torch

    batch, steps, features = x.shape
    gates, units = (4 if isinstance(cell, torch.nn.LSTMCell) else 3), cell.hidden_size
    # torch's layout (G·U, D) as one (D, U) kernel per gate, so that x @ kernel[g] is gate g's block
    kernel = cell.weight_ih.view(gates, units, features).transpose(1, 2)
    recurrent = cell.weight_hh.view(gates, units, units).transpose(1, 2)
    bias_x, bias_h = cell.bias_ih.view(gates, units), cell.bias_hh.view(gates, units)
    projected = [((x * input_masks[g].unsqueeze(1)) @ kernel[g] + bias_x[g]).unbind(1) for g in range(gates)]
    h = x.new_zeros(batch, units)
    c = x.new_zeros(batch, units)
    outputs = []
    for t in range(steps):
        from_h = [(h * state_masks[g]) @ recurrent[g] + bias_h[g] for g in range(gates)]
        if gates == 4:  # torch's gate order i, f, g, o
            i, f, o = (torch.sigmoid(projected[g][t] + from_h[g]) for g in (0, 1, 3))
            c = f * c + i * torch.tanh(projected[2][t] + from_h[2])
            h = o * torch.tanh(c)
        else:  # r, z, n; the reset multiplies the recurrent product (torch's and Keras's default)
            r, z = (torch.sigmoid(projected[g][t] + from_h[g]) for g in (0, 1))
            n = torch.tanh(projected[2][t] + r * from_h[2])
            h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, 1)


def interleaved_medians(steps: dict, repeats: int, slow: set) -> dict:
    """Median milliseconds of each step, run round-robin so machine noise spreads over all of them alike.

    Slow rows (the Python loops) run in the first third of the rounds only.
    """
    for step in steps.values():
        step()  # warm up (and build the fused kernels on a first run)
    times: dict = {name: [] for name in steps}
    for round_ in range(repeats):
        for name, step in steps.items():
            if name in slow and round_ >= max(3, repeats // 3):
                continue
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- the floor
GATES = {"LSTM": 4, "GRU": 3}


def product_flops(kind: str, shape, table: str) -> float:
    """Floating-point operations of a layer's matrix products on one (B, T, D, U) batch: per step, the input
    product (D -> G·U) and the recurrent one (H -> G·U; H = U // 2 with a projection, which adds U -> H);
    a training step adds two gradient products for each (for the inputs and for the weights), less the one
    into the initial state, which wants no gradient."""
    batch, steps, features, units = shape
    gates = GATES[kind]
    hidden = units // 2 if table in LSTM_ONLY else units
    per_row = features * gates * units + hidden * gates * units + (units * hidden if table in LSTM_ONLY else 0)
    forward = 2.0 * batch * steps * per_row
    return forward if table.endswith("inference") else 3 * forward - 2.0 * batch * hidden * gates * units


# A large product, and two whose operands stay in a core's caches (the size of a projection's tile and of a
# step's recurrent product): a large product alone is held back by memory on some CPUs (an AMD EPYC reached
# 180 GFLOP/s in float32 there, 230 on the cache-resident ones), and a floor must be the best rate.
PRODUCT_SHAPES = [(4096, 1024, 1024), (2048, 128, 512), (1024, 256, 512)]


def product_rate(dtype_name: str, repeats: int = 7) -> float:
    """This machine's best rate on a matrix product, in FLOP per millisecond (float32, or bfloat16 with
    float32 accumulation as autocast runs it), at the current thread count: the best of ``repeats`` at each
    of :data:`PRODUCT_SHAPES`, by torch.mm or by droprnn's own product where it has one (brgemm in float32; the
    bfloat16 engine), whichever is faster (on an AMD EPYC MKL's sgemm is the slower)."""
    import torch

    from droprnn.kernels import cpu

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    best = 0.0
    for m, k, n in PRODUCT_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        same = torch.empty(m, n, dtype=dtype)
        products = [lambda: torch.mm(a, b, out=same)]
        if cpu.load():
            out = torch.empty(m, n)
            if dtype == torch.float32:
                products.append(lambda: torch.ops.droprnn_cpu.float_mm(a, b, out))
            elif torch.ops.droprnn_cpu.bf16_products():
                products.append(lambda: torch.ops.droprnn_cpu.bf16_mm(a, b, out))
        for product in products:
            product()
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = max(best, 2.0 * m * k * n / ((time.perf_counter() - start) * 1e3))
    return best


# ---------------------------------------------------------------------------------------------- keras on jax
KERAS_JAX = r"""
import os, sys, time, json, statistics
os.environ["KERAS_BACKEND"] = "jax"
import jax, jax.numpy as jnp, keras, numpy as np
kind, batch, steps, features, units, repeats = sys.argv[1], *map(int, sys.argv[2:7])
layer = getattr(keras.layers, kind)(units, dropout=0.25, recurrent_dropout=0.25, return_sequences=True, seed=0)
layer.build((batch, steps, features))
x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, steps, features)), jnp.float32)
params = [v.value for v in layer.trainable_variables]
state = [v.value for v in layer.non_trainable_variables]
def loss(params, x, state):
    out, _ = layer.stateless_call(params, state, x, training=True)
    return out.sum()
step = jax.jit(jax.grad(loss, argnums=(0, 1)))
jax.block_until_ready(step(params, x, state))
times = []
for _ in range(repeats):
    start = time.perf_counter(); jax.block_until_ready(step(params, x, state)); times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times) * 1e3))
"""


def keras_jax_ms(kind: str, shape, repeats: int, threads: int):
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("keras") is None:
        return None
    env = dict(os.environ, XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
    result = subprocess.run(
        [sys.executable, "-c", KERAS_JAX, kind, *map(str, shape), str(repeats)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- memory
MEMORY_PROBE = r"""
import gc, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from rnn_speed import make_step
step = make_step(sys.argv[3], sys.argv[4], tuple(map(int, sys.argv[5:9])), table=sys.argv[9])
step()  # warm up: weights, kernels, allocator
gc.collect()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS:")
step()
print((status("VmHWM:") - before) / 1024)
"""


def peak_memory_mb(kind: str, variant: str, shape, threads: int, table: str = "train") -> float:
    """Peak resident-memory growth of one training step (Linux), in a fresh process after a warm-up step.

    Large buffers are mmap-ed (MALLOC_MMAP_THRESHOLD_) so freeing them lowers the resident size again, and
    droprnn's block cache is off (DROPRNN_CPU_CACHE_MB=0): blocks it kept from the warm-up step would
    already be resident and hide the step's real working set.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", DROPRNN_CPU_CACHE_MB="0")
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, here, str(threads), kind, variant, *map(str, shape), table],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else float("nan")


# ---------------------------------------------------------------------------------------------- main
def machine() -> str:
    import torch

    from droprnn.kernels.cpu import machine as cpu_machine

    return (f"{cpu_machine.describe()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def _shapes(text: str) -> list[tuple[int, ...]]:
    shapes = [tuple(int(n) for n in part.split(",")) for part in text.split(";") if part.strip()]
    if not shapes or any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes B,T,D,U separated by ';', each a positive int, got {text!r}")
    return shapes


def _layers(text: str) -> list[str]:
    layers = text.split(",")
    if not layers or any(layer not in ("LSTM", "GRU") for layer in layers):
        raise argparse.ArgumentTypeError(f"expected LSTM and/or GRU separated by ',', got {text!r}")
    return layers


def _tables(text: str) -> list[str]:
    tables = [t.strip() for t in text.split(",") if t.strip()]
    if not tables or any(t not in TABLES for t in tables):
        raise argparse.ArgumentTypeError(f"expected tables from {', '.join(TABLES)} separated by ',', got {text!r}")
    return tables


def markdown(rows: list[dict]) -> str:
    """The rows of a run (``--json``) as one Markdown table per benchmark table, for the docs: a row per layer
    and shape, each variant's median ms with its ratio to ``torch.nn``, and the peak MB where measured."""
    out = []
    for table in dict.fromkeys(r["table"] for r in rows):
        mine = [r for r in rows if r["table"] == table]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        memory = [v for v in variants if any(r["variant"] == v and r["peak_mb"] == r["peak_mb"] for r in mine)]
        head = ["layer", "shape (B, T, D, U)", *variants] + ([f"peak MB: {' / '.join(memory)}"] if memory else [])
        out += [f"**{table}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, shape in dict.fromkeys((r["layer"], tuple(r["shape"])) for r in mine):
            cells = {r["variant"]: r for r in mine if r["layer"] == layer and tuple(r["shape"]) == shape}
            line = [layer, str(shape)]
            for v in variants:
                r = cells.get(v)
                line.append("—" if r is None else f"{r['ms']:.1f} ms" if v == "torch.nn"
                            else f"{r['ms']:.1f} ({r['ratio']:.2f}×)")
            if memory:
                line.append(" / ".join(f"{cells[v]['peak_mb']:.1f}" if v in cells else "—" for v in memory))
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    parser.add_argument("--no-keras", action="store_true", help="skip Keras on JAX")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--shapes", type=_shapes, help="B,T,D,U shapes separated by ';' instead of the issue's")
    parser.add_argument("--layers", type=_layers, default="LSTM,GRU", help="comma-separated, of LSTM and GRU")
    parser.add_argument("--tables", type=_tables, default=",".join(TABLES), help=f"comma list from: {', '.join(TABLES)}")
    parser.add_argument("--markdown", metavar="JSON", help="print the rows a run wrote with --json as Markdown "
                        "tables (for the docs) and exit")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            saved = json.load(f)
        print(f"{saved['machine']}\n")
        print(markdown(saved["rows"]))
        return

    import torch

    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    from droprnn.kernels import cpu

    print(f"machine: {machine()}")
    print(f"fused kernels: {cpu.library_path() if cpu.load() else cpu.unavailable_reason()}")
    if cpu.load():
        print(f"float32 input projections: {cpu.projection_products()}; "
              f"bfloat16 products: {torch.ops.droprnn_cpu.bf16_engine()}")
    rates = {name: product_rate(name) for name in ("float32", "bfloat16")}
    print("best product rate (" + ", ".join(f"{m}x{k} @ {k}x{n}" for m, k, n in PRODUCT_SHAPES) + "): "
          + ", ".join(f"{name} {rate / 1e6:.0f} GFLOP/s" for name, rate in rates.items()))
    rows = []
    for table in args.tables:
        table_shapes, variants, slow, measure_memory = TABLES[table]
        shapes = [(16, 50, 32, 64)] if args.quick else args.shapes or table_shapes
        header = f"{'layer':5} {'shape (B,T,D,U)':20} {'variant':19} {'ms':>9} {'× torch':>8} {'peak MB':>8}"
        print(f"\n{table}\n{header}\n{'-' * len(header)}")
        for kind in args.layers:
            if table in LSTM_ONLY and kind != "LSTM":
                continue
            for shape in shapes:
                steps = {variant: make_step(kind, variant, shape, table=table) for variant in variants}
                times = interleaved_medians(steps, repeats, slow=slow)
                del steps
                if table == "train" and not args.no_keras:
                    keras_ms = keras_jax_ms(kind, shape, repeats, args.threads)
                    if keras_ms is not None:
                        times["keras-jax rd"] = keras_ms
                rate = rates["bfloat16" if table.startswith("bf16") else "float32"]
                times["products floor"] = product_flops(kind, shape, table) / rate
                baseline = times["torch.nn"]
                for variant, ms in times.items():
                    memory = float("nan")
                    if measure_memory and not args.no_memory and variant not in ("keras-jax rd", "products floor"):
                        memory = peak_memory_mb(kind, variant, shape, args.threads, table)
                    rows.append({"table": table, "layer": kind, "shape": shape, "variant": variant, "ms": ms,
                                 "ratio": ms / baseline, "peak_mb": memory})
                    print(f"{kind:5} {str(shape):20} {variant:19} {ms:9.2f} {ms / baseline:8.2f} {memory:8.1f}",
                          flush=True)
                print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "product_gflops": {k: v / 1e6 for k, v in rates.items()}, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
