"""MC dropout prediction (Gal & Ghahramani 2016): average many stochastic forward passes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import DroprnnError, check_positive_int


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

    Each module's flag is set on its own (not recursively), and all flags are restored on exit.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        for module, _ in saved:
            module.training = _is_noise_only(module)
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


def mc_predict(
    model: nn.Module, x: Any, samples: int = 30, *, return_samples: bool = False, **call_kwargs: Any
) -> tuple[torch.Tensor, ...]:
    """Mean and standard deviation of ``samples`` stochastic passes, every dropout on, all else in eval.

    Each pass draws new masks (recurrent masks once per pass and sequence, as in training). Runs without
    gradients. Stateful layers start every pass from the states they hold, and hold them again afterwards. ``call_kwargs`` go to every call (e.g. ``lengths=``). Returns ``(mean, std)``, plus the
    stacked samples (samples, *output shape) with ``return_samples``. The std is the spread of the passes
    (population form), the MC estimate of the model's predictive uncertainty without observation noise.
    """
    samples = check_positive_int("mc_predict", "samples", samples)
    if samples < 2:
        raise DroprnnError("mc_predict: argument `samples` expected at least 2 passes for a spread, got 1.")
    # Stateful layers: every pass starts from the states they hold now, and keeps them so afterwards.
    held = [(layer, layer.states) for layer in model.modules() if getattr(layer, "stateful", False)]
    outputs = []
    try:
        with torch.no_grad(), mc_dropout_mode(model):
            for _ in range(samples):
                for layer, states in held:
                    layer.states = states
                outputs.append(model(x, **call_kwargs))
    finally:
        for layer, states in held:
            layer.states = states
    if not all(torch.is_tensor(o) for o in outputs):
        raise DroprnnError(
            f"mc_predict: the model must return one tensor per call, got {type(outputs[0]).__name__}; "
            "wrap it to select the output to average."
        )
    stacked = torch.stack(outputs)
    mean, std = stacked.mean(dim=0), stacked.std(dim=0, correction=0)
    return (mean, std, stacked) if return_samples else (mean, std)
