"""The Triton kernels compile for real GPUs, checked on a machine without one (tests/triton_compile_check.py).

tests/test_gpu_kernels.py holds the kernels' results to the reference loop in Triton's interpreter, which
never runs Triton's compiler. Here the specialisations the layers launch (the script's --quick set) are
compiled to cubins for Hopper (sm_90: H100, H200), and those in half precision for Turing (sm_75: T4, which
has no bfloat16 conversion instructions, so bfloat16 takes another lowering), and a kernel the interpreter
runs but the compiler rejects shows that the check can fail. The checks run in subprocesses: the kernels must be imported with
TRITON_INTERPRET unset, and this process may have compiled them for the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Not imported here: importing Triton before tests/test_gpu_kernels.py sets TRITON_INTERPRET would compile
# Triton's own @jit helpers for the GPU in this process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def environment(cache: Path, interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def test_every_kernel_compiles_for_hopper_and_turing(tmp_path):
    # One process per architecture, side by side: Hopper compiles a few hundred specialisations, Turing the
    # hundred in half precision, whose lowering is what differs there.
    archs = {"90": [], "75": ["--half"]}
    runs = [subprocess.Popen([sys.executable, str(HERE / "triton_compile_check.py"), "--quick", "--arch", arch, *extra],
                             env=environment(tmp_path / arch), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for arch, extra in archs.items()]
    for arch, run in zip(archs, runs):
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, output[-6000:]
        lines = re.findall(rf"^(\w+)\.(\w+): sm_{arch} (\d+) specialisations; at most (\d+) registers", output, re.M)
        modules = {module for module, *_ in lines}
        assert modules == {"lstm", "gru", "simple", "counter"}, output[-3000:]
        assert len(lines) >= 13, output[-3000:]  # 4 LSTM kernels, 6 GRU, 2 SimpleRNN, the counter masks' at least
        for module, name, count, registers in lines:
            # ptxas really produced a cubin for each: cuobjdump read its register count
            assert int(count) > 0 and int(registers) > 0, (module, name, count, registers)
        assert output.strip().endswith("ok"), output[-3000:]


BROKEN = textwrap.dedent("""
    import sys
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def accumulate(x_ptr, out_ptr, n, STEPS):
        i = tl.arange(0, 16)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        total = tl.zeros([16], dtype=tl.int32)  # an int32 loop-carried value becomes float32: Python allows it
        for _ in range(STEPS):
            total = total + x
        tl.store(out_ptr + i, total, mask=i < n)

    x, out = torch.ones(16), torch.zeros(16)
    if sys.argv[1] == "compile":
        import triton_compile_check

        triton_compile_check.install(triton_compile_check.Record())
    try:
        accumulate[(1,)](x, out, 16, 3)
    except Exception as error:
        print("rejected:", type(error).__name__, error)
    else:
        print("ran:", out.sum().item())
""")


def test_the_check_catches_a_kernel_the_interpreter_runs(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    interpreted = subprocess.run([sys.executable, str(script), "interpret"], capture_output=True, text=True,
                                 env=environment(tmp_path / "cache", interpret=True), timeout=300)
    assert "ran: 48.0" in interpreted.stdout, interpreted.stdout + interpreted.stderr
    compiled = subprocess.run([sys.executable, str(script), "compile"], capture_output=True, text=True,
                              env=environment(tmp_path / "cache"), timeout=300)
    assert "rejected: CompilationError" in compiled.stdout, compiled.stdout + compiled.stderr
    assert "Loop-carried variable" in compiled.stdout
