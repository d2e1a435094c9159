"""The GPU fast path: Triton kernels for LSTM, GRU and SimpleRNN layers (``kernels/gpu/``), for CUDA tensors.

Same contract as :func:`droprnn.kernels.reference.run` (the oracle these kernels are tested against).
This module only decides *whether* the kernels can run a call; it never imports Triton at import time,
so ``import droprnn`` works without Triton or CUDA. The kernels are imported on first use.

The modules: ``lstm.py``, ``gru.py`` and ``simple.py`` (one per cell: its Triton step kernels, time loops,
forward and backward; lstm.py's docstring explains the design and the measured speed), ``operator.py`` (the
registered operators ``droprnn::gpu_layer`` and its backward, which call them), ``loops.py`` (what the
cells' time loops share: keys, buffers, the cache of captured loops), ``triton_helpers.py`` (the Triton functions the kernels share), ``graphs.py`` (CUDA graphs), ``counter.py``
(counter-based masks made into tensors in one pass); the large cuBLAS products are ``kernels/products.py``, shared with the fused CPU backward.

Supported:
    cells           one or more stacked :class:`~droprnn.LSTMCell` (``proj_size`` too),
                    :class:`~droprnn.GRUCell` (both ``reset_after`` forms) and :class:`~droprnn.SimpleRNNCell`,
                    mixed freely (exact types)
    activations     tanh, sigmoid, hard_sigmoid, relu, linear (``activation``, and the LSTM's and GRU's
                    ``recurrent_activation``)
    dtypes          float32, float64, float16, bfloat16 (the kernels compute and carry the states in
                    float32 for the half-precision types; products in the input dtype). float32 products run
                    at the precision torch lets its own RNNs use: TF32 by default, as cuDNN, full float32
                    with ``torch.backends.cudnn.allow_tf32 = False`` (``precision.float32_precision``)
    input masks     per sequence, shared (m == 1) or per gate (m == 4 LSTM, 3 GRU); per step (T, m, B, D)
    recurrent masks per sequence or per step (T, m, B, U), shared (m == 1) or per gate (m == 4 LSTM, 3 GRU)
    update masks    per sequence (B, U) or per step (T, B, U), on the cell update (Semeniuta et al.)
    zoneout         on h (and the LSTM's c): drawn indicators (T, B, U) in training, the rate in inference
    DropConnect     yes (folded into the recurrent kernel before the kernels run)
    step masks, initial states, go_backwards, return_sequences, zero_output_for_mask: yes
So every dropout plan these cells draw runs here. Not here (the layer falls back to the reference loop and
says why): other activations, subclasses of the cells.

On CUDA the plan holds per-step recurrent and update masks and zoneout indicators as
:class:`~droprnn.random.CounterMask` objects (one seed per cell and call): the step kernels make each entry
from (seed, stream, index) where they use it, forward and backward, so no (T, B, U) mask is stored; the
weight gradient's large product makes one gate's (T, B, U) slice at a time, in one Triton pass (``counter.py``).
Plans of (T, ...) tensors (drawn on the CPU, or made by hand) run as well, read from memory.

On CUDA the time loops are captured in CUDA graphs and replayed (``graphs.py``; ``DROPRNN_CUDA_GRAPHS=0``
runs them eagerly, :func:`clear_graph_cache` frees them).

Tensors must be on a CUDA device -- except under ``TRITON_INTERPRET=1``, where Triton's interpreter runs
the kernels on the CPU and CPU tensors are accepted (that is how the kernels are tested without a GPU).
The variable must be set before the kernels module is imported (Triton reads it when it compiles a
``@triton.jit`` function); :func:`unsupported_reason` says so when it was set too late.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from .. import constant_when_compiled, unknown_cell
from ..call import RecurrentCall, Result, stacked
from . import graphs, operator

Tensor = torch.Tensor

NAME = "gpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HELPERS_MODULE = __name__ + ".triton_helpers"  # imported with the kernels; says how Triton compiled them
_LOOPS_MODULE = __name__ + ".loops"
_triton_reason: dict[str, Optional[str]] = {}


@constant_when_compiled
def unavailable_reason() -> Optional[str]:
    """Why the Triton kernels cannot exist in this process (None when Triton imports). Never raises.
    Compiled programs take the answer as a constant."""
    if "reason" not in _triton_reason:
        try:
            import triton  # noqa: F401
        except Exception as error:  # a missing or broken install: record it, fall back, never raise
            _triton_reason["reason"] = (
                f"Triton is not importable ({type(error).__name__}: {error}); install it with `pip install triton`"
            )
        else:
            _triton_reason["reason"] = None
    return _triton_reason["reason"]


def interpreting() -> bool:
    """Whether the kernels run (or, once imported, will run) in Triton's CPU interpreter."""
    module = sys.modules.get(_HELPERS_MODULE)
    if module is not None:
        return module.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_reason(x: Tensor) -> Optional[str]:
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and interpreting():
        return None
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU; set it before "
                "droprnn's GPU kernels are first used to run them on CPU tensors")
    return (f"the Triton kernels take CUDA tensors; this input is on {x.device} "
            "(TRITON_INTERPRET=1 runs them on CPU tensors in Triton's interpreter, for tests)")


def unsupported_reason(call: RecurrentCall) -> Optional[str]:
    """Why the Triton kernels cannot run this call (None when they can). Decided from the call alone: the
    kernels take every dropout plan these cells draw."""
    x = call.x
    reason = _device_reason(x)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"the Triton kernels run float32, float64, float16 and bfloat16; this input is {x.dtype}"
    unknown = unknown_cell(call.cells)
    if unknown is not None:
        return f"the Triton kernels cannot run it: {unknown}"
    return unavailable_reason()


def describe() -> str:
    """One line naming the kernels for :class:`~droprnn.kernels.dispatch.KernelChoice`."""
    try:
        import triton

        version = f"triton {triton.__version__}"
    except Exception:  # describe() must not fail where unavailable_reason() already explained
        version = "triton unavailable"
    if interpreting():
        where = "interpreted on the CPU (TRITON_INTERPRET=1), eager time loops"
    else:
        where = f"CUDA, {graphs.describe()}"
    return f"Triton GPU kernel: LSTM, GRU and SimpleRNN cells, cuBLAS recurrent products, {version}, {where}"


def clear_graph_cache() -> None:
    """Free the CUDA graphs captured for the time loops and their buffers (rebuilt when next needed)."""
    module = sys.modules.get(_LOOPS_MODULE)
    if module is not None:
        module.clear_graph_cache()


def run(call: RecurrentCall) -> Result:
    """Same contract as :func:`droprnn.kernels.reference.run`: stacked cells one after another, each over the
    whole sequence as one ``droprnn::gpu_layer`` operator (``operator.py``). Imports the kernels."""
    return stacked(call, operator.layer)
