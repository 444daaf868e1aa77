"""PEFT adapter folders for Ember's LoRA: ``save_adapter`` / ``load_adapter``.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` exactly as
``peft.PeftModel.save_pretrained`` does for a transformers Llama-family model, so
``PeftModel.from_pretrained(hf_model, dir)`` reproduces ember's logits; ``load_adapter`` reads
adapters written by either (per-module ranks/alphas via ``rank_pattern`` / ``alpha_pattern``;
``modules_to_save`` lm_head / embed_tokens of an untied model, or of a tied one saved with
``ensure_weight_tying``, overwrite the model's own weights and are written back by
``save_adapter``; without it a tied model's head is untied first, as PEFT's copies untie it;
so do the biases that ``bias="all"`` / ``"lora_only"`` trained (Phi's LayerNorm and lm_head
biases too) and a modules_to_save lm_head's bias; a
classifier's head travels as PEFT's SEQ_CLS ``modules_to_save``; DoRA's ``use_dora`` with its
``lora_magnitude_vector`` per module). Fields
that would change what an adapter computes (other LoRA variants, base-changing inits, unknown
fields) are refused by name. On a multimodal Gemma 3's language model (``cfg.extra["multimodal"]``)
the names are those inside ``Gemma3ForConditionalGeneration``
(``base_model.model.model.language_model.layers.{i}...``, target_modules a regex that leaves the
vision tower out); ``load_adapter`` reads both that and the 4.5x ``language_model.model.`` layout,
and refuses adapters on the vision tower. Phi-3's fused projections:
``ember.models.lora_fused``. LoRA on ``embed_tokens`` / ``lm_head`` (``ember.models.lora_embed``;
keys and tied-model rules in ``ember.models.peft_keys``). PEFT's ``target_parameters``: on the
fused expert tensors and routers of mixture-of-experts models, and on any 2-D weight (plain LoRA
math; ``ember.models.peft_moe``). PEFT's ``trainable_token_indices``: the new rows are written
into the embedding / head (``ember.models.peft_tokens``). Rank/alpha patterns are matched
against the module names in the file, the names PEFT saw. Both functions are also importable
from ``ember.models.lora``. Reading, checking and writing the folder itself:
``ember.models.peft_files``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.hf_config_export import check_classifier_exportable
from ember.models.lora import (
    EMBED_HEAD,
    HF_LINEAR_LEAVES,
    LoRAEmbedding,
    LoRALinear,
    _candidates,
    _features,
    _natural_key,
    _set_module,
    check_embed_head,
    dense_base_weight,
    lora_modules,
    tied_lm,
)
from ember.models.lora_fused import (
    GROUPS,
    fuse_adapter,
    fuse_magnitudes,
    fused_module_name,
    is_fused,
    part_names,
    split_adapter,
)
from ember.models.lora_init import converted_adapter, lora_scale
from ember.models.lora_layer import configured_dropout
from ember.models.peft_bias import (
    _adapter_biases,
    _bias_tensors,
    _saved_unchanged_embedding,
)
from ember.models.peft_files import (  # noqa: F401  (re-exported)
    _FULL_WEIGHTS,
    _MERGE_HINT,
    ADAPTER_WEIGHTS,
    HEAD_KEY,
    HEAD_MODULES,
    LORA_DEFAULTS,
    _read_adapter,
    _read_adapter_config,
    _saved_modules,
    _validate_config,
    _write_adapter,
    check_field_types,
    default_targets,
    full_weights,
    full_weights_view,
    rank_alpha,
    untie_head,
)
from ember.models.peft_keys import (  # noqa: F401  (re-exported)
    _EMBER_NAME,
    _MAGNITUDE_KEY,
    _PEFT_KEY,
    _VISION,
    _multimodal,
    ember_module_name,
    hf_module_name,
    lora_keys,
    seen_module_name,
    split_tied_head,
    tied_head_tensors,
)
from ember.models.peft_moe import (
    check_dense_mlps,
    expert_modules,
    expert_tensors,
    is_all_linear,
    is_linear_router,
    router_modules,
    router_tensors,
    split_expert_adapter,
)
from ember.models.peft_tokens import (
    apply_trainable_tokens,
    load_trainable_tokens,
    trainable_tokens_tensors,
)


def _base_row_norms(model: nn.Module):
    """hf module name -> its (unadapted) weight's row norms, fp32 (NF4 dequantized)."""
    cfg = getattr(model, "cfg", None)
    by_hf = {hf_module_name(n, cfg): m for n, m in model.named_modules()
             if _EMBER_NAME.fullmatch(n) and n.endswith("_proj")}
    return lambda name: torch.linalg.norm(dense_base_weight(by_hf[name]), dim=1)


