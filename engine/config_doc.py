"""``ember config``: a run's resolved settings as TOML, every key with the comment written beside
its field in the source (the config dataclasses are the documentation). Keys left unset (None)
are shown commented out, so the output is itself a valid config file that loads back to the same
settings. ``unused_settings``: the keys a config gives that its run does not use (``ember train``
prints each as a note)."""

from __future__ import annotations

import dataclasses
import inspect
import re

from ember import EmberError
from ember.engine.config import TrainConfig, _toml_value, given_keys, to_dict
from ember.engine.objectives import OBJECTIVES
from ember.engine.schedules import uses_warmup_start

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")

# The meaning of the keys whose field has no comment of its own in the source (a class docstring
# or a comment shared with the field above documents them there); test_config checks that every
# key ``ember config`` prints has a meaning.
MORE_DOCS = {
    "": {"name": "the run's name (run_dir defaults to runs/<name>)",
         "train_layers": "full fine-tuning: the decoder layers that train (None: all; negative "
                         "indices count from the end)",
         "epochs": "passes over data.train (fractions allowed) when max_steps is unset",
         "seed": "initial weights (LoRA's A), dropout and other random draws of the run"},
    "model": {"rope_factor": "the context extension factor of rope_scaling (> 1, e.g. 4.0 for "
                             "4x the context)"},
    "lora": {"rank": "r, the adapters' inner dimension",
             "alpha": "scale: the update is (alpha / rank) * B A (alpha / sqrt(rank) with "
                      "use_rslora)",
             "dropout": "dropout on the adapters' input while training",
             "targets": "the modules that get adapters: short names (q k v o gate up down), "
                        "leaf names (q_proj), \"all-linear\", embed_tokens / lm_head, or glob / "
                        "regex patterns on full module names",
             "use_rslora": "rank-stabilized LoRA: scale alpha / sqrt(rank)",
             "embedding_lr": "learning rate of the embed_tokens / lm_head adapters (Unsloth's "
                             "embedding_learning_rate; None: optim.lr); a continued adapter's "
                             "trainable_token_indices rows train at optim.lr"},
    "prompt_tuning": {"num_virtual_tokens": "trainable input embeddings put in front of every "
                                            "sequence",
                      "init_text": "the text whose tokens' embeddings start the virtual tokens "
                                   "(init = \"text\")"},
    "simpo": {"label_smoothing": "> 0: conservative loss, the assumed fraction of flipped labels"},
    "optim": {"betas": "AdamW's (beta1, beta2)", "eps": "AdamW's epsilon",
              "warmup_ratio": "warmup as a fraction of the run's steps when warmup_steps is "
                              "unset"},
    "data": {"val_fraction": "the fraction of data.train held out as the validation split when "
                             "data.validation is unset",
             "test": "JSONL file of the test split: generation metrics, and the file ember "
                     "eval RUN scores by default",
             "format": "the line format: \"auto\" (from the fields) | \"text\" | "
                       "\"prompt_completion\" | \"alpaca\" | \"messages\" | \"sharegpt\" | "
                       "\"preference\"",
             "max_seq_len": "tokens per example; longer ones follow data.truncation",
             "seed": "the validation split's draw (val_fraction) and the per-epoch order",
             "tokens_per_batch": "tokens per packed micro-batch",
             "system_prompt": "a system message put before every conversation (needs a chat "
                              "template)",
             "add_eos": "end every example with the tokenizer's EOS token (a chat answer: "
                        "unless its turn ends with an end-of-turn token, or the template marks "
                        "{% generation %} blocks, trained as marked)"},
    "task": {"name": "a built-in generated dataset (ember.engine.tasks); None: none",
             "train": "examples generated for the train split",
             "validation": "examples generated for the validation split",
             "test": "examples generated for the test split",
             "seed": "the generator's seed"},
    "eval": {"max_val_batches": "validation loss on the first N packed batches only (None: all)",
             "max_examples": "generation metrics on the first N examples with a prompt and a "
                             "reference only (None: all)",
             "max_new_tokens": "the longest generated answer, in tokens",
             "batch_size": "prompts completed at once for generation metrics",
             "min_delta": "the improvement that counts (resets patience) for early stopping"},
    "checkpoint": {"keep_last": "step checkpoints kept (older ones are deleted)"},
}


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from a dataclass's source: the comment lines right above a field and
    the one at its end, joined."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and not s.startswith(("def ", "@", "class ")):
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        elif s.startswith("def "):
            break  # the methods: no fields below
        above = []
    return out


def _lines(obj, values: dict, section: str = "") -> list[str]:
    notes = {k: v for k, v in field_comments(type(obj)).items() if v}
    notes = {**MORE_DOCS.get(section, {}), **notes}
    out = []
    for f in dataclasses.fields(obj):
        k, v = f.name, values.get(f.name)
        if isinstance(v, dict) or dataclasses.is_dataclass(getattr(obj, k)):
            continue
        text = f"{k} = {_toml_value(v)}" if v is not None else f"# {k} = (unset)"
        note = notes.get(k)
        out.append(f"{text}  # {note}" if note else text)
    return out


def annotated_toml(cfg) -> str:
    """TOML text of ``cfg`` (a ``TrainConfig``) with each key's source comment."""
    d = to_dict(cfg)
    lines = _lines(cfg, d)
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            lines += ["", f"[{f.name}]", *_lines(sub, d.get(f.name, {}), f.name)]
    return "\n".join(lines) + "\n"


