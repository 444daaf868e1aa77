"""Context extension: fine-tune a model on sequences longer than it was trained for by scaling
its RoPE frequencies, as transformers' ``rope_scaling`` does ("linear": position interpolation,
Chen et al. 2023; "yarn": Peng et al. 2023, frequencies ramped between interpolation and
extrapolation, attention scaled by ``0.1 ln(factor) + 1``).

``extend_context(model, kind, factor)`` sets ``rope_scaling`` on the model's config with the
model's current context as ``original_max_position_embeddings``, multiplies
``max_position_embeddings`` by ``factor`` and rebuilds the RoPE tables, in place. Exported
folders carry the scaling in config.json, so transformers (and a later Ember load) run the model
as it was trained. A PEFT adapter has no place for it: load its base with the same
``rope_scaling`` (transformers: set ``config.rope_parameters`` before loading). A model that
already has a RoPE scaling (Llama 3.1's "llama3", LongRoPE, a YaRN checkpoint) is refused: the
two would not compose. So is Phi-3 (transformers' Phi-3 takes LongRoPE only), and YaRN on a
partially rotary model (Phi-1/2 take "linear", over their rotary width, as transformers does).
"""

from __future__ import annotations

import math

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling
from ember.models.hf_rope import yarn_mscale

KINDS = ("linear", "yarn")


def extended_config(cfg: ModelConfig, kind: str, factor: float) -> ModelConfig:
    """``cfg`` with its context scaled by ``factor`` (see the module docstring); the same config
    when it already carries exactly this scaling (a folder exported after such a run)."""
    if kind not in KINDS:
        raise EmberError(f"RoPE scaling {kind!r} is not supported for context extension; use one "
                         f"of {', '.join(KINDS)}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            1 < factor < math.inf):
        raise EmberError(f"the context extension factor must be > 1 (a finite number), "
                         f"got {factor!r}")
    rs = cfg.rope_scaling
    if rs is not None:
        if rs.kind == kind and rs.factor == factor:
            return cfg
        raise EmberError(f"the model already scales RoPE ({rs.kind}, factor {rs.factor:g}, "
                         f"context {cfg.max_position_embeddings}); a second scaling would not "
                         "compose with it: drop model.rope_scaling")
    if cfg.model_type == "phi3":
        raise EmberError("context extension of Phi-3 is not supported: transformers' Phi-3 takes "
                         "no RoPE scaling but LongRoPE, so the model could not be exported; use "
                         "a Phi-3 checkpoint with LongRoPE (Phi-3.5-mini, Phi-4-mini)")
    if cfg.partial_rotary_factor != 1.0 and kind == "yarn":
        raise EmberError("YaRN context extension on a partially rotary model is not supported; "
                         "use model.rope_scaling = \"linear\"")
    orig = cfg.max_position_embeddings
    scaling = RopeScaling(kind=kind, factor=float(factor), original_max_position_embeddings=orig,
                          attention_factor=yarn_mscale(factor) if kind == "yarn" else 1.0)
    return cfg.replace(rope_scaling=scaling, max_position_embeddings=int(orig * factor))


def set_config_(model, new: ModelConfig) -> None:
    """Give ``model`` (an Ember ``Transformer``) and every module sharing its config ``new``."""
    old = model.cfg
    for m in model.modules():  # the blocks hold the same config object
        if getattr(m, "cfg", None) is old:
            m.cfg = new


def extend_context(model, kind: str, factor: float):
    """Apply ``extended_config`` to ``model`` (an Ember ``Transformer``) in place; returns it."""
    new = extended_config(model.cfg, kind, factor)
    if new is model.cfg:
        return model
    set_config_(model, new)
    model.reset_rope_(model.inv_freq.device)
    return model
