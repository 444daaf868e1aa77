"""TR-DPO (Gorbatovski et al. 2024; TRL's ``sync_ref_model``): every ``ref_model_sync_steps``
optimizer steps DPO's / KTO's reference becomes ``alpha * policy + (1 - alpha) * reference``
(``ref_model_mixup_alpha``; alpha = 1 is a hard copy), parameter by parameter in the reference's
dtype, as TRL's ``SyncRefModelCallback._sync_target_model`` does
(``ref.mul_(1 - alpha).add_(policy, alpha=alpha)``), after the step whose count is a multiple of
``ref_model_sync_steps`` (its ``on_step_end`` at ``global_step % ref_model_sync_steps == 0``;
one step is one optimizer step, whatever ``grad_accum``).

The reference is built in the policy's weights dtype (``preference_reference``): fp32, as the
masters, under precision bf16 (twice a bf16 copy's memory; under FSDP its fp32 shards are
gathered in bf16 for the forwards, as the policy's), as TRL builds its ``ref_model``; a bf16
reference would drop every update below half a bf16 step (at alpha 0.01 and lr 5e-7 most
weights never move).

Only a full fine-tune's frozen copy can be mixed exactly: a LoRA run's reference is the model
with its adapters off (or a snapshot of the starting adapter), and mixing A and B apart is not
mixing B @ A (``check_sync``). Under torchrun the reference is sharded like the model
(``distributed.shard_frozen``: the same ``fully_shard`` per block, the same process group), so
each rank mixes its own shards, local and exact.

The mixed reference is training state: ``save_reference`` writes it into each checkpoint while
``dcp.save`` builds it (a ``reference/`` folder of DCP shards, hashed by the checkpoint's
manifest and published with the model in the checkpoint's one rename), ``load_reference``
loads it at a resume and refuses a checkpoint without one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ember import EmberError
from ember.engine import dcp
from ember.engine.distributed import DistInfo, barrier, broadcast_object, reshard_all
from ember.engine.preference_configs import check_sync  # noqa: F401  (re-exported)

FOLDER = "reference"  # inside a checkpoint's step_N/
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _name(n: str) -> str:
    for w in _WRAPPERS:
        n = n.replace(w, "")
    return n


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def sync_reference(ref: nn.Module, model: nn.Module, alpha: float) -> None:
    """``ref = alpha * model + (1 - alpha) * ref``, every parameter of ``ref`` from ``model``'s
    of the same name (activation checkpointing / compile wrappers left out of the names), in
    place, shard by shard under FSDP."""
    reshard_all(model)
    reshard_all(ref)
    own = {_name(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, q in ref.named_parameters():
            p = own.get(_name(n))
            if p is None:
                raise EmberError(
                    f"sync_ref_model: the reference's parameter {n!r} has no "
                    "counterpart in the trained model"
                )
            src, dst = _local(p.detach()), _local(q.detach())
            if src.shape != dst.shape:
                raise EmberError(
                    f"sync_ref_model: {n!r} is {tuple(dst.shape)} in the reference "
                    f"and {tuple(src.shape)} in the trained model (on this process): "
                    "they must be sharded alike"
                )
            dst.mul_(1.0 - alpha).add_(src, alpha=alpha)


def _state(ref: nn.Module) -> tuple[dict, bool]:
    """(every parameter of ``ref`` by name, whether it goes through DCP's state-dict API)."""
    if dcp._sharded(ref):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(ref)}, True
    return {"model": {n: p.detach() for n, p in ref.named_parameters()}}, False


def save_reference(step_dir: Path, ref: nn.Module, info: DistInfo) -> Path:
    """Write ``ref``'s weights into ``step_dir``'s ``reference/`` (every rank): DCP shards.
    ``step_dir`` is the checkpoint being written (``dcp.save``'s ``write_more``), so the
    reference is published with the model and optimizer in one rename, or not at all, and the
    checkpoint's manifest hashes its files (a damaged one is skipped like any damaged file)."""
    import torch.distributed.checkpoint as tdcp

    final = Path(step_dir) / FOLDER
    if info.is_main:
        final.mkdir()
    barrier(info)
    state, _ = _state(ref)
    dcp._dcp_call(tdcp.save, state, final)
    barrier(info)
    return final


def load_reference(step_dir: Path, ref: nn.Module, info: DistInfo, section: str) -> None:
    """Load checkpoint ``step_dir``'s mixed reference into ``ref`` (every rank); EmberError when
    the checkpoint holds none (its files' integrity is the checkpoint manifest's, checked before
    the resume chose it)."""
    import torch.distributed.checkpoint as tdcp

    folder = Path(step_dir) / FOLDER
    why = None
    if info.is_main and not (folder / ".metadata").is_file():
        why = f"{FOLDER}/ is missing" if not folder.exists() else f"{FOLDER}/ is incomplete"
    why = broadcast_object(why, info)
    if why is not None:
        raise EmberError(
            f"cannot resume from {step_dir}: {section}.sync_ref_model makes the "
            f"reference training state (mixed with the policy every "
            f"{section}.ref_model_sync_steps steps), and this checkpoint's {why}: "
            "resume from a checkpoint written with it (delete this one to fall back "
            "to the one before), or start a new run with --set run_dir=<new folder>"
        )
    state, sharded = _state(ref)
    dcp._dcp_call(tdcp.load, state, folder)
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(ref, state["model"])
