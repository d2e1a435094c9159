"""The dropout lab's report writer, on a synthetic results dict with curves from a formula."""

from __future__ import annotations

import base64
import copy
import math
import statistics

import pytest

from droprnn.errors import DroprnnError
from droprnn.lab import report
from droprnn.lab.report import (
    markdown_table,
    parse_markdown_table,
    summarize,
    terminal_table,
    write_report,
)

EPOCHS = 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Per variant: (final validation accuracy, training-minus-validation gap at every epoch).
SHAPES = {"none": (0.90, 0.08), "dropout_after": (0.94, 0.03), "recurrent": (0.92, 0.01)}


def _epochs(final: float, gap: float, seed: int, count: int = EPOCHS) -> list[dict]:
    """Validation accuracy climbs to ``final + 0.01*seed`` at the last epoch; training sits ``gap`` above it."""
    records = []
    for epoch in range(1, count + 1):
        val = (final + 0.01 * seed) * (1 - 0.5 ** epoch) / (1 - 0.5 ** EPOCHS)
        records.append({"epoch": epoch, "train_loss": 2.0 / epoch, "train_metric": val + gap,
                        "val_loss": 2.2 / epoch, "val_metric": val, "seconds": 0.1 * (seed + 1)})
    return records


def _trial(variant: str, seed: int) -> dict:
    final, gap = SHAPES[variant]
    return {"variant": variant, "seed": seed, "status": "ok", "error": None, "epochs": _epochs(final, gap, seed),
            "best_epoch": EPOCHS, "test_loss": 0.3, "test_metric": final + 0.02 * seed, "wall_seconds": 1.0}


def make_results() -> dict:
    trials = [_trial(variant, seed) for variant in SHAPES for seed in (0, 1)]
    # The second seed of "recurrent" failed after two epochs: counted, but out of every mean.
    trials[-1] = {"variant": "recurrent", "seed": 1, "status": "failed",
                  "error": "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: NaN loss <boom>",
                  "epochs": _epochs(0.5, 0.0, 1, count=2), "best_epoch": None, "test_loss": None,
                  "test_metric": None, "wall_seconds": 0.2}
    variants = {
        "none": {"title": "no dropout", "description": "The baseline.", "code": "model = Sequential([LSTM(64)])"},
        "dropout_after": {"title": "Dropout after the RNN", "description": "Drops outputs.",
                          "code": "model = Sequential([LSTM(64), Dropout(0.3)])"},
        "recurrent": {"title": "recurrent_dropout <script>alert(1)</script>", "description": "Drops h & c.",
                      "code": "model = Sequential([LSTM(64, recurrent_dropout=0.3)])  # a < b"},
    }
    return {
        "format": 1, "created": "2026-11-27T08:00:00Z",
        "versions": {"droprnn": "0.1.0", "torch": "2.13.0", "numpy": "2.1.0", "python": "3.11.7"},
        "machine": "Linux x86_64, 2 threads",
        "config": {"dataset": "japanese_vowels", "task": "classification", "metric": "accuracy", "layer": "lstm",
                   "units": 64, "epochs": EPOCHS, "rate": 0.3, "batch_size": 32, "learning_rate": 0.003,
                   "seeds": [0, 1], "variants": list(variants), "validation_fraction": 0.2, "workers": 2},
        "variants": variants,
        "trials": trials,
    }


def _by_variant(summaries):
    return {summary.variant: summary for summary in summaries}


# --- summarize ---------------------------------------------------------------------------------------------------

def test_summarize_numbers_by_hand():
    summaries = summarize(make_results())
    assert [s.variant for s in summaries] == ["none", "dropout_after", "recurrent"]
    none = _by_variant(summaries)["none"]
    assert (none.trials_ok, none.trials_failed, none.trials) == (2, 0, 2)
    assert none.title == "no dropout"
    assert none.test_mean == pytest.approx((0.90 + 0.92) / 2)
    assert none.test_std == pytest.approx(statistics.stdev([0.90, 0.92]))  # sample std: ddof = 1
    assert none.test_std == pytest.approx(0.02 / math.sqrt(2))
    assert none.best_epoch_mean == EPOCHS
    assert none.gap_mean == pytest.approx(0.08)
    assert none.seconds_per_epoch == pytest.approx((0.1 + 0.2) / 2)


def test_gap_is_taken_at_the_best_epoch_not_the_last():
    results = make_results()
    trial = results["trials"][0]
    trial["best_epoch"] = 2
    trial["epochs"][1].update(train_metric=0.70, val_metric=0.50)  # epoch 2: gap 0.20
    none = _by_variant(summarize(results))["none"]
    assert none.gap_mean == pytest.approx((0.20 + 0.08) / 2)
    assert none.best_epoch_mean == pytest.approx((2 + EPOCHS) / 2)


def test_failed_trial_is_counted_and_left_out_of_the_means():
    recurrent = _by_variant(summarize(make_results()))["recurrent"]
    assert (recurrent.trials_ok, recurrent.trials_failed) == (1, 1)
    assert recurrent.test_mean == pytest.approx(0.92)
    assert recurrent.test_std == 0.0  # one successful seed
    assert recurrent.seconds_per_epoch == pytest.approx(0.1)


