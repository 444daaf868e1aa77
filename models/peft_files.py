"""PEFT adapter folders on disk: ``adapter_config.json`` beside ``adapter_model.safetensors``
(or a legacy ``adapter_model.bin``), read, checked and written for ``ember.models.peft_adapter``
(LoRA) and ``ember.models.prompt_tuning``. The config rules live here: which LoraConfig fields
Ember's LoRA represents, which change the math and are refused by name, PEFT's
``rank_pattern`` / ``alpha_pattern`` lookup and the ``modules_to_save`` Ember can hold.
Nothing here sees a model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ember import EmberError

# A SEQ_CLS adapter (PEFT's task_type for *ForSequenceClassification) carries the classifier head
# whole: modules_to_save, saved under this key.
HEAD_MODULES = ("classifier", "score")
HEAD_KEY = "base_model.model.score.weight"
_UNSUPPORTED = {  # PEFT fields ember cannot represent: (field, value meaning "off")
    "lora_bias": False,
    "layer_replication": None, "target_parameters": None,
    "use_qalora": False,
    # LoRA variants whose forward is not x W^T + scale * x A^T B^T (PEFT 0.21 lora_variants)
    "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
    "velora_config": None, "monteclora_config": None, "kasa_config": None,
}
_MERGEABLE = ("lora_bias", "layer_replication",
              "target_parameters", "use_qalora")
# modules_to_save Ember can hold: PEFT saves the module's trained full weight under this key and
# Ember writes it into the model's own module (the attribute), as PEFT's wrapper replaces it.
_FULL_WEIGHTS = {"lm_head": ("base_model.model.lm_head.weight", "lm_head"),
                 "embed_tokens": ("base_model.model.model.embed_tokens.weight", "embed")}
# Their names in the other layouts PEFT saves: a multimodal Gemma 3's language model inside
# Gemma3ForConditionalGeneration (transformers 4.52+, and 4.5x's language_model.model.).
_OTHER_LAYOUTS = {"lm_head": ("language_model.lm_head",),
                  "embed_tokens": ("model.language_model.embed_tokens",
                                   "language_model.model.embed_tokens")}


def full_weights_view(tensors: dict) -> dict:
    """tensors with the modules_to_save weights of the other layouts renamed to
    ``_FULL_WEIGHTS``' keys."""
    rename = {f"base_model.model.{o}.weight": key for n, (key, _) in _FULL_WEIGHTS.items()
              for o in _OTHER_LAYOUTS[n]}
    return {rename.get(k, k): t for k, t in tensors.items()}
# PEFT LoraConfig fields that do not change what a saved adapter computes (bookkeeping, training
# options, inits that leave the base model as it is); any other field that is set is refused, so
# an adapter from a newer PEFT with a new variant never loads with the wrong math.
_KNOWN_FIELDS = frozenset("""
    task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode
    r target_modules exclude_modules lora_alpha lora_dropout bias use_rslora init_lora_weights
    layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config megatron_core
    loftq_config eva_config corda_config lora_ga_config qalora_group_size runtime_config
    ensure_weight_tying modules_to_save use_dora trainable_token_indices fan_in_fan_out
""".split()) | set(_UNSUPPORTED)
# LoraConfig's defaults for fields an adapter_config.json may leave out (older or hand-written
# files): PEFT loads those with these values
LORA_DEFAULTS = {"r": 8, "lora_alpha": 8}
# PEFT 0.21's targets for a config without target_modules (None or left out), by the model_type
# PEFT sees (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, the types Ember loads); a type
# not listed has none and PEFT refuses the config
PEFT_DEFAULT_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                     "gemma3_text"), ["q_proj", "v_proj"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}


def default_targets(model_type: str, where: Path) -> list[str]:
    """The target_modules PEFT uses for an adapter config that names none (and no
    target_parameters) on a model of ``model_type``; refused by name where PEFT has none."""
    targets = PEFT_DEFAULT_TARGETS.get(model_type)
    if targets is None:
        raise EmberError(f"{where}: no target_modules, and PEFT has no default targets for "
                         f"model_type {model_type!r} (its LoraConfig refuses this config); add "
                         "target_modules naming the modules the adapter's weights are for, "
                         'e.g. ["q_proj", "v_proj"]')
    return list(targets)
