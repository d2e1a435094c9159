"""Where every random draw of droprnn comes from.

A stochastic layer owns one :class:`SeedStream`. With ``seed=None`` it draws from torch's global RNG, so
``torch.manual_seed`` governs it like any PyTorch module. With an integer seed it follows Keras 3's
``SeedGenerator`` on the torch backend: the k-th draw uses a fresh ``torch.Generator`` seeded with
``(seed + k) mod 2**32``. That makes seeded droprnn layers reproducible run to run, independent of
anything else using the global RNG, and draw-for-draw identical to seeded Keras layers on the torch
backend (same masks on the CPU).

Inside a program that ``torch.compile`` builds, a ``torch.Generator`` cannot be made, and a Python counter
baked into the program would make it recompile at every call. A seeded stream there draws from the
counter-based hash below instead (:func:`counter_bits`, pure tensor ops), keyed by its seed and a counter
held in a tensor that the program advances in place: compiled seeded draws are reproducible run to run
and independent of the global RNG, but they are not the masks the eager layer (and Keras) draws. Unseeded
streams draw from torch's global RNG either way (under Inductor with its own generator, so compiled and
eager masks differ there too, unless ``torch._inductor.config.fallback_random = True``).
"""

from __future__ import annotations

import math

import torch

from .errors import check_seed


class SeedStream:
    """A sequence of generators: one per draw, as Keras's ``SeedGenerator`` (state ``[seed, counter]``)."""

    def __init__(self, seed: int | None, owner: str = "layer") -> None:
        self.seed = check_seed(owner, seed)
        self.counter = 0
        # The draws made inside compiled programs (see the module docstring), as a tensor they advance.
        self.compiled_counter = None if self.seed is None else torch.zeros((), dtype=torch.int64)

    def next_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for the next draw (``None`` means torch's global RNG)."""
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed + self.counter) & 0xFFFFFFFF)
        self.counter += 1
        return generator

    def skip(self, draws: int) -> None:
        """Advance past ``draws`` draws without making them.

        Keras draws the recurrent masks even in inference calls; skipping keeps a seeded stream in step
        with Keras without paying for masks that are never applied.
        """
        if self.seed is not None and not torch.compiler.is_compiling():
            self.counter += draws

    def next_compiled_seed(self, device: torch.device) -> torch.Tensor:
        """Inside a compiled program: the counter seed of the next draw (two 32-bit words, an int64 tensor
        on ``device``): this stream's seed and its compiled-draw counter, which advances."""
        seed = torch.stack([torch.full((), self.seed & _U32, dtype=torch.int64), self.compiled_counter.clone()])
        self.compiled_counter.add_(1)
        return seed.to(device)

    def __repr__(self) -> str:
        return f"SeedStream(seed={self.seed}, counter={self.counter})"


def _compiled(stream: SeedStream) -> bool:
    """Whether this draw is a seeded one inside a compiled program (see the module docstring)."""
    return stream.seed is not None and torch.compiler.is_compiling()


def _compiled_uniform(shape: tuple[int, ...], stream: SeedStream, device: torch.device) -> torch.Tensor:
    """Uniform numbers in (0, 1) of ``shape`` in float32, one compiled draw from a seeded ``stream``."""
    index = torch.arange(math.prod(shape), device=device).view(shape)
    bits = counter_bits(stream.next_compiled_seed(device), 0, index)
    return (bits.to(torch.float32) + 0.5) / (1 << COUNTER_BITS)


def keep_mask(shape: tuple[int, ...], rate: float, stream: SeedStream, device: torch.device) -> torch.Tensor:
    """A boolean Bernoulli(1 - rate) mask of ``shape`` (True = keep), one draw from ``stream``."""
    if _compiled(stream):
        return _compiled_uniform(shape, stream, device) >= rate
    probabilities = torch.full(shape, 1.0 - rate, dtype=torch.float32, device=device)
    return torch.bernoulli(probabilities, generator=stream.next_generator(device)).bool()


