"""Shared test setup for LoRA on tiny models."""

from __future__ import annotations

import torch

from ember.models.lora import LoRAConfig, apply_lora

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_with_random_b(model, targets=SEVEN) -> None:
    """LoRA r=4 (alpha 8) on ``targets`` with random B (0.1 * N(0, 1)), so the adapters change the
    output (PEFT's init leaves B zero)."""
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape))
