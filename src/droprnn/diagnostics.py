"""What droprnn can say about a model: which kernel a recurrent layer runs, which product a ``Dense`` layer
runs, and why."""

from __future__ import annotations

from typing import Optional

import torch

from .dropout.plan import DropoutPlan
from .errors import DroprnnError
from .kernels import dense, dispatch
from .kernels.call import RecurrentCall
from .layers.core import Dense
from .layers.recurrent import RNN
from .layers.wrappers import Bidirectional


def explain(layer: torch.nn.Module, x: Optional[torch.Tensor] = None) -> str:
    """Which kernel ``layer`` runs (for input ``x``, or as its last call did) and why.

    Works on droprnn's recurrent layers, ``Bidirectional`` (both directions, one line each),
    ``droprnn.nn`` modules (their last call) and ``Dense`` (for ``x``: brgemm's product or ``F.linear``'s).
    """
    if isinstance(layer, Dense):
        where = layer.where
        if x is None or not layer.built:
            return f"{where}: pass an input to see which product it would run"
        reason = dense.why_f_linear(x, layer.kernel, layer.bias)
        if reason is None:
            return (f"{where}: brgemm (droprnn's float_mm), the faster float32 products on this machine "
                    "(measured once)")
        return f"{where}: F.linear ({reason})"
    if isinstance(layer, Bidirectional):
        return "\n".join(explain(sub, x) for sub in (layer.forward_layer, layer.backward_layer))
    where = getattr(layer, "where", type(layer).__name__)
    if isinstance(layer, RNN):
        if x is not None:
            if not layer.built:
                layer.build(x.shape[-1], dtype=x.dtype if x.is_floating_point() else None, device=x.device)
            cells = tuple(layer.cells)
            # The choice depends on the cells, the input and the weights, never on the masks or states.
            call = RecurrentCall(cells, tuple(c.weights() for c in cells), x, (), DropoutPlan(()), where=where)
            return f"{where}: {dispatch.pick(layer.impl, call)}"
        if layer.last_kernel is None:
            return f"{where}: not called yet; pass an input to see which kernel it would run"
        return f"{where}: {layer.last_kernel}"
    last = getattr(layer, "last_kernel", None)
    if last is not None:
        return f"{where}: {last}"
    raise DroprnnError(f"explain: expected a droprnn recurrent layer, Bidirectional, Dense or droprnn.nn module, got {type(layer).__name__}.")
