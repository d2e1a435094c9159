"""What one lab run is: the data set, the model, the variants and seeds, and how trials are scheduled.

Everything that changes a trial's numbers lives in :class:`LabConfig` and is written into
``results.json``; a re-run into the same directory reuses finished trials only if those fields match.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from ..datasets import CLASSIFICATION as CLASSIFICATION_DATASETS
from ..errors import DroprnnError, check_out_dir, check_positive_int, check_rate, fail
from .variants import LAYERS, VARIANTS, check_variants

WHERE = "droprnn lab"


@dataclass(frozen=True)
class LabConfig:
    """One lab run. The defaults are the embedded run: JapaneseVowels, a 64-unit LSTM, every variant,
    3 seeds, under a minute of training on 2 cores (44 s on an Intel Xeon, 2026-11-27)."""

    dataset: str = "japanese_vowels"
    layer: str = "lstm"
    units: int = 64
    epochs: int = 100
    rate: float = 0.3
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: int = 3
    batch_size: int = 32
    learning_rate: float = 3e-3
    validation_fraction: float = 0.2
    embedding_size: int = 64           # text data sets only
    threads: int = 1                   # torch threads per trial: results are bit-identical for a given count
    workers: int = 2                   # trials run at once (local processes)
    trial_timeout: float = 120.0       # seconds a local worker may go without a sign of life (see runner)
    ray: Optional[str] = None          # a Ray cluster address, instead of local processes
    out: str = field(default="")       # the run directory; default runs/lab-<dataset>

    def __post_init__(self) -> None:
        if self.dataset not in CLASSIFICATION_DATASETS:
            raise fail(WHERE, "--dataset", f"one of {', '.join(CLASSIFICATION_DATASETS)}"
                       " (language modelling comes with `droprnn lab ptb`)", repr(self.dataset))
        if self.layer not in LAYERS:
            raise fail(WHERE, "--layer", f"one of {', '.join(LAYERS)}", repr(self.layer))
        for name in ("units", "epochs", "seeds", "batch_size", "embedding_size", "threads", "workers"):
            check_positive_int(WHERE, f"--{name.replace('_', '-')}", getattr(self, name))
        check_rate(WHERE, "--rate", self.rate, allow_one=False)
        if not 0.0 < self.validation_fraction < 1.0:
            raise fail(WHERE, "validation_fraction", "a float in (0, 1)", repr(self.validation_fraction))
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, numbers.Real) \
                or not self.learning_rate > 0:
            raise fail(WHERE, "--learning-rate", "a float > 0", repr(self.learning_rate))
        if isinstance(self.trial_timeout, bool) or not isinstance(self.trial_timeout, numbers.Real) \
                or not self.trial_timeout > 0:
            raise fail(WHERE, "--trial-timeout", "seconds > 0", repr(self.trial_timeout))
        object.__setattr__(self, "variants", check_variants(WHERE, self.variants))
        if not self.out:
            object.__setattr__(self, "out", f"runs/lab-{self.dataset}")
        check_out_dir(WHERE, self.out)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def trial_fields(self) -> dict[str, Any]:
        """The fields a trial's numbers depend on (scheduling and paths excluded)."""
        skip = {"variants", "seeds", "workers", "trial_timeout", "ray", "out"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = list(self.variants)
        data["seeds"] = self.seed_list
        return data


def check_same_trials(stored: Any, config: LabConfig, run_dir: str) -> None:
    """A run directory is reused only for the same trial fields: otherwise its trials answer another question."""
    if not isinstance(stored, dict):
        raise DroprnnError(f"{WHERE}: --out {run_dir} holds a run.json that is not a run's settings "
                           f"(a {type(stored).__name__}); pick another --out or remove it.")
    differing = [f"{k} {stored.get(k)!r} there, {v!r} now" for k, v in config.trial_fields().items()
                 if stored.get(k) != v]
    if differing:
        raise DroprnnError(f"{WHERE}: --out {run_dir} holds a run with other settings ({'; '.join(differing)}); "
                           "pick another --out or remove it.")
