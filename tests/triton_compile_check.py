"""Compile droprnn's Triton kernels for NVIDIA GPUs, on a machine that has none.

Why: the kernel tests (tests/test_gpu_kernels.py) run the kernels in Triton's interpreter, which executes
their Python with numpy; it never runs Triton's compiler. Kernel code the interpreter accepts can still fail
to compile for a GPU -- a type the compiler infers differently, a construct it does not lower, an
architecture that lacks an instruction -- and a lent GPU is too scarce to find that out on.

How: a stand-in for Triton's CUDA driver reports a chosen compute capability, and every kernel launch is
turned into a compile (``JITFunction.run(..., warmup=True)``: bind and specialise the arguments exactly as
a launch does, then compile without launching). Then the GPU path of every cell runs forward and backward on
CPU tensors through every dropout mode, dtype and option, so each specialisation the layers would launch
is lowered to PTX and assembled by ptxas into a cubin for that architecture: everything a GPU run does
before its first launch. The launches are skipped, so the host code computes on uninitialised buffers; no
result is read.

Run it in a process where Triton has not compiled droprnn's kernels for its interpreter (TRITON_INTERPRET
unset); tests/test_gpu_compile.py runs it in a subprocess:

    python tests/triton_compile_check.py [--arch 90 80 ...] [--quick] [--half]

It prints, per kernel, how many specialisations compiled for each architecture, and exits with 1 after
listing every configuration that failed to compile (with the compiler's message), or a kernel that no
configuration reached.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET; the check compiles the kernels for GPUs")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # droprnn from this checkout

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from droprnn.dropout.modes import INPUT_MODES, RECURRENT_MODES  # noqa: E402

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {F64: "f64", F32: "f32", F16: "f16", BF16: "bf16"}
KERNEL_MODULES = ("lstm", "gru", "simple", "counter")  # droprnn.kernels.gpu.<name>: the modules whose kernels launch


class CompileOnlyDriver:
    """Triton's view of 'the current GPU': a compute capability and nothing else. Device numbers are the
    capabilities themselves, so that Triton keeps one kernel cache per architecture."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class Record:
    """What compiled: kernel ("module.name") → architecture → distinct specialisations (cache keys); what failed."""

    compiled: dict[str, dict[int, set]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(set)))
    registers: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # the most per thread
    spilled: dict[str, tuple[int, str]] = field(default_factory=dict)  # stack + local bytes: the most, and where
    seconds: list[float] = field(default_factory=list)  # per new specialisation: compile (or disk-cache) time
    current: str = ""  # the configuration being compiled
    failures: list[str] = field(default_factory=list)


def install(record: Record) -> CompileOnlyDriver:
    """Make every Triton launch in this process a compile for the driver's architecture, recorded."""
    fake = CompileOnlyDriver(90)
    driver.set_active(fake)
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"  # lstm and simple share names
        seen = record.compiled[name][fake.arch]
        if kernel.hash not in seen:
            record.seconds.append(time.perf_counter() - start)
            seen.add(kernel.hash)
            registers, spilled = resource_usage(kernel.asm["cubin"])
            record.registers[name] = max(record.registers[name], registers)
            if spilled > record.spilled.get(name, (0, ""))[0]:
                record.spilled[name] = (spilled, f"sm_{fake.arch} {record.current}")
        return kernel

    JITFunction.run = compile_only
    return fake


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """Registers per thread and the larger of its stack and local-memory bytes per thread (calls, register
    spills) of a cubin, from the cuobjdump that ships with Triton; (-1, -1) where it is missing."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    registers = [int(n) for n in re.findall(r"REG:(\d+)", text)]
    local = [int(n) for n in re.findall(r"LOCAL:(\d+)", text)] + [int(n) for n in re.findall(r"STACK:(\d+)", text)]
    return (max(registers), max(local)) if registers else (-1, -1)


def _jit(kernel):
    """The JITFunction under a kernel's decorators (``triton.heuristics`` wraps it; ``.fn`` is what it wraps)."""
    while kernel is not None and not isinstance(kernel, JITFunction):
        kernel = getattr(kernel, "fn", None)
    return kernel


def launched_kernels() -> dict[str, set[str]]:
    """Module → names of the kernels its host code launches (``name[grid](...)``), read from its source."""
    from droprnn.kernels import gpu

    found = {}
    for name in KERNEL_MODULES:
        source = (Path(gpu.__file__).parent / f"{name}.py").read_text()
        module = importlib.import_module(f"{gpu.__name__}.{name}")
        launched = re.findall(r"\b(_\w+)\[", source)
        found[name] = {n for n in launched if isinstance(_jit(getattr(module, n, None)), JITFunction)}
    return found


