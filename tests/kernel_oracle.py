"""Helpers the kernel test files share: running a layer under given dropout plans and collecting every
returned tensor and gradient of a fixed random loss, so a fast kernel can be held to the reference loop.

(Imported by the kernel test files; pytest puts this folder on sys.path.)
"""

from __future__ import annotations

import contextlib
import copy
import zlib

import torch

from droprnn import GRU, LSTM, RNN, DropoutPlan, GRUCell, LSTMCell, SimpleRNN, SimpleRNNCell
from droprnn.kernels.call import RecurrentCall

F32, F64 = torch.float32, torch.float64


def flat(tree) -> list:
    if tree is None:
        return []
    if torch.is_tensor(tree):
        return [tree]
    return [t for item in tree for t in flat(item)]


def rebuild(tree, leaves):
    """``tree`` (tensors in nested lists) with its tensors replaced by ``leaves`` in order."""
    it = iter(leaves)

    def go(node):
        if torch.is_tensor(node):
            return next(it)
        return [go(n) for n in node]

    return None if tree is None else go(tree)


def cast_plan(plan: DropoutPlan, dtype) -> DropoutPlan:
    return plan.to(dtype)


def loss_weights(tensors) -> list:
    """Fixed random weights for a loss that touches every element of every returned tensor."""
    out = []
    for k, t in enumerate(tensors):
        gen = torch.Generator().manual_seed(3000 + k)
        out.append(torch.randn(t.shape, generator=gen, dtype=F64))
    return out


def run(layer, x, plans, *, initial_state=None, mask=None, lengths=None, calls=1, loss_on=None):
    """Call ``layer`` ``calls`` times (stateful layers carry states between them) with the given plans;
    return (returned tensors of all calls, gradients of a fixed random loss wrt x, initial states and every
    parameter, in order). ``loss_on`` picks which returned tensors enter the loss (default: all)."""
    params = list(layer.parameters())
    x = x.detach().clone().requires_grad_(True)
    init_leaves = [t.detach().clone().requires_grad_(True) for t in flat(initial_state)]
    init = rebuild(initial_state, init_leaves)
    returned = []
    for k in range(calls):
        out = layer(x, mask=mask, lengths=lengths, initial_state=init if k == 0 else None,
                    dropout_plan=plans[k])
        returned += flat(out)
    used = returned if loss_on is None else [returned[i] for i in loss_on]
    loss = sum((t * w.to(t.dtype)).sum() for t, w in zip(used, loss_weights(used)))
    wrt = [x, *init_leaves, *[p for p in params if p.requires_grad]]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
    return [t.detach() for t in returned], list(grads)


def draw_plans(layer, B, T, calls=1, training=True):
    return [layer.draw_dropout_plan(B, steps=T, training=training) for _ in range(calls)]


def holey_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """A (B, T) bool mask with holes; row 0 starts masked, the last row is fully masked (when B > 1)."""
    gen = torch.Generator().manual_seed(4000 + seed)
    mask = torch.rand(B, T, generator=gen) > 0.35
    mask[0, 0] = False
    if T > 1:
        mask[0, 1] = True
    if B > 1:
        mask[-1] = False
    return mask


def spy_on(monkeypatch, module) -> list:
    """Record the arguments of every call to ``module.run`` (a kernel), which still runs."""
    calls = []
    original = module.run

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "run", wrapper)
    return calls


def call_for(layer, x) -> RecurrentCall:
    """The call ``layer`` would hand its kernel for input ``x`` (no masks or states: kernels choose by the
    cells, the input and the weights)."""
    cells = tuple(layer.cells)
    return RecurrentCall(cells, tuple(c.weights() for c in cells), x, (), DropoutPlan(()))


