"""Word-level language modelling on Penn Treebank: Zaremba et al. (2014) and Gal & Ghahramani (2016) with droprnn.

``droprnn lab ptb --preset NAME`` trains one preset and writes ``results.json`` and the lab's report, with
the published test perplexity beside ours. The training path, in one sitting:

1. the token stream is cut into ``batch`` parallel rows (``batchify``), read in windows of ``bptt`` steps
   (``segments``); every window's targets are its inputs shifted by one token;
2. the model is plain droprnn layers (its source is in the report): an embedding, two *stateful* LSTMs
   whose final states start the next window, detached (truncated backpropagation through time), and a
   softmax layer. Masks are redrawn at every window: each call draws its dropout plan;
3. plain SGD on the summed cross-entropy of a window divided by the batch size (Zaremba's scaling: the
   learning rate multiplies the sum over the window's steps), gradient-norm clipping, the learning rate
   multiplied by ``lr_decay`` at each epoch after ``decay_after``;
4. perplexity = exp(mean negative log-likelihood per predicted token), on the validation set after every
   epoch and on the test set at the end, reading each stream as one sequence (batch 1, states carried);
   Gal's presets also give the MC-dropout perplexity: the predicted probabilities averaged over
   ``mc_samples`` stochastic passes, then the perplexity of that average.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import datasets
from ..layers.dropout import EmbeddingDropout
from ..dropout.mc import mc_dropout_mode
from ..errors import DroprnnError, check_device, check_out_dir, check_positive_int
from ..layers.recurrent import RNN
from . import masks, report
from .runner import versions
from .variants import VARIANTS, Variant, build, check_variants, rnn_arguments

Tensor = torch.Tensor
WHERE = "droprnn lab ptb"
VOCABULARY = 10_000
EVAL_BPTT = 50
SAVE_EVERY = 300.0  # seconds between a run's checkpoints within an epoch or the MC evaluation


@dataclass(frozen=True)
class Preset:
    """One published configuration. Rates are drop probabilities; 0 turns a site off.

    dropout:            standard dropout (a fresh mask per step) on the embedding output, between the
                        layers and before the softmax (Zaremba's "non-recurrent connections")
    input_dropout, recurrent_dropout: the LSTMs' own ``dropout=`` / ``recurrent_dropout=`` (Keras's
                        per-gate masks, one per window: Gal's variational LSTM)
    output_dropout:     one mask per window on the last LSTM's output (Gal's output mask)
    embedding_dropout:  whole word types dropped from the embedding (Gal's embedding dropout)
    embedding_per_sequence: each row of a window drops its own word types (Gal's scripts), rather than one
                        draw shared by the batch
    placement, placement_rate: one of :data:`PLACEMENTS` at that rate, in place of the sites above (the
                        "which dropout, where?" runs: ``droprnn lab ptb --variants``)
    mc_samples:         MC-dropout passes over the test set after training (0: none)
    mc_word_dropout:    whether those passes drop word types too; Gal's scripts keep every word at test
                        time (their MC passes sample every other mask), so the default is no
    """

    name: str
    description: str
    layers: int
    units: int
    epochs: int
    learning_rate: float
    lr_decay: float
    decay_after: int
    init_scale: float
    batch_size: int = 20
    bptt: int = 20
    clip: float = 5.0
    dropout: float = 0.0
    input_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    output_dropout: float = 0.0
    embedding_dropout: float = 0.0
    embedding_per_sequence: bool = False
    placement: str = ""
    placement_rate: float = 0.0
    weight_decay: float = 0.0
    mc_samples: int = 0
    mc_word_dropout: bool = False
    published: Optional[float] = None
    published_mc: Optional[float] = None
    train_tokens: Optional[int] = None   # a prefix of each stream, for quick runs
    eval_tokens: Optional[int] = None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("zaremba-small", "Zaremba et al. 2014, small: no dropout", layers=2, units=200, epochs=13,
           learning_rate=1.0, lr_decay=0.5, decay_after=4, init_scale=0.1, published=114.5),
    # Zaremba's medium and large schedules divide the learning rate by 1.2 / 1.15 per epoch after the 6th / 14th
    # (the paper; Gal's scripts keep them); the TensorFlow tutorial multiplies by 0.8 instead.
    Preset("zaremba-medium", "Zaremba et al. 2014, medium: dropout 0.5 on the non-recurrent connections",
           layers=2, units=650, epochs=39, learning_rate=1.0, lr_decay=1 / 1.2, decay_after=6, init_scale=0.05,
           bptt=35, dropout=0.5, published=82.7),
    # Gal's variational LSTM on Zaremba's medium schedule, as his published scripts run it: untied per-gate
    # masks drawn per window, word-type masks drawn per sequence and tied over repeated words in the window,
    # weight decay 1e-7 per step. The rates are his grid's ties (embedding with recurrent, input with output)
    # at the medium model's values; his scripts give only the large model's (0.3, 0.5).
    Preset("gal-medium", "Gal & Ghahramani 2016, medium variational LSTM (untied weights), MC dropout at test",
           layers=2, units=650, epochs=39, learning_rate=1.0, lr_decay=1 / 1.2, decay_after=6, init_scale=0.05,
           bptt=35, input_dropout=0.35, recurrent_dropout=0.2, output_dropout=0.35, embedding_dropout=0.2,
           embedding_per_sequence=True, weight_decay=1e-7, mc_samples=100, published=79.7, published_mc=78.6),
    # The first gal-medium run (finished 2026-11-27, results/ptb-gal-medium-tf.json): the TensorFlow tutorial's
    # decay and one word-type draw shared by the batch. Kept so that its documented numbers can be rerun.
    Preset("gal-medium-tf", "gal-medium with the TensorFlow tutorial's learning-rate decay (x0.8 per epoch) and "
           "word-type masks shared by the batch (the first run's recipe)",
           layers=2, units=650, epochs=39, learning_rate=1.0, lr_decay=0.8, decay_after=6, init_scale=0.05,
           bptt=35, input_dropout=0.35, recurrent_dropout=0.2, output_dropout=0.35, embedding_dropout=0.2,
           weight_decay=1e-7, mc_samples=100, mc_word_dropout=True, published=79.7, published_mc=78.6),
    # Gal's scheme on the small model and schedule: a check of MC dropout against the single pass that fits in an
    # hour of CPU (the medium runs outlast a working session here). The rates are ours (Gal gives none for
    # this size): his ties, at the small model's best rate for both layer sites (0.1, chosen on validation) on
    # the recurrent state and the embedding, and 0.25 on the inputs and the output.
    Preset("gal-small", "Gal & Ghahramani's variational scheme on the small model and schedule, MC dropout at test",
           layers=2, units=200, epochs=13, learning_rate=1.0, lr_decay=0.5, decay_after=4, init_scale=0.1,
           input_dropout=0.25, recurrent_dropout=0.1, output_dropout=0.25, embedding_dropout=0.1,
           embedding_per_sequence=True, weight_decay=1e-7, mc_samples=100),
    Preset("tiny", "a one-minute run for tests and demos: the variational scheme on a prefix of the data",
           layers=2, units=64, epochs=2, learning_rate=1.0, lr_decay=0.5, decay_after=1, init_scale=0.1,
           input_dropout=0.2, recurrent_dropout=0.2, output_dropout=0.2, embedding_dropout=0.1, mc_samples=4,
           train_tokens=100_000, eval_tokens=20_000),
)}


# The lab's placements, plus the one only a language model has: whole word types dropped from the embedding.
PLACEMENTS: dict[str, Variant] = {**VARIANTS, "embedding": Variant(
    "embedding", "embedding dropout", "Whole word types dropped from the embedding: every occurrence of a "
    "dropped word in the window reads zeros (Gal's embedding dropout), one draw per window shared by the batch.")}


def model_code(preset: Preset, vocabulary: int = VOCABULARY) -> str:
    """The droprnn source of the preset's model (the same words as the report shows)."""
    if preset.placement:
        return _placement_code(preset, vocabulary)
    u = preset.units
    embedding = f"droprnn.Embedding({vocabulary}, {u})"
    if preset.embedding_dropout:
        per_sequence = ", per_sequence=True" if preset.embedding_per_sequence else ""
        embedding = f"droprnn.EmbeddingDropout({embedding}, {preset.embedding_dropout}{per_sequence})"
    layers = [embedding]
    rnn_options = "".join(f", {name}={rate}" for name, rate in (
        ("dropout", preset.input_dropout), ("recurrent_dropout", preset.recurrent_dropout)) if rate)
    for _ in range(preset.layers):
        if preset.dropout:
            layers.append(f"droprnn.Dropout({preset.dropout})")
        layers.append(f"droprnn.LSTM({u}, return_sequences=True, stateful=True, input_size={u}{rnn_options})")
    if preset.dropout:
        layers.append(f"droprnn.Dropout({preset.dropout})")
    if preset.output_dropout:
        layers.append(f"droprnn.Dropout({preset.output_dropout}, noise_shape=(None, 1, None))")
    layers.append(f"droprnn.Dense({vocabulary}, input_size={u})")
    return "model = droprnn.Sequential([\n" + "".join(f"    {line},\n" for line in layers) + "])\n"


def _placement_code(preset: Preset, vocabulary: int) -> str:
    """A placement on the preset's stack: its layers before each LSTM's input and after each LSTM's output
    (so ``dropout_after`` drops between the layers and before the softmax), its arguments on every LSTM."""
    placement, rate, u = PLACEMENTS[preset.placement], preset.placement_rate, preset.units
    embedding = f"droprnn.Embedding({vocabulary}, {u})"
    layers = [f"droprnn.EmbeddingDropout({embedding}, {rate})" if placement.name == "embedding" else embedding]
    options = rnn_arguments(placement, "lstm", rate) if placement.rnn else ""
    for _ in range(preset.layers):
        layers += [b.format(rate=rate) for b in placement.before]
        layers.append(f"droprnn.LSTM({u}, return_sequences=True, stateful=True, input_size={u}"
                      f"{', ' + options if options else ''})")
        layers += [a.format(rate=rate) for a in placement.after]
    layers.append(f"droprnn.Dense({vocabulary}, input_size={u})")
    return "model = droprnn.Sequential([\n" + "".join(f"    {line},\n" for line in layers) + "])\n"


def placement_preset(base: Preset, placement: str, rate: float) -> Preset:
    """``base`` with its own dropout sites off and ``placement`` at ``rate`` instead (no MC evaluation)."""
    return dataclasses.replace(
        base, name=f"{base.name}/{placement}", description=PLACEMENTS[placement].description, dropout=0.0,
        input_dropout=0.0, recurrent_dropout=0.0, output_dropout=0.0, embedding_dropout=0.0,
        embedding_per_sequence=False, mc_samples=0, published=None, published_mc=None, placement=placement,
        placement_rate=0.0 if placement == "none" else rate)


# ---------------------------------------------------------------------------------------------- batching
def batchify(stream: np.ndarray, batch_size: int) -> Tensor:
    """(N,) token ids → (batch_size, N // batch_size): row b is the b-th contiguous slice of the stream;
    the tail that does not fill a column is dropped."""
    columns = len(stream) // batch_size
    if columns < 2:
        raise DroprnnError(f"{WHERE}: a stream of {len(stream)} tokens is too short for batch size {batch_size}.")
    return torch.as_tensor(np.asarray(stream[:columns * batch_size]), dtype=torch.int64).view(batch_size, columns)


def segments(data: Tensor, bptt: int, *, whole: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows (inputs (B, T), targets (B, T)) with targets one token ahead; T = bptt except perhaps the
    last window (dropped when ``whole`` is False, as Zaremba's training loop does)."""
    predicted = data.shape[1] - 1
    for start in range(0, predicted, bptt):
        steps = min(bptt, predicted - start)
        if steps < bptt and not whole:
            return
        yield data[:, start:start + steps], data[:, start + 1:start + 1 + steps]


def perplexity(total_nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood (natural log) per predicted token."""
    return math.exp(total_nll / tokens)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _reset(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, RNN) and module.stateful:
            module.reset_state()


def evaluate(model: torch.nn.Module, stream: np.ndarray, bptt: int = EVAL_BPTT) -> tuple[float, float]:
    """(mean NLL per token, perplexity) of ``stream`` read as one sequence, dropout off."""
    model.eval()
    _reset(model)
    device = _device(model)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no wait per window
    with torch.no_grad():
        for x, y in segments(batchify(stream, 1).to(device), bptt):
            logits = model(x)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").double()
            count += y.numel()
    _reset(model)
    total = total.item()
    return total / count, perplexity(total, count)


def mc_perplexity(model: torch.nn.Module, stream: np.ndarray, samples: int, bptt: int = EVAL_BPTT,
                  replicas: int = 10, word_dropout: bool = False, progress: Optional[dict[str, Any]] = None,
                  on_progress: Optional[Callable[[dict[str, Any]], None]] = None) -> float:
    """MC-dropout perplexity: each target's probability averaged over ``samples`` stochastic passes.

    Passes run ``replicas`` at a time as rows of one batch, reading the stream as one sequence with states
    carried; masks are redrawn at every window of ``bptt`` tokens. Every row draws its own masks
    (``_independent_rows``), so ``samples`` passes are that many independent draws. ``word_dropout``: the
    passes drop word types from the embedding too (Gal's scripts do not: every word is kept at test time).

    Resumable: after every group of passes ``on_progress`` is told ``{"done": passes, "summed": each target's
    summed probability}``; given back as ``progress`` (with the random streams as they were then) the
    evaluation continues from there and ends on the same number.
    """
    done, summed = (0, None) if progress is None else (progress["done"], progress["summed"])
    for group in _mc_passes(model, stream, samples, bptt, replicas, word_dropout, start=done):
        summed = group.sum(0) if summed is None else summed + group.sum(0)
        done += group.shape[0]
        if on_progress is not None:
            on_progress({"done": done, "summed": summed})
    return math.exp(-torch.log(summed / samples).mean().item())


def mc_probabilities(model: torch.nn.Module, stream: np.ndarray, samples: int, bptt: int = EVAL_BPTT,
                     replicas: int = 10, word_dropout: bool = False, progress: Optional[dict[str, Any]] = None,
                     on_progress: Optional[Callable[[dict[str, Any]], None]] = None) -> Tensor:
    """Each stochastic pass's probability of each target, (samples, tokens - 1) float64: the passes
    :func:`mc_perplexity` averages (same arguments). Resumable as it is, with ``{"passes": the passes so
    far}`` as the progress."""
    groups = [] if progress is None else [progress["passes"]]
    done = sum(group.shape[0] for group in groups)
    for group in _mc_passes(model, stream, samples, bptt, replicas, word_dropout, start=done):
        groups.append(group)
        done += group.shape[0]
        if on_progress is not None:
            on_progress({"done": done, "passes": torch.cat(groups)})
    return torch.cat(groups)


def _mc_passes(model: torch.nn.Module, stream: np.ndarray, samples: int, bptt: int, replicas: int,
               word_dropout: bool, start: int = 0) -> Iterator[Tensor]:
    """Passes ``start`` to ``samples`` of :func:`mc_probabilities`, a group (rows, tokens - 1) at a time."""
    samples = check_positive_int(WHERE, "mc_samples", samples)
    data = batchify(stream, 1).to(_device(model))
    done = start
    try:
        with torch.no_grad(), mc_dropout_mode(model), _words_kept(model, not word_dropout), \
                _independent_rows(model) as rows_are_passes:
            replicas = replicas if rows_are_passes else 1
            while done < samples:
                rows = min(replicas, samples - done)
                _reset(model)
                group = torch.empty(rows, data.shape[1] - 1, dtype=torch.float64, device=data.device)
                start_token = 0
                for x, y in segments(data, bptt):
                    logits = model(x.expand(rows, -1))
                    picked = F.softmax(logits, dim=-1).gather(-1, y.expand(rows, -1).unsqueeze(-1)).squeeze(-1)
                    group[:, start_token:start_token + y.shape[1]] = picked.double()
                    start_token += y.shape[1]
                done += rows
                yield group
    finally:
        _reset(model)


@contextlib.contextmanager
def _words_kept(model: torch.nn.Module, keep: bool) -> Iterator[None]:
    """Within the block, with ``keep``, every word-type dropout of ``model`` is off (in eval mode)."""
    embeddings = [m for m in model.modules() if isinstance(m, EmbeddingDropout)] if keep else []
    saved = [m.training for m in embeddings]
    for m in embeddings:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(embeddings, saved):
            m.training = flag


@contextlib.contextmanager
def _independent_rows(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block, word-type masks are drawn per sequence; yields whether every batch row of ``model``
    then draws its own masks, so that rows are independent stochastic passes.

    A word-type mask shared by the batch would make the rows of one call share it: drawn per row, each row's
    mask has the distribution it had in training. Other masks shared by the batch (DropConnect, a dropout
    ``noise_shape`` of 1 on the batch axis) cannot be split so: the passes must then run one at a time.
    """
    embeddings = [m for m in model.modules() if isinstance(m, EmbeddingDropout) and m.masks_shared_by_batch]
    for m in embeddings:
        m.per_sequence = True
    try:
        yield not any(getattr(m, "masks_shared_by_batch", False) for m in model.modules())
    finally:
        for m in embeddings:
            m.per_sequence = False


# ---------------------------------------------------------------------------------------------- training
def learning_rate(preset: Preset, epoch: int) -> float:
    """The SGD learning rate of ``epoch`` (1-based): constant, then times ``lr_decay`` per epoch after ``decay_after``."""
    return preset.learning_rate * preset.lr_decay ** max(0, epoch - preset.decay_after)


def _streams(preset: Preset):
    data = datasets.load("ptb")
    cut = lambda stream, limit: stream if limit is None else stream[:limit]  # noqa: E731
    return (cut(data.train, preset.train_tokens), cut(data.valid, preset.eval_tokens),
            cut(data.test, preset.eval_tokens), len(data.vocabulary))


def _rng_states(device: str) -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], device: str) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _carried(model: torch.nn.Module) -> list:
    """The states each stateful layer of ``model`` carries into its next window, in module order."""
    return [m.states for m in model.modules() if isinstance(m, RNN) and m.stateful]


def _carry(model: torch.nn.Module, states: list) -> None:
    for module, held in zip([m for m in model.modules() if isinstance(m, RNN) and m.stateful], states, strict=True):
        module.states = held


def _resume(checkpoint: Optional[Path], preset: Preset, seed: int, model: torch.nn.Module, device: str):
    """(finished epoch records, best (perplexity, epoch), seconds already spent, work in progress) from
    ``checkpoint``, with the model's weights and the random streams restored; nothing when there is none. A
    checkpoint of other settings (the epoch count aside, which may grow) is refused.

    Work in progress (None when the checkpoint was written at the end of an epoch) is the epoch under way
    (``"windows"`` done, their summed NLL, the carried states), or, training done, the test evaluation
    (``"test_loss"``, and the MC evaluation's ``"mc"`` progress). Asked for more epochs than a finished
    run had, the run continues from its last epoch with the random streams as they were then.
    """
    if checkpoint is None or not checkpoint.exists():
        return [], None, 0.0, None
    try:
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        saved["preset"], saved["epochs"], saved["model"]  # noqa: B018 - the keys every checkpoint has
    except Exception as error:  # noqa: BLE001 - truncated, overwritten, not a checkpoint at all
        raise DroprnnError(f"{WHERE}: {checkpoint} cannot be read as a checkpoint ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no detail'}); remove it to start the run "
                           "over, or pick another --out.") from None
    partial = saved.get("partial")  # absent in checkpoints written before runs saved within an epoch
    if partial is not None and "windows" in partial:
        held = len(saved["epochs"]) + 1  # the epoch under way must still be wanted: its weights are half-trained
        what = f"{len(saved['epochs'])} finished epochs and epoch {held} under way"
    else:
        held = len(saved["epochs"])
        what = f"{held} finished epochs"
    if held > preset.epochs:
        raise DroprnnError(f"{WHERE}: {checkpoint} holds {what}, more than --epochs {preset.epochs}; give "
                           f"--epochs {held} or more, or another --out.")
    mine = {**dataclasses.asdict(preset), "epochs": None, "seed": seed}
    # a setting added since the checkpoint was written has its default there
    defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
    theirs = {**defaults, **saved["preset"], "epochs": None, "seed": saved["seed"]}
    if mine != theirs:
        differing = ", ".join(f"{k} {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items() if theirs.get(k) != v)
        raise DroprnnError(f"{WHERE}: {checkpoint} holds a run with other settings ({differing}); "
                           "pick another --out or remove it.")
    model.load_state_dict(saved["model"])
    rng = saved["rng"]
    if partial is not None and "test_loss" in partial and len(saved["epochs"]) < preset.epochs:
        rng, partial = partial["training_rng"], None  # more epochs than the evaluated run had
    _set_rng_states(rng, device)
    return saved["epochs"], saved["best"], saved["seconds"], partial


def checkpoint_summary(checkpoint: Path) -> str:
    """Where the run saved in ``checkpoint`` stands, in words (for the line a resumed run prints)."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        epochs, wanted, partial = len(saved["epochs"]), saved["preset"]["epochs"], saved.get("partial")
    except Exception:  # noqa: BLE001 - the run itself says what is wrong with the file
        return "unreadable"
    if partial is None:
        return f"{epochs} of {wanted} epochs done"
    if "windows" in partial:
        return f"{epochs} of {wanted} epochs done, epoch {epochs + 1} at window {partial['windows']}"
    mc = partial.get("mc")
    passes = f", MC evaluation at {mc['done']} of {saved['preset']['mc_samples']} passes" if mc else ""
    return f"training done ({epochs} epochs), test perplexity {partial['test_metric']:.1f}{passes}"


def _save(checkpoint: Path, preset: Preset, seed: int, model: torch.nn.Module, epochs: list, best, seconds: float,
          device: str, partial: Optional[dict[str, Any]] = None) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    staged = checkpoint.with_suffix(".tmp")
    torch.save({"preset": dataclasses.asdict(preset), "seed": seed, "model": model.state_dict(), "epochs": epochs,
                "best": best, "seconds": seconds, "rng": _rng_states(device), "partial": partial}, staged)
    os.replace(staged, checkpoint)  # a run stopped mid-write keeps the previous checkpoint


def build_model(preset: Preset, vocabulary: int = VOCABULARY, device: str = "cpu") -> torch.nn.Module:
    """The preset's model on ``device``, every weight uniform in +-init_scale (Zaremba's initialisation), drawn
    from torch's global generator."""
    model = build(model_code(preset, vocabulary)).to(device)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-preset.init_scale, preset.init_scale)
    return model


def train_window(model: torch.nn.Module, parameters: list, x: Tensor, y: Tensor, preset: Preset,
                 lr: float) -> Tensor:
    """One SGD step on a window (inputs and targets (B, T)): the summed NLL's gradient per sequence, clipped
    by global norm, then weight decay. Returns the window's summed NLL (float64, on the model's device: no
    wait for the device)."""
    logits = model(x)
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    for p in parameters:
        p.grad = None
    (summed / preset.batch_size).backward()
    torch.nn.utils.clip_grad_norm_(parameters, preset.clip)
    with torch.no_grad():  # one launch per update over all parameters (on a GPU), not one per parameter
        torch._foreach_add_(parameters, [p.grad for p in parameters], alpha=-lr)
        if preset.weight_decay:
            torch._foreach_mul_(parameters, 1.0 - preset.weight_decay)
    return summed.detach().double()


def train(preset: Preset, seed: int = 0, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
          threads: Optional[int] = None, device: str = "cpu", checkpoint: Optional[Path] = None,
          save_every: float = SAVE_EVERY) -> dict[str, Any]:
    """Train ``preset`` on ``device``; returns its trial record for results.json (perplexity as the metric).

    With ``checkpoint`` (a file path) the run saves itself after every epoch, and every ``save_every``
    seconds within an epoch and within the MC evaluation; when the file exists it continues from there:
    weights, carried states and random streams restored, so on the CPU a resumed run equals an
    uninterrupted one bit for bit, wherever it was stopped.
    """
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    train_stream, valid_stream, test_stream, vocabulary = _streams(preset)
    torch.manual_seed(seed)
    model = build_model(preset, vocabulary, device)
    parameters = list(model.parameters())
    data = batchify(train_stream, preset.batch_size).to(device)
    epochs, best, spent, partial = _resume(checkpoint, preset, seed, model, device)
    started -= spent
    last_save = time.perf_counter()

    def save(work: Optional[dict[str, Any]] = None, due: bool = True) -> None:
        nonlocal last_save
        if checkpoint is not None and due:
            _save(checkpoint, preset, seed, model, epochs, best, time.perf_counter() - started, device, work)
            last_save = time.perf_counter()

    def save_due() -> bool:  # (False without a checkpoint: what a save would hold is not even gathered)
        return checkpoint is not None and time.perf_counter() - last_save >= save_every

    for epoch in range(len(epochs) + 1, preset.epochs + 1):
        epoch_start = time.perf_counter()
        lr = learning_rate(preset, epoch)
        model.train()
        _reset(model)
        total, count, skip = torch.zeros((), dtype=torch.float64, device=device), 0, 0  # read back once per epoch
        if partial is not None:  # the epoch a checkpoint stopped in
            skip, count = partial["windows"], partial["count"]
            total += partial["total"]
            epoch_start -= partial["seconds"]
            _carry(model, partial["states"])
            partial = None
        for window, (x, y) in enumerate(segments(data, preset.bptt, whole=False)):
            if window < skip:
                continue
            total += train_window(model, parameters, x, y, preset, lr)
            count += y.numel()
            if save_due():
                save({"windows": window + 1, "total": total.item(), "count": count, "states": _carried(model),
                      "seconds": time.perf_counter() - epoch_start})
        total = total.item()
        val_loss, val_ppl = evaluate(model, valid_stream)
        record = {"epoch": epoch, "train_loss": total / count, "train_metric": perplexity(total, count),
                  "val_loss": val_loss, "val_metric": val_ppl, "learning_rate": lr,
                  "seconds": time.perf_counter() - epoch_start}
        epochs.append(record)
        if best is None or val_ppl < best[0]:
            best = (val_ppl, epoch)
        save()
        if on_epoch is not None:
            on_epoch(record)
    # Zaremba and Gal report the model after the last epoch; the best validation epoch is recorded beside it.
    if partial is None:
        partial = {"training_rng": _rng_states(device)}
        partial["test_loss"], partial["test_metric"] = evaluate(model, test_stream)
        save(partial, due=bool(preset.mc_samples))  # the MC evaluation takes as long as epochs
    trial = {"variant": preset.name, "seed": seed, "status": "ok", "error": None, "epochs": epochs,
             "best_epoch": best[1], "test_loss": partial["test_loss"], "test_metric": partial["test_metric"],
             "published": preset.published, "published_mc": preset.published_mc}
    if preset.mc_samples:
        trial["mc_samples"] = preset.mc_samples
        trial["mc_word_dropout"] = preset.mc_word_dropout
        trial["test_metric_mc"] = mc_perplexity(
            model, test_stream, preset.mc_samples, word_dropout=preset.mc_word_dropout, progress=partial.get("mc"),
            on_progress=lambda mc: save({**partial, "mc": mc}, due=save_due() or mc["done"] == preset.mc_samples))
    trial["wall_seconds"] = time.perf_counter() - started
    return trial


def run(preset_name: str, out: Optional[str] = None, seed: int = 0, epochs: Optional[int] = None,
        progress: Optional[Callable[[dict[str, Any]], None]] = None,
        device: str = "cpu") -> tuple[dict[str, Any], dict[str, Path]]:
    """``droprnn lab ptb``: train one preset, write results.json and the report into ``out``. The run saves
    a checkpoint after every epoch and every few minutes within one; running again with the same ``out``
    continues where it stopped."""
    if preset_name not in PRESETS:
        raise DroprnnError(f"{WHERE}: argument `--preset` expected one of {', '.join(PRESETS)}, got {preset_name!r}.")
    preset = PRESETS[preset_name]
    if epochs is not None:
        preset = dataclasses.replace(preset, epochs=check_positive_int(WHERE, "--epochs", epochs))
    device = check_device(WHERE, "--device", device)
    run_dir = Path(check_out_dir(WHERE, out or f"runs/ptb-{preset.name}"))
    trial = train(preset, seed, progress, device=device, checkpoint=run_dir / "checkpoint.pt")

    published = ", ".join(f"{label} {value}" for label, value in (
        ("published test perplexity", preset.published), ("with MC dropout", preset.published_mc)) if value)
    results = _results(device, {"seeds": [seed], "variants": [preset.name], **dataclasses.asdict(preset)},
                       {preset.name: {"title": preset.name, "description": f"{preset.description}; {published}."
                                      if published else preset.description, "code": model_code(preset)}}, [trial])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    files = report.write_report(results, run_dir, {preset.name: draw_masks(preset, run_dir / "masks")})
    return results, files


def run_placements(variants: Any, rate: float, base: str = "zaremba-small", out: Optional[str] = None,
                   seeds: Any = (0,), epochs: Optional[int] = None,
                   progress: Optional[Callable[[str, dict[str, Any]], None]] = None,
                   device: str = "cpu") -> tuple[dict[str, Any], dict[str, Path]]:
    """``droprnn lab ptb --variants``: "which dropout, where?" on a language model. Each placement of
    :data:`PLACEMENTS` trains ``base``'s model and schedule with that one placement at ``rate`` (its own
    dropout off), for every seed; results.json and one report hold them side by side.

    Resumable at two levels: a finished trial's record (``trials/<variant>-seed<k>.json``) is read back, an
    unfinished one continues from its checkpoint. A trial that raises is recorded as failed; the others go
    on, and a rerun tries it again. ``progress(variant, epoch record)`` is told every epoch.
    """
    from .runner import failed

    where = WHERE
    names = check_variants(where, variants, PLACEMENTS)
    if base not in PRESETS:
        raise DroprnnError(f"{where}: argument `--preset` expected one of {', '.join(PRESETS)}, got {base!r}.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise DroprnnError(f"{where}: argument `--rate` expected a drop probability in (0, 1), got {rate!r}.")
    if isinstance(seeds, int) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise DroprnnError(f"{where}: argument `--seeds` expected one or more ints >= 0, got {seeds!r}.")
    seeds = tuple(seeds)
    template = PRESETS[base]
    if epochs is not None:
        template = dataclasses.replace(template, epochs=check_positive_int(where, "--epochs", epochs))
    device = check_device(where, "--device", device)
    run_dir = Path(check_out_dir(where, out or f"runs/ptb-{base}-placements"))
    presets = {name: placement_preset(template, name, float(rate)) for name in names}
    trials = []
    for seed in seeds:
        for name in names:
            record = run_dir / "trials" / f"{name}-seed{seed}.json"
            finished = json.loads(record.read_text()) if record.exists() else None
            if finished is not None and finished.get("status") == "ok":
                trials.append(finished)
                continue
            report_epoch = None if progress is None else (lambda r, n=name: progress(n, r))
            try:
                trial = train(presets[name], seed, report_epoch, device=device,
                              checkpoint=run_dir / "trials" / f"{name}-seed{seed}" / "checkpoint.pt")
                trial["variant"] = name
            except Exception:  # noqa: BLE001 - recorded; the other placements go on
                trial = failed(name, seed, traceback.format_exc())
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(trial, indent=1))
            trials.append(trial)
    pictures = {name: draw_masks(preset, run_dir / "masks", file=name) for name, preset in presets.items()}
    settings = {k: v for k, v in dataclasses.asdict(template).items() if k not in ("name", "description")}
    results = _results(device, {"seeds": list(seeds), "variants": list(names), "rate": rate, "base": base, **settings},
                       {name: {"title": PLACEMENTS[name].title, "description": PLACEMENTS[name].description,
                               "code": model_code(preset)} for name, preset in presets.items()}, trials)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results, report.write_report(results, run_dir, pictures)


def _results(device: str, config: dict[str, Any], variants: dict[str, Any], trials: list) -> dict[str, Any]:
    """A run's results.json, in the lab's format (its report reads it)."""
    return {
        "format": report.RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "machine": (torch.cuda.get_device_name(device) if str(device).startswith("cuda")
                    else f"CPU, {torch.get_num_threads()} threads"),
        "config": {"dataset": "ptb", "task": "language modelling", "metric": "perplexity", "layer": "lstm",
                   "test_weights": "last", **config},
        "variants": variants,
        "trials": trials,
    }


def draw_masks(preset: Preset, folder: Path, steps: int = 35, file: Optional[str] = None) -> Path:
    """The preset's mask picture for the first ``steps`` test tokens (seeded: the same picture every run),
    as ``folder/<file or the preset's name>.png``."""
    ids = torch.as_tensor(np.asarray(datasets.load("ptb").test[:steps]), dtype=torch.int64)[None]
    torch.manual_seed(0)
    panels = masks.mask_panels(build(model_code(preset)), ids, torch.tensor([steps]))
    return masks.draw(panels, folder / f"{file or preset.name}.png", f"{preset.name}: what is dropped in {steps} test tokens")
