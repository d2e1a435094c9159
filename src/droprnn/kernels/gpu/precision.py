"""What the GPU path's float32 products compute: torch's switches read, followed and restored.

droprnn's cuBLAS products follow torch's switch for its own RNNs (cuDNN's TF32 default), not the matmul
precision, so a layer computes like the ``torch.nn`` layer it replaces; a loop's key records the setting
(:func:`matmul_settings`), so a captured loop never replays under other switches. No Triton here.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

Tensor = torch.Tensor


def rnn_allows_tf32() -> bool:
    """Whether torch lets its own recurrent layers (cuDNN) compute float32 with TF32: its switch for them,
    ``torch.backends.cudnn.rnn.fp32_precision`` (torch >= 2.9; "tf32" by default), else the older
    ``torch.backends.cudnn.allow_tf32`` (True by default). Never raises."""
    rnn = getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", "none")
    if rnn in ("tf32", "ieee"):
        return rnn == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch's legacy and per-backend switches were mixed: read the per-backend ones
        return "tf32" in (torch.backends.cudnn.fp32_precision, getattr(torch.backends, "fp32_precision", "none"))


def float32_precision(x: Tensor) -> Optional[str]:
    """The float32 matmul precision droprnn's cuBLAS products run under for a call on ``x``: "high" (TF32)
    where torch's RNNs may use TF32 (``rnn_allows_tf32``), else "highest" -- so droprnn computes like the
    cuDNN layers it replaces, whatever ``torch.set_float32_matmul_precision`` says (its default keeps
    cuBLAS in full float32 while cuDNN's RNNs use TF32). None, nothing set: other dtypes, CPU tensors (the
    interpreter), and torch's TF32 switches left mixed (then the matmul switch stands, as the key records)."""
    if x.dtype != torch.float32 or x.device.type != "cuda":
        return None
    try:
        torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy and per-backend switches: setting one more would not be safe
        return None
    return "high" if rnn_allows_tf32() else "highest"


@contextlib.contextmanager
def products_precision(precision: Optional[str]):
    """Run the enclosed cuBLAS products (and their capture) under the float32 matmul ``precision``, restoring
    torch's switches exactly afterwards -- the legacy one and, where torch has it, the per-backend string
    (set through the legacy setter, both stay consistent). Nothing for None."""
    try:
        legacy = None if precision is None else torch.get_float32_matmul_precision()
    except RuntimeError:  # the switches were mixed since the forward took its precision: leave them alone
        legacy = None
    if legacy is None or legacy == precision:
        yield
        return
    per_backend = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        if per_backend is not None:
            torch.backends.cuda.matmul.fp32_precision = per_backend


def matmul_settings(dtype: torch.dtype, precision: Optional[str] = None) -> str:
    """The torch switches that change what a cuBLAS product of ``dtype`` computes (``precision``: what
    run_loop sets for float32, see float32_precision)."""
    if precision is not None:
        return f"float32 products at {precision}"
    if dtype == torch.float32:
        # torch >= 2.9 has per-backend switches (torch.backends.cuda.matmul.fp32_precision, inherited from
        # torch.backends.fp32_precision); once a user sets those, torch.get_float32_matmul_precision() raises
        # ("mix of the legacy and new APIs"), so the new switch is read where it exists. It reflects the
        # legacy setter too.
        precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
        return f"fp32 {precision}" if precision is not None else torch.get_float32_matmul_precision()
    if dtype == torch.float16:
        return f"fp16 reduced reduction {torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction}"
    if dtype == torch.bfloat16:
        return f"bf16 reduced reduction {torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}"
    return ""
