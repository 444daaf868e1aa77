"""LoRA adapters for ``Transformer``: wrap, train, save/load in PEFT's format, merge.

A wrapped projection computes ``y = x W^T + b + scale * (dropout(x) A^T) B^T`` through
``ember.kernels.lora_linear`` (the one call site the fused / NF4 kernels plug into), with
``A`` (r, in), ``B`` (out, r) and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

State-dict layout. ``apply_lora`` replaces e.g. ``layers.0.attn.q_proj`` (an ``nn.Linear``, or an
NF4 ``Linear4bit`` exposing ``quant_weight`` / ``bias`` / ``in_features`` / ``out_features``) by a
``LoRALinear`` whose children are the original module as ``base`` and two parameters, so keys are::

    layers.0.attn.q_proj.base.weight   (frozen base weight, still reachable)
    layers.0.attn.q_proj.base.bias     (when the projection has one)
    layers.0.attn.q_proj.lora_A        (r, in)
    layers.0.attn.q_proj.lora_B        (out, r)

``base_state_dict(model)`` gives the un-wrapped keys (``layers.0.attn.q_proj.weight``) for code
that writes base checkpoints; ``merge_lora`` folds the adapters in and restores plain modules.

PEFT interop. ``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` exactly as
``peft.PeftModel.save_pretrained`` does for a transformers Llama-family model, so
``PeftModel.from_pretrained(hf_model, dir)`` reproduces ember's logits; ``load_adapter`` reads
adapters written by either (per-module ranks/alphas via ``rank_pattern`` / ``alpha_pattern``;
``modules_to_save`` lm_head / embed_tokens of an untied model overwrite the model's own weights
and are written back by ``save_adapter``). Phi-3's fused projections: ``ember.models.lora_fused``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.kernels import lora_linear
from ember.models.lora_fused import fuse_adapter, is_fused, split_adapter

SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ALL_LINEAR = tuple(SHORT_TARGETS)


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """``targets``: short names (q k v o gate up down), module leaf names (``q_proj``),
    ``"all-linear"``, or glob / regex patterns on full module names (``layers.1[0-9].mlp.*``)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    init: str = "kaiming"  # "kaiming" (PEFT's default) | "gaussian"; B is zero either way

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise EmberError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise EmberError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise EmberError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise EmberError(f"lora.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise EmberError(f"lora.targets must be a non-empty list of names, "
                             f"got {self.targets!r}")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or hasattr(m, "quant_weight")


