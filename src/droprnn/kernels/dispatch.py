"""Which kernel runs a recurrent call, and why: the one seam between the fronts and the kernels.

``impl="auto"`` takes the fastest kernel the *call* allows (never because a kernel raised): for CUDA
tensors the Triton GPU kernels (:mod:`droprnn.kernels.gpu`), for CPU tensors the fused CPU kernel, else
the reference loop. ``"reference"`` always takes the reference loop; ``"fused"`` and ``"gpu"`` insist and
raise with the reason when the call cannot run there (``"gpu"`` on CPU tensors only under
``TRITON_INTERPRET=1``, Triton's interpreter: auto never picks it for CPU tensors).

While a program is being exported the choice follows what the exporter can keep: under ``torch.export``
the fast kernels (registered operators) as above, else the reference step inside torch's ``scan``
(:mod:`droprnn.kernels.scan`: a loop the exported program keeps whole, so time stays dynamic); under
``torch.onnx.export`` ONNX's own LSTM, GRU and RNN operators (:mod:`droprnn.kernels.onnx`) where they
compute the call, else the same scan (ONNX's Scan).

Under ``torch.autocast`` for the input's device the kernels run with autocast off, in the parameters'
dtype, and the results are cast to the autocast dtype (what ``torch.nn.LSTM`` returns there). The fused
kernels take autocast's bfloat16 as ``torch.nn.LSTM`` does: their products run in bfloat16 (float32
accumulation, states and gate math) where the CPU has bfloat16 matrix instructions.

The choice is recorded on the layer (``last_kernel``) and shown by :func:`droprnn.explain`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import DroprnnError
from . import cpu, fused, gpu, onnx, reference, scan
from .call import RecurrentCall, Result, check_weights

IMPLS = ("auto", "reference", "fused", "gpu")
_KERNELS = {module.NAME: module for module in (gpu, fused, reference, scan, onnx)}


@dataclass(frozen=True)
class KernelChoice:
    """The kernel of one call: ``name`` is one of "gpu", "fused", "reference", "scan", "onnx"; ``reason``
    says why a faster kernel was not taken; ``autocast``: the dtype the results were cast to under
    ``torch.autocast`` (None outside it); ``bf16_products``: whether the products ran in bfloat16 (the
    fused kernels, for bfloat16 calls and under autocast to bfloat16); ``bf16_in_float32``: they were asked
    for but ran in float32, this CPU having none."""

    name: str
    reason: Optional[str] = None
    autocast: Optional[torch.dtype] = None
    bf16_products: bool = False
    bf16_in_float32: bool = False

    def __str__(self) -> str:
        if self.name == "fused":
            repaired = cpu.repaired()
            text = f"fused CPU kernel ({cpu.library_path()}{'; ' + repaired if repaired else ''})"
        elif self.name == "gpu":
            text = gpu.describe()
        elif self.name == "onnx":
            text = "ONNX's own recurrent operator (exported by torch.onnx.export)"
        elif self.name == "scan":
            text = f"reference step inside torch's scan, for the exporter ({self.reason})"
        else:
            text = f"reference loop ({self.reason})"
        if self.bf16_products:
            text += f"; products in bfloat16 ({fused.bf16_engine_text()}; float32 accumulation, states and gates)"
        elif self.bf16_in_float32:
            text += "; bfloat16 asked for, computed in float32: this CPU runs no bfloat16 products (AMX or AVX512-BF16)"
        if self.autocast is not None:
            computed = "the rest in float32" if self.bf16_products else "computed in the parameters' dtype"
            text += f"; under autocast: {computed}, results cast to {_dtype_name(self.autocast)}"
        return text


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_impl(where: str, impl: Any) -> str:
    if impl not in IMPLS:
        raise DroprnnError(f"{where}: argument `impl` expected one of {', '.join(map(repr, IMPLS))}, got {impl!r}.")
    return impl


def _exporting() -> Optional[str]:
    """"onnx" while torch.onnx.export traces the program, "export" while torch.export does, else None."""
    if torch.onnx.is_in_onnx_export():
        return "onnx"
    return "export" if torch.compiler.is_exporting() else None


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether auto looks at the GPU kernels for this input (CUDA tensors only)."""
    return x.is_cuda


# Devices autocast always knows. Asking torch.amp.is_autocast_available for these is skipped: Dynamo in
# torch 2.11 cannot trace it (seen on an H200, 2026-12-04), so the question broke the compiled graph there.
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda"})


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device = x.device.type
    if not x.is_floating_point():
        return None
    if device not in _AUTOCAST_DEVICES and not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == x.dtype else dtype


def pick(impl: str, call: RecurrentCall) -> KernelChoice:
    """The kernel ``impl`` leads to for ``call``, or the fallback with the reason; never raises."""
    exporting = _exporting()
    autocast = _autocast_dtype(call.x)
    if exporting == "onnx":
        reason = onnx.unsupported_reason(call)
        return KernelChoice("onnx") if reason is None else KernelChoice("scan", reason)
    fallback = "scan" if exporting else "reference"
    if impl == "reference":
        return KernelChoice(fallback, "impl='reference' was asked for", autocast)
    fast = gpu if impl == "gpu" or (impl == "auto" and _on_gpu(call.x)) else fused
    reason = fast.unsupported_reason(call)
    if reason is not None:
        return KernelChoice(fallback, reason, autocast)
    if fast is not fused or not fused.wants_bf16_products(call, autocast):
        return KernelChoice(fast.NAME, None, autocast)
    low = fused.bf16_products(call, autocast)
    return KernelChoice(fast.NAME, None, autocast, bf16_products=low, bf16_in_float32=not low)


def choose(impl: str, call: RecurrentCall) -> KernelChoice:
    """The kernel of this call (every kernel takes every dropout plan: the choice depends on the cells, the
    input and the weights). ``impl="fused"`` or ``"gpu"`` raise when the call cannot run there (except
    while ``torch.onnx.export`` traces: the exported program has ONNX's operators instead)."""
    choice = pick(impl, call)
    if impl in ("fused", "gpu") and choice.name != impl and _exporting() != "onnx":
        raise DroprnnError(f"{call.where}: impl={impl!r} cannot run this call: {choice.reason}.")
    return choice


def run(choice: KernelChoice, call: RecurrentCall) -> Result:
    """Run the chosen kernel: (outputs (B, T, O) or None, last output (B, O), final states per cell)."""
    kernel = _KERNELS[choice.name]
    if choice.autocast is None:
        return kernel.run(call)
    with torch.autocast(call.x.device.type, enabled=False):
        sequence, last, finals = kernel.run(dataclasses.replace(call, autocast=choice.autocast))
    cast = choice.autocast
    return (None if sequence is None else sequence.to(cast), last.to(cast),
            [tuple(s.to(cast) for s in states) for states in finals])


def execute(impl: str, call: RecurrentCall) -> tuple[Result, KernelChoice]:
    """Check the call's weights, choose the kernel for it and run it; returns the results and the choice."""
    check_weights(call)
    choice = choose(impl, call)
    return run(choice, call), choice
