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

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine.dcp import MANIFEST
from ember.engine.fingerprint import weights_fingerprint
from ember.engine.stage_reference import (  # noqa: F401 (importable from here, as before)
    OTHERS,
    adapter_snapshot,
    adapters_swapped,
)
from ember.models.gguf_cache import file_digest, imported_digest
from ember.models.hub import (
    builtin_gguf_path,
    builtin_model,
    hf_cache_snapshot,
    is_gguf_file,
    split_paths,
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
from ember.models.peft_adapter import _PEFT_KEY, LORA_DEFAULTS, _read_adapter_config
from ember.models.peft_files import _FULL_WEIGHTS
from ember.models.peft_tokens import train_trainable_tokens

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig

_KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt"}


@dataclass(frozen=True)
class Start:
    """Where a stage's weights come from."""

    source: str  # model.init as given
    kind: str  # what it holds: "lora" | "prompt" (an adapter) | "full" (a model folder)
    base: str  # the weights to load: the adapter's base, or the previous full model's folder
    adapter: Path | None = None
    adapter_config: dict = field(default_factory=dict)
    # the earlier run's context extension (model.rope_scaling, rope_factor), which its adapter
    # was trained under and which no adapter file records
    context: tuple[str, float] | None = None


@functools.lru_cache(maxsize=16)
def _gguf_id(path: str, size: int, mtime_ns: int) -> str:
    return f"gguf:{file_digest(*(p for p in split_paths(path) if p.is_file()))}"


def _model_id(name: str) -> str | None:
    """A comparable identity for a model name: the weights it loads (``hub.resolve_model``), so
    that a built-in name or alias, its installed GGUF file and that file's import in Ember's cache
    are one model (a GGUF by its content digest, as the cache names its imports; a folder by its
    resolved path). None when it names nothing on this machine (e.g. a hub id in an adapter
    config)."""
    b = builtin_model(name)
    if b is not None:
        snapshot = hf_cache_snapshot(name)  # resolve_model loads a cached Hub snapshot first
        if snapshot is not None:
            return str(snapshot.resolve())
        try:
            name = str(builtin_gguf_path(b.name))
        except EmberError:  # its package is not installed: only its names are known
            return f"builtin:{b.name}"
    p = Path(name).expanduser()
    if p.is_file() and is_gguf_file(p):
        st = p.stat()
        return _gguf_id(str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = imported_digest(p)  # a GGUF's import in the cache (or its old name)
    if digest is not None:
        return f"gguf:{digest}"
    return str(p.resolve()) if p.exists() else None


def same_base(a: str, b: str) -> bool | None:
    """True / False when it can be told whether ``a`` and ``b`` are the same model, else None."""
    if a == b:
        return True
    ia, ib = _model_id(a), _model_id(b)
    if ia is None and ib is None:  # two Hub ids, say: the Hub's names ignore case
        return True if a.strip().lower() == b.strip().lower() else None
    return None if ia is None or ib is None else ia == ib


def _check_base(init: str, trained_on: str, model_name: str) -> None:
    if same_base(trained_on, model_name) is False:
        raise EmberError(
            f"model.init {init!r} was trained on the base model {trained_on!r}, but "
            f"model.name is {model_name!r}; set model.name = {trained_on!r} (the "
            "base of the earlier stage; model.init then supplies its trained "
            "weights)"
        )


def _run_config(run_dir: Path) -> TrainConfig:
    from ember.engine.config import TrainConfig, from_dict, parse_toml

    path = run_dir / "config.toml"
    return from_dict(TrainConfig, parse_toml(path.read_text(encoding="utf-8"), str(path)))


def find_start(init: str, model_name: str) -> Start:
    """What ``model.init`` holds; EmberError when it is unusable or for another base model."""
    p = Path(init)
    if not p.exists():
        raise EmberError(
            f"model.init {init!r} does not exist; give a previous run directory "
            "(runs/NAME) or a PEFT adapter folder (adapter_config.json)"
        )
    if p.is_dir() and any((p / f).is_file() for f in (MANIFEST, ".metadata", "extra.pt")):
        # (was: taken for a run directory without final/, whose advice, `ember train CKPT
        # --resume` or `ember export CKPT`, fails on a checkpoint folder)
        run = p.parent.parent
        raise EmberError(
            f"model.init {init!r} is a training checkpoint, not a run directory: give the "
            f"run directory {str(run)!r} to start from its final/ output (a run without one: "
            f"`ember export {run} --adapter DIR`, or --merged DIR for method = \"full\", "
            "writes the weights it ends with; give that folder to model.init, or a merged "
            "model to model.name)"
        )
    if p.is_dir() and (p / "config.toml").is_file():
        prev = _run_config(p)
        _check_base(init, prev.model.name, model_name)
        what = "model" if prev.method == "full" else "adapter"
        out = p / "final" / what
        if not out.is_dir():
            fix = (
                f"export its weights with `ember export {init} --adapter DIR` and give that "
                "folder to model.init" if prev.method != "full" else
                f"export its weights with `ember export {init} --merged DIR` and set "
                "model.name to that folder"
            )
            raise EmberError(
                f"model.init {init!r}: the run has no final/{what}: "
                + (f"it ran with checkpoint.save_final = false; {fix}"
                   if not prev.checkpoint.save_final else
                   f"it did not finish; finish it with `ember train {init} --resume`, or "
                   f"{fix}")
            )
        if prev.method == "full":
            return Start(init, "full", str(out))
        config = _read_adapter_config(out)
        context = None if prev.model.rope_scaling is None else (
            prev.model.rope_scaling, prev.model.rope_factor)
        return Start(init, prev.method, _moved_base(init, prev, model_name), out, config, context)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        config = _read_adapter_config(p)
        kind = _KINDS.get(config.get("peft_type"))
        if kind is None:
            raise EmberError(
                f"model.init {init!r}: peft_type {config.get('peft_type')!r} is not "
                f"supported; ember continues {' or '.join(_KINDS)} adapters"
            )
        trained_on = config.get("base_model_name_or_path")
        if isinstance(trained_on, str) and trained_on:
            _check_base(init, trained_on, model_name)
        return Start(init, kind, model_name, p, config)
    if p.is_dir() and (p / "config.json").is_file():
        raise EmberError(
            f"model.init {init!r} is a model folder: set model.name = {init!r} to "
            "start from its weights (model.init takes a run directory or an "
            "adapter folder)"
        )
    if p.is_dir() and (p.parent / "config.toml").is_file():  # runs/NAME/final (or best/)
        raise EmberError(
            f"model.init {init!r} is a folder inside the run {str(p.parent)!r}, not a run "
            f"directory: give the run directory {str(p.parent)!r} (its final/ output is used)"
        )
    raise EmberError(
        f"model.init {init!r} is neither a run directory (config.toml) nor a PEFT "
        "adapter folder (adapter_config.json)"
    )


def _moved_base(init: str, prev: TrainConfig, model_name: str) -> str:
    """``base_of(prev)``; when the earlier run's base was its model.name, recorded absolute and
    gone since (the project folder moved, say), this stage's model.name of the same name: the
    base (``_check_base``), where it is now."""
    base = base_of(prev)
    if prev.model.init is None and Path(base).is_absolute() and not Path(base).exists():
        if Path(base).name != Path(model_name).expanduser().name:
            raise EmberError(
                f"model.init {init!r} was trained on the base model {base!r}, which is gone; "
                "set model.name to that model where it is now")
        return model_name
    return base


def base_of(cfg: TrainConfig) -> str:
    """The model a run's adapter applies to (its final/adapter's base): ``model.name``, or the
    earlier full model's folder when the run started from one."""
    if cfg.model.init is None or cfg.method == "full":
        return cfg.model.name
    return start_of(cfg).base


def start_of(cfg: TrainConfig) -> Start:
    """The start of a config with ``model.init``, checked against its ``method``."""
    start = find_start(cfg.model.init, cfg.model.name)
    if (start.kind == "prompt") != (cfg.method == "prompt") and start.kind != "full":
        held = "a prompt-tuning adapter" if start.kind == "prompt" else "a LoRA adapter"
        fix = (
            'use method = "prompt" to continue it'
            if start.kind == "prompt"
            else 'use method = "lora" to continue it, or method = "full" to train its merged '
            "weights"
        )
        raise EmberError(
            f"model.init {start.source!r} holds {held}, which a method = "
            f"{cfg.method!r} stage cannot start from: {fix}"
        )
    c = start.adapter_config
    if start.kind == "lora" and cfg.head.type is None and (
            c.get("task_type") == "SEQ_CLS" or {"score", "classifier"} & set(
                c.get("modules_to_save") or ())):
        raise EmberError(
            f"model.init {start.source!r} holds a sequence-classification adapter (its head "
            "among the modules it saves): set head.type = \"classification\" (\"reward\" or "
            "\"regression\" for a one-output head) to continue it; a language-model stage "
            "starts from a language-model adapter or model"
        )
    return start


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


def frozen_start(cfg: TrainConfig, device: str):
    """The starting model for forwards only (DPO's reference with full fine-tuning): eval mode,
    no gradients, weights in the autocast dtype."""
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
