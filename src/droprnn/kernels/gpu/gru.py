"""GRU on the GPU, both ``reset_after`` forms: cuBLAS products through torch, Triton kernels for the rest.

The plan of ``lstm.py`` (its docstring explains the design, the CUDA graphs and the measured speed); the
oracle is :func:`droprnn.kernels.reference.run` with :meth:`droprnn.GRUCell.transition`. Keras's gate
order z, r, h; m_g the recurrent masks (one per gate, one shared, or none)::

    forward
        P       = (x ⊙ m_x^g) @ K_g + b_g             all steps in one product (one per gate with per-gate
                                                        input masks), written (B, T, 3, U) or (3, B, T, U)
        reset_after (cuDNN's and torch.nn.GRU's form), per step:
            I   = Σ_g (h_{t-1} ⊙ m_g) @ R_g            cuBLAS: torch.mm, or torch.bmm over the 3 gates
            kernel: I += rb; z = σ(P_z + I_z), r = σ(P_r + I_r), n = φ(P_h + r ⊙ I_h)
        reset_before, per step (the candidate's product depends on r: two products, two kernels):
            I   = (h_{t-1} ⊙ m_z) @ R_z, (h_{t-1} ⊙ m_r) @ R_r
            kernel: z, r as above; a = r ⊙ (h_{t-1} ⊙ m_h)
            A   = a @ R_h
            kernel: n = φ(P_h + A)
        h_t = z ⊙ h_{t-1} + (1 - z) ⊙ n, held where the step is masked; the kernel writes the activated
        gates over P_t, h_t, and h_t ⊙ m_g -- the next step's product inputs
    backward (t = T-1 … 0): dh = dH_t + carry + Σ_g Q_g ⊙ m_g;  dn = φ'·dh(1 - z);  dz = σ'·dh(h_{t-1} - n)
        reset_after:   dr = σ'·dn ⊙ I_h;  the products' gradients dI = (dz, dr, dn ⊙ r);  Q = dI @ R_gᵀ
        reset_before:  dA = dn @ R_hᵀ (a product inside the step);  dr = σ'·dA ⊙ h_{t-1} ⊙ m_h;
                       Q = (dz, dr) @ R_{z,r}ᵀ;  the carry also takes dA ⊙ r ⊙ m_h
        carry to h_{t-1}: dh ⊙ z (+ the above), or dh itself where the step was masked
    after the loop, large products: dK, dx, db from (dz, dr, dn); dR_{z,r} = (H_prev ⊙ m)ᵀ (dz, dr);
        dR_h = (H_prev ⊙ m_h)ᵀ (dn ⊙ r) (reset_after) or aᵀ dn (reset_before); drb = Σ dI

Saved for the backward: the activated gates (over the projections), the h sequence, and one more
(B, T, U) sequence -- I_h with reset_after, a with reset_before. Precision as ``lstm.py``: the h the
recurrence carries and the backward's carry dh are kept in float32 (float64 for float64 tensors), every
sequence in the input dtype.

Update masks m_u (per sequence or per step) multiply the candidate: h_t = z ⊙ h_{t-1} + (1 - z) ⊙ (n ⊙ m_u);
zoneout then keeps each unit's old value with indicator d: d ⊙ h_{t-1} + (1 - d) ⊙ h_t (d the rate in
inference). Per-step recurrent masks are read at the step that uses them: step t + 1's on h_t for the
next products, step t's on h_{t-1} for reset_before's candidate.


Timings (``benchmarks/gpu_speed.py``) are in the documentation's Performance page.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .loops import BackwardLoop, ForwardLoop, LoopKey, loop_key, outputs_and_saved, run_loop
from .noise import Noise
from ..products import gru_recurrent_bias_grad, gru_recurrent_kernel_grad, input_grads, project
from .triton_helpers import (STREAM_ZONEOUT_H, UPDATE_NONE, activate, carry_state, compute_type, gate_offset, given,
                             grid, incoming_grad, next_step, program_units, rec_mask, step_is_real, step_offset,
                             store_product_inputs, through, update_mask, zoneout_split)

Tensor = torch.Tensor

GATES = 3
RESET_AFTER, RESET_BEFORE = "gru", "gru-reset-before"  # loops.LoopKey.cell


# ---------------------------------------------------------------------------------------------- Triton
# Layouts (g: gate z, r, h; t: step; k: mask, m = N_MASKS):
#   gates      (B, T, 3, U), or (3, B, T, U) when GATE_MAJOR: the projections, overwritten by z, r, n
#   h          (B, T + 1, U): slot 0 holds h0, slot t + 1 the state after step t
#   carry      (B, U), compute dtype: the h the recurrence carries (what the kernels read as h_{t-1})
#   side       (B, T, U): I_h (reset_after) or a = r ⊙ h_{t-1} ⊙ m_h (reset_before), saved
#   product    the step's products (P gates of them: 3 reset_after, 2 (z, r) reset_before): (P, B, U) with
#              per-gate masks (N_MASKS == 3), else (B, P, U); masked_h (P, B, U) or (1, B, U) likewise;
#              dz_step and back in the backward likewise
#   masks      (m, B, U); rbias (3U,); valid (B, T) 0/1; dhs (B, T, U); dz (B, T, 3, U); dh (B, U) compute
#              dtype; d_inner (B, T, U) the gradient of I_h; dn_step, product_h, da (B, U)
@triton.jit
def _times_candidate_mask(x, masks_ptr, seed_ptr, t, b, u, inside, B, U, N_MASKS: tl.constexpr,
                          REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr,
                          COMPUTE: tl.constexpr):
    """x ⊙ m_h, step t's recurrent mask of the candidate's product (mask 2 of per-gate masks, or the shared one)."""
    if N_MASKS == 0:
        return x
    else:
        return x * rec_mask(masks_ptr, seed_ptr, t, 2 if N_MASKS > 1 else 0, b, u, inside, B, U, N_MASKS, REC_MODE,
                            REC_THRESH, REC_SCALE, COMPUTE)


@triton.jit
def _next_state(z, n, carry_ptr, h_ptr, masked_h_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u,
                inside, B, T, U, N_MASKS: tl.constexpr, N_PRODUCTS: tl.constexpr, REC_MODE: tl.constexpr,
                REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr,
                UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr,
                ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr):
    """h_t = z ⊙ h_{t-1} + (1 - z) ⊙ (n ⊙ m_u) -- then zoned, d ⊙ h_{t-1} + (1 - d) ⊙ h_t -- or h_{t-1} where
    the step is masked: stored in the carry and in slot t + 1 of the h sequence, with the next step's inputs
    of its first N_PRODUCTS products."""
    h_prev = tl.load(carry_ptr + b * U + u, mask=inside)
    if UPDATE != UPDATE_NONE:
        n = n * update_mask(upd_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE, UPD_THRESH, UPD_SCALE, COMPUTE)
    h = carry_state(z * h_prev + (1.0 - z) * n, h_prev, carry_ptr, h_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u,
                    inside, B, T, U, ZONE_H, ZONE_H_RATE, ZONE_H_THRESH, HAS_VALID, COMPUTE)
    store_product_inputs(masked_h_ptr, masks_ptr, seed_ptr, next_step(t, T), h, b, u, inside, B, U, N_MASKS,
                         N_PRODUCTS, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)


@triton.jit
def _state_grads(dh, z, n, upd_ptr, zone_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE: tl.constexpr,
                 UPD_THRESH: tl.constexpr, UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr,
                 ZONE_H_THRESH: tl.constexpr, COMPUTE: tl.constexpr):
    """From dh, the whole gradient reaching h_t: (dh_fresh, the gradient of the un-zoned state; the part that
    goes straight to h_{t-1}, through z and zoneout; n ⊙ m_u, the masked candidate; the candidate's gradient)."""
    dh_fresh, dh_direct = zoneout_split(dh, zone_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, U, ZONE_H,
                                        ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    n_u = n
    d_n = dh_fresh * (1.0 - z)
    if UPDATE != UPDATE_NONE:
        m_u = update_mask(upd_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE, UPD_THRESH, UPD_SCALE, COMPUTE)
        n_u = n * m_u
        d_n = d_n * m_u
    return dh_fresh, dh_direct + dh_fresh * z, n_u, d_n


@given(HAS_RBIAS="rbias_ptr", HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _reset_after_step(
    gates_ptr, product_ptr, rbias_ptr, h_ptr, carry_ptr, side_ptr, masked_h_ptr, masks_ptr, upd_ptr, zone_ptr,
    seed_ptr, valid_ptr, t, B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr,
    REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr,
    UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr,
    HAS_RBIAS: tl.constexpr, HAS_VALID: tl.constexpr, ACT: tl.constexpr, REC_ACT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One reset_after step for the units [BLOCK·j, BLOCK·(j+1)) of sequence b (program (b, j))."""
    b, u, inside = program_units(U, BLOCK)
    gz = gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u
    gr = gates_ptr + gate_offset(b, t, 1, B, T, U, 3, GATE_MAJOR) + u
    gn = gates_ptr + gate_offset(b, t, 2, B, T, U, 3, GATE_MAJOR) + u
    inner_z = tl.load(product_ptr + step_offset(b, 0, B, U, 3, N_MASKS) + u, mask=inside).to(COMPUTE)
    inner_r = tl.load(product_ptr + step_offset(b, 1, B, U, 3, N_MASKS) + u, mask=inside).to(COMPUTE)
    inner_h = tl.load(product_ptr + step_offset(b, 2, B, U, 3, N_MASKS) + u, mask=inside).to(COMPUTE)
    if HAS_RBIAS:
        inner_z += tl.load(rbias_ptr + u, mask=inside).to(COMPUTE)
        inner_r += tl.load(rbias_ptr + U + u, mask=inside).to(COMPUTE)
        inner_h += tl.load(rbias_ptr + 2 * U + u, mask=inside).to(COMPUTE)
    z = activate(tl.load(gz, mask=inside).to(COMPUTE) + inner_z, REC_ACT)
    r = activate(tl.load(gr, mask=inside).to(COMPUTE) + inner_r, REC_ACT)
    n = activate(tl.load(gn, mask=inside).to(COMPUTE) + r * inner_h, ACT)
    dtype = gates_ptr.dtype.element_ty
    tl.store(gz, z.to(dtype), mask=inside)
    tl.store(gr, r.to(dtype), mask=inside)
    tl.store(gn, n.to(dtype), mask=inside)
    tl.store(side_ptr + (b * T + t) * U + u, inner_h.to(dtype), mask=inside)
    _next_state(z, n, carry_ptr, h_ptr, masked_h_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u,
                inside, B, T, U, N_MASKS, 3, REC_MODE, REC_THRESH, REC_SCALE, UPDATE, UPD_THRESH, UPD_SCALE, ZONE_H,
                ZONE_H_RATE, ZONE_H_THRESH, HAS_VALID, COMPUTE)


@triton.jit(do_not_specialize=["t"])
def _reset_before_gates(
    gates_ptr, product_ptr, carry_ptr, side_ptr, masks_ptr, seed_ptr, t, B, U, T, GATE_MAJOR: tl.constexpr,
    N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr,
    REC_ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """First half of a reset_before step, after the z and r products: z, r, and a = r ⊙ (h_{t-1} ⊙ m_h),
    the input of the candidate's product (row t of ``side``)."""
    b, u, inside = program_units(U, BLOCK)
    gz = gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u
    gr = gates_ptr + gate_offset(b, t, 1, B, T, U, 3, GATE_MAJOR) + u
    pz = tl.load(product_ptr + step_offset(b, 0, B, U, 2, N_MASKS) + u, mask=inside).to(COMPUTE)
    pr = tl.load(product_ptr + step_offset(b, 1, B, U, 2, N_MASKS) + u, mask=inside).to(COMPUTE)
    z = activate(tl.load(gz, mask=inside).to(COMPUTE) + pz, REC_ACT)
    r = activate(tl.load(gr, mask=inside).to(COMPUTE) + pr, REC_ACT)
    h_prev = tl.load(carry_ptr + b * U + u, mask=inside).to(COMPUTE)
    dtype = gates_ptr.dtype.element_ty
    tl.store(gz, z.to(dtype), mask=inside)
    tl.store(gr, r.to(dtype), mask=inside)
    a = r * _times_candidate_mask(h_prev, masks_ptr, seed_ptr, t, b, u, inside, B, U, N_MASKS, REC_MODE, REC_THRESH,
                                  REC_SCALE, COMPUTE)
    tl.store(side_ptr + (b * T + t) * U + u, a.to(dtype), mask=inside)


@given(HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _reset_before_state(
    gates_ptr, product_h_ptr, h_ptr, carry_ptr, masked_h_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, valid_ptr, t,
    B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr,
    REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr, UPD_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Second half, after the candidate's product a @ R_h: n and h_t."""
    b, u, inside = program_units(U, BLOCK)
    z = tl.load(gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    gn = gates_ptr + gate_offset(b, t, 2, B, T, U, 3, GATE_MAJOR) + u
    candidate = tl.load(product_h_ptr + b * U + u, mask=inside).to(COMPUTE)
    n = activate(tl.load(gn, mask=inside).to(COMPUTE) + candidate, ACT)
    tl.store(gn, n.to(gates_ptr.dtype.element_ty), mask=inside)
    _next_state(z, n, carry_ptr, h_ptr, masked_h_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u,
                inside, B, T, U, N_MASKS, 2, REC_MODE, REC_THRESH, REC_SCALE, UPDATE, UPD_THRESH, UPD_SCALE, ZONE_H,
                ZONE_H_RATE, ZONE_H_THRESH, HAS_VALID, COMPUTE)


@given(HAS_VALID="valid_ptr", HAS_DHS="dhs_ptr")
@triton.jit(do_not_specialize=["t"])
def _reset_after_backward_step(
    gates_ptr, h_ptr, side_ptr, valid_ptr, dhs_ptr, back_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, dh_ptr, dz_ptr,
    d_inner_ptr, dz_step_ptr, t, B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr,
    REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr,
    UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_DHS: tl.constexpr, ACT: tl.constexpr, REC_ACT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One reset_after backward step: the gradients of the projections (dz) and of the products (dz_step:
    dz, dr, dn ⊙ r), and the carry to h_{t-1}, in place."""
    b, u, inside = program_units(U, BLOCK)
    dh = incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, next_step(t, T), b, t, u, inside, B, T, U,
                       HAS_DHS, N_MASKS, 3, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    z = tl.load(gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    r = tl.load(gates_ptr + gate_offset(b, t, 1, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    n = tl.load(gates_ptr + gate_offset(b, t, 2, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    h_prev = tl.load(h_ptr + (b * (T + 1) + t) * U + u, mask=inside).to(COMPUTE)
    inner_h = tl.load(side_ptr + (b * T + t) * U + u, mask=inside).to(COMPUTE)
    dh_fresh, dh_prev, n_u, d_n = _state_grads(dh, z, n, upd_ptr, zone_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE,
                                               UPD_THRESH, UPD_SCALE, ZONE_H, ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    dzz = through(dh_fresh * (h_prev - n_u), z, REC_ACT)
    dzn = through(d_n, n, ACT)
    dzr = through(dzn * inner_h, r, REC_ACT)
    d_inner_h = dzn * r
    if HAS_VALID:  # a masked step held h: its gradient passes on, and the gates get none
        keep = step_is_real(valid_ptr, b, t, T)
        dzz = tl.where(keep, dzz, 0.0)
        dzr = tl.where(keep, dzr, 0.0)
        dzn = tl.where(keep, dzn, 0.0)
        d_inner_h = tl.where(keep, d_inner_h, 0.0)
        dh_prev = tl.where(keep, dh_prev, dh)
    dtype = dz_ptr.dtype.element_ty
    row = dz_ptr + (b * T + t) * 3 * U + u
    tl.store(row, dzz.to(dtype), mask=inside)
    tl.store(row + U, dzr.to(dtype), mask=inside)
    tl.store(row + 2 * U, dzn.to(dtype), mask=inside)
    tl.store(d_inner_ptr + (b * T + t) * U + u, d_inner_h.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 0, B, U, 3, N_MASKS) + u, dzz.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 1, B, U, 3, N_MASKS) + u, dzr.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 2, B, U, 3, N_MASKS) + u, d_inner_h.to(dtype), mask=inside)
    tl.store(dh_ptr + b * U + u, dh_prev.to(dh_ptr.dtype.element_ty), mask=inside)


@given(HAS_VALID="valid_ptr", HAS_DHS="dhs_ptr")
@triton.jit(do_not_specialize=["t"])
def _reset_before_candidate_backward(
    gates_ptr, valid_ptr, dhs_ptr, back_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, dh_ptr, dz_ptr, dn_step_ptr, t,
    B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr,
    REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr, UPD_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_DHS: tl.constexpr, ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """First half of a reset_before backward step: the whole gradient reaching h_t (left in dh for the
    second half) and the candidate's dn, the input of the product dA = dn @ R_hᵀ."""
    b, u, inside = program_units(U, BLOCK)
    dh = incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, next_step(t, T), b, t, u, inside, B, T, U,
                       HAS_DHS, N_MASKS, 2, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    z = tl.load(gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    n = tl.load(gates_ptr + gate_offset(b, t, 2, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    _, _, _, d_n = _state_grads(dh, z, n, upd_ptr, zone_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE, UPD_THRESH,
                                UPD_SCALE, ZONE_H, ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    dzn = through(d_n, n, ACT)
    if HAS_VALID:
        dzn = tl.where(step_is_real(valid_ptr, b, t, T), dzn, 0.0)
    dtype = dz_ptr.dtype.element_ty
    tl.store(dz_ptr + ((b * T + t) * 3 + 2) * U + u, dzn.to(dtype), mask=inside)
    tl.store(dn_step_ptr + b * U + u, dzn.to(dtype), mask=inside)
    tl.store(dh_ptr + b * U + u, dh.to(dh_ptr.dtype.element_ty), mask=inside)


@given(HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _reset_before_gates_backward(
    gates_ptr, h_ptr, valid_ptr, da_ptr, masks_ptr, upd_ptr, zone_ptr, seed_ptr, dh_ptr, dz_ptr, dz_step_ptr, t, B,
    U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr,
    REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr, UPD_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    REC_ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Second half, after dA: the z and r gradients, and the carry to h_{t-1}, dh ⊙ z + dA ⊙ r ⊙ m_h."""
    b, u, inside = program_units(U, BLOCK)
    dh = tl.load(dh_ptr + b * U + u, mask=inside).to(COMPUTE)
    z = tl.load(gates_ptr + gate_offset(b, t, 0, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    r = tl.load(gates_ptr + gate_offset(b, t, 1, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    n = tl.load(gates_ptr + gate_offset(b, t, 2, B, T, U, 3, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    h_prev = tl.load(h_ptr + (b * (T + 1) + t) * U + u, mask=inside).to(COMPUTE)
    da = tl.load(da_ptr + b * U + u, mask=inside).to(COMPUTE)
    dh_fresh, dh_direct, n_u, _ = _state_grads(dh, z, n, upd_ptr, zone_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE,
                                               UPD_THRESH, UPD_SCALE, ZONE_H, ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    dzz = through(dh_fresh * (h_prev - n_u), z, REC_ACT)
    dzr = through(da * _times_candidate_mask(h_prev, masks_ptr, seed_ptr, t, b, u, inside, B, U, N_MASKS, REC_MODE,
                                             REC_THRESH, REC_SCALE, COMPUTE), r, REC_ACT)
    dh_prev = dh_direct + _times_candidate_mask(da * r, masks_ptr, seed_ptr, t, b, u, inside, B, U, N_MASKS,
                                                REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    if HAS_VALID:  # a masked step held h: its gradient passes on, and the gates get none
        keep = step_is_real(valid_ptr, b, t, T)
        dzz = tl.where(keep, dzz, 0.0)
        dzr = tl.where(keep, dzr, 0.0)
        dh_prev = tl.where(keep, dh_prev, dh)
    dtype = dz_ptr.dtype.element_ty
    row = dz_ptr + (b * T + t) * 3 * U + u
    tl.store(row, dzz.to(dtype), mask=inside)
    tl.store(row + U, dzr.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 0, B, U, 2, N_MASKS) + u, dzz.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 1, B, U, 2, N_MASKS) + u, dzr.to(dtype), mask=inside)
    tl.store(dh_ptr + b * U + u, dh_prev.to(dh_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------- time loops
def _product_gates(key: LoopKey) -> int:
    """How many gates' recurrent products run together at the start of a step: 3, or z and r."""
    return GATES if key.cell == RESET_AFTER else 2


class _ForwardLoop(ForwardLoop):
    """The forward time loop (layouts: the comment above the kernels). R is (U, 3U), or the panels R_g
    (3, U, U) with per-gate masks; rbias (3U,), rec (m, B, U) and valid (B, T) are None where absent."""

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U = key.batch, key.steps, key.units
        self.reset_after = key.cell == RESET_AFTER
        products = _product_gates(key)
        self.gates = self.new(GATES, B, T, U) if key.gate_major else self.new(B, T, GATES * U)
        self.carry = self.new_carry(B, U)
        self.side = self.new(B, T, U)
        self.masked_h = self.new(products if self.per_gate else 1, B, U)
        self.product = self.new(products, B, U) if self.per_gate else self.new(B, products * U)
        self.product_h = None if self.reset_after else self.new(B, U)
        self.R = (self.new(GATES, U, U) if self.per_gate else self.new(U, GATES * U)) if static else None
        self.rbias = self.new(GATES * U) if static and key.has_recurrent_bias else None

    def load(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor], input_masks: Optional[Tensor], R: Tensor,
             rbias: Optional[Tensor], h0: Tensor, rec: Optional[Tensor], noise: Noise, valid: Optional[Tensor]) -> None:
        units = self.key.units
        project(x, kernel, bias, input_masks, out=self.gates, gates=GATES)
        self.start(h0, rec)
        self.carry.copy_(h0)
        self.take_recurrent(R, R.reshape(units, GATES, units).permute(1, 0, 2))
        self.take("rbias", rbias)
        self.take_noise(rec, noise)
        self.take("valid", valid)

    def run(self, steps: range) -> None:
        key, units = self.key, self.key.units
        programs, block = grid(key.batch, units)
        shape = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks, COMPUTE=compute_type(key.dtype), BLOCK=block,
                     **self.rec_args())
        noise = self.noise_args(1)
        act, rec_act = key.codes
        multiply = torch.bmm if self.per_gate else torch.mm  # one product per gate, or one for all
        h_in = self.masked_h if self.per_gate else self.masked_h[0]
        if self.reset_after:
            launch = _reset_after_step[programs]
            for t in steps:
                multiply(h_in, self.R, out=self.product)
                launch(self.gates, self.product, self.rbias, self.h, self.carry, self.side, self.masked_h, self.rec,
                       self.upd, self.zone[0], self.seed, self.valid, t, key.batch, units, key.steps, ACT=act,
                       REC_ACT=rec_act, **noise, **shape)
            return
        gates_launch, state_launch = _reset_before_gates[programs], _reset_before_state[programs]
        R_zr, R_h = (self.R[:2], self.R[2]) if self.per_gate else (self.R[:, :2 * units], self.R[:, 2 * units:])
        for t in steps:
            multiply(h_in, R_zr, out=self.product)
            gates_launch(self.gates, self.product, self.carry, self.side, self.rec, self.seed, t, key.batch, units,
                         key.steps, REC_ACT=rec_act, **shape)
            torch.mm(self.side[:, t], R_h, out=self.product_h)
            state_launch(self.gates, self.product_h, self.h, self.carry, self.masked_h, self.rec, self.upd,
                         self.zone[0], self.seed, self.valid, t, key.batch, units, key.steps, ACT=act, **noise,
                         **shape)


class _BackwardLoop(BackwardLoop):
    """The backward time loop, from step T-1 down to 0.

    Inputs: gates and h as the forward left them, side (reset_after: I_h), valid (B, T) or None, d_hs
    (B, T, U) or None, rec (m, B, U) or None, R (U, 3U) or the panels R_gᵀ (3, U, U). Working buffers:
    back, the Q of the step after; dh (B, U); dz (B, T, 3U); dz_step; reset_after d_inner (B, T, U),
    reset_before dn_step and da (B, U).
    """

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U = key.batch, key.steps, key.units
        self.reset_after = key.cell == RESET_AFTER
        products = _product_gates(key)
        if static:
            self.gates = self.new(GATES, B, T, U) if key.gate_major else self.new(B, T, GATES * U)
            self.h = self.new(B, T + 1, U)
            self.side = self.new(B, T, U) if self.reset_after else None
            self.R = self.new(GATES, U, U) if self.per_gate else self.new(U, GATES * U)
        self.back = self.new(products if self.per_gate else 1, B, U)
        self.dz = self.new(B, T, GATES * U)
        self.dz_step = self.new(products, B, U) if self.per_gate else self.new(B, products * U)
        if self.reset_after:
            self.d_inner = self.new(B, T, U)
        else:
            self.dn_step = self.new(B, U)
            self.da = self.new(B, U)

    def load(self, gates: Tensor, h_buffer: Tensor, side: Tensor, valid: Optional[Tensor], d_hs: Optional[Tensor],
             rec: Optional[Tensor], noise: Noise, R: Tensor) -> None:
        units = self.key.units
        self.take("gates", gates)
        self.take("h", h_buffer)
        if self.reset_after:  # reset_before reads its side (a) only after the loop, for dR_h
            self.take("side", side)
        self.take("valid", valid)
        self.take("d_hs", d_hs)
        self.take_noise(rec, noise)
        self.take_recurrent(R, R.reshape(units, GATES, units).permute(1, 2, 0))
        self.back.zero_()  # no step after the last
        self.dh.zero_()

    def run(self, steps: range) -> None:
        key, units = self.key, self.key.units
        programs, block = grid(key.batch, units)
        shape = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks,
                     COMPUTE=compute_type(key.dtype), BLOCK=block, **self.rec_args(), **self.noise_args(1))
        act, rec_act = key.codes
        multiply = torch.bmm if self.per_gate else torch.mm
        back_out = self.back if self.per_gate else self.back[0]
        R_t = self.R if self.per_gate else self.R.t()  # R_gᵀ panels, or Rᵀ (3U, U)
        if self.reset_after:
            launch = _reset_after_backward_step[programs]
            for t in steps:
                launch(self.gates, self.h, self.side, self.valid, self.d_hs, self.back, self.rec, self.upd,
                       self.zone[0], self.seed, self.dh, self.dz, self.d_inner, self.dz_step, t, key.batch, units,
                       key.steps, ACT=act, REC_ACT=rec_act, **shape)
                multiply(self.dz_step, R_t, out=back_out)
            return
        candidate_launch = _reset_before_candidate_backward[programs]
        gates_launch = _reset_before_gates_backward[programs]
        R_zr_t, R_h_t = (R_t[:2], R_t[2]) if self.per_gate else (R_t[:2 * units], R_t[2 * units:])
        for t in steps:
            candidate_launch(self.gates, self.valid, self.d_hs, self.back, self.rec, self.upd, self.zone[0], self.seed,
                             self.dh, self.dz, self.dn_step, t, key.batch, units, key.steps, ACT=act, **shape)
            torch.mm(self.dn_step, R_h_t, out=self.da)
            gates_launch(self.gates, self.h, self.valid, self.da, self.rec, self.upd, self.zone[0], self.seed, self.dh,
                         self.dz, self.dz_step, t, key.batch, units, key.steps, REC_ACT=rec_act, **shape)
            multiply(self.dz_step, R_zr_t, out=back_out)


def _gradients(needs: tuple, loop: _BackwardLoop, x: Tensor, kernel: Tensor, bias: Optional[Tensor],
               rbias: Optional[Tensor], h_buffer: Tensor, side: Tensor, input_masks: Optional[Tensor],
               rec: Optional[Tensor]) -> tuple:
    """dx, dkernel, dbias, dR, drbias, dh0 (None where not needed) from a finished backward loop: large
    products and sums over dz; none of them is a view of the loop's buffers."""
    dz = loop.dz
    dh0 = dbias = dR = drbias = None
    if needs[5]:
        dh0 = loop.initial_state_grad(rec)
    if bias is not None and needs[2]:
        dbias = dz.sum(dim=(0, 1))
    if needs[3]:
        dR = gru_recurrent_kernel_grad(h_buffer[:, :x.shape[1]], rec, dz, loop.d_inner if loop.reset_after else side,
                                       loop.reset_after)
    if rbias is not None and needs[4]:
        drbias = gru_recurrent_bias_grad(dz, loop.d_inner)
    dx, dkernel = input_grads(x, kernel, input_masks, dz, needs[0], needs[1], GATES)
    return dx, dkernel, dbias, dR, drbias, dh0


# ---------------------------------------------------------------------------------------------- entry points
def forward(x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor, rbias: Optional[Tensor], h0: Tensor,
            input_masks: Optional[Tensor], rec, noise: Noise, valid: Optional[Tensor], codes: tuple, reset_after: bool,
            saving: bool, precision: Optional[str]) -> tuple[Tensor, tuple]:
    """One GRU cell over a whole sequence -- input projection and recurrence (``operator.gpu_layer``).

    x (B, T, D), kernel (D, 3U), bias (3U,) or None, R (U, 3U) (DropConnect applied), the recurrent bias rb
    (3U,) (reset_after) or None, h0 (B, U), masks, valid, codes, saving and precision as ``lstm.forward``.
    Returns the h sequence (B, T + 1, U) with h0 in slot 0, and what the backward reads: the gates and the
    side (B, T, U) -- None when not saving.
    """
    form = RESET_AFTER if reset_after else RESET_BEFORE
    key = loop_key(form, False, x, R.shape[1] // GATES, input_masks, rec, valid, codes,
                   has_recurrent_bias=rbias is not None, noise=noise, precision=precision)
    return run_loop(_ForwardLoop, key, x, (x, kernel, bias, input_masks, R, rbias, h0, rec, noise, valid),
                    lambda loop: outputs_and_saved(loop, saving, ("gates", "side")))


def backward(needs: tuple, d_hs: Tensor, x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor,
             rbias: Optional[Tensor], input_masks: Optional[Tensor], rec, noise: Noise, valid: Optional[Tensor],
             codes: tuple, reset_after: bool, h: Tensor, saved: tuple, precision: Optional[str]) -> tuple:
    """dx, dkernel, dbias, dR, drbias, dh0 (None where ``needs``, over x, kernel, bias, R, rbias, h0, says
    not) from the gradient of the h sequence's steps 1..T (B, T, U) and :func:`forward`'s results."""
    gates, side = saved
    form = RESET_AFTER if reset_after else RESET_BEFORE
    key = loop_key(form, True, x, R.shape[1] // GATES, input_masks, rec, valid, codes, has_dhs=True, noise=noise,
                   precision=precision)

    def finish(loop: _BackwardLoop):  # dz is consumed here, before any other replay can overwrite it
        return _gradients(needs, loop, x, kernel, bias, rbias, h, side, input_masks, rec)

    return run_loop(_BackwardLoop, key, x, (gates, h, side, valid, d_hs, rec, noise, R), finish)
