"""Recurrent layers: ``RNN`` runs a cell (or stacked cells) over time; ``LSTM``, ``GRU`` and ``SimpleRNN``
are ``RNN`` around the matching cell, with Keras's arguments.

A call is four steps, each in its own place:
validate (shapes, masks, states) → plan the dropout (:mod:`droprnn.dropout.plan`) → run a kernel over time
(a :class:`~droprnn.kernels.call.RecurrentCall` that :mod:`droprnn.kernels.dispatch` hands to the kernel it
picks) → shape the result (sequences or last output, states, stateful carry).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .. import activations, initializers
from ..cells import Cell, GRUCell, LSTMCell, SimpleRNNCell
from ..dropout.modes import cells_share_masks_over_batch, layer_doc
from ..dropout.plan import DropoutPlan, check_plan, draw_plan
from ..errors import DroprnnError, check_positive_int, checked, fail, no_torchscript, type_name
from ..kernels import dispatch as kernels
from ..kernels.call import RecurrentCall
from ..kernels.dispatch import KernelChoice, check_impl
from .base import Layer, declared_input_size, float_input, sequence_mask

Tensor = torch.Tensor
States = tuple[Tensor, ...]


class StackedCells(nn.Module):
    """Cells applied one after another within each timestep (Keras's ``StackedRNNCells``)."""

    def __init__(self, cells: Sequence[Cell]) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)


