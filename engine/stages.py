"""Sequential stages: a run that starts from a previous run's result (``model.init``).

``model.init`` names a previous run directory (its ``final/`` output is used) or a PEFT adapter
folder (LoRA or prompt tuning, ember's or PEFT's). ``model.name`` stays the *base* model, and
must be the one the previous stage was trained on (checked; see ``same_base``). What the new stage
starts from, by the previous result's kind (rows) and this stage's ``method`` (columns):

    =============  ==============================  ============================  ===============
    previous       lora                            full                          prompt
    =============  ==============================  ============================  ===============
    LoRA adapter   continue training that adapter  base + adapter merged         error
    full model     new adapter on its weights      continue from its weights     new prompt on it
    prompt         error                           error                         continue prompt
    =============  ==============================  ============================  ===============

Continuing an adapter keeps its rank, alpha, rsLoRA and target modules: ``resolve_start`` writes
them into the resolved config. A ``[lora]`` setting the config leaves out takes the adapter's
value; one the config sets to another value is an error, even when it is the default (e.g.
``rank = 16`` on a rank-8 adapter); ``lora.dropout`` and ``lora.embedding_lr``, training
settings, may change. A continued prompt keeps its ``num_virtual_tokens`` the same way. A LoRA
or prompt run's context extension (``model.rope_scaling``, ``rope_factor``) carries over the
same way: its adapter applies to the base so scaled.

Only weights carry over: each stage is a new run whose optimizer (AdamW's moments), learning-rate
schedule (warmup included), data position and RNG start afresh, as a transformers ``Trainer``
started on the previous stage's output does (``--resume`` is what continues one run exactly).

DPO after an earlier stage: the reference is the stage's *starting* model, i.e. the previous
stage's result (the usual practice: the SFT model). With full fine-tuning it is a frozen copy of
the starting weights; with LoRA and no earlier adapter it is the model with adapters switched
off (the base, or the previous full model); with a continued LoRA adapter the reference is the
adapter as loaded, kept as a frozen copy of its (small) weights and swapped in for the reference
forward (``engine/stage_reference.py``). So a continued adapter stays one adapter on the original
base: ``final/adapter`` of every stage applies to ``model.name`` directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine.fingerprint import weights_fingerprint
from ember.engine.stage_reference import (  # noqa: F401 (importable from here, as before)
    OTHERS,
    adapter_snapshot,
    adapters_swapped,
)
from ember.engine.stage_start import (  # noqa: F401 (importable from here, as before)
    Start,
    base_of,
    find_start,
    same_base,
    start_of,
)
from ember.models.lora import (
    SHORT_TARGETS,
    LoRAConfig,
    _natural_key,
    _read_adapter,
    ember_module_name,
    load_adapter,
    lora_modules,
    merge_lora,
    resolve_targets,
)
from ember.models.lora_fused import part_names
from ember.models.lora_init import changes_base, lora_scale
from ember.models.peft_adapter import _PEFT_KEY, LORA_DEFAULTS
from ember.models.peft_files import _FULL_WEIGHTS
from ember.models.peft_tokens import train_trainable_tokens

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig


# --- LoRA settings of a continued adapter --------------------------------------------------------


def _adapter_modules(start: Start) -> list[str]:
    _, tensors = _read_adapter(start.adapter)
    # Phi-3's fused qkv_proj / gate_up_proj: load_adapter adapts their parts
    names = {ember_module_name(p) for k in tensors if (m := _PEFT_KEY.fullmatch(k))
             for p in part_names(m[1])}
    return sorted((n for n in names if n is not None), key=_natural_key)


_EXPERT_LEAVES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _adapter_lora(start: Start) -> LoRAConfig:
    # r / lora_alpha left out: PEFT's LoraConfig defaults, as load_adapter takes them
    c = {**LORA_DEFAULTS, **start.adapter_config}
    where = start.adapter / "adapter_config.json"
    # Ember's own adapter on MoE experts: PEFT's fused gate_up_proj at rank 2r (alpha 2a) in the
    # patterns, which load_adapter splits back into rank-r gate and up adapters; whether the
    # loaded modules share one rank and alpha is checked once they are (continue_adapters)
    params = set(c.get("target_parameters") or [])
    if any(k.replace("\\", "") not in params
           for f in ("rank_pattern", "alpha_pattern") for k in c.get(f) or {}):
        raise EmberError(
            f"model.init: {where} has per-module ranks or alphas (rank_pattern / "
            "alpha_pattern), which a [lora] config cannot express; continue an "
            "adapter with one rank and alpha"
        )
    targets = c.get("target_modules")
    leaves = set(SHORT_TARGETS.values())
    if (
        isinstance(targets, list)
        and targets
        and set(targets) <= leaves
        and not c.get("layers_to_transform")
        and not c.get("exclude_modules")
    ):
        targets = tuple(sorted(targets))  # PEFT semantics: every module with these names
    else:
        targets = tuple(_adapter_modules(start))  # exactly the modules the file holds
    if params and isinstance(targets, tuple) and set(targets) <= leaves:
        # the experts' fused parameters, as Ember's leaf names (gate_up_proj: gate and up)
        experts = [_EXPERT_LEAVES.get(p.rpartition(".experts.")[2]) for p in params]
        if all(experts):
            targets = tuple(sorted({*targets, *(leaf for e in experts for leaf in e)}))
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise EmberError(f"model.init: {where}: r and lora_alpha must be numbers")
    return LoRAConfig(
        rank=r,
        alpha=float(alpha),
        targets=targets,
        use_rslora=bool(c.get("use_rslora")),
        use_dora=bool(c.get("use_dora")),
        dropout=float(c.get("lora_dropout") or 0.0),
    )


def _same_targets(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return {SHORT_TARGETS.get(t, t) for t in a} == {SHORT_TARGETS.get(t, t) for t in b}


def resolve_start(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the [lora] settings of the adapter it continues (``resolve`` calls it)."""
    if cfg.model.init is None:
        return cfg
    if Path(cfg.model.init).resolve() == Path(cfg.out_dir).resolve():
        raise EmberError(
            f"model.init {cfg.model.init!r} is this run's own run_dir: a stage writes a new run; "
            "give it another run_dir (to continue that run itself: --resume, without model.init)"
        )
    start = start_of(cfg)
    cfg = _resolve_context(cfg, start)
    if cfg.method == "prompt" and start.kind == "prompt":
        return _resolve_prompt(cfg, start)
    if not (cfg.method == "lora" and start.kind == "lora"):
        return cfg
    if changes_base(cfg.lora.init):  # was: ignored, the continued adapter trained as it was
        raise EmberError(
            f"lora.init = {cfg.lora.init!r} starts new adapters from the base weights; the "
            f"adapter continued from model.init {start.source!r} keeps its own: remove lora.init "
            "from the config"
        )
    from ember.engine.config import given_keys

    have, default, given = _adapter_lora(start), LoRAConfig(), given_keys(cfg.lora)

    def chosen(f: str) -> bool:  # set in the config (or, for a config built in code, not default)
        return f in given if given is not None else getattr(cfg.lora, f) != getattr(default, f)

    for f in ("rank", "alpha", "use_rslora", "use_dora", "targets"):
        mine, theirs = getattr(cfg.lora, f), getattr(have, f)
        same = _same_targets(mine, theirs) if f == "targets" else mine == theirs
        if chosen(f) and not same:
            raise EmberError(
                f"lora.{f} = {mine!r} conflicts with the adapter continued from "
                f"model.init {start.source!r} ({f} {theirs!r}); a continued adapter "
                f"keeps its shape: remove lora.{f} from the config (or set it to "
                f"{json.dumps(list(theirs) if isinstance(theirs, tuple) else theirs)})"
            )
    keep = {f: getattr(cfg.lora if chosen(f) else have, f) for f in ("dropout", "targets")}
    # embedding_lr, a training setting no adapter file records, is the config's (was: dropped)
    return cfg.replace(lora=replace(have, **keep, init=cfg.lora.init,
                                    embedding_lr=cfg.lora.embedding_lr))