def unused_settings(cfg: TrainConfig) -> list[str]:
    """One line per setting the config file / ``--set`` items gave that this run does not use
    (a method's or objective's table next to another method or objective, early-stopping knobs
    without ``eval.early_stopping``, ...), so that nothing given is silently ignored. Empty for a
    config built in code (``given_keys`` unknown). A key at its default value is left out: it
    changes nothing, and ``ember config``'s output (or a run's config.toml) gives every key."""
    top = given_keys(cfg)
    if top is None:
        return []
    out = []

    def given(section: str, keys=None) -> list[str]:
        sub = getattr(cfg, section)
        have = given_keys(sub) if section in top else None
        return sorted(k for k in have or () if (keys is None or k in keys)
                      and getattr(sub, k) != getattr(type(sub)(), k))

    def note(section: str, keys: list[str], why: str) -> None:
        if keys:
            if len(keys) == 1:
                why = why.replace("they apply", "it applies")
            out.append(f"{', '.join(f'{section}.{k}' for k in keys)} ignored: {why}")

    for section, method in (("lora", "lora"), ("prompt_tuning", "prompt")):
        if cfg.method != method:
            note(section, given(section), f'they apply to method = "{method}", this run\'s '
                 f'method is "{cfg.method}"')
    continued = _continued(cfg)
    if continued == "lora":  # (a value the adapter contradicts is resolve_start's error)
        note("lora", given("lora", ("rank", "alpha", "targets", "use_rslora", "use_dora", "init")),
             "the LoRA adapter continued from model.init keeps its own shape and weights (they "
             "apply to a new adapter)")
    elif continued == "prompt":
        note("prompt_tuning", given("prompt_tuning", ("num_virtual_tokens", "init", "init_text")),
             "the prompt continued from model.init keeps its own length and weights (they apply "
             "to a new prompt)")
    for section in (o for o in OBJECTIVES if o != "sft"):  # each has its own section
        if cfg.objective != section:
            note(section, given(section), f'they apply to objective = "{section}", this run\'s '
                 f'objective is "{cfg.objective}"')
    if cfg.objective == "dpo" and cfg.dpo.f_divergence_type != "alpha_divergence":
        note("dpo", given("dpo", ("f_alpha_divergence_coef",)),
             'it applies to dpo.f_divergence_type = "alpha_divergence"')
    if cfg.objective == "dpo" and "discopop" not in cfg.dpo.loss_types:
        note("dpo", given("dpo", ("discopop_tau",)), 'it applies to dpo.loss_type "discopop"')
    if cfg.objective == "cpo" and cfg.cpo.loss_type != "simpo":
        note("cpo", given("cpo", ("simpo_gamma",)), 'it applies to cpo.loss_type "simpo"')
    if cfg.head.type is None:
        note("head", given("head", ("labels", "label_field", "center_rewards_coefficient")),
             'they apply to a task head ([head] type = "classification", "reward" or '
             '"regression"), and this run has none')
    if cfg.eval.early_stopping is None:
        note("eval", given("eval", ("patience", "mode", "min_delta")),
             "they apply to early stopping: set eval.early_stopping to a metric")
    if cfg.head.type is None and not cfg.eval.metrics:
        note("eval", given("eval", ("max_new_tokens", "batch_size", "split", "max_examples",
                                    "show")),
             "they apply to the generation metrics of eval.metrics, and it is empty")
    if cfg.task.name is None:
        note("task", given("task", ("train", "validation", "test", "seed")),
             "they size the generated splits of a built-in task: set task.name")
    if cfg.optim.schedule == "constant":
        note("optim", given("optim", ("min_lr_ratio",)),
             'it sets where a "cosine" / "linear" decay ends, and optim.schedule = "constant" '
             "never decays")
    if cfg.optim.schedule == "inverse_sqrt":
        note("optim", given("optim", ("min_lr_ratio",)),
             'optim.schedule = "inverse_sqrt" decays without a floor')
    for schedule, keys in (("cosine", ("cycles", "schedule_shift")), ("linear", ("decay_power",)),
                           ("wsd", ("decay_steps", "decay_ratio", "decay_type", "warmup_type",
                                    "stable_steps")),
                           ("inverse_sqrt", ("timescale",))):
        if cfg.optim.schedule != schedule:
            note("optim", given("optim", keys), f'they apply to optim.schedule = "{schedule}"')
    o = cfg.optim
    if not uses_warmup_start(o):
        note("optim", given("optim", ("warmup_start_ratio",)),
             'it applies to optim.schedule = "cosine" with optim.schedule_shift = 1 '
             "(transformers' cosine_warmup_with_min_lr's warmup_lr_rate)")
    if o.schedule not in ("cosine", "wsd") or (o.schedule == "wsd" and o.decay_type != "cosine"):
        note("optim", given("optim", ("cosine_waves",)),
             'it shapes a cosine: optim.schedule = "cosine", or "wsd" with optim.decay_type = '
             '"cosine"')
    if cfg.activations.checkpointing != "every_k":
        note("activations", given("activations", ("every_k",)),
             'it applies to activations.checkpointing = "every_k"')
    return out



def _continued(cfg: TrainConfig) -> str | None:
    """"lora" / "prompt" when the run continues an adapter of its method from ``model.init``
    (whose own config then decides its shape and its weights are loaded), else None; None too
    when model.init is unusable (the run's error says why)."""
    from ember.engine.stages import find_start
    from ember.models.lora_init import changes_base

    if cfg.model.init is None or cfg.method not in ("lora", "prompt"):
        return None
    if cfg.method == "lora" and changes_base(cfg.lora.init):  # an error for a continued adapter
        return None
    try:
        kind = find_start(cfg.model.init, cfg.model.name).kind
    except EmberError:
        return None
    return kind if kind == cfg.method else None
