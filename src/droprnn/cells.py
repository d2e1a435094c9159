"""Recurrent cells: Keras's parameters and one step of math. No time loop and no randomness here.

Symbols: B batch, T time, D input features, U units, k the number of gate blocks (LSTM 4, GRU 3,
SimpleRNN 1). Weights are Keras's, ``x @ W`` with W of shape (in, out):

=============  ============================  ===================  =======================================
cell           ``kernel``                    ``recurrent_kernel``  ``bias``
=============  ============================  ===================  =======================================
LSTMCell       (D, 4U) blocks [i | f | c | o]  (U, 4U)               (4U,)
GRUCell        (D, 3U) blocks [z | r | h]      (U, 3U)               (2, 3U) rows [input; recurrent] when
                                                                     ``reset_after`` (default), else (3U,)
SimpleRNNCell  (D, U)                        (U, U)                (U,)
=============  ============================  ===================  =======================================

A step is split in two so that a layer can project the inputs of all timesteps in one product:
``project_inputs(x, input_masks)`` (any leading shape) then ``step(projected_t, states, recurrent_masks)``.

Dropout masks are data passed in (see :mod:`droprnn.dropout.plan`): ``input_masks`` of shape (m, B, D) and
``recurrent_masks`` of shape (m, B, U), where m == 1 means one mask shared by every gate and m == k means
one mask per gate, gate g's block of columns seeing ``x * masks[g]``. Recurrent masks multiply only the
copies of h(t-1) fed to the recurrent kernel, never the carried state.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import activations, initializers
from .errors import DroprnnError, check_positive_int, check_rate, fail
from .random import SeedStream

Tensor = torch.Tensor
States = tuple[Tensor, ...]


def masked_matmul(x: Tensor, weight: Tensor, masks: Optional[Tensor], blocks: int) -> Tensor:
    """``x @ weight`` where the columns of block g see ``x * masks[g]`` (``masks[0]`` for all if m == 1).

    x: (B, D) or (B, T, D); weight: (D, blocks·U); masks: None or (m, B, D) with m in {1, blocks},
    broadcast over time when x has a time axis.
    """
    if masks is None:
        return x @ weight
    if x.dim() == 3:
        masks = masks.unsqueeze(2)
    if masks.shape[0] == 1:
        return (x * masks[0]) @ weight
    return torch.cat([(x * m) @ w for m, w in zip(masks, weight.chunk(blocks, dim=1))], dim=-1)


def _gate_mask(masks: Optional[Tensor], gate: int) -> Optional[Tensor]:
    if masks is None:
        return None
    return masks[gate if masks.shape[0] > 1 else 0]


class Cell(nn.Module):
    """Base of all cells: lazy parameters in Keras layout, dropout rates and a seed stream.

    A subclass sets ``gates`` and ``state_names``, implements :meth:`step` (and overrides ``bias_shape``,
    ``initial_bias`` or ``input_bias`` where its bias differs), and ends its ``__init__`` with
    ``self.build(input_size)`` when the input size is known. A layer calls ``project_inputs`` once for the
    whole sequence, then ``step`` at each timestep.
    """

    gates: int = 1
    state_names: tuple[str, ...] = ("h",)

    def __init__(
        self,
        units: int,
        *,
        activation: activations.ActivationLike = "tanh",
        use_bias: bool = True,
        kernel_initializer: initializers.InitializerLike = "glorot_uniform",
        recurrent_initializer: initializers.InitializerLike = "orthogonal",
        bias_initializer: initializers.InitializerLike = "zeros",
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        where = self.where
        self.units = check_positive_int(where, "units", units)
        self.activation = activations.get(activation, where, "activation")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer, where, "kernel_initializer")
        self.recurrent_initializer = initializers.get(recurrent_initializer, where, "recurrent_initializer")
        self.bias_initializer = initializers.get(bias_initializer, where, "bias_initializer")
        self.dropout = check_rate(where, "dropout", dropout, allow_one=False)
        self.recurrent_dropout = check_rate(where, "recurrent_dropout", recurrent_dropout, allow_one=False)
        self.seed_stream = SeedStream(seed, where)
        self.input_size: int | None = None
        self.register_parameter("kernel", None)
        self.register_parameter("recurrent_kernel", None)
        self.register_parameter("bias", None)

    # ---------------------------------------------------------------- description
    @property
    def where(self) -> str:
        """How errors name this cell: its class, and the layer's name when a layer made it."""
        name = self.__dict__.get("name")
        return type(self).__name__ + (f" of '{name}'" if name else "")

    @property
    def state_size(self) -> tuple[int, ...]:
        return (self.units,) * len(self.state_names)

    @property
    def output_size(self) -> int:
        return self.units

    @property
    def built(self) -> bool:
        return self.input_size is not None

    def extra_repr(self) -> str:
        parts = [f"units={self.units}", f"input_size={self.input_size}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.recurrent_dropout:
            parts.append(f"recurrent_dropout={self.recurrent_dropout}")
        return ", ".join(parts)

    # ---------------------------------------------------------------- parameters
    def build(self, input_size: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Create the parameters for inputs of ``input_size`` features (once; again only if it matches)."""
        input_size = check_positive_int(self.where, "input_size", input_size)
        if self.built:
            if input_size != self.input_size:
                raise fail(self.where, "input_size", f"{self.input_size} (the size it was built with)", repr(input_size))
            return
        self.input_size = input_size
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        k, u = self.gates, self.units
        self.kernel = nn.Parameter(torch.empty(input_size, k * u, **factory))
        self.recurrent_kernel = nn.Parameter(torch.empty(u, k * u, **factory))
        if self.use_bias:
            self.bias = nn.Parameter(torch.empty(self.bias_shape(), **factory))
        self.reset_parameters()

    def bias_shape(self) -> tuple[int, ...]:
        return (self.gates * self.units,)

    def reset_parameters(self) -> None:
        """Draw fresh weights with the cell's initializers (torch's global RNG unless they are seeded)."""
        if not self.built:
            return
        with torch.no_grad():
            for param, init in (
                (self.kernel, self.kernel_initializer),
                (self.recurrent_kernel, self.recurrent_initializer),
            ):
                param.copy_(init(param.shape, dtype=param.dtype, device=param.device))
            if self.bias is not None:
                self.bias.copy_(self.initial_bias())

    def initial_bias(self) -> Tensor:
        return self.bias_initializer(self.bias.shape, dtype=self.bias.dtype, device=self.bias.device)

    def keras_weights(self) -> list[nn.Parameter]:
        """Parameters in Keras's ``get_weights()`` order: kernel, recurrent_kernel, bias."""
        if not self.built:
            raise DroprnnError(
                f"{self.where}: weights do not exist yet; give `input_size=` / `input_shape=` or call the layer once."
            )
        return [p for p in (self.kernel, self.recurrent_kernel, self.bias) if p is not None]

    # ---------------------------------------------------------------- math
    def initial_state(self, batch: int, dtype: torch.dtype, device: Any) -> States:
        return tuple(torch.zeros(batch, size, dtype=dtype, device=device) for size in self.state_size)

    def input_bias(self) -> Optional[Tensor]:
        return self.bias

    def project_inputs(self, x: Tensor, input_masks: Optional[Tensor] = None) -> Tensor:
        """(B, [T,] D) -> (B, [T,] k·U): the input kernel applied to (masked) inputs, plus the input bias."""
        projected = masked_matmul(x, self.kernel, input_masks, self.gates)
        bias = self.input_bias()
        return projected if bias is None else projected + bias

    def step(self, projected: Tensor, states: States, recurrent_masks: Optional[Tensor] = None) -> tuple[Tensor, States]:
        """One timestep from the projected input (B, k·U) and the states; returns (output, new states)."""
        raise NotImplementedError

    def forward(self, inputs: Tensor, states: Sequence[Tensor], masks: Any = None) -> tuple[Tensor, States]:
        """One whole step, Keras's ``cell(inputs, states)``: (B, D) and the states -> (output, new states).

        ``masks`` is a :class:`droprnn.dropout.CellMasks` (or None for no dropout).
        """
        if not torch.is_tensor(inputs) or inputs.dim() != 2:
            got = f"shape {tuple(inputs.shape)}" if torch.is_tensor(inputs) else type(inputs).__name__
            raise fail(self.where, "inputs", "a tensor of shape (batch, features)", got)
        if not self.built:
            self.build(inputs.shape[-1], dtype=inputs.dtype, device=inputs.device)
        if inputs.shape[-1] != self.input_size:
            raise fail(self.where, "inputs", f"{self.input_size} features (the size it was built with)", f"shape {tuple(inputs.shape)}")
        states = [states] if torch.is_tensor(states) else list(states)
        expected = [(inputs.shape[0], size) for size in self.state_size]
        got = [tuple(s.shape) if torch.is_tensor(s) else type(s).__name__ for s in states]
        if got != expected:
            raise fail(self.where, "states", f"[{', '.join(self.state_names)}] of shapes {expected}", str(got))
        input_masks = None if masks is None else masks.input
        recurrent_masks = None if masks is None else masks.recurrent
        return self.step(self.project_inputs(inputs, input_masks), tuple(states), recurrent_masks)


class LSTMCell(Cell):
    """Keras's LSTM step (gate order i, f, c, o; the input mask of gate g is ``input_masks[g]``)::

        z          = (x ⊙ m_x^g) @ K_g + b_g + (h ⊙ m_h^g) @ R_g        for g in i, f, c, o
        i, f, o    = σ(z_i), σ(z_f), σ(z_o)
        c_t        = f * c_{t-1} + i * φ(z_c)                            (c_{t-1} is never masked)
        h_t        = o * φ(c_t)

    φ = ``activation`` (tanh), σ = ``recurrent_activation`` (sigmoid). With ``unit_forget_bias`` the
    forget block of the initial bias is exactly 1.0 and the other blocks use ``bias_initializer``.
    """

    gates = 4
    state_names = ("h", "c")

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
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, seed=seed, name=name,
        )
        self.recurrent_activation = activations.get(recurrent_activation, self.where, "recurrent_activation")
        self.unit_forget_bias = bool(unit_forget_bias)
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    def initial_bias(self) -> Tensor:
        if not self.unit_forget_bias:
            return super().initial_bias()
        u, factory = self.units, {"dtype": self.bias.dtype, "device": self.bias.device}
        return torch.cat([
            self.bias_initializer((u,), **factory),
            torch.ones(u, **factory),
            self.bias_initializer((2 * u,), **factory),
        ])

    def step(self, projected, states, recurrent_masks=None):
        h, c = states
        z = projected + masked_matmul(h, self.recurrent_kernel, recurrent_masks, 4)
        zi, zf, zc, zo = z.chunk(4, dim=-1)
        sigma, phi = self.recurrent_activation, self.activation
        c = sigma(zf) * c + sigma(zi) * phi(zc)
        h = sigma(zo) * phi(c)
        return h, (h, c)


