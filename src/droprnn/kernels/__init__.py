"""Kernels that run cells over time. ``reference`` is the plain-PyTorch oracle every fast path equals.

What the fast kernels (``fused`` on the CPU, ``gpu``) share: the cells they know and the activation codes
they switch on (kernels/cpu/common.h and the Triton constexprs use the same numbers).
"""

from .. import activations
from ..cells import GRUCell, LSTMCell, SimpleRNNCell

ACTIVATION_CODES = {
    activations.get("tanh"): 0,
    activations.get("sigmoid"): 1,
    activations.get("hard_sigmoid"): 2,
    activations.get("relu"): 3,
    activations.get("linear"): 4,
}
SUPPORTED_CELLS = (LSTMCell, GRUCell, SimpleRNNCell)  # exact types: a subclass may change the step math
