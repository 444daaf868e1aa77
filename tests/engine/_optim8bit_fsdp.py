"""One rank of test_optim8bit's FSDP2 check (``main``, a ``call`` of the shared torchrun launch,
tests/engine/_shared_launch.py): AdamW8bit on sharded parameters, unsharded and sharded runs side
by side, and a DCP checkpoint written after step 2 and resumed into a fresh model and optimizer.
Rank 0 saves the results to the file ``out``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ember.engine import dcp, distributed
from ember.engine.distributed import init_distributed, shard_model
from ember.engine.optim8bit import AdamW8bit


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # (64, 256) and (128, 64): the two shards hold whole 256-blocks; the biases keep fp32
        # states; ``odd`` (131, 33) is split 66 / 65 rows, its blocks cut unlike unsharded.
        self.layers = nn.ModuleList([nn.Linear(256, 64), nn.Linear(64, 128)])
        self.odd = nn.Parameter(torch.randn(131, 33))

    def hidden_states(self, x):  # shard_model registers it as an FSDP forward method
        return self(x)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x, self.odd.cos().mean()  # odd's update does not reach the layers


def build() -> Net:
    torch.manual_seed(0)
    return Net()


def steps(model, opt, ts, world: int = 1) -> None:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    for t in ts:
        # Every rank sees the whole batch; shard_model sums gradients over the ranks.
        y, odd = model(x * t)
        ((((y - 0.5) ** 2).mean() + odd) / world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def make_opt(model) -> AdamW8bit:
    return AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1)


def main(out: str) -> None:
    out = Path(out)
    info = init_distributed("cpu")
    ref = build()
    steps(ref, make_opt(ref), range(1, 5))
    a = shard_model(build(), info)
    opt_a = make_opt(a)
    steps(a, opt_a, range(1, 3), info.world_size)
    folder = dcp.save(out.parent / "ckpt", 2, model=a, optimizer=opt_a, info=info)
    steps(a, opt_a, range(3, 5), info.world_size)
    b = shard_model(build(), info)
    opt_b = make_opt(b)
    dcp.load(folder, model=b, optimizer=opt_b, info=info)
    steps(b, opt_b, range(3, 5), info.world_size)
    full = {name: {n: p.full_tensor() for n, p in m.named_parameters()}
            for name, m in (("a", a), ("b", b))}
    kinds = {n: sorted(f"{k}:{type(v).__name__}" for k, v in opt_a.state[p].items())
             for n, p in a.named_parameters()}
    if info.rank == 0:
        torch.save({"ref": {n: p.detach() for n, p in ref.named_parameters()}, **full,
                    "kinds": kinds}, out)
    # (looked up at the call: the shared launch keeps the group up for its next runs)
    distributed.shutdown(together=True)
