"""The time loops of every cell: their keys, buffers and the cache of captured loops.

A cell module (``lstm.py``, ``gru.py``, ``simple.py``) writes a forward and a backward :class:`Loop` subclass
-- its buffers, ``load`` (a call's inputs into them) and ``run`` (the per-step launches) -- and the
``forward`` and ``backward`` functions that call :func:`run_loop` (``operator.py`` registers them as
operators). The steps replay from a CUDA graph when one is captured for the
loop's key (``graphs.py``), else run eagerly; ``run_loop`` decides, and the ``finish`` callback it takes
copies out what outlives the call. One bounded cache holds the captured loops of all cells.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import graphs
from . import noise
from .noise import Noise, rec_modes
from .precision import matmul_settings, products_precision
from .triton_helpers import accumulator_dtype

Tensor = torch.Tensor
States = tuple[Tensor, ...]


class LoopKey(NamedTuple):
    """Everything a time loop's buffers and launches depend on. Calls with equal keys can replay one
    captured loop, so this is the key of :class:`graphs.GraphCache` (``D`` is absent: the input
    projection runs before the loop, outside the graph)."""

    cell: str  # which kernels and buffers: "lstm", "gru" (reset_after), "gru-reset-before"
    backward: bool
    device: torch.device
    dtype: torch.dtype
    batch: int
    steps: int
    units: int
    proj: int  # the LSTM's projection size (h has this many units), 0 without one
    gate_major: bool  # per-gate input masks: the gates are laid out (G, B, T, U)
    n_masks: int  # recurrent masks: 0, 1 (shared) or G (per gate: one product per gate)
    rec: tuple  # rec_modes(): how the recurrent masks come (per sequence, per step, counter-based)
    noise: tuple  # Noise.modes(): the update mask's and each state's zoneout constexprs
    has_valid: bool  # a step mask (B, T)
    has_dhs: bool  # backward: a gradient arrives for the h sequence (always False forward)
    has_recurrent_bias: bool  # the GRU's recurrent bias (reset_after), added in its step kernel
    codes: tuple  # (activation, recurrent_activation) codes, constexprs of the kernels
    matmul_settings: str  # a captured cuBLAS call keeps the precision settings of its capture
    stream: int  # the stream that orders the use of an entry's buffers: another stream gets its own entry
    precision: Optional[str] = None  # float32 products: the matmul precision run_loop sets (float32_precision)


def loop_key(cell: str, backward: bool, x: Tensor, units: int, input_masks: Optional[Tensor], rec: Any,
             valid: Optional[Tensor], codes: tuple, has_dhs: bool = False, has_recurrent_bias: bool = False,
             noise: Noise = Noise(), proj: int = 0, precision: Optional[str] = None) -> LoopKey:
    """The key of the forward (or backward) time loop of a call on x (B, T, D) with these masks;
    ``precision``: float32_precision(x), taken by the forward and kept for its backward."""
    batch, steps, _ = x.shape
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    gate_major = input_masks is not None and input_masks.shape[-3] > 1
    return LoopKey(cell, backward, x.device, x.dtype, batch, steps, units, proj, gate_major,
                   0 if rec is None else rec.shape[-3], rec_modes(rec), noise.modes(),
                   valid is not None, has_dhs, has_recurrent_bias, tuple(codes), matmul_settings(x.dtype, precision),
                   stream, precision)


class Loop:
    """Buffers of one time loop and its launches. A *static* loop (one that a CUDA graph replays) owns
    every buffer, and ``load`` copies a call's inputs into them; an eager loop takes the call's inputs as
    they are and allocates its working buffers only."""

    def __init__(self, key: LoopKey, static: bool):
        self.key, self.static, self.device = key, static, key.device
        self.per_gate = key.n_masks > 1  # one recurrent product per gate (bmm over panels)
        self.h_units = key.proj or key.units  # h's size: the projection's with one
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.lock = threading.Lock()

    def new(self, *shape: int) -> Tensor:
        """A buffer in the input dtype."""
        return self._allocate(shape, self.key.dtype)

    def new_carry(self, *shape: int) -> Tensor:
        """A buffer for a state carried from step to step, in the kernels' compute dtype."""
        return self._allocate(shape, accumulator_dtype(self.key.dtype))

    def _allocate(self, shape: tuple, dtype: torch.dtype) -> Tensor:
        # Static buffers start at zero: the warm-up before capture runs a step on them, on defined values.
        allocate = torch.zeros if self.static else torch.empty
        return allocate(shape, dtype=dtype, device=self.key.device)

    def take(self, name: str, value: Optional[Tensor]) -> None:
        """Input ``name`` of this call: copied into the static buffer, or taken as it is (contiguous)."""
        if value is None:
            return
        if self.static:
            getattr(self, name).copy_(value)
        else:
            setattr(self, name, value.contiguous())

    def take_recurrent(self, R: Tensor, panels: Tensor) -> None:
        """The recurrent kernel as the products take it: ``panels`` (G, U, U) with per-gate masks, else R
        (U, G·U) itself -- left as it is in an eager loop (a transposed view from droprnn.nn, say)."""
        if self.static:
            self.R.copy_(panels if self.per_gate else R)
        else:
            self.R = panels.contiguous() if self.per_gate else R

    def start(self, h0: Tensor, rec: Optional[Tensor]) -> None:
        """Slot 0 of the h sequence (B, T + 1, U), and the first step's product inputs h0 ⊙ m_k."""
        self.h[:, 0] = h0
        if rec is None:
            self.masked_h[0] = h0
        else:
            first = rec[0] if self.key.rec[0] else rec  # per step: step 0's masks
            torch.mul(h0, first[:self.masked_h.shape[0]], out=self.masked_h)

    def steps(self) -> range:
        raise NotImplementedError

    def run(self, steps: range) -> None:
        raise NotImplementedError

    def new_noise(self) -> None:
        """Static buffers for the call's recurrent masks, (m, B, U) or per step (T, m, B, U), its update mask
        and zoneout indicators, as the key says; None where absent or in an eager loop."""
        key, static = self.key, self.static
        B, T, U, H, m = key.batch, key.steps, key.units, self.h_units, key.n_masks
        (update, _, _), zones = key.noise
        rec_mode = key.rec[0]
        per_step = rec_mode == noise.REC_PER_STEP
        self.rec = (self.new(*((T, m, B, H) if per_step else (m, B, H)))
                    if static and m and rec_mode != noise.REC_COUNTER else None)
        self.upd = (self.new(*((B, U) if update == noise.UPDATE_PER_SEQUENCE else (T, B, U)))
                    if static and update in (noise.UPDATE_PER_SEQUENCE, noise.UPDATE_PER_STEP) else None)
        self.zone = [self.new(T, B, size) if static and mode == noise.ZONE_DRAWN else None
                     for (mode, _, _), size in zip(zones, (H, U))]
        counter = (rec_mode == noise.REC_COUNTER or update == noise.UPDATE_COUNTER
                   or any(mode == noise.ZONE_COUNTER for mode, _, _ in zones))
        self.seed = torch.zeros(2, dtype=torch.int64, device=key.device) if static and counter else None

    def take_noise(self, rec: Optional[Tensor], noise: "Noise") -> None:
        """The call's recurrent masks, update mask and zoneout indicators, or for counter-based masks their
        seed (see ``take``)."""
        if self.key.rec[0] < 2:
            self.take("rec", rec)
        if self.key.noise[0][0] < 3:
            self.take("upd", noise.update)
        self.take("seed", noise.seed)
        for k, z in enumerate(self.zone):
            z_in = noise.zone(k)
            if z_in is not None:
                if self.static:
                    z.copy_(z_in)
                else:
                    self.zone[k] = z_in.contiguous()

    def rec_args(self) -> dict:
        """The recurrent masks' constexprs of the step kernels (rec_modes)."""
        mode, thresh, scale = self.key.rec
        return dict(REC_MODE=mode, REC_THRESH=thresh, REC_SCALE=scale)

    def noise_args(self, states: int) -> dict:
        """The update and zoneout constexprs of the step kernels of a cell with ``states`` states (Noise.modes):
        UPDATE, UPD_THRESH, UPD_SCALE, ZONE_H, ZONE_H_RATE, ZONE_H_THRESH, and for the LSTM the ZONE_C ones."""
        (update, thresh, scale), zones = self.key.noise
        zones = tuple(zones) + ((0, 0.0, 0),) * (states - len(zones))
        args = dict(UPDATE=update, UPD_THRESH=thresh, UPD_SCALE=scale)
        for name, (mode, rate, zone_thresh) in zip(("H", "C")[:states], zones):
            args[f"ZONE_{name}"], args[f"ZONE_{name}_RATE"], args[f"ZONE_{name}_THRESH"] = mode, rate, zone_thresh
        return args


