"""Variable-length sequences to one zero-padded batch plus lengths.

droprnn's recurrent layers take ``lengths=``, so the padding never reaches the model's state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import fail


def pad(sequences: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max, C) tensor of ``dtype``, each (T_i, C) sequence at the start of its row and zeros after;
    and lengths, int64 (B,) = T_i."""
    arrays = _arrays("droprnn.datasets.pad", sequences, ndim=2, kinds="biuf", one="(T, C) numeric array")
    channels = {array.shape[1] for array in arrays}
    if len(channels) != 1:
        raise fail("droprnn.datasets.pad", "sequences", "arrays with one channel count C",
                   f"channel counts {sorted(channels)}")
    return _padded(arrays, (channels.pop(),), dtype)


def pad_tokens(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) int64 tensor of token ids, each (T_i,) sequence first and the pad id 0 after; and
    lengths, int64 (B,)."""
    arrays = _arrays("droprnn.datasets.pad_tokens", sequences, ndim=1, kinds="iu", one="(T,) integer array")
    return _padded(arrays, (), torch.int64)


def _arrays(where: str, sequences: Sequence[np.ndarray], ndim: int, kinds: str, one: str) -> list[np.ndarray]:
    # A single array is refused rather than iterated: its rows would silently become the "sequences".
    if isinstance(sequences, (np.ndarray, torch.Tensor)):
        raise fail(where, "sequences", f"a non-empty list of {one}s", f"one array of shape {tuple(sequences.shape)}")
    if len(sequences) == 0:
        raise fail(where, "sequences", f"a non-empty list of {one}s", "an empty list")
    arrays = [np.asarray(sequence) for sequence in sequences]
    for position, array in enumerate(arrays):
        if array.ndim != ndim or array.dtype.kind not in kinds:
            raise fail(where, f"sequences[{position}]", f"a {one}", f"{array.dtype} of shape {array.shape}")
    return arrays


def _padded(arrays: list[np.ndarray], trailing: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([len(array) for array in arrays], dtype=np.int64)
    batch = np.zeros((len(arrays), int(lengths.max()), *trailing), dtype=np.result_type(*{array.dtype for array in arrays}))
    for row, array in enumerate(arrays):
        batch[row, : len(array)] = array
    return torch.from_numpy(batch).to(dtype), torch.from_numpy(lengths)