# ----------------------------------------------------------------------------------------------- configurations
def _modes() -> dict[str, dict]:
    """Layer keywords by name: each recurrent mode of the library's registry (dropout/modes.py) with and
    without input dropout, each input mode with per-gate and with tied recurrent masks, and zoneout with
    Keras's masks and with per-step ones. New modes join by themselves."""
    table = {"none": {}, "input_only": dict(dropout=0.3)}
    for mode in RECURRENT_MODES:
        table[mode] = dict(dropout=0.3, recurrent_dropout=0.3, recurrent_dropout_mode=mode)
        table[f"{mode}_only"] = dict(recurrent_dropout=0.3, recurrent_dropout_mode=mode)
    for mode in INPUT_MODES:
        for recurrent in ("keras", "tied"):
            table[f"input_{mode}_{recurrent}"] = dict(dropout=0.3, recurrent_dropout=0.3, input_dropout_mode=mode,
                                                      recurrent_dropout_mode=recurrent)
    table["zoneout"] = dict(dropout=0.2, recurrent_dropout=0.3, zoneout_h=0.3, zoneout_c=0.4)
    table["per_step_zoneout"] = dict(recurrent_dropout=0.3, recurrent_dropout_mode="per_step", zoneout_h=0.5,
                                     zoneout_c=0.2)
    return table


MODES = _modes()
CELLS = ("lstm", "lstm-proj", "gru", "gru-rb", "simple")
ACTIVATIONS = [("relu", "hard_sigmoid"), ("linear", "tanh"), ("sigmoid", "relu"), ("tanh", "linear")]
# Options of the call: name → (layer keywords, whether to pass a step mask)
OPTIONS = {
    "plain": ({}, False),
    "masked-backwards": (dict(go_backwards=True), True),
    "last-output-only": (dict(return_sequences=False), False),
}

# Sizes change the specialisation: BLOCK (units per program, up to 128) and the sizes Triton specialises
# on (divisible by 16). The default shape is tiny; these are a realistic one and one with a ragged last block.
SHAPES = [(16, 4, 32, 256), (3, 4, 5, 130)]


@dataclass(frozen=True)
class Config:
    cell: str
    mode: str
    dtype: torch.dtype
    counter: bool = False  # per-step masks made by the kernels (as on CUDA) instead of read from memory
    training: bool = True
    acts: tuple[str, str] = ("tanh", "sigmoid")
    option: str = "plain"  # a key of OPTIONS
    shape: tuple[int, int, int, int] = (3, 4, 5, 6)  # (B, T, D, U)

    def __str__(self) -> str:
        parts = [self.cell, self.mode, DTYPE_NAMES[self.dtype]]
        parts += ["B={} T={} D={} U={}".format(*self.shape)] if self.shape != Config.shape else []
        parts += ["counter"] if self.counter else []
        parts += [] if self.training else ["inference"]
        parts += ["-".join(self.acts)] if self.acts != ("tanh", "sigmoid") else []
        parts += [self.option] if self.option != "plain" else []
        return " ".join(parts)


def modes(cell: str) -> list[str]:
    """The modes a cell takes: SimpleRNN has no cell update to mask."""
    return [m for m in MODES if cell != "simple" or not m.startswith("update")]


def configurations(quick: bool) -> Iterator[Config]:
    """Every mode on every cell in float32 (masks read from memory, then made by the kernels); each dtype
    on a mode that uses every mask; inference zoneout; the activations and options on float32."""
    for cell in CELLS:
        for mode in modes(cell):
            yield Config(cell, mode, F32)
        for mode in ("per_step", "update_per_step", "per_step_zoneout"):
            if mode in modes(cell):
                yield Config(cell, mode, F32, counter=True)
        yield Config(cell, "zoneout", F32, training=False)
        yield Config(cell, "zoneout", BF16, training=False)
        for dtype in (F16, BF16, F64):
            yield Config(cell, "per_step_zoneout", dtype, counter=True)
            if not quick:
                for mode in modes(cell):
                    yield Config(cell, mode, dtype)
        for acts in ACTIVATIONS:
            yield Config(cell, "keras", F32, acts=acts)
        for option in OPTIONS:
            if option != "plain":
                yield Config(cell, "keras", F32, option=option)
        for shape in SHAPES:
            for dtype in (F32, BF16):
                yield Config(cell, "keras", dtype, shape=shape)
                yield Config(cell, "per_step_zoneout", dtype, counter=True, shape=shape)


