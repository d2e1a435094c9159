"""Which kernel runs a recurrent call, and why: the one seam between the layers and the kernels.

``impl="auto"`` takes the fused kernel whenever the *arguments* allow it (never because a kernel raised),
``"reference"`` always takes the reference loop, ``"fused"`` insists and raises with the reason when the
call cannot be fused. The choice is recorded on the layer (``last_kernel``) and shown by :func:`explain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..cells import CellWeights
from ..errors import DroprnnError
from . import cpu, fused, reference

IMPLS = ("auto", "reference", "fused")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel of one call: ``name`` is "fused" or "reference"; ``reason`` says why not fused."""

    name: str
    reason: Optional[str] = None

    def __str__(self) -> str:
        if self.name == "fused":
            return f"fused CPU kernel ({cpu.library_path()})"
        return f"reference loop ({self.reason})"


def check_impl(where: str, impl: Any) -> str:
    if impl not in IMPLS:
        raise DroprnnError(f"{where}: argument `impl` expected one of {', '.join(map(repr, IMPLS))}, got {impl!r}.")
    return impl


def choose(impl: str, cells: Sequence[torch.nn.Module], x: torch.Tensor, weights: Sequence[CellWeights], where: str) -> KernelChoice:
    if impl == "reference":
        return KernelChoice("reference", "impl='reference' was asked for")
    reason = fused.unsupported_reason(cells, x, weights)
    if reason is None:
        return KernelChoice("fused")
    if impl == "fused":
        raise DroprnnError(f"{where}: impl='fused' cannot run this call: {reason}.")
    return KernelChoice("reference", reason)


def run(choice: KernelChoice, *args: Any, **kwargs: Any):
    """Run the chosen kernel; arguments and results as :func:`droprnn.kernels.reference.run`."""
    return (fused if choice.name == "fused" else reference).run(*args, **kwargs)


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
            choice = choose(layer.impl if layer.impl != "fused" else "auto", cells, x, [c.weights() for c in cells], where)
            return f"{where}: {choice}"
        if layer.last_kernel is None:
            return f"{where}: not called yet; pass an input to see which kernel it would run"
        return f"{where}: {layer.last_kernel}"
    last = getattr(layer, "last_kernel", None)
    if last is not None:
        return f"{where}: {last}"
    raise DroprnnError(f"explain: expected a droprnn recurrent layer, Bidirectional or droprnn.nn module, got {type(layer).__name__}.")