# inits that change the base weights too: the adapter alone is relative to a modified base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT types that change the inputs (virtual tokens, prefixes) or route between adapters: no
# merged model holds them. The other kinds change weights, which merge_and_unload() folds in.
_UNMERGEABLE_TYPES = frozenset("""
    MULTITASK_PROMPT_TUNING P_TUNING PREFIX_TUNING CPT CARTRIDGE ADAPTION_PROMPT POLY XLORA
""".split())
_MERGE_HINT = ("merge it into the base with PEFT (PeftModel.merge_and_unload(), then "
               "save_pretrained) and load the merged model")


def _pattern_value(patterns: dict, hf_name: str, default):
    for key, value in patterns.items():  # PEFT's get_pattern_key rule
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


# Every PEFT writes all of its LoraConfig's fields; these are the ones PEFT 0.13 wrote (0.6 wrote
# a subset), and PEFT 0.14 added three. A config with only these and the pattern fields was
# written by a PEFT whose rank_pattern / alpha_pattern lookup differs from 0.15+'s.
_FIELDS_0_13 = frozenset("""
    alpha_pattern auto_mapping base_model_name_or_path bias fan_in_fan_out inference_mode
    init_lora_weights layer_replication layers_pattern layers_to_transform loftq_config lora_alpha
    lora_dropout megatron_config megatron_core modules_to_save peft_type r rank_pattern revision
    target_modules task_type use_dora use_rslora
""".split())
_FIELDS_0_14 = _FIELDS_0_13 | {"lora_bias", "eva_config", "exclude_modules"}
# fields only PEFT's own save writes (asdict), never a hand-written config's essentials
_PEFT_WRITTEN = ("auto_mapping", "revision", "inference_mode", "rank_pattern", "alpha_pattern")


def old_writer(config: dict) -> str | None:
    """"0.13" for a config PEFT 0.13 or older wrote, "0.14" for PEFT 0.14's, else None (a newer
    PEFT's, Ember's or a hand-written one), told by its fields."""
    keys = set(config)
    if not all(k in keys for k in _PEFT_WRITTEN) or not keys <= _FIELDS_0_14:
        return None
    return "0.13" if keys <= _FIELDS_0_13 else "0.14"


def rank_alpha(config: dict, hf_name: str) -> tuple[int, float]:
    r"""A module's (r, lora_alpha) from ``r`` / ``lora_alpha`` and ``rank_pattern`` /
    ``alpha_pattern``, as the PEFT that wrote the config read them. PEFT 0.15+ (get_pattern_key)
    looks each pattern up on its own, a key matching as ``(.*\.)?(key)$``. PEFT 0.14 matched a key
    as ``.*\.key$``, else took the module's own name as the key (a regex from the model's root
    matches nothing). PEFT 0.6-0.13 also took one
    key for both: the first key of rank_pattern then alpha_pattern that matches, so a module
    matching a rank_pattern key took its alpha from alpha_pattern under that same key (else
    lora_alpha), whatever other alpha_pattern key it matched. PEFT 0.21 reads the old files by
    its own rule, a different scale than the adapter was trained with; the writer's rule is
    what the adapter computes."""
    r0, a0 = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    writer = old_writer(config)
    if writer is None:
        return _pattern_value(ranks, hf_name, r0), _pattern_value(alphas, hf_name, a0)
    exact = re.escape(hf_name)  # a fused module's part: its values as split_adapter resolved
    if exact in ranks and exact in alphas:  # them (the old rules match no escaped full name)
        return ranks[exact], alphas[exact]

    def old_key(patterns) -> str:
        return next((k for k in patterns if re.match(rf".*\.{k}$", hf_name)), hf_name)

    if writer == "0.14":
        return ranks.get(old_key(ranks), r0), alphas.get(old_key(alphas), a0)
    key = old_key([*ranks, *alphas])
    return ranks.get(key, r0), alphas.get(key, a0)


