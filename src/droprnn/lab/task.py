"""A classification data set made ready for training: splits as padded tensors with lengths.

Series are standardised per channel with statistics of the training part only (padding excluded);
text keeps its token ids (0 pads). The validation part is a stratified split of the training set with
a fixed seed, the same for every trial, so variants are compared on identical data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .. import datasets

Tensor = torch.Tensor
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """inputs: (N, T_max, C) float32 or (N, T_max) int64 ids; lengths: (N,) int64; labels: (N,) int64."""

    inputs: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Tensor) -> "Split":
        """Rows ``index``, cut to their longest length (batches of short sequences stay short)."""
        lengths = self.lengths[index]
        steps = int(lengths.max()) if len(index) else 1
        return Split(self.inputs[index, :steps], lengths, self.labels[index])

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator["Split"]:
        """Mini-batches; shuffled when a generator is given, in order otherwise."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), size):
            yield self.take(order[start:start + size])


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # "series" or "text"
    input_size: int           # channels, or vocabulary size for text
    classes: tuple[str, ...]
    train: Split
    valid: Split
    test: Split


def prepare(name: str, validation_fraction: float) -> Task:
    data = datasets.load(name)
    kept, held = data.split_validation(validation_fraction, seed=SPLIT_SEED)
    if isinstance(data, datasets.TextClassification):
        def split(tokens, labels, index) -> Split:
            ids, lengths = datasets.pad_tokens([tokens[i] for i in index])
            return Split(ids, lengths, torch.as_tensor(labels[index], dtype=torch.int64))

        every = np.arange(len(data.test_tokens))
        return Task(name, "text", len(data.vocabulary), data.classes, split(data.train_tokens, data.train_y, kept),
                    split(data.train_tokens, data.train_y, held), split(data.test_tokens, data.test_y, every))

    steps = np.concatenate([data.train_x[i] for i in kept])
    mean, std = steps.mean(axis=0), steps.std(axis=0) + 1e-6

    def split(series, labels, index) -> Split:
        inputs, lengths = datasets.pad([(series[i] - mean) / std for i in index])
        return Split(inputs, lengths, torch.as_tensor(labels[index], dtype=torch.int64))

    every = np.arange(len(data.test_x))
    return Task(name, "series", data.channels, data.classes, split(data.train_x, data.train_y, kept),
                split(data.train_x, data.train_y, held), split(data.test_x, data.test_y, every))