def _features(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    out_f, in_f = base.quant_weight.shape
    return int(in_f), int(out_f)


def _base_weight(base: nn.Module):
    return base.quant_weight if hasattr(base, "quant_weight") else base.weight


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or an NF4 Linear4bit, got {type(base)}")
        in_f, out_f = _features(base)
        device = _base_weight(base).device
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        # Adapters train in fp32 even over a bf16/NF4 base (PEFT's autocast_adapter_dtype).
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.reset_lora(init)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def reset_lora(self, init: str = "kaiming") -> None:
        """A random, B zero: the wrapped model computes exactly what the base did."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_x = self.dropout(x) if self.dropout is not None and self.training else None
        return lora_linear(x, _base_weight(self.base), self.lora_A, self.lora_B, self.scale,
                           self.base.bias, lora_x=lora_x)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scale * B @ A, computed in fp32, returned in ``dtype`` (default: the base's)."""
        w = _base_weight(self.base)
        if isinstance(w, torch.Tensor):
            dtype = dtype or w.dtype
            dense = w.detach().float()
        else:
            dtype = dtype or torch.float32
            dense = w.dequantize(torch.float32)
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return (dense + delta).to(dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, "
                f"dropout={self.dropout.p if self.dropout is not None else 0.0}")


# --- target resolution ---------------------------------------------------------------------------

def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear projections (wrapped ones by their wrapper's name), never a wrapper's ``.base``."""
    return {n: m for n, m in model.named_modules()
            if n and (_is_linear(m) or isinstance(m, LoRALinear)) and not n.endswith(".base")}


def _target_matches(target: str, name: str) -> bool:
    if target == "all-linear":
        return name.split(".")[-1] in SHORT_TARGETS.values()
    leaf = SHORT_TARGETS.get(target, target)
    if name == leaf or name.endswith("." + leaf):
        return True
    if fnmatch.fnmatchcase(name, target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full module names selected by ``targets``; errors name the patterns that match nothing."""
    cands = _candidates(model)
    chosen, unmatched = set(), []
    for t in targets:
        hit = [n for n in cands if _target_matches(t, n)]
        if not hit:
            unmatched.append(t)
        chosen.update(hit)
    if unmatched:
        some = ", ".join(sorted(cands)[:8])
        raise EmberError(f"LoRA targets {unmatched} match no linear module; use short names "
                         f"{list(SHORT_TARGETS)}, 'all-linear', or patterns on names like {some}")
    if "lm_head" in chosen:
        raise EmberError("LoRA on lm_head is not supported: the output head is computed by the "
                         "fused loss from model.output_weight; remove it from lora.targets")
    return sorted(chosen, key=_natural_key)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter and wrap the targeted projections in ``LoRALinear``."""
    if lora_modules(model):
        raise EmberError("the model already has LoRA adapters; merge_lora() it first or start "
                         "from a fresh base model")
    names = resolve_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha,
                                            dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                                            init=cfg.init))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, ember names (``layers.0.attn.q_proj.lora_A``)."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in lora_modules(model).items()
            for k in ("lora_A", "lora_B")}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters and with un-wrapped names
    (``layers.0.attn.q_proj.base.weight`` -> ``layers.0.attn.q_proj.weight``)."""
    wrapped = tuple(f"{n}." for n in lora_modules(model))
    out = {}
    for k, v in model.state_dict().items():
        pre = next((w for w in wrapped if k.startswith(w)), None)
        if pre is None:
            out[k] = v
        elif k.startswith(pre + "base."):
            out[pre + k[len(pre) + 5:]] = v
    return out


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold ``scale * B @ A`` into each base weight and put plain modules back.

    An ``nn.Linear`` base keeps its dtype (unless ``dtype``); an NF4 base is dequantized into a new
    ``nn.Linear`` in ``dtype`` (default fp32). The result has the original state-dict names.
    """
    for name, m in lora_modules(model).items():
        merged = m.merged_weight(dtype)
        base = m.base
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


# --- PEFT format ---------------------------------------------------------------------------------

_EMBER_NAME = re.compile(r"layers\.(\d+)\.(attn|mlp)\.(\w+)")
_HF_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
_UNSUPPORTED = {  # PEFT fields ember cannot represent: (field, value meaning "off")
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False,
    "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False,
    # LoRA variants whose forward is not x W^T + scale * x A^T B^T (PEFT 0.21 lora_variants)
    "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
    "velora_config": None, "monteclora_config": None, "kasa_config": None,
}
_MERGEABLE = ("use_dora", "fan_in_fan_out", "lora_bias", "layer_replication",
              "target_parameters", "trainable_token_indices", "use_qalora")
# modules_to_save Ember can hold: PEFT saves the module's trained full weight under this key and
# Ember writes it into the model's own module (the attribute), as PEFT's wrapper replaces it.
_FULL_WEIGHTS = {"lm_head": ("base_model.model.lm_head.weight", "lm_head"),
                 "embed_tokens": ("base_model.model.model.embed_tokens.weight", "embed")}
# PEFT LoraConfig fields that do not change what a saved adapter computes (bookkeeping, training
# options, inits that leave the base model as it is); any other field that is set is refused, so
# an adapter from a newer PEFT with a new variant never loads with the wrong math.
_KNOWN_FIELDS = frozenset("""
    task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode
    r target_modules exclude_modules lora_alpha lora_dropout bias use_rslora init_lora_weights
    layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config megatron_core
    loftq_config eva_config corda_config lora_ga_config qalora_group_size runtime_config
    ensure_weight_tying modules_to_save
""".split()) | set(_UNSUPPORTED)
# inits that change the base weights too: the adapter alone is relative to a modified base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_MERGE_HINT = ("merge it into the base with PEFT (PeftModel.merge_and_unload(), then "
               "save_pretrained) and load the merged model")


def hf_module_name(name: str) -> str:
    """``layers.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj`` (transformers' name)."""
    m = _EMBER_NAME.fullmatch(name)
    if m is None:
        raise EmberError(f"no transformers name for module {name!r}: PEFT export covers the "
                         "attention and MLP projections inside layers")
    part = "self_attn" if m[2] == "attn" else "mlp"
    return f"model.layers.{m[1]}.{part}.{m[3]}"


def ember_module_name(hf_name: str) -> str | None:
    m = _HF_NAME.fullmatch(hf_name)
    if m is None:
        return None
    return f"layers.{m[1]}.{'attn' if m[2] == 'self_attn' else 'mlp'}.{m[3]}"


def _pattern_value(patterns: dict, hf_name: str, default):
    for key, value in patterns.items():  # PEFT's get_pattern_key rule
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT 0.21 does."""
    mods = lora_modules(model)
    if not mods:
        raise EmberError("the model has no LoRA adapters to save (apply_lora or load_adapter "
                         "first)")
    hf = {n: hf_module_name(n) for n in mods}
    rslora = {m.use_rslora for m in mods.values()}
    drops = {m.dropout.p if m.dropout is not None else 0.0 for m in mods.values()}
    if len(rslora) > 1 or len(drops) > 1:
        raise EmberError("PEFT's format needs one use_rslora and one dropout for all adapters")
    entries = {hf[n]: (m.lora_A.detach(), m.lora_B.detach(), m.rank, m.alpha)
               for n, m in mods.items()}
    fused = is_fused(getattr(model, "cfg", None))
    if fused:  # Phi-3: PEFT sees qkv_proj / gate_up_proj
        entries = fuse_adapter(entries, model.cfg, next(iter(rslora)))
    tensors = {f"base_model.model.{h}.{k}.weight": t.to("cpu").contiguous()
               for h, (A, B, _, _) in entries.items() for k, t in (("lora_A", A), ("lora_B", B))}
    r, alpha = Counter(e[2:] for e in entries.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(h): e[2] for h, e in entries.items() if e[2] != r}
    alpha_pattern = {re.escape(h): e[3] for h, e in entries.items() if e[3] != alpha}
    # A leaf-name list is what PEFT writes and reads back best; it is exact only when every
    # projection with that leaf name is wrapped, otherwise list the modules as one full regex.
    leaves = sorted({n.split(".")[-1] for n in mods})
    same_leaf = [n for n in _candidates(model) if n.split(".")[-1] in leaves and n not in mods]
    targets = leaves if not (same_leaf or fused) else "|".join(re.escape(h) for h in entries)
    mts = sorted(getattr(model, "peft_modules_to_save", ()))  # set by load_adapter
    for name in mts:
        key, attr = _FULL_WEIGHTS[name]
        tensors[key] = getattr(model, attr).weight.detach().to("cpu").contiguous()
    config = {
        "alpha_pattern": alpha_pattern, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": drops.pop(), "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": mts or None, "peft_type": "LORA",
        "r": r, "rank_pattern": rank_pattern, "revision": None, "target_modules": targets,
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": rslora.pop(),
    }
    return _write_adapter(out_dir, config, tensors)


def _write_adapter(out_dir, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT adapter folder: adapter_model.safetensors + adapter_config.json, each atomic."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "adapter_model.safetensors",
                  lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "adapter_config.json",
                  lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise EmberError(f"adapter directory {str(adapter_dir)!r} does not exist")
    if not cfg_path.is_file():
        raise EmberError(f"{cfg_path}: missing; an adapter directory holds adapter_config.json "
                         "and adapter_model.safetensors (as written by save_adapter or PEFT)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise EmberError(f"{cfg_path}: expected a JSON object")
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file
            return config, load_file(str(st))
        if pt.is_file():
            return config, torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files surface as many different exception types
        raise EmberError(f"{st if st.is_file() else pt}: cannot read adapter weights "
                         f"({type(e).__name__}: {e})") from None
    raise EmberError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin)")


def _validate_config(config: dict, where: Path, tensors: dict | None = None) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise EmberError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA adapters "
                         "can be loaded")
    for key, off in _UNSUPPORTED.items():
        v = config.get(key, off)
        # A variant's sub-config turns it on even when empty (PEFT builds the dataclass from {}).
        if v not in (off, None, [], False) and (v != {} or key not in _MERGEABLE):
            hint = (_MERGE_HINT if key in _MERGEABLE else "a LoRA variant whose forward differs "
                    "from plain LoRA; ember loads plain LoRA adapters only")
            raise EmberError(f"{where}: {key}={v!r} is not supported by ember's LoRA: {hint}")
    unknown = sorted(k for k, v in config.items()
                     if k not in _KNOWN_FIELDS and v not in (None, False, [], {}, "", 0))
    if unknown:
        raise EmberError(f"{where}: field(s) {unknown} are unknown to ember's LoRA and may change "
                         f"what the adapter computes; {_MERGE_HINT}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise EmberError(f"{where}: init_lora_weights={init!r}: this adapter is relative to a "
                         "modified base model; re-save it with PEFT's "
                         "path_initial_model_for_weight_conversion to get a plain LoRA, or "
                         f"{_MERGE_HINT}")
    mts = config.get("modules_to_save") or []
    if not isinstance(mts, list) or any(m not in _FULL_WEIGHTS for m in mts):
        raise EmberError(f"{where}: modules_to_save={mts!r} is not supported by ember's LoRA (only "
                         f"{sorted(_FULL_WEIGHTS)}): {_MERGE_HINT}")
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise EmberError(f"{where}: bias={bias!r} is not a PEFT bias mode")
    # bias="all"/"lora_only" train the base biases and save them with the adapter; on a model
    # without biases (Llama, Mistral) nothing is saved and the adapter is a plain LoRA.
    biases = sorted(k for k in (tensors or {}) if k.endswith(".bias"))
    if bias != "none" and biases:
        raise EmberError(f"{where}: bias={bias!r}: the adapter carries {len(biases)} trained "
                         f"base biases (e.g. {biases[0]}), which ember's LoRA cannot hold; "
                         f"{_MERGE_HINT}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise EmberError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")


def _peft_targets(config: dict, hf_name: str) -> bool:
    """PEFT's check_target_module_exists (list / regex targets, exclude_modules, layer indices)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, hf_name):
        return False
    if isinstance(exclude, list) and any(hf_name == e or hf_name.endswith("." + e)
                                         for e in exclude):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_name) is not None
    if not targets:
        return False
    if targets == "all-linear" or "all-linear" in targets:
        return hf_name.split(".")[-1] in SHORT_TARGETS.values()
    if not any(hf_name == t or hf_name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    m = re.match(r".*?\.[^.]*\.(\d+)\.", hf_name)
    return m is not None and int(m[1]) in layers


def _saved_unchanged_embedding(model: nn.Module, key: str, t: torch.Tensor) -> bool:
    """A full embedding / head weight PEFT saved (``save_embedding_layers``) equal to the model's:
    loading it (as PEFT does) changes nothing, so it can be skipped."""
    attr = {"base_model.model.model.embed_tokens.weight": "embed",
            "base_model.model.lm_head.weight": "lm_head"}.get(key)
    mod = getattr(model, attr, None) if attr else None
    if mod is None and attr == "lm_head":
        mod = getattr(model, "embed", None)  # tied: the head is the embedding
    w = getattr(mod, "weight", None)
    return (isinstance(w, torch.Tensor) and w.shape == t.shape
            and torch.equal(w.detach().cpu().float(), t.float()))


def _full_weights(model: nn.Module, config: dict, tensors: dict, wfile: Path) -> dict:
    """``{model attribute: weight}`` for modules_to_save (popped from tensors), checked."""
    full = {}
    for name in config.get("modules_to_save") or []:
        key, attr = _FULL_WEIGHTS[name]
        if key not in tensors:
            raise EmberError(f"{wfile}: modules_to_save lists {name} but {key} is missing")
        if getattr(model, "lm_head", 1) is None:
            raise EmberError(f"{wfile}: modules_to_save={name!r} on a model with tied embeddings "
                             f"(PEFT trains a separate copy: unties them) is not supported; "
                             f"{_MERGE_HINT}")
        w = getattr(getattr(model, attr, None), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise EmberError(f"{wfile}: modules_to_save={name!r} needs a dense {attr} (this one "
                             "is quantized); load the base without quantizing it")
        if w.shape != tensors[key].shape:
            raise EmberError(f"{wfile}: {key} has shape {tuple(tensors[key].shape)}, the model's "
                             f"{attr} {tuple(w.shape)} (a resized vocabulary?); {_MERGE_HINT}")
        full[attr] = tensors.pop(key)
    return full


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Wrap the modules an adapter (ember's or PEFT's) targets and load its weights.

    The weights file decides which modules get adapters; ranks come from the tensor shapes and
    are checked against ``r`` / ``rank_pattern``; alphas from ``lora_alpha`` / ``alpha_pattern``.
    Modules already wrapped (e.g. resuming training) get their weights overwritten. Everything
    else is frozen, as after ``apply_lora``.
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_adapter(adapter_dir)
    where = adapter_dir / "adapter_config.json"
    _validate_config(config, where, tensors)
    if is_fused(getattr(model, "cfg", None)):
        tensors, config = split_adapter(tensors, config, model.cfg)
    wfile = adapter_dir / "adapter_model.safetensors"
    full = _full_weights(model, config, tensors, wfile)
    cands = _candidates(model)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        if _saved_unchanged_embedding(model, key, t):
            continue  # save_embedding_layers=True: a copy of the base's own weight
        m = _PEFT_KEY.fullmatch(key)
        name = ember_module_name(m[1]) if m else None
        if name is None or name not in cands:
            unknown.append(key)
            continue
        pairs.setdefault(name, {})[m[2]] = t
    heads = [k for k in unknown if re.search(r"\.(embed_tokens|lm_head)\.", k)]
    if heads:
        raise EmberError(f"{wfile}: the adapter changes the embedding or output head ({heads[:3]}:"
                         " LoRA on embed_tokens/lm_head, or new full weights saved with "
                         f"save_embedding_layers), which ember's LoRA cannot hold; {_MERGE_HINT}")
    if unknown:
        raise EmberError(f"{wfile}: {len(unknown)} keys match no projection of this model, e.g. "
                         f"{unknown[:3]} (expected base_model.model.model.layers.N.self_attn."
                         "q_proj.lora_A.weight; is it an adapter for a different model?)")
    if not pairs:
        raise EmberError(f"{wfile}: no LoRA weights in the file")
    incomplete = [n for n, p in pairs.items() if len(p) != 2]
    if incomplete:
        raise EmberError(f"{wfile}: lora_A or lora_B missing for {incomplete[:3]}")
    missing = [n for n in cands if n not in pairs and _EMBER_NAME.fullmatch(n)
               and _peft_targets(config, hf_module_name(n))]
    if missing:
        raise EmberError(f"{wfile}: adapter_config targets {len(missing)} modules with no "
                         f"weights in the file, e.g. {[hf_module_name(n) for n in missing[:3]]}")
    r0, alpha0 = config["r"], config["lora_alpha"]
    rank_pat, alpha_pat = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dropout, rslora = float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora"))
    plan = {}
    for name in sorted(pairs, key=_natural_key):
        A, B = pairs[name]["lora_A"], pairs[name]["lora_B"]
        hf = hf_module_name(name)
        mod = cands[name]
        in_f, out_f = _features(mod.base if isinstance(mod, LoRALinear) else mod)
        r = _pattern_value(rank_pat, hf, r0)
        if A.ndim != 2 or B.ndim != 2 or A.shape != (r, in_f) or B.shape != (out_f, r):
            raise EmberError(f"{wfile}: {hf}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                             f"do not fit this model, expected ({r}, {in_f}) / ({out_f}, {r}) "
                             "(rank from adapter_config r/rank_pattern)")
        plan[name] = (A, B, r, float(_pattern_value(alpha_pat, hf, alpha0)))
    if not lora_modules(model):
        for p in model.parameters():
            p.requires_grad_(False)
    with torch.no_grad():
        for attr, t in full.items():
            getattr(model, attr).weight.copy_(t)
    if full:
        model.peft_modules_to_save = {n for n, (_, a) in _FULL_WEIGHTS.items() if a in full}
    for name, (A, B, r, alpha) in plan.items():
        mod = model.get_submodule(name)
        if isinstance(mod, LoRALinear):
            if mod.rank != r:
                raise EmberError(f"{name} already has a rank-{mod.rank} adapter; the file has "
                                 f"rank {r}")
            mod.alpha, mod.scale = alpha, alpha / (math.sqrt(r) if rslora else r)
        else:
            mod = LoRALinear(mod, r, alpha, dropout=dropout, use_rslora=rslora)
            _set_module(model, name, mod)
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B)
    return model