def _resolve_context(cfg: TrainConfig, start: Start) -> TrainConfig:
    """An adapter of a run with ``model.rope_scaling`` applies to its base with that scaling
    (a full run's ``final/model`` carries it in config.json): the stage takes it when its config
    leaves it out (was: the adapter continued or merged on the unscaled base, silently not the
    earlier result), and a config that sets another one is an error."""
    if start.context is None:
        return cfg
    mine = (cfg.model.rope_scaling, cfg.model.rope_factor)
    if mine[0] is None:
        kind, factor = start.context
        return cfg.replace(model=replace(cfg.model, rope_scaling=kind, rope_factor=factor))
    if mine != start.context:
        kind, factor = start.context
        raise EmberError(
            f"model.rope_scaling = {mine[0]!r}, rope_factor = {mine[1]:g} conflicts with "
            f"model.init {start.source!r}, whose adapter was trained with rope_scaling = "
            f"{kind!r}, rope_factor = {factor:g}; remove them from the config (the stage "
            "keeps that scaling) or set the same"
        )
    return cfg


def _resolve_prompt(cfg: TrainConfig, start: Start) -> TrainConfig:
    """A continued prompt keeps its number of virtual tokens (PEFT's ``num_virtual_tokens``):
    the resolved config records it; a config that sets another number is an error."""
    from ember.engine.config import given_keys
    from ember.models.prompt_tuning import PromptTuningConfig

    n = start.adapter_config.get("num_virtual_tokens")
    where = start.adapter / "adapter_config.json"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EmberError(f"model.init: {where}: num_virtual_tokens must be a whole number >= 1, "
                         f"got {n!r}")
    mine, given = cfg.prompt_tuning.num_virtual_tokens, given_keys(cfg.prompt_tuning)
    default = PromptTuningConfig().num_virtual_tokens
    chosen = ("num_virtual_tokens" in given) if given is not None else mine != default
    if chosen and mine != n:
        raise EmberError(
            f"prompt_tuning.num_virtual_tokens = {mine} conflicts with the prompt continued from "
            f"model.init {start.source!r} ({n} virtual tokens); a continued prompt keeps its "
            f"length: remove prompt_tuning.num_virtual_tokens from the config (or set it to {n})"
        )
    return cfg.replace(prompt_tuning=replace(cfg.prompt_tuning, num_virtual_tokens=n))