def test_variant_without_a_successful_trial_has_nan_means():
    results = make_results()
    for trial in results["trials"]:
        if trial["variant"] == "none":
            trial.update(status="failed", error="boom")
    none = _by_variant(summarize(results))["none"]
    assert (none.trials_ok, none.trials_failed) == (0, 2)
    assert all(math.isnan(value) for value in (none.test_mean, none.test_std, none.gap_mean, none.seconds_per_epoch))
    rows = parse_markdown_table(markdown_table(summarize(results), "accuracy"))
    assert rows[0]["test accuracy (mean ± std)"] == report.MISSING


def test_bad_results_raise_droprnn_errors():
    results = make_results()
    results["trials"][0]["variant"] = "zoneout"
    with pytest.raises(DroprnnError, match="zoneout"):
        summarize(results)
    results = make_results()
    results["trials"][0]["best_epoch"] = 99
    with pytest.raises(DroprnnError, match="best_epoch 99"):
        summarize(results)
    with pytest.raises(DroprnnError, match="format"):
        summarize({**make_results(), "format": 2})
    with pytest.raises(DroprnnError, match="unknown metric 'bleu'"):
        markdown_table(summarize(make_results()), "bleu")


# --- tables ------------------------------------------------------------------------------------------------------

def test_markdown_table_parses_back_with_the_best_mean_bold():
    rows = parse_markdown_table(markdown_table(summarize(make_results()), "accuracy"))
    assert [row["variant"] for row in rows] == ["none", "dropout_after", "recurrent"]
    assert list(rows[0]) == ["variant", "test accuracy (mean ± std)", "best epoch", "train−val gap", "s/epoch",
                             "trials"]
    best = rows[1]
    assert best["test accuracy (mean ± std)"] == "**0.950** ± 0.014"
    assert best["best epoch"] == "6.0"
    assert best["train−val gap"] == "+0.030"
    assert best["s/epoch"] == "0.15"
    assert rows[0]["test accuracy (mean ± std)"] == "0.910 ± 0.014"  # not bold
    assert rows[2]["test accuracy (mean ± std)"] == "0.920 ± 0.000"
    assert rows[2]["trials"] == "1/2"
    assert sum("**" in row["test accuracy (mean ± std)"] for row in rows) == 1


def test_perplexity_bolds_the_lowest_mean():
    results = make_results()
    results["config"]["metric"] = "perplexity"
    summaries = summarize(results)
    rows = parse_markdown_table(markdown_table(summaries, "perplexity"))
    bold = [row["variant"] for row in rows if "**" in row["test perplexity (mean ± std)"]]
    assert bold == ["none"]  # lowest mean (0.91) wins when lower is better
    assert report.best_variants(summaries, "accuracy") == {"dropout_after"}
    assert "none" in terminal_table(summaries, "perplexity").splitlines()[2]
    assert terminal_table(summaries, "perplexity").splitlines()[2].split()[4] == "*"


def test_parse_markdown_table_unescapes_pipes_and_finds_the_table_in_a_document():
    text = "# Title\n\nSome prose | with a pipe.\n\n| a | b |\n|---|--:|\n| x \\| y | **1** |\n| z | 2 |\n\nAfter.\n"
    assert parse_markdown_table(text) == [{"a": "x | y", "b": "**1**"}, {"a": "z", "b": "2"}]
    with pytest.raises(DroprnnError, match="no markdown pipe table"):
        parse_markdown_table("no table here")


def test_terminal_table_is_aligned_plain_text():
    text = terminal_table(summarize(make_results()), "accuracy")
    lines = text.splitlines()
    assert lines[0].startswith("variant") and "train-val gap" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2:5]
    assert [row.split()[0] for row in rows] == ["none", "dropout_after", "recurrent"]
    assert len({len(row) for row in rows}) == 1  # numbers right-aligned to the same edge
    assert "0.950 ± 0.014 *" in rows[1] and "*" not in rows[0]
    assert "\x1b" not in text and "**" not in text
    assert "higher is better" in lines[-1]


# --- pictures and report files -----------------------------------------------------------------------------------

def _mask_images(tmp_path, variants):
    """Tiny real PNGs, written by matplotlib as the runner would."""
    import matplotlib.pyplot as plt
    import numpy as np

    rng = np.random.default_rng(0)
    paths = {}
    (tmp_path / "masks").mkdir()
    for name in variants:
        paths[name] = tmp_path / "masks" / f"{name}.png"
        plt.imsave(paths[name], rng.random((8, 12)) > 0.3, cmap="gray")
    return paths


def _assert_png(path, min_side=8):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert min(pixels.shape[:2]) >= min_side
    return pixels


def test_plot_curves_writes_one_decodable_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot_curves(make_results(), tmp_path / "curves.png")
    pixels = _assert_png(path, min_side=200)
    assert pixels.shape[1] > pixels.shape[0]  # three panels side by side
    assert pixels.std() > 0.01  # something was drawn