def build(config: Config) -> torch.nn.Module:
    """The layer of ``config``, built for its input size and dtype."""
    import droprnn

    options = dict(MODES[config.mode])
    if not config.cell.startswith("lstm"):
        options.pop("zoneout_c", None)
    act, rec_act = config.acts
    layer_kw, _ = OPTIONS[config.option]
    _, _, D, U = config.shape
    common = dict(dict(return_sequences=True, **options), **layer_kw, impl="gpu")
    if config.cell == "simple":
        layer = droprnn.SimpleRNN(U, activation=act, **common)
    elif config.cell.startswith("lstm"):
        layer = droprnn.LSTM(U, activation=act, recurrent_activation=rec_act,
                             proj_size=U - 2 if config.cell == "lstm-proj" else 0, **common)
    else:
        layer = droprnn.GRU(U, activation=act, recurrent_activation=rec_act, reset_after=config.cell == "gru",
                            **common)
    layer.build(D, dtype=config.dtype)
    return layer.train(config.training)


def exercise(config: Config) -> None:
    """The layer's GPU path forward and backward (every launch compiles instead of running)."""
    from droprnn.dropout import plan as plan_module

    layer = build(config)
    B, T, D, _ = config.shape
    x = torch.randn(B, T, D, dtype=config.dtype, requires_grad=True)
    _, with_mask = OPTIONS[config.option]
    mask = (torch.arange(B * T).reshape(B, T) % 3 != 1) if with_mask else None
    initial_state = [torch.randn(B, s, dtype=config.dtype, requires_grad=True) for s in layer.cells[0].state_size]
    devices = plan_module.COUNTER_DEVICES
    plan_module.COUNTER_DEVICES = frozenset({"cuda", "cpu"}) if config.counter else devices
    try:
        y = layer(x, mask=mask, initial_state=initial_state)
    finally:
        plan_module.COUNTER_DEVICES = devices
    assert layer.last_kernel.name == "gpu", layer.last_kernel
    y.float().sum().backward()


def check(archs: list[int], quick: bool, half: bool = False, say: Callable[[str], None] = print) -> Record:
    record = Record()
    fake = install(record)
    from droprnn.kernels import gpu

    gpu._device_reason = lambda x: None  # CPU tensors: the launches only compile
    from droprnn.kernels import products

    products._triton_makes = lambda mask: True  # counter masks made as on CUDA: kernels/gpu/counter.py compiles
    configs = [c for c in configurations(quick) if not half or c.dtype in (F16, BF16)]
    for arch in archs:
        fake.arch = arch
        for config in configs:
            record.current = str(config)
            try:
                exercise(config)
            except Exception as error:  # every failing configuration is reported, then the check fails
                last = traceback.extract_tb(error.__traceback__)[-1]
                message = str(error).strip().splitlines()
                record.failures.append(f"sm_{arch} {config}: {type(error).__name__}: "
                                       f"{' | '.join(message[-6:])} (at {Path(last.filename).name}:{last.lineno})")
    expected = launched_kernels()
    for module, names in expected.items():
        for name in sorted(f"{module}.{n}" for n in names):
            counts = [len(record.compiled[name][arch]) for arch in archs]
            say(f"{name}: " + ", ".join(f"sm_{a} {n}" for a, n in zip(archs, counts))
                + f" specialisations; at most {record.registers[name]} registers per thread"
                + (" and {} B of stack or local memory (a call or a spill) in {}".format(*record.spilled[name]) if name in record.spilled
                   else ", no spills"))
            for arch, n in zip(archs, counts):
                if n == 0:
                    record.failures.append(f"sm_{arch}: no configuration compiled {name}")
    say(f"{len(configs)} configurations × {len(archs)} architectures, forward and backward")
    if record.seconds:
        say(f"{len(record.seconds)} specialisations, each in {statistics.median(record.seconds):.2f} s (median), "
            f"{max(record.seconds):.2f} s at most (a compile, or a read from Triton's cache where it had it)")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80],
                        help="compute capabilities to compile for: 80 (A100), 86, 89 (L4, RTX 40), 90 (H100, H200)")
    parser.add_argument("--quick", action="store_true", help="the half and double dtypes on one mode per cell only")
    parser.add_argument("--half", action="store_true",
                        help="float16 and bfloat16 configurations only (their lowering is what differs on sm_75)")
    args = parser.parse_args(argv)
    record = check(args.arch, args.quick, args.half)
    for failure in record.failures:
        print("FAILED", failure)
    print("ok" if not record.failures else f"{len(record.failures)} failures")
    return 1 if record.failures else 0


if __name__ == "__main__":
    sys.exit(main())
