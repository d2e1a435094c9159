"""The Penn Treebank numbers the README and the Reproductions page quote are the committed records'
(``results/ptb-<preset>.json``): a rerun that changes a record, or an edit that changes a quote, shows here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from droprnn.lab import ptb

ROOT = Path(__file__).resolve().parents[1]
RECORDS = {path.stem.removeprefix("ptb-"): path for path in sorted((ROOT / "results").glob("ptb-*.json"))
           if path.stem.removeprefix("ptb-") in ptb.PRESETS}  # a preset's run, not a study's
README = (ROOT / "README.md").read_text()
TABLE_ROWS: dict[str, str] = {}  # the first row naming each preset: the results table (the GPU timings come later)
for match in re.finditer(r"^\| `([\w-]+)` \| (.*)$", (ROOT / "docs" / "reproductions.md").read_text(), flags=re.M):
    TABLE_ROWS.setdefault(match[1], match[2])


def record(name: str) -> dict:
    return json.loads(RECORDS[name].read_text())["trials"][0]


def one_decimal(value: float) -> str:
    return f"{value:.1f}"


def test_the_medium_presets_have_records():
    assert {"zaremba-medium", "gal-medium", "gal-medium-tf"} <= set(RECORDS)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_the_reproductions_table_quotes_the_record(name):
    trial = record(name)
    assert name in TABLE_ROWS, f"docs/reproductions.md has no table row for `{name}`"
    row = TABLE_ROWS[name]
    assert re.match(r"\*\*([\d.]+)\*\*", row)[1] == one_decimal(trial["test_metric"])
    validation = re.search(r"validation ([\d.]+)", row.split("|")[0])
    if validation:
        assert validation[1] == one_decimal(trial["epochs"][-1]["val_metric"])
    mc = re.search(r"MC dropout, (\d+) (?:passes|samples): \**([\d.]+)", row)
    assert (mc is None) == (trial.get("test_metric_mc") is None), f"`{name}`: the row and the record disagree on MC"
    if mc:
        assert (int(mc[1]), mc[2]) == (trial["mc_samples"], one_decimal(trial["test_metric_mc"]))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_the_readme_quotes_the_record(name):
    quoted = re.search(rf"`{re.escape(name)}`\)? ([\d.]+) \(([\d.]+)\)(?: and with MC dropout ([\d.]+) \(([\d.]+)\))?",
                       README)
    if quoted is None:
        pytest.skip(f"the README does not quote `{name}`")
    trial = record(name)
    assert quoted[1] == one_decimal(trial["test_metric"]) and float(quoted[2]) == trial["published"]
    if quoted[3]:
        assert quoted[3] == one_decimal(trial["test_metric_mc"]) and float(quoted[4]) == trial["published_mc"]
