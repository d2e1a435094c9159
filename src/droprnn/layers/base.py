"""What every droprnn layer shares: a name for errors, the training switch, masks and Keras weights."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DroprnnError, check_positive_int, fail, no_torchscript, type_name

Tensor = torch.Tensor


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Layer(nn.Module):
    """A ``nn.Module`` with Keras's calling conventions.

    - ``layer(x, mask=None, training=None)``: ``training=None`` follows the module's mode
      (``.train()`` / ``.eval()``); ``training=True`` forces dropout on, e.g. for MC dropout.
    - ``compute_mask(x, mask)``: the (B, T) mask the layer's output carries (passed on by Sequential).
    - ``get_weights()`` / ``set_weights()``: NumPy arrays in Keras's order and layouts.
    """

    # Training mode switches only dropout and noise on (no batch statistics): MC dropout may use it.
    training_switches_only_noise = True
    # Whether a training call draws a mask once for the whole batch, so that its rows are not independent
    # stochastic passes (MC dropout that runs passes as rows must know). Layers that do say so.
    masks_shared_by_batch = False
    # Whether forward takes ``lengths=`` as well as ``mask=`` (Sequential hands lengths on to such layers,
    # so kernels that take lengths, such as ONNX's recurrent operators, can use them).
    accepts_lengths = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name or snake_case(type(self).__name__)

    @property
    def where(self) -> str:
        """How errors name this layer."""
        return f"{type(self).__name__} '{self.name}'"

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def __prepare_scriptable__(self):  # torch.jit.script calls this first, on every submodule
        raise no_torchscript(self.where, "torch.jit.script")

    # ------------------------------------------------------------------ shapes (Sequential builds with them)
    @property
    def built(self) -> bool:
        """Whether the layer's weights exist (layers without weights are always built)."""
        return True

    @property
    def input_features(self) -> Optional[int]:
        """The feature size the layer was built for, where its weights fix one (else None)."""
        return None

    def output_features(self, features: Optional[int]) -> Optional[int]:
        """The feature size of the output for inputs of ``features`` features (None: not known). This
        default suits the layers that keep the feature size (dropout, noise, masking)."""
        return features

    def build_for_input(self, features: int, x: Tensor) -> None:
        """Build the weights for inputs of ``features`` features at the first call (Keras's lazy build);
        not inside a program being traced, where new parameters would not belong to the module."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            raise DroprnnError(
                f"{self.where}: its weights do not exist yet, and they cannot be created inside a program being "
                "compiled or exported; give input_shape=/input_size= when making the layer, or call the model once "
                "before torch.compile / torch.export."
            )
        self.build(features, dtype=x.dtype, device=x.device)

    def resolve_training(self, training: Optional[bool]) -> bool:
        if training is None:
            return self.training
        if not isinstance(training, (bool, np.bool_)):  # "no" or 0.5 would count as true
            raise fail(self.where, "training", "True, False or None (follow .train()/.eval())", repr(training))
        return bool(training)

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        return mask

    # ------------------------------------------------------------------ Keras weights
    def keras_weights(self) -> list[nn.Parameter]:
        """Parameters in Keras's ``get_weights()`` order (and layouts); raises if not built."""
        return []

    def get_weights(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().copy() for p in self.keras_weights()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Load arrays in Keras's order and layouts. Every array is checked before any is written: a wrong
        one leaves the layer as it was."""
        params = self.keras_weights()
        if not isinstance(weights, (list, tuple)):
            raise fail(self.where, "weights", f"a list of {len(params)} arrays (get_weights() order)", type_name(weights))
        if len(weights) != len(params):
            raise DroprnnError(
                f"{self.where}: set_weights expected {len(params)} arrays (shapes "
                f"{[tuple(p.shape) for p in params]}), got {len(weights)}."
            )
        arrays = []
        for i, (param, value) in enumerate(zip(params, weights)):
            try:
                array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value)
            except (TypeError, ValueError):  # ragged nested lists and the like
                array = np.asarray(None)
            if array.dtype.kind not in "fiub":
                raise DroprnnError(
                    f"{self.where}: set_weights array {i} expected numbers of shape {tuple(param.shape)}, "
                    f"got {type(value).__name__} of dtype {array.dtype}."
                )
            if tuple(array.shape) != tuple(param.shape):
                raise DroprnnError(
                    f"{self.where}: set_weights array {i} expected shape {tuple(param.shape)}, got {tuple(array.shape)}."
                )
            arrays.append(torch.as_tensor(array))
        with torch.no_grad():
            for param, value in zip(params, arrays):
                param.copy_(value.to(dtype=param.dtype, device=param.device))

    def count_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def declared_input_size(where: str, input_shape: Optional[Sequence[Any]], input_size: Optional[int]) -> Optional[int]:
    """The feature size from Keras's ``input_shape=(…, F)`` or torch-style ``input_size=F`` (None if neither)."""
    from_shape = None
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list)) or not input_shape:
            raise DroprnnError(f"{where}: argument `input_shape` expected a tuple such as (None, features), got {input_shape!r}.")
        from_shape = check_positive_int(where, "input_shape[-1]", input_shape[-1])
    if input_size is not None:
        input_size = check_positive_int(where, "input_size", input_size)
        if from_shape is not None and from_shape != input_size:
            raise DroprnnError(
                f"{where}: `input_shape` says {from_shape} features but `input_size` says {input_size}; give one."
            )
        return input_size
    return from_shape