class ForwardLoop(Loop):
    """What every forward loop has: the h sequence (B, T + 1, U) (slot 0: h0), and in a static loop the
    recurrent masks, update mask and zoneout indicators (``new_noise``) and the step mask (B, T). The cell's class
    adds the rest."""

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T = key.batch, key.steps
        self.h = self.new(B, T + 1, self.h_units)
        self.new_noise()
        self.valid = self.new(B, T) if static and key.has_valid else None

    def steps(self) -> range:
        return range(self.key.steps)


class BackwardLoop(Loop):
    """What every backward loop has: dh (B, U), the gradient carried to the step before (compute dtype),
    and in a static loop the step mask (B, T), the output's gradient dH (B, T, U) and the masks
    (``new_noise``). The cell's class adds the rest."""

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, H = key.batch, key.steps, self.h_units
        self.dh = self.new_carry(B, H)
        self.valid = self.new(B, T) if static and key.has_valid else None
        self.d_hs = self.new(B, T, H) if static and key.has_dhs else None
        self.new_noise()

    def steps(self) -> range:
        return range(self.key.steps - 1, -1, -1)

    def initial_state_grad(self, rec: Optional[Tensor]) -> Tensor:
        """dh0 (B, U) in the input dtype, once the loop has run: the carry plus step 0's recurrent products
        through the masks (Σ_k Q_k ⊙ m_k over the products' masks). Never a view of the loop's buffers."""
        back = self.back
        if rec is not None and self.key.rec[0]:
            rec = rec[0]  # step 0's masks met h0
        total = self.dh + (back[0] if rec is None else (back * rec[:back.shape[0]]).sum(0))
        return total.to(self.key.dtype)


