"""LoRA adapters for ``Transformer``: wrap (``apply_lora``), train, save/load in PEFT's format,
merge (``merge_lora``).

The layer and its math (LoRA, DoRA) are ``ember.models.lora_layer.LoRALinear``; ``LoRAConfig``
and the resolution of its targets to module names are in ``ember.models.lora_targets``. Both are
re-exported here, as are ``save_adapter`` / ``load_adapter`` (``ember.models.peft_adapter``).

State-dict layout. ``apply_lora`` replaces e.g. ``layers.0.attn.q_proj`` (an ``nn.Linear``, or an
NF4 ``Linear4bit`` exposing ``quant_weight`` / ``bias`` / ``in_features`` / ``out_features``) by a
``LoRALinear`` whose children are the original module as ``base`` and two parameters, so keys are::

    layers.0.attn.q_proj.base.weight   (frozen base weight, still reachable)
    layers.0.attn.q_proj.base.bias     (when the projection has one)
    layers.0.attn.q_proj.lora_A        (r, in)
    layers.0.attn.q_proj.lora_B        (out, r)
    layers.0.attn.q_proj.lora_magnitude   (out,), DoRA only

``base_state_dict(model)`` gives the un-wrapped keys (``layers.0.attn.q_proj.weight``) for code
that writes base checkpoints; ``merge_lora`` folds the adapters in and restores plain modules.

The token embedding (``embed``, PEFT's ``embed_tokens``) takes a ``LoRAEmbedding`` and the output
head (``lm_head``) a ``LoRALinear`` whose update reaches the fused loss through
``Transformer.head_operands``; on a tied model one embedding adapter serves both (PEFT's
``ensure_weight_tying``): ``ember.models.lora_embed``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.lora_embed import LoRAEmbedding
from ember.models.lora_init import (
    _NITER,
    changes_base,
    rng_state,
    set_rng_state,
    skip_lowrank_draw,
)
from ember.models.lora_layer import (  # noqa: F401  (re-exported: their old home)
    LoRALinear,
    _base_weight,
    _features,
    _is_linear,
    dense_base_weight,
)
from ember.models.lora_targets import (  # noqa: F401  (re-exported: their old home)
    _LINEAR_LEAVES,
    ALL_LINEAR,
    EMBED_HEAD,
    HF_LINEAR_LEAVES,
    SHORT_TARGETS,
    LoRAConfig,
    _candidates,
    _natural_key,
    _target_matches,
    check_embed_head,
    resolve_targets,
    tied_lm,
)
from ember.models.peft_files import untie_head

# QPiSSA's source: (the Ember weight keys wanted) -> their (key, full-precision tensor)
DenseWeights = Callable[[Collection[str]], Iterable[tuple[str, torch.Tensor]]]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def apply_lora(model: nn.Module, cfg: LoRAConfig, *,
               dense_weights: DenseWeights | None = None
               ) -> nn.Module:
    """Freeze every parameter and wrap the targeted projections in ``LoRALinear`` (the token
    embedding in a ``LoRAEmbedding``; on a tied model it adapts the head too).

    ``dense_weights(keys)``: ``(key, tensor)`` of the full-precision weights ``keys`` an NF4
    model was quantized from (``lambda keys: ember.models.loading.iter_dense_weights(folder,
    keys)``), which PiSSA on an NF4 base (QPiSSA) decomposes; read once, one tensor at a time
    (the whole dense model is never held). ``pissa_niter_K`` draws as on a dense base: module
    by module in the model's order. All or nothing: when it raises (a refusal at a late module,
    a PiSSA failure, an interrupt), the model is as it was (modules, weights, requires_grad)."""
    if lora_modules(model):
        raise EmberError("the model already has LoRA adapters; merge_lora() it first or start "
                         "from a fresh base model")
    names = resolve_targets(model, cfg.targets)
    check_embed_head(names, use_dora=cfg.use_dora, where="lora.targets", tied=tied_lm(model))
    if changes_base(cfg.init):
        check_base_changing(model, cfg.init, names)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    wrapped: list[tuple[str, nn.Module, dict]] = []
    try:
        _apply_lora(model, cfg, names, dense_weights, wrapped)
    except BaseException:
        # a half-wrapped model (its first modules' bases replaced by PiSSA's residual) cannot be
        # retried ("already has LoRA adapters") nor used as the base it was
        for name, base, state in reversed(wrapped):
            base.__dict__.clear()
            base.__dict__.update(state)
            _set_module(model, name, base)
        for p, grad in grads:
            p.requires_grad_(grad)
        raise
    return model


def _module_state(m: nn.Module) -> dict:
    """``m``'s attributes with its own parameter / buffer / submodule tables copied: what
    PiSSA's residual (a new weight Parameter, an NF4 weight set anew) replaces, to put back."""
    return {**m.__dict__, **{k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers",
                                                               "_modules")}}


