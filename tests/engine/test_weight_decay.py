"""Which parameters AdamW's weight decay applies to: transformers' Trainer's rule (all but biases
and norms: embeddings, the head and DoRA magnitudes too), for full fine-tuning and for PEFT
LoRA / DoRA adapters on the same model."""

from __future__ import annotations

import re

import pytest
import torch

from ember.engine.config import OptimConfig
from ember.engine.runtime import make_optimizer
from ember.models import LoRAConfig, apply_lora
from ember.models.hf import hf_key_to_ember
from ember.models.loading import load_pretrained

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SUFFIX = {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B",
          "lora_magnitude_vector.default.weight": "lora_magnitude",
          "lora_embedding_A.default": "lora_embedding_A",
          "lora_embedding_B.default": "lora_embedding_B"}


def _ember_name(hf_name: str) -> str:
    name = hf_name.removeprefix("base_model.model.")
    for suffix, ours in SUFFIX.items():
        if name.endswith("." + suffix):
            module = hf_key_to_ember(name[: -len(suffix) - 1] + ".weight")
            return module.removesuffix(".weight") + "." + ours
    return hf_key_to_ember(name)


def _ours(model) -> set[str]:
    opt = make_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in decayed}


def _theirs(hf_model) -> set[str]:
    names = transformers.Trainer.get_decay_parameter_names(None, hf_model)
    trainable = {n for n, p in hf_model.named_parameters() if p.requires_grad}
    return {_ember_name(n) for n in names if n in trainable}


@pytest.mark.parametrize("kind", ["full", "lora", "dora"])
def test_decayed_parameters_are_transformers_trainers(tiny, kind):
    """Ember left the embeddings (full fine-tuning, LoRA on embed_tokens) and DoRA's magnitudes
    out of weight decay, where transformers' Trainer decays all but biases and norms."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model, _ = load_pretrained(tiny["model"], "float32")
    if kind != "full":
        targets = ["q_proj", "v_proj", "down_proj"] + (["embed_tokens"] if kind == "lora" else [])
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     use_dora=kind == "dora"))
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=tuple(targets),
                                     use_dora=kind == "dora"))
    theirs = _theirs(hf)
    assert theirs == _ours(model)
    assert any(re.search(r"embed|lora_magnitude", n) for n in theirs)  # the case at stake
