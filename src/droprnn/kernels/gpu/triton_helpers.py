"""Triton device functions shared by the step kernels (``lstm.py``, ``gru.py``), and how they are launched.

Only Triton builtins here (tl.exp, tl.where, tl.full, …), none of triton.language.standard (tl.sigmoid,
tl.zeros_like, tl.sum, …): the library's own @jit helpers are compiled
for the GPU when Triton is imported before TRITON_INTERPRET=1 is set, and would then refuse to run inside
an interpreted kernel. These functions are jit'd when this module is first imported, which is when the
kernels that call them are (``lstm.py``, ``gru.py`` and ``simple.py`` import this module), so all of them run
the same way.

Precision: the kernels load every operand into ``COMPUTE`` -- float64 for float64 tensors, float32 for
float32, float16 and bfloat16 ones -- and round once, on the store. The states a recurrence carries from
step to step (the LSTM's c, the GRU's h, the backward's dh and dc) live in buffers of that compute type,
so half-precision inputs accumulate nothing in half precision; what the products read and what autograd
receives is in the input dtype.

Every buffer's layout is fixed by the
sizes (B, T, U) and the constexprs, so a launch passes pointers and four sizes only: each argument costs
launch time on the host, and the per-step launches are what bounds a short-sequence step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dropout.plan import RECURRENT_STREAM, UPDATE_STREAM, ZONEOUT_STREAMS
from . import noise
from .operator import carry_dtype

# The counter streams of the plan's per-step masks (dropout/plan.py numbers them), as the kernels name them.
STREAM_RECURRENT = tl.constexpr(RECURRENT_STREAM)
STREAM_UPDATE = tl.constexpr(UPDATE_STREAM)
STREAM_ZONEOUT_H = tl.constexpr(ZONEOUT_STREAMS[0])
STREAM_ZONEOUT_C = tl.constexpr(ZONEOUT_STREAMS[1])
# The noise codes (noise.py), as the kernels compare them.
REC_PER_SEQUENCE, REC_COUNTER = tl.constexpr(noise.REC_PER_SEQUENCE), tl.constexpr(noise.REC_COUNTER)
UPDATE_NONE, UPDATE_PER_SEQUENCE = tl.constexpr(noise.UPDATE_NONE), tl.constexpr(noise.UPDATE_PER_SEQUENCE)
UPDATE_COUNTER = tl.constexpr(noise.UPDATE_COUNTER)
ZONE_NONE, ZONE_EXPECTATION = tl.constexpr(noise.ZONE_NONE), tl.constexpr(noise.ZONE_EXPECTATION)
ZONE_COUNTER = tl.constexpr(noise.ZONE_COUNTER)

# Units per program: a (B, ceil(U / BLOCK)) grid; 128 keeps enough programs for small batches on big GPUs.
_MAX_BLOCK = 128


@triton.jit
def activate(x, CODE: tl.constexpr):
    """The activation with code CODE (kernels.ACTIVATION_CODES) of x."""
    if CODE == 0:  # tanh, from exp(-2|x|) so that it never overflows
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0.0, -y, y)
    elif CODE == 1:  # sigmoid
        return 1.0 / (1.0 + tl.exp(-x))
    elif CODE == 2:  # hard_sigmoid, Keras 3: relu6(x + 3) / 6
        return tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif CODE == 3:  # relu
        return tl.maximum(x, 0.0)
    else:  # linear
        return x


@triton.jit
def through(grad, y, CODE: tl.constexpr):
    """grad · f'(x), from the activation's output y = f(x) (torch's derivatives, boundaries included)."""
    if CODE == 0:
        return grad * (1.0 - y * y)
    elif CODE == 1:
        return grad * (1.0 - y) * y
    elif CODE == 2:  # relu6's gradient is zero at both corners
        return tl.where((y > 0.0) & (y < 1.0), grad / 6.0, 0.0)
    elif CODE == 3:
        return tl.where(y > 0.0, grad, 0.0)
    else:
        return grad


@triton.jit
def program_units(U, BLOCK: tl.constexpr):
    """What program (b, j) of a step kernel's (B, ceil(U / BLOCK)) grid works on: sequence b (int64, so that
    offsets are computed in 64 bits), the units u = [BLOCK·j, BLOCK·(j+1)), and which of them exist."""
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), u, u < U


