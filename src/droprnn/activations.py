"""Activations by Keras name or as any callable.

``hard_sigmoid`` is Keras 3's ``relu6(x + 3) / 6`` (slope 1/6; Keras 2 used slope 0.2).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from .errors import DroprnnError

Activation = Callable[[torch.Tensor], torch.Tensor]
ActivationLike = Union[str, Activation, None]


def linear(x: torch.Tensor) -> torch.Tensor:
    return x


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


def hard_silu(x: torch.Tensor) -> torch.Tensor:
    return x * hard_sigmoid(x)


def exponential(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    # Keras's default gelu is the tanh approximation.
    return F.gelu(x, approximate="tanh")


_BY_NAME: dict[str, Activation] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "relu": torch.relu,
    "relu6": F.relu6,
    "elu": F.elu,
    "selu": torch.selu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "silu": F.silu,
    "swish": F.silu,
    "hard_silu": hard_silu,
    "hard_swish": hard_silu,
    "gelu": gelu,
    "mish": F.mish,
    "exponential": exponential,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "linear": linear,
}


def get(activation: ActivationLike, where: str = "layer", argument: str = "activation") -> Activation:
    """Resolve a Keras activation name, ``None`` (linear) or a callable to a callable."""
    if activation is None:
        return linear
    if isinstance(activation, str):
        try:
            return _BY_NAME[activation]
        except KeyError:
            names = ", ".join(sorted(_BY_NAME))
            raise DroprnnError(
                f"{where}: argument `{argument}` expected one of {names}, or a callable; got {activation!r}."
            ) from None
    if callable(activation):
        return activation
    raise DroprnnError(f"{where}: argument `{argument}` expected a name or a callable, got {activation!r}.")
