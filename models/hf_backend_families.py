"""The families ``ember.models.hf_backend.accelerate`` swaps kernels into, and how it finds their
modules: ``Family`` (what sets a family's modules apart, as its transformers modeling file reads
it), ``FAMILIES`` / ``SUPPORTED``, ``find_causal_lm`` (the causal LM inside a PEFT model) and the
module matcher ``_is``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ember import EmberError


@dataclass(frozen=True)
class Family:
    """What sets a family's modules apart, as its transformers modeling file reads it."""

    act_key: str = "hidden_act"  # config field the MLP's activation is read from
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), rounds once; eps in .eps
    attn_softcap: bool = False  # Gemma 2 passes its attention's attn_logit_softcapping (3 does not)
    final_softcap: bool = False  # logits = c * tanh(logits / c), c = final_logit_softcapping
    logits_scaling: bool = False  # Granite: logits / config.logits_scaling
    # Mistral, Phi-3: the attention reads config.sliding_window (no module attribute). Other
    # families without the attribute have no window, whatever stray field their config carries.
    config_window: bool = False


_GEMMA2 = Family("hidden_activation", True, attn_softcap=True, final_softcap=True)
FAMILIES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(config_window=True),
    "Qwen2ForCausalLM": Family(),
    "Qwen3ForCausalLM": Family(),
    "GemmaForCausalLM": Family(gemma_norm=True),
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": Family("hidden_activation", True, final_softcap=True),
    "Phi3ForCausalLM": Family(config_window=True),
    # SmolLM3: NoPE layers (the module's use_rope); Granite: the multipliers stay in HF's layer
    # and model code, the softmax scale is the module's scaling; OLMo2: full-width q/k norms
    "SmolLM3ForCausalLM": Family(),
    "GraniteForCausalLM": Family(logits_scaling=True),
    "Olmo2ForCausalLM": Family(),
    "Olmo3ForCausalLM": Family(),  # OLMo2's plus the module's window; RoPE per layer type in HF's
}
SUPPORTED = tuple(FAMILIES)


# ------------------------------------------------------------------------------ finding modules
def _family(m: nn.Module) -> str | None:
    for cls in type(m).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers."):
            return cls.__name__
    return None


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The supported transformers causal LM in ``model`` (itself, or inside PEFT wrappers)."""
    if not isinstance(model, nn.Module):
        raise EmberError(f"accelerate() takes a transformers model instance, got "
                         f"{type(model).__name__}")
    # modules() is self first, then depth-first: PeftModel -> LoraModel -> *ForCausalLM.
    for m in model.modules():
        if _family(m) is not None:
            return m
    multimodal = ("; multimodal models (ForConditionalGeneration) are not swapped: load the text "
                  "model alone (e.g. Gemma3ForCausalLM)" if any(
                      type(m).__name__.endswith("ForConditionalGeneration")
                      for m in model.modules()) else "")
    if any(type(m).__name__.endswith("SparseMoeBlock") for m in model.modules()):
        multimodal += ("; mixture-of-experts models (Mixtral, Qwen2/3-MoE) are not swapped, "
                       "their experts are not plain MLPs")
    raise EmberError(f"accelerate(): {type(model).__name__} is not a supported model; Ember swaps "
                     f"kernels into {', '.join(SUPPORTED)} instances (or a PEFT model wrapping "
                     f"one){multimodal}. Load the model with one of those classes, or train it "
                     "with Ember natively (ember.models.load_pretrained)")


def _is(m: nn.Module, suffix: str, *attrs: str, one_of: tuple[tuple[str, ...], ...] = ((),)
        ) -> bool:
    """``m``'s class name ends with ``suffix``, it has every attr and all attrs of one ``one_of``
    alternative (separate projections, or Phi-3's fused ones)."""
    return (type(m).__name__.endswith(suffix) and all(hasattr(m, a) for a in attrs)
            and any(all(hasattr(m, a) for a in alt) for alt in one_of))
