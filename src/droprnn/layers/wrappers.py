"""Layers that wrap other layers: ``Bidirectional`` and ``TimeDistributed``."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import DroprnnError, fail, type_name
from ..random import SeedStream, derived_seed
from .base import Layer, declared_input_size
from .recurrent import RNN

Tensor = torch.Tensor

_MERGE_MODES = ("concat", "sum", "ave", "mul", None)


class Bidirectional(Layer):
    """Run an RNN layer forwards and a copy of it backwards, and merge the two outputs (Keras's wrapper).

    Args:
        layer: the forward layer (an :class:`RNN`, e.g. ``LSTM(...)``; it is used as is).
        merge_mode: "concat" (default, forward then backward features), "sum", "ave", "mul", or None for
            the tuple ``(forward, backward)``.
        backward_layer: the backward layer; by default a copy of ``layer`` with fresh weights and the
            opposite ``go_backwards``. A given one must have the opposite ``go_backwards`` and the same
            ``return_sequences``, ``return_state`` and ``stateful``.

    The backward output is flipped back to input time order when ``return_sequences``. Both sub-layers
    use ``zero_output_for_mask = return_sequences``, as Keras forces. ``initial_state`` is split in
    halves (forward states, then backward ones); ``return_state`` returns
    ``(output, *forward_states, *backward_states)``. Weights list forward then backward.

    Deliberate difference from Keras: with an integer ``seed`` Keras gives both directions the same seed
    and therefore identical dropout masks; here the copy derives its own seed, so the directions' masks
    are independent (as they are with ``seed=None`` in both libraries).

    Input (B, T, D) → (B, [T,] 2·units) with "concat", (B, [T,] units) otherwise.
    """

    accepts_lengths = True

    def __init__(
        self,
        layer: RNN,
        merge_mode: Optional[str] = "concat",
        backward_layer: Optional[RNN] = None,
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name)
        if not isinstance(layer, RNN):
            raise fail(self.where, "layer", "a droprnn recurrent layer (droprnn.LSTM, GRU, SimpleRNN or RNN)", type_name(layer))
        if merge_mode not in _MERGE_MODES:
            raise fail(self.where, "merge_mode", "one of 'concat', 'sum', 'ave', 'mul' or None", repr(merge_mode))
        self.merge_mode = merge_mode
        if backward_layer is None:
            backward_layer = copy.deepcopy(layer)
            backward_layer.go_backwards = not layer.go_backwards
            backward_layer.name = f"backward_{layer.name}"
            backward_layer.reset_parameters()
            backward_layer.states = None
            for cell in backward_layer.cells:
                cell.seed_stream = SeedStream(derived_seed(cell.seed_stream.seed, 1))
        else:
            if not isinstance(backward_layer, RNN):
                raise fail(self.where, "backward_layer", "a droprnn recurrent layer", type_name(backward_layer))
            if backward_layer.go_backwards == layer.go_backwards:
                raise fail(self.where, "backward_layer", f"go_backwards={not layer.go_backwards}", str(backward_layer.go_backwards))
            for attr in ("return_sequences", "return_state", "stateful"):
                if getattr(backward_layer, attr) != getattr(layer, attr):
                    raise fail(self.where, f"backward_layer.{attr}", f"{getattr(layer, attr)} (as the forward layer)", str(getattr(backward_layer, attr)))
            if merge_mode in ("sum", "ave", "mul") and backward_layer.output_size != layer.output_size:
                raise fail(
                    self.where, "backward_layer", f"{layer.output_size} units (as the forward layer, to {merge_mode} outputs)",
                    f"{backward_layer.output_size} units",
                )
        self.forward_layer = layer
        self.backward_layer = backward_layer
        for sub in (self.forward_layer, self.backward_layer):
            sub.zero_output_for_mask = layer.return_sequences
        size = declared_input_size(self.where, input_shape, input_size)
        if size is not None:
            self.build(size)

    @property
    def return_sequences(self) -> bool:
        return self.forward_layer.return_sequences

    @property
    def return_state(self) -> bool:
        return self.forward_layer.return_state

    @property
    def built(self) -> bool:
        return self.forward_layer.built and self.backward_layer.built

    def build(self, input_size: int, dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        self.forward_layer.build(input_size, dtype, device)
        self.backward_layer.build(input_size, dtype, device)

    @property
    def input_features(self) -> Optional[int]:
        return self.forward_layer.input_size

    def output_features(self, features: Optional[int]) -> Optional[int]:
        if self.merge_mode is None:  # a pair of outputs
            return None
        sizes = (self.forward_layer.output_size, self.backward_layer.output_size)
        return sum(sizes) if self.merge_mode == "concat" else sizes[0]

    def keras_weights(self) -> list[nn.Parameter]:
        return self.forward_layer.keras_weights() + self.backward_layer.keras_weights()

    def reset_state(self) -> None:
        self.forward_layer.reset_state()
        self.backward_layer.reset_state()

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        return mask if self.return_sequences else None

    def _merge(self, y: Tensor, y_rev: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if self.merge_mode == "concat":
            return torch.cat([y, y_rev], dim=-1)
        if self.merge_mode == "sum":
            return y + y_rev
        if self.merge_mode == "ave":
            return (y + y_rev) / 2
        if self.merge_mode == "mul":
            return y * y_rev
        return (y, y_rev)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        initial_state: Optional[Sequence[Tensor]] = None,
        training: Optional[bool] = None,
    ):
        forward_state = backward_state = None
        if initial_state is not None:
            cells = self.forward_layer.cells  # one cell: its states; stacked cells: one list of states per cell
            entries = cells[0].state_names if len(cells) == 1 else [f"cell {k}'s states" for k in range(len(cells))]
            count = 2 * len(entries)
            names = [f"{direction} {entry}" for direction in ("forward", "backward") for entry in entries]
            if not isinstance(initial_state, (list, tuple)) or len(initial_state) != count:
                raise fail(
                    self.where, "initial_state", f"a list of {count} states [{', '.join(names)}]",
                    type_name(initial_state) if not isinstance(initial_state, (list, tuple)) else f"{len(initial_state)} states",
                )
            half = len(initial_state) // 2
            forward_state, backward_state = list(initial_state[:half]), list(initial_state[half:])
        kwargs = dict(mask=mask, lengths=lengths, training=training)
        y = self.forward_layer(x, initial_state=forward_state, **kwargs)
        y_rev = self.backward_layer(x, initial_state=backward_state, **kwargs)
        states: tuple = ()
        if self.return_state:
            y, *forward_states = y
            y_rev, *backward_states = y_rev
            states = (*forward_states, *backward_states)
        if self.return_sequences:
            y_rev = y_rev.flip(1)
        merged = self._merge(y, y_rev)
        if not self.return_state:
            return merged
        return (*merged, *states) if self.merge_mode is None else (merged, *states)


class TimeDistributed(Layer):
    """Apply a layer to every timestep independently: (B, T, ...) → (B, T, ...). Passes the mask on."""

    def __init__(self, layer: nn.Module, name: Optional[str] = None) -> None:
        super().__init__(name)
        if not isinstance(layer, nn.Module):
            raise fail(self.where, "layer", "an nn.Module", type_name(layer))
        self.layer = layer

    def output_features(self, features: Optional[int]) -> Optional[int]:
        return self.layer.output_features(features) if isinstance(self.layer, Layer) else None

    def keras_weights(self) -> list[nn.Parameter]:
        if isinstance(self.layer, Layer):
            return self.layer.keras_weights()
        raise DroprnnError(f"{self.where}: the wrapped {type(self.layer).__name__} has no Keras weight layout.")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        if not torch.is_tensor(x) or x.dim() < 3:
            got = f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise fail(self.where, "inputs", "a tensor of shape (batch, time, ...)", got)
        batch, steps = x.shape[:2]
        flat = x.reshape(batch * steps, *x.shape[2:])
        if isinstance(self.layer, Layer):
            y = self.layer(flat, training=training)
        else:
            y = self.layer(flat)
        return y.reshape(batch, steps, *y.shape[1:])
