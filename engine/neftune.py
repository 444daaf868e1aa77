"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
training, uniform noise is added to the token embeddings,

    e' = e + U(-m, m),   m = alpha / sqrt(T * D)

with T the sequence length of the row and D the hidden size; evaluation and generation see the
clean embeddings. Ember applies it as transformers' ``neftune_noise_alpha`` does (a forward hook
on the input embedding, active only while the module is in training mode, the same draw from the
global RNG), so with packing T is the packed row's length, as in TRL with ``packing=True``.
Config: ``neftune_noise_alpha`` (the paper and TRL use 5; 0 turns it off).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def add_neftune(embedding: nn.Module, alpha: float):
    """Register the noise hook on ``embedding`` (the model's input embedding module, LoRA
    wrapper included); returns the hook handle (``.remove()`` turns it off)."""

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        m = alpha / math.sqrt(output.shape[1] * output.shape[2])  # output (B, T, D)
        return output + torch.zeros_like(output).uniform_(-m, m)

    return embedding.register_forward_hook(hook)
