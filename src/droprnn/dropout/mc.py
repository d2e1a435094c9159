"""MC dropout prediction (Gal & Ghahramani 2016): average many stochastic forward passes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import DroprnnError, check_positive_int, fail, type_name


def _is_noise_only(module: nn.Module) -> bool:
    """True for modules whose training flag switches only random noise on and off.

    droprnn's layers and ``droprnn.nn`` modules declare it (``training_switches_only_noise``); so do
    torch's dropout modules and torch's RNNs (whose flag only drives the dropout between layers).
    BatchNorm and the like do not: they keep inference behaviour.
    """
    return getattr(module, "training_switches_only_noise", False) or isinstance(
        module, (nn.modules.dropout._DropoutNd, nn.RNNBase)
    )


@contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block: ``model`` in inference mode except every dropout, which stays active.

    Each module's flag is set on its own (not recursively), and all flags are restored on exit. A Keras model
    (Keras 3 on its torch backend) raises: its layers follow each call's ``training`` argument, not these
    flags, so every pass would be the same.
    """
    _refuse_keras(model, "mc_dropout_mode")
    saved = [(m, m.training) for m in model.modules()]
    try:
        for module, _ in saved:
            module.training = _is_noise_only(module)
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


def _refuse_keras(model: nn.Module, where: str) -> None:
    """Keras layers are torch modules on Keras's torch backend, but their dropout reads the call's
    ``training`` argument: switched by torch's flags, MC passes would silently all be the inference pass."""
    for module in model.modules():
        if any(c.__module__.split(".")[0] == "keras" for c in type(module).__mro__):
            raise DroprnnError(
                f"{where}: `model` holds a Keras layer ({type(module).__name__}), whose dropout follows each "
                "call's `training` argument rather than torch's training flags, so every pass would be the "
                "same inference pass. Call the Keras model with training=True for each pass, e.g. "
                "torch.stack([model(x, training=True) for _ in range(30)]) (training=True also puts "
                "BatchNormalization in training mode).")


def mc_predict(
    model: nn.Module, x: Any, samples: int = 30, *, return_samples: bool = False, passes_per_call: int = 1,
    batch_axis: Optional[int] = None, **call_kwargs: Any
) -> tuple[torch.Tensor, ...]:
    """Mean and standard deviation of ``samples`` stochastic passes, every dropout on, all else in eval.

    Each pass draws new masks (recurrent masks once per pass and sequence, as in training). Runs without
    gradients. Stateful layers start every pass from the states they hold, and hold them again afterwards.
    ``call_kwargs`` go to every call (e.g. ``lengths=``). Returns ``(mean, std)``, plus the stacked samples
    (samples, *output shape) with ``return_samples``. The std is the spread of the passes (population form),
    the MC estimate of the model's predictive uncertainty without observation noise.

    ``passes_per_call`` > 1 runs that many passes in one call, as copies of the batch stacked along
    ``batch_axis`` of x and of the output: 0 (the default) for droprnn's layers and batch-first modules; a
    model holding a module with ``batch_first=False`` (``droprnn.nn`` / ``torch.nn`` recurrent modules by
    default) must say it (1 for time-first input), since copies along the time axis would silently be one
    long sequence. ``lengths=`` and ``mask=`` are
    repeated with the rows. Each row draws its own masks, so the passes are as independent as one at a time
    (other draws, though: a seed gives other samples), and a small batch runs several times faster: 100
    passes over one (1, 100, 64) sequence through ``LSTM(128)`` and ``Dense(1)`` took 68-99 ms one at a
    time and 21-24 ms 20 per call; through ``LSTM(32)`` at (1, 50, 8), 63-65 ms and 5-6 ms (AMD EPYC, 2
    cores, warmed up, 2026-12-04). The model must treat its batch rows independently:
    stateful layers and layers whose masks the whole batch shares (DropConnect, a ``noise_shape`` of 1 on the
    batch axis, word-type masks shared by the batch) refuse it.
    """
    where = "mc_predict"
    samples = check_positive_int(where, "samples", samples)
    if samples < 2:
        raise DroprnnError("mc_predict: argument `samples` expected at least 2 passes for a spread, got 1.")
    per_call = min(check_positive_int(where, "passes_per_call", passes_per_call), samples)
    _refuse_keras(model, where)
    if per_call > 1:
        batch_axis = _batch_axis(model, x, batch_axis)
        _check_rows_are_passes(model, call_kwargs)
    # Stateful layers: every pass starts from the states they hold now, and keeps them so afterwards.
    held = [(layer, layer.states) for layer in model.modules() if getattr(layer, "stateful", False)]
    outputs = []
    try:
        with torch.no_grad(), mc_dropout_mode(model):
            while len(outputs) < samples:
                for layer, states in held:
                    layer.states = states
                if per_call == 1:
                    outputs.append(_one_tensor(model(x, **call_kwargs)))
                    continue
                passes = min(per_call, samples - len(outputs))
                copies, kwargs = _repeated(x, call_kwargs, passes, batch_axis)
                outputs.extend(_split_passes(model(copies, **kwargs), passes, x.shape[batch_axis], batch_axis))
    finally:
        for layer, states in held:
            layer.states = states
    stacked = torch.stack(outputs)
    mean, std = stacked.mean(dim=0), stacked.std(dim=0, correction=0)
    return (mean, std, stacked) if return_samples else (mean, std)


