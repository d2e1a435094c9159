"""A drop-in front for PyTorch users: ``droprnn.nn.LSTM`` / ``GRU`` / ``RNN`` with ``torch.nn``'s
signatures, return values, parameter names and state_dict layout (an ``nn.LSTM`` checkpoint loads
unchanged), plus recurrent dropout. Swapping one import adds it to an existing model::

    from droprnn import nn as dnn
    lstm = dnn.LSTM(128, 256, num_layers=2, batch_first=True, recurrent_dropout=0.25, input_dropout=0.25)
    lstm.load_state_dict(old_torch_lstm.state_dict())
    output, (h_n, c_n) = lstm(x)

Arguments as in ``torch.nn``: ``dropout`` keeps torch's meaning (a fresh element-wise mask on the outputs
of every layer but the last). Added, keyword-only (the dropout of each layer's cell, Keras's semantics):
``input_dropout`` (Keras's ``dropout``: the layer's input, one mask per sequence), ``recurrent_dropout``,
``recurrent_dropout_mode``, ``input_dropout_mode``, ``zoneout_h`` (and ``zoneout_c`` for LSTM), ``seed``,
and ``impl`` ("auto": droprnn's fused CPU kernel, or its Triton GPU kernel for CUDA tensors, when it
applies; see ``droprnn.explain``). With all the
dropouts 0 the modules compute what ``torch.nn`` computes.

Each layer and direction is one :class:`~droprnn.kernels.call.RecurrentCall`, run as the Keras-named layers
run theirs: torch's weights are viewed in Keras layout at each call (gate order, and the LSTM's and RNN's
two biases folded), so the same kernels and the same oracle serve both fronts.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch import nn as torch_nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .cells import Cell, CellWeights, GRUCell, LSTMCell, SimpleRNNCell
from .dropout.modes import cells_share_masks_over_batch
from .dropout.plan import draw_plan
from .errors import DroprnnError, check_positive_int, check_rate, checked, checked_rate, fail, no_torchscript, type_name
from .kernels import dispatch as kernels
from .kernels.call import RecurrentCall
from .kernels.dispatch import KernelChoice, check_impl
from .random import SeedStream, derived_seed, keep_mask

__all__ = ["GRU", "LSTM", "RNN"]


class _TorchStyleRNN(torch_nn.Module):
    """Shared machinery: torch-named parameters, input/state layouts, layers × directions."""

    gates = 1
    cell_options: tuple[str, ...] = ()  # keyword arguments for the cells beyond the shared ones
    dropout = checked_rate("dropout")  # between stacked layers; checked whenever set
    impl = checked("impl", lambda module, value: check_impl(module.where, value))
    # Training mode switches only dropout on (MC dropout may use it).
    training_switches_only_noise = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        seed: Optional[int] = None,
        impl: str = "auto",
        **cell_options: Any,
    ) -> None:
        super().__init__()
        where = self.where
        unknown = sorted(set(cell_options) - set(self.cell_options))
        if unknown:
            known = ("input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size, "
                     "device, dtype; keyword-only: input_dropout, recurrent_dropout, recurrent_dropout_mode, "
                     "input_dropout_mode, zoneout_h, seed, impl" + "".join(f", {o}" for o in self.cell_options))
            raise DroprnnError(f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))}; it takes {known}.")
        self.impl = impl
        self.last_kernel: Optional[KernelChoice] = None
        self.input_size = check_positive_int(where, "input_size", input_size)
        self.hidden_size = check_positive_int(where, "hidden_size", hidden_size)
        self.num_layers = check_positive_int(where, "num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = dropout
        if self.dropout and self.num_layers == 1:  # torch warns the same; droprnn adds where the masks are
            warnings.warn(f"{where}: `dropout` acts between stacked layers only, and num_layers=1 has none, so "
                          f"dropout={self.dropout} does nothing. For dropout inside the layer use input_dropout= "
                          "(its input) or recurrent_dropout= (h(t-1) entering the recurrent weights).", stacklevel=3)
        self.bidirectional = bool(bidirectional)
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise fail(where, "proj_size", "an int >= 0", repr(proj_size))
        if proj_size >= hidden_size:
            raise fail(where, "proj_size", f"fewer than hidden_size ({hidden_size})", repr(proj_size))
        self.proj_size = proj_size
        # Checked here so the message names this module's argument, not the cell's `dropout`.
        check_rate(where, "input_dropout", input_dropout, allow_one=False)
        self.seed = seed
        self.between_layers_stream = SeedStream(derived_seed(seed, 0x5EED), where)
        directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        factory = {"device": device, "dtype": dtype}
        # One math-only cell per layer and direction: dropout configuration and its own seed stream.
        self._cells: list[Cell] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"l{layer}" + ("_reverse" if direction else "")
                index = layer * directions + direction
                self._cells.append(self._make_cell(
                    dropout=input_dropout, recurrent_dropout=recurrent_dropout,
                    recurrent_dropout_mode=recurrent_dropout_mode, input_dropout_mode=input_dropout_mode,
                    zoneout_h=zoneout_h, seed=derived_seed(seed, index), name=f"{where} {suffix}", **cell_options,
                ))
                gate_rows = self.gates * hidden_size
                self.register_parameter(f"weight_ih_{suffix}", torch_nn.Parameter(torch.empty(gate_rows, layer_input, **factory)))
                self.register_parameter(f"weight_hh_{suffix}", torch_nn.Parameter(torch.empty(gate_rows, out_size, **factory)))
                if self.bias:
                    self.register_parameter(f"bias_ih_{suffix}", torch_nn.Parameter(torch.empty(gate_rows, **factory)))
                    self.register_parameter(f"bias_hh_{suffix}", torch_nn.Parameter(torch.empty(gate_rows, **factory)))
                if proj_size:
                    self.register_parameter(f"weight_hr_{suffix}", torch_nn.Parameter(torch.empty(proj_size, hidden_size, **factory)))
        # The shape of every parameter, checked at each call: a replaced one must not reach a kernel.
        self._shapes = {name: tuple(param.shape) for name, param in self.named_parameters()}
        self.reset_parameters()

    # ------------------------------------------------------------------ description
    @property
    def where(self) -> str:
        return f"droprnn.nn.{type(self).__name__}"

    def _make_cell(self, **options: Any) -> Cell:
        raise NotImplementedError

    @property
    def masks_shared_by_batch(self) -> bool:  # DropConnect masks the weights, once per call
        return cells_share_masks_over_batch(self._cells)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0, "bidirectional": False, "proj_size": 0}
        parts += [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        cell = self._cells[0]
        for name in ("dropout", "recurrent_dropout", "zoneout_h", "zoneout_c"):
            if getattr(cell, name, 0.0):
                parts.append(f"{'input_dropout' if name == 'dropout' else name}={getattr(cell, name)}")
        return ", ".join(parts)

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias from U(-1/√hidden_size, 1/√hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for weight in self.parameters():
                weight.uniform_(-bound, bound)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first
        raise no_torchscript(self.where, "torch.jit.script")

    def flatten_parameters(self) -> None:
        """Accepted for torch compatibility (cuDNN's weight packing); nothing to do here."""

    @property
    def all_weights(self) -> list[list[torch_nn.Parameter]]:
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else []) + (["weight_hr"] if self.proj_size else [])
        return [[getattr(self, f"{n}_{suffix}") for n in names] for suffix in self._suffixes()]

    def _suffixes(self) -> list[str]:
        directions = 2 if self.bidirectional else 1
        return [f"l{layer}" + ("_reverse" if d else "") for layer in range(self.num_layers) for d in range(directions)]

    # ------------------------------------------------------------------ weights in Keras layout
    def _gate_order(self, tensor: Tensor) -> Tensor:
        """Rows in torch's gate order → Keras's (identity except for GRU)."""
        return tensor

    def _check_shapes(self) -> None:
        for name, shape in self._shapes.items():
            param = getattr(self, name)
            if tuple(param.shape) != shape:
                raise DroprnnError(
                    f"{self.where}: parameter `{name}` expected shape {shape}, got {tuple(param.shape)}; was it "
                    "replaced? (load_state_dict checks the shapes it loads)"
                )

    def _keras_weights(self, suffix: str) -> CellWeights:
        w_ih, w_hh = getattr(self, f"weight_ih_{suffix}"), getattr(self, f"weight_hh_{suffix}")
        input_bias = recurrent_bias = None
        if self.bias:
            b_ih, b_hh = getattr(self, f"bias_ih_{suffix}"), getattr(self, f"bias_hh_{suffix}")
            input_bias, recurrent_bias = self._biases(self._gate_order(b_ih), self._gate_order(b_hh))
        projection = getattr(self, f"weight_hr_{suffix}").T if self.proj_size else None
        return CellWeights(
            self._gate_order(w_ih).T, self._gate_order(w_hh).T, input_bias, recurrent_bias, projection
        )

    def _biases(self, b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # Both biases add before the gates, so they fold into one input bias.
        return b_ih + b_hh, None

    # ------------------------------------------------------------------ call
    def _state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        directions = 2 if self.bidirectional else 1
        return [(self.num_layers * directions, batch, self.proj_size or self.hidden_size)]

    def _check_states(self, hx: Any, batch: int, unbatched: bool, like: Tensor) -> list[Tensor]:
        shapes = self._state_shapes(batch)
        names = ["h_0", "c_0"][: len(shapes)]
        if len(shapes) == 1:
            given = [hx] if torch.is_tensor(hx) else None
        else:
            given = list(hx) if isinstance(hx, (tuple, list)) and len(hx) == 2 else None
        if given is None:
            raise fail(self.where, "hx", "a tensor h_0" if len(shapes) == 1 else "a tuple (h_0, c_0)", type_name(hx))
        states = []
        for name, shape, tensor in zip(names, shapes, given):
            expected = shape[:1] + shape[2:] if unbatched else shape
            if not torch.is_tensor(tensor) or tuple(tensor.shape) != expected:
                got = f"shape {tuple(tensor.shape)}" if torch.is_tensor(tensor) else type_name(tensor)
                raise fail(self.where, "hx", f"{name} of shape {expected}", got)
            states.append((tensor.unsqueeze(1) if unbatched else tensor).to(like))
        return states

    def forward(self, input: Union[Tensor, PackedSequence], hx: Any = None):
        """As ``torch.nn``'s: input (T, B, D), (B, T, D) with ``batch_first``, (T, D) unbatched, or a
        ``PackedSequence``. Returns ``(output, h_n)`` (GRU, RNN) or ``(output, (h_n, c_n))`` (LSTM);
        output (T, B, directions·H_out) (batch first when asked), h_n (layers·directions, B, H_out)."""
        if torch.jit.is_tracing():
            raise no_torchscript(self.where, "torch.jit.trace")
        lengths = None
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)
            unbatched = False
        else:
            if not torch.is_tensor(input) or input.dim() not in (2, 3):
                got = f"shape {tuple(input.shape)}" if torch.is_tensor(input) else type_name(input)
                raise fail(self.where, "input", "a (T, B, D) tensor (B, T, D with batch_first; (T, D) unbatched) or a PackedSequence", got)
            unbatched = input.dim() == 2
            x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
        weight = self.weight_ih_l0
        if not x.is_floating_point() or x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        batch, steps, features = x.shape
        self._check_shapes()
        if features != self.input_size:
            raise fail(self.where, "input", f"{self.input_size} features on the last axis", f"shape {tuple(input.shape) if not packed else tuple(x.shape)}")
        if steps == 0:
            raise fail(self.where, "input", "at least one timestep", f"shape {tuple(x.shape)}")
        if hx is None:
            initial = [torch.zeros(shape, dtype=x.dtype, device=x.device) for shape in self._state_shapes(batch)]
        else:
            initial = self._check_states(hx, batch, unbatched, x)
        step_mask = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            step_mask = torch.arange(steps, device=x.device)[None, :] < lengths[:, None]

        directions = 2 if self.bidirectional else 1
        finals: list[tuple[Tensor, ...]] = []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                cell = self._cells[index]
                plan = draw_plan([cell], batch, layer_input.shape[-1], self.training, x.dtype, x.device, steps)
                call = RecurrentCall(
                    (cell,), (self._keras_weights(self._suffixes()[index]),), layer_input,
                    (tuple(s[index] for s in initial),), plan, step_mask, lengths, go_backwards=bool(direction),
                    zero_output_for_mask=True, return_sequences=True, where=self.where,
                )
                (sequence, _, final), self.last_kernel = kernels.execute(self.impl, call)
                outputs.append(sequence.flip(1) if direction else sequence)
                finals.append(final[0])
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                keep = keep_mask(tuple(layer_input.shape), self.dropout, self.between_layers_stream, x.device)
                layer_input = torch.where(keep, layer_input / (1 - self.dropout), torch.zeros((), dtype=x.dtype, device=x.device))

        output = layer_input
        state_out = [torch.stack([f[j] for f in finals]) for j in range(len(finals[0]))]
        if packed:
            output = _repack_like(input, output, lengths)
        elif unbatched:
            output = output.squeeze(0)
            state_out = [s.squeeze(1) for s in state_out]
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, self._pack_states(state_out)

    def _pack_states(self, states: list[Tensor]) -> Any:
        return states[0]