class GRUCell(Cell):
    """Keras's GRU step (gate order z, r, h; z multiplies the old state, as in ``torch.nn.GRU``).

    ``reset_after=True`` (default, cuDNN convention), bias rows [input b; recurrent rb]::

        z  = σ(x_z + (h ⊙ m_h^z) @ R_z + rb_z)        x_g = (x ⊙ m_x^g) @ K_g + b_g
        r  = σ(x_r + (h ⊙ m_h^r) @ R_r + rb_r)
        ĥ  = φ(x_h + r * ((h ⊙ m_h^h) @ R_h + rb_h))   reset applied after the product
        h_t = z * h_{t-1} + (1 - z) * ĥ                  the unmasked h_{t-1}

    ``reset_after=False`` has no recurrent bias and ``ĥ = φ(x_h + (r * (h ⊙ m_h^h)) @ R_h)``.
    """

    gates = 3

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
        reset_after: bool = True,
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, seed=seed, name=name,
        )
        self.recurrent_activation = activations.get(recurrent_activation, self.where, "recurrent_activation")
        self.reset_after = bool(reset_after)
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    def bias_shape(self):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def input_bias(self):
        if self.bias is None or not self.reset_after:
            return self.bias
        return self.bias[0]

    def step(self, projected, states, recurrent_masks=None):
        (h,) = states
        u, sigma = self.units, self.recurrent_activation
        xz, xr, xh = projected.chunk(3, dim=-1)
        if self.reset_after:
            inner = masked_matmul(h, self.recurrent_kernel, recurrent_masks, 3)
            if self.bias is not None:
                inner = inner + self.bias[1]
            hz, hr, hh = inner.chunk(3, dim=-1)
            z, r = sigma(xz + hz), sigma(xr + hr)
            candidate = self.activation(xh + r * hh)
        else:
            zr_masks = None if recurrent_masks is None else recurrent_masks[:2]
            hz, hr = masked_matmul(h, self.recurrent_kernel[:, : 2 * u], zr_masks, 2).chunk(2, dim=-1)
            z, r = sigma(xz + hz), sigma(xr + hr)
            h_masked = h if recurrent_masks is None else h * _gate_mask(recurrent_masks, 2)
            candidate = self.activation(xh + (r * h_masked) @ self.recurrent_kernel[:, 2 * u :])
        h = z * h + (1 - z) * candidate
        return h, (h,)


class SimpleRNNCell(Cell):
    """Keras's SimpleRNN step: ``h_t = φ((x ⊙ m_x) @ K + b + (h_{t-1} ⊙ m_h) @ R)``; output = new state."""

    gates = 1

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
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, seed=seed, name=name,
        )
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    def step(self, projected, states, recurrent_masks=None):
        (h,) = states
        h = self.activation(projected + masked_matmul(h, self.recurrent_kernel, recurrent_masks, 1))
        return h, (h,)