def dropout_mask(
    shape: tuple[int, ...], rate: float, stream: SeedStream, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An inverted-dropout multiplier of ``shape``: entries 0 or ``1 / (1 - rate)`` rounded to ``dtype``.

    Keras's recurrent cells build the same tensor (dropout applied to ones) and multiply by it. A seeded
    stream draws as Keras does (a Bernoulli of a probability tensor, then the cast and the scale), so seeded
    masks equal Keras's. So does the global RNG on the CPU, so that a mask's values depend on the seed alone
    and equal those of :func:`keep_mask` (``Dropout``, ``SpatialDropout1D``) of the same shape: torch's
    Bernoulli of a scalar probability on the CPU takes MKL's generator on Intel CPUs and mt19937 elsewhere,
    and consumes the global stream differently from the tensor form. On a GPU the global RNG draws in place
    in ``dtype`` and scales in place: two kernel launches instead of five, the same distribution.
    """
    if stream.seed is None and device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - rate).div_(1.0 - rate)
    keep = keep_mask(shape, rate, stream, device)
    return keep.to(dtype) / (1.0 - rate)


def normal(
    shape: tuple[int, ...], mean: float, std: float, stream: SeedStream, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if _compiled(stream):  # Box-Muller over two compiled draws
        radius = torch.sqrt(-2.0 * torch.log(_compiled_uniform(shape, stream, device)))
        angle = (2.0 * math.pi) * _compiled_uniform(shape, stream, device)
        return (mean + std * radius * torch.cos(angle)).to(dtype)
    return torch.normal(mean, std, size=shape, generator=stream.next_generator(device), dtype=dtype, device=device)


def uniform(shape: tuple[int, ...], stream: SeedStream, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _compiled(stream):
        return _compiled_uniform(shape, stream, device).to(dtype)
    return torch.rand(shape, generator=stream.next_generator(device), dtype=dtype, device=device)


def derived_seed(seed: int | None, index: int) -> int | None:
    """The seed of sub-stream ``index`` of ``seed`` (index 0 is ``seed`` itself; None stays None).

    Sub-streams sit far apart, so ``seed + k`` for the small draw counters k of one stream never meets
    another stream's.
    """
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B1) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- counter-based masks
# A mask entry made from (seed, stream, flat index) alone: a kernel makes the entry where it uses it instead
# of reading it from a stored tensor, and every device makes the same one. The same integer steps run here
# (int64 tensors holding uint32 values) and in the GPU kernels (kernels/gpu/triton_helpers.counter_bits).
_U32 = 0xFFFFFFFF
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (C. Wellons's hash prospector): a bijection on 32 bits
STREAM_STEP = 0x9E3779B9  # stream k adds k times this to the seed's second word
COUNTER_BITS = 24  # each entry's uniform number has this many bits: exact in float32


def _mul_u32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² for x in [0, 2³²), without overflowing int64: the constant in 16-bit halves."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _U32


def _mix_u32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul_u32(x, _MIX_1)
    x = x ^ (x >> 15)
    x = _mul_u32(x, _MIX_2)
    return x ^ (x >> 16)


def counter_bits(seed: torch.Tensor, stream: int, index: torch.Tensor) -> torch.Tensor:
    """The 24-bit numbers of entries ``index`` (int64, any shape) of counter stream ``stream`` under ``seed``
    (an int64 tensor of two 32-bit words): three rounds of a 32-bit mixing bijection over the index's low
    word, the seed and stream, and the index's high word."""
    seed = seed.to(index.device)
    words = (seed[1] + stream * STREAM_STEP) & _U32
    h = _mix_u32((index & _U32) ^ seed[0])
    h = _mix_u32(h ^ words)
    h = _mix_u32(h ^ (index >> 32))
    return h >> (32 - COUNTER_BITS)


def counter_threshold(rate: float) -> int:
    """An entry is dropped (a zoneout unit keeps its old value) where its number is below this: probability
    ``rate`` to within 2⁻²⁴."""
    return round(rate * (1 << COUNTER_BITS))


def draw_seed(stream: SeedStream, device: torch.device) -> torch.Tensor:
    """A counter seed, two 32-bit words as an int64 tensor on ``device``: one draw from ``stream``, made on
    the device, so drawing it never waits for the device."""
    if _compiled(stream):
        return stream.next_compiled_seed(device)
    return torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device, generator=stream.next_generator(device))


class CounterMask:
    """A per-step mask that is never stored: entry i is made from (seed, stream, i) when it is needed (by
    the GPU kernels inside their steps; :meth:`materialize` makes the tensor for everything else).

    shape: (T, ...) with the step axis first; kind "dropout": 0 or 1 / (1 - rate) in ``dtype``; kind
    "keep": zoneout's keep-old indicator d, 1 with probability ``rate``. Tensor-like where the plan's users
    need it: ``shape``, ``dim()``, ``mask[t]`` (step t only), ``to(dtype)``.
    """

    def __init__(self, seed: torch.Tensor, stream: int, shape: tuple[int, ...], rate: float, kind: str,
                 dtype: torch.dtype) -> None:
        if kind not in ("dropout", "keep"):
            raise ValueError(f"CounterMask: kind expected 'dropout' or 'keep', got {kind!r}")
        self.seed, self.stream, self.shape = seed, stream, torch.Size(shape)
        self.rate, self.kind, self.dtype = float(rate), kind, dtype

    @property
    def device(self) -> torch.device:
        return self.seed.device

    @property
    def threshold(self) -> int:
        return counter_threshold(self.rate)

    @property
    def scale(self) -> float:
        """The value of a kept entry: 1 / (1 - rate) for dropout, 1 for zoneout indicators."""
        return 1.0 / (1.0 - self.rate) if self.kind == "dropout" else 1.0

    def dim(self) -> int:
        return len(self.shape)

    def to(self, dtype: torch.dtype) -> "CounterMask":
        return CounterMask(self.seed, self.stream, tuple(self.shape), self.rate, self.kind, dtype)

    def _values(self, index: torch.Tensor) -> torch.Tensor:
        low = counter_bits(self.seed, self.stream, index) < self.threshold
        hit = low if self.kind == "keep" else ~low
        if self.kind == "keep":
            return hit.to(self.dtype)
        return hit.to(self.dtype) / (1.0 - self.rate)

    def materialize(self) -> torch.Tensor:
        """The whole mask as a tensor of ``shape``."""
        return self._values(torch.arange(self.shape.numel(), device=self.device).view(self.shape))

    def __getitem__(self, step: int) -> torch.Tensor:
        """Step ``step``'s mask, shape[1:]."""
        size = self.shape[1:].numel()
        return self._values(torch.arange(step * size, (step + 1) * size, device=self.device).view(self.shape[1:]))

    def gate(self, g: int) -> torch.Tensor:
        """Entry g of the second axis at every step: (T, *shape[2:])."""
        steps, count = self.shape[0], self.shape[1]
        inner = self.shape[2:].numel()
        index = ((torch.arange(steps, device=self.device) * count + g) * inner)[:, None] + torch.arange(
            inner, device=self.device)
        return self._values(index.view(steps, *self.shape[2:]))

    def __repr__(self) -> str:
        return f"CounterMask(shape={tuple(self.shape)}, rate={self.rate}, kind={self.kind!r}, stream={self.stream})"
