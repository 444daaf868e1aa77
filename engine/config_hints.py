"""Helpers of the config loader for a user's mistakes: the key a misspelled one probably meant,
what a file given in place of a config is (``ember train data.jsonl``), and which keys take a list
(``--set eval.metrics=exact_match,f1``); ``--set lora={rank=8}`` merges into the file's table; how
to write a value of the wrong type that plainly means one (``max_steps = 10.0``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# where a file that is not a config belongs in one ({p}: its path)
WHERE = {"a data file": 'data.train = ["{p}"] (or --set data.train={p})',
         "a model": 'model.name = "{p}" (or --set model.name={p})',
         "a model's config.json": 'model.name = "{p.parent}" (the folder; or --set '
                                  'model.name={p.parent})'}


def did_you_mean(key: str, valid, sections: dict[str, set[str]]) -> str:
    """`` (did you mean 'x'?)`` for a misspelled or wrongly cased key, or a section's key given
    at the top level (``lr`` -> ``optim.lr``; ``sections``: each table's keys); empty if nothing
    is close."""
    close = [v for v in valid if v.lower() == key.lower()]
    close = close or [f"{name}.{key}" for name, keys in sections.items() if key in keys]
    close = close or difflib.get_close_matches(key, sorted(valid), n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def not_a_config(p: Path) -> str | None:
    """"a data file" / "a model" for a file that plainly is one (by its suffix), else None."""
    suffixes = [s.lower() for s in p.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if p.name in ("config.json", "adapter_config.json") and p.parent.is_dir():
        return "a model's config.json"  # of a model folder or adapter: the folder is the model
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow"):
        return "a data file"
    if suffixes and suffixes[-1] in (".gguf", ".safetensors", ".bin"):
        return "a model"
    return None


def key_type(cls, path: list[str]):
    """The type of the key at ``path`` of config dataclass ``cls`` (None: no such key)."""
    for part in path[:-1]:
        cls = typing.get_type_hints(cls).get(part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
    return typing.get_type_hints(cls).get(path[-1])


def takes_a_list(cls, path: list[str]) -> bool:
    """Whether the key at ``path`` of config dataclass ``cls`` takes a list (a tuple field, alone
    or in a union)."""
    tp = key_type(cls, path)
    return any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp)))


def merged_tables(base: dict, new: dict) -> dict:
    """``base`` with ``new``'s keys set (tables merged key by key, at every depth)."""
    return {**base, **{k: merged_tables(base[k], v) if isinstance(v, dict) and isinstance(
        base.get(k), dict) else v for k, v in new.items()}}


def fix_hint(value, tp, key: str) -> str:
    """How to write ``value`` as a ``tp`` when it plainly means one (10.0 for an integer, "10"
    quoted for a number, "true" quoted for a boolean); empty otherwise."""
    lhs = "" if key.endswith("]") else f"{key} = "  # (a list item: the value alone)
    if tp is int and isinstance(value, float) and value.is_integer():
        return f" (write {lhs}{int(value)}: an integer has no decimal point)"
    if tp in (int, float) and isinstance(value, str):
        number = _toml_number(value.strip())
        if isinstance(number, (int, float)) and not isinstance(number, bool) and (
                math.isfinite(number) and (tp is float or isinstance(number, int))):
            return f" (write {lhs}{value.strip()} without quotes: a number)"
    if tp is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return f" (write {lhs}{value.strip().lower()}, lowercase and without quotes)"
    if tp is bool and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return f" (write {lhs}{'true' if value else 'false'})"
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        tail = "" if key.endswith("]") else f"; --set '{key}=\"{value}\"'"
        return f' (write {lhs}"{value}", in quotes: a string{tail})'
    return ""


def _toml_number(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None


def check_dtype(key: str, dtype: str) -> None:
    """``"auto"`` or a weights dtype the model loader takes (``resolve_dtype``), else an error
    naming ``key``."""
    from ember import EmberError
    from ember.models.loading import resolve_dtype

    if dtype == "auto":
        return
    try:
        resolve_dtype(dtype)
    except EmberError:
        raise EmberError(f'{key} must be "auto", "float32", "bfloat16" or "float16" (or fp32, '
                         f"bf16, fp16), got {dtype!r}") from None
