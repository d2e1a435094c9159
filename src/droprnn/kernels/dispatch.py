"""Which kernel runs a recurrent call, and why: the one seam between the layers and the kernels.

``impl="auto"`` takes the fastest kernel the *arguments* allow (never because a kernel raised): for CUDA
tensors the Triton GPU kernels (:mod:`droprnn.kernels.gpu`), for CPU tensors the fused CPU kernel, else
the reference loop. ``"reference"`` always takes the reference loop; ``"fused"`` and ``"gpu"`` insist and
raise with the reason when the call cannot run there (``"gpu"`` on CPU tensors only under
``TRITON_INTERPRET=1``, Triton's interpreter: auto never picks it for CPU tensors). The choice is recorded
on the layer (``last_kernel``) and shown by :func:`explain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..cells import CellWeights
from ..errors import DroprnnError
from . import cpu, fused, gpu, reference

IMPLS = ("auto", "reference", "fused", "gpu")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel of one call: ``name`` is "gpu", "fused" or "reference"; ``reason`` says why the faster
    kernel was not taken."""

    name: str
    reason: Optional[str] = None

    def __str__(self) -> str:
        if self.name == "fused":
            return f"fused CPU kernel ({cpu.library_path()})"
        if self.name == "gpu":
            return gpu.describe()
        return f"reference loop ({self.reason})"


def check_impl(where: str, impl: Any) -> str:
    if impl not in IMPLS:
        raise DroprnnError(f"{where}: argument `impl` expected one of {', '.join(map(repr, IMPLS))}, got {impl!r}.")
    return impl


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether auto looks at the GPU kernels for this input (CUDA tensors only)."""
    return x.is_cuda


def _pick(impl: str, cells: Sequence[torch.nn.Module], x: torch.Tensor, weights: Sequence[CellWeights]) -> KernelChoice:
    """The kernel ``impl`` leads to, or the reference loop with the reason; never raises."""
    if impl == "reference":
        return KernelChoice("reference", "impl='reference' was asked for")
    if impl == "gpu" or (impl == "auto" and _on_gpu(x)):
        reason = gpu.unsupported_reason(cells, x, weights)
        return KernelChoice("gpu") if reason is None else KernelChoice("reference", reason)
    reason = fused.unsupported_reason(cells, x, weights)
    return KernelChoice("fused") if reason is None else KernelChoice("reference", reason)


def choose(impl: str, cells: Sequence[torch.nn.Module], x: torch.Tensor, weights: Sequence[CellWeights],
           where: str) -> KernelChoice:
    """The kernel of this call (every kernel takes every dropout plan: the choice depends on the cells,
    the input and the weights)."""
    choice = _pick(impl, cells, x, weights)
    if impl in ("fused", "gpu") and choice.name != impl:
        raise DroprnnError(f"{where}: impl={impl!r} cannot run this call: {choice.reason}.")
    return choice


_KERNELS = {"gpu": gpu, "fused": fused, "reference": reference}


def run(choice: KernelChoice, *args: Any, **kwargs: Any):
    """Run the chosen kernel; arguments and results as :func:`droprnn.kernels.reference.run`."""
    return _KERNELS[choice.name].run(*args, **kwargs)


def explain(layer: torch.nn.Module, x: Optional[torch.Tensor] = None) -> str:
    """Which kernel ``layer`` runs (for input ``x``, or as its last call did) and why.

    Works on droprnn's recurrent layers, ``Bidirectional`` (both directions) and ``droprnn.nn`` modules.
    """
    from ..layers.recurrent import RNN
    from ..layers.wrappers import Bidirectional

    if isinstance(layer, Bidirectional):
        return "\n".join(explain(sub, x) for sub in (layer.forward_layer, layer.backward_layer))
    where = getattr(layer, "where", type(layer).__name__)
    if isinstance(layer, RNN):
        if x is not None:
            if not layer.built:
                layer.build(x.shape[-1], dtype=x.dtype if x.is_floating_point() else None, device=x.device)
            cells = layer.cells
            choice = _pick(layer.impl, cells, x, [c.weights() for c in cells])
            return f"{where}: {choice}"
        if layer.last_kernel is None:
            return f"{where}: not called yet; pass an input to see which kernel it would run"
        return f"{where}: {layer.last_kernel}"
    last = getattr(layer, "last_kernel", None)
    if last is not None:
        return f"{where}: {last}"
    raise DroprnnError(f"explain: expected a droprnn recurrent layer, Bidirectional or droprnn.nn module, got {type(layer).__name__}.")
