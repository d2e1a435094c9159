"""DistributedDataParallel over droprnn layers: two processes (gloo) train a few steps with dropout and
recurrent dropout on (each rank drawing its own masks), and their parameters stay equal."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


class _TwoFronts(torch.nn.Module):
    """A Keras-named model and a droprnn.nn module side by side, one forward for DDP to wrap."""

    def __init__(self, model: torch.nn.Module, torch_front: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.torch_front = model, torch_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).square().mean() + self.torch_front(x)[0].square().mean()


def _train(rank: int, init_file: str, out_dir: str) -> None:
    import droprnn
    from droprnn import nn as dnn

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = droprnn.Sequential([
        droprnn.LSTM(8, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, input_shape=(None, 4)),
        droprnn.GRU(6, recurrent_dropout=0.3),
        droprnn.Dense(2),
    ])
    torch_front = dnn.LSTM(4, 5, batch_first=True, recurrent_dropout=0.3)
    modules = _TwoFronts(model, torch_front)
    initial = [p.detach().clone() for p in modules.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(modules)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # each rank its own data and its own masks
    for _ in range(STEPS):
        loss = ddp(torch.randn(3, 7, 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model[0].last_kernel.name == "fused" and torch_front.last_kernel.name == "fused"
    torch.save({"final": [p.detach() for p in modules.parameters()], "initial": initial},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: with torch 2.13's gloo a process that used a process group
    # aborts there now and then ("terminate called without an active exception", SIGABRT), droprnn or not
    # (measured: 5 of 16 runs of a plain torch.nn.LSTM under DDP on this loaded 2-core machine; none of 32
    # with this exit). Everything the test reads is saved above.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_keeps_the_ranks_parameters_equal(tmp_path):
    mp.spawn(_train, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = [not torch.equal(f, i) for f, i in zip(ranks[0]["final"], ranks[0]["initial"])]
    assert all(moved)  # every parameter was trained