@contextlib.contextmanager
def uninitialized_is_nan():
    """Make torch.empty / at::empty fill with NaN (restoring the previous settings afterwards)."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        probe = torch.empty(7, dtype=F32)
        assert torch.isnan(probe).all(), "fill_uninitialized_memory is not active; the NaN check would be vacuous"
        yield
    finally:
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def cell_kwargs(kind_of_cell: str, mode: dict) -> dict:
    """The dropout options (and ``use_bias``) of ``mode`` that a cell of this kind accepts."""
    kw = dict(mode)
    if kind_of_cell != "lstm":
        kw.pop("zoneout_c", None)
    if kind_of_cell == "simple" and kw.get("recurrent_dropout_mode", "keras").startswith("update"):
        kw["recurrent_dropout_mode"] = "tied"
    return kw


def make_layer(kind: str, D: int, U: int, dtype, *, mode=None, acts=("tanh", "sigmoid"), seed=0, weight_scale=0.6,
               **layer_kw):
    """A built layer with random (not initializer-shaped) weights N(0, weight_scale²), deterministic in ``seed``."""
    mode = mode or {}
    act, rec_act = acts
    if kind == "lstm":
        layer = LSTM(U, activation=act, recurrent_activation=rec_act, **cell_kwargs("lstm", mode), **layer_kw)
    elif kind == "lstm_proj":  # torch's proj_size: h has fewer features than the units
        units = max(U, 2)
        layer = LSTM(units, proj_size=max(1, units // 2), activation=act, recurrent_activation=rec_act,
                     **cell_kwargs("lstm", mode), **layer_kw)
    elif kind in ("gru", "gru_reset_before"):
        layer = GRU(U, activation=act, recurrent_activation=rec_act, reset_after=kind == "gru",
                    **cell_kwargs("gru", mode), **layer_kw)
    elif kind == "simple":
        layer = SimpleRNN(U, activation=act, **cell_kwargs("simple", mode), **layer_kw)
    elif kind == "stacked":
        # Three cells of different widths, so a mix-up of sizes between cells cannot go unnoticed.
        cells = [
            LSTMCell(U, activation=act, recurrent_activation=rec_act, **cell_kwargs("lstm", mode)),
            GRUCell(U + 2, activation=act, recurrent_activation=rec_act, reset_after=seed % 2 == 0,
                    **cell_kwargs("gru", mode)),
            SimpleRNNCell(3, activation=act, **cell_kwargs("simple", mode)),
        ]
        layer = RNN(cells, **layer_kw)
    else:
        raise AssertionError(kind)
    return built_with_random_weights(layer, D, dtype, seed, weight_scale)


def built_with_random_weights(layer, D: int, dtype, seed: int, weight_scale: float):
    """``layer`` built for D features with weights N(0, weight_scale²), deterministic in ``seed``."""
    layer.build(D, dtype=dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(weight_scale * torch.randn(p.shape, generator=gen, dtype=F64))
    return layer


def random_input(B: int, T: int, D: int, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5000 + seed)
    return torch.randn(B, T, D, generator=gen, dtype=F64).to(dtype)


def stable_seed(*parts) -> int:
    """A seed that is stable across runs (unlike hash() of strings)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) % 1000


def run_impl(layer, impl, *args, **kwargs):
    """Run a deep copy of ``layer`` with ``impl``; check it really took that kernel."""
    layer = copy.deepcopy(layer)
    layer.impl = impl
    if impl == "fused":
        with uninitialized_is_nan():
            result = run(layer, *args, **kwargs)
    else:
        result = run(layer, *args, **kwargs)
    assert layer.last_kernel is not None and layer.last_kernel.name == impl, layer.last_kernel
    return result


def state_sizes(layer) -> list[list[int]]:
    """Per cell of ``layer``, the sizes of its states."""
    return [list(c.state_size) for c in layer.cells]


def make_initial_state(layer, B: int, dtype, seed: int):
    """Random initial states for ``layer`` (per cell a list when stacked), the same for every kernel."""
    gen = torch.Generator().manual_seed(2000 + seed)
    per_cell = [[0.5 * torch.randn(B, s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes]
                for sizes in state_sizes(layer)]
    return per_cell[0] if len(per_cell) == 1 else per_cell


def assert_f64_equal(got_result, want_result, kernel: str = "fast"):
    """A fast kernel's (outputs, grads) equal the reference's to 1e-10 in float64, with no NaN (an element
    the kernel never wrote: see uninitialized_is_nan)."""
    names = ["output/state"] * len(got_result[0]) + ["grad"] * len(got_result[1])
    got, want = got_result[0] + got_result[1], want_result[0] + want_result[1]
    assert len(got) == len(want)
    for k, (a, b, name) in enumerate(zip(got, want, names)):
        assert not torch.isnan(a).any(), f"{name} #{k}: NaN in the {kernel} result (an element never written)"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} #{k}: {m}")
