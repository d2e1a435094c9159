"""LSTM on the GPU: cuBLAS products through torch, and one Triton kernel per step for everything else.

The plain version of this recurrence -- the oracle it is tested against -- is
:func:`droprnn.kernels.reference.run` with :meth:`droprnn.LSTMCell.transition`. Per cell (stacked cells
run one after another, as in ``kernels/fused.py``: a cell's states at masked steps are held, so feeding
it the previous cell's carried h sequence equals the reference's per-step interleaving)::

    forward
        P       = (x ⊙ m_x^g) @ K_g + b_g            all steps in one product (one per gate with per-gate
                                                      input masks), written (B, T, 4, U) or (4, B, T, U)
        for t in 0 … T-1:
            Z   = (h_{t-1} ⊙ m_h^g) @ R_g             cuBLAS: torch.mm (no / shared mask) or torch.bmm over
                                                      the 4 gates (per-gate masks), into a fixed buffer
            kernel _forward_step: i, f, o = σ(P_t + Z), g = φ(P_t + Z); c_t = f c_{t-1} + i g;
                  h_t = o φ(c_t); hold h, c where the step is masked; write the activated gates over P_t
                  (saved for the backward), c_t, h_t, and h_t ⊙ m_h^g -- the next step's product input
    backward (t = T-1 … 0)
        kernel _backward_step: dh = dH_t + carry + Σ_g Q_g ⊙ m_h^g; gate gradients dz from the saved
                  activations; dc carried through f; masked steps pass dh and dc on and have dz = 0
        Q       = dz_t @ R_gᵀ                         cuBLAS, as in the forward
    after the loop, large products: dR_g = (H_prev ⊙ m_h^g)ᵀ dZ_g, dK_g = (x ⊙ m_x^g)ᵀ dZ_g,
        db = Σ dZ, dx = Σ_g (dZ_g K_gᵀ) ⊙ m_x^g

Update masks m_u (per sequence or per step) multiply the candidate g in c_t; zoneout then keeps each
unit's old h and c with indicators d_h, d_c (their rates in inference): h_t = d_h ⊙ h_{t-1} + (1 - d_h) ⊙
h̃_t, likewise c_t, and the backward recomputes the un-zoned c̃_t from the saved gates. Per-step recurrent
masks (T, m, B, U) are taken at the step that uses them: step t + 1's on h_t. Per-step masks come as
tensors or, from plans drawn on CUDA, counter-based (``triton_helpers.counter_value``): made in the step
kernels from the call's seed and the entry's index, never stored.

``proj_size`` (torch's projection P (U, H)): the step kernel stops at r_t = o ⊙ φ(c_t) (saved), a cuBLAS
product makes r_t @ P, and ``_projected_step`` zones and holds the H-unit h_t and writes the next products'
inputs; the backward mirrors it (``_projected_backward_step``, dr = dhp @ Pᵀ, then the gate kernel), and
dP = Σ_t r_tᵀ dhp_t is one product after the loop.

Saved for the backward: the activated gates (over the projections), the h and c sequences (and r) -- no
mask beyond those the plan holds. The kernels compute in float32 (float64 for float64 tensors); the c sequence and the
backward's carries dh, dc are kept in that type, everything else in the input dtype -- float32, float64,
float16 or bfloat16 (``triton_helpers.py``). A backward that must itself be differentiable
(``create_graph=True``, double backward) differentiates the same recurrence written with the cell's own
step in plain autograd ops instead (``reference.differentiable_grads``): slower, and exact.

Time loops in CUDA graphs (``graphs.py``). Two launches per step and direction (a product and a Triton
kernel) cost the host about 100-200 µs per step, whatever the width, so the eager loops are bound by
the host. Each direction's loop is therefore captured once per key (``loops.LoopKey``: cell, device,
dtype, B, T, U, mask layout and count, step mask, dH present, activations, matmul precision, stream) on
its second call, and replayed after that: a static loop owns its buffers, each call writes its inputs
into them (the projections directly), replays, and copies out what outlives the call (the saved gates,
h and c, dc0), so calls sharing a key -- two layers, two calls before a backward, ``retain_graph`` --
never see each other's data. Eager instead: CPU tensors (Triton's interpreter), a stream already being
captured (a user's own graph), ``DROPRNN_CUDA_GRAPHS=0``. At most ``graphs.CACHE_SIZE`` loops are kept.

Timings (``benchmarks/gpu_speed.py``) are in the documentation's Performance page.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .loops import BackwardLoop, ForwardLoop, LoopKey, loop_key, outputs_and_saved, run_loop
from .noise import Noise
from ..products import input_grads, project, recurrent_kernel_grad
from .triton_helpers import (STREAM_ZONEOUT_C, STREAM_ZONEOUT_H, UPDATE_NONE, ZONE_NONE, activate, compute_type,
                             gate_offset, given, grid, incoming_grad, next_step, program_units, step_is_real,
                             step_offset, store_product_inputs, through, update_mask, zoneout_keep, zoneout_split)

Tensor = torch.Tensor

GATES = 4
CELL = "lstm"


# ---------------------------------------------------------------------------------------------- Triton
# Layouts (g: gate, k: mask, t: step; m = max(N_MASKS, 1); H = h's units: proj_size with a projection, else U):
#   gates      (B, T, 4, U), or (4, B, T, U) when GATE_MAJOR (per-gate input masks): the projections,
#              overwritten in place by the activated gates i, f, g, o
#   product    (4, B, U) when N_MASKS == 4 (one product per gate), else (B, 4, U); dz_step likewise
#   h          (B, T + 1, H), c (B, T + 1, U) in the compute dtype: slot 0 holds the initial state, slot
#              t + 1 the state after step t
#   masks      (m, B, H) recurrent masks, or per step (T, m, B, H); masked_h and back (m, B, H)
#   valid      (B, T) 0/1; dhs (B, T, H); dz (B, T, 4, U); dh (B, H), dc (B, U) in the compute dtype
#   projection r (B, T, U); hp, dhp_step (B, H); dhp (B, T, H); dr (B, U)
@given(PROJ="r_ptr", HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _forward_step(
    gates_ptr, product_ptr, h_ptr, c_ptr, r_ptr, masked_h_ptr, masks_ptr, upd_ptr, zh_ptr, zc_ptr, seed_ptr,
    valid_ptr, t, B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr,
    REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr,
    UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr,
    ZONE_C: tl.constexpr, ZONE_C_RATE: tl.constexpr, ZONE_C_THRESH: tl.constexpr, PROJ: tl.constexpr,
    HAS_VALID: tl.constexpr, ACT: tl.constexpr, REC_ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One forward step for the units [BLOCK·j, BLOCK·(j+1)) of sequence b (program (b, j)). With PROJ it
    stops at r = o ⊙ φ(c) (row t of ``r``): the projection's product and ``_projected_step`` make h."""
    b, u, inside = program_units(U, BLOCK)
    gi = gates_ptr + gate_offset(b, t, 0, B, T, U, 4, GATE_MAJOR) + u
    gf = gates_ptr + gate_offset(b, t, 1, B, T, U, 4, GATE_MAJOR) + u
    gc = gates_ptr + gate_offset(b, t, 2, B, T, U, 4, GATE_MAJOR) + u
    go = gates_ptr + gate_offset(b, t, 3, B, T, U, 4, GATE_MAJOR) + u
    pi = product_ptr + step_offset(b, 0, B, U, 4, N_MASKS) + u
    pf = product_ptr + step_offset(b, 1, B, U, 4, N_MASKS) + u
    pc = product_ptr + step_offset(b, 2, B, U, 4, N_MASKS) + u
    po = product_ptr + step_offset(b, 3, B, U, 4, N_MASKS) + u
    zi = tl.load(gi, mask=inside).to(COMPUTE) + tl.load(pi, mask=inside).to(COMPUTE)
    zf = tl.load(gf, mask=inside).to(COMPUTE) + tl.load(pf, mask=inside).to(COMPUTE)
    zc = tl.load(gc, mask=inside).to(COMPUTE) + tl.load(pc, mask=inside).to(COMPUTE)
    zo = tl.load(go, mask=inside).to(COMPUTE) + tl.load(po, mask=inside).to(COMPUTE)
    i = activate(zi, REC_ACT)
    f = activate(zf, REC_ACT)
    g = activate(zc, ACT)
    o = activate(zo, REC_ACT)
    before = (b * (T + 1) + t) * U + u  # slot t: the states before this step
    after = before + U
    c_prev = tl.load(c_ptr + before, mask=inside).to(COMPUTE)
    update = g
    if UPDATE != UPDATE_NONE:  # the cell update's mask (Semeniuta et al.)
        update = g * update_mask(upd_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE, UPD_THRESH, UPD_SCALE, COMPUTE)
    c = f * c_prev + i * update
    h = o * activate(c, ACT)
    if ZONE_C != ZONE_NONE:  # each unit keeps its old value with indicator d (or its expectation)
        d = zoneout_keep(zc_ptr, seed_ptr, STREAM_ZONEOUT_C, b, t, u, inside, B, U, ZONE_C, ZONE_C_RATE,
                         ZONE_C_THRESH, COMPUTE)
        c = d * c_prev + (1 - d) * c
    if HAS_VALID:  # a masked step holds both states
        keep = step_is_real(valid_ptr, b, t, T)
        c = tl.where(keep, c, c_prev)
    dtype = gates_ptr.dtype.element_ty
    tl.store(gi, i.to(dtype), mask=inside)
    tl.store(gf, f.to(dtype), mask=inside)
    tl.store(gc, g.to(dtype), mask=inside)
    tl.store(go, o.to(dtype), mask=inside)
    tl.store(c_ptr + after, c.to(c_ptr.dtype.element_ty), mask=inside)
    if PROJ:
        tl.store(r_ptr + (b * T + t) * U + u, h.to(r_ptr.dtype.element_ty), mask=inside)
    else:
        if HAS_VALID or ZONE_H != ZONE_NONE:
            h_prev = tl.load(h_ptr + before, mask=inside).to(COMPUTE)
            if ZONE_H != ZONE_NONE:
                d = zoneout_keep(zh_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, U, ZONE_H, ZONE_H_RATE,
                                 ZONE_H_THRESH, COMPUTE)
                h = d * h_prev + (1 - d) * h
            if HAS_VALID:
                h = tl.where(keep, h, h_prev)
        tl.store(h_ptr + after, h.to(h_ptr.dtype.element_ty), mask=inside)
        store_product_inputs(masked_h_ptr, masks_ptr, seed_ptr, next_step(t, T), h, b, u, inside, B, U, N_MASKS, 4,
                             REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)


