"""Keras's weight initializers, by name or as objects, for (in, out) shaped weights.

Fans follow Keras: for a 2-D weight, ``fan_in = shape[0]`` and ``fan_out = shape[1]`` of the whole fused
matrix (so an LSTM kernel's fan_out is 4·units). ``Orthogonal`` acts on the whole recurrent matrix,
giving one matrix with orthonormal rows, not one orthogonal block per gate.

An initializer is called as ``init(shape, dtype=..., device=...)`` and returns a new tensor. Besides the
names and classes here, any callable ``f(shape, dtype=None)`` returning an array works (Keras style), and
so does an in-place ``torch.nn.init`` function such as ``torch.nn.init.xavier_uniform_``.
Random initializers use torch's global RNG unless given ``seed=``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .errors import DroprnnError

Shape = Sequence[int]


class Initializer:
    """Base class: ``__call__(shape, dtype, device)`` returns a new tensor."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator

    def __call__(self, shape: Shape, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        values = self.sample(tuple(shape))
        return values.to(dtype=dtype or torch.get_default_dtype(), device=device)

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:  # float64 on the CPU, cast by __call__
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Zeros(Initializer):
    def sample(self, shape):
        return torch.zeros(shape, dtype=torch.float64)


class Ones(Initializer):
    def sample(self, shape):
        return torch.ones(shape, dtype=torch.float64)


class Constant(Initializer):
    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = float(value)

    def sample(self, shape):
        return torch.full(shape, self.value, dtype=torch.float64)


class RandomUniform(Initializer):
    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.minval, self.maxval = float(minval), float(maxval)

    def sample(self, shape):
        u = torch.rand(shape, dtype=torch.float64, generator=self._generator())
        return self.minval + (self.maxval - self.minval) * u


class RandomNormal(Initializer):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.stddev = float(mean), float(stddev)

    def sample(self, shape):
        return self.mean + self.stddev * torch.randn(shape, dtype=torch.float64, generator=self._generator())


class TruncatedNormal(RandomNormal):
    """Normal truncated to two standard deviations, redrawn outside (as Keras)."""

    def sample(self, shape):
        z = torch.empty(shape, dtype=torch.float64)
        torch.nn.init.trunc_normal_(z, 0.0, 1.0, -2.0, 2.0, generator=self._generator())
        return self.mean + self.stddev * z


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class VarianceScaling(Initializer):
    def __init__(
        self, scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal", seed: int | None = None
    ) -> None:
        super().__init__(seed)
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise DroprnnError(f"VarianceScaling: argument `mode` expected fan_in, fan_out or fan_avg, got {mode!r}.")
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise DroprnnError(
                "VarianceScaling: argument `distribution` expected truncated_normal, untruncated_normal or "
                f"uniform, got {distribution!r}."
            )
        self.scale, self.mode, self.distribution = float(scale), mode, distribution

    def sample(self, shape):
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        variance = self.scale / max(1.0, n)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return RandomUniform(-limit, limit, self.seed).sample(shape)
        if self.distribution == "untruncated_normal":
            return RandomNormal(0.0, math.sqrt(variance), self.seed).sample(shape)
        # 0.879... is the std of a unit normal truncated to [-2, 2]; dividing restores the variance.
        return TruncatedNormal(0.0, math.sqrt(variance) / 0.87962566103423978, self.seed).sample(shape)


def GlorotUniform(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(1.0, "fan_avg", "uniform", seed)


def GlorotNormal(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(1.0, "fan_avg", "truncated_normal", seed)


def HeUniform(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(2.0, "fan_in", "uniform", seed)


def HeNormal(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(2.0, "fan_in", "truncated_normal", seed)


def LecunUniform(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(1.0, "fan_in", "uniform", seed)


def LecunNormal(seed: int | None = None) -> VarianceScaling:
    return VarianceScaling(1.0, "fan_in", "truncated_normal", seed)


class Orthogonal(Initializer):
    """Keras's orthogonal: QR of a normal (max, min) matrix, signs fixed by diag(R), transposed if wide."""

    def __init__(self, gain: float = 1.0, seed: int | None = None) -> None:
        super().__init__(seed)
        self.gain = float(gain)

    def sample(self, shape):
        if len(shape) < 2:
            raise DroprnnError(f"Orthogonal: expected a shape of rank >= 2, got {shape!r}.")
        rows = math.prod(shape[:-1])
        cols = shape[-1]
        flat = torch.randn((max(rows, cols), min(rows, cols)), dtype=torch.float64, generator=self._generator())
        q, r = torch.linalg.qr(flat)
        q = q * torch.sign(torch.diagonal(r))
        if rows < cols:
            q = q.T
        return self.gain * q.reshape(shape)


class Identity(Initializer):
    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = float(gain)

    def sample(self, shape):
        if len(shape) != 2:
            raise DroprnnError(f"Identity: expected a 2-D shape, got {shape!r}.")
        return self.gain * torch.eye(*shape, dtype=torch.float64)


_BY_NAME: dict[str, Callable[[], Initializer]] = {
    "zeros": Zeros,
    "zero": Zeros,
    "ones": Ones,
    "one": Ones,
    "constant": Constant,
    "uniform": RandomUniform,
    "random_uniform": RandomUniform,
    "normal": RandomNormal,
    "random_normal": RandomNormal,
    "truncated_normal": TruncatedNormal,
    "glorot_uniform": GlorotUniform,
    "glorot_normal": GlorotNormal,
    "he_uniform": HeUniform,
    "he_normal": HeNormal,
    "lecun_uniform": LecunUniform,
    "lecun_normal": LecunNormal,
    "orthogonal": Orthogonal,
    "identity": Identity,
    "variance_scaling": VarianceScaling,
}

InitializerLike = Union[str, Callable[..., Any]]


class _Callable(Initializer):
    """Adapts a user callable: Keras style ``f(shape, dtype=None)`` or in-place torch style ``f_(tensor)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def __call__(self, shape, dtype=None, device=None):
        dtype = dtype or torch.get_default_dtype()
        if getattr(self.fn, "__module__", "") == "torch.nn.init":
            tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
            with torch.no_grad():
                self.fn(tensor)
            return tensor
        try:
            values = self.fn(tuple(shape), dtype=dtype)
        except TypeError:
            values = self.fn(tuple(shape))
        return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values).to(dtype=dtype, device=device)


def get(initializer: InitializerLike, where: str = "layer", argument: str = "initializer") -> Initializer:
    """Resolve a Keras name, an :class:`Initializer`, or a callable."""
    if isinstance(initializer, Initializer):
        return initializer
    if isinstance(initializer, str):
        try:
            return _BY_NAME[initializer]()
        except KeyError:
            names = ", ".join(sorted(_BY_NAME))
            raise DroprnnError(
                f"{where}: argument `{argument}` expected one of {names}, an Initializer or a callable; "
                f"got {initializer!r}."
            ) from None
    if callable(initializer):
        return _Callable(initializer)
    raise DroprnnError(f"{where}: argument `{argument}` expected a name or a callable, got {initializer!r}.")
