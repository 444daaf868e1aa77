"""Data-parallel training with PyTorch's FSDP2 (``fully_shard``) under ``torchrun``.

Launch: ``torchrun --nproc_per_node N -m ember.engine.cli train CONFIG`` (multi-node: add
torchrun's ``--nnodes``/``--rdzv_*`` flags; checkpoints then need a filesystem every node sees).
``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
joins the process group: NCCL on GPUs (``cuda:LOCAL_RANK``, with gloo for CPU tensors), gloo on
CPU. A plain ``python`` run is world size 1 and never touches ``torch.distributed``.

Sharding (``shard_model``), applied to the finished model in STYLE.md's order: LoRA/NF4 wrapping
-> activation checkpointing -> compile -> ``fully_shard`` on every block, then on the root.
Module names and state-dict keys are unchanged (FSDP2 swaps parameters for ``DTensor`` shards in
place). With LoRA the frozen base is sharded like the rest; only adapters get gradients.
QLoRA (an NF4 base, FSDP-QLoRA): each NF4 layer keeps its packed codes and quant state as one
frozen 1-D bf16 Parameter (``store_nf4_flat``, called by ``shard_model``; ``Linear4bit``'s
flat-storage mode), so FSDP shards the 4-bit base like the rest: each rank holds 1 / N of the
NF4 bytes, a block's layers are gathered byte for byte just before its forward (and again for
its backward) and freed after. bf16 storage is what FSDP's mixed-precision policy casts
parameters to, so it casts nothing; frozen, the storage is never reduced, checkpointed (DCP's
state dicts leave frozen parameters out) nor exported (an adapter is the trainable parameters;
a merged export reloads the base).
Mixed precision on CUDA: bf16 parameters for compute, fp32 gradient reduction, fp32 master shards.
Loading: only rank 0 reads the weights, into host memory (``build_device``); the other ranks build
the same model on the meta device, and after ``fully_shard`` rank 0 broadcasts each tensor into
every rank's shards (``materialize_from_rank0``, the end of ``shard_model``), so no GPU ever holds
the whole model and host memory holds one copy, not one per rank.

Semantics, so that N ranks reproduce one process:
- Data: ``grad_accum`` is per rank; an optimizer step consumes ``grad_accum * world_size`` packed
  batches. Every rank follows the one-process stream of batches (a ``PackedBatches`` of world
  size 1: the same epochs, steps and data position as one process with ``grad_accum *
  world_size``) and of each step's batches takes every N-th, starting at its rank
  (``step_share``). No batch is dropped: where a step's batches do not divide by N (an epoch's
  last, partial step; an epoch whose batch count does not divide by N) a rank with fewer makes
  forward / backward passes that count for nothing, since a sharded forward is a collective.
- Loss: every rank divides its summed token losses by the answer tokens of the whole global step
  (``all_reduce_sums`` before the forward), and gradients are *summed* across ranks (FSDP's
  default averaging is switched off), so the gradient is the token-weighted mean over all ranks'
  tokens, identical to one process. The logged loss is the all-reduced sum of the ranks' losses.
- Clipping: ``clip_grad_norm`` computes the global norm over the shards.
- Random draws during training (dropout masks, NEFTune's embedding noise) are the exception:
  each rank draws from its own RNG (rank 0 seeded as one process, rank r with ``seed + r``), so
  a run with either is reproducible and statistically the same, not equal to one process step
  for step. (transformers' Trainer seeds every rank alike, so its ranks draw the same noise for
  their different batches.)
- Refused: a continued adapter's ``trainable_token_indices`` (a gradient hook trains those rows
  alone, and ``fully_shard`` replaces the parameter it sits on; train it in one process).

- Evaluation: each rank scores a disjoint share of the batches or examples (``eval_share``:
  every N-th, padded with calls that count for nothing, since a sharded forward is a collective);
  the sums are all-reduced, the predictions gathered.

Forward-only models (distillation's teacher, DPO's reference copy with full fine-tuning) are
sharded the same way on the same process group, without an optimizer (``shard_frozen``).
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ember import EmberError
from ember.engine.data import PackedBatches
from ember.models.nf4 import Linear4bit

MIXED_PRECISION = ("auto", "bf16", "none")
MAX_TIMEOUT_MINUTES = 1e7


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """``[dist]`` in a run config (only used under ``torchrun`` with more than one process)."""

    mixed_precision: str = "auto"  # "auto": bf16 params + fp32 reduce on CUDA, none on CPU
    # False keeps each block's gathered parameters from forward to backward (less communication,
    # more memory: ZeRO-2-like); True re-gathers them in backward (ZeRO-3).
    reshard_after_forward: bool = True
    timeout_minutes: float = 30.0  # a collective waiting longer than this fails the run

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise EmberError(f"dist.mixed_precision must be one of "
                             f"{', '.join(map(repr, MIXED_PRECISION))}, got "
                             f"{self.mixed_precision!r}")
        if not 0 < self.timeout_minutes <= MAX_TIMEOUT_MINUTES:
            # (past about 2e12 the process group's timedelta overflows: a deep OverflowError)
            raise EmberError(f"dist.timeout_minutes must be > 0 and at most "
                             f"{MAX_TIMEOUT_MINUTES:g} (about 19 years), got "
                             f"{self.timeout_minutes}")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group (one process)
    local_world_size: int = 1  # processes on this node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise EmberError(f"environment variable {name}={raw!r} is not an integer (set by "
                         "torchrun; launch with torchrun or unset it)") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join torchrun's process group (a no-op for a single process). ``device``: the run's
    device setting ("auto", "cpu", "cuda", "cuda:N"); with several processes each rank uses
    ``cuda:LOCAL_RANK``."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < max(world, 1):
        raise EmberError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise EmberError(f"device = {device!r} but CUDA is not available; use device = \"cpu\"")
    if world <= 1:
        return DistInfo(device=device)
    if cuda:
        if device not in ("cuda", f"cuda:{local}"):
            raise EmberError(f"under torchrun each process uses cuda:LOCAL_RANK; set device = "
                             f"\"cuda\" (or \"auto\") instead of {device!r}")
        if local >= torch.cuda.device_count():
            raise EmberError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are "
                             "visible: lower --nproc_per_node or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "cpu:gloo,cuda:nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise EmberError(f"the process group (rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}) disagrees with RANK={rank}, "
                         f"WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device,
                    backend=backend, local_world_size=_env_int("LOCAL_WORLD_SIZE", world))


def shutdown(*, together: bool = False) -> bool:
    """Leave torchrun's process group (a no-op for one process). ``together`` (after a run that
    ended normally on every rank): first wait for all ranks, so that none tears its group down
    while rank 0 is still writing files and talking to it (with gloo, a rank leaving early
    has been seen to abort in the group's destructor). True if there was a group to leave."""
    if dist.is_available() and dist.is_initialized():
        # Free what still holds the groups (a finished trainer's sharded model and its device
        # mesh, in reference cycles) while the groups and the interpreter are alive: left to
        # interpreter shutdown, gloo's teardown aborted the process after a finished run
        # ('terminate called without an active exception', no Python frame; 2 of 45 2-process
        # runs here).
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()
        return True
    return False


def _mp_policy(mixed_precision: str, device: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.startswith("cuda") else "none"
    if mixed_precision == "none":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, info: DistInfo, *, mixed_precision: str = "auto",
                reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block of ``model.layers``, then the root (in place; returns the
    model), then fill the shards with rank 0's weights (``materialize_from_rank0``): ``model``
    is built on ``build_device(info)``. A no-op for one process. A collective: every rank calls
    it with the same model. Build the optimizer after this call: its parameters are the
    shards. An NF4 base (QLoRA) is sharded too (``store_nf4_flat``)."""
    if mixed_precision not in MIXED_PRECISION:
        raise EmberError(f"mixed_precision must be one of {MIXED_PRECISION}, "
                         f"got {mixed_precision!r}")
    if not info.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EmberError(f"shard_model needs a model with a `layers` ModuleList (an ember "
                         f"Transformer), got {type(model).__name__}")
    # fully_shard swaps every parameter for a new DTensor Parameter: a matrix trained by rows
    # (a continued adapter's trainable_token_indices) would lose the gradient hook that trains
    # those rows alone, and train every row. Every rank decides alike (no rank left waiting).
    rows = [n for n, p in model.named_parameters()
            if getattr(p, "ember_trained_rows", None) is not None]
    if any_rank(bool(rows), info):
        raise EmberError("the adapter's trainable_token_indices (rows of embed_tokens / "
                         "lm_head) cannot train under torchrun: FSDP2 would train every row of "
                         "the matrix; continue this adapter in one process (without torchrun)")
    # Before fully_shard: ranks > 0 must hold rank 0's module structure (Linear4bit where rank
    # 0 has one) so that every rank registers the same parameters.
    store_nf4_flat(model, info)
    # Only rank 0 read the weights (into host memory): the full tensors it broadcasts into
    # every rank's shards once they exist.
    full_sd = dict(model.state_dict()) if info.rank == 0 else None
    mesh = init_device_mesh("cuda" if info.device.startswith("cuda") else "cpu",
                            (info.world_size,))
    mp = _mp_policy(mixed_precision, info.device)
    for block in layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root (embedding, final norm, head) stays gathered after forward: the loss uses
    # ``model.output_weight`` outside ``forward``, and backward needs it right away anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Sum, not average: every rank's loss is already divided by the global token count.
            m.set_gradient_divide_factor(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM / AVG
    # The trainer's losses call ``hidden_states`` rather than ``forward``: it must run FSDP's
    # hooks (gather the root's parameters) too.
    register_fsdp_forward_method(model, "hidden_states")
    materialize_from_rank0(model, full_sd, info)
    return model


def shard_frozen(model: nn.Module, info: DistInfo, mixed_precision: str = "none") -> nn.Module:
    """A model for forwards only (distillation's teacher, DPO's reference with full fine-tuning):
    eval mode, no gradients and, under torchrun, sharded like the trained model (``fully_shard``
    per block, then the root, on the same process group; no optimizer), so each rank holds
    1 / world_size of it. Build it on ``build_device(info)``: rank 0's full weights are broadcast
    into the shards. Its parameters are gathered block by block for each forward, so every rank
    must make the same forward calls in the same order; call ``release`` after each use (the
    root stays gathered after a forward, for the ``logits`` / ``output_weight`` that follow it).
    Weights stay in their dtype (no mixed-precision policy: they are loaded in the compute
    dtype), unless ``mixed_precision`` (``dist.mixed_precision``'s values) gathers fp32 shards
    in bf16 for the forwards, as the trained model's (TR-DPO's reference: fp32 for its mix)."""
    model.requires_grad_(False).eval()
    return shard_model(model, info, mixed_precision=mixed_precision, reshard_after_forward=True)


def release(model: nn.Module) -> None:
    """Free the gathered root parameters of a ``shard_frozen`` model after its forward and
    head (a no-op in one process). Training models need no call: backward reshards them."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP module of ``model`` back into its sharded state (local, not a collective; a
    no-op without FSDP). A forward without backward (an evaluation) leaves the root, and with
    ``dist.reshard_after_forward = false`` every block, holding gathered plain tensors in place of
    the DTensor shards the optimizer holds: state-dict and checkpoint code needs the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_numel(model: nn.Module) -> int:
    """Parameter elements held by this process (its shards under FSDP)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
               for p in model.parameters())


def eval_share(n: int, info: DistInfo) -> list[int | None]:
    """This rank's share of ``n`` evaluation items (batches, examples): items r, r + N, ... of
    the one-process order (the ranks' shares are disjoint and cover all n), then None up to
    ``ceil(n / N)`` entries. Every rank gets as many entries, because a sharded model's forward
    is a collective: at a None the rank makes a forward call whose result counts for nothing."""
    share: list[int | None] = list(range(info.rank, n, info.world_size))
    return share + [None] * (-(-n // info.world_size) - len(share))


def build_device(info: DistInfo) -> str:
    """Where a process builds the model before ``shard_model``: one process builds it on its
    device; under torchrun rank 0 reads the weights into host memory and every other rank builds
    only the structure ("meta"), so no rank but 0 ever holds the whole model."""
    if not info.distributed:
        return info.device
    return "cpu" if info.rank == 0 else "meta"


def materialize_from_rank0(model: nn.Module, full_sd: dict | None, info: DistInfo) -> None:
    """The end of ``shard_model`` on a model built by ``build_device``: every rank allocates its
    shards on its device and rank 0 broadcasts ``full_sd`` (its full state dict, taken before
    sharding) into them, the NF4 bytes of a QLoRA base (flat Parameters) like every other
    weight; the RoPE tables (non-persistent) are rebuilt on the device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=info.device)
    set_model_state_dict(model, full_sd if info.rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True,
                                                  broadcast_from_rank0=True))
    if hasattr(model, "reset_rope_"):  # (a Transformer; other models have no RoPE tables)
        model.reset_rope_(info.device)


