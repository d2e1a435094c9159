"""The three shapes a data set comes in: sequence classification, text classification, language modelling.

Arrays are shared by every ``load`` of the same name in a process (the loads are cached): copy before
changing one in place.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import check_seed, fail


@dataclass(frozen=True, eq=False, repr=False)
class SequenceClassification:
    """Variable-length multichannel series with one class each.

    train_x, test_x: lists of float32 arrays (T_i, C), time-major, T_i varying.
    train_y, test_y: int64 (N,), indices into ``classes``.
    classes: the class names, in the order the data file declares them.
    channels: C.
    """

    name: str
    train_x: list[np.ndarray]
    train_y: np.ndarray
    test_x: list[np.ndarray]
    test_y: np.ndarray
    classes: tuple[str, ...]
    channels: int

    def split_validation(self, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``train_x``/``train_y``: (kept for training, held out for validation), both sorted
        int64. Each class gives ``round(fraction * its count)`` cases to validation; same seed, same split."""
        return stratified_split(self.train_y, fraction, seed, where=f"{type(self).__name__}.split_validation")

    def __repr__(self) -> str:
        lengths = [len(x) for x in (*self.train_x, *self.test_x)]
        return (f"SequenceClassification({self.name!r}: {len(self.train_x)} train / {len(self.test_x)} test, "
                f"{self.channels} channels, lengths {min(lengths)}-{max(lengths)}, {len(self.classes)} classes)")


@dataclass(frozen=True, eq=False, repr=False)
class TextClassification:
    """Token-id sequences with one class each.

    train_tokens, test_tokens: lists of int64 arrays (T_i,), ids into ``vocabulary``.
    train_y, test_y: int64 (N,), indices into ``classes``.
    vocabulary: id -> word; id 0 is ``"<pad>"`` (never produced by the data), id 1 is ``"<unk>"``.
    """

    name: str
    train_tokens: list[np.ndarray]
    train_y: np.ndarray
    test_tokens: list[np.ndarray]
    test_y: np.ndarray
    vocabulary: tuple[str, ...]
    classes: tuple[str, ...]

    def split_validation(self, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``train_tokens``/``train_y``, as :meth:`SequenceClassification.split_validation`."""
        return stratified_split(self.train_y, fraction, seed, where=f"{type(self).__name__}.split_validation")

    def __repr__(self) -> str:
        return (f"TextClassification({self.name!r}: {len(self.train_tokens)} train / {len(self.test_tokens)} "
                f"test, vocabulary {len(self.vocabulary)}, classes {list(self.classes)})")


@dataclass(frozen=True, eq=False, repr=False)
class LanguageModelling:
    """Token-id streams: train, valid, test are int64 (N,), ids into ``vocabulary`` (id -> token)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocabulary: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"LanguageModelling({self.name!r}: {len(self.train):,} / {len(self.valid):,} / "
                f"{len(self.test):,} tokens, vocabulary {len(self.vocabulary):,})")


def stratified_split(labels: np.ndarray, fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): sorted int64 indices; each class holds out ``round(fraction * its count)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction < 1.0:
        raise fail(where, "fraction", "a float in (0, 1)", repr(fraction))
    if seed is None:
        raise fail(where, "seed", "an int (the split must be reproducible)", "None")
    rng = np.random.default_rng(check_seed(where, seed))
    kept: list[np.ndarray] = []
    held_out: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(float(fraction) * len(members))
        held_out.append(members[:count])
        kept.append(members[count:])
    return _sorted_indices(kept), _sorted_indices(held_out)


def _sorted_indices(parts: list[Any]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
