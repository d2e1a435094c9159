"""SimpleRNN on the GPU: the plan of ``lstm.py`` with one gate, h_t = φ((x ⊙ m_x) @ K + b + (h_{t-1} ⊙ m_h) @ R).

The oracle is :func:`droprnn.kernels.reference.run` with :meth:`droprnn.SimpleRNNCell.transition`::

    forward
        P       = (x ⊙ m_x) @ K + b                   all steps in one product
        for t in 0 … T-1:
            Z   = (h_{t-1} ⊙ m_h) @ R                  cuBLAS, into a fixed buffer
            kernel _forward_step: y = φ(P_t + Z), written over P_t (saved for the backward); h_t = y, zoned
                  (d ⊙ h_{t-1} + (1 - d) ⊙ y) and held where the step is masked; h_t ⊙ m_h of the next step
    backward (t = T-1 … 0)
        kernel _backward_step: dh = dH_t + carry + Q ⊙ m_h; dz = φ'(y) · (1 - d) dh; carry d · dh (all of dh
                  where the step was masked)
        Q       = dz_t @ Rᵀ
    after the loop: dR = Σ_t (h_{t-1} ⊙ m_h)ᵀ dz_t, dK, dx, db from dz in large products

SimpleRNN has one gate, so its masks are shared (m == 1): per sequence, per step, or counter-based per step;
DropConnect is folded into R before the loop. Precision as the other cells: h is carried in float32
(float64 for float64 tensors), sequences are kept in the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .loops import BackwardLoop, ForwardLoop, LoopKey, loop_key, outputs_and_saved, run_loop
from .noise import Noise
from ..products import input_grads, project, recurrent_kernel_grad
from .triton_helpers import (STREAM_ZONEOUT_H, activate, carry_state, compute_type, given, grid, incoming_grad,
                             next_step, program_units, step_is_real, store_product_inputs, through, zoneout_split)

Tensor = torch.Tensor

CELL = "simple"


# ---------------------------------------------------------------------------------------------- Triton
# Layouts: pre (B, T, U) the projections, overwritten by y; h (B, T + 1, U) (slot 0: h0); carry (B, U) in the
# compute dtype; product, masked_h, back, dz_step (B, U); masks (1, B, U) or (T, 1, B, U); dz (B, T, U).
@given(HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _forward_step(
    pre_ptr, product_ptr, h_ptr, carry_ptr, masked_h_ptr, masks_ptr, zone_ptr, seed_ptr, valid_ptr, t, B, U, T,
    N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One forward step for the units [BLOCK·j, BLOCK·(j+1)) of sequence b (program (b, j))."""
    b, u, inside = program_units(U, BLOCK)
    p = pre_ptr + (b * T + t) * U + u
    y = activate(tl.load(p, mask=inside).to(COMPUTE) + tl.load(product_ptr + b * U + u, mask=inside).to(COMPUTE),
                 ACT)
    tl.store(p, y.to(pre_ptr.dtype.element_ty), mask=inside)
    h_prev = tl.load(carry_ptr + b * U + u, mask=inside).to(COMPUTE)
    h = carry_state(y, h_prev, carry_ptr, h_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u, inside, B, T, U, ZONE_H,
                    ZONE_H_RATE, ZONE_H_THRESH, HAS_VALID, COMPUTE)
    store_product_inputs(masked_h_ptr, masks_ptr, seed_ptr, next_step(t, T), h, b, u, inside, B, U, N_MASKS, 1,
                         REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)