class LSTM(_TorchStyleRNN):
    """``torch.nn.LSTM`` with recurrent dropout (see the module docstring). Gate order i, f, g, o;
    ``proj_size`` supported. Returns ``output, (h_n, c_n)``."""

    gates = 4
    cell_options = ("zoneout_c",)

    def __init__(self, *args: Any, zoneout_c: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, zoneout_c=zoneout_c, **kwargs)

    def _make_cell(self, **options: Any) -> Cell:
        return LSTMCell(self.hidden_size, proj_size=self.proj_size, **options)

    def _state_shapes(self, batch):
        directions = 2 if self.bidirectional else 1
        return super()._state_shapes(batch) + [(self.num_layers * directions, batch, self.hidden_size)]

    def _pack_states(self, states):
        return tuple(states)


class GRU(_TorchStyleRNN):
    """``torch.nn.GRU`` with recurrent dropout (see the module docstring). torch's gate order r, z, n
    is Keras's z, r, h with ``reset_after=True``; the two biases stay separate (the reset gate scales the
    recurrent one). Returns ``output, h_n``."""

    gates = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _lstm_only("droprnn.nn.GRU", args, kwargs)
        super().__init__(*args, **kwargs)

    def _make_cell(self, **options: Any) -> Cell:
        return GRUCell(self.hidden_size, reset_after=True, **options)

    def _gate_order(self, tensor: Tensor) -> Tensor:
        r, z, n = tensor.chunk(3, dim=0)
        return torch.cat([z, r, n], dim=0)

    def _biases(self, b_ih, b_hh):
        return b_ih, b_hh