@given(HAS_VALID="valid_ptr")
@triton.jit(do_not_specialize=["t"])
def _projected_step(
    hp_ptr, h_ptr, masked_h_ptr, masks_ptr, zh_ptr, seed_ptr, valid_ptr, t, B, H, T, N_MASKS: tl.constexpr,
    REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, ZONE_H: tl.constexpr,
    ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """With a projection, after hp = r_t @ P: h_t from hp (zoned, held where the step is masked) over the H
    projected units, and the next step's product inputs."""
    b, u, inside = program_units(H, BLOCK)
    h = tl.load(hp_ptr + b * H + u, mask=inside).to(COMPUTE)
    before = (b * (T + 1) + t) * H + u
    if HAS_VALID or ZONE_H != ZONE_NONE:
        h_prev = tl.load(h_ptr + before, mask=inside).to(COMPUTE)
        if ZONE_H != ZONE_NONE:
            d = zoneout_keep(zh_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, H, ZONE_H, ZONE_H_RATE,
                             ZONE_H_THRESH, COMPUTE)
            h = d * h_prev + (1 - d) * h
        if HAS_VALID:
            h = tl.where(step_is_real(valid_ptr, b, t, T), h, h_prev)
    tl.store(h_ptr + before + H, h.to(h_ptr.dtype.element_ty), mask=inside)
    store_product_inputs(masked_h_ptr, masks_ptr, seed_ptr, next_step(t, T), h, b, u, inside, B, H, N_MASKS, 4,
                         REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)


@given(PROJ="dr_ptr", HAS_VALID="valid_ptr", HAS_DHS="dhs_ptr")
@triton.jit(do_not_specialize=["t"])
def _backward_step(
    gates_ptr, c_ptr, valid_ptr, dhs_ptr, back_ptr, masks_ptr, upd_ptr, zh_ptr, zc_ptr, seed_ptr, dr_ptr, dh_ptr,
    dc_ptr, dz_ptr, dz_step_ptr, t, B, U, T, GATE_MAJOR: tl.constexpr, N_MASKS: tl.constexpr,
    REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, UPDATE: tl.constexpr,
    UPD_THRESH: tl.constexpr, UPD_SCALE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr,
    ZONE_H_THRESH: tl.constexpr, ZONE_C: tl.constexpr, ZONE_C_RATE: tl.constexpr, ZONE_C_THRESH: tl.constexpr,
    PROJ: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DHS: tl.constexpr, ACT: tl.constexpr, REC_ACT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One backward step: gate gradients and the carries dh (direct: through zoneout and held steps) and
    dc, in place.

    ``back`` holds the gradient of the step after this one through its recurrent product, per mask:
    Q_g = dz_g @ R_gᵀ; it reaches h as Σ_g Q_g ⊙ m_g (the step after's masks). With zoneout, h_t and c_t
    are d·old + (1 - d)·fresh: the fresh values' gradients are (1 - d) of theirs, the rest passes straight
    to step t - 1; the fresh c is recomputed from the saved gates, since c_t holds the zoned one. With PROJ
    the gradient of r = o ⊙ φ(c) arrives in ``dr`` (``_projected_backward_step`` and dr = dh @ Pᵀ did h's
    part: its zoneout, held steps and carry).
    """
    b, u, inside = program_units(U, BLOCK)
    if PROJ:
        dh = tl.load(dr_ptr + b * U + u, mask=inside).to(COMPUTE)
    else:
        dh = incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, next_step(t, T), b, t, u, inside, B, T,
                           U, HAS_DHS, N_MASKS, 4, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    i = tl.load(gates_ptr + gate_offset(b, t, 0, B, T, U, 4, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    f = tl.load(gates_ptr + gate_offset(b, t, 1, B, T, U, 4, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    g = tl.load(gates_ptr + gate_offset(b, t, 2, B, T, U, 4, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    o = tl.load(gates_ptr + gate_offset(b, t, 3, B, T, U, 4, GATE_MAJOR) + u, mask=inside).to(COMPUTE)
    before = (b * (T + 1) + t) * U + u
    c_prev = tl.load(c_ptr + before, mask=inside).to(COMPUTE)
    update = g
    if UPDATE != UPDATE_NONE:
        m_u = update_mask(upd_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE, UPD_THRESH, UPD_SCALE, COMPUTE)
        update = g * m_u
    if ZONE_C != ZONE_NONE:
        c = f * c_prev + i * update
    else:
        c = tl.load(c_ptr + before + U, mask=inside).to(COMPUTE)
    tc = activate(c, ACT)
    dc_next = tl.load(dc_ptr + b * U + u, mask=inside).to(COMPUTE)
    dh_fresh, dh_carry = zoneout_split(dh, zh_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, U, ZONE_H,
                                       ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    dc_fresh, dc_prev = zoneout_split(dc_next, zc_ptr, seed_ptr, STREAM_ZONEOUT_C, b, t, u, inside, B, U, ZONE_C,
                                      ZONE_C_RATE, ZONE_C_THRESH, COMPUTE)
    dc = dc_fresh + through(dh_fresh * o, tc, ACT)
    dzi = through(dc * update, i, REC_ACT)
    dzf = through(dc * c_prev, f, REC_ACT)
    d_update = dc * i
    if UPDATE != UPDATE_NONE:
        d_update = d_update * m_u
    dzc = through(d_update, g, ACT)
    dzo = through(dh_fresh * tc, o, REC_ACT)
    dc_prev += dc * f
    if HAS_VALID:  # a masked step held h and c: their gradients pass on, and its gates get none
        keep = step_is_real(valid_ptr, b, t, T)
        dzi = tl.where(keep, dzi, 0.0)
        dzf = tl.where(keep, dzf, 0.0)
        dzc = tl.where(keep, dzc, 0.0)
        dzo = tl.where(keep, dzo, 0.0)
        dc_prev = tl.where(keep, dc_prev, dc_next)
        dh_carry = tl.where(keep, dh_carry, dh)
    dtype = dz_ptr.dtype.element_ty
    z = dz_ptr + (b * T + t) * 4 * U + u
    tl.store(z, dzi.to(dtype), mask=inside)
    tl.store(z + U, dzf.to(dtype), mask=inside)
    tl.store(z + 2 * U, dzc.to(dtype), mask=inside)
    tl.store(z + 3 * U, dzo.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 0, B, U, 4, N_MASKS) + u, dzi.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 1, B, U, 4, N_MASKS) + u, dzf.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 2, B, U, 4, N_MASKS) + u, dzc.to(dtype), mask=inside)
    tl.store(dz_step_ptr + step_offset(b, 3, B, U, 4, N_MASKS) + u, dzo.to(dtype), mask=inside)
    tl.store(dc_ptr + b * U + u, dc_prev.to(dc_ptr.dtype.element_ty), mask=inside)
    if not PROJ:
        tl.store(dh_ptr + b * U + u, dh_carry.to(dh_ptr.dtype.element_ty), mask=inside)


@given(HAS_VALID="valid_ptr", HAS_DHS="dhs_ptr")
@triton.jit(do_not_specialize=["t"])
def _projected_backward_step(
    dhs_ptr, back_ptr, masks_ptr, zh_ptr, seed_ptr, valid_ptr, dh_ptr, dhp_ptr, dhp_step_ptr, t, B, H, T,
    N_MASKS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_DHS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """With a projection, first: the gradient reaching h_t (H units), split by zoneout and held steps into
    the projection's output gradient dhp (row t of ``dhp``, and ``dhp_step`` for dr = dhp @ Pᵀ) and the
    carry to h_{t-1}."""
    b, u, inside = program_units(H, BLOCK)
    dh = incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, next_step(t, T), b, t, u, inside, B, T, H,
                       HAS_DHS, N_MASKS, 4, REC_MODE, REC_THRESH, REC_SCALE, COMPUTE)
    dh_fresh, dh_carry = zoneout_split(dh, zh_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, H, ZONE_H,
                                       ZONE_H_RATE, ZONE_H_THRESH, COMPUTE)
    if HAS_VALID:
        keep = step_is_real(valid_ptr, b, t, T)
        dh_fresh = tl.where(keep, dh_fresh, 0.0)
        dh_carry = tl.where(keep, dh_carry, dh)
    dtype = dhp_ptr.dtype.element_ty
    tl.store(dhp_ptr + (b * T + t) * H + u, dh_fresh.to(dtype), mask=inside)
    tl.store(dhp_step_ptr + b * H + u, dh_fresh.to(dtype), mask=inside)
    tl.store(dh_ptr + b * H + u, dh_carry.to(dh_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------- time loops
class _ForwardLoop(ForwardLoop):
    """The forward time loop (layouts: the comment above the kernels).

    gates (B, T, 4U) or (4, B, T, U), filled with the projections by ``load`` and overwritten with the
    activated gates; h (B, T + 1, U); c (B, T + 1, U) in the compute dtype; masked_h (m, B, U); product
    (B, 4U) or (4, B, U); R (U, 4U) or the panels R_g (4, U, U); rec (m, B, U) or None; valid (B, T) or None.
    """

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U, H, m = key.batch, key.steps, key.units, self.h_units, key.n_masks
        self.gates = self.new(GATES, B, T, U) if key.gate_major else self.new(B, T, GATES * U)
        self.c = self.new_carry(B, T + 1, U)
        self.masked_h = self.new(max(m, 1), B, H)  # h_{t-1} ⊙ m_g, the product's input
        self.product = self.new(GATES, B, U) if self.per_gate else self.new(B, GATES * U)
        self.R = (self.new(GATES, H, U) if self.per_gate else self.new(H, GATES * U)) if static else None
        self.r = self.new(B, T, U) if key.proj else None  # o ⊙ φ(c), the projection's input
        self.hp = self.new(B, H) if key.proj else None  # r_t @ P
        self.P = self.new(U, H) if key.proj and static else None

    def load(self, x: Tensor, kernel: Tensor, bias: Optional[Tensor], input_masks: Optional[Tensor], R: Tensor,
             P: Optional[Tensor], h0: Tensor, c0: Tensor, rec: Optional[Tensor], noise: Noise,
             valid: Optional[Tensor]) -> None:
        project(x, kernel, bias, input_masks, out=self.gates, gates=GATES)
        self.start(h0, rec)
        self.c[:, 0] = c0
        self.take_recurrent(R, R.reshape(self.h_units, GATES, self.key.units).permute(1, 0, 2))
        self.take("P", P)
        self.take_noise(rec, noise)
        self.take("valid", valid)

    def run(self, steps: range) -> None:
        key, proj = self.key, self.key.proj
        programs, block = grid(key.batch, key.units)
        launch = _forward_step[programs]
        noise = self.noise_args(2)
        if proj:  # h's zoneout happens after the projection, in _projected_step
            noise.update(ZONE_H=ZONE_NONE.value, ZONE_H_RATE=0.0, ZONE_H_THRESH=0)
        constants = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks, ACT=key.codes[0], REC_ACT=key.codes[1],
                         COMPUTE=compute_type(key.dtype), BLOCK=block, **self.rec_args(), **noise)
        if proj:
            h_programs, h_block = grid(key.batch, proj)
            h_launch = _projected_step[h_programs]
            zone_h = {k: v for k, v in self.noise_args(2).items() if k.startswith("ZONE_H")}
            h_constants = dict(N_MASKS=key.n_masks, COMPUTE=compute_type(key.dtype), BLOCK=h_block, **self.rec_args(),
                               **zone_h)
        h_for_mm = self.masked_h[0]
        for t in steps:
            if self.per_gate:  # one product per gate: (4, B, H) @ (4, H, U) -> (4, B, U)
                torch.bmm(self.masked_h, self.R, out=self.product)
            else:  # (B, H) @ (H, 4U) -> (B, 4U)
                torch.mm(h_for_mm, self.R, out=self.product)
            launch(self.gates, self.product, self.h, self.c, self.r, self.masked_h, self.rec, self.upd, self.zone[0],
                   self.zone[1], self.seed, self.valid, t, key.batch, key.units, key.steps, **constants)
            if proj:
                torch.mm(self.r[:, t], self.P, out=self.hp)
                h_launch(self.hp, self.h, self.masked_h, self.rec, self.zone[0], self.seed, self.valid, t, key.batch,
                         proj, key.steps, **h_constants)


class _BackwardLoop(BackwardLoop):
    """The backward time loop, from step T-1 down to 0.

    Inputs: gates and c as the forward left them, valid (B, T) or None, d_hs (B, T, U) or None, rec
    (m, B, U) or None, R (U, 4U) or the panels R_gᵀ (4, U, U). Working buffers: back (m, B, U), the
    Q_g of the step after; dh (B, U), the gradient carried through held steps; dc (B, U); dz (B, T, 4U);
    dz_step (B, 4U) or (4, B, U). dh and dc are in the compute dtype.
    """

    def __init__(self, key: LoopKey, static: bool):
        super().__init__(key, static)
        B, T, U, H, m = key.batch, key.steps, key.units, self.h_units, key.n_masks
        if static:
            self.gates = self.new(GATES, B, T, U) if key.gate_major else self.new(B, T, GATES * U)
            self.c = self.new_carry(B, T + 1, U)
            self.R = self.new(GATES, U, H) if self.per_gate else self.new(H, GATES * U)
            self.P = self.new(U, H) if key.proj else None
        self.back = self.new(max(m, 1), B, H)
        self.dc = self.new_carry(B, U)
        self.dz = self.new(B, T, GATES * U)
        self.dz_step = self.new(GATES, B, U) if self.per_gate else self.new(B, GATES * U)
        self.dr = self.new(B, U) if key.proj else None  # the gradient of r_t: dhp_t @ Pᵀ
        self.dhp = self.new(B, T, H) if key.proj else None  # the projection's output gradients, for dP
        self.dhp_step = self.new(B, H) if key.proj else None

    def load(self, gates: Tensor, c_buffer: Tensor, valid: Optional[Tensor], d_hs: Optional[Tensor],
             rec: Optional[Tensor], noise: Noise, R: Tensor, P: Optional[Tensor], d_c_last: Optional[Tensor]) -> None:
        self.take("gates", gates)
        self.take("c", c_buffer)
        self.take("valid", valid)
        self.take("d_hs", d_hs)  # e.g. the expanded ones of out.sum(): copied into contiguous memory
        self.take_noise(rec, noise)
        self.take_recurrent(R, R.reshape(self.h_units, GATES, self.key.units).permute(1, 2, 0))
        self.take("P", P)
        self.back.zero_()  # no step after the last
        self.dh.zero_()
        if d_c_last is None:
            self.dc.zero_()
        else:
            self.dc.copy_(d_c_last)

    def run(self, steps: range) -> None:
        key, proj = self.key, self.key.proj
        programs, block = grid(key.batch, key.units)
        launch = _backward_step[programs]
        noise = self.noise_args(2)
        if proj:  # h's part (zoneout, held steps, carry) happens in _projected_backward_step
            noise.update(ZONE_H=ZONE_NONE.value, ZONE_H_RATE=0.0, ZONE_H_THRESH=0)
        constants = dict(GATE_MAJOR=key.gate_major, N_MASKS=key.n_masks, ACT=key.codes[0], REC_ACT=key.codes[1],
                         COMPUTE=compute_type(key.dtype), BLOCK=block, **self.rec_args(), **noise)
        if proj:
            h_programs, h_block = grid(key.batch, proj)
            h_launch = _projected_backward_step[h_programs]
            zone_h = {k: v for k, v in self.noise_args(2).items() if k.startswith("ZONE_H")}
            h_constants = dict(N_MASKS=key.n_masks, COMPUTE=compute_type(key.dtype), BLOCK=h_block, **self.rec_args(),
                               **zone_h)
            P_t = self.P.t()
        R_t = self.R if self.per_gate else self.R.t()  # R_gᵀ panels, or (4U, H)
        back_for_mm = self.back[0]
        for t in steps:
            if proj:
                h_launch(self.d_hs, self.back, self.rec, self.zone[0], self.seed, self.valid, self.dh, self.dhp,
                         self.dhp_step, t, key.batch, proj, key.steps, **h_constants)
                torch.mm(self.dhp_step, P_t, out=self.dr)
            launch(self.gates, self.c, self.valid, self.d_hs, self.back, self.rec, self.upd, self.zone[0], self.zone[1],
                   self.seed, self.dr, self.dh, self.dc, self.dz, self.dz_step, t, key.batch, key.units, key.steps,
                   **constants)
            if self.per_gate:
                torch.bmm(self.dz_step, R_t, out=self.back)
            else:
                torch.mm(self.dz_step, R_t, out=back_for_mm)


def _gradients(needs: tuple, loop: _BackwardLoop, x: Tensor, kernel: Tensor, bias: Optional[Tensor],
               h_buffer: Tensor, r: Optional[Tensor], input_masks: Optional[Tensor], rec: Optional[Tensor]) -> tuple:
    """dx, dkernel, dbias, dR, dP, dh0, dc0 (None where not needed) from a finished backward loop: large
    products over dz (and dhp). None of them is a view of the loop's buffers (dc0 is copied out of a static
    loop)."""
    dz = loop.dz
    dh0 = dc0 = dbias = dR = dP = None
    if needs[4] and r is not None:  # dP = Σ_t r_tᵀ dhp_t
        dP = r.reshape(-1, r.shape[-1]).t() @ loop.dhp.reshape(-1, loop.dhp.shape[-1])
    if needs[5]:
        dh0 = loop.initial_state_grad(rec)
    if needs[6]:
        dc0 = loop.dc.to(x.dtype, copy=loop.static)
    if bias is not None and needs[2]:
        dbias = dz.sum(dim=(0, 1))
    if needs[3]:
        dR = recurrent_kernel_grad(h_buffer[:, :x.shape[1]], rec, dz)
    dx, dkernel = input_grads(x, kernel, input_masks, dz, needs[0], needs[1], GATES)
    return dx, dkernel, dbias, dR, dP, dh0, dc0


# ---------------------------------------------------------------------------------------------- entry points
def forward(x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor, P: Optional[Tensor], h0: Tensor, c0: Tensor,
            input_masks: Optional[Tensor], rec, noise: Noise, valid: Optional[Tensor], codes: tuple, saving: bool,
            precision: Optional[str]) -> tuple[Tensor, Tensor, tuple]:
    """One LSTM cell over a whole sequence -- input projection and recurrence (``operator.gpu_layer``).

    x (B, T, D), kernel (D, 4U), bias (4U,) or None, R (H, 4U) (DropConnect applied), the projection P (U, H)
    or None (then H = U), h0 (B, H), c0 (B, U), input masks (m, B, D) / (T, m, B, D) or None, recurrent masks
    (m, B, H) / per step (a tensor or a CounterMask) or None, the Noise (update masks, zoneout), valid (B, T)
    of 0/1 or None, the activation codes, ``saving`` (whether a backward may follow) and the float32
    products' precision. Returns the h sequence (B, T + 1, H) with h0 in slot 0, the last c (B, U), and
    what the backward reads: the gates, the c sequence (B, T + 1, U) (compute dtype) and, with a projection,
    r (B, T, U) -- None when not saving. Every tensor returned is the call's own.
    """
    proj = 0 if P is None else P.shape[1]
    key = loop_key(CELL, False, x, R.shape[1] // GATES, input_masks, rec, valid, codes, noise=noise, proj=proj,
                   precision=precision)
    names = ("gates", "c", "r") if proj else ("gates", "c")

    def finish(loop: _ForwardLoop):
        return (loop.c[:, -1].to(x.dtype, copy=True), *outputs_and_saved(loop, saving, names))

    c_last, h, saved = run_loop(_ForwardLoop, key, x, (x, kernel, bias, input_masks, R, P, h0, c0, rec, noise, valid),
                                finish)
    return h, c_last, saved


def backward(needs: tuple, d_hs: Tensor, d_c_last: Tensor, x: Tensor, kernel: Tensor, bias: Optional[Tensor], R: Tensor,
             P: Optional[Tensor], input_masks: Optional[Tensor], rec, noise: Noise, valid: Optional[Tensor],
             codes: tuple, h: Tensor, saved: tuple, precision: Optional[str]) -> tuple:
    """dx, dkernel, dbias, dR, dP, dh0, dc0 (None where ``needs``, over x, kernel, bias, R, P, h0, c0, says
    not) from the gradients of the h sequence's steps 1..T (B, T, H) and of the last c, and :func:`forward`'s
    h sequence and saved tensors."""
    gates, c_buffer, r = saved if P is not None else (*saved, None)
    key = loop_key(CELL, True, x, R.shape[1] // GATES, input_masks, rec, valid, codes, has_dhs=True, noise=noise,
                   proj=0 if P is None else P.shape[1], precision=precision)

    def finish(loop: _BackwardLoop):  # dz is consumed here, before any other replay can overwrite it
        return _gradients(needs, loop, x, kernel, bias, h, r, input_masks, rec)

    return run_loop(_BackwardLoop, key, x, (gates, c_buffer, valid, d_hs, rec, noise, R, P, d_c_last), finish)
