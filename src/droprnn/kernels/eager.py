"""The registered operators, called from eager code without the dispatcher's Python round trip.

A ``torch.library.custom_op`` is what ``torch.compile``, ``torch.export`` and ONNX see, and it must stay
the single definition of what a kernel computes. But in eager code each call of one goes from Python to
the dispatcher and back to Python (its autograd wrapper, a redispatch, a ``torch._dynamo`` guard, and,
with a ``setup_context``, ``fill_defaults`` rebuilding the schema's argument list once per argument):
measured with torch 2.13 on a 2-core Xeon, 100-300 microseconds more per training call (forward and
backward) than the straight call, where a small layer's whole call takes 0.3-0.7 ms. So :class:`Operator`
runs the operator's own Python function straight when nothing is watching -- inside an
``autograd.Function`` made of the operator's ``setup_context`` and backward when a gradient may be asked
for -- and the registered operator whenever a compiler, exporter, tensor mode, ``torch.func`` transform or
tensor subclass is in play. Both ways run the same functions on the same arguments;
``tests/test_operators.py`` holds them equal.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def absent(like: torch.Tensor) -> torch.Tensor:
    """What an operator returns where a result does not apply: operators cannot return None, and
    zero-element tensors would count as aliases of each other, so a 0-d zero of its own."""
    return like.new_zeros(())


def watched(args: tuple) -> bool:
    """Whether the registered operator must be called (it must appear in a traced program, or something
    besides autograd intercepts tensor operations)."""
    if (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or _get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


class Operator:
    """``op`` (a registered custom operator) called through its Python ``impl`` in eager code.

    ``setup_context`` and ``backward`` are what ``op.register_autograd`` was given, if anything."""

    def __init__(self, op: Any, impl: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        self.op, self.impl = op, impl
        self.function = None
        if backward is not None:
            # forward takes ctx itself: with a separate setup_context, Function.apply binds the arguments to
            # forward's signature through inspect on every call (torch.func transforms, which need that form,
            # get the registered operator anyway).
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            self.function = type(f"{impl.__name__}_function", (torch.autograd.Function,), {
                "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if watched(args):
            return self.op(*args)
        if (self.function is not None and torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self.function.apply(*args)
        return self.impl(*args)


def register(name: str, impl: Callable, fake: Callable, device_types: Optional[str] = None,
             setup_context: Optional[Callable] = None, backward: Optional[Callable] = None) -> Operator:
    """Register ``impl`` as the custom operator ``name`` (its schema from ``impl``'s annotations; no
    argument is mutated) with its fake implementation and, if given, its autograd; returns it as an
    :class:`Operator`."""
    op = torch.library.custom_op(name, impl, mutates_args=(), device_types=device_types)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return Operator(op, impl, setup_context, backward)
