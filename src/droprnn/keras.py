"""droprnn's kernels inside Keras 3 models: ``from droprnn.keras import LSTM`` instead of ``keras.layers.LSTM``.

Each layer here *is* its Keras layer (a subclass): the same constructor arguments, configuration, weights
(names, shapes, order), masking, states, ``go_backwards``, ``stateful`` and saving. Only the time loop
differs: Keras runs its cell step by step once ``recurrent_dropout > 0`` (its fast cuDNN path turns off);
these layers hand the loop to droprnn (fused CPU kernels, GPU kernels), reading the layer's own variables
and the dropout masks Keras drew for the call, so a seeded layer computes what Keras's own layer computes.

droprnn's other dropout placements are extra keyword arguments, kept in the configuration:
``recurrent_dropout_mode``, ``input_dropout_mode``, ``zoneout_h`` (and the LSTM's ``zoneout_c``), and
``impl`` (which droprnn kernel runs: ``"auto"``, ``"fused"``, ``"reference"``...). With any of them away
from Keras's behaviour, droprnn draws the masks itself, from the layer's ``seed``.

Keras's torch backend only (``KERAS_BACKEND=torch`` before Keras is imported): on another backend the layers
would receive that backend's arrays, which droprnn cannot compute with, so they refuse to be made.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import keras
import torch
from keras import tree

from .dropout.plan import CellMasks, DropoutPlan
from .errors import DroprnnError
from .layers.recurrent import GRU as _GRU
from .layers.recurrent import LSTM as _LSTM
from .layers.recurrent import SimpleRNN as _SimpleRNN

__all__ = ["LSTM", "GRU", "SimpleRNN"]

# droprnn's options beyond Keras's, with the values that mean "as Keras".
_KERAS_LIKE = {"recurrent_dropout_mode": "keras", "input_dropout_mode": "keras", "zoneout_h": 0.0}


def _require_torch_backend(kind: str) -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise DroprnnError(
            f"droprnn.keras.{kind}: runs on Keras's torch backend, and Keras runs on {backend!r} here. Set the "
            "environment variable KERAS_BACKEND=torch before Keras is first imported (or use "
            f"keras.layers.{kind}, which runs on every backend)."
        )


class _DroprnnLoop:
    """What the three layers share: droprnn's options, the droprnn layer that runs the loop on Keras's
    variables, and the masks Keras drew."""

    _ours: type  # the droprnn layer class
    _options: dict[str, Any]

    def __init__(self, units: int, **kwargs: Any) -> None:
        kind = type(self).__name__
        _require_torch_backend(kind)
        options = {name: kwargs.pop(name, default) for name, default in self._options.items()}
        super().__init__(units, **kwargs)
        for name, value in options.items():
            setattr(self, name, value)
        # Checks the options now, with droprnn's errors (the layer that runs is made at build time).
        self._make_loop(None, dtype=torch.float32, device="meta")

    def _make_loop(self, input_size: Optional[int], dtype: torch.dtype, device: Any) -> Any:
        config = keras.layers.Layer.get_config(self)  # the name only: the rest is read from the cell
        cell = self.cell
        args = dict(
            activation=_activation(cell.activation), use_bias=cell.use_bias, dropout=cell.dropout,
            recurrent_dropout=cell.recurrent_dropout, seed=cell.seed, return_sequences=self.return_sequences,
            return_state=True, go_backwards=self.go_backwards, zero_output_for_mask=self.zero_output_for_mask,
            input_size=input_size, name=config["name"], dtype=dtype, device=device,
            **{name: getattr(self, name) for name in self._options},
        )
        if hasattr(cell, "recurrent_activation"):
            args["recurrent_activation"] = _activation(cell.recurrent_activation)
        if hasattr(cell, "reset_after"):
            args["reset_after"] = cell.reset_after
        return self._ours(cell.units, **args)

    def build(self, sequences_shape: Any) -> None:
        super().build(sequences_shape)
        self._attach_loop()

    def _settings(self) -> tuple:
        """What the droprnn loop is made from that may change after build: droprnn's options and the cell's
        rates (set on the layer or its cell, as for a schedule or an MC experiment)."""
        return (self.cell.dropout, self.cell.recurrent_dropout, *(getattr(self, name) for name in self._options))

    def _attach_loop(self) -> None:
        cell = self.cell
        kernel = cell.kernel.value
        ours = self._make_loop(kernel.shape[0], dtype=kernel.dtype, device="meta")
        inner = ours.cells[0]
        # The droprnn cell computes with Keras's own parameters (the same tensors, so the optimizer's
        # in-place updates and loaded weights are what it reads). Built on the meta device: no copy is made.
        inner.kernel = kernel
        inner.recurrent_kernel = cell.recurrent_kernel.value
        inner.bias = cell.bias.value if cell.use_bias else None
        # Kept outside both trackers: Keras would wrap a torch module and track its parameters a second time.
        object.__setattr__(self, "_loop", ours)
        object.__setattr__(self, "_loop_settings", self._settings())

    def _is_keras_like(self) -> bool:
        return all(getattr(self, name) == value for name, value in _KERAS_LIKE.items()) and not getattr(
            self, "zoneout_c", 0.0)

    def _keras_plan(self, training: bool) -> Optional[DropoutPlan]:
        """The masks Keras drew for this call (``RNN.call`` draws them before the loop), as droprnn's plan;
        None where droprnn is to draw its own (its other placements)."""
        if not self._is_keras_like():
            return None
        if not training:
            return DropoutPlan((CellMasks(),))
        cell = self.cell

        def stacked(mask: Any) -> Optional[torch.Tensor]:
            if mask is None:
                return None
            return torch.stack(list(mask)) if isinstance(mask, (list, tuple)) else mask.unsqueeze(0)

        inputs = stacked(getattr(cell, "_dropout_mask", None)) if cell.dropout > 0 else None
        recurrent = stacked(getattr(cell, "_recurrent_dropout_mask", None)) if cell.recurrent_dropout > 0 else None
        return DropoutPlan((CellMasks(input=inputs, recurrent=recurrent),))

    def inner_loop(self, sequences: Any, initial_state: Any, mask: Any, training: Any = False) -> tuple:
        if tree.is_nested(mask):
            mask = mask[0]
        training = bool(training)
        if self._settings() != self._loop_settings:  # an option or rate set since the loop was made
            self._attach_loop()
        loop = self._loop
        dtype = loop.cells[0].kernel.dtype  # the variables' own (`.value` is cast under a mixed policy)
        states = [s.to(dtype) for s in (initial_state if tree.is_nested(initial_state) else [initial_state])]
        plan = self._keras_plan(training)
        if plan is not None:
            plan = plan.to(dtype)
        with _compute_in(self.compute_dtype, dtype, sequences.device):
            output, *final = loop(sequences.to(dtype), mask=mask, initial_state=states, training=training,
                                  dropout_plan=plan)
        if self.return_sequences:
            return output[:, -1], output, final
        return output, output[:, None], final

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self._options})
        return config


def _compute_in(compute: str, variables: torch.dtype, device: torch.device) -> Any:
    """A mixed-precision policy (float32 variables, bfloat16 or float16 computation: Keras's
    ``"mixed_bfloat16"``) as torch's autocast, under which droprnn's kernels run their products in the
    lower precision and keep the states and gate math in float32; otherwise nothing."""
    lower = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(compute)
    if lower is None or lower == variables:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=lower)


def _activation(function: Any) -> Any:
    """A Keras activation as droprnn takes it: its name where Keras has one, else the function itself
    (droprnn then runs its reference loop, which calls it)."""
    name = keras.activations.serialize(function)
    return name if isinstance(name, str) else function


_COMMON = {**_KERAS_LIKE, "impl": "auto"}


@keras.saving.register_keras_serializable(package="droprnn")
class LSTM(_DroprnnLoop, keras.layers.LSTM):
    """``keras.layers.LSTM`` whose time loop runs droprnn's kernels; droprnn's options as extra arguments
    (``recurrent_dropout_mode``, ``input_dropout_mode``, ``zoneout_h``, ``zoneout_c``, ``impl``).

    Input (B, T, D) → output (B, T, units) with ``return_sequences`` else (B, units); states h, c (B, units).
    """

    _ours = _LSTM
    _options = {**_COMMON, "zoneout_c": 0.0}


@keras.saving.register_keras_serializable(package="droprnn")
class GRU(_DroprnnLoop, keras.layers.GRU):
    """``keras.layers.GRU`` whose time loop runs droprnn's kernels; droprnn's options as extra arguments
    (``recurrent_dropout_mode``, ``input_dropout_mode``, ``zoneout_h``, ``impl``).

    Input (B, T, D) → output (B, T, units) with ``return_sequences`` else (B, units); state h (B, units).
    """

    _ours = _GRU
    _options = dict(_COMMON)


@keras.saving.register_keras_serializable(package="droprnn")
class SimpleRNN(_DroprnnLoop, keras.layers.SimpleRNN):
    """``keras.layers.SimpleRNN`` whose time loop runs droprnn's kernels; droprnn's options as extra
    arguments (``recurrent_dropout_mode``, ``input_dropout_mode``, ``zoneout_h``, ``impl``).

    Input (B, T, D) → output (B, T, units) with ``return_sequences`` else (B, units); state h (B, units).
    """

    _ours = _SimpleRNN
    _options = dict(_COMMON)
