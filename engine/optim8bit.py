"""AdamW with blockwise 8-bit states (``optim.name = "adamw_8bit"``): bitsandbytes' ``AdamW8bit``
rebuilt on ``ember.kernels.adamw8bit``, with the same numbers (see that module for the math).

Memory: a parameter with n >= ``min_8bit_size`` (4096) elements keeps m and v as one byte each
plus one fp32 scale per 256 values for each (2.03 bytes per parameter instead of torch AdamW's 8);
a smaller one (norm gains, biases, small adapters) keeps fp32 m and v updated by bnb's 32-bit
rule (``adamw32_step_ref``), as bnb does, and so does any parameter of a group with
``"optim_bits": 32`` (bnb's override, which transformers' Trainer sets for embedding tables).
The choice uses the full (global) size of a sharded parameter, so it does not depend on the
world size. A matrix trained by rows (``ember_trained_rows``: a continued adapter's
trainable_token_indices) is stepped on those rows alone, gathered in the adapter's index order:
PEFT's ``trainable_tokens_delta`` (rows x D), the parameter transformers' Trainer hands bnb. Its
size decides 8 or 32 bits (2 new tokens of a 576-wide model: 1152 values, fp32 states) and its
rows make the 256-value blocks, whatever the table's size.

State per parameter: ``step`` (fp32 scalar tensor, as torch's AdamW), then either ``state1`` /
``state2`` (uint8, the parameter's shape) and ``absmax1`` / ``absmax2`` (fp32 per-block scales),
or fp32 ``state1`` / ``state2``. States are created on the first step, on the parameter's device.

FSDP2 (DTensor parameters sharded on dim 0): the update runs on the local shard (``to_local()``),
blocks of 256 counted from the start of the shard. State tensors are DTensors laid out like the
parameter, so DCP saves each rank's part: the byte states with the parameter's placements, the
scales as a dim-0 sharded vector padded to the same length on every rank (the largest shard's
block count). A checkpoint therefore resumes at the world size that wrote it (the block grid
follows the shards); at another world size loading is refused (``state["shards"]`` records the
split), never silently misread.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ember import EmberError
from ember.kernels.adamw8bit import BLOCKSIZE, adam_moments_, adamw8bit_step

_FP32_KEYS = ("absmax1", "absmax2")


def adamw32_step_ref(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *,
                     step: int, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """bnb's 32-bit Adam(W) CPU update (``optimizer_update_32bit``), in place, fp32 m and v:
    p *= 1 - lr wd; p += (-lr sqrt(1-beta2^t) / (1-beta1^t)) * m / (sqrt(v) + eps sqrt(1-beta2^t))
    (torch's AdamW puts eps outside the bias correction: the same up to eps' scaling)."""
    pf = p.float()
    c1, c2 = adam_moments_(m, v, grad.float(), beta1, beta2, step)
    if weight_decay > 0.0:
        pf.mul_(1.0 - lr * weight_decay)
    pf.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    if pf is not p:
        p.copy_(pf)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _shard_layout(p) -> tuple[int, int]:
    """(blocks of the largest local shard, number of shards) of a DTensor parameter."""
    from torch.distributed.tensor import Replicate, Shard

    rows, shards = p.shape[0] if p.dim() else 1, 1
    for dim, pl in enumerate(p.placements):
        if type(pl) is Shard and pl.dim == 0:
            size = p.device_mesh.size(dim)
            rows, shards = -(-rows // size), shards * size
        elif not isinstance(pl, Replicate):
            raise EmberError(f"optim.name='adamw_8bit' takes parameters sharded on dim 0 (FSDP2) "
                             f"or replicated, got placements {p.placements}; use "
                             "optim.name='adamw' with this parallelism")
    per_row = p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1
    return -(-rows * per_row // BLOCKSIZE), shards


def _stepped_numel(p) -> int:
    """The values the optimizer steps (and keeps states for) of parameter ``p``: a matrix
    trained by rows, those rows."""
    rows = getattr(p, "ember_trained_rows", None)
    return p.numel() if rows is None else len(rows) * (p.numel() // max(1, p.shape[0]))


def _shards(p) -> int:
    from torch.distributed.tensor import DTensor

    return _shard_layout(p)[1] if isinstance(p, DTensor) else 1


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise states, numerically bitsandbytes' ``AdamW8bit`` (module doc).
    Param groups may carry any extra keys (the trainer's ``lr_ratio``); ``lr`` and
    ``weight_decay`` are read per group at every step."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = 4096,
                 impl: str | None = None):
        if not lr >= 0 or not eps > 0 or not weight_decay >= 0:
            raise EmberError(f"AdamW8bit: need lr >= 0, eps > 0, weight_decay >= 0; got lr={lr} "
                             f"eps={eps} weight_decay={weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise EmberError(f"AdamW8bit: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.impl = impl

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved) != len(params):
            raise EmberError(f"this adamw_8bit optimizer state holds {len(saved)} parameters, the "
                             f"model trains {len(params)}: resume with the trainable parameters "
                             "(LoRA targets, freeze patterns) of the run that wrote it")
        for n, (i, p) in enumerate(zip(saved, params, strict=True)):
            s1 = state_dict["state"].get(i, {}).get("state1")
            if s1 is not None and s1.numel() != _stepped_numel(p):
                raise EmberError(f"this adamw_8bit optimizer state has {s1.numel()} values for "
                                 f"parameter {n}, the model's has shape {tuple(p.shape)}: resume "
                                 "with the model (LoRA rank, targets) of the run that wrote it")
        for i, p in zip(saved, params, strict=True):
            shards = state_dict["state"].get(i, {}).get("shards")
            if shards is not None and int(shards) != _shards(p):
                raise EmberError(f"this adamw_8bit optimizer state was written with parameters "
                                 f"split in {int(shards)} shards, this run splits them in "
                                 f"{_shards(p)}: its 8-bit blocks follow the shards, so resume "
                                 "with the number of processes that wrote the checkpoint")
        super().load_state_dict(state_dict)
        # torch casts every state tensor of a floating parameter to its dtype: the byte codes, the
        # scales and the fp32 moments of small parameters keep their saved dtypes.
        for i, p in zip(saved, params, strict=True):
            for key, v in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(v):
                    self.state[p][key] = v.to(device=p.device)

    def _init_state(self, p: torch.Tensor, state: dict, fp32: bool = False) -> None:
        from torch.distributed.tensor import DTensor

        local = _local(p)
        sharded = isinstance(p, DTensor)

        def like_p(t: torch.Tensor) -> torch.Tensor:
            if not sharded:
                return t
            return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())

        def zeros(dtype: torch.dtype) -> torch.Tensor:
            # Contiguous whatever p's strides (a transposed parameter): the 256-value blocks run
            # over p's values in row-major order, as bnb's; zeros_like would copy the strides.
            return like_p(torch.zeros(local.shape, dtype=dtype, device=local.device))

        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if fp32 or p.numel() < self.min_8bit_size:
            state["state1"], state["state2"] = zeros(torch.float32), zeros(torch.float32)
            return
        state["state1"], state["state2"] = zeros(torch.uint8), zeros(torch.uint8)
        state["shards"] = torch.tensor(_shards(p))  # the block grid follows the shards
        if not sharded:
            nb = -(-p.numel() // BLOCKSIZE)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            return
        from torch.distributed.tensor import Replicate, Shard

        nb, shards = _shard_layout(p)
        places = [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements]
        for key in _FP32_KEYS:
            t = torch.zeros(nb, dtype=torch.float32, device=local.device)
            state[key] = DTensor.from_local(t, p.device_mesh, places, run_check=False,
                                            shape=(nb * shards,), stride=(1,))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            kw = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                rows = getattr(p, "ember_trained_rows", None)
                lp, lg = _local(p), _local(p.grad)
                if rows is not None:  # PEFT's trainable_tokens_delta: the rows alone
                    lp, lg = lp[rows], lg[rows]
                if not state:
                    self._init_state(p if rows is None else lp, state,
                                     group.get("optim_bits") == 32)
                state["step"] += 1
                step = int(state["step"].item())
                work = lp if lp.is_contiguous() else lp.contiguous()
                s1, s2 = _local(state["state1"]), _local(state["state2"])
                if "absmax1" in state:
                    adamw8bit_step(work, lg.contiguous(), s1, s2, _local(state["absmax1"]),
                                   _local(state["absmax2"]), step=step, impl=self.impl, **kw)
                else:
                    adamw32_step_ref(work, lg, s1, s2, step=step, **kw)
                if rows is not None:
                    p.data[rows] = work
                elif work is not lp:
                    lp.copy_(work)
        return loss

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors on this rank (local shards)."""
        return sum(_local(v).numel() * _local(v).element_size()
                   for s in self.state.values() for v in s.values() if torch.is_tensor(v))
