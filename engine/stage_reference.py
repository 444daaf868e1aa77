"""DPO's and KTO's reference as a frozen copy of LoRA adapters (``preference_objectives``): a
continued adapter's starting weights (``model.init``, ``engine/stages.py``), or PiSSA / OLoRA's
starting adapters, with which switched off the model is the residual base. The copy is small and
is swapped in for the reference forward, so a continued adapter stays one adapter on the original
base."""

from __future__ import annotations

import contextlib

import torch

from ember import EmberError
from ember.engine.distributed import reshard_all
from ember.models.lora import lora_modules

# the snapshot's entry for what trains besides the adapters (PEFT's modules_to_save, biases)
OTHERS = ""


def adapter_snapshot(model) -> dict[str, dict[str, torch.Tensor]]:
    """Frozen copies of every adapter's tensors (A, B, a DoRA magnitude) and of the other
    trained parameters (a continued adapter's modules_to_save and biases): the starting
    adapter, for the reference."""
    mods = lora_modules(model)
    snap = {
        n: {k: p.detach().clone() for k, p in m.adapter_params().items()} for n, m in mods.items()
    }
    own = {id(p) for m in mods.values() for p in m.adapter_params().values()}
    others = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in own
    }
    if others:
        snap[OTHERS] = others
    return snap


@contextlib.contextmanager
def adapters_swapped(model, snapshot: dict):
    """The model with the snapshot's adapter weights (and other trained parameters) inside the
    block (no gradients, no LoRA dropout: the reference is deterministic), its own weights back
    afterwards, bit for bit."""
    mods = lora_modules(model)
    if set(mods) != set(snapshot) - {OTHERS}:
        raise EmberError("the model's adapters are not those of the reference snapshot")
    # Under FSDP the weights to swap are the shards (what every forward gathers from): a
    # forward without backward leaves the root, and with dist.reshard_after_forward = false
    # every block, holding gathered copies in their place (was: the swap back then failed,
    # DTensor into a plain tensor). A no-op in one process.
    reshard_all(model)
    named = dict(model.named_parameters())
    others = {n: named[n] for n in snapshot.get(OTHERS, {})}
    saved = {}
    with torch.no_grad():
        for n, m in mods.items():
            params = m.adapter_params()
            saved[n] = ({k: p.detach().clone() for k, p in params.items()}, m.dropout)
            for k, p in params.items():
                p.copy_(snapshot[n][k])
            m.dropout = None
        kept = {n: p.detach().clone() for n, p in others.items()}
        for n, p in others.items():
            p.copy_(snapshot[OTHERS][n])
    try:
        yield model
    finally:
        reshard_all(model)  # the reference forward left the root (at least) gathered
        with torch.no_grad():
            for n, m in mods.items():
                for k, p in m.adapter_params().items():
                    p.copy_(saved[n][0][k])
                m.dropout = saved[n][1]
            for n, p in others.items():
                p.copy_(kept[n])
