"""CUDA graphs for the time loops of the GPU kernels: when to use them, and a bounded cache of captured loops.

Why: a time loop launches two kernels per step (the recurrent product and a Triton step kernel; four in
the GRU's reset_before form). At small batches each launch costs more time on the host (Python, torch's
dispatch, Triton's launcher) than on the GPU, so the loop is bound by the host. A loop captured once in a
:class:`torch.cuda.CUDAGraph` replays all its launches with one call.

What a captured loop needs: fixed sizes and fixed addresses. So each cache entry owns *static* buffers
(allocated before capture, since capture must not allocate), each call writes its inputs into them,
replays, and copies out what outlives the call (see ``kernels/gpu/loops.py``). An entry serves any number
of layers and calls with the same key, one after another.

This module imports torch only (no Triton, no CUDA at import), so its bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import torch

Tensor = torch.Tensor

ENV_SWITCH = "DROPRNN_CUDA_GRAPHS"
_OFF = ("0", "false", "off", "no")
# Captured loops kept (forward and backward loops count separately). Each holds sequence-sized buffers --
# about 6 (forward) and 10 (backward) times B·T·U elements -- so the bound is what caps the memory that
# variable shapes (e.g. variable-length batches) can pin.
CACHE_SIZE = 8
# A key is captured on its second call: a shape seen once (the last, shorter batch of an epoch, say) runs
# the eager loop instead of paying a warm-up and a capture it would never earn back.
CAPTURE_ON_CALL = 2


def enabled() -> bool:
    """Whether the environment allows CUDA graphs (``DROPRNN_CUDA_GRAPHS=0`` switches them off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


def unusable_reason(x: Tensor) -> Optional[str]:
    """Why the time loops of a call on ``x`` run eagerly instead of from a CUDA graph (None: graphs are used).

    Never initialises CUDA for a CPU tensor, so it is safe to call in the CPU tests.
    """
    if not enabled():
        return f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)} switches CUDA graphs off"
    if x.device.type != "cuda":
        return f"the tensors are on {x.device} (Triton's interpreter); CUDA graphs need CUDA tensors"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured on this stream already: the loop's launches go into that graph"
    return None


def describe() -> str:
    """How the time loops run, for :func:`droprnn.kernels.gpu.describe`."""
    if not enabled():
        return f"eager time loops ({ENV_SWITCH}=0)"
    return "time loops replayed from CUDA graphs (eager while another graph is being captured)"


class GraphCache:
    """A least-recently-used cache of captured loops, bounded to ``capacity`` entries.

    ``lookup(key, build)`` returns the entry for ``key``, building it with ``build()`` on the key's
    ``capture_on_call``-th call; before that it returns None (run eagerly). Evicted entries are handed to
    ``release`` (which must make sure no replay of theirs is still pending before they are freed). A key
    whose ``build()`` raised is remembered and runs eagerly (with a warning) until ``clear()``. The key must
    hold everything the captured work depends on; see ``loops.LoopKey``.
    """

    def __init__(self, capacity: int = CACHE_SIZE, capture_on_call: int = CAPTURE_ON_CALL,
                 release: Optional[Callable[[Any], None]] = None):
        if capacity < 1 or capture_on_call < 1:
            raise ValueError(f"GraphCache needs capacity >= 1 and capture_on_call >= 1, got {capacity}, "
                             f"{capture_on_call}")
        self.capacity = capacity
        self.capture_on_call = capture_on_call
        self._release = release or _release_captured
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._calls: OrderedDict[Hashable, int] = OrderedDict()  # keys not captured yet: calls so far
        self._failed: set = set()  # keys whose capture raised: eager from then on
        self._lock = threading.Lock()

    def lookup(self, key: Hashable, build: Callable[[], Any]) -> Optional[Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            calls = self._calls.pop(key, 0) + 1
            if calls < self.capture_on_call:
                self._calls[key] = calls
                while len(self._calls) > 8 * self.capacity:  # only counts: a generous bound is cheap
                    self._calls.popitem(last=False)
                return None
            if key in self._failed:
                return None
            while len(self._entries) >= self.capacity:  # free the oldest before the new one allocates
                _, old = self._entries.popitem(last=False)
                self._release(old)
            try:
                entry = build()
            except Exception as error:  # a capture that fails must not fail the call: the eager loop still runs
                self._failed.add(key)
                warnings.warn(f"droprnn: capturing a time loop in a CUDA graph failed ({type(error).__name__}: "
                              f"{error}); these shapes run the eager loop instead. {ENV_SWITCH}=0 switches the "
                              "graphs off.", RuntimeWarning, stacklevel=2)
                return None
            self._entries[key] = entry
            return entry

    def clear(self) -> None:
        with self._lock:
            while self._entries:
                self._release(self._entries.popitem(last=False)[1])
            self._calls.clear()
            self._failed.clear()

    def keys(self) -> list:
        """The captured keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _release_captured(entry: Any) -> None:
    # A replay still queued on the GPU may use the entry's buffers and graph: wait for it before they are
    # freed. Eviction only happens right before a capture, which synchronises the device anyway.
    device = getattr(entry, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def capture(device: torch.device, loop: Callable[[], None], warm_up: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """Capture ``loop()`` (launches on the current stream into preallocated buffers) in a CUDA graph.

    As PyTorch's docs require, the work is first run once on a side stream (``warm_up``: compiles the
    Triton kernels and sets up cuBLAS's workspace for that stream), then captured on the same stream.
    """
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)  # the buffers were allocated (and maybe written) on the current stream
    with torch.cuda.stream(side):
        warm_up()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls that other threads make meanwhile (a DataLoader's pinned-memory thread, say)
    # do not invalidate this capture; the backward's capture runs on autograd's own thread.
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        loop()
    return graph
