"""Where every random draw of droprnn comes from.

A stochastic layer owns one :class:`SeedStream`. With ``seed=None`` it draws from torch's global RNG, so
``torch.manual_seed`` governs it like any PyTorch module. With an integer seed it follows Keras 3's
``SeedGenerator`` on the torch backend: the k-th draw uses a fresh ``torch.Generator`` seeded with
``(seed + k) mod 2**32``. That makes seeded droprnn layers reproducible run to run, independent of
anything else using the global RNG, and draw-for-draw identical to seeded Keras layers on the torch
backend (same masks on the CPU).
"""

from __future__ import annotations

import torch

from .errors import check_seed


class SeedStream:
    """A sequence of generators: one per draw, as Keras's ``SeedGenerator`` (state ``[seed, counter]``)."""

    def __init__(self, seed: int | None, owner: str = "layer") -> None:
        self.seed = check_seed(owner, seed)
        self.counter = 0

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
        if self.seed is not None:
            self.counter += draws

    def __repr__(self) -> str:
        return f"SeedStream(seed={self.seed}, counter={self.counter})"


def keep_mask(shape: tuple[int, ...], rate: float, stream: SeedStream, device: torch.device) -> torch.Tensor:
    """A boolean Bernoulli(1 - rate) mask of ``shape`` (True = keep), one draw from ``stream``."""
    probabilities = torch.full(shape, 1.0 - rate, dtype=torch.float32, device=device)
    return torch.bernoulli(probabilities, generator=stream.next_generator(device)).bool()


def dropout_mask(
    shape: tuple[int, ...], rate: float, stream: SeedStream, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An inverted-dropout multiplier of ``shape``: entries 0 or ``1 / (1 - rate)`` rounded to ``dtype``.

    Keras's recurrent cells build the same tensor (dropout applied to ones) and multiply by it. A seeded
    stream draws as Keras does (a Bernoulli of a probability tensor, then the cast and the scale), so seeded
    masks equal Keras's; the global RNG draws in place in ``dtype`` and scales in place: two kernel launches
    on a GPU instead of five, the same distribution and values.
    """
    if stream.seed is None:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - rate).div_(1.0 - rate)
    keep = keep_mask(shape, rate, stream, device)
    return keep.to(dtype) / (1.0 - rate)


def normal(
    shape: tuple[int, ...], mean: float, std: float, stream: SeedStream, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.normal(mean, std, size=shape, generator=stream.next_generator(device), dtype=dtype, device=device)


def uniform(shape: tuple[int, ...], stream: SeedStream, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=stream.next_generator(device), dtype=dtype, device=device)


def derived_seed(seed: int | None, index: int) -> int | None:
    """The seed of sub-stream ``index`` of ``seed`` (index 0 is ``seed`` itself; None stays None).

    Sub-streams sit far apart, so ``seed + k`` for the small draw counters k of one stream never meets
    another stream's.
    """
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B1) & 0x7FFFFFFF
