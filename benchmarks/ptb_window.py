"""How long does a Penn Treebank run take on this machine? One training window of each preset, timed.

For each preset (``--presets``, default the two medium ones), the model ``droprnn lab ptb`` trains, built and
initialised the same way, takes training windows (batch x bptt random word ids; ``lab.ptb.train_window``:
forward, loss, backward, clipping, the SGD step) with droprnn's fast path (``impl="auto"``: the fused CPU
kernels, or the GPU kernels with CUDA graphs) and with its reference loop (``impl="reference"``), and one
evaluation pass over a validation-sized stream. It prints the milliseconds per window and what they make
of the preset's whole run: epochs x (training windows + validation), plus the test pass and, for presets
with MC dropout, its samples (timed on a shorter stream and scaled by length). Random ids cost what real
ones do, so no data set is needed.

    python benchmarks/ptb_window.py                       # CPU, both medium presets
    python benchmarks/ptb_window.py --device cuda --json out.json
    python benchmarks/ptb_window.py --presets zaremba-small --windows 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

# Penn Treebank's streams (Mikolov's version, as droprnn.datasets.load("ptb") reads them).
TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
MC_TOKENS = 4_000  # the MC passes are timed on this many tokens and scaled to the test stream


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def windows_per_epoch(preset) -> int:
    """Training windows per epoch: whole windows only, as lab.ptb.train takes them."""
    predicted = TOKENS["train"] // preset.batch_size - 1
    return predicted // preset.bptt


def set_impl(model, impl: str) -> None:
    from droprnn.layers.recurrent import RNN

    for module in model.modules():
        if isinstance(module, RNN):
            module.impl = impl


def time_windows(model, preset, device: str, windows: int) -> float:
    """Mean milliseconds of a training window, after three warm-up windows (a GPU loop is captured as a
    CUDA graph on its second call)."""
    import torch

    from droprnn.lab import ptb

    parameters = list(model.parameters())
    model.train()
    ids = torch.randint(ptb.VOCABULARY, (preset.batch_size, preset.bptt + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    for _ in range(3):
        ptb.train_window(model, parameters, x, y, preset, lr=1e-3)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(windows):
        ptb.train_window(model, parameters, x, y, preset, lr=1e-3)
    synchronize(device)
    return (time.perf_counter() - started) * 1000 / windows


def time_call(device: str, call) -> float:
    """Seconds of ``call()``, the device synchronised."""
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - started


def measure(name: str, device: str, windows: int, impls: list) -> dict:
    import numpy as np
    import torch

    from droprnn.lab import ptb

    preset = ptb.PRESETS[name]
    rng = np.random.default_rng(0)
    valid = rng.integers(0, ptb.VOCABULARY, TOKENS["valid"])
    row = {"preset": name, "epochs": preset.epochs, "windows_per_epoch": windows_per_epoch(preset), "impls": {}}
    for impl in impls:
        torch.manual_seed(0)
        model = ptb.build_model(preset, device=device)
        set_impl(model, impl)
        ms = time_windows(model, preset, device, windows)
        ptb.evaluate(model, valid[:2_000])  # warm-up: the inference kernels' first call
        valid_s = time_call(device, lambda: ptb.evaluate(model, valid))
        mc_s = 0.0
        if preset.mc_samples:
            short = valid[:MC_TOKENS]
            mc_s = time_call(device, lambda: ptb.mc_perplexity(model, short, preset.mc_samples,
                                                               word_dropout=preset.mc_word_dropout))
            mc_s *= TOKENS["test"] / MC_TOKENS
        epoch_s = row["windows_per_epoch"] * ms / 1000 + valid_s
        total_min = (preset.epochs * epoch_s + valid_s * TOKENS["test"] / TOKENS["valid"] + mc_s) / 60
        row["impls"][impl] = {"ms_per_window": ms, "valid_pass_s": valid_s, "mc_test_s": mc_s,
                              "epoch_min": epoch_s / 60, "run_min": total_min}
        del model
        if device.startswith("cuda"):
            from droprnn.kernels import gpu

            gpu.clear_graph_cache()
            torch.cuda.empty_cache()
    return row


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    from droprnn.kernels.cpu import machine as cpu_machine

    return f"{cpu_machine.describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="zaremba-medium,gal-medium", help="comma-separated lab.ptb presets")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--windows", type=int, default=None, help="windows timed per preset and path "
                        "(default 100 on a GPU, 5 on the CPU)")
    parser.add_argument("--impls", default="auto,reference", help="comma-separated: auto (the fast path), reference")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch

    from droprnn.lab import ptb

    names = [n for n in args.presets.split(",") if n]
    impls = [i for i in args.impls.split(",") if i]
    if any(n not in ptb.PRESETS for n in names) or any(i not in ("auto", "reference") for i in impls):
        parser.error(f"presets: {', '.join(ptb.PRESETS)}; impls: auto, reference")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here.", file=sys.stderr)
        return 2
    windows = args.windows or (100 if args.device.startswith("cuda") else 5)
    result = {"machine": machine(args.device), "python": platform.python_version(), "rows": []}
    print(f"machine: {result['machine']}")
    header = f"{'preset':16} {'path':10} {'ms/window':>10} {'valid pass':>11} {'MC test':>9} {'epoch':>8} {'whole run':>10}"
    print(header + "\n" + "-" * len(header))
    for name in names:
        row = measure(name, args.device, windows, impls)
        result["rows"].append(row)
        for impl, t in row["impls"].items():
            mc = f"{t['mc_test_s']:8.0f}s" if t["mc_test_s"] else f"{'':9}"
            print(f"{name:16} {impl:10} {t['ms_per_window']:10.1f} {t['valid_pass_s']:10.1f}s {mc} "
                  f"{t['epoch_min']:7.1f}m {t['run_min']:9.0f}m", flush=True)
    print(f"\n{windows} windows per preset and path, after 3 warm-up windows; 'whole run': the preset's epochs "
          "of training and validation, then the test pass (and MC passes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