def test_write_report(tmp_path):
    pytest.importorskip("matplotlib")
    results = make_results()
    masks = _mask_images(tmp_path, ["none", "recurrent"])  # dropout_after has none: skipped with a note
    written = write_report(results, tmp_path, masks)
    assert set(written) == {"markdown", "html", "curves", "losses"}
    assert all(path.exists() and path.parent == tmp_path for path in written.values())
    for path in [written["curves"], written["losses"], *masks.values()]:
        _assert_png(path)

    markdown = written["markdown"].read_text(encoding="utf-8")
    rows = parse_markdown_table(markdown)
    assert [row["variant"] for row in rows] == ["none", "dropout_after", "recurrent"]
    assert rows[1]["test accuracy (mean ± std)"].startswith("**0.950**")
    assert "](curves.png)" in markdown and "](losses.png)" in markdown
    assert "](masks/none.png)" in markdown and "](masks/recurrent.png)" in markdown
    assert "No mask picture for this variant" in markdown
    for header in ("japanese_vowels", "lstm", "Linux x86_64, 2 threads", "torch 2.13.0", "2026-11-27T08:00:00Z"):
        assert header in markdown
    assert "```python\nmodel = Sequential([LSTM(64), Dropout(0.3)])\n```" in markdown
    assert "RuntimeError: NaN loss" in markdown and "failed after 2 epochs" in markdown
    sections = ["## 1. Results", "## 2. Learning curves", "## 3. Mask pictures", "## 4. Model code",
                "## 5. Failed trials"]
    assert [markdown.index(section) for section in sections] == sorted(markdown.index(s) for s in sections)

    page = written["html"].read_text(encoding="utf-8")
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    for path in [*masks.values(), written["curves"], written["losses"]]:
        assert base64.b64encode(path.read_bytes()).decode("ascii") in page
    assert "<script>" not in page
    assert "recurrent_dropout &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Drops h &amp; c." in page and "# a &lt; b" in page and "NaN loss &lt;boom&gt;" in page
    assert "<strong>0.950</strong> ± 0.014" in page
    assert "No mask picture for this variant" in page


def test_write_report_without_failures_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    results = make_results()
    results["trials"] = [trial for trial in results["trials"] if trial["status"] == "ok"]
    written = write_report(results, tmp_path, {})
    assert "None: every trial finished." in written["markdown"].read_text(encoding="utf-8")


def test_the_table_note_names_the_weights_the_test_numbers_came_from(tmp_path):
    pytest.importorskip("matplotlib")
    results = make_results()
    markdown = write_report(results, tmp_path / "best", {})["markdown"].read_text(encoding="utf-8")
    assert "with each seed's best-epoch weights" in markdown
    results["config"]["test_weights"] = "last"  # Penn Treebank runs: the model after the last epoch
    markdown = write_report(results, tmp_path / "last", {})["markdown"].read_text(encoding="utf-8")
    assert "with the weights after the last epoch" in markdown and "best-epoch weights" not in markdown


def test_missing_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(DroprnnError) as caught:
        write_report(copy.deepcopy(make_results()), tmp_path, {})
    message = str(caught.value)
    assert "pip install matplotlib" in message and "pip install droprnn[lab]" in message
    assert "\n" not in message
    assert not (tmp_path / "report.md").exists()  # nothing half-written


def test_numbers_that_round_to_zero_print_without_a_minus_sign():
    assert report._number(-0.00001, 3, signed=True) == "+0.000"
    assert report._number(-0.0004, 3) == "0.000"
    assert report._number(-0.0006, 3, signed=True) == "-0.001"


def test_a_reproduction_reports_the_published_numbers_beside_its_own(tmp_path):
    pytest.importorskip("matplotlib")
    results = make_results()
    plain = write_report(results, tmp_path / "lab", {})["markdown"].read_text(encoding="utf-8")
    assert "published" not in plain  # the lab's own runs have no paper to compare with
    trial = results["trials"][0]
    trial.update(test_metric=79.18, published=79.7, mc_samples=100, test_metric_mc=77.81, published_mc=78.6)
    results["config"]["metric"] = "perplexity"
    written = write_report(results, tmp_path / "paper", {})
    lines = ["none (seed 0) test perplexity: 79.2   published 79.7 (-0.7%)",
             "none (seed 0) MC dropout, 100 samples: 77.8   published 78.6 (-1.0%)"]
    markdown = written["markdown"].read_text(encoding="utf-8")
    assert all(f"- {line}" in markdown for line in lines)
    assert markdown.index(lines[1]) < markdown.index("## 2. Learning curves")
    page = written["html"].read_text(encoding="utf-8")
    assert all(f"<li>{line}</li>" in page for line in lines)
    assert report.against_published({"test_metric": 100.0, "published": None, "test_metric_mc": 99.0,
                                     "mc_samples": 10}, "perplexity") == [
        "test perplexity: 100.0", "MC dropout, 10 samples: 99.0"]
