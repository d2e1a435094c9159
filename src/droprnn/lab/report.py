"""The dropout lab's report: a table, learning curves, mask pictures and model code from ``results.json``.

The runner trains every dropout variant for several seeds and hands over the loaded ``results.json``
(schema in the lab's runner) plus one mask picture per variant. From them this module writes

* ``report.md``   — for reading on GitHub or in an editor; images are relative links into the run directory;
* ``report.html`` — one self-contained file (images inlined as base64, inline CSS, no external links);
* ``curves.png`` and ``losses.png`` — the learning curves, one panel per variant.

matplotlib is an optional extra (``pip install droprnn[lab]``): it is imported only when a picture is drawn.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import statistics
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DroprnnError

RESULTS_FORMAT = 1
CURVES_FILE, LOSSES_FILE = "curves.png", "losses.png"
MARKDOWN_FILE, HTML_FILE = "report.md", "report.html"
ERROR_LINES_SHOWN = 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "—"


@dataclass(frozen=True)
class MetricSpec:
    """How a metric reads: which direction is better, and how many decimals are worth printing."""

    higher_is_better: bool
    decimals: int


# The direction comes from the metric's name, so a perplexity run bolds the lowest mean, not the highest.
METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec(higher_is_better=True, decimals=3),
    "perplexity": MetricSpec(higher_is_better=False, decimals=2),
}


def metric_spec(metric: str) -> MetricSpec:
    """The :class:`MetricSpec` of ``metric``; an unknown name raises rather than guessing a direction."""
    try:
        return METRICS[metric]
    except KeyError:
        known = ", ".join(repr(name) for name in METRICS)
        raise DroprnnError(f"lab report: unknown metric {metric!r}; known metrics are {known}.") from None


# ---------------------------------------------------------------------------------------------------------------
# Summary numbers


@dataclass(frozen=True)
class VariantSummary:
    """One variant's numbers over its seeds. Means are over the successful (``status == "ok"``) trials only;
    they are NaN when no trial succeeded. ``test_std`` is the sample standard deviation (0.0 for one seed)."""

    variant: str
    title: str
    trials_ok: int
    trials_failed: int
    test_mean: float
    test_std: float
    best_epoch_mean: float
    gap_mean: float  # train metric minus validation metric at the best epoch
    seconds_per_epoch: float

    @property
    def trials(self) -> int:
        return self.trials_ok + self.trials_failed


def summarize(results: dict) -> list[VariantSummary]:
    """One :class:`VariantSummary` per variant, in the order of ``results["variants"]``."""
    variants = _variants(results)
    trials_by_variant: dict[str, list[dict]] = {name: [] for name in variants}
    for trial in _trials(results):
        trials_by_variant[trial["variant"]].append(trial)
    return [_summarize_variant(name, info, trials_by_variant[name]) for name, info in variants.items()]


def _summarize_variant(name: str, info: dict, trials: list[dict]) -> VariantSummary:
    ok = [trial for trial in trials if trial["status"] == "ok"]
    return VariantSummary(
        variant=name,
        title=str(info.get("title", name)),
        trials_ok=len(ok),
        trials_failed=len(trials) - len(ok),
        test_mean=_mean(float(trial["test_metric"]) for trial in ok),
        test_std=_sample_std([float(trial["test_metric"]) for trial in ok]),
        best_epoch_mean=_mean(float(trial["best_epoch"]) for trial in ok),
        gap_mean=_mean(_gap_at_best_epoch(trial) for trial in ok),
        seconds_per_epoch=_mean(_mean(float(epoch["seconds"]) for epoch in trial["epochs"]) for trial in ok),
    )


def against_published(trial: dict, metric: str) -> list[str]:
    """A reproduction's numbers beside the paper's, one line each: the test metric, and MC dropout's where the
    trial measured it, e.g. ``test perplexity: 79.2   published 79.7 (-0.7%)``. Empty for a trial with
    neither a published number nor an MC measurement (the lab's own runs)."""
    lines = []
    if trial.get("published") is not None or "test_metric_mc" in trial:
        lines.append((f"test {metric}", trial["test_metric"], trial.get("published")))
    if "test_metric_mc" in trial:
        lines.append((f"MC dropout, {trial['mc_samples']} samples", trial["test_metric_mc"], trial.get("published_mc")))
    out = []
    for label, ours, paper in lines:
        versus = f"   published {paper} ({(ours - paper) / paper:+.1%})" if paper else ""
        out.append(f"{label}: {ours:.1f}{versus}")
    return out


def _gap_at_best_epoch(trial: dict) -> float:
    best = _epoch_record(trial, trial["best_epoch"])
    return float(best["train_metric"]) - float(best["val_metric"])


def _epoch_record(trial: dict, epoch: int) -> dict:
    for record in trial["epochs"]:
        if record["epoch"] == epoch:
            return record
    raise DroprnnError(
        f"lab report: trial {trial['variant']!r} seed {trial.get('seed')!r} has best_epoch {epoch!r}, "
        f"but its epochs run {[record['epoch'] for record in trial['epochs']]}."
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else math.nan


def _sample_std(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    # One seed has no spread to estimate; 0.0 reads better in a table than NaN.
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _variants(results: dict) -> dict[str, dict]:
    if results.get("format") != RESULTS_FORMAT:
        raise DroprnnError(
            f"lab report: results format {results.get('format')!r} is not the supported format {RESULTS_FORMAT}."
        )
    variants = results.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise DroprnnError("lab report: results['variants'] must be a non-empty dict of variant -> info.")
    return variants


def _trials(results: dict) -> list[dict]:
    variants = results["variants"]
    trials = results.get("trials", [])
    for trial in trials:
        if trial.get("variant") not in variants:
            raise DroprnnError(f"lab report: a trial names variant {trial.get('variant')!r}, "
                               f"which results['variants'] does not list.")
        if trial.get("status") not in ("ok", "failed"):
            raise DroprnnError(f"lab report: trial {trial['variant']!r} seed {trial.get('seed')!r} has status "
                               f"{trial.get('status')!r}; expected 'ok' or 'failed'.")
    return trials


def _metric(results: dict) -> str:
    return str(results.get("config", {}).get("metric", "accuracy"))


# ---------------------------------------------------------------------------------------------------------------
# Tables: the same cells for markdown, HTML and the terminal


def table_columns(metric: str) -> list[str]:
    """The table's header, e.g. ``variant | test accuracy (mean ± std) | ...``."""
    return ["variant", f"test {metric} (mean ± std)", "best epoch", "train−val gap", "s/epoch", "trials"]


def best_variants(summaries: Sequence[VariantSummary], metric: str) -> set[str]:
    """The variants whose mean test metric is the best (ties all count); empty when no variant succeeded."""
    means = [s.test_mean for s in summaries if not math.isnan(s.test_mean)]
    if not means:
        return set()
    best = max(means) if metric_spec(metric).higher_is_better else min(means)
    return {s.variant for s in summaries if s.test_mean == best}


def _row_cells(summary: VariantSummary, metric: str) -> tuple[str, str, str, str, str, str, str]:
    """(variant, mean, ± std, best epoch, gap, s/epoch, trials) as text; mean and std kept apart for bolding."""
    decimals = metric_spec(metric).decimals
    return (
        summary.variant,
        _number(summary.test_mean, decimals),
        _number(summary.test_std, decimals),
        _number(summary.best_epoch_mean, 1),
        _number(summary.gap_mean, decimals, signed=True),
        _number(summary.seconds_per_epoch, 2),
        f"{summary.trials_ok}/{summary.trials}",
    )


def _number(value: float, decimals: int, *, signed: bool = False) -> str:
    if math.isnan(value):
        return MISSING
    value = round(value, decimals) + 0.0  # a value that rounds to zero prints as 0, never as -0
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _mean_with_std(mean: str, std: str, bold: str) -> str:
    if mean == MISSING:
        return MISSING
    return f"{bold}{mean}{bold} ± {std}"


def markdown_table(summaries: Sequence[VariantSummary], metric: str) -> str:
    """A GitHub pipe table of the summaries; the best mean is **bold**. Read it back with
    :func:`parse_markdown_table`."""
    best = best_variants(summaries, metric)
    lines = [_markdown_row(table_columns(metric)), _markdown_row(["---"] + ["---:"] * 5)]
    for summary in summaries:
        variant, mean, std, epoch, gap, seconds, trials = _row_cells(summary, metric)
        bold = "**" if summary.variant in best else ""
        lines.append(_markdown_row([variant, _mean_with_std(mean, std, bold), epoch, gap, seconds, trials]))
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
_SEPARATOR_CELL = re.compile(r"^:?-+:?$")


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The first pipe table in ``text`` as one dict per body row, header → cell text.

    Cells come back as written (bold markers and backticks kept), with ``\\|`` unescaped to ``|``;
    ``text`` may be a whole document such as ``report.md``.
    """
    lines = text.splitlines()
    for start in range(len(lines) - 1):
        if _is_table_line(lines[start]) and _is_separator(lines[start + 1]):
            break
    else:
        raise DroprnnError("lab report: no markdown pipe table (header line, then a --- line) in the text.")
    header = _split_row(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not _is_table_line(line):
            break
        cells = _split_row(line)
        if len(cells) != len(header):
            raise DroprnnError(f"lab report: table row has {len(cells)} cells, header has {len(header)}: {line!r}")
        rows.append(dict(zip(header, cells)))
    return rows


def _is_table_line(line: str) -> bool:
    return line.strip().startswith("|")


def _is_separator(line: str) -> bool:
    return _is_table_line(line) and all(_SEPARATOR_CELL.match(cell) for cell in _split_row(line))


def _split_row(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip().replace("\\|", "|") for cell in _UNESCAPED_PIPE.split(inner)]


def terminal_table(summaries: Sequence[VariantSummary], metric: str) -> str:
    """The table as plain aligned text for a terminal; the best mean is marked with ``*``."""
    best = best_variants(summaries, metric)
    # ASCII '-' in the header: U+2212 is missing from some consoles' code pages.
    header = [name.replace("−", "-") for name in table_columns(metric)]
    rows = []
    for summary in summaries:
        variant, mean, std, epoch, gap, seconds, trials = _row_cells(summary, metric)
        marker = " *" if summary.variant in best else "  "
        rows.append([variant, _mean_with_std(mean, std, "") + marker, epoch, gap, seconds, trials])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [_aligned(header, widths), _aligned(["-" * width for width in widths], widths)]
    lines += [_aligned(row, widths) for row in rows]
    direction = "higher" if metric_spec(metric).higher_is_better else "lower"
    lines.append(f"* best mean test {metric} ({direction} is better); means over successful seeds.")
    return "\n".join(lines) + "\n"


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    # The variant name reads left to right; numbers line up on the right.
    first = cells[0].ljust(widths[0])
    rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
    return "  ".join([first] + rest).rstrip()


def _html_table(summaries: Sequence[VariantSummary], metric: str) -> str:
    best = best_variants(summaries, metric)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in table_columns(metric))
    body = []
    for summary in summaries:
        variant, mean, std, epoch, gap, seconds, trials = _row_cells(summary, metric)
        mean_html = html.escape(mean)
        if summary.variant in best:
            mean_html = f"<strong>{mean_html}</strong>"
        mean_cell = MISSING if mean == MISSING else f"{mean_html} ± {html.escape(std)}"
        cells = [f'<td class="name"><code>{html.escape(variant)}</code></td>', f"<td>{mean_cell}</td>"]
        cells += [f"<td>{html.escape(cell)}</td>" for cell in (epoch, gap, seconds, trials)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


# ---------------------------------------------------------------------------------------------------------------
# Learning curves


def plot_curves(results: dict, path: Path) -> Path:
    """One PNG with a panel per variant (shared y axes): each seed's validation metric (thin), their mean
    (thick) and the mean training metric (dashed). Returns ``path``."""
    metric = _metric(results)
    return _plot_grid(results, Path(path), train_key="train_metric", val_key="val_metric", ylabel=metric)


def plot_losses(results: dict, path: Path) -> Path:
    """As :func:`plot_curves`, for the training and validation losses. Returns ``path``."""
    return _plot_grid(results, Path(path), train_key="train_loss", val_key="val_loss", ylabel="loss")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DroprnnError(
            "the lab's report draws its pictures with matplotlib, which is not installed: "
            "pip install matplotlib (or pip install droprnn[lab])"
        ) from None


def _plot_grid(results: dict, path: Path, *, train_key: str, val_key: str, ylabel: str) -> Path:
    _require_matplotlib()
    # The object-oriented API with an Agg canvas: no pyplot global state, no change to the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = _variants(results)
    trials = _trials(results)
    columns = min(3, len(variants))
    rows = math.ceil(len(variants) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (name, info) in zip(axes, variants.items()):
        ok = [t for t in trials if t["variant"] == name and t["status"] == "ok"]
        _draw_panel(ax, ok, train_key, val_key)
        ax.set_title(str(info.get("title", name)), fontsize=10, parse_math=False)  # a "$" is not TeX
        ax.grid(alpha=0.3)
    for ax in axes[len(variants):]:
        ax.set_visible(False)
    # The lowest visible panel of each column carries the epoch axis, also above an empty grid cell.
    for ax in axes[max(0, len(variants) - columns):len(variants)]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
    for ax in axes[::columns]:
        ax.set_ylabel(ylabel)
    figure.legend(*_legend_entries(axes), loc="outside upper center", ncols=columns, fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _draw_panel(ax: Any, trials: list[dict], train_key: str, val_key: str) -> None:
    if not trials:
        ax.text(0.5, 0.5, "no successful trial", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    colour = "tab:blue"
    for trial in trials:
        epochs, values = _series(trial, val_key)
        ax.plot(epochs, values, color=colour, linewidth=0.8, alpha=0.35, label="validation, each seed")
    epochs, val_mean = _mean_series(trials, val_key)
    ax.plot(epochs, val_mean, color=colour, linewidth=2.4, label="validation, mean")
    epochs, train_mean = _mean_series(trials, train_key)
    ax.plot(epochs, train_mean, color="tab:orange", linewidth=1.5, linestyle="--", label="training, mean")


def _legend_entries(axes: Sequence[Any]) -> tuple[list, list[str]]:
    """One legend entry per label over the panels (the first panel may have no successful trial)."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def _series(trial: dict, key: str) -> tuple[list[int], list[float]]:
    return [record["epoch"] for record in trial["epochs"]], [float(record[key]) for record in trial["epochs"]]


def _mean_series(trials: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds epoch by epoch; where a seed stopped early the mean is over the seeds still running."""
    by_epoch: dict[int, list[float]] = {}
    for trial in trials:
        for epoch, value in zip(*_series(trial, key)):
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[epoch]) for epoch in epochs]


# ---------------------------------------------------------------------------------------------------------------
# The report files


def write_report(results: dict, run_dir: Path, mask_images: dict[str, Path]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the curve pictures into ``run_dir``.

    ``mask_images`` maps a variant to its mask PNG (a variant missing there is skipped with a note).
    Returns the written paths under the keys ``"markdown"``, ``"html"``, ``"curves"`` and ``"losses"``.
    Needs matplotlib; without it a :class:`DroprnnError` is raised before anything is written.
    """
    _require_matplotlib()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(results)
    curves = plot_curves(results, run_dir / CURVES_FILE)
    losses = plot_losses(results, run_dir / LOSSES_FILE)
    masks = {name: Path(path) for name, path in mask_images.items() if Path(path).is_file()}
    report = _Report(results, summaries, curves, losses, masks)
    markdown = run_dir / MARKDOWN_FILE
    markdown.write_text(report.markdown(run_dir), encoding="utf-8")
    page = run_dir / HTML_FILE
    page.write_text(report.html(), encoding="utf-8")
    return {"markdown": markdown, "html": page, "curves": curves, "losses": losses}


@dataclass(frozen=True)
class _Report:
    """Everything the two renderings share, so report.md and report.html always say the same."""

    results: dict
    summaries: list[VariantSummary]
    curves: Path
    losses: Path
    masks: dict[str, Path]

    @property
    def metric(self) -> str:
        return _metric(self.results)

    def header_items(self) -> list[tuple[str, str]]:
        config = self.results.get("config", {})
        versions = self.results.get("versions", {})
        items = [(key.replace("_", " "), config[key]) for key in
                 ("dataset", "task", "metric", "layer", "units", "epochs", "rate", "batch_size", "learning_rate",
                  "validation_fraction") if key in config]
        items.append(("seeds", ", ".join(str(seed) for seed in config.get("seeds", []))))
        items.append(("machine", self.results.get("machine", "")))
        items.append(("versions", ", ".join(f"{name} {version}" for name, version in versions.items())))
        items.append(("created", self.results.get("created", "")))
        return [(name, str(value)) for name, value in items]

    def table_note(self) -> str:
        direction = "higher" if metric_spec(self.metric).higher_is_better else "lower"
        # Penn Treebank runs test the model after their last epoch, as the papers they reproduce report it.
        weights = ("the weights after the last epoch" if self.results.get("config", {}).get("test_weights") == "last"
                   else "each seed's best-epoch weights")
        return (f"Test {self.metric} with {weights}: mean ± sample std over the successful "
                f"seeds; the best mean is in bold ({direction} is better). The gap is training minus validation "
                f"{self.metric} at the best epoch.")

    def published_lines(self) -> list[str]:
        """Each finished trial's numbers beside the paper's (Penn Treebank presets), named by variant and seed."""
        lines = []
        for trial in self.results.get("trials", []):
            if trial["status"] == "ok":
                lines += [f"{trial['variant']} (seed {trial.get('seed')}) {line}"
                          for line in against_published(trial, self.metric)]
        return lines

    def failed_trials(self) -> list[dict]:
        return [trial for trial in self.results.get("trials", []) if trial["status"] == "failed"]

    def variants(self) -> dict[str, dict]:
        return self.results["variants"]

    # -- markdown -----------------------------------------------------------------------------------------------

    def markdown(self, run_dir: Path) -> str:
        link = lambda path: _relative_link(path, run_dir)  # noqa: E731 - every link is relative to run_dir
        config = self.results.get("config", {})
        out = [f"# Dropout lab: {config.get('dataset', '?')}, {config.get('layer', '?')}", ""]
        out += [f"- **{name}**: {value}" for name, value in self.header_items()]
        out += ["", "## 1. Results", "", self.table_note(), "", markdown_table(self.summaries, self.metric)]
        published = self.published_lines()
        if published:
            out += [f"- {_md_text(line)}" for line in published] + [""]
        out += ["## 2. Learning curves", "", f"![{self.metric} by epoch]({link(self.curves)})", "",
                f"![loss by epoch]({link(self.losses)})", ""]
        out += ["## 3. Mask pictures", ""]
        for name, info in self.variants().items():
            out += [f"### `{name}`: {_md_text(info.get('title', name))}", "", _md_text(info.get("description", "")), ""]
            if name in self.masks:
                out += [f"![mask of {name}]({link(self.masks[name])})", ""]
            else:
                out += ["_No mask picture for this variant._", ""]
        out += ["## 4. Model code", ""]
        for name, info in self.variants().items():
            out += [f"### `{name}`", "", _fenced(str(info.get("code", "")), "python"), ""]
        out += ["## 5. Failed trials", ""]
        failed = self.failed_trials()
        if not failed:
            out += ["None: every trial finished.", ""]
        for trial in failed:
            out += [f"### `{trial['variant']}`, seed {trial.get('seed')} ({_epochs_done(trial)})", "",
                    _fenced(_last_lines(trial.get("error")), "text"), ""]
        return "\n".join(out).rstrip() + "\n"

    # -- html ---------------------------------------------------------------------------------------------------

    def html(self) -> str:
        esc = html.escape
        config = self.results.get("config", {})
        title = f"Dropout lab: {config.get('dataset', '?')}, {config.get('layer', '?')}"
        out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
               f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
               f"<h1>{esc(title)}</h1>", "<dl>"]
        out += [f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>" for name, value in self.header_items()]
        out += ["</dl>", "<h2>1. Results</h2>", f"<p>{esc(self.table_note())}</p>",
                _html_table(self.summaries, self.metric)]
        published = self.published_lines()
        if published:
            out += ["<ul>", *(f"<li>{esc(line)}</li>" for line in published), "</ul>"]
        out += ["<h2>2. Learning curves</h2>", _html_image(self.curves, f"{self.metric} by epoch"),
                _html_image(self.losses, "loss by epoch")]
        out += ["<h2>3. Mask pictures</h2>"]
        for name, info in self.variants().items():
            out += [f"<h3><code>{esc(name)}</code>: {esc(str(info.get('title', name)))}</h3>",
                    f"<p>{esc(str(info.get('description', '')))}</p>"]
            if name in self.masks:
                out.append(_html_image(self.masks[name], f"mask of {name}"))
            else:
                out.append('<p class="note">No mask picture for this variant.</p>')
        out += ["<h2>4. Model code</h2>"]
        for name, info in self.variants().items():
            out += [f"<h3><code>{esc(name)}</code></h3>", f"<pre><code>{esc(str(info.get('code', '')))}</code></pre>"]
        out += ["<h2>5. Failed trials</h2>"]
        failed = self.failed_trials()
        if not failed:
            out.append("<p>None: every trial finished.</p>")
        for trial in failed:
            out += [f"<h3><code>{esc(str(trial['variant']))}</code>, seed {esc(str(trial.get('seed')))} "
                    f"({esc(_epochs_done(trial))})</h3>",
                    f"<pre class=\"error\"><code>{esc(_last_lines(trial.get('error')))}</code></pre>"]
        out += ["</body>", "</html>"]
        return "\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222;line-height:1.45}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em}dt{font-weight:600}dd{margin:0}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
    "td.name,th:first-child{text-align:left}thead{background:#f3f3f3}"
    "img{max-width:100%;border:1px solid #eee}"
    "pre{background:#f6f8fa;padding:.8em;overflow-x:auto}pre.error{background:#fff3f3}"
    ".note{color:#777;font-style:italic}"
)


def _html_image(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined as a base64 data URI, so report.html needs no other file."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise DroprnnError(f"lab report: {path} is not a PNG file (its first bytes are {data[:8]!r}).")
    encoded = base64.b64encode(data).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"></p>'


def _relative_link(path: Path, run_dir: Path) -> str:
    """A URL for report.md: relative (the run directory can be moved or zipped), forward slashes, quoted."""
    return urllib.parse.quote(Path(os.path.relpath(path, run_dir)).as_posix())


def _md_text(value: Any) -> str:
    """Prose for report.md with tags defused: markdown renderers pass raw HTML through (a lone & shows as is)."""
    return str(value).replace("<", "&lt;").replace(">", "&gt;")


def _fenced(text: str, language: str) -> str:
    """A markdown code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _last_lines(error: Any) -> str:
    lines = str(error or "(no error text recorded)").rstrip().splitlines()
    return "\n".join(lines[-ERROR_LINES_SHOWN:])


def _epochs_done(trial: dict) -> str:
    done = len(trial.get("epochs") or [])
    return f"failed after {done} epoch{'s' if done != 1 else ''}"