def _apply_lora(model: nn.Module, cfg: LoRAConfig, names: list[str],
                dense_weights: DenseWeights | None,
                wrapped: list[tuple[str, nn.Module, dict]]) -> None:
    """``apply_lora``'s wrapping; each module replaced is appended to ``wrapped`` (its name,
    the base module and the base's state before) first."""
    for p in model.parameters():
        p.requires_grad_(False)
    pad = getattr(getattr(model, "cfg", None), "padding_idx", None)  # transformers' padding_idx

    def wrap(name: str, dense: torch.Tensor | None = None) -> None:
        base = model.get_submodule(name)
        wrapped.append((name, base, _module_state(base)))
        if name == "embed":
            mod = LoRAEmbedding(base, cfg.rank, cfg.alpha, use_rslora=cfg.use_rslora,
                                dropout=cfg.dropout, ties_head=tied_lm(model), padding_idx=pad,
                                use_dora=cfg.use_dora)
        else:
            mod = LoRALinear(base, cfg.rank, cfg.alpha, dropout=cfg.dropout,
                             use_rslora=cfg.use_rslora, init=cfg.init, use_dora=cfg.use_dora,
                             dense_weight=dense)
        _set_module(model, name, mod)

    qpissa = {f"{n}.weight": n for n in names if cfg.init.startswith("pissa")
              and _loaded_nf4(model.get_submodule(n))}
    # pissa_niter_K draws from the global RNG: the other modules are wrapped in module order (as
    # PEFT and the dense path draw) and the RNG is advanced past each QPiSSA module's draw, whose
    # RNG state is kept for when its dense weight comes in (the checkpoint's order)
    draws = {}
    for name in names:
        if f"{name}.weight" not in qpissa:
            wrap(name)
        elif dense_weights is not None and _NITER.fullmatch(cfg.init):
            q = model.get_submodule(name).quant_weight
            draws[name] = rng_state(q.device)
            skip_lowrank_draw(tuple(q.shape), cfg.rank, q.device)
    if qpissa and dense_weights is not None:
        cuda = {d for n in qpissa.values()
                if (d := model.get_submodule(n).quant_weight.device).type == "cuda"}
        # each module's draw replayed from its kept state; the RNG then left past them all
        with torch.random.fork_rng(devices=sorted(cuda, key=str)):
            # each tensor freed before the next is read; only the decomposed modules' are read
            for key, t in dense_weights(frozenset(qpissa)):
                if key in qpissa:
                    name = qpissa.pop(key)
                    if name in draws:
                        set_rng_state(model.get_submodule(name).quant_weight.device,
                                      draws[name])
                    wrap(name, t)
        if qpissa:
            raise EmberError(f"lora.init {cfg.init!r}: the full-precision weights have no "
                             f"{sorted(qpissa)[:3]}: not the model the NF4 one was quantized "
                             "from")
    for name in qpissa.values():  # no dense weights: LoRALinear refuses, saying what to do
        wrap(name)
    if changes_base(cfg.init):
        # The starting adapters, for the export as a plain LoRA on the original base
        # (ember.models.lora_init), kept in host memory; a model attribute named peft_* travels
        # to an FSDP export.
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)

        model.peft_base_init = {n: (host(m.lora_A), host(m.lora_B))
                                for n, m in lora_modules(model).items()
                                if isinstance(m, LoRALinear)}


def _loaded_nf4(m: nn.Module) -> bool:
    q = getattr(m, "quant_weight", None)
    return q is not None and q.device.type != "meta"


