"""Recurrent cells: Keras's parameters, dropout configuration and one step of math. No time loop and no
randomness here: masks come in as data (:mod:`droprnn.dropout.plan`), weights as arguments.

Symbols: B batch, T time, D input features, U units, H = U (or ``proj_size`` for a projected LSTM),
k gate blocks (LSTM 4, GRU 3, SimpleRNN 1). Weights are Keras's, ``x @ W`` with W of shape (in, out):

=============  ==============================  ====================  =====================================
cell           ``kernel``                      ``recurrent_kernel``  ``bias``
=============  ==============================  ====================  =====================================
LSTMCell       (D, 4U) blocks [i | f | c | o]  (H, 4U)               (4U,)
GRUCell        (D, 3U) blocks [z | r | h]      (U, 3U)               (2, 3U) rows [input; recurrent] when
                                                                     ``reset_after`` (default), else (3U,)
SimpleRNNCell  (D, U)                          (U, U)                (U,)
=============  ==============================  ====================  =====================================

A step is split in two so that a layer can project the inputs of all timesteps in one product:
``project_inputs(x, weights, input_masks)`` (any leading shape), then ``step(projected_t, states, weights,
step_masks)``. ``weights`` is a :class:`CellWeights` in Keras layout: ``cell.weights()`` for the cell's own
parameters, or converted ones (``droprnn.nn`` keeps torch's layout and converts).

Masks multiply where the docstrings of each cell mark them: input masks ``m_x`` (m, B, D) and recurrent
masks ``m_h`` (m, B, H), with m == 1 one mask shared by every gate and m == k one per gate (gate g's
block of columns sees ``x * masks[g]``); an update mask ``m_u`` (B, U) on LSTM's g / GRU's candidate;
zoneout on the carried states. Recurrent masks touch only the copies of h(t-1) fed to the recurrent
kernel, never the carried state.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import activations, initializers
from .dropout.modes import INPUT_MODES, RECURRENT_MODES, UPDATE_MODES, check_mode
from .dropout.plan import StepMasks
from .errors import DroprnnError, check_positive_int, checked, checked_rate, fail
from .random import SeedStream

Tensor = torch.Tensor
States = tuple[Tensor, ...]

_FROZEN = "a zoneout rate of 1 freezes the state at its initial value"


class CellWeights(NamedTuple):
    """A cell's weights in Keras layout, as the step math reads them."""

    kernel: Tensor  # (D, kU)
    recurrent_kernel: Tensor  # (H, kU)
    input_bias: Optional[Tensor] = None  # (kU,)
    recurrent_bias: Optional[Tensor] = None  # (kU,): GRU with reset_after only
    projection: Optional[Tensor] = None  # (U, H): LSTM with proj_size only
    # (k, H, U): recurrent_kernel cut per gate, each block contiguous -- set once per call by a time loop
    # whose recurrent masks are per gate (:func:`with_gate_kernels`), so that no step rearranges the kernel
    recurrent_gates: Optional[Tensor] = None


def masked_matmul(x: Tensor, weight: Tensor, masks: Optional[Tensor], blocks: int) -> Tensor:
    """``x @ weight`` where the columns of block g see ``x * masks[g]`` (``masks[0]`` for all if m == 1).

    x: (B, D) or (B, T, D); weight: (D, blocks·U); masks: None, (m, B, D) with m in {1, blocks} (broadcast
    over time when x has a time axis), or (T, m, B, D) — one mask per timestep — when x is (B, T, D).
    """
    if masks is None:
        return x @ weight
    if x.dim() == 3:
        masks = masks.permute(1, 2, 0, 3) if masks.dim() == 4 else masks.unsqueeze(2)
    if masks.shape[0] == 1:
        return (x * masks[0]) @ weight
    equation = "gbtd,dgu->btgu" if x.dim() == 3 else "gbd,dgu->bgu"
    return torch.einsum(equation, x * masks, weight.unflatten(1, (blocks, -1))).flatten(-2)


