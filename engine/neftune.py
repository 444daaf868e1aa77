"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
training, uniform noise is added to the token embeddings,

    e' = e + U(-m, m),   m = alpha / sqrt(T * D)

with T the sequence length of the row and D the hidden size; evaluation and generation see the
clean embeddings. Ember applies it as transformers' ``neftune_noise_alpha`` does (a forward hook
on the input embedding, active only while the module is in training mode, the same draw from the
global RNG), so with packing T is the packed row's length, as in TRL with ``packing=True``.
Config: ``neftune_noise_alpha`` (the paper and TRL use 5; 0 turns it off). Under torchrun each
rank draws from its own RNG stream (``engine/distributed.py``), so the noise, and with it the
losses, differ from one process's run with ``grad_accum * N`` (statistically the same).

Where the noise goes is transformers' embedding module's output. Gemma's (1, 2, 3) module
multiplies by sqrt(hidden) itself (``GemmaTextScaledWordEmbedding``), so the noise is added after
that scale; Granite multiplies by its ``embedding_multiplier`` after the module, so the noise is
scaled with the embeddings. Ember's ``embed`` never scales (the model does, after it), so for the
first kind the hook adds ``noise / scale`` (``neftune_scale``). A prompt-tuned model's virtual
tokens get no noise and do not count in T: PEFT prepends them after the embedding module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def neftune_scale(cfg) -> float:
    """What Ember's model multiplies the embedding module's output by that transformers' own
    embedding module (the one the noise hook sits on) already includes: Gemma's sqrt(hidden),
    not Granite's multiplier (applied after transformers' module); 1 for the other families."""
    scale = getattr(cfg, "embedding_scale", None)
    if scale is None or getattr(cfg, "model_type", None) == "granite":
        return 1.0
    return float(scale)


def add_neftune(embedding: nn.Module, alpha: float, scale: float = 1.0):
    """Register the noise hook on ``embedding`` (the model's input embedding module, LoRA
    wrapper included); returns the hook handle (``.remove()`` turns it off). ``scale``: the
    model's ``neftune_scale``, by which it multiplies this module's output afterwards."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        virtual = module.virtual_mask(inputs[0]) if hasattr(module, "virtual_mask") else None
        T = output.shape[1]  # output (B, T, D)
        if virtual is not None:  # prompt tuning: the real tokens of the longest row
            T = int((~virtual).sum(1).max())
        m = alpha / math.sqrt(max(T, 1) * output.shape[2])
        noise = torch.zeros_like(output).uniform_(-m, m)
        if virtual is not None:
            noise = noise.masked_fill(virtual[..., None], 0.0)
        return output + (noise if scale == 1.0 else noise / scale)

    return embedding.register_forward_hook(hook)


def add_model_neftune(model: nn.Module, alpha: float):
    """``add_neftune`` on ``model.embed`` with the model's ``neftune_scale``."""
    return add_neftune(model.embed, alpha, neftune_scale(model.cfg))