def _write_adapter(out_dir, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT adapter folder: adapter_model.safetensors + adapter_config.json, each atomic."""
    from safetensors.torch import save_file

    return write_adapter_files(out_dir, {
        "adapter_model.safetensors": lambda p: save_file(tensors, str(p),
                                                         metadata={"format": "pt"}),
        "adapter_config.json": lambda p: p.write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n")})


def write_adapter_files(out_dir, files: dict[str, Callable[[Path], object]]) -> Path:
    """Writes an adapter folder's files (``files``: name -> a writer of that file's path). Each
    is written under a temporary name first and then all are renamed one right after the
    other: a crash while writing (the weights take long) leaves the folder as it was, not new
    weights without their config (or beside an older adapter's config)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EmberError(f"cannot write an adapter to {out}: it exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tmps = {}
    try:
        for name, write in files.items():
            tmps[name] = out / (name + ".tmp")
            write(tmps[name])
    except BaseException:
        for t in tmps.values():
            t.unlink(missing_ok=True)
        raise
    for name, tmp in tmps.items():
        os.replace(tmp, out / name)
    return out


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # preferred first


def _read_adapter_config(adapter_dir: Path) -> dict:
    """An adapter folder's adapter_config.json (checked to be a JSON object, with a weights file
    beside it that is not read here)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise EmberError(f"adapter directory {str(adapter_dir)!r} does not exist")
    if not cfg_path.is_file():
        # PEFT saves an adapter not named "default" in a subfolder of that name
        subs = sorted(p.parent.name for p in adapter_dir.glob("*/adapter_config.json"))
        hint = f"; PEFT saved adapter(s) {subs} in subfolders: pass one of them" if subs else ""
        raise EmberError(f"{cfg_path}: missing; an adapter directory holds adapter_config.json "
                         "and adapter_model.safetensors (as written by save_adapter or PEFT)"
                         + hint)
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise EmberError(f"{cfg_path}: expected a JSON object")
    if not any((adapter_dir / n).is_file() for n in ADAPTER_WEIGHTS):
        raise EmberError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin)")
    return config


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = _read_adapter_config(adapter_dir)
    st, pt = (adapter_dir / n for n in ADAPTER_WEIGHTS)
    try:
        if st.is_file():
            from safetensors.torch import load_file
            return config, load_file(str(st))
        return config, torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files surface as many different exception types
        raise EmberError(f"{st if st.is_file() else pt}: cannot read adapter weights "
                         f"({type(e).__name__}: {e})") from None


def _regex_error(pattern) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        return str(e)
    return None


def check_field_types(config: dict, where: Path) -> None:
    """The LoraConfig fields whose type or value PEFT would fail on deep inside (an AttributeError,
    a regex error, torch's), refused by name: a hand-edited or corrupt adapter_config.json."""
    def bad(key: str, why: str):
        return EmberError(f"{where}: {key}={config.get(key)!r} {why}; fix adapter_config.json "
                          "(PEFT's LoraConfig cannot load it either)")

    r = config.get("r")
    if isinstance(r, float):
        raise bad("r", "must be a whole number (a rank)")
    for key in ("target_modules", "exclude_modules"):
        v = config.get(key)
        if isinstance(v, str) and _regex_error(v):
            raise bad(key, f"is not a valid regular expression ({_regex_error(v)})")
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, list | tuple | set) and all(isinstance(t, str) for t in v)):
            raise bad(key, "must be a module name regex or a list of module names")
    pats = config.get("layers_pattern")
    if pats:  # PEFT: a regex or a list of them, naming the module list before the layer index
        listed = [pats] if isinstance(pats, str) else pats
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise bad("layers_pattern", "must be a regex or a list of regexes (e.g. \"layers\")")
        if any(_regex_error(p) for p in listed):
            raise bad("layers_pattern", "is not a valid regular expression "
                                        f"({next(filter(None, map(_regex_error, listed)))})")
        # PEFT 0.13 and older saved such configs and adapted every layer (0.14+ refuses them)
        if config.get("layers_to_transform") is None and old_writer(config) != "0.13":
            raise bad("layers_pattern", "is set without layers_to_transform (the layer indices "
                                        "it locates)")
    for key in ("layers_to_transform", "layers_pattern"):
        if isinstance(config.get("target_modules"), str) and config.get(key) is not None:
            raise bad(key, "is set with a regex target_modules (PEFT's LoraConfig refuses it: "
                           "the regex names the layers itself)")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool)) or (isinstance(
                layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                      for i in layers))):
        raise bad("layers_to_transform", "must be a layer index or a list of layer indices")
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        v = config.get(key)
        if not v:  # None, or empty: no pattern
            continue
        if not isinstance(v, dict):
            raise bad(key, "must be an object mapping module-name regexes to numbers")
        for pat, value in v.items():
            if _regex_error(pat):
                raise bad(key, f"has key {pat!r}, not a valid regular expression "
                               f"({_regex_error(pat)})")
            ok = (int,) if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok) or value <= 0:
                raise bad(key, f"maps {pat!r} to {value!r}, not a positive "
                               f"{'whole ' if whole else ''}number")
    # fan_in_fan_out is for GPT-2's Conv1D weights: on the nn.Linear / nn.Embedding modules of
    # every family Ember loads, PEFT warns and ignores it (the same LoRA); on target_parameters
    # it raises.
    if config.get("fan_in_fan_out") and config.get("target_parameters"):
        raise bad("fan_in_fan_out", "does not work with target_parameters")
    drop = config.get("lora_dropout")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, int | float)
                             or not 0 <= drop <= 1):
        raise bad("lora_dropout", "must be a probability in [0, 1] (torch.nn.Dropout's)")


