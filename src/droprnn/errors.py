"""The one error type droprnn raises for bad user input, and the checks that raise it.

Every message names the layer, the argument, what was expected and what was received, so the fix is in
the message. Checks never use ``assert``: asserts vanish under ``python -O``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional


class DroprnnError(ValueError):
    """Bad input to a droprnn layer or function. A ``ValueError``, so ``except ValueError`` catches it."""


def fail(where: str, argument: str, expected: str, got: str) -> DroprnnError:
    """Build (not raise) the standard error. ``got`` is text: pass ``repr(value)`` for a received value,
    or a description such as ``"shape (2, 3)"``: ``raise fail("LSTM 'lstm'", "units", "an int > 0", repr(-1))``."""
    return DroprnnError(f"{where}: argument `{argument}` expected {expected}, got {got}.")


def check_rate(
    where: str, argument: str, value: Any, *, allow_one: bool,
    one_means: str = "a rate of 1 drops everything; Keras's backends disagree on it",
) -> float:
    """A dropout rate as a float in [0, 1) (or [0, 1] when ``allow_one``); anything else raises.

    Keras silently clips recurrent-cell rates into [0, 1]; droprnn refuses instead, because a clipped
    rate is a typo that trains a different model without a word.
    """
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(where, argument, f"a float in {interval}", repr(value))
    value = float(value)
    if not (0.0 <= value < 1.0 or (allow_one and value == 1.0)):
        hint = "" if allow_one or value != 1.0 else f" ({one_means})"
        raise DroprnnError(
            f"{where}: argument `{argument}` expected a float in {interval}, got {value!r}{hint}."
        )
    return value


def checked(argument: str, check: Callable[[Any, Any], Any], doc: str = "") -> property:
    """An attribute checked whenever it is set, in ``__init__`` or later (a schedule that anneals a rate, a
    study that switches a site off): ``check(obj, value)`` returns the value to keep or raises, so a bad
    value is named where it is set instead of reaching a kernel. The value lives in ``_<argument>``."""
    slot = "_" + argument

    def get(obj: Any) -> Any:
        try:
            return getattr(obj, slot)
        except AttributeError:  # an object pickled whole before the attribute was checked kept it unprefixed
            return obj.__dict__[argument]

    def set_(obj: Any, value: Any) -> None:
        object.__setattr__(obj, slot, check(obj, value))

    return property(get, set_, doc=doc or f"``{argument}``, checked whenever it is set.")


def checked_rate(argument: str, *, allow_one: Optional[bool] = False, one_means: Optional[str] = None) -> property:
    """A rate attribute (see :func:`checked`); ``allow_one`` None reads the object's ``rate_may_be_one``."""
    def check(obj: Any, value: Any) -> float:
        one = getattr(obj, "rate_may_be_one", False) if allow_one is None else allow_one
        extra = {} if one_means is None else {"one_means": one_means}
        return check_rate(obj.where, argument, value, allow_one=one, **extra)

    return checked(argument, check, f"``{argument}``, a rate checked whenever it is set.")


def check_positive_int(where: str, argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise fail(where, argument, "an int > 0", repr(value))
    return int(value)


def check_seed(where: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise fail(where, "seed", "an int or None", repr(value))
    return None if value is None else int(value)


def type_name(value: Any) -> str:
    """A value's type with its module, so `torch.nn.LSTMCell` is not mistaken for droprnn's LSTMCell."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def check_out_dir(where: str, out: Any) -> str:
    """A run directory: a folder, or a path whose nearest existing part is a folder (not a file)."""
    from pathlib import Path

    path = Path(str(out))
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise fail(where, "--out", "a folder for the run", f"{out!r}, where {str(part)!r} is a file")
            break
    return str(out)


def check_device(where: str, argument: str, device: Any) -> str:
    """A device name torch knows and that exists here (cpu, or cuda when CUDA is available)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise fail(where, argument, "cpu or cuda (e.g. cuda:0)", repr(device)) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise fail(where, argument, "cpu, or cuda on a machine with CUDA (none here)", repr(device))
    if parsed.type not in ("cpu", "cuda"):
        raise fail(where, argument, "cpu or cuda", repr(device))
    return str(device)


def no_torchscript(where: str, tool: str) -> DroprnnError:
    """The error for TorchScript (deprecated upstream), pointing to the tools that do work."""
    return DroprnnError(
        f"{where}: {tool} is not supported: TorchScript is deprecated in PyTorch, and droprnn's recurrent layers "
        "run registered operators it cannot see. Use torch.export.export(model.eval(), (x,), dynamic_shapes=...) "
        "for a portable program, torch.onnx.export(..., dynamo=True) for ONNX, or torch.compile(model) for speed."
    )