def float_input(where: str, x: Any, dtype: Optional[torch.dtype]) -> Tensor:
    """A tensor in the layer's floating dtype (Keras casts integer and mismatched inputs likewise)."""
    if not torch.is_tensor(x):
        if not isinstance(x, (np.ndarray, list, tuple)):
            raise DroprnnError(f"{where}: expected a tensor input, got {type(x).__name__}.")
        try:
            x = torch.as_tensor(np.asarray(x))
        except (ValueError, TypeError) as error:  # ragged nested lists, objects
            raise fail(where, "inputs", "a tensor, or an array of numbers of one shape", f"{type(x).__name__} "
                       f"numpy cannot make one array of ({str(error).splitlines()[0]})") from None
    if x.is_complex():
        raise fail(where, "inputs", "real numbers (the imaginary part would be dropped)", f"a {x.dtype} tensor")
    target = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    return x if x.dtype == target else x.to(target)


def floating_input(where: str, x: Any) -> Tensor:
    """``x`` itself, which must be a floating tensor: noise is made in its dtype."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if torch.is_tensor(x) else type_name(x)
        raise fail(where, "inputs", "a floating-point tensor (cast integer data with .float())", got)
    return x


def sequence_mask(where: str, mask: Any, lengths: Any, batch: int, steps: int,
                  device: Any) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The (B, T) bool mask of real steps from a mask or from lengths (at most one of them), validated;
    and the lengths (B,) when they were given (kernels that take lengths use them), else None.

    Inside a compiled or exported program the range of the lengths is checked when the program runs
    (``torch._assert_async``), not while it is traced.
    """
    if mask is not None and lengths is not None:
        raise DroprnnError(f"{where}: give `mask` or `lengths`, not both.")
    if lengths is not None:
        try:
            lengths = torch.as_tensor(lengths, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise fail(where, "lengths", f"integers of shape ({batch},)", repr(lengths)) from None
        if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise fail(where, "lengths", f"integers of shape ({batch},)", f"{lengths.dtype} of shape {tuple(lengths.shape)}")
        in_range = ((lengths >= 0) & (lengths <= steps)).all()
        if torch.compiler.is_compiling():
            # (the message names no size: formatting a symbolic size would fix it in the program)
            torch._assert_async(in_range, f"{where}: argument `lengths` expected values in [0, time steps]")
        elif not bool(in_range):
            raise fail(where, "lengths", f"values in [0, {steps}]", str(lengths.tolist()))
        return torch.arange(steps, device=device)[None, :] < lengths[:, None], lengths
    if mask is None:
        return None, None
    try:
        mask = torch.as_tensor(mask, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise fail(where, "mask", f"a (batch, time) = ({batch}, {steps}) boolean mask", type_name(mask)) from None
    if tuple(mask.shape) != (batch, steps):
        raise fail(where, "mask", f"a (batch, time) = ({batch}, {steps}) mask", f"shape {tuple(mask.shape)}")
    return (mask if mask.dtype == torch.bool else mask != 0), None