def check_peft_exportable(model: nn.Module) -> None:
    """Raise the EmberError ``save_adapter`` would raise for a mixture-of-experts model's adapters
    that PEFT cannot hold (see ``ember.models.peft_moe``), before any training."""
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "num_experts", 0):
        return
    mods = lora_modules(model)
    experts, routers = expert_modules(mods), router_modules(mods, cfg)
    if experts:
        expert_tensors(experts, cfg.num_experts)
    router_tensors(routers)
    check_dense_mlps([n for n in mods if n not in experts and n not in routers], cfg)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT 0.21 does."""
    mods = lora_modules(model)
    if not mods:
        raise EmberError("the model has no LoRA adapters to save (apply_lora or load_adapter "
                         "first)")
    cfg = getattr(model, "cfg", None)
    if getattr(model, "score", None) is not None and cfg is not None:
        check_classifier_exportable(cfg, "save a PEFT adapter of")
    rslora = {m.use_rslora for m in mods.values()}
    drops = {configured_dropout(m) for m in mods.values()}  # (also one a run turned off)
    dora = {m.use_dora for m in mods.values()}
    experts = expert_modules(mods)  # MoE experts: PEFT's target_parameters (ember.models.peft_moe)
    expert_sd, expert_targets, expert_ranks, expert_alphas = expert_tensors(
        experts, cfg.num_experts) if experts else ({}, [], {}, {})
    routers = router_modules(mods, cfg)  # target_parameters too: "...mlp.gate.weight"
    router_sd, router_targets, router_ranks, router_alphas = router_tensors(routers)
    expert_sd, expert_targets = {**expert_sd, **router_sd}, expert_targets + router_targets
    expert_ranks = {**expert_ranks, **router_ranks}
    expert_alphas = {**expert_alphas, **router_alphas}
    experts = {**experts, **routers}
    mods = {n: m for n, m in mods.items() if n not in experts}
    check_dense_mlps(mods, cfg)
    hf = {n: hf_module_name(n, cfg) for n in mods}
    if len(rslora) > 1 or len(drops) > 1 or len(dora) > 1:
        raise EmberError("PEFT's format needs one use_rslora, one use_dora and one dropout for "
                         "all adapters")
    use_dora = dora.pop()
    entries = {hf[n]: tuple(p.detach() for p in m.adapter_params().values())[:2]
               + (m.rank, m.alpha) for n, m in mods.items()}
    base_init = getattr(model, "peft_base_init", None)
    if base_init is not None:  # PiSSA / OLoRA: a rank-2r plain LoRA on the original base
        entries = {hf[n]: converted_adapter(*entries[hf[n]][:2], base_init.get(n), m.rank,
                                            m.alpha, m.use_rslora) for n, m in mods.items()}
    fused = is_fused(getattr(model, "cfg", None))
    mags = {hf[n]: m.lora_magnitude.detach() for n, m in mods.items()} if use_dora else {}
    if fused:  # Phi-3: PEFT sees qkv_proj / gate_up_proj
        entries = fuse_adapter(entries, model.cfg, next(iter(rslora)))
        if use_dora:
            mags = fuse_magnitudes(mags, _base_row_norms(model), model.cfg)
    tensors = {k: t.to("cpu").contiguous() for h, (A, B, _, _) in entries.items()
               for k, t in zip(lora_keys(h), (A, B), strict=True)}
    embed = mods.get("embed")
    ties = isinstance(embed, LoRAEmbedding) and embed.ties_head and tied_lm(model)
    if ties:  # PEFT's ensure_weight_tying: the head's adapter is the embedding's, transposed
        tensors.update(tied_head_tensors(*entries[hf["embed"]][:2]))
    tensors.update({f"base_model.model.{h}.lora_magnitude_vector": v.to("cpu").contiguous()
                    for h, v in mags.items()})
    r, alpha = Counter(e[2:] for e in entries.values()).most_common(1)[0][0] if entries else (
        next(iter(experts.values())).rank, next(iter(experts.values())).alpha)
    rank_pattern = {re.escape(h): e[2] for h, e in entries.items() if e[2] != r}
    alpha_pattern = {re.escape(h): e[3] for h, e in entries.items() if e[3] != alpha}
    if ties and entries[hf["embed"]][2:] != (r, alpha):  # PEFT's tied head: patterns by its name
        rank_pattern["lm_head"], alpha_pattern["lm_head"] = entries[hf["embed"]][2:]
    rank_pattern.update({k: v for k, v in expert_ranks.items() if v != r})
    alpha_pattern.update({k: v for k, v in expert_alphas.items() if v != alpha})
    tensors.update({k: t.to("cpu").contiguous() for k, t in expert_sd.items()})
    # A leaf-name list is what PEFT writes and reads back best; it is exact only when every
    # projection with that leaf name is wrapped, otherwise list the modules as one full regex.
    leaves = sorted({n.split(".")[-1] for n in mods})
    same_leaf = [n for n in _candidates(model) if n.split(".")[-1] in leaves and n not in mods]
    targets = (sorted({h.split(".")[-1] for h in entries}) if not (same_leaf or fused)
               else "|".join(re.escape(h) for h in entries)) if entries else None
    if _multimodal(cfg) and not same_leaf:
        # Leaf names would also match the vision tower's q_proj / k_proj / v_proj: one regex
        # over the language model's layers instead.
        layers = [n for n in leaves if n not in EMBED_HEAD]
        targets = "|".join([re.escape(hf[n]) for n in EMBED_HEAD if n in mods]
                           + [r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\."
                              f"(?:{'|'.join(layers)})"] * bool(layers))
    mts = sorted(getattr(model, "peft_modules_to_save", ()))  # set by load_adapter
    full_key = {n: f"base_model.model.{hf_module_name(a, cfg)}.weight"  # the names PEFT will see
                for n, (_, a) in _FULL_WEIGHTS.items()}
    for name in mts:
        attr = _FULL_WEIGHTS[name][1]
        tensors[full_key[name]] = getattr(model, attr).weight.detach().to("cpu").contiguous()
        if attr == "lm_head" and getattr(model, "head_bias", None) is not None:  # Phi's
            tensors["base_model.model.lm_head.bias"] = model.head_bias.detach().cpu().contiguous()
    tied = (bool(mts) and tied_lm(model)) or ties
    bias = getattr(model, "peft_bias", "none")  # set by load_adapter
    tensors.update(_bias_tensors(model, bias))
    if tied and mts:  # ensure_weight_tying: the one trained embedding, saved as the head too
        tensors[full_key["lm_head"]] = tensors[full_key["embed_tokens"]].clone()
    config = {
        "alpha_pattern": alpha_pattern, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": bias,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        # a continued MiCA adapter stays one: PEFT then keeps its B frozen (engine/stages.py)
        "init_lora_weights": getattr(model, "peft_init_lora_weights", True),
        "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": drops.pop(), "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": mts or None, "peft_type": "LORA",
        "r": r, "rank_pattern": rank_pattern, "revision": None, "target_modules": targets,
        "task_type": "CAUSAL_LM", "use_dora": use_dora, "use_rslora": rslora.pop(),
        "ensure_weight_tying": bool(tied),
    }
    if expert_targets:
        config["target_parameters"] = expert_targets
    indices, token_rows = trainable_tokens_tensors(model)
    if indices is not None:
        config["trainable_token_indices"] = indices
        tensors.update(token_rows)
    if getattr(model, "score", None) is not None:
        # A classifier: PEFT's SEQ_CLS format, the whole head saved as modules_to_save.
        config.update(task_type="SEQ_CLS", modules_to_save=sorted({*mts, *HEAD_MODULES}))
        tensors[HEAD_KEY] = model.score.weight.detach().to("cpu").contiguous()
    return _write_adapter(out_dir, config, tensors)


def _peft_targets(config: dict, hf_name: str) -> bool:
    """PEFT's check_target_module_exists (list / regex targets, exclude_modules, layer indices)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, hf_name):
        return False
    if isinstance(exclude, list) and any(hf_name == e or hf_name.endswith("." + e)
                                         for e in exclude):
        return False
    # a module PEFT trains whole (modules_to_save) never also gets an adapter
    if any(re.match(rf"(^|.*\.){m}($|\..*)", hf_name) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    # PEFT expands the string "all-linear" (any case) to the model's linears but the head
    if is_all_linear(targets):
        return hf_name.split(".")[-1] in (*HF_LINEAR_LEAVES,
                                          *(g.rpartition(".")[2] for g in GROUPS))
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_name) is not None
    if not targets:
        return False
    if hf_name in targets:  # named in full: targeted whatever layers_to_transform says
        return True
    if not any(hf_name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    # the first numbered segment (not an expert index after it), or the one after a
    # layers_pattern (str or list of regexes) when one is set
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    m = None if patterns else re.match(r".*?\.[^.]*\.(\d+)\.", hf_name)
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", hf_name)
        if m is not None:
            break
    return m is not None and int(m[1]) in layers


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Wrap the modules an adapter (ember's or PEFT's) targets and load its weights.

    The weights file decides which modules get adapters; ranks come from the tensor shapes and
    are checked against ``r`` / ``rank_pattern``; alphas from ``lora_alpha`` / ``alpha_pattern``.
    Modules already wrapped (e.g. resuming training) get their weights overwritten; a model with
    adapters on modules the file has none for is refused. Everything else is frozen, as after
    ``apply_lora``.

    All or nothing: an adapter that fails its checks leaves the model as it was (a tied head
    that the adapter would untie stays tied, no module stays wrapped).
    """
    modules = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers))
               for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        return _load_adapter(model, Path(adapter_dir))
    except BaseException:
        # the checks all come before the first weight is written: undoing the changes of
        # structure (untie_head, wrapped modules, config, flags) restores the model
        for m, attrs, children, params, buffers in modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for now, saved in ((m._modules, children), (m._parameters, params),
                               (m._buffers, buffers)):
                now.clear()
                now.update(saved)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise


def _load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    config, tensors = _read_adapter(adapter_dir)
    config = {**LORA_DEFAULTS, **config}  # fields PEFT's LoraConfig fills in when left out
    where = adapter_dir / "adapter_config.json"
    check_field_types(config, where)
    by_params = bool(config.get("target_parameters"))
    if by_params:  # LoRA on parameters, MoE experts: ember.models.peft_moe
        tensors, config = split_expert_adapter(tensors, config, getattr(model, "cfg", None))
    _validate_config(config, where, tensors)
    cfg = getattr(model, "cfg", None)
    defaulted = None  # PEFT fills in target_modules by model type: the file must match them
    if config.get("target_modules") is None and not by_params and cfg is not None:
        defaulted = getattr(cfg, "extra", {}).get("multimodal") or cfg.model_type
        config["target_modules"] = default_targets(defaulted, where)
    use_dora = bool(config.get("use_dora"))
    fused = []  # Phi-3's qkv_proj / gate_up_proj in the file: their parts share PEFT's one A
    if is_fused(getattr(model, "cfg", None)):
        fused = sorted({m[1] for k in tensors if (m := _PEFT_KEY.fullmatch(k))
                        and len(part_names(m[1])) > 1})
        tensors, config = split_adapter(tensors, config, model.cfg)
    wfile = next(adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file())
    head = _adapter_head(model, config, tensors, wfile)
    tensors = full_weights_view(tensors)  # a multimodal Gemma 3's names for them too
    full = full_weights(model, config, tensors, wfile)  # may untie a tied model's head
    tokens = load_trainable_tokens(model, config, tensors, wfile)  # ember.models.peft_tokens
    biases = _adapter_biases(model, config, tensors, wfile)
    cands = _candidates(model)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[str, str] = {}
    unknown = []
    for key, t in tensors.items():
        if _saved_unchanged_embedding(model, key, t):
            continue  # save_embedding_layers=True: a copy of the base's own weight
        m = _PEFT_KEY.fullmatch(key)
        mag = None if m else _MAGNITUDE_KEY.fullmatch(key)
        name = ember_module_name((m or mag)[1]) if m or mag else None
        if name is None or (name not in cands and name != "lm_head"):
            unknown.append(key)
            continue
        kind = m[2].replace("embedding_", "") if m else "lora_magnitude"
        pairs.setdefault(name, {})[kind] = t
        seen.setdefault(name, (m or mag)[1])  # the name PEFT matched rank/alpha patterns on
    vision = [k for k in unknown if _VISION.match(k.removeprefix("base_model.model."))]
    if vision:
        raise EmberError(f"{wfile}: the adapter changes the vision tower or projector of a "
                         f"multimodal model ({vision[:3]}); Ember trains and loads the language "
                         f"model only; {_MERGE_HINT}")
    heads = [k for k in unknown if re.search(r"\.(embed_tokens|lm_head)\.", k)]
    if heads:
        raise EmberError(f"{wfile}: the adapter replaces the embedding or output head ({heads[:3]}:"
                         " new full weights saved with save_embedding_layers, e.g. a resized or "
                         f"trained vocabulary), which ember's LoRA cannot hold; {_MERGE_HINT}")
    if "lm_head" in pairs and tied_lm(model) and not config.get("ensure_weight_tying"):
        # PEFT's own adapter on the head of a tied model: the head's update is not the
        # embedding's, so the model's head is untied (a copy of the embedding) to hold both
        untie_head(model)
        cands = _candidates(model)
    ties = split_tied_head(pairs, config, tied_lm(model), wfile)
    if "lm_head" in pairs and "lm_head" not in cands:
        raise EmberError(f"{wfile}: the adapter has LoRA on lm_head but the model has no output "
                         "head (a classifier); load it onto a causal LM")
    check_embed_head(pairs, use_dora=use_dora, where=str(wfile), hint=_MERGE_HINT, tied=bool(ties))
    if unknown:
        raise EmberError(f"{wfile}: {len(unknown)} keys match no projection of this model, e.g. "
                         f"{unknown[:3]} (expected base_model.model.model.layers.N.self_attn."
                         "q_proj.lora_A.weight; is it an adapter for a different model?)")
    if not pairs:
        raise EmberError(f"{wfile}: no LoRA weights in the file")
    incomplete = [n for n, p in pairs.items() if "lora_A" not in p or "lora_B" not in p]
    if incomplete:
        raise EmberError(f"{wfile}: lora_A or lora_B missing for {incomplete[:3]}")
    cfg = getattr(model, "cfg", None)
    odd = [hf_module_name(n, cfg) for n, p in pairs.items() if ("lora_magnitude" in p) != use_dora]
    if odd:
        raise EmberError(f"{wfile}: adapter_config has use_dora={use_dora} but "
                         f"lora_magnitude_vector is {'missing' if use_dora else 'present'} for "
                         f"{odd[:3]}")
    # Phi-3: PEFT matched target_modules against the fused qkv_proj / gate_up_proj names
    missing = [n for n in cands if n not in pairs and (_EMBER_NAME.fullmatch(n) or n == "embed")
               and _peft_targets(config, fused_module_name(seen_module_name(n, seen, cfg),
                                                           cfg))]
    if missing:
        names = [hf_module_name(n, cfg) for n in missing[:3]]
        raise EmberError(f"{wfile}: adapter_config targets {len(missing)} modules with no "
                         f"weights in the file, e.g. {names}" + _defaulted_note(config, defaulted))
    # and the converse: PEFT builds adapters from the config alone and drops other weights
    # (matched by the names in the file, those PEFT saw: a bare model's are "layers.0....")
    extra = [seen[n] for n in pairs if config.get("target_modules")
             and not by_params and _EMBER_NAME.fullmatch(n)
             and not _peft_targets(config, fused_module_name(seen[n], cfg))
             and not is_linear_router(n, config, cfg)]
    if extra:
        raise EmberError(f"{wfile}: the file has LoRA weights for {len(extra)} modules that "
                         "adapter_config does not target (target_modules, layers_to_transform, "
                         f"exclude_modules), e.g. {extra[:3]}; PEFT would drop them: fix the "
                         "config or the file so they agree" + _defaulted_note(config, defaulted))
    dropout, rslora = float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora"))
    plan = {}
    for name in sorted(pairs, key=_natural_key):
        A, B = pairs[name]["lora_A"], pairs[name]["lora_B"]
        hf = hf_module_name(name, cfg)
        mod = cands[name]
        base = mod.base if isinstance(mod, (LoRALinear, LoRAEmbedding)) else mod
        in_f, out_f = base.weight.shape if name == "embed" else _features(base)
        r, alpha = rank_alpha(config, seen.get(name, hf))
        if A.ndim != 2 or B.ndim != 2 or A.shape != (r, in_f) or B.shape != (out_f, r):
            raise EmberError(f"{wfile}: {hf}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                             f"do not fit this model, expected ({r}, {in_f}) / ({out_f}, {r}) "
                             "(rank from adapter_config r/rank_pattern)" + _trained_on(config))
        if isinstance(mod, (LoRALinear, LoRAEmbedding)) and (
                mod.rank != r or mod.use_dora != use_dora):
            raise EmberError(f"{name} already has a rank-{mod.rank} adapter (use_dora="
                             f"{mod.use_dora}); the file has rank {r} (use_dora={use_dora})")
        mag = pairs[name].get("lora_magnitude")
        if mag is not None and tuple(mag.shape) != (out_f,):
            raise EmberError(f"{wfile}: {hf}: lora_magnitude_vector {tuple(mag.shape)} does not "
                             f"fit this model, expected ({out_f},)")
        plan[name] = (A, B, mag, r, float(alpha))
    stale = sorted(set(lora_modules(model)) - set(plan), key=_natural_key)
    if stale:
        raise EmberError(f"{wfile}: the model already has LoRA adapters on {stale[:3]} "
                         f"({len(stale)} modules) that this adapter does not have, which would "
                         "stay in place; load it onto a fresh base model (or merge_lora first)")
    if ties and "embed" in plan:
        _check_tied_head_scale(plan["embed"][3:], config, cfg, wfile)
    if not lora_modules(model):
        for p in model.parameters():
            p.requires_grad_(False)
    with torch.no_grad():
        for attr, t in full.items():
            getattr(model, attr).weight.copy_(t)
    apply_trainable_tokens(model, tokens)
    if full:
        model.peft_modules_to_save = {n for n, (_, a) in _FULL_WEIGHTS.items() if a in full}
    if biases and config["bias"] != "none":
        model.peft_bias = config["bias"]  # save_adapter writes them back in this mode
    for name, (A, B, mag, r, alpha) in plan.items():
        mod = model.get_submodule(name)
        if isinstance(mod, (LoRALinear, LoRAEmbedding)):
            mod.alpha, mod.scale = alpha, lora_scale(r, alpha, rslora)
        elif name == "embed":
            mod = LoRAEmbedding(mod, r, alpha, dropout=dropout, use_rslora=rslora,
                                padding_idx=getattr(cfg, "padding_idx", None), use_dora=use_dora)
            _set_module(model, name, mod)
        else:
            mod = LoRALinear(mod, r, alpha, dropout=dropout, use_rslora=rslora,
                             use_dora=use_dora)
            _set_module(model, name, mod)
        if isinstance(mod, LoRAEmbedding):
            mod.ties_head = bool(ties)
        with torch.no_grad():
            for p, t in zip(mod.adapter_params().values(), (A, B), strict=False):
                p.copy_(t)
            if mag is not None:
                mod.lora_magnitude.copy_(mag)
    for name in fused:
        # one lora_A Parameter for the parts, as PEFT's fused module has one: its gradient is
        # the sum of theirs and a continued adapter trains as PEFT's (and saves at rank r)
        parts = [model.get_submodule(ember_module_name(p)) for p in part_names(name)]
        for mod in parts[1:]:
            mod.lora_A = parts[0].lora_A
    with torch.no_grad():
        for p, b in biases.items():
            p.copy_(b)
    if head is not None:
        with torch.no_grad():
            model.score.weight.copy_(head)
        model.score.weight.requires_grad_(True)  # trains with the adapters (modules_to_save)
    return model


def _trained_on(config: dict) -> str:
    """The model an adapter names as its base, for an error about weights that do not fit."""
    base = config.get("base_model_name_or_path")
    return (f"; is it an adapter for another model? Its adapter_config.json names "
            f"base_model_name_or_path = {base!r}: load it onto that model" if base else "")


def _defaulted_note(config: dict, model_type: str | None) -> str:
    if model_type is None:
        return ""
    return (f" (adapter_config has no target_modules: PEFT then targets {config['target_modules']}"
            f", its defaults for model_type {model_type!r}; add the target_modules the adapter "
            "was trained with)")


def _check_tied_head_scale(embed_ra: tuple, config: dict, cfg, wfile: Path) -> None:
    """PEFT's ensure_weight_tying head reuses the embedding's A and B but takes its scale from
    its own name, ``lm_head``, in rank_pattern / alpha_pattern; Ember's one tied adapter has one
    scale, so a pattern that sets the embedding apart from the head is refused."""
    rslora, head = bool(config.get("use_rslora")), hf_module_name("lm_head", cfg)
    r_h, a_h = rank_alpha(config, head)
    emb, hd = lora_scale(*embed_ra, rslora), lora_scale(r_h, a_h, rslora)
    if not math.isclose(emb, hd, rel_tol=1e-6):
        raise EmberError(f"{wfile}: with ensure_weight_tying PEFT scales the tied lm_head's update "
                         f"by {hd:g} (r={r_h}, alpha={a_h} for 'lm_head' in rank_pattern / "
                         f"alpha_pattern) and the embedding's by {emb:g}; Ember's tied adapter "
                         "has one scale, so this adapter is not supported")


def _adapter_head(model: nn.Module, config: dict, tensors: dict, wfile: Path):
    """The classifier head weight of a SEQ_CLS adapter (removed from ``tensors``), or None."""
    score = getattr(model, "score", None)
    task = config.get("task_type")
    if task in ("TOKEN_CLS", "QUESTION_ANS") and any(
            k.startswith(("base_model.model.score.", "base_model.model.classifier.",
                          "base_model.model.qa_outputs.")) for k in tensors):
        raise EmberError(f"{wfile}: task_type {task!r}: the adapter's head labels every token "
                         "(or answer span), where Ember's classification head scores the whole "
                         "sequence (SEQ_CLS); Ember loads LoRA adapters of causal LMs and "
                         "sequence classifiers only")
    head = tensors.pop(HEAD_KEY, None)
    if head is None and config.get("task_type") == "SEQ_CLS" and score is not None:
        raise EmberError(f"{wfile}: a SEQ_CLS adapter without {HEAD_KEY}; its classifier head "
                         "was not saved (modules_to_save)")
    if head is None:
        return None
    if score is None:
        raise EmberError(f"{wfile}: the adapter holds a classification head ({HEAD_KEY}) but "
                         "the model has none: load the base as a classifier (an HF "
                         "*ForSequenceClassification folder, or ember.models.heads."
                         "add_classification_head)")
    if tuple(head.shape) != tuple(score.weight.shape):
        raise EmberError(f"{wfile}: {HEAD_KEY} has shape {tuple(head.shape)}, the model's head "
                         f"{tuple(score.weight.shape)} (a different number of labels)")
    return head