class RNN(Layer):
    """Run a cell over sequences, as Keras's ``RNN`` layer.

    Args:
        cell: a :class:`~droprnn.Cell` (``LSTMCell``, ``GRUCell``, ``SimpleRNNCell`` or a subclass) or a
            list of cells, stacked within each timestep.
        return_sequences: return the output of every step (B, T, O) instead of the last one (B, O).
        return_state: also return the final states: ``(output, *states)``; per cell a tuple when stacked.
        go_backwards: process the steps from last to first; returned sequences stay in processing order.
        stateful: the final states of a call are the initial states of the next one (detached: truncated
            backpropagation through time). ``reset_state()`` zeroes them. The batch size is fixed by the
            first call.
        unroll: accepted for Keras compatibility; the result is the same either way.
        zero_output_for_mask: masked steps output zeros instead of repeating the previous output.
        input_shape: Keras's (T, D) (T may be None), to create the weights now instead of at the first call.
        input_size: the feature size D, the same way.
        impl: "auto" (the fused CPU kernel, or the Triton GPU kernel for CUDA tensors, when the call allows
            it, else the reference loop), "reference", "fused" or "gpu" (raise if the call cannot run
            there). ``droprnn.explain(layer)`` says which ran and why.

    Call: ``layer(x, mask=None, lengths=None, initial_state=None, training=None, dropout_plan=None)``
        x: (B, T, D). mask: (B, T) bool, True for real steps; or lengths: (B,) ints (steps ≥ length are
        masked). Masked steps carry every state unchanged. initial_state: a list of (B, units) tensors
        ([h, c] for LSTM); per cell a list when stacked. training: None follows ``.train()/.eval()``.
        dropout_plan: apply these masks (whatever the training mode) instead of drawing new ones; see
        ``draw_dropout_plan``.

    The masks drawn by the last call are kept in ``last_dropout_plan``.
    """

    accepts_lengths = True

    impl = checked("impl", lambda layer, value: check_impl(layer.where, value))  # checked whenever set

    def __init__(
        self,
        cell: Union[Cell, Sequence[Cell]],
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        zero_output_for_mask: bool = False,
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        impl: str = "auto",
    ) -> None:
        super().__init__(name)
        self.impl = impl
        self.last_kernel: Optional[KernelChoice] = None
        cells = list(cell) if isinstance(cell, (list, tuple)) else [cell]
        if not cells:
            raise fail(self.where, "cell", "a cell or a non-empty list of cells", repr(cell))
        for c in cells:
            if not isinstance(c, Cell):
                raise fail(
                    self.where, "cell", "a droprnn cell (droprnn.LSTMCell, GRUCell, SimpleRNNCell or a Cell subclass)",
                    type_name(c),
                )
        self.cell: nn.Module = cells[0] if len(cells) == 1 else StackedCells(cells)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.stateful = bool(stateful)
        self.unroll = bool(unroll)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.states: Optional[list[States]] = None
        self.last_dropout_plan: Optional[DropoutPlan] = None
        size = declared_input_size(self.where, input_shape, input_size)
        if size is not None:
            self.build(size, dtype=dtype, device=device)

    # ------------------------------------------------------------------ structure
    @property
    def cells(self) -> list[Cell]:
        return list(self.cell.cells) if isinstance(self.cell, StackedCells) else [self.cell]

    @property
    def input_size(self) -> Optional[int]:
        return self.cells[0].input_size

    @property
    def masks_shared_by_batch(self) -> bool:  # DropConnect masks the weights, once per call
        return cells_share_masks_over_batch(self.cells)

    @property
    def built(self) -> bool:
        return all(c.built for c in self.cells)

    @property
    def output_size(self) -> int:
        return self.cells[-1].output_size

    @property
    def input_features(self) -> Optional[int]:
        return self.input_size

    def output_features(self, features: Optional[int]) -> Optional[int]:
        return self.output_size

    def build(self, input_size: int, dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        for cell in self.cells:
            cell.build(input_size, dtype=dtype, device=device)
            input_size = cell.output_size

    def reset_parameters(self) -> None:
        for cell in self.cells:
            cell.reset_parameters()

    def keras_weights(self) -> list[nn.Parameter]:
        return [p for cell in self.cells for p in cell.keras_weights()]

    def extra_repr(self) -> str:
        flags = [f for f in ("return_sequences", "return_state", "go_backwards", "stateful") if getattr(self, f)]
        return ", ".join([f"name={self.name!r}"] + [f"{f}=True" for f in flags])

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        return mask if self.return_sequences else None

    # ------------------------------------------------------------------ dropout
    def draw_dropout_plan(
        self, batch: int, steps: int = 1, training: bool = True, dtype: Optional[torch.dtype] = None,
        device: Any = None,
    ) -> DropoutPlan:
        """Draw the masks one call on ``batch`` sequences of ``steps`` steps would use (advancing the seed
        streams). ``steps`` matters only for per-step schemes and zoneout."""
        if not self.built:
            raise DroprnnError(f"{self.where}: cannot draw dropout masks before the input size is known.")
        batch = check_positive_int(self.where, "batch", batch)
        steps = check_positive_int(self.where, "steps", steps)
        kernel = self.cells[0].kernel
        return draw_plan(
            self.cells, batch, self.input_size, training, dtype or kernel.dtype,
            torch.device(device) if device is not None else kernel.device, steps,
        )

    # ------------------------------------------------------------------ states
    def reset_state(self) -> None:
        """Start a stateful layer over: the next call begins from zero states, at any batch size."""
        self.states = None

    def reset_states(self) -> None:  # Keras 2 name
        self.reset_state()

    def _initial_states(self, initial_state: Any, batch: int, like: Tensor) -> list[States]:
        cells = self.cells
        if initial_state is None:
            if self.stateful and self.states is not None:
                held = self.states[0][0].shape[0]
                if held != batch:
                    raise DroprnnError(
                        f"{self.where}: stateful layer carries states for batch size {held} from its previous "
                        f"call, got batch size {batch}; call reset_state() first to start over with another."
                    )
                # States kept from a call under torch.inference_mode are inference tensors, which autograd
                # refuses; a copy made outside that mode is an ordinary tensor with the same values.
                fresh = not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
                return [tuple((s.clone() if fresh and s.is_inference() else s).to(like) for s in cell_states)
                        for cell_states in self.states]
            return [c.initial_state(batch, like.dtype, like.device) for c in cells]
        # One cell: a tensor or a list of tensors. Stacked cells: one such entry per cell.
        per_cell = [initial_state] if len(cells) == 1 else initial_state
        if torch.is_tensor(per_cell) or not isinstance(per_cell, (list, tuple)) or len(per_cell) != len(cells):
            got = f"a list of {len(per_cell)}" if isinstance(per_cell, (list, tuple)) else type_name(initial_state)
            raise fail(
                self.where, "initial_state", f"a list with one entry (a list of states) per stacked cell ({len(cells)})",
                got,
            )
        states = []
        for cell, given in zip(cells, per_cell):
            if not torch.is_tensor(given) and not isinstance(given, (list, tuple)):
                raise fail(self.where, "initial_state", "a tensor or a list of tensors", type_name(given))
            given = [given] if torch.is_tensor(given) else list(given)
            names = cell.state_names
            if len(given) != len(names):
                raise DroprnnError(
                    f"{self.where}: argument `initial_state` expected {len(names)} tensors "
                    f"[{', '.join(names)}] for {type(cell).__name__}, got {len(given)}."
                )
            for name, size, tensor in zip(names, cell.state_size, given):
                if torch.is_tensor(tensor) and tensor.device.type == "meta" and like.device.type != "meta":
                    raise fail(self.where, "initial_state", f"state {name} with values (on {like.device}, as the input)",
                               "a tensor on the meta device, which has none")
                if not torch.is_tensor(tensor) or tuple(tensor.shape) != (batch, size):
                    got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
                    raise DroprnnError(
                        f"{self.where}: argument `initial_state` expected state {name} of shape "
                        f"({batch}, {size}), got {got}."
                    )
            states.append(tuple(t.to(like) for t in given))
        return states

    # ------------------------------------------------------------------ call
    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        initial_state: Any = None,
        training: Optional[bool] = None,
        dropout_plan: Optional[DropoutPlan] = None,
    ) -> Union[Tensor, tuple[Tensor, ...]]:
        # validate
        if torch.jit.is_tracing():
            raise no_torchscript(self.where, "torch.jit.trace")
        cells = self.cells  # a new list per access: taken once
        kernel = cells[0].kernel
        x = float_input(self.where, x, None if kernel is None else kernel.dtype)
        if x.dim() != 3:
            raise fail(self.where, "inputs", "a tensor of shape (batch, time, features)", f"shape {tuple(x.shape)}")
        batch, steps, features = x.shape
        if steps == 0:
            raise fail(self.where, "inputs", "at least one timestep", f"shape {tuple(x.shape)}")
        if not all(c.built for c in cells):
            self.build_for_input(features, x)
        elif features != cells[0].input_size:
            raise fail(
                self.where, "inputs", f"{cells[0].input_size} features on the last axis (the size it was built with)",
                f"shape {tuple(x.shape)}",
            )
        step_mask, lengths = sequence_mask(self.where, mask, lengths, batch, steps, x.device)
        states = self._initial_states(initial_state, batch, x)
        # plan the dropout
        if dropout_plan is None:
            training = self.resolve_training(training)
            dropout_plan = draw_plan(cells, batch, features, training, x.dtype, x.device, steps)
        else:
            check_plan(self.where, dropout_plan, cells, batch, features, steps, x.device)
            if any(m.dtype != x.dtype for m in dropout_plan.masks()):  # every kernel then reads the same numbers
                dropout_plan = dropout_plan.to(x.dtype)
        self.last_dropout_plan = dropout_plan
        # run a kernel over time
        call = RecurrentCall(
            tuple(cells), tuple(cell.weights() for cell in cells), x, tuple(states), dropout_plan,
            step_mask, lengths, self.go_backwards, self.zero_output_for_mask, self.return_sequences, self.where,
        )
        (sequence, last, final_states), self.last_kernel = kernels.execute(self.impl, call)
        # shape the result
        if self.stateful:
            self.states = [tuple(s.detach() for s in cell_states) for cell_states in final_states]
        output = sequence if self.return_sequences else last
        if not self.return_state:
            return output
        if len(cells) == 1:
            return (output, *final_states[0])
        return (output, *final_states)


