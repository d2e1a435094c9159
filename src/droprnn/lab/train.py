"""One trial: train one variant's model with one seed, keep the best validation epoch, test it.

Adam on cross-entropy with gradient-norm clipping; each epoch records the training loss and accuracy (as
the batches ran, dropout on, like Keras's logs) and the validation loss and accuracy (dropout off). The
weights of the best validation epoch are tested. With the same seed and thread count a trial is
repeatable bit for bit.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .config import LabConfig
from .task import Split, Task, prepare
from .variants import VARIANTS, build, model_code

EVAL_BATCH = 512


@functools.lru_cache(maxsize=4)
def task_for(dataset: str, validation_fraction: float) -> Task:
    return prepare(dataset, validation_fraction)


def code_for(config: LabConfig, task: Task, variant: str) -> str:
    """The exact source of the variant's model for this configuration and data set."""
    if task.kind == "text":
        inputs = (f"droprnn.Embedding({task.input_size}, {config.embedding_size})",)
        rnn_input = f"input_size={config.embedding_size}"
    else:
        inputs, rnn_input = (), f"input_size={task.input_size}"
    return model_code(VARIANTS[variant], layer=config.layer, units=config.units, rate=config.rate, inputs=inputs,
                      classes=len(task.classes), rnn_input=rnn_input)


def evaluate(model: torch.nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy with dropout off."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for batch in split.batches(EVAL_BATCH):
            logits = model(batch.inputs, lengths=batch.lengths)
            loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == batch.labels).sum())
    return loss / len(split), correct / len(split)


def run_trial(config: LabConfig, variant: str, code: str, seed: int,
              on_epoch: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Train ``code``'s model; returns the trial record of results.json (status "ok")."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    task = task_for(config.dataset, config.validation_fraction)
    torch.manual_seed(seed)
    model = build(code)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    order = torch.Generator().manual_seed(seed)
    epochs: list[dict[str, Any]] = []
    best_key, best_state = None, None
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        loss_sum, correct = 0.0, 0
        for batch in task.train.batches(config.batch_size, order):
            logits = model(batch.inputs, lengths=batch.lengths)
            loss = F.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(-1) == batch.labels).sum())
        val_loss, val_metric = evaluate(model, task.valid)
        record = {"epoch": epoch, "train_loss": loss_sum / len(task.train), "train_metric": correct / len(task.train),
                  "val_loss": val_loss, "val_metric": val_metric, "seconds": time.perf_counter() - epoch_start}
        epochs.append(record)
        key = (val_metric, -val_loss)
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch({"variant": variant, "seed": seed, "epochs": config.epochs, **record})
    model.load_state_dict(best_state)
    test_loss, test_metric = evaluate(model, task.test)
    return {"variant": variant, "seed": seed, "status": "ok", "error": None, "epochs": epochs,
            "best_epoch": best_epoch, "test_loss": test_loss, "test_metric": test_metric,
            "wall_seconds": time.perf_counter() - started}