def _validate_config(config: dict, where: Path, tensors: dict | None = None) -> None:
    check_field_types(config, where)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        hint = ("a prompt-tuning adapter: load it with ember.models.load_prompt_adapter"
                if kind == "PROMPT_TUNING" else
                "Ember loads only LORA (and PROMPT_TUNING) adapters, and this kind changes the "
                "model's inputs or routing in a way no merged model holds"
                if kind in _UNMERGEABLE_TYPES else
                f"Ember loads only LORA (and PROMPT_TUNING) adapters; {_MERGE_HINT}")
        raise EmberError(f"{where}: peft_type is {kind!r}; {hint}")
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
    if not isinstance(mts, list) or [m for m in _saved_modules(mts)[1]
                                     if tensors is None or _holds_weights(m, tensors)]:
        raise EmberError(f"{where}: modules_to_save={mts!r} is not supported by ember's LoRA (only "
                         f"{sorted(_FULL_WEIGHTS)}, and a classifier's head): {_MERGE_HINT}")
    excluded = _excluded_pairs(mts, tensors or {})
    if excluded:
        raise EmberError(f"{where}: modules_to_save={mts!r} keeps LoRA off {excluded[0]} (PEFT "
                         "reads each entry as a regex there), yet the file holds a LoRA pair for "
                         "it: PEFT does not load this adapter either; fix modules_to_save")
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise EmberError(f"{where}: bias={bias!r} is not a PEFT bias mode")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise EmberError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")


def _saved_modules(mts: list) -> tuple[list[str], list]:
    """modules_to_save entries -> the ``_FULL_WEIGHTS`` modules they select (PEFT 0.21's
    _set_trainable matches an entry as a suffix of module names, str.endswith, never as a regex:
    "embed_tokens", "model.embed_tokens" and "tokens" are one module, "head" is lm_head, ".*"
    none), and the entries that select none of them nor a classifier's head."""
    names, bad = set(), []
    for m in mts:
        hit = {n for n, (key, _) in _FULL_WEIGHTS.items()
               if isinstance(m, str) and m and any(name.endswith(m) for name in
                      (key[len("base_model.model."):-len(".weight")], *_OTHER_LAYOUTS[n]))}
        names |= hit
        if not hit and m not in HEAD_MODULES:
            bad.append(m)
    return sorted(names), bad