class _SingleCellRNN(RNN):
    """An RNN around one cell, with Keras's convenience properties."""

    @property
    def units(self) -> int:
        return self.cell.units

    @property
    def dropout(self) -> float:
        return self.cell.dropout

    @property
    def recurrent_dropout(self) -> float:
        return self.cell.recurrent_dropout


class LSTM(_SingleCellRNN):
    __doc__ = """Long short-term memory layer, Keras's ``LSTM``: step math and weights as :class:`~droprnn.LSTMCell`.

    Dropout as Keras 3: ``dropout`` multiplies the step input and ``recurrent_dropout`` multiplies h(t-1)
    where it enters the recurrent kernel (never c or the carried state); masks (B, features) are drawn
    once per call and reused at every timestep; with ``recurrent_dropout > 0`` each of the 4 gates gets
    its own input and state mask, otherwise one input mask serves all gates. Only in training.
""" + layer_doc("LSTM's g", ", zoneout_c (the cell state)") + """
    ``proj_size`` (from ``torch.nn.LSTM``, not Keras) projects h to that many features.

    Input (B, T, D) → output (B, T, H) with ``return_sequences`` else (B, H), H = proj_size or units;
    states h (B, H), c (B, units).
    """

    def __init__(
        self,
        units: int,
        activation: activations.ActivationLike = "tanh",
        recurrent_activation: activations.ActivationLike = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: initializers.InitializerLike = "glorot_uniform",
        recurrent_initializer: initializers.InitializerLike = "orthogonal",
        bias_initializer: initializers.InitializerLike = "zeros",
        unit_forget_bias: bool = True,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: Optional[int] = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        zero_output_for_mask: bool = False,
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        proj_size: int = 0,
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        impl: str = "auto",
    ) -> None:
        cell = LSTMCell(
            units, activation=activation, recurrent_activation=recurrent_activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, unit_forget_bias=unit_forget_bias, dropout=dropout,
            recurrent_dropout=recurrent_dropout, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, zoneout_c=zoneout_c, proj_size=proj_size,
            seed=seed, name=name or "lstm",
        )
        super().__init__(
            cell, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards,
            stateful=stateful, unroll=unroll, zero_output_for_mask=zero_output_for_mask, input_shape=input_shape,
            input_size=input_size, name=name, dtype=dtype, device=device, impl=impl,
        )


