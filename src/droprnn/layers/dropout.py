"""Keras's dropout-family layers. Each acts only in training and is the identity otherwise; each has its
own :class:`~droprnn.random.SeedStream` (``seed=``) or uses torch's global RNG (``seed=None``).

Where they sit relative to a recurrent layer is the point of droprnn: ``Dropout`` after an RNN touches
only the layer's output; ``Dropout(noise_shape=(None, 1, None))`` keeps one mask per sequence and feature
(constant over time); ``Dropout(noise_shape=(None, None, 1))`` zeroes whole timesteps (plain zeroing, not
RNN masking: the next RNN still runs those steps on zero vectors); ``SpatialDropout1D`` drops whole
channels for all timesteps.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ..errors import DroprnnError, check_rate, checked_rate, fail, type_name
from .base import Layer, floating_input
from ..random import SeedStream, dropout_mask, keep_mask, normal, uniform

Tensor = torch.Tensor


class Dropout(Layer):
    """Inverted dropout: keep each entry with probability 1 - rate and scale it by 1/(1 - rate).

    Args:
        rate: in [0, 1]; 1 zeroes everything, 0 is the identity.
        noise_shape: the shape of the keep mask, broadcast to the input; None entries take the input's
            size on that axis (e.g. ``(None, 1, None)`` shares the mask over time). Default: the input's.
        seed: this layer's own stream, or None for torch's global RNG.

    Input and output: any shape. The (B, T) mask passes through.
    """

    rate_may_be_one = True
    rate = checked_rate("rate", allow_one=None)  # checked whenever set; a subclass's rate_may_be_one decides 1

    def __init__(
        self, rate: float, noise_shape: Optional[Sequence[Optional[int]]] = None, seed: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name)
        self.rate = rate
        self.noise_shape = self._validated_noise_shape(noise_shape)
        self.seed_stream = SeedStream(seed, self.where)

    def extra_repr(self) -> str:
        shape = "" if self.noise_shape is None else f", noise_shape={self.noise_shape}"
        return f"name={self.name!r}, rate={self.rate}{shape}"

    @property
    def masks_shared_by_batch(self) -> bool:
        return self.rate > 0 and bool(self.noise_shape) and self.noise_shape[0] == 1

    def _validated_noise_shape(self, noise_shape: Any) -> Optional[tuple[Optional[int], ...]]:
        if noise_shape is None:
            return None
        if not isinstance(noise_shape, (tuple, list)) or any(
            d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0) for d in noise_shape
        ):
            raise fail(self.where, "noise_shape", "a tuple of positive ints or None", repr(noise_shape))
        return tuple(noise_shape)

    def concrete_noise_shape(self, x: Tensor) -> tuple[int, ...]:
        """The mask shape for input ``x``: None entries filled from ``x.shape``; checked to broadcast."""
        if self.noise_shape is None:
            return tuple(x.shape)
        if len(self.noise_shape) != x.dim():
            raise DroprnnError(
                f"{self.where}: argument `noise_shape` expected {x.dim()} entries for an input of shape "
                f"{tuple(x.shape)}, got {self.noise_shape}."
            )
        shape = tuple(n if d is None else d for d, n in zip(self.noise_shape, x.shape))
        if any(d not in (1, n) for d, n in zip(shape, x.shape)):
            raise DroprnnError(
                f"{self.where}: argument `noise_shape` {self.noise_shape} does not broadcast to the input "
                f"shape {tuple(x.shape)}: each entry must be None, 1 or the input's size on that axis."
            )
        return shape

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        shape = self.concrete_noise_shape(x)
        if not self.resolve_training(training) or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return torch.zeros_like(x)
        keep = keep_mask(shape, self.rate, self.seed_stream, x.device)
        return torch.where(keep, x / (1.0 - self.rate), torch.zeros((), dtype=x.dtype, device=x.device))


class _SequenceDropout(Dropout):
    """Dropout on (B, T, F) sequences whose mask is shared over time or over features."""

    shared_over: str = ""  # "time" or "features"

    def __init__(self, rate: float, seed: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(rate, noise_shape=None, seed=seed, name=name)

    def concrete_noise_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 3:
            raise fail(self.where, "inputs", "a tensor of shape (batch, time, features)", f"shape {tuple(x.shape)}")
        batch, steps, features = x.shape
        return (batch, 1, features) if self.shared_over == "time" else (batch, steps, 1)


class SpatialDropout1D(_SequenceDropout):
    """Drop whole channels: noise shape (B, 1, C), one mask per sequence and channel, for all timesteps.

    Input and output (B, T, C).
    """

    shared_over = "time"


class GaussianDropout(Layer):
    """Multiplicative Gaussian noise: ``x * N(1, sqrt(rate / (1 - rate)))`` in training. Rate in [0, 1)."""

    rate = checked_rate("rate")  # checked whenever set

    def __init__(self, rate: float, seed: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(name)
        self.rate = rate
        self.seed_stream = SeedStream(seed, self.where)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rate={self.rate}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        x = floating_input(self.where, x)
        if not self.resolve_training(training) or self.rate == 0.0:
            return x
        std = math.sqrt(self.rate / (1.0 - self.rate))
        return x * normal(tuple(x.shape), 1.0, std, self.seed_stream, x.dtype, x.device)


class GaussianNoise(Layer):
    """Additive Gaussian noise: ``x + N(0, stddev)`` in training. ``stddev`` in [0, 1], as Keras checks."""

    def __init__(self, stddev: float, seed: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(name)
        self.stddev = check_rate(self.where, "stddev", stddev, allow_one=True)
        self.seed_stream = SeedStream(seed, self.where)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stddev={self.stddev}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        x = floating_input(self.where, x)
        if not self.resolve_training(training) or self.stddev == 0.0:
            return x
        return x + normal(tuple(x.shape), 0.0, self.stddev, self.seed_stream, x.dtype, x.device)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


class AlphaDropout(Dropout):
    """Dropout for SELU networks: dropped entries are set to SELU's negative saturation and an affine map
    keeps mean and variance (Klambauer et al. 2017)::

        α' = -alpha·scale;  a = ((1 - p)(1 + p·α'²))^(-1/2);  b = -a·α'·p
        out = a · (x·keep + α'·(1 - keep)) + b,   keep = uniform(noise_shape) ≥ p

    ``rate`` in [0, 1): at 1 the affine map is undefined.
    """

    rate_may_be_one = False

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        x = floating_input(self.where, x)
        shape = self.concrete_noise_shape(x)
        if not self.resolve_training(training) or self.rate == 0.0:
            return x
        alpha_p = -_SELU_ALPHA * _SELU_SCALE
        keep = (uniform(shape, self.seed_stream, x.dtype, x.device) >= self.rate).to(x.dtype)
        a = ((1 - self.rate) * (1 + self.rate * alpha_p**2)) ** -0.5
        b = -a * alpha_p * self.rate
        return a * (x * keep + alpha_p * (1 - keep)) + b


class LockedDropout(SpatialDropout1D):
    """One mask per sequence and feature, reused at every timestep (AWD-LSTM's name; Gal & Ghahramani's
    variational dropout on a tensor). The same mask as ``SpatialDropout1D`` and as
    ``Dropout(rate, noise_shape=(None, 1, None))``; the name says what it is for: between recurrent
    layers and on their outputs. Input (B, T, F).
    """


class TimestepDropout(_SequenceDropout):
    """Drop whole timesteps per sequence: noise shape (B, T, 1), survivors scaled by 1/(1 - rate).

    Plain zeroing, not RNN masking: a following RNN still runs the dropped steps on zero vectors.
    Input (B, T, F).
    """

    shared_over = "features"


class EmbeddingDropout(Layer):
    """Drop word types: whole rows of an embedding matrix, kept rows scaled by 1/(1 - rate), so every
    occurrence of a dropped word in a sequence is dropped (Gal & Ghahramani 2016).

    By default one draw per call is shared by the batch, as AWD-LSTM's ``embedded_dropout`` does. With
    ``per_sequence=True`` each sequence (row of the ids) drops its own word types, as Gal & Ghahramani's
    scripts do; the draws then cover only the (row, word) pairs present, whatever the vocabulary's size.

    Wraps an embedding module (``droprnn.Embedding`` or ``torch.nn.Embedding``) and calls it, so its own
    options (``mask_zero``, ``padding_idx``, ``max_norm``) keep working. Ids (B, T) → (B, T, E).
    """

    rate = checked_rate("rate")  # checked whenever set

    def __init__(self, embedding: torch.nn.Module, rate: float, seed: Optional[int] = None, name: Optional[str] = None,
                 *, per_sequence: bool = False) -> None:
        super().__init__(name)
        rows = getattr(embedding, "input_dim", None) or getattr(embedding, "num_embeddings", None)
        if not isinstance(embedding, torch.nn.Module) or rows is None:
            raise fail(self.where, "embedding", "a droprnn.Embedding or torch.nn.Embedding", type_name(embedding))
        self.embedding = embedding
        self.rows = int(rows)
        self.rate = rate
        if not isinstance(per_sequence, bool):
            raise fail(self.where, "per_sequence", "True or False", repr(per_sequence))
        self.per_sequence = per_sequence
        self.seed_stream = SeedStream(seed, self.where)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rate={self.rate}" + (", per_sequence=True" if self.per_sequence else "")

    def output_features(self, features: Optional[int]) -> Optional[int]:
        return self.embedding.embedding_dim if isinstance(self.embedding, torch.nn.Embedding) else self.embedding.output_dim

    @property
    def masks_shared_by_batch(self) -> bool:
        return self.rate > 0 and not self.per_sequence

    def keras_weights(self):
        return self.embedding.keras_weights() if isinstance(self.embedding, Layer) else []

    def compute_mask(self, ids: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        if isinstance(self.embedding, Layer):
            return self.embedding.compute_mask(ids, mask)
        return mask

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        vectors = self.embedding(ids)
        if not self.resolve_training(training) or self.rate == 0.0:
            return vectors
        # Scaling the looked-up vectors by the row mask equals looking up in the masked matrix, and
        # touches B·T·E numbers instead of the whole vocabulary.
        ids = torch.as_tensor(ids, device=vectors.device).long()
        if not self.per_sequence:
            row_mask = dropout_mask((self.rows,), self.rate, self.seed_stream, vectors.dtype, vectors.device)
            return vectors * row_mask[ids].unsqueeze(-1)
        if ids.dim() == 0:
            raise fail(self.where, "inputs", "ids with a batch dimension for per_sequence=True", "a single id")
        # One draw per distinct (sequence, word) pair: a (B, vocabulary) mask would grow with the vocabulary.
        pairs = torch.arange(ids.shape[0], device=ids.device).view(-1, *[1] * (ids.dim() - 1)) * self.rows + ids
        distinct, where = torch.unique(pairs, return_inverse=True)
        pair_mask = dropout_mask(tuple(distinct.shape), self.rate, self.seed_stream, vectors.dtype, vectors.device)
        return vectors * pair_mask[where].unsqueeze(-1)


class WordDropout(Layer):
    """Drop tokens per sample: each id is replaced by ``replacement_id`` with probability ``rate`` in
    training (Iyyer et al. 2015; Bowman et al. 2016 replace with <unk>). Ids (B, T) → ids (B, T).

    Put it before the embedding. With ``replacement_id`` = 0 and ``Embedding(mask_zero=True)`` the
    dropped tokens become padding, i.e. skipped steps; give the id of an unknown-word token to keep them.
    """

    rate = checked_rate("rate")  # checked whenever set

    def __init__(self, rate: float, replacement_id: int = 0, seed: Optional[int] = None, name: Optional[str] = None) -> None:
        super().__init__(name)
        self.rate = rate
        if isinstance(replacement_id, bool) or not isinstance(replacement_id, int) or replacement_id < 0:
            raise fail(self.where, "replacement_id", "an int >= 0", repr(replacement_id))
        self.replacement_id = replacement_id
        self.seed_stream = SeedStream(seed, self.where)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rate={self.rate}, replacement_id={self.replacement_id}"

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise fail(
                self.where, "inputs", "integer token ids (use TimestepDropout on vectors)", f"{ids.dtype} tensor"
            )
        if not self.resolve_training(training) or self.rate == 0.0:
            return ids
        keep = keep_mask(tuple(ids.shape), self.rate, self.seed_stream, ids.device)
        return torch.where(keep, ids, torch.full((), self.replacement_id, dtype=ids.dtype, device=ids.device))
