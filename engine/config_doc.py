"""``ember config``: a run's resolved settings as TOML, every key with the comment written beside
its field in the source (the config dataclasses are the documentation). Keys left unset (None)
are shown commented out, so the output is itself a valid config file that loads back to the same
settings. ``unused_settings``: the keys a config gives that its run does not use (``ember train``
prints each as a note)."""

from __future__ import annotations

import dataclasses
import inspect
import re

from ember.engine.config import TrainConfig, _toml_value, given_keys, to_dict

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


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


def _lines(obj, values: dict) -> list[str]:
    notes = field_comments(type(obj))
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
            lines += ["", f"[{f.name}]", *_lines(sub, d.get(f.name, {}))]
    return "\n".join(lines) + "\n"


def unused_settings(cfg: TrainConfig) -> list[str]:
    """One line per setting the config file / ``--set`` items gave that this run does not use
    (a method's or objective's table next to another method or objective, early-stopping knobs
    without ``eval.early_stopping``, ...), so that nothing given is silently ignored. Empty for a
    config built in code (``given_keys`` unknown)."""
    top = given_keys(cfg)
    if top is None:
        return []
    out = []

    def given(section: str, keys=None) -> list[str]:
        have = given_keys(getattr(cfg, section)) if section in top else None
        return sorted(k for k in have or () if keys is None or k in keys)

    def note(section: str, keys: list[str], why: str) -> None:
        if keys:
            if len(keys) == 1:
                why = why.replace("they apply", "it applies")
            out.append(f"{', '.join(f'{section}.{k}' for k in keys)} ignored: {why}")

    for section, method in (("lora", "lora"), ("prompt_tuning", "prompt")):
        if cfg.method != method:
            note(section, given(section), f'they apply to method = "{method}", this run\'s '
                 f'method is "{cfg.method}"')
    for section in ("distill", "dpo", "orpo", "simpo", "kto"):
        if cfg.objective != section:
            note(section, given(section), f'they apply to objective = "{section}", this run\'s '
                 f'objective is "{cfg.objective}"')
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
    if cfg.activations.checkpointing != "every_k":
        note("activations", given("activations", ("every_k",)),
             'it applies to activations.checkpointing = "every_k"')
    return out