@triton.jit
def gate_offset(b, t, g, B, T, U, GATES: tl.constexpr, GATE_MAJOR: tl.constexpr):
    """Offset of (sequence b, step t, gate g) in a gates sequence: (B, T, G, U), or (G, B, T, U) when
    GATE_MAJOR (per-gate input masks: one input product per gate)."""
    if GATE_MAJOR:
        return ((g * B + b) * T + t) * U
    else:
        return ((b * T + t) * GATES + g) * U


@triton.jit
def step_offset(b, g, B, U, GATES: tl.constexpr, N_MASKS: tl.constexpr):
    """Offset of (gate g, sequence b) in one step's product or gate gradients: (G, B, U) with per-gate
    recurrent masks (N_MASKS > 1: one product per gate), else (B, G, U) (one product for all gates)."""
    if N_MASKS > 1:
        return (g * B + b) * U
    else:
        return (b * GATES + g) * U


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (droprnn.random._mix_u32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def counter_bits(seed_ptr, STREAM: tl.constexpr, index):
    """The 24-bit numbers of entries ``index`` (int64) of counter stream STREAM under the seed at ``seed_ptr``
    (two int64 words below 2³²): :func:`droprnn.random.counter_bits`, bit for bit."""
    words = ((tl.load(seed_ptr + 1) + STREAM * 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
    h = _mix32((index & 0xFFFFFFFF).to(tl.uint32) ^ tl.load(seed_ptr).to(tl.uint32))
    h = _mix32(h ^ words)
    h = _mix32(h ^ (index >> 32).to(tl.uint32))
    return h >> 8


@triton.jit
def counter_value(seed_ptr, STREAM: tl.constexpr, index, THRESH: tl.constexpr, LOW: tl.constexpr,
                  HIGH: tl.constexpr, COMPUTE: tl.constexpr):
    """A counter-based mask entry (droprnn.random.CounterMask): LOW where its number is below THRESH, else
    HIGH -- (0, 1 / (1 - rate)) for dropout, (1, 0) for zoneout's keep-old indicator."""
    low = counter_bits(seed_ptr, STREAM, index) < THRESH
    # the values made in COMPUTE: a float literal alone would pass through float32
    return tl.where(low, tl.full(index.shape, LOW, COMPUTE), tl.full(index.shape, HIGH, COMPUTE))


@triton.jit
def rec_mask(masks_ptr, seed_ptr, step, k, b, u, inside, B, U, N_MASKS: tl.constexpr, REC_MODE: tl.constexpr,
             REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, COMPUTE: tl.constexpr):
    """Recurrent mask k on sequence b's units u at step ``step``: the call's (m, B, U) when REC_MODE is 0,
    else per step (T, m, B, U), read (1) or made from counter stream 0 (2)."""
    if REC_MODE == REC_PER_SEQUENCE:
        offset = (k * B + b) * U + u
    else:
        offset = ((step.to(tl.int64) * N_MASKS + k) * B + b) * U + u
    if REC_MODE == REC_COUNTER:
        return counter_value(seed_ptr, STREAM_RECURRENT, offset, REC_THRESH, 0.0, REC_SCALE, COMPUTE)
    else:
        return tl.load(masks_ptr + offset, mask=inside).to(COMPUTE)


@triton.jit
def next_step(t, T):
    """The step whose products read h_t: t + 1 (after the last step none does; any real step serves)."""
    return tl.minimum(t + 1, T - 1)


@triton.jit
def store_product_inputs(masked_ptr, masks_ptr, seed_ptr, step, h, b, u, inside, B, U, N_MASKS: tl.constexpr,
                         N_PRODUCTS: tl.constexpr, REC_MODE: tl.constexpr, REC_THRESH: tl.constexpr,
                         REC_SCALE: tl.constexpr, COMPUTE: tl.constexpr):
    """Write step ``step``'s product inputs (m, B, U): h ⊙ m_k for the first N_PRODUCTS per-gate masks, h ⊙ m
    with a shared mask, h itself without -- so that no separate pass multiplies the masks in."""
    dtype = masked_ptr.dtype.element_ty
    if N_MASKS == 0:
        tl.store(masked_ptr + b * U + u, h.to(dtype), mask=inside)
    else:
        for k in tl.static_range(N_PRODUCTS if N_MASKS > 1 else 1):
            m = rec_mask(masks_ptr, seed_ptr, step, k, b, u, inside, B, U, N_MASKS, REC_MODE, REC_THRESH, REC_SCALE,
                         COMPUTE)
            tl.store(masked_ptr + (k * B + b) * U + u, (h * m).to(dtype), mask=inside)


@triton.jit
def incoming_grad(dh_ptr, dhs_ptr, back_ptr, masks_ptr, seed_ptr, step, b, t, u, inside, B, T, U,
                  HAS_DHS: tl.constexpr, N_MASKS: tl.constexpr, N_PRODUCTS: tl.constexpr, REC_MODE: tl.constexpr,
                  REC_THRESH: tl.constexpr, REC_SCALE: tl.constexpr, COMPUTE: tl.constexpr):
    """The gradient reaching h_t: the carry dh (B, U) from the step after, dH_t (B, T, U) from the layer's
    output, and the step after's recurrent products Q_k = dz_k @ R_kᵀ (``back``, (m, B, U)) through that
    step's masks (``step``): Σ_k Q_k ⊙ m_k over the first N_PRODUCTS per-gate masks, Q ⊙ m shared, or Q
    without masks."""
    dh = tl.load(dh_ptr + b * U + u, mask=inside).to(COMPUTE)
    if HAS_DHS:
        dh += tl.load(dhs_ptr + (b * T + t) * U + u, mask=inside).to(COMPUTE)
    if N_MASKS == 0:
        dh += tl.load(back_ptr + b * U + u, mask=inside).to(COMPUTE)
    else:
        for k in tl.static_range(N_PRODUCTS if N_MASKS > 1 else 1):
            q = tl.load(back_ptr + (k * B + b) * U + u, mask=inside).to(COMPUTE)
            dh += q * rec_mask(masks_ptr, seed_ptr, step, k, b, u, inside, B, U, N_MASKS, REC_MODE, REC_THRESH,
                               REC_SCALE, COMPUTE)
    return dh


@triton.jit
def update_mask(upd_ptr, seed_ptr, b, t, u, inside, B, U, UPDATE: tl.constexpr, UPD_THRESH: tl.constexpr,
                UPD_SCALE: tl.constexpr, COMPUTE: tl.constexpr):
    """The mask on the cell update at step t (Semeniuta et al.): UPDATE 1 one per sequence (B, U), 2 one
    per step (T, B, U), 3 per step from counter stream 1. Only called when UPDATE != 0."""
    if UPDATE == UPDATE_PER_SEQUENCE:  # one chain, as in zoneout_keep
        return tl.load(upd_ptr + b * U + u, mask=inside, other=0.0).to(COMPUTE)
    elif UPDATE == UPDATE_COUNTER:
        return counter_value(seed_ptr, STREAM_UPDATE, (t.to(tl.int64) * B + b) * U + u, UPD_THRESH, 0.0, UPD_SCALE,
                             COMPUTE)
    else:
        return tl.load(upd_ptr + (t.to(tl.int64) * B + b) * U + u, mask=inside, other=0.0).to(COMPUTE)


@triton.jit
def zoneout_keep(zone_ptr, seed_ptr, STREAM: tl.constexpr, b, t, u, inside, B, U, ZONE: tl.constexpr,
                 RATE: tl.constexpr, THRESH: tl.constexpr, COMPUTE: tl.constexpr):
    """d, the share of the old state a unit keeps at step t: ZONE 1 the drawn 0/1 indicators (T, B, U),
    2 their expectation RATE (inference), 3 the indicators made from counter stream STREAM. Only called when
    ZONE != 0; the state is d·old + (1 - d)·fresh."""
    # One if/elif chain: Triton compiles the code after a constexpr branch's return, and an absent input's
    # pointer is None there.
    if ZONE == ZONE_EXPECTATION:
        return tl.full(u.shape, RATE, COMPUTE)
    elif ZONE == ZONE_COUNTER:
        return counter_value(seed_ptr, STREAM, (t.to(tl.int64) * B + b) * U + u, THRESH, 1.0, 0.0, COMPUTE)
    else:
        return tl.load(zone_ptr + (t.to(tl.int64) * B + b) * U + u, mask=inside, other=0.0).to(COMPUTE)


@triton.jit
def zoneout_split(grad, zone_ptr, seed_ptr, STREAM: tl.constexpr, b, t, u, inside, B, U, ZONE: tl.constexpr,
                  RATE: tl.constexpr, THRESH: tl.constexpr, COMPUTE: tl.constexpr):
    """The gradient of a zoned state d·old + (1 - d)·fresh split in two: (1 - d)·grad for the fresh value,
    d·grad straight to the step before (zeros without zoneout)."""
    if ZONE == ZONE_NONE:
        return grad, tl.full(grad.shape, 0.0, grad.dtype)  # not tl.zeros_like: a @jit helper (see above)
    else:
        d = zoneout_keep(zone_ptr, seed_ptr, STREAM, b, t, u, inside, B, U, ZONE, RATE, THRESH, COMPUTE)
        return grad * (1.0 - d), grad * d


@triton.jit
def carry_state(h, h_prev, carry_ptr, h_ptr, zone_ptr, seed_ptr, valid_ptr, b, t, u, inside, B, T, U,
                ZONE_H: tl.constexpr, ZONE_H_RATE: tl.constexpr, ZONE_H_THRESH: tl.constexpr,
                HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr):
    """The step's h from its fresh value: zoned (d ⊙ h_{t-1} + (1 - d) ⊙ h), h_{t-1} itself where the step is
    masked; stored in the carry (B, U) and in slot t + 1 of the h sequence (B, T + 1, U), and returned."""
    if ZONE_H != ZONE_NONE:
        d = zoneout_keep(zone_ptr, seed_ptr, STREAM_ZONEOUT_H, b, t, u, inside, B, U, ZONE_H, ZONE_H_RATE,
                         ZONE_H_THRESH, COMPUTE)
        h = d * h_prev + (1.0 - d) * h
    if HAS_VALID:
        h = tl.where(step_is_real(valid_ptr, b, t, T), h, h_prev)
    tl.store(carry_ptr + b * U + u, h.to(carry_ptr.dtype.element_ty), mask=inside)
    tl.store(h_ptr + (b * (T + 1) + t + 1) * U + u, h.to(h_ptr.dtype.element_ty), mask=inside)
    return h


@triton.jit
def step_is_real(valid_ptr, b, t, T):
    """Whether step t of sequence b is real (the step mask (B, T) holds 0 where it is masked)."""
    return tl.load(valid_ptr + b * T + t) != 0


def given(**flags: str):
    """Decorates a step kernel so that each flag is whether its launch passed a tensor for that pointer:
    ``@given(HAS_VALID="valid_ptr")``. An absent input is passed as None, which Triton specialises on, and
    the flag keeps the code that would read it out of the kernel."""
    return triton.heuristics({flag: (lambda args, name=name: args[name] is not None) for flag, name in flags.items()})


# Whether Triton compiled the functions above for its CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(activate).__name__ == "InterpretedFunction"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the carried states: float64 for float64 tensors, else float32."""
    return carry_dtype(dtype)


def compute_type(dtype: torch.dtype):
    """The Triton type the kernels compute in for tensors of ``dtype`` (a COMPUTE constexpr)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def grid(batch: int, units: int) -> tuple[tuple[int, int], int]:
    """The launch grid (B, ceil(U / BLOCK)) of a step kernel, and BLOCK."""
    block = min(triton.next_power_of_2(units), _MAX_BLOCK)
    return (batch, triton.cdiv(units, block)), block
