"""Reader for the sktime/aeon ``.ts`` text format of time-series classification problems.

A file is header lines (``@problemName JapaneseVowels``, ``@univariate false``, ``@classLabel true 1 2 3``
…), an ``@data`` line, then one case a line: channels separated by ``:``, values by ``,``, the class label
last (``1.2,1.3,1.1:0.5,0.4,0.6:3``). Lines starting with ``#`` are comments; ``?`` is a missing value.
Channels of one case must have the same length; cases may differ in length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DroprnnError

WHERE = "droprnn.datasets.read_ts"


@dataclass(frozen=True, eq=False, repr=False)
class TsFile:
    """One parsed ``.ts`` file.

    series: one float32 array (T_i, C) per case, time-major, NaN where the file has ``?``.
    labels: the class label of each case as written (empty when the header says ``@classLabel false``).
    class_labels: the labels the header declares, in header order.
    """

    problem_name: Optional[str]
    series: list[np.ndarray]
    labels: list[str]
    class_labels: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"TsFile({self.problem_name!r}, {len(self.series)} cases, "
                f"classes {list(self.class_labels)})")


class _Header:
    """What the ``@`` lines promise about the data; checked against every case."""

    def __init__(self) -> None:
        self.problem_name: Optional[str] = None
        self.has_labels: Optional[bool] = None
        self.class_labels: tuple[str, ...] = ()
        self.dimensions: Optional[int] = None
        self.series_length: Optional[int] = None
        self.univariate: Optional[bool] = None
        self.equal_length: Optional[bool] = None


def read_ts(path: str | os.PathLike) -> TsFile:
    """Parse a ``.ts`` file. Raises :class:`DroprnnError` naming the file and line of anything malformed."""
    path = Path(path)
    with path.open(encoding="utf-8") as file:
        lines = file.read().splitlines()
    return _parse(lines, str(path))


def _parse(lines: list[str], source: str) -> TsFile:
    header = _Header()
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise _bad(source, number, "a header line starting with '@' before @data", repr(_clip(line)))
            in_data = _read_tag(header, line, source, number)
            continue
        if line.startswith("@"):
            raise _bad(source, number, "a data line (header lines come before @data)", repr(_clip(line)))
        case, label = _read_case(header, line, source, number)
        series.append(case)
        if label is not None:
            labels.append(label)
    if not in_data:
        raise _bad(source, len(lines), "an @data line", "end of file")
    if not series:
        raise _bad(source, len(lines), "at least one case after @data", "none")
    return TsFile(header.problem_name, series, labels, header.class_labels)


def _read_tag(header: _Header, line: str, source: str, number: int) -> bool:
    """Record one header line; True when it is ``@data``."""
    tag, _, value = line[1:].replace("\t", " ").partition(" ")
    tag, value = tag.lower(), value.strip()
    if tag == "data":
        if header.has_labels is None:
            raise _bad(source, number, "an @classLabel line before @data", "@data")
        return True
    if tag == "problemname":
        header.problem_name = value
    elif tag == "classlabel":
        words = value.split()
        header.has_labels = _flag(words[0] if words else "", source, number, tag)
        header.class_labels = tuple(words[1:])
        if header.has_labels and not header.class_labels:
            raise _bad(source, number, "the class labels after '@classLabel true'", "none")
        if len(set(header.class_labels)) != len(header.class_labels):
            raise _bad(source, number, "distinct class labels", repr(value))
    elif tag in ("timestamps", "targetlabel"):
        if _flag(value, source, number, tag):
            raise _bad(source, number, f"@{tag} false (time stamps and regression targets are not supported)",
                       repr(line))
    elif tag == "univariate":
        header.univariate = _flag(value, source, number, tag)
    elif tag == "equallength":
        header.equal_length = _flag(value, source, number, tag)
    elif tag == "dimensions":
        header.dimensions = _count(value, source, number, tag)
    elif tag == "serieslength":
        header.series_length = _count(value, source, number, tag)
    # Other tags (@missing, @problemName variants of other tools) describe nothing we check.
    return False


def _read_case(header: _Header, line: str, source: str, number: int) -> tuple[np.ndarray, Optional[str]]:
    fields = line.split(":")
    label = None
    if header.has_labels:
        if len(fields) < 2:
            raise _bad(source, number, "channels then ':' and a class label", repr(_clip(line)))
        label = fields.pop().strip()
        if label not in header.class_labels:
            raise _bad(source, number, f"a class label declared in @classLabel {list(header.class_labels)}",
                       repr(label))
    channels = [_read_values(text, source, number, index) for index, text in enumerate(fields)]
    expected_channels = header.dimensions or (1 if header.univariate else None)
    if expected_channels is not None and len(channels) != expected_channels:
        raise _bad(source, number, f"{expected_channels} channel(s), as the header or the first case has",
                   f"{len(channels)}")
    if header.dimensions is None:
        header.dimensions = len(channels)  # later cases must match the first
    lengths = [len(channel) for channel in channels]
    if len(set(lengths)) != 1:
        raise _bad(source, number, "all channels of a case to have the same length", f"lengths {lengths}")
    if header.equal_length and header.series_length is not None and lengths[0] != header.series_length:
        raise _bad(source, number, f"length {header.series_length} as @seriesLength declares", f"{lengths[0]}")
    return np.stack(channels, axis=1), label


def _read_values(text: str, source: str, number: int, channel: int) -> np.ndarray:
    values = ["nan" if value.strip() == "?" else value for value in text.split(",")]
    try:
        return np.array(values, dtype=np.float32)
    except ValueError:
        bad = next(value for value in values if not _is_number(value))
        raise _bad(source, number, f"numbers or '?' in channel {channel}", repr(bad)) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flag(value: str, source: str, number: int, tag: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise _bad(source, number, f"@{tag} true or false", repr(value))
    return value.lower() == "true"


def _count(value: str, source: str, number: int, tag: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise _bad(source, number, f"@{tag} followed by an int > 0", repr(value))
    return int(value)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _bad(source: str, number: int, expected: str, got: str) -> DroprnnError:
    return DroprnnError(f"{WHERE}: {source}, line {number}: expected {expected}, got {got}.")