@given(HAS_VALID="valid_ptr", HAS_DHS="dhs_ptr")
@triton.jit(do_not_specialize=["t"])
def _backward_step(
    pre_ptr, valid_ptr, dhs_ptr, back_ptr, masks_ptr, zone_ptr, seed_ptr, dh_ptr, dz_ptr, dz_step_ptr, t, B, U, T,
    N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_DHS: tl.constexpr, ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One backward step: the gradient of the step's pre-activation (dz) and the carry to h_{t-1}, in place."""
    b, u, inside = program_units(U, BLOCK)
    dh = incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, next_step(t, T), b, t, u, inside, B, T, U,
                       HAS_DHS, N_MASKS, 1, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    y = tl.load(pre_ptr + (b * T + t) * U + u, mask=inside).to(COMPUTE)
    dh_fresh, dh_carry = zoneout_split(dh, zone_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, U, ZONE_H,
                                       ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    dz = through(dh_fresh, y, ACT)
    if HAS_VALID:  # a masked step held h: its gradient passes on, and the step gets none
        keep = step_is_real(valid_ptr, b, t, T)
        dz = tl.where(keep, dz, 0.0)
        dh_carry = tl.where(keep, dh_carry, dh)
    dtype = dz_ptr.dtype.element_ty
    tl.store(dz_ptr + (b * T + t) * U + u, dz.to(dtype), mask=inside)
    tl.store(dz_step_ptr + b * U + u, dz.to(dtype), mask=inside)
    tl.store(dh_ptr + b * U + u, dh_carry.to(dh_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------- time loops
def _zone_args(loop) -> dict:
    """The zoneout constexprs (SimpleRNN has no update mask)."""
    return {k: v for k, v in loop.noise_args(1).items() if k.startswith("ZONE")}


class _ForwardLoop(ForwardLoop):
    """The forward time loop: pre (B, T, U), filled with the projections by ``load`` and overwritten with y;
    carry (B, U) in the compute dtype; masked_h (1, B, U); product (B, U); R (U, U)."""

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U = key.batch, key.steps, key.units
        self.pre = self.new(B, T, U)
        self.carry = self.new_carry(B, U)
        self.masked_h = self.new(1, B, U)
        self.product = self.new(B, U)
        self.R = self.new(U, U) if static else None

    def load(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor], input_masks: Optional[Tensor], R: Tensor,
             h0: Tensor, rec, noise: Noise, valid: Optional[Tensor]) -> None:
        project(x, kernel, bias, input_masks, out=self.pre, gates=1)
        self.start(h0, rec)
        self.carry.copy_(h0)
        self.take_recurrent(R, R)
        self.take_noise(rec, noise)
        self.take("valid", valid)

    def run(self, steps: range) -> None:
        key = self.key
        programs, block = grid(key.batch, key.units)
        launch = _forward_step[programs]
        constants = dict(N_MASKS=key.n_masks, ACT=key.codes[0], COMPUTE=compute_type(key.dtype), BLOCK=block,
                         **self.rec_args(), **_zone_args(self))
        h_for_mm = self.masked_h[0]
        for t in steps:
            torch.mm(h_for_mm, self.R, out=self.product)
            launch(self.pre, self.product, self.h, self.carry, self.masked_h, self.rec, self.zone[0], self.seed,
                   self.valid, t, key.batch, key.units, key.steps, **constants)


class _BackwardLoop(BackwardLoop):
    """The backward time loop, from step T-1 down to 0: pre as the forward left it (y), back (1, B, U) the Q
    of the step after, dz (B, T, U), dz_step (B, U), R (U, U)."""

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U = key.batch, key.steps, key.units
        if static:
            self.pre = self.new(B, T, U)
            self.R = self.new(U, U)
        self.back = self.new(1, B, U)
        self.dz = self.new(B, T, U)
        self.dz_step = self.new(B, U)

    def load(self, pre: Tensor, valid: Optional[Tensor], d_hs: Optional[Tensor], rec, noise: Noise,
             R: Tensor) -> None:
        self.take("pre", pre)
        self.take("valid", valid)
        self.take("d_hs", d_hs)
        self.take_noise(rec, noise)
        self.take_recurrent(R, R)
        self.back.zero_()  # no step after the last
        self.dh.zero_()

    def run(self, steps: range) -> None:
        key = self.key
        programs, block = grid(key.batch, key.units)
        launch = _backward_step[programs]
        constants = dict(N_MASKS=key.n_masks, ACT=key.codes[0], COMPUTE=compute_type(key.dtype), BLOCK=block,
                         **self.rec_args(), **_zone_args(self))
        R_t, back_for_mm = self.R.t(), self.back[0]
        for t in steps:
            launch(self.pre, self.valid, self.d_hs, self.back, self.rec, self.zone[0], self.seed, self.dh, self.dz,
                   self.dz_step, t, key.batch, key.units, key.steps, **constants)
            torch.mm(self.dz_step, R_t, out=back_for_mm)


def _gradients(needs: tuple, loop: _BackwardLoop, x: Tensor, kernel: Tensor, bias: Optional[Tensor],
               h_buffer: Tensor, input_masks: Optional[Tensor], rec) -> tuple:
    """dx, dkernel, dbias, dR, dh0 (None where not needed) from a finished backward loop."""
    dz = loop.dz
    dh0 = dbias = dR = None
    if needs[4]:
        dh0 = loop.initial_state_grad(rec)
    if bias is not None and needs[2]:
        dbias = dz.sum(dim=(0, 1))
    if needs[3]:
        dR = recurrent_kernel_grad(h_buffer[:, :x.shape[1]], rec, dz)
    dx, dkernel = input_grads(x, kernel, input_masks, dz, needs[0], needs[1], 1)
    return dx, dkernel, dbias, dR, dh0


# ---------------------------------------------------------------------------------------------- entry points
def forward(x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor, h0: Tensor, input_masks: Optional[Tensor],
            rec, noise: Noise, valid: Optional[Tensor], codes: tuple, saving: bool,
            precision: Optional[str]) -> tuple[Tensor, tuple]:
    """One SimpleRNN cell over a whole sequence (``operator.gpu_layer``): x (B, T, D), kernel (D, U), bias (U,)
    or None, R (U, U) (DropConnect applied), h0 (B, U), the rest as ``lstm.forward``. Returns the h sequence
    (B, T + 1, U) with h0 in slot 0, and what the backward reads: pre (B, T, U) -- None when not saving."""
    key = loop_key(CELL, False, x, R.shape[1], input_masks, rec, valid, codes, noise=noise, precision=precision)
    return run_loop(_ForwardLoop, key, x, (x, kernel, bias, input_masks, R, h0, rec, noise, valid),
                    lambda loop: outputs_and_saved(loop, saving, ("pre",)))


def backward(needs: tuple, d_hs: Tensor, x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor,
             input_masks: Optional[Tensor], rec, noise: Noise, valid: Optional[Tensor], codes: tuple, h: Tensor,
             saved: tuple, precision: Optional[str]) -> tuple:
    """dx, dkernel, dbias, dR, dh0 (None where ``needs``, over x, kernel, bias, R, h0, says not)."""
    (pre,) = saved
    key = loop_key(CELL, True, x, R.shape[1], input_masks, rec, valid, codes, has_dhs=True, noise=noise,
                   precision=precision)

    def finish(loop: _BackwardLoop):  # dz is consumed here, before any other replay can overwrite it
        return _gradients(needs, loop, x, kernel, bias, h, input_masks, rec)

    return run_loop(_BackwardLoop, key, x, (pre, valid, d_hs, rec, noise, R), finish)
