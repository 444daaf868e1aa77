"""Hints in the errors of a run config: the key a misspelled one probably meant, and what a file
given in place of a config is (``ember train data.jsonl``)."""

from __future__ import annotations

import difflib
from pathlib import Path

# where a file that is not a config belongs in one ({p}: its path)
WHERE = {"a data file": 'data.train = ["{p}"] (or --set data.train={p})',
         "a model": 'model.name = "{p}" (or --set model.name={p})'}


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
    if suffixes and suffixes[-1] in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        return "a data file"
    if suffixes and suffixes[-1] in (".gguf", ".safetensors", ".bin"):
        return "a model"
    return None