def store_nf4_flat(model: nn.Module, info: DistInfo) -> int:
    """QLoRA under torchrun, before ``fully_shard``: every NF4 layer keeps its bytes as one
    frozen Parameter (``Linear4bit.store_flat_``), so that FSDP shards the 4-bit base like any
    other frozen weight (each rank holds 1 / N of it, a block's layers are gathered for its
    forward and backward) and ``materialize_from_rank0`` broadcasts rank 0's bytes into the
    shards. Returns the number of NF4 layers (0 without them); every rank calls it (a
    collective). Rank 0 quantized (or read a bitsandbytes checkpoint) while the others built the
    dense structure on the meta device: each of rank 0's ``Linear4bit`` layers replaces the
    ``nn.Linear`` of the same name there (keeping its bias), with a storage of rank 0's layout.

    Rank 0 quantizes and the bytes travel, rather than every rank quantizing while loading:
    host memory holds one dense checkpoint read at a time, not one per rank, the disk is read
    once, and the ranks' weights are identical by construction (also for a pre-quantized
    checkpoint, whose layout only rank 0 has read)."""
    layout = None
    if info.rank == 0:
        layout = []
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                m.store_flat_()
                layout.append((name, m.in_features, m.out_features, m.nf4_layout))
    layout = broadcast_object(layout, info)
    if info.rank == 0:
        return len(layout)
    for name, in_f, out_f, nf4 in layout:
        module = model.get_submodule(name)
        if isinstance(module, Linear4bit):  # built with weights: rank 0's bytes replace them
            module.store_flat_(nf4)
            continue
        if not isinstance(module, nn.Linear):
            raise EmberError(f"{name}: rank 0 has an NF4 layer where this process has a "
                             f"{type(module).__name__}; every process must build the same model")
        shell = Linear4bit(in_f, out_f, bias=False)
        shell.bias = module.bias
        shell.store_flat_(nf4)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, shell)
    return len(layout)


