"""Helpers of the config loader for a user's mistakes: the key a misspelled one probably meant,
what a file given in place of a config is (``ember train data.jsonl``), and which keys take a list
(``--set eval.metrics=exact_match,f1``); ``--set lora={rank=8}`` merges into the file's table."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

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
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
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