_GRAPHS = graphs.GraphCache()


def clear_graph_cache() -> None:
    """Free every captured loop and its buffers (they are rebuilt on demand)."""
    _GRAPHS.clear()


def _captured(loop_class: type, key: LoopKey) -> Loop:
    """A static loop for ``key``, its steps captured in a CUDA graph."""
    # Not inference tensors even when built inside torch.inference_mode(): later calls in training
    # write into them.
    with torch.inference_mode(False):
        loop = loop_class(key, static=True)
        steps = loop.steps()
        loop.graph = graphs.capture(key.device, loop=lambda: loop.run(steps), warm_up=lambda: loop.run(steps[:1]))
    return loop


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def outputs_and_saved(loop: ForwardLoop, saving: bool, names: tuple) -> tuple[Tensor, tuple]:
    """The h sequence (B, T + 1, U) of a finished forward loop (slot 0: h0), and its buffers ``names`` for
    the backward (None each when no backward may follow: ``saving``) -- as the call's own: a static loop's
    next replay overwrites its buffers, so what outlives the call is copied out."""
    saved = tuple(getattr(loop, name) for name in names) if saving else (None,) * len(names)
    if loop.static:
        return loop.h.clone(), tuple(None if t is None else t.clone() for t in saved)
    return loop.h, saved


def run_loop(loop_class: type, key: LoopKey, x: Tensor, inputs: tuple, finish: Callable[[Loop], Any]) -> Any:
    """Load ``inputs`` into a time loop, run all its steps, and return ``finish(loop)``.

    The steps are replayed from a captured loop when graphs can be used (graphs.unusable_reason) and the
    cache has one for ``key``; ``finish`` must then copy out whatever outlives the call, since the next
    replay overwrites the buffers (the entry's lock keeps another thread out until it has). Else they
    run eagerly, on buffers of this call's own. Everything runs under ``key.precision`` (products_precision).
    """
    with products_precision(key.precision):
        if graphs.unusable_reason(x) is None:
            with _current_device(key.device):  # capture and replay launch on the current device's streams
                entry = _GRAPHS.lookup(key, lambda: _captured(loop_class, key))
                if entry is not None:
                    with entry.lock:
                        entry.load(*inputs)
                        entry.graph.replay()
                        return finish(entry)
        loop = loop_class(key, static=False)
        loop.load(*inputs)
        loop.run(loop.steps())
        return finish(loop)