def step_share(window: list, info: DistInfo) -> tuple[list, int]:
    """This rank's items of an optimizer step's ``window`` (its packed batches in the one-process
    order): items r, r + N, ...; and the forward passes every rank makes, ``ceil(len / N)``
    (rank 0's count: a rank with fewer adds passes that count for nothing)."""
    return window[info.rank::info.world_size], len(window[::info.world_size])


def data_state(batches: PackedBatches, batches_per_step: int) -> dict:
    """The data position of the one-process stream every rank follows, for checkpoints:
    ``batches_per_step`` is the global number (grad_accum * world_size)."""
    return {"epoch": batches.epoch, "batches_done": batches.position,
            "batches_per_step": batches_per_step, "fingerprint": batches.fingerprint}


def restore_data_state(batches: PackedBatches, state: dict, batches_per_step: int,
                       processes: int | None = None) -> None:
    """Continue the one-process stream ``batches`` at the batch after ``state`` (any world size,
    as long as the global batches per optimizer step are unchanged). ``processes``: the run's,
    for the hint of a refusal."""
    if state.get("fingerprint") != batches.fingerprint:
        raise EmberError("the dataset or batching settings differ from the checkpoint's, so the "
                         "run cannot resume at the same batch; resume with the same data and "
                         "data.* settings")
    saved = int(state["batches_per_step"])
    if saved != batches_per_step:
        w = processes or 1
        procs = "1 process" if w == 1 else f"{w} processes"
        hint = (f"set grad_accum = {saved // w} for {procs}" if saved % w == 0
                else f"use a process count that divides {saved}")
        raise EmberError(f"the checkpoint took {saved} packed batches per optimizer step "
                         f"(grad_accum x processes), this run takes {batches_per_step}; {hint} "
                         "to continue the same run")
    batches.epoch, batches.position = int(state["epoch"]), int(state["batches_done"])


def all_reduce_sums(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sums over ranks (one collective; float64, exact for token counts)."""
    if not info.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device="cpu" if "gloo" in (info.backend or "") else info.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on some rank (e.g. a stop request)."""
    return all_reduce_sums([1.0 if flag else 0.0], info)[0] > 0


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def rank0_echo(echo, info: DistInfo):
    """``echo`` on rank 0, a no-op elsewhere: only rank 0 prints and writes logs."""
    return echo if info.is_main else (lambda *a, **k: None)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global L2 norm (over all shards) and return the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor: the reduction over shards
        norm = norm.full_tensor()
    return float(norm)


def gather_full_state_dict(model: nn.Module, *, trainable_only: bool = False
                           ) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU on rank 0, None on other ranks; every rank must
    call it (it is a collective). ``trainable_only``: only parameters that require grad (LoRA
    adapters). Keys are the model's usual keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True,
                            ignore_frozen_params=trainable_only)
    reshard_all(model)
    sd = get_model_state_dict(model, options=opts)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}