# The call arguments that hold one entry per batch row (droprnn's layers take them batch-first): repeated
# with the rows when passes run as copies of the batch.
_PER_ROW = ("lengths", "mask")


def _batch_axis(model: nn.Module, x: Any, batch_axis: Optional[int]) -> int:
    """The axis of x and of the output along which passes are stacked (see mc_predict)."""
    where = "mc_predict"
    if not torch.is_tensor(x):
        raise fail(where, "x", "a tensor with passes_per_call > 1 (the passes are copies of its batch)", type_name(x))
    if batch_axis is None:
        time_first = [m for m in model.modules() if getattr(m, "batch_first", None) is False]
        if time_first:
            name = getattr(time_first[0], "where", type(time_first[0]).__name__)
            raise fail(where, "batch_axis", f"the batch axis of x and of the output with passes_per_call > 1, since "
                       f"{name} takes time-first input (batch_first=False): 1 for (T, B, ...), 0 if the model "
                       "makes it batch-first", "None")
        return 0
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int) or not -x.dim() <= batch_axis < x.dim():
        raise fail(where, "batch_axis", f"an axis of x, which has {x.dim()}", repr(batch_axis))
    return batch_axis


def _check_rows_are_passes(model: nn.Module, call_kwargs: dict) -> None:
    """Refuse, naming the reason, what would make copies of the batch other than independent passes."""
    for name, value in call_kwargs.items():
        if name not in _PER_ROW and (torch.is_tensor(value) or isinstance(value, (list, tuple))):
            raise fail("mc_predict", name, f"no per-row values with passes_per_call > 1: only "
                       f"{' and '.join(_PER_ROW)} are repeated with the rows; pass passes_per_call=1",
                       type_name(value))
    for module in model.modules():
        name = getattr(module, "where", type(module).__name__)
        if getattr(module, "stateful", False):
            raise DroprnnError(f"mc_predict: passes_per_call > 1 needs independent batch rows, and {name} is "
                               "stateful (its states are per row); pass passes_per_call=1.")
        if getattr(module, "masks_shared_by_batch", False):
            raise DroprnnError(f"mc_predict: passes_per_call > 1 needs independent batch rows, and {name} draws "
                               "one mask for the whole batch; pass passes_per_call=1.")


def _repeated(x: torch.Tensor, call_kwargs: dict, passes: int, batch_axis: int) -> tuple[torch.Tensor, dict]:
    """The call's arguments for ``passes`` copies of the batch: x along ``batch_axis``, the per-row
    arguments along their first axis."""
    kwargs = dict(call_kwargs)
    for name in _PER_ROW:
        value = kwargs.get(name)
        if torch.is_tensor(value):
            kwargs[name] = torch.cat([value] * passes)
        elif isinstance(value, (list, tuple)):
            kwargs[name] = list(value) * passes
    return torch.cat([x] * passes, dim=batch_axis), kwargs


def _one_tensor(out: Any) -> torch.Tensor:
    if not torch.is_tensor(out):
        raise DroprnnError(f"mc_predict: the model must return one tensor per call, got {type(out).__name__}; "
                           "wrap it to select the output to average.")
    return out


def _split_passes(out: Any, passes: int, batch: int, batch_axis: int) -> list[torch.Tensor]:
    """One call's output cut back into its passes."""
    out = _one_tensor(out)
    if not -out.dim() <= batch_axis < out.dim() or out.shape[batch_axis] != passes * batch:
        raise DroprnnError(
            f"mc_predict: with passes_per_call > 1 the output's axis {batch_axis} must hold the passes' "
            f"{passes} × {batch} rows, got shape {tuple(out.shape)}; set batch_axis to the batch axis of the "
            "input and the output.")
    return list(out.chunk(passes, dim=batch_axis))