class GRU(_SingleCellRNN):
    __doc__ = """Gated recurrent unit layer, Keras's ``GRU``: step math and weights as :class:`~droprnn.GRUCell`
    (``reset_after=True`` by default, the cuDNN / ``torch.nn.GRU`` form; bias (2, 3·units)).

    Dropout as :class:`LSTM`, with 3 per-gate masks (z, r, h) when ``recurrent_dropout > 0``; the
    recurrent mask never touches the h(t-1) of the update ``z * h(t-1)``.
""" + layer_doc("the candidate ĥ") + """
    Input (B, T, D) → output (B, T, units) with ``return_sequences`` else (B, units); state h (B, units).
    """

    def __init__(
        self,
        units: int,
        activation: activations.ActivationLike = "tanh",
        recurrent_activation: activations.ActivationLike = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: initializers.InitializerLike = "glorot_uniform",
        recurrent_initializer: initializers.InitializerLike = "orthogonal",
        bias_initializer: initializers.InitializerLike = "zeros",
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: Optional[int] = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        reset_after: bool = True,
        zero_output_for_mask: bool = False,
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        zoneout_c: Optional[float] = None,
        impl: str = "auto",
    ) -> None:
        _no_cell_state(name or "gru", "GRU", zoneout_c)
        cell = GRUCell(
            units, activation=activation, recurrent_activation=recurrent_activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, dropout=dropout, recurrent_dropout=recurrent_dropout,
            reset_after=reset_after, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, seed=seed, name=name or "gru",
        )
        super().__init__(
            cell, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards,
            stateful=stateful, unroll=unroll, zero_output_for_mask=zero_output_for_mask, input_shape=input_shape,
            input_size=input_size, name=name, dtype=dtype, device=device, impl=impl,
        )


class SimpleRNN(_SingleCellRNN):
    __doc__ = """Fully connected recurrent layer, Keras's ``SimpleRNN`` (:class:`~droprnn.SimpleRNNCell`).

    One input mask and one state mask per call when the dropouts are on. The "update" modes do not apply
    (the whole state is the update).
""" + layer_doc("a cell update, which SimpleRNN does not have (it refuses them)") + """
    Input (B, T, D) → output (B, T, units) with ``return_sequences`` else (B, units); state h (B, units).
    """

    def __init__(
        self,
        units: int,
        activation: activations.ActivationLike = "tanh",
        use_bias: bool = True,
        kernel_initializer: initializers.InitializerLike = "glorot_uniform",
        recurrent_initializer: initializers.InitializerLike = "orthogonal",
        bias_initializer: initializers.InitializerLike = "zeros",
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: Optional[int] = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        zero_output_for_mask: bool = False,
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        zoneout_c: Optional[float] = None,
        impl: str = "auto",
    ) -> None:
        _no_cell_state(name or "simple_rnn", "SimpleRNN", zoneout_c)
        cell = SimpleRNNCell(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, seed=seed, name=name or "simple_rnn",
        )
        super().__init__(
            cell, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards,
            stateful=stateful, unroll=unroll, zero_output_for_mask=zero_output_for_mask, input_shape=input_shape,
            input_size=input_size, name=name, dtype=dtype, device=device, impl=impl,
        )


def _no_cell_state(name: str, kind: str, zoneout_c: Optional[float]) -> None:
    # Accepted only to explain itself: zoneout on a cell state is an LSTM notion.
    if zoneout_c is not None and zoneout_c != 0:
        raise DroprnnError(
            f"{kind} '{name}': argument `zoneout_c` applies to LSTM's cell state c; {kind} carries only h, "
            f"so use zoneout_h (got zoneout_c={zoneout_c!r})."
        )
