"""Does droprnn's ``Dense`` run its product faster than ``torch.nn.Linear`` here? One table, side by side.

``Dense`` runs float32 CPU products through droprnn's brgemm product where this machine runs that one
faster (kernels/dense.py; the choice is measured once per machine). A language model's softmax layer is
where it shows: a Penn Treebank window spends most of its time there. Per shape (rows, in, out), the median
milliseconds of ``torch.nn.Linear``, of ``droprnn.Dense`` held to ``F.linear``, and of ``droprnn.Dense`` as it
runs, with the same weights, and the ratio of the last to the first (below 1.0 droprnn is faster). The
layouts differ: ``Linear``'s weight is (out, in), ``Dense``'s kernel (in, out) as Keras's, and torch's
product may run them at different speeds.

- ``forward``: under ``torch.no_grad``;
- ``training``: forward, and the gradients of the input, the weights and the bias.

Before timing, each shape's outputs and gradients are checked against ``Linear``'s, and ``droprnn.explain``
names the product each shape runs (small products stay with ``F.linear``).

    python benchmarks/dense_speed.py              # PTB decoders and a few others, 2 threads
    python benchmarks/dense_speed.py --quick      # one small shape, for a smoke run
    python benchmarks/dense_speed.py --shapes 700,650,10000 --repeats 21
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import droprnn
from droprnn.kernels import cpu, dense
from droprnn.kernels.cpu import machine

SHAPES = (
    (700, 650, 10000),   # a medium Penn Treebank window's decoder (batch 20 x 35 steps)
    (400, 200, 10000),   # a small one's (20 x 20)
    (4096, 128, 512),
    (6400, 256, 2048),
    (64, 256, 10),       # a classifier head: below the size where brgemm is tried
)
QUICK = ((256, 64, 512),)


def median_ms(run, repeats: int) -> float:
    run()  # warm-up: first-touch of buffers, oneDNN's kernel generation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def pair(rows: int, features: int, units: int) -> tuple[torch.nn.Linear, droprnn.Dense, torch.Tensor]:
    torch.manual_seed(0)
    ours = droprnn.Dense(units, input_size=features)
    theirs = torch.nn.Linear(features, units)
    with torch.no_grad():
        theirs.weight.copy_(ours.kernel.t())
        theirs.bias.copy_(ours.bias)
    return theirs, ours, torch.randn(rows, features, requires_grad=True)


def check(theirs: torch.nn.Linear, ours: droprnn.Dense, x: torch.Tensor) -> float:
    """The largest difference, relative to the largest value, over the output and every gradient."""
    worst = 0.0
    y_theirs, y_ours = theirs(x), ours(x)
    grad = torch.randn_like(y_theirs)
    got = [y_ours, *torch.autograd.grad(y_ours, (x, ours.kernel, ours.bias), grad)]
    want = [y_theirs, *torch.autograd.grad(y_theirs, (x, theirs.weight, theirs.bias), grad)]
    want[2] = want[2].t()
    for a, b in zip(got, want):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def training(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        torch.autograd.grad(layer(x), (x, *layer.parameters()), grad)
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None,
                        help="rows,in,out;rows,in,out;... (default: the PTB decoders and others)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in part.split(",")) for part in args.shapes.split(";") if part)
    repeats = 3 if args.quick else args.repeats
    # Dense takes brgemm only once a recurrent layer has loaded the kernels; a benchmark has none, so load them.
    reason = cpu.unavailable_reason()
    print(f"{machine.describe()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"fused kernels: {reason or 'loaded'}; float32 products here: "
          f"{cpu.projection_products() if reason is None else 'torch'}")
    print("| (rows, in, out) | product | max rel. diff | forward: Linear ms | Dense via F.linear | Dense | ratio "
          "| training: Linear ms | Dense via F.linear | Dense | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, features, units in shapes:
        theirs, ours, x = pair(rows, features, units)
        explained = droprnn.explain(ours, x).split(": ", 1)[1].split(" ")[0]
        diff = check(theirs, ours, x)
        grad = torch.randn(rows, units)
        forward, train = [], []
        for layer, limit in ((theirs, None), (ours, math.inf), (ours, dense.MIN_FLOPS)):
            saved, dense.MIN_FLOPS = dense.MIN_FLOPS, limit if limit is not None else dense.MIN_FLOPS
            try:
                with torch.no_grad():
                    forward.append(median_ms(lambda: layer(x), repeats))
                train.append(median_ms(training(layer, x, grad), repeats))
            finally:
                dense.MIN_FLOPS = saved
        print(f"| ({rows}, {features}, {units}) | {explained} | {diff:.1e} | "
              + " | ".join(f"{v:.2f}" for v in forward) + f" | {forward[2] / forward[0]:.2f}x | "
              + " | ".join(f"{v:.2f}" for v in train) + f" | {train[2] / train[0]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