# --- building the starting model -----------------------------------------------------------------


def _load_lora(model, start: Start) -> None:
    try:
        load_adapter(model, start.adapter)
    except EmberError as e:
        raise EmberError(
            f"model.init {start.source!r}: {e} (was it trained on another base "
            "model than model.name?)"
        ) from None


def continue_adapters(model, cfg: TrainConfig, tokenizer, start: Start) -> None:
    """Apply ``start``'s adapter to ``model`` (loaded from ``start.base``) as ``cfg.method``
    trains it: a LoRA adapter continued or merged, a prompt continued."""
    from ember.models.prompt_tuning import load_prompt_adapter

    if start.kind == "prompt":
        try:
            load_prompt_adapter(model, start.adapter)
        except EmberError as e:
            raise EmberError(f"model.init {start.source!r}: {e}") from None
        return
    if start.kind != "lora":
        return
    _load_lora(model, start)
    if cfg.method != "lora":  # full fine-tuning of the merged weights
        merge_lora(model)
        return
    mods = lora_modules(model)
    scale = lora_scale(cfg.lora.rank, cfg.lora.alpha, cfg.lora.use_rslora)
    odd = sorted(n for n, m in mods.items() if m.rank != cfg.lora.rank
                 or not math.isclose(m.scale, scale, rel_tol=1e-6))
    if odd:
        raise EmberError(
            f"model.init {start.source!r}: the adapter has per-module ranks or alphas (e.g. "
            f"{odd[0]}: rank {mods[odd[0]].rank}, alpha {mods[odd[0]].alpha:g}; adapter_config "
            f"r = {cfg.lora.rank}, lora_alpha = {cfg.lora.alpha:g}), which a [lora] config "
            "cannot express; continue an adapter with one rank and alpha"
        )
    if sorted(mods, key=_natural_key) != resolve_targets(model, cfg.lora.targets):
        raise EmberError(
            f"lora.targets {list(cfg.lora.targets)} select other modules than the "
            f"adapter continued from model.init {start.source!r} has; remove "
            "lora.targets from the config"
        )
    p = cfg.lora.dropout
    for m in mods.values():
        m.dropout = torch.nn.Dropout(p) if p > 0 else None
    _train_saved_modules(model, mods, start.adapter_config.get("bias") or "none")
    init = start.adapter_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        # PEFT's MiCA variant trains A only: B stays the base weight's minor singular vectors
        model.peft_init_lora_weights = "mica"  # and the exported adapter says so (save_adapter)
        for m in mods.values():
            for name in ("lora_B", "lora_embedding_B"):
                if hasattr(m, name):
                    getattr(m, name).requires_grad_(False)


