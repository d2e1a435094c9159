"""The dropout lab: variants as code, trials, the runner (workers, resumption, crashes, Ray), mask pictures,
progress and the command line. Trials here are tiny (a few epochs, small models) so the file runs in
seconds, except the worker-process and Ray tests, which pay for starting processes.

The data is the real JapaneseVowels from the sktime wheel; without it these tests are skipped with the
pip command as the reason.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

import droprnn
from droprnn.cli import main
from droprnn.datasets import sources
from droprnn.errors import DroprnnError
from droprnn.lab import masks, runner, variants
from droprnn.lab.config import LabConfig
from droprnn.lab.progress import PlainProgress, RichProgress
from droprnn.lab.report import PNG_SIGNATURE, parse_markdown_table
from droprnn.lab.train import code_for, run_trial, task_for

needs_data = pytest.mark.skipif(importlib.util.find_spec("sktime") is None,
                                reason=f"needs the data package: {sources.SKTIME.install_command}")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")

TINY = dict(units=8, epochs=2, seeds=1, workers=1)


def tiny(tmp_path, **changes) -> LabConfig:
    return LabConfig(**{**TINY, "out": str(tmp_path / "run"), **changes})


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, data):
        self.events.append((event, data))

    def of(self, kind):
        return [d for e, d in self.events if e == kind]


# ---------------------------------------------------------------------------------------------- variants
def test_every_variant_renders_code_that_builds_the_model_it_names():
    for name, variant in variants.VARIANTS.items():
        for layer in ("lstm", "gru"):
            code = variants.model_code(variant, layer=layer, units=6, rate=0.25, inputs=(), classes=3,
                                       rnn_input="input_size=4")
            model = variants.build(code)
            assert isinstance(model, droprnn.Sequential), name
            rnn = next(m for m in model.layers if isinstance(m, droprnn.RNN))
            assert isinstance(rnn, droprnn.LSTM if layer == "lstm" else droprnn.GRU)
            out = model(torch.randn(2, 5, 4), lengths=torch.tensor([5, 3]))
            assert out.shape == (2, 3)
            if name == "none":
                assert "0.25" not in code
            else:
                assert "0.25" in code, f"{name}: the rate does not appear in its code"


def test_variant_code_is_what_a_user_would_write():
    code = variants.model_code(variants.VARIANTS["both"], layer="lstm", units=64, rate=0.3, inputs=(), classes=9,
                               rnn_input="input_size=12")
    assert code == ("model = droprnn.Sequential([\n"
                    "    droprnn.LSTM(64, input_size=12, dropout=0.3, recurrent_dropout=0.3),\n"
                    "    droprnn.Dense(9, input_size=64),\n"
                    "])\n")
    gru_zoneout = variants.model_code(variants.VARIANTS["zoneout"], layer="gru", units=4, rate=0.1, inputs=(),
                                      classes=2)
    assert "droprnn.GRU(4, zoneout_h=0.1)" in gru_zoneout and "zoneout_c" not in gru_zoneout


@pytest.mark.parametrize("bad", ["bogus", "none,bogus", "", ","])
def test_unknown_or_empty_variants_are_refused(bad):
    with pytest.raises(DroprnnError, match="variants"):
        variants.check_variants("droprnn lab", bad)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("changes, option", [
    (dict(rate=1.0), "--rate"), (dict(rate=-0.1), "--rate"), (dict(layer="rnn"), "--layer"),
    (dict(dataset="mnist"), "--dataset"), (dict(dataset="ptb"), "--dataset"), (dict(units=0), "--units"),
    (dict(epochs=0), "--epochs"), (dict(seeds=0), "--seeds"), (dict(workers=0), "--workers"),
    (dict(learning_rate=0.0), "--learning-rate"),
])
def test_bad_settings_name_the_option(changes, option):
    with pytest.raises(DroprnnError, match=option) as error:
        LabConfig(**changes)
    assert "\n" not in str(error.value)


def test_default_out_follows_the_dataset():
    assert LabConfig(dataset="plaid").out == "runs/lab-plaid"


# ---------------------------------------------------------------------------------------------- trials
@needs_data
def test_a_trial_is_repeatable_bit_for_bit_and_tests_its_best_epoch(tmp_path):
    config = tiny(tmp_path, epochs=3)
    code = code_for(config, task_for(config.dataset, config.validation_fraction), "both")
    first, second = (run_trial(config, "both", code, seed=5) for _ in range(2))
    strip = lambda t: [{k: v for k, v in e.items() if k != "seconds"} for e in t["epochs"]]  # noqa: E731
    assert strip(first) == strip(second)
    assert first["test_metric"] == second["test_metric"] and first["test_loss"] == second["test_loss"]
    other = run_trial(config, "both", code, seed=6)
    assert strip(other) != strip(first), "the seed changes nothing"
    best = first["best_epoch"]
    vals = [e["val_metric"] for e in first["epochs"]]
    assert vals[best - 1] == max(vals)
    assert 0.0 <= first["test_metric"] <= 1.0 and len(first["epochs"]) == 3


@needs_data
def test_the_task_splits_are_disjoint_standardised_and_complete():
    task = task_for("japanese_vowels", 0.2)
    assert len(task.train) + len(task.valid) == 270 and len(task.test) == 370
    assert len(task.valid) == 54 and task.input_size == 12 and len(task.classes) == 9
    steps = torch.cat([task.train.inputs[i, :n] for i, n in enumerate(task.train.lengths.tolist())])
    assert torch.allclose(steps.mean(0), torch.zeros(12), atol=1e-4)
    assert torch.allclose(steps.std(0), torch.ones(12), atol=1e-2)
    batch = next(task.test.batches(5))
    assert batch.inputs.shape[1] == int(batch.lengths.max()), "a batch is cut to its longest sequence"


# ---------------------------------------------------------------------------------------------- runs
@needs_data
@needs_matplotlib
def test_tiny_run_end_to_end_writes_results_report_and_masks(tmp_path):
    config = tiny(tmp_path, variants="none,both,zoneout")
    events = Recorder()
    results, files = runner.run_lab(config, events)
    run_dir = Path(config.out)
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored["config"]["variants"] == ["none", "both", "zoneout"] and stored["config"]["seeds"] == [0]
    assert [t["status"] for t in stored["trials"]] == ["ok"] * 3
    assert all(len(t["epochs"]) == 2 for t in stored["trials"])
    assert set(stored["versions"]) >= {"droprnn", "torch", "numpy", "python"}
    for name in ("none", "both", "zoneout"):
        assert stored["variants"][name]["code"].startswith("model = droprnn.Sequential([")
        assert (run_dir / "masks" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    rows = parse_markdown_table((run_dir / "report.md").read_text())
    assert [r["variant"] for r in rows] == ["none", "both", "zoneout"]
    assert files["html"].exists() and "droprnn.LSTM(8, input_size=12, zoneout_h=0.3, zoneout_c=0.3)" in \
        files["html"].read_text()
    assert [e for e, _ in events.events][0] == "start" and events.events[-1][0] == "done"
    assert len(events.of("trial")) == 3 and len(events.of("epoch")) == 6


@needs_data
@needs_matplotlib
def test_rerun_skips_finished_trials_and_runs_only_new_ones(tmp_path):
    config = tiny(tmp_path, variants="none,dropout")
    runner.run_lab(config)
    trial = runner.trial_path(Path(config.out), "none", 0)
    written = trial.stat().st_mtime_ns
    events = Recorder()
    runner.run_lab(config, events)
    assert events.of("start")[0]["finished"] == 2 and events.of("start")[0]["to_run"] == 0
    assert not events.of("trial") and trial.stat().st_mtime_ns == written
    more = Recorder()
    results, _ = runner.run_lab(tiny(tmp_path, variants="none,dropout", seeds=2), more)
    assert sorted((t["variant"], t["seed"]) for t in more.of("trial")) == [("dropout", 1), ("none", 1)]
    assert len(results["trials"]) == 4


@needs_data
@needs_matplotlib
def test_rerun_with_other_settings_is_refused(tmp_path):
    runner.run_lab(tiny(tmp_path, variants="none"))
    with pytest.raises(DroprnnError, match="units 8 there, 9 now"):
        runner.run_lab(tiny(tmp_path, variants="none", units=9))


@needs_data
@needs_matplotlib
def test_a_trial_that_raises_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setitem(variants.VARIANTS, "broken", variants.Variant(
        "broken", "broken", "raises while building", before=("droprnn.Dropout(1.5)",)))
    results, files = runner.run_lab(tiny(tmp_path, variants="none,broken"))
    by_variant = {t["variant"]: t for t in results["trials"]}
    assert by_variant["none"]["status"] == "ok"
    assert by_variant["broken"]["status"] == "failed" and "rate" in by_variant["broken"]["error"]
    assert "Traceback" in by_variant["broken"]["error"]
    assert "broken" in files["markdown"].read_text()
    # The failed trial is tried again by the next run; the finished one is not.
    events = Recorder()
    runner.run_lab(tiny(tmp_path, variants="none,broken"), events)
    assert [t["variant"] for t in events.of("trial")] == ["broken"]


@needs_data
@needs_matplotlib
def test_worker_processes_survive_a_trial_that_kills_its_process(tmp_path, monkeypatch):
    # The killer's code reaches the worker as source text, so the worker needs no registry entry.
    monkeypatch.setitem(variants.VARIANTS, "killer", variants.Variant(
        "killer", "killer", "exits its process", before=("__import__('os')._exit(7)",)))
    config = tiny(tmp_path, variants="none,killer,dropout", workers=2)
    events = Recorder()
    results, _ = runner.run_lab(config, events)
    by_variant = {t["variant"]: t for t in results["trials"]}
    assert by_variant["none"]["status"] == "ok" and by_variant["dropout"]["status"] == "ok"
    assert by_variant["killer"]["status"] == "failed"
    assert "worker process" in by_variant["killer"]["error"] and "exit code 7" in by_variant["killer"]["error"]
    assert len(events.of("epoch")) == 4, "epoch updates come back from the workers"
    # Trials run in worker processes equal the same trials run inline, bit for bit.
    inline, _ = runner.run_lab(tiny(tmp_path, variants="none,dropout", out=str(tmp_path / "inline")))
    metrics = lambda rs: {t["variant"]: (t["test_metric"], t["epochs"][-1]["train_loss"])  # noqa: E731
                          for t in rs["trials"] if t["status"] == "ok"}
    assert metrics(inline) == metrics(results)


@needs_data
@needs_matplotlib
def test_a_worker_that_stops_responding_is_killed_and_its_trial_recorded(tmp_path, monkeypatch):
    """A worker frozen by SIGSTOP sends no heartbeat: after --trial-timeout its trial is failed (tried again
    next run) and the others finish, instead of the lab waiting forever."""
    monkeypatch.setitem(variants.VARIANTS, "frozen", variants.Variant(
        "frozen", "frozen", "stops its own process", before=("__import__('os').kill(__import__('os').getpid(), 19)",)))
    # 8 s: four heartbeats' margin, so a slow, loaded machine does not fail the trials that run.
    config = tiny(tmp_path, variants="none,frozen,dropout", workers=2, trial_timeout=8.0)
    started = time.monotonic()
    results, _ = runner.run_lab(config)
    by_variant = {t["variant"]: t for t in results["trials"]}
    assert by_variant["none"]["status"] == "ok" and by_variant["dropout"]["status"] == "ok"
    assert by_variant["frozen"]["status"] == "failed" and "no sign of life for 8 s" in by_variant["frozen"]["error"]
    assert time.monotonic() - started < 120


@needs_data
@needs_matplotlib
def test_trials_run_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    results, _ = runner.run_lab(tiny(tmp_path, variants="none,tied", ray="local", workers=2))
    assert [t["status"] for t in results["trials"]] == ["ok", "ok"]
    inline, _ = runner.run_lab(tiny(tmp_path, variants="none,tied", out=str(tmp_path / "inline")))
    assert [t["test_metric"] for t in results["trials"]] == [t["test_metric"] for t in inline["trials"]]


def test_missing_data_package_fails_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "find_package", lambda name: None)
    task_for.cache_clear()
    from droprnn.datasets import _load_once
    _load_once.cache_clear()
    try:
        with pytest.raises(DroprnnError, match=r"pip install --no-deps sktime==1\.2\.0"):
            runner.run_lab(tiny(tmp_path))
    finally:
        _load_once.cache_clear()
        task_for.cache_clear()


# ---------------------------------------------------------------------------------------------- mask pictures
def _panels(name: str, layer: str = "lstm", steps: int = 9):
    code = variants.model_code(variants.VARIANTS[name], layer=layer, units=6, rate=0.5, inputs=(), classes=2,
                               rnn_input="input_size=5")
    torch.manual_seed(3)
    return masks.mask_panels(variants.build(code), torch.randn(2, 12, 5), torch.tensor([steps, 12]))


def test_mask_panels_show_what_each_variant_drops():
    assert _panels("none") == []
    (dropout,) = _panels("dropout")
    assert dropout.image.shape == (9, 5) and set(dropout.image.unique().tolist()) <= {0.0, 1.0}, \
        "without recurrent_dropout one mask serves every gate"
    assert (dropout.image == dropout.image[0]).all(), "one mask per sequence"
    inputs, recurrent = _panels("both")
    assert inputs.image.shape == (9, 5) and recurrent.image.shape == (9, 6)
    assert set(recurrent.image.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    (per_step,) = _panels("per_step")
    assert not (per_step.image == per_step.image[0]).all(), "a fresh mask at every step"
    (weights,) = _panels("weights", "gru")
    assert weights.image.shape == (6, 18) and weights.rows == "unit"
    h, c = _panels("zoneout")
    assert h.image.shape == c.image.shape == (9, 6) and "c units" in c.title
    (timesteps,) = _panels("timestep_dropout")
    assert ((timesteps.image == 0) | (timesteps.image == 1)).all()
    assert all(len(set(row.tolist())) == 1 for row in timesteps.image), "whole timesteps"
    (spatial,) = _panels("spatial_input")
    assert (spatial.image == spatial.image[0]).all(), "whole channels"
    (after,) = _panels("dropout_after")
    assert after.image.shape == (1, 6) and after.columns == "unit"


def test_mask_panel_titles_say_whether_the_gates_share_a_mask():
    inputs, recurrent = _panels("both")
    assert "some of the 4 gates" in inputs.title and "some of the 4 gates" in recurrent.title
    (tied,) = _panels("tied")
    assert "one mask for every gate" in tied.title and "some of" not in tied.title
    (dropout,) = _panels("dropout")
    assert "one mask for every gate" in dropout.title


@needs_matplotlib
def test_mask_pictures_mention_grey_only_where_there_is_grey(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    captions = []
    original = Figure.supxlabel
    monkeypatch.setattr(Figure, "supxlabel", lambda self, text, **kw: captions.append(text) or original(self, text, **kw))
    masks.draw(_panels("tied"), tmp_path / "tied.png", "tied")
    masks.draw(_panels("both"), tmp_path / "both.png", "both")
    assert "grey" not in captions[0] and "grey" in captions[1]


@needs_matplotlib
def test_masks_command_writes_one_png_per_variant(tmp_path, capsys):
    assert main(["masks", "--variants", "both,weights", "--layer", "gru", "--out", str(tmp_path), "--steps", "7"]) == 0
    printed = capsys.readouterr().out
    for name in ("both", "weights"):
        path = tmp_path / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE and str(path) in printed
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "both.png").shape[2] in (3, 4)


# ---------------------------------------------------------------------------------------------- terminal
TRIAL = {"variant": "both", "seed": 1, "status": "ok", "test_metric": 0.97, "best_epoch": 4, "wall_seconds": 1.5}


def test_plain_progress_prints_a_line_per_trial():
    out = io.StringIO()
    progress = PlainProgress(out)
    progress("start", {"total": 2, "finished": 1, "to_run": 1, "epochs": 3})
    progress("epoch", {"variant": "both", "seed": 1, "epoch": 1, "epochs": 3, "train_loss": 1.0, "val_metric": 0.5})
    progress("trial", TRIAL)
    progress("trial", {**TRIAL, "status": "failed", "error": "Traceback ...\nValueError: bad rate"})
    lines = out.getvalue().splitlines()
    assert lines == ["resuming: 1 of 2 trials already finished",
                     "[2/2] both seed 1: test 0.970 (best epoch 4, 1.5 s)",
                     "[3/2] both seed 1: FAILED: ValueError: bad rate"]


def test_rich_progress_follows_the_events():
    pytest.importorskip("rich")
    from rich.console import Console

    progress = RichProgress(Console(file=io.StringIO(), force_terminal=False))
    progress("start", {"total": 1, "finished": 0, "to_run": 1, "epochs": 3})
    progress("epoch", {"variant": "both", "seed": 1, "epoch": 2, "epochs": 3, "train_loss": 1.0, "val_metric": 0.5})
    assert len(progress.running) == 1
    progress("trial", TRIAL)
    assert not progress.running and progress.bars.tasks[0].completed == 1
    progress.close()
    assert "both seed 1: test 0.970" in progress.console.file.getvalue()


@pytest.mark.parametrize("argv, needle", [
    (["lab", "--variants", "none,bogus"], "bogus"),
    (["lab", "--rate", "1.0"], "--rate"),
    (["lab", "--dataset", "imagenet"], "--dataset"),
    (["lab", "--units", "ten"], "--units"),
    (["masks", "--variants", "nope"], "nope"),
    (["lab", "--variants", ","], "--variants` expected names from none, "),
    (["lab", "--variants", "none,none"], "'none' more than once"),
    (["lab", "--out", "{a_file}"], "is a file"),
    (["masks", "--out", "{a_file}"], "is a file"),
    (["lab", "ptb", "--device", "tpu"], "--device"),
    (["demo", "--steps", "-1"], "droprnn demo: argument `--steps` expected an int > 0"),
])
def test_bad_options_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    argv = [arg.format(a_file=a_file) for arg in argv]
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert a_file.read_text() == "kept"


@pytest.mark.parametrize("command, needles", [
    (["lab"], ["--units UNITS (default: 64)", "--layer LAYER lstm or gru (default: lstm)"]),
    (["lab", "ptb"], ["(default: tiny)", "--seed SEED (default: 0)"]),
    (["masks"], ["--units UNITS (default: 16)", "Draw, for each dropout placement"]),
    (["demo"], ["--seed SEED (default: 0)", "(default: 12)"]),
])
def test_help_shows_every_options_default(command, needles, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(needle in out for needle in needles), out


def test_python_dash_m_runs_the_same_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "droprnn", "lab", "--rate", "2"], capture_output=True, text=True,
                            timeout=120, env={**os.environ})
    assert result.returncode == 2 and "--rate" in result.stderr