def _holds_weights(entry: str, tensors: dict) -> bool:
    """Whether the file holds a weight of a module the modules_to_save entry selects (a module
    whose name ends with it, or one inside such a module). An entry that selects nothing in
    PEFT (".*": PEFT does not read entries as regexes here) or only modules without weights
    ("rotary_emb") saves nothing and leaves PEFT's model as it was: PEFT loads it, so does
    Ember."""
    if not isinstance(entry, str) or not entry:
        return True
    for key in tensors:
        parts = key.removeprefix("base_model.model.").split(".")[:-1]
        if any(p.startswith(("lora_", "trainable_tokens_")) for p in parts):
            continue
        if any(".".join(parts[:i]).endswith(entry) for i in range(1, len(parts) + 1)):
            return True
    return False


def _excluded_pairs(mts: list, tensors: dict) -> list[str]:
    r"""Modules with a LoRA pair in the file that PEFT keeps LoRA off: it excludes a module whose
    name matches an entry as the regex ``(^|.*\.)<entry>($|\..*)`` (check_target_module_exists),
    so a file saved with such pairs loads in PEFT with them unused, or not at all."""
    mods = sorted({k.removeprefix("base_model.model.").split(".lora_")[0]
                   for k in tensors if ".lora_" in k})
    out = []
    for mod in mods:
        for m in mts:
            try:
                if isinstance(m, str) and re.match(rf"(^|.*\.){m}($|\..*)", mod):
                    out.append(mod)
                    break
            except re.error:
                continue
    return out


def full_weights(model, config: dict, tensors: dict, wfile: Path) -> dict:
    """``{model attribute: weight}`` for modules_to_save (popped from tensors), checked. On a
    model with tied embeddings PEFT trains a copy of each listed module, which unties them
    (unless ensure_weight_tying: one trained copy serves both, saved under both keys): the
    model's head is then untied here (``untie_head``), the module not listed keeping the base's
    matrix, as in PEFT."""
    from ember.models.lora import tied_lm

    full = {}
    names = _saved_modules(config.get("modules_to_save") or [])[0]
    untie = False
    if names and tied_lm(model):
        saved = [tensors[k] for k, _ in _FULL_WEIGHTS.values() if k in tensors]
        if config.get("ensure_weight_tying"):
            if not (saved and all(torch.equal(saved[0], t) for t in saved[1:])):
                raise EmberError(f"{wfile}: modules_to_save={names} with ensure_weight_tying "
                                 "holds an embedding and a head that differ (or neither); "
                                 f"{_MERGE_HINT}")
            tensors.setdefault(_FULL_WEIGHTS["embed_tokens"][0], saved[0])
            tensors.pop(_FULL_WEIGHTS["lm_head"][0], None)
            names = ["embed_tokens"]
        else:
            untie = True
    for name in names:
        key, attr = _FULL_WEIGHTS[name]
        if key not in tensors:
            raise EmberError(f"{wfile}: modules_to_save lists {name} but {key} is missing")
        owner = "embed" if untie else attr  # a tied model's head is its embedding until untied
        w = getattr(getattr(model, owner, None), "weight", None)
        if attr == "lm_head" and getattr(model, "lm_head", None) is None and not untie:
            raise EmberError(f"{wfile}: modules_to_save lists lm_head but the model has none "
                             "(a classifier); load the adapter onto a causal LM")
        if not isinstance(w, torch.Tensor):
            raise EmberError(f"{wfile}: modules_to_save={name!r} needs a dense {attr} (this one "
                             "is quantized or adapted); load the base without quantizing it")
        if w.shape != tensors[key].shape:
            raise EmberError(f"{wfile}: {key} has shape {tuple(tensors[key].shape)}, the model's "
                             f"{attr} {tuple(w.shape)} (a resized vocabulary?); {_MERGE_HINT}")
        full[attr] = tensors.pop(key)
    if untie:
        untie_head(model)
    return full


def untie_head(model) -> None:
    """Give a model with tied embeddings its own output head, a copy of the embedding (frozen),
    and ``tie_word_embeddings = False`` in its config: what it exports is then untied too."""
    import torch.nn as nn

    w = model.embed.weight
    head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    head.weight.requires_grad_(False)
    model.lm_head = head
    model.cfg = model.cfg.replace(tie_word_embeddings=False)
