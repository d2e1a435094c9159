"""Kernels that run cells over time. ``reference`` is the plain-PyTorch oracle every fast path equals.

What the fast kernels (``fused`` on the CPU, ``gpu``) share: the cells they know, the activation codes they
switch on (kernels/cpu/common.h and the Triton constexprs use the same numbers), and how a registered
operator, which sees names and codes rather than cell objects, gets the cell's step math back.
"""

from __future__ import annotations

from typing import Optional

from .. import activations
from ..cells import Cell, GRUCell, LSTMCell, SimpleRNNCell

ACTIVATION_NAMES = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")  # code k is ACTIVATION_NAMES[k]
ACTIVATION_CODES = {activations.get(name): code for code, name in enumerate(ACTIVATION_NAMES)}
SUPPORTED_CELLS = (LSTMCell, GRUCell, SimpleRNNCell)  # exact types: a subclass may change the step math
CELL_KINDS = {LSTMCell: "lstm", GRUCell: "gru", SimpleRNNCell: "simple_rnn"}  # as the operators name them


def constant_when_compiled(fn):
    """``torch.compiler.assume_constant_result``: compiled programs take ``fn()`` as a constant, decided
    when they are traced (``fn`` runs then, outside the program). Applied as the mark it sets, because that
    function imports the compiler, most of a second that ``import droprnn`` should not cost."""
    fn._dynamo_marked_constant = True
    return fn


def unknown_cell(cells) -> Optional[str]:
    """What in ``cells`` the fast kernels do not know (None when each is exactly an LSTMCell, GRUCell or
    SimpleRNNCell, a subclass may change the step math, with activations among ``ACTIVATION_NAMES``)."""
    for k, cell in enumerate(cells):
        if type(cell) not in SUPPORTED_CELLS:
            return f"cell {k} is a {type(cell).__name__}, not exactly an LSTMCell, GRUCell or SimpleRNNCell"
        names = ("activation",) if type(cell) is SimpleRNNCell else ("activation", "recurrent_activation")
        for name in names:
            fn = getattr(cell, name)
            if fn not in ACTIVATION_CODES:
                return (f"cell {k}'s {name} {getattr(fn, '__name__', fn)!r} is none of "
                        f"{', '.join(ACTIVATION_NAMES)}")
    return None


def activation_codes(cell: Cell) -> tuple[int, int]:
    """(activation, recurrent activation) codes of a supported cell; SimpleRNN repeats its one activation."""
    act = ACTIVATION_CODES[cell.activation]
    return act, ACTIVATION_CODES.get(getattr(cell, "recurrent_activation", None), act)


def math_cell(kind: str, units: int, act: int, rec_act: int, reset_after: bool) -> Cell:
    """An unbuilt cell of ``kind`` with these activations: its ``step`` is the math an operator runs
    (weights are arguments of ``step``, so no parameters are needed)."""
    activation, recurrent = ACTIVATION_NAMES[act], ACTIVATION_NAMES[rec_act]
    if kind == "lstm":
        return LSTMCell(units, activation=activation, recurrent_activation=recurrent)
    if kind == "gru":
        return GRUCell(units, activation=activation, recurrent_activation=recurrent, reset_after=reset_after)
    return SimpleRNNCell(units, activation=activation)
