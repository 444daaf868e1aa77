"""Turning a model's dropout off for a run, as TRL's preference trainers do (``disable_dropout``,
default on in DPOConfig, CPOConfig, ORPOConfig and KTOConfig): TRL's
``disable_dropout_in_model`` sets ``p = 0`` on every ``torch.nn.Dropout`` module after the PEFT
wrapping, so PEFT's ``lora_dropout`` and modules such as Phi's ``resid_dropout`` /
``embed_dropout`` draw nothing. transformers applies ``attention_dropout`` functionally (a float
on the attention module, ``dropout=0.0 if not self.training else self.attention_dropout``), not
through an ``nn.Dropout``, so TRL leaves it on: so does this (``model.attention_dropout = 0``
turns it off).

Ember's forwards read their dropout from the modules: a LoRA module's ``dropout`` (None: none
drawn, and the fused LoRA kernels run), a block's ``resid_dropout``, the model's
``embed_dropout``; this sets those, leaving ``model.cfg`` (and so an exported config.json) and a
LoRA module's exported ``lora_dropout`` as configured, as TRL's saved configs keep theirs."""

from __future__ import annotations

import torch.nn as nn

from ember.models.lora_embed import LoRAEmbedding
from ember.models.lora_layer import LoRALinear
from ember.models.transformer import Block, Transformer


def disable_dropout_(model: nn.Module) -> list[str]:
    """Turn off, in place, every dropout ``model`` draws in training forwards except attention
    dropout (see the module docstring); returns what was on, e.g. ``["LoRA dropout 0.05"]``."""
    off: dict[str, set[float]] = {}
    for m in model.modules():
        if isinstance(m, (LoRALinear, LoRAEmbedding)) and m.dropout is not None:
            off.setdefault("LoRA dropout", set()).add(m.dropout.p)
            # PEFT's adapter_config.json keeps the configured lora_dropout (TRL changes the
            # module, not the config): save_adapter writes this
            m.export_dropout = m.dropout.p
            m.dropout = None
        if isinstance(m, Block) and m.resid_dropout:
            off.setdefault("residual dropout", set()).add(m.resid_dropout)
            m.resid_dropout = 0.0
        if isinstance(m, Transformer) and m.embed_dropout:
            off.setdefault("embedding dropout", set()).add(m.embed_dropout)
            m.embed_dropout = 0.0
    for m in model.modules():  # any other (a transformers module's): TRL's rule, verbatim
        if isinstance(m, nn.Dropout) and m.p:
            off.setdefault("dropout", set()).add(m.p)
            m.p = 0.0
    return [f"{what} {'/'.join(f'{p:g}' for p in sorted(ps))}" for what, ps in off.items()]