def check_base_changing(model: nn.Module, init: str, names: list[str]) -> None:
    """EmberError for the models and targets a PiSSA / OLoRA init is not built for."""
    from ember.models.peft_moe import EXPERT, ROUTER

    cfg = getattr(model, "cfg", None)
    why = None
    if getattr(cfg, "model_type", None) == "phi3":
        why = ("on Phi-3: PEFT decomposes the fused qkv_proj / gate_up_proj, Ember's projections "
               "are separate, so the starting adapters would differ from PEFT's")
    elif getattr(cfg, "num_experts", 0) and any(EXPERT.fullmatch(n) or ROUTER.fullmatch(n)
                                                for n in names):
        why = ("on the experts and routers: their adapters are PEFT's target_parameters, "
               "decomposed per fused expert tensor there; target the attention only")
    if why is not None:
        raise EmberError(f"lora.init {init!r} is not supported {why} (or use lora.init = "
                         "'kaiming')")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in m.adapter_params().values()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, ember names (``layers.0.attn.q_proj.lora_A``)."""
    return {f"{n}.{k}": p.detach() for n, m in lora_modules(model).items()
            for k, p in m.adapter_params().items()}


def base_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters and with un-wrapped names
    (``layers.0.attn.q_proj.base.weight`` -> ``layers.0.attn.q_proj.weight``); ``keep_vars``:
    the parameters themselves (``state_dict(keep_vars=True)``)."""
    wrapped = tuple(f"{n}." for n in lora_modules(model))
    out = {}
    for k, v in model.state_dict(keep_vars=keep_vars).items():
        pre = next((w for w in wrapped if k.startswith(w)), None)
        if pre is None:
            out[k] = v
        elif k.startswith(pre + "base."):
            out[pre + k[len(pre) + 5:]] = v
    return out


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold ``scale * B @ A`` (DoRA: and the magnitude) into each base weight and put plain
    modules back; biases are unchanged.

    An ``nn.Linear`` base keeps its dtype (unless ``dtype``); an NF4 base is dequantized into a new
    ``nn.Linear`` in ``dtype`` (default fp32). The result has the original state-dict names (plus
    ``lm_head`` on a tied model whose embedding alone was adapted: it is untied).
    """
    mods = lora_modules(model)
    model.__dict__.pop("peft_base_init", None)  # merged: the residual + B A is W + dW
    embed = mods.get("embed")
    if isinstance(embed, LoRAEmbedding) and not embed.ties_head and tied_lm(model):
        # The adapter changes the embedding of a tied model but not its head (PEFT without
        # ensure_weight_tying): the head becomes its own copy of the base matrix, and the model
        # exports untied with the adapted model's logits (PEFT's merge adds the update to the
        # one shared matrix, which changes the head too).
        untie_head(model)
    for name, m in mods.items():
        base = m.base
        if isinstance(m, LoRAEmbedding):
            merged = m.merged_weight(dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)
            _set_module(model, name, base)
            continue
        # a MoE expert's adapter is PEFT's target_parameters (ParamWrapper), whose merge rounds
        # the update to the weight's dtype first
        merged = m.merged_weight(dtype, round_update=".experts." in f".{name}.")
        if isinstance(base, nn.Linear) and merged.dtype == base.weight.dtype:
            with torch.no_grad():
                base.weight.copy_(merged)
            new = base
        else:
            bias = base.bias
            new = nn.Linear(m.in_features, m.out_features, bias=bias is not None,
                            device=merged.device, dtype=merged.dtype)
            with torch.no_grad():
                new.weight.copy_(merged)
                if bias is not None:
                    new.bias.copy_(bias.detach().to(merged.dtype))
            new.requires_grad_(False)
        _set_module(model, name, new)
    return model


# PEFT adapter folders live in ember.models.peft_adapter (imported last: it builds on the above).
from ember.models.peft_adapter import (  # noqa: E402, F401
    HEAD_KEY,
    HEAD_MODULES,
    _read_adapter,
    _write_adapter,
    ember_module_name,
    hf_module_name,
    load_adapter,
    save_adapter,
)