def _train_saved_modules(model, mods: dict, mode: str) -> None:
    """What PEFT trains of a continued adapter besides A and B (``is_trainable``): its
    ``modules_to_save`` (a whole lm_head / embed_tokens), its ``trainable_token_indices`` rows
    and, with ``bias = "all"``, every bias (``"lora_only"``: those of the adapted modules),
    which the final adapter then holds."""
    for name in getattr(model, "peft_modules_to_save", ()):
        getattr(model, _FULL_WEIGHTS[name][1]).weight.requires_grad_(True)
    train_trainable_tokens(model)  # trainable_token_indices: those rows only
    if mode in ("all", "lora_only"):
        model.peft_bias = mode  # save_adapter writes the trained biases
    for n, p in model.named_parameters():
        owner = n.rpartition(".base.")[0]
        if n.endswith("bias") and (mode == "all" or (mode == "lora_only" and owner in mods)):
            p.requires_grad_(True)


def load_base(cfg: TrainConfig, name, dtype: str, device: str, **kw):
    """``load_pretrained(name, ...)`` with the run's context extension (``model.rope_scaling``)
    and ``model.attention_dropout`` applied: every path that rebuilds a run's model goes through
    here."""
    from ember.models.context import extend_context, set_config_
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(name, dtype, device, **kw)
    if cfg.model.rope_scaling is not None:
        extend_context(model, cfg.model.rope_scaling, cfg.model.rope_factor)
    drop = cfg.model.attention_dropout
    if drop is not None and hasattr(model, "cfg") and drop != model.cfg.attention_dropout:
        set_config_(model, model.cfg.replace(attention_dropout=drop))
    return model, tok


def load_start(cfg: TrainConfig, dtype: str, device: str):
    """(model, tokenizer, started): the model ``cfg`` starts from; ``started`` is True when the
    method's adapters are already on it (a continued adapter or prompt)."""
    from ember.engine.classification import attach_head  # here: it imports objectives -> stages

    start = None if cfg.model.init is None else start_of(cfg)
    base = cfg.model.name if start is None else start.base
    model, tok = load_base(cfg, base, dtype, device, quantize=cfg.model.quantize,
                           double_quant=cfg.model.double_quant)
    model.ember_base_print = weights_fingerprint(model)  # as loaded: what final/base.json holds
    # [head]: before LoRA / freezing, and before a continued adapter, which may carry the head.
    attach_head(model, cfg, tok)
    if start is None:
        return model, tok, False
    continue_adapters(model, cfg, tok, start)
    return model, tok, start.kind == cfg.method


def frozen_start(cfg: TrainConfig, device: str, dtype: str | None = None):
    """The starting model for forwards only (DPO's reference with full fine-tuning): eval mode,
    no gradients, weights in ``dtype`` (default: the autocast dtype)."""
    if dtype is None:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.precision, "float32")
    model, _, _ = load_start(cfg, dtype, device)
    return model.requires_grad_(False).eval()


def continues_lora(cfg: TrainConfig) -> bool:
    """True when the run trains an adapter loaded from ``model.init``."""
    return cfg.model.init is not None and cfg.method == "lora" and start_of(cfg).kind == "lora"


def describe(cfg: TrainConfig) -> str:
    """One line for the run's log: what the stage starts from."""
    start = start_of(cfg)
    what = {
        ("lora", "lora"): f"continuing its LoRA adapter (r={cfg.lora.rank}, "
        f"alpha={cfg.lora.alpha:g}) on {start.base}",
        ("lora", "full"): f"its LoRA adapter merged into {start.base}",
        ("prompt", "prompt"): f"continuing its prompt on {start.base}",
    }.get((start.kind, cfg.method), f"the weights of {start.base}")
    ref = (f"; the {cfg.objective.upper()} reference is this starting model"
           if cfg.objective in ("dpo", "kto") else "")
    return f"starting from model.init {start.source}: {what}{ref}"
