"""The fused kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (``DROPRNN_SANITIZE``), running
the kernel tests: an out-of-bounds read or write, a use after free or undefined behaviour stops the run with
a report instead of corrupting a heap quietly.

The interpreter itself is not instrumented, so the ASan runtime is preloaded (``LD_PRELOAD``), and libstdc++
right after it, so that ASan finds the C++ runtime's ``__cxa_throw`` (else the first exception a kernel's
check throws aborts); leaks are not checked (Python keeps objects until exit). The sanitized library has its
own build key, in its own cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from droprnn.kernels import cpu

TESTS = Path(__file__).resolve().parent
SUBSET = ("random_shapes_and_thread_counts or empty_batch or options_fused or noncontiguous or large_shapes or "
          "reused_blocks or opcheck or gradcheck or cpp_entry_points")


def _preload() -> str | None:
    """The ASan runtime and the C++ runtime, as LD_PRELOAD takes them (None where there is no ASan)."""
    compiler = cpu._compiler()
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    found = [subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in ("libasan.so", "libstdc++.so.6")]
    return " ".join(found) if all(f and Path(f).exists() for f in found) else None


PRELOAD = _preload()


@pytest.mark.skipif(PRELOAD is None, reason="no compiler with AddressSanitizer's runtime here")
@pytest.mark.skipif(cpu.unavailable_reason() is not None, reason=f"no fused kernels: {cpu.unavailable_reason()}")
def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    env = {**os.environ, "DROPRNN_SANITIZE": "address,undefined", "DROPRNN_CACHE": str(tmp_path / "cache"),
           "LD_PRELOAD": PRELOAD, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    probe = subprocess.run(
        [sys.executable, "-c", "from droprnn.kernels import cpu; assert cpu.load(), cpu.unavailable_reason(); "
                               "print(cpu.library_path())"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    library = Path(probe.stdout.split()[-1])
    assert b"__asan_report" in library.read_bytes() and b"__ubsan_handle" in library.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_operators.py"),
         str(TESTS / "test_fused.py"), str(TESTS / "test_hardening.py"), "-k", SUBSET],
        env=env, capture_output=True, text=True, timeout=1800, cwd=TESTS.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[100%]" in result.stdout  # tests ran (and none failed: the return code)