def gate_products(x: Tensor, weight: Tensor, masks: Optional[Tensor], blocks: int,
                  per_gate: Optional[Tensor] = None, add: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """A step's products, one (B, U) tensor per gate block: ``add_g + (x * masks[g]) @ weight_g``.

    x: (B, D); weight: (D, blocks·U); masks as :func:`masked_matmul`'s for a (B, D) x; per_gate: ``weight``
    as contiguous (blocks, D, U) blocks (:func:`with_gate_kernels`), or None; add: None, (B, blocks·U) or
    (blocks·U,), added inside the product. Per-gate masks take one product per gate, each threaded, and
    hand the gates on unjoined: a batched product over the gates (``bmm``) was faster at small shapes but
    1.6x slower per step at (128, 50, 256, 512) for the GRU, whose 3 gates split unevenly over 2 threads
    (measured 2026-12-03, Intel Xeon, 2 threads).
    """
    if masks is None or masks.shape[0] == 1:
        x = x if masks is None else x * masks[0]
        product = x @ weight if add is None else torch.addmm(add, x, weight)
        return product.chunk(blocks, dim=-1)
    if per_gate is None:
        per_gate = weight.unflatten(1, (blocks, -1)).transpose(0, 1)  # (blocks, D, U), a view
    adds = [None] * blocks if add is None else add.unflatten(-1, (blocks, -1)).unbind(-2)
    return tuple(x * m @ w if a is None else torch.addmm(a, x * m, w) for m, w, a in zip(masks, per_gate, adds))


def with_gate_kernels(weights: CellWeights, blocks: int, recurrent_masks: Optional[Tensor]) -> CellWeights:
    """``weights`` with :attr:`CellWeights.recurrent_gates` set when ``recurrent_masks`` are per gate: a time
    loop calls this once, and its steps' per-gate products read contiguous blocks rather than strided views
    of the kernel (measured: the GRU's reference loop 6% faster at (128, 50, 256, 512))."""
    if recurrent_masks is None or recurrent_masks.shape[-3] == 1 or weights.recurrent_gates is not None:
        return weights
    R = weights.recurrent_kernel
    return weights._replace(recurrent_gates=R.unflatten(1, (blocks, -1)).transpose(0, 1).contiguous())


def _gate_mask(masks: Optional[Tensor], gate: int) -> Optional[Tensor]:
    if masks is None:
        return None
    return masks[gate if masks.shape[0] > 1 else 0]


def _recurrent_mode(cell: "Cell", value: Any) -> str:
    mode = check_mode(cell.where, "recurrent_dropout_mode", value, RECURRENT_MODES)
    if mode in UPDATE_MODES and not cell.has_update:
        raise DroprnnError(
            f"{cell.where}: argument `recurrent_dropout_mode` {mode!r} masks a cell update (LSTM's g, GRU's "
            f"candidate), which {type(cell).__name__} does not have: its whole state is the update, so masking "
            "it erases memory. Use 'keras', 'tied', 'per_step' or a 'weights' mode."
        )
    return mode


class Cell(nn.Module):
    """Base of all cells: lazy parameters in Keras layout, dropout configuration and a seed stream.

    Dropout configuration (the plan reads it; the cell itself never draws):
        dropout, recurrent_dropout: Keras's rates, in [0, 1).
        recurrent_dropout_mode: how ``recurrent_dropout`` acts; one of
            :data:`droprnn.dropout.modes.RECURRENT_MODES` ("keras" by default).
        input_dropout_mode: how ``dropout`` acts; one of :data:`~droprnn.dropout.modes.INPUT_MODES`.
        zoneout_h (and LSTM's zoneout_c): the probability that a unit keeps its previous value at a step
            (Krueger et al. 2016); in inference the expectation is used.

    A subclass sets ``gates`` and ``state_names``, implements :meth:`transition` (and overrides
    ``bias_shape``, ``initial_bias`` or ``weights`` where its parameters differ), and ends its
    ``__init__`` with ``self.build(input_size)`` when the input size is known. The output of a step is
    the first state.
    """

    gates: int = 1
    state_names: tuple[str, ...] = ("h",)
    has_update: bool = True  # whether the step has a cell update that "update" dropout can mask
    # Checked whenever set, here or later (the plan reads them at every call).
    dropout = checked_rate("dropout")
    recurrent_dropout = checked_rate("recurrent_dropout")
    zoneout_h = checked_rate("zoneout_h", one_means=_FROZEN)
    input_dropout_mode = checked(
        "input_dropout_mode", lambda cell, value: check_mode(cell.where, "input_dropout_mode", value, INPUT_MODES))
    recurrent_dropout_mode = checked("recurrent_dropout_mode", _recurrent_mode)

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
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
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
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        self.recurrent_dropout_mode = recurrent_dropout_mode
        self.input_dropout_mode = input_dropout_mode
        self.zoneout_h = zoneout_h
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
        return self.state_size[0]

    @property
    def zoneout_rates(self) -> tuple[float, ...]:
        """Per state, the zoneout probability (0 for none)."""
        return (self.zoneout_h,) + (0.0,) * (len(self.state_names) - 1)

    @property
    def built(self) -> bool:
        return self.input_size is not None

    def extra_repr(self) -> str:
        parts = [f"units={self.units}", f"input_size={self.input_size}"]
        for name in ("dropout", "recurrent_dropout", "zoneout_h", "zoneout_c"):
            if getattr(self, name, 0.0):
                parts.append(f"{name}={getattr(self, name)}")
        if self.recurrent_dropout_mode != "keras":
            parts.append(f"recurrent_dropout_mode={self.recurrent_dropout_mode!r}")
        if self.input_dropout_mode != "keras":
            parts.append(f"input_dropout_mode={self.input_dropout_mode!r}")
        return ", ".join(parts)

    # ---------------------------------------------------------------- parameters
    def build(self, input_size: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Create the parameters for inputs of ``input_size`` features (once; again only if it matches)."""
        input_size = check_positive_int(self.where, "input_size", input_size)
        if self.built:
            if input_size != self.input_size:
                raise fail(self.where, "input_size", f"{self.input_size} (the size it was built with)", repr(input_size))
            return
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        k, u = self.gates, self.units
        try:
            kernel = torch.empty(input_size, k * u, **factory)
            recurrent = torch.empty(self.state_size[0], k * u, **factory)
            bias = torch.empty(self.bias_shape(), **factory) if self.use_bias else None
        except (RuntimeError, MemoryError) as error:  # torch's allocator: "can't allocate memory", overflow
            size = (input_size + self.state_size[0]) * k * u * torch.empty((), dtype=factory["dtype"]).element_size()
            raise DroprnnError(
                f"{self.where}: its weights for units={u} and {input_size} input features need {size / 2**30:.1f} GiB, "
                f"which could not be allocated ({str(error).splitlines()[0]}); use fewer units."
            ) from None
        self.input_size = input_size
        self.kernel = nn.Parameter(kernel)
        self.recurrent_kernel = nn.Parameter(recurrent)
        if bias is not None:
            self.bias = nn.Parameter(bias)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading weights into a cell that has none yet builds it from them (the input size is the kernel's
        # first axis), instead of loading nothing: load_state_dict would otherwise find no parameters to fill.
        kernel = state_dict.get(prefix + "kernel")
        if not self.built and torch.is_tensor(kernel) and kernel.dim() == 2:
            self.build(kernel.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        self._require_built()
        return [p for p in (self.kernel, self.recurrent_kernel, self.bias) if p is not None]

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each parameter, by name, as the step math reads them."""
        width = self.gates * self.units
        return {"kernel": (self.input_size, width), "recurrent_kernel": (self.state_size[0], width),
                "bias": self.bias_shape()}

    def _require_built(self) -> None:
        if not self.built:
            raise DroprnnError(
                f"{self.where}: weights do not exist yet; give `input_size=` / `input_shape=` or call the layer once."
            )
        # A parameter replaced by one of another shape would otherwise reach the kernels.
        for name, shape in self.parameter_shapes().items():
            param = getattr(self, name)
            if param is not None and tuple(param.shape) != shape:
                raise DroprnnError(
                    f"{self.where}: parameter `{name}` expected shape {shape}, got {tuple(param.shape)}; was it "
                    "replaced? (load weights with set_weights() or load_state_dict(), which check them)"
                )

    def weights(self) -> CellWeights:
        """The cell's own parameters as the step math reads them."""
        self._require_built()
        return CellWeights(self.kernel, self.recurrent_kernel, self.bias)

    # ---------------------------------------------------------------- math
    def initial_state(self, batch: int, dtype: torch.dtype, device: Any) -> States:
        return tuple(torch.zeros(batch, size, dtype=dtype, device=device) for size in self.state_size)

    def project_inputs(self, x: Tensor, weights: CellWeights, input_masks: Optional[Tensor] = None) -> Tensor:
        """(B, [T,] D) -> (B, [T,] k·U): the input kernel applied to (masked) inputs, plus the input bias."""
        projected = masked_matmul(x, weights.kernel, input_masks, self.gates)
        return projected if weights.input_bias is None else projected + weights.input_bias

    def transition(
        self, projected: Tensor, states: States, weights: CellWeights, masks: StepMasks
    ) -> States:
        """The cell's own math: new states from the projected input (B, k·U) and the states."""
        raise NotImplementedError

    def step(
        self, projected: Tensor, states: States, weights: CellWeights, masks: Optional[StepMasks] = None
    ) -> tuple[Tensor, States]:
        """One timestep: :meth:`transition`, then zoneout. Returns (output, new states)."""
        masks = masks or StepMasks()
        new = self.transition(projected, states, weights, masks)
        if masks.zoneout is not None:
            # Zoneout: each unit keeps its previous value with indicator d (its expectation in inference).
            new = tuple(
                fresh if d is None else d * old + (1 - d) * fresh for fresh, old, d in zip(new, states, masks.zoneout)
            )
        return new[0], new

    def forward(self, inputs: Tensor, states: Sequence[Tensor], masks: Any = None) -> tuple[Tensor, States]:
        """One whole step, Keras's ``cell(inputs, states)``: (B, D) and the states -> (output, new states).

        ``masks`` is a :class:`droprnn.dropout.plan.CellMasks` for one sequence step (or None).
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
        weights = self.weights() if masks is None else masks.weights_for(self.weights())
        step_masks = None if masks is None else masks.at(0)
        input_masks = None if masks is None else masks.input_at(0)
        return self.step(self.project_inputs(inputs, weights, input_masks), tuple(states), weights, step_masks)


class LSTMCell(Cell):
    """Keras's LSTM step (gate order i, f, c, o)::

        z          = (x ⊙ m_x^g) @ K_g + b_g + (h ⊙ m_h^g) @ R_g        for g in i, f, c, o
        i, f, o    = σ(z_i), σ(z_f), σ(z_o)
        c_t        = f * c_{t-1} + i * (φ(z_c) ⊙ m_u)                    (c_{t-1} is never masked)
        h_t        = o * φ(c_t)                    (with proj_size: h_t = (o * φ(c_t)) @ P)

    φ = ``activation`` (tanh), σ = ``recurrent_activation`` (sigmoid). With ``unit_forget_bias`` the
    forget block of the initial bias is exactly 1.0 and the other blocks use ``bias_initializer``.
    ``proj_size`` (not in Keras; ``torch.nn.LSTM``'s) adds the projection P (U, proj_size): h and the
    output have ``proj_size`` features. ``zoneout_c`` zones the cell state c as ``zoneout_h`` zones h.
    """

    gates = 4
    state_names = ("h", "c")
    zoneout_c = checked_rate("zoneout_c", one_means=_FROZEN)

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
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        proj_size: int = 0,
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, seed=seed, name=name,
        )
        self.recurrent_activation = activations.get(recurrent_activation, self.where, "recurrent_activation")
        self.unit_forget_bias = bool(unit_forget_bias)
        self.zoneout_c = zoneout_c
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or not 0 <= proj_size:
            raise fail(self.where, "proj_size", "an int >= 0 (0: no projection)", repr(proj_size))
        if proj_size >= self.units:
            raise fail(self.where, "proj_size", f"fewer than units ({self.units}) features", repr(proj_size))
        self.proj_size = proj_size
        self.register_parameter("projection", None)
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    @property
    def state_size(self) -> tuple[int, ...]:
        return (self.proj_size or self.units, self.units)

    @property
    def zoneout_rates(self) -> tuple[float, ...]:
        return (self.zoneout_h, self.zoneout_c)

    def build(self, input_size: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        was_built = self.built
        super().build(input_size, dtype=dtype, device=device)
        if self.proj_size and not was_built:
            self.projection = nn.Parameter(torch.empty(self.units, self.proj_size, dtype=self.kernel.dtype, device=self.kernel.device))
            with torch.no_grad():
                self.projection.copy_(self.kernel_initializer(self.projection.shape, self.kernel.dtype, self.kernel.device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.built and self.projection is not None:
            with torch.no_grad():
                self.projection.copy_(self.kernel_initializer(self.projection.shape, self.kernel.dtype, self.kernel.device))

    def keras_weights(self) -> list[nn.Parameter]:
        return super().keras_weights() + ([self.projection] if self.projection is not None else [])

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().parameter_shapes()
        return {**shapes, "projection": (self.units, self.proj_size)} if self.proj_size else shapes

    def weights(self) -> CellWeights:
        self._require_built()
        return CellWeights(self.kernel, self.recurrent_kernel, self.bias, projection=self.projection)

    def initial_bias(self) -> Tensor:
        if not self.unit_forget_bias:
            return super().initial_bias()
        u, factory = self.units, {"dtype": self.bias.dtype, "device": self.bias.device}
        return torch.cat([
            self.bias_initializer((u,), **factory),
            torch.ones(u, **factory),
            self.bias_initializer((2 * u,), **factory),
        ])

    def transition(self, projected, states, weights, masks):
        h, c = states
        zi, zf, zc, zo = gate_products(h, weights.recurrent_kernel, masks.recurrent, 4, weights.recurrent_gates,
                                       add=projected)
        sigma, phi = self.recurrent_activation, self.activation
        update = phi(zc) if masks.update is None else phi(zc) * masks.update
        c = sigma(zf) * c + sigma(zi) * update
        h = sigma(zo) * phi(c)
        if weights.projection is not None:
            h = h @ weights.projection
        return h, c


class GRUCell(Cell):
    """Keras's GRU step (gate order z, r, h; z multiplies the old state, as in ``torch.nn.GRU``).

    ``reset_after=True`` (default, cuDNN convention), bias rows [input b; recurrent rb]::

        z  = σ(x_z + (h ⊙ m_h^z) @ R_z + rb_z)        x_g = (x ⊙ m_x^g) @ K_g + b_g
        r  = σ(x_r + (h ⊙ m_h^r) @ R_r + rb_r)
        ĥ  = φ(x_h + r * ((h ⊙ m_h^h) @ R_h + rb_h))   reset applied after the product
        h_t = z * h_{t-1} + (1 - z) * (ĥ ⊙ m_u)          the unmasked h_{t-1}

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
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, seed=seed, name=name,
        )
        self.recurrent_activation = activations.get(recurrent_activation, self.where, "recurrent_activation")
        self.reset_after = bool(reset_after)
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    def bias_shape(self):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def weights(self) -> CellWeights:
        self._require_built()
        if self.bias is None or not self.reset_after:
            return CellWeights(self.kernel, self.recurrent_kernel, self.bias)
        return CellWeights(self.kernel, self.recurrent_kernel, self.bias[0], self.bias[1])

    def transition(self, projected, states, weights, masks):
        (h,) = states
        u, sigma, R = self.units, self.recurrent_activation, weights.recurrent_kernel
        xz, xr, xh = projected.chunk(3, dim=-1)
        gates = weights.recurrent_gates
        if self.reset_after:
            hz, hr, hh = gate_products(h, R, masks.recurrent, 3, gates, add=weights.recurrent_bias)
            z, r = sigma(xz + hz), sigma(xr + hr)
            candidate = self.activation(xh + r * hh)
        else:
            zr_masks = None if masks.recurrent is None else masks.recurrent[:2]
            hz, hr = gate_products(h, R[:, : 2 * u], zr_masks, 2, None if gates is None else gates[:2])
            z, r = sigma(xz + hz), sigma(xr + hr)
            h_masked = h if masks.recurrent is None else h * _gate_mask(masks.recurrent, 2)
            candidate = self.activation(torch.addmm(xh, r * h_masked, R[:, 2 * u :] if gates is None else gates[2]))
        if masks.update is not None:
            candidate = candidate * masks.update
        return (z * h + (1 - z) * candidate,)


class SimpleRNNCell(Cell):
    """Keras's SimpleRNN step: ``h_t = φ((x ⊙ m_x) @ K + b + (h_{t-1} ⊙ m_h) @ R)``; output = new state."""

    gates = 1
    has_update = False

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
        recurrent_dropout_mode: str = "keras",
        input_dropout_mode: str = "keras",
        zoneout_h: float = 0.0,
        seed: int | None = None,
        input_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            units, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer, dropout=dropout,
            recurrent_dropout=recurrent_dropout, recurrent_dropout_mode=recurrent_dropout_mode,
            input_dropout_mode=input_dropout_mode, zoneout_h=zoneout_h, seed=seed, name=name,
        )
        if input_size is not None:
            self.build(input_size, dtype=dtype, device=device)

    def transition(self, projected, states, weights, masks):
        (h,) = states
        (product,) = gate_products(h, weights.recurrent_kernel, masks.recurrent, 1, add=projected)
        return (self.activation(product),)