class RNN(_TorchStyleRNN):
    """``torch.nn.RNN`` (``nonlinearity`` "tanh" or "relu") with recurrent dropout. Returns ``output, h_n``.
    The "update" dropout modes do not apply (the whole state is the update)."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh", *args: Any,
        **kwargs: Any,
    ) -> None:
        # torch.nn.RNN's fourth positional argument is `nonlinearity`, before `bias`.
        if nonlinearity not in ("tanh", "relu"):
            raise fail("droprnn.nn.RNN", "nonlinearity", "'tanh' or 'relu'", repr(nonlinearity))
        _lstm_only("droprnn.nn.RNN", (input_size, hidden_size, num_layers) + args, kwargs)
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, *args, **kwargs)

    def _make_cell(self, **options: Any) -> Cell:
        return SimpleRNNCell(self.hidden_size, activation=self.nonlinearity, **options)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.nonlinearity == "tanh" else f"{text}, nonlinearity={self.nonlinearity!r}"


def _repack_like(packed: PackedSequence, padded: Tensor, lengths: Tensor) -> PackedSequence:
    """Pack ``padded`` (B, T, F), in the caller's batch order, exactly as ``packed`` was packed: same
    batch sizes and indices, so ``output.data`` lines up row for row with the input's."""
    order = packed.sorted_indices
    if order is not None:
        padded, lengths = padded.index_select(0, order), lengths.index_select(0, order.to(lengths.device))
    data = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def _lstm_only(where: str, args: tuple, kwargs: dict) -> None:
    if len(args) > 7 or kwargs.get("proj_size"):
        raise DroprnnError(f"{where}: argument `proj_size` exists only for LSTM (as in torch.nn).")
    if kwargs.get("zoneout_c"):
        raise DroprnnError(
            f"{where}: argument `zoneout_c` applies to LSTM's cell state c; this cell carries only h, so use zoneout_h."
        )
    kwargs.pop("zoneout_c", None)
