"""One recurrent call, as every kernel receives it: the contract between the fronts and the kernels.

``RNN.forward`` (the Keras-named layers) and ``droprnn.nn`` both validate their arguments, draw the dropout
plan and describe the call as a :class:`RecurrentCall`; :mod:`droprnn.kernels.dispatch` picks a kernel
for it, and every kernel module offers the same two functions::

    unsupported_reason(call) -> None, or why this kernel cannot run the call (decided from the call alone)
    run(call)                -> (outputs (B, T, O) or None, last output (B, O), final states per cell)

What kernels share besides: :meth:`RecurrentCall.in_processing_order` (the steps in the order they run,
DropConnect applied) and :func:`finish` (the outputs from a carried h sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..cells import CellWeights
from ..dropout.plan import DropoutPlan
from ..errors import DroprnnError

Tensor = torch.Tensor
States = tuple[Tensor, ...]
Result = tuple[Optional[Tensor], Tensor, list[States]]


@dataclass(frozen=True)
class RecurrentCall:
    """Stacked cells run over one batch of sequences.

    cells:               the cells, applied one after another within each step (one for most layers).
    weights:             per cell, its :class:`~droprnn.cells.CellWeights` in Keras layout (``droprnn.nn``
                         passes torch's parameters viewed that way), before DropConnect.
    x:                   (B, T, D) inputs, T >= 1, in input time order.
    initial_states:      per cell, a tuple of (B, state size) tensors.
    plan:                the masks of this call, one :class:`~droprnn.dropout.plan.CellMasks` per cell.
    step_mask:           (B, T) bool, True where the step is real; None for all steps.
    lengths:             (B,) ints when the step mask came from sequence lengths (the first ``lengths[b]``
                         steps are real), for kernels that take lengths rather than a mask; else None.
    go_backwards:        process the steps from last to first; outputs stay in processing order (as Keras).
    zero_output_for_mask: masked steps output zeros instead of repeating the previous output.
    return_sequences:    whether the outputs of every step are wanted (else only the last one).
    where:               how errors and ``explain`` name the layer.
    autocast:            the dtype ``torch.autocast`` asks for, while the dispatcher runs the kernel with
                         autocast off (None outside it): kernels that can compute their products in it do.
    """

    cells: tuple[torch.nn.Module, ...]
    weights: tuple[CellWeights, ...]
    x: Tensor
    initial_states: tuple[States, ...]
    plan: DropoutPlan
    step_mask: Optional[Tensor] = None
    lengths: Optional[Tensor] = None
    go_backwards: bool = False
    zero_output_for_mask: bool = False
    return_sequences: bool = True
    where: str = "recurrent layer"
    autocast: Optional[torch.dtype] = None

    def in_processing_order(self) -> tuple[Tensor, Optional[Tensor], list[CellWeights]]:
        """What every kernel does first: x and the step mask in the order the steps run (reversed for
        ``go_backwards``), and each cell's weights with the plan's DropConnect mask applied to its recurrent
        kernel (autograd reaches the parameters through the product).

        The inputs of masked steps are zeroed: a masked step must not touch anything, and padding is often
        NaN (sktime's .ts files pad with it), which would reach the outputs through the kernels' blend of new
        and held states (0 · NaN) and the weight gradients through the products (NaN · 0)."""
        x, step_mask = self.x, self.step_mask
        if step_mask is not None:
            x = torch.where(step_mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.go_backwards:
            x = x.flip(1)
            step_mask = None if step_mask is None else step_mask.flip(1)
        return x, step_mask, [m.weights_for(w) for m, w in zip(self.plan.cells, self.weights)]


# CellWeights fields as droprnn.nn calls them (its weights are torch's parameters, viewed in Keras layout).
_TORCH_NAMES = {"kernel": "weight_ih (transposed)", "recurrent_kernel": "weight_hh (transposed)",
                "input_bias": "bias_ih", "recurrent_bias": "bias_hh", "projection": "weight_hr (transposed)"}


def check_weights(call: RecurrentCall) -> None:
    """Raise unless every cell's weights have the shapes its step math reads, and the input's dtype and
    device: a replaced parameter of the wrong shape must not reach a kernel (the fused ones index memory by
    these shapes)."""
    features = call.x.shape[-1]
    for k, (cell, weights) in enumerate(zip(call.cells, call.weights)):
        width = cell.gates * cell.units
        hidden = cell.state_size[0]
        expected = {"kernel": (features, width), "recurrent_kernel": (hidden, width), "input_bias": (width,),
                    "recurrent_bias": (width,), "projection": (cell.units, hidden)}
        for name, shape in expected.items():
            tensor = getattr(weights, name)
            if tensor is None:
                continue
            shown = _TORCH_NAMES[name] if call.where.startswith("droprnn.nn") else name
            what = f"{call.where}: parameter `{shown}` of cell {k}"
            if tuple(tensor.shape) != shape:
                raise DroprnnError(f"{what} expected shape {shape}, got {tuple(tensor.shape)}; was it replaced?")
            if tensor.dtype != call.x.dtype or tensor.device != call.x.device:
                raise DroprnnError(
                    f"{what} expected {call.x.dtype} on {call.x.device} (as the input and the layer's other "
                    f"weights), got {tensor.dtype} on {tensor.device}; convert the whole layer with .to()."
                )
        features = cell.output_size


def finish(call: RecurrentCall, carried: Tensor, valid: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor]:
    """A kernel's (outputs or None, last output) from the last cell's carried h sequence (B, T, H).

    A kernel that runs one cell over all steps carries h through masked steps; the reference's outputs
    repeat the previous output there (zero before the first real step), or are zero with
    ``zero_output_for_mask``. ``valid``: (B, T) of 0/1 in the outputs' dtype (processing order), or None.
    """
    if valid is not None:
        # Whether a real step has been seen by step t (a cumulative sum: ONNX has no cumulative max).
        shown = valid if call.zero_output_for_mask else valid.cumsum(dim=1).clamp(max=1)
        carried = carried * shown.unsqueeze(-1)
    return (carried if call.return_sequences else None), carried[:, -1]


def valid_steps(step_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The step mask as (B, T) 0/1 values in ``dtype``, contiguous (what the fast kernels read)."""
    return None if step_mask is None else step_mask.to(dtype).contiguous()


def stacked(call: RecurrentCall, layer, last_only: bool = False) -> Result:
    """Run ``call`` one cell after another, each over the whole sequence: ``layer(cell, x, weights, states,
    masks, valid)`` returns a cell's carried h sequence (B, T, H) and its final states. With ``last_only``
    (a kernel that can skip the outputs nobody reads) the last cell is asked for its last step only,
    ``layer(..., all_steps=False)`` returning h (B, H) instead of the sequence.

    Running a cell over all steps before the next starts equals the reference's per-step interleaving: a
    cell's states at masked steps are held, so the next cell sees the same carried h sequence either way.
    """
    x, step_mask, weights = call.in_processing_order()
    valid = valid_steps(step_mask, x.dtype)
    layer_input = x
    finals: list[States] = []
    last = len(call.cells) - 1
    for k, (cell, w, masks, states) in enumerate(zip(call.cells, weights, call.plan.cells, call.initial_states)):
        if last_only and k == last:
            carried, final = layer(cell, layer_input, w, tuple(states), masks, valid, all_steps=False)
            return None, _last_output(call, carried, valid), finals + [final]
        layer_input, final = layer(cell, layer_input, w, tuple(states), masks, valid)
        finals.append(final)
    return (*finish(call, layer_input, valid), finals)


def _last_output(call: RecurrentCall, carried: Tensor, valid: Optional[Tensor]) -> Tensor:
    """What :func:`finish` gives as the last output, from the carried h of the last step (B, H) alone."""
    if valid is None:
        return carried
    shown = valid[:, -1] if call.zero_output_for_mask else valid.sum(dim=1).clamp(max=1)
    return carried * shown.unsqueeze(-1)
