"""Hub-style dataset folders' layout, for ``engine/hfdatasets.py``: which data files make which
split, as ``datasets.load_dataset(folder)`` decides (a README.md's ``configs``, a datasets cache
folder's dataset_info.json, else datasets' file and folder name patterns), which suffixes are
data files, and the ``class_label`` names a README.md's ``dataset_info`` gives.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from ember import EmberError

_SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = r"[-._ 0-9]"  # datasets' NON_WORDS_CHARS
_SHARDED = re.compile(r"(?P<split>\w+(?:\.\w+)*)-[0-9]{5}-of-[0-9]{5}.*\..*")

# datasets' loader of each suffix, and its order among suffixes as common
# (load.infer_module_for_data_files_list: Parquet first, then Arrow, JSON Lines, JSON, CSV)
_MODULES = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
}
_RANK = (".tsv", ".csv", ".json", ".jsonl", ".arrow", ".parquet")


def _data_file(name: str) -> bool:
    from ember.engine.datafiles import kind

    return kind(Path(name)) in _MODULES


def _cache_splits(folder: Path, files: list[str]) -> dict[str, list[str]] | None:
    """split -> files of a datasets cache folder (what ``load_dataset(name)`` wrote: Arrow files
    beside a dataset_info.json listing the splits), named as datasets' builder names and reads
    them (naming.filenames_for_dataset_split: ``{dataset_name}-{split}.arrow``, or
    ``-00000-of-00003.arrow`` per entry of the split's ``shard_lengths``), in dataset_info's
    order; None where the folder is not one (a file missing). load_dataset(folder) splits such
    a folder by its file names instead: train_sft and train_gen both in "train"."""
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
        specs = info["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(specs, dict):
        return None
    have, out = set(files), {}
    for split, spec in specs.items():
        spec = spec if isinstance(spec, dict) else {}
        name = spec.get("dataset_name") or info.get("dataset_name") or info.get("builder_name")
        if not isinstance(name, str):
            return None
        name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)  # naming.camelcase_to_snakecase
        prefix = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower() + f"-{split}"
        shards = spec.get("shard_lengths")
        n = len(shards) if isinstance(shards, list) else 0
        names = (
            [f"{prefix}-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
            if n > 1
            else [f"{prefix}.arrow"]
        )
        if not have.issuperset(names):
            if spec.get("num_examples") == 0:
                continue  # (an empty split may have no file)
            return None
        out[str(split)] = names
    return out or None


def _readme_front(folder: Path, key: str = "configs") -> str | None:
    """The YAML front matter of a Hub dataset's README.md when it lists ``key``, else None."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    head = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(\n|$)", text, re.S)
    return head[1] if head and re.search(rf"^{key}:", head[1], re.M) else None


def _readme_labels(folder: Path, config: str | None) -> dict[str, list[str]]:
    """column -> class names of the ``class_label`` features that a Hub dataset's README.md
    ``dataset_info`` gives its config (``config``, else the only or "default" one), which
    load_dataset(folder) casts every data file to (datasets 5.2: a JSONL's integers stay, its
    names become their indices); {} without them, or without PyYAML."""
    front = _readme_front(folder, "dataset_info")
    if not front:
        return {}
    try:
        import yaml
    except ImportError:
        return {}
    try:
        info = yaml.safe_load(front)["dataset_info"]
    except (yaml.YAMLError, TypeError, KeyError):
        return {}
    if isinstance(info, list):  # one per config
        named = {i.get("config_name", "default"): i for i in info if isinstance(i, dict)}
        info = named.get(config or "default") or (info[0] if len(info) == 1 else None)
    feats = info.get("features") if isinstance(info, dict) else None
    out = {}
    for f in feats if isinstance(feats, list) else []:
        dtype = f.get("dtype") if isinstance(f, dict) else None
        names = dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) else None
        if isinstance(names, dict):  # {'0': neg, '1': pos}, as push_to_hub writes them
            with contextlib.suppress(ValueError, TypeError):
                names = [names[k] for k in sorted(names, key=int)]
        if isinstance(names, list):
            out[str(f.get("name"))] = [str(n) for n in names]
    return out


def _readme_splits(folder: Path, config: str | None) -> dict[str, list[str]] | None:
    """split -> files of the config a Hub dataset's README.md front matter lists (``configs``:
    ``data_files`` as a pattern, a list of them, or ``{split, path}`` items, as datasets reads
    them): ``config``, else the only or the ``default: true`` one; None without configs."""
    front = _readme_front(folder)
    if front is None:
        return None
    try:
        import yaml
    except ImportError:
        raise EmberError(
            f"{folder}/README.md lists the dataset's configs: reading them needs "
            "PyYAML (pip install pyyaml)"
        ) from None
    try:
        configs = yaml.safe_load(front)["configs"]
        by_name = {c.get("config_name", "default"): c for c in configs}
    except (yaml.YAMLError, TypeError, KeyError, AttributeError) as e:
        raise EmberError(
            f"{folder}/README.md: its configs cannot be read ({type(e).__name__}: {e})"
        ) from None
    if config is None:
        chosen = [c for c in configs if c.get("default")] or (
            configs if len(configs) == 1 else [c for n, c in by_name.items() if n == "default"]
        )
        if not chosen:
            raise EmberError(
                f"{folder}: a Hub dataset with the configs {', '.join(by_name)} "
                "(README.md) and no default one: name one with its split, e.g. "
                f'"{folder}:{next(iter(by_name))}:train"'
            )
        spec = chosen[0]
    elif config in by_name:
        spec = by_name[config]
    else:
        raise EmberError(
            f"{folder}: no config {config!r} in README.md (it has {', '.join(by_name)})"
        )
    files = spec.get("data_files")
    if isinstance(files, str) or (
        isinstance(files, list) and all(isinstance(f, str) for f in files)
    ):
        files = {"train": files}
    elif isinstance(files, list) and all(isinstance(f, dict) for f in files):
        files = {f.get("split", "train"): f.get("path", []) for f in files}
    if not isinstance(files, dict):
        raise EmberError(
            f"{folder}/README.md: config {spec.get('config_name', 'default')!r} "
            "gives no data_files Ember reads"
        )
    found = {}
    for split, patterns in files.items():
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        hits = {
            p.relative_to(folder).as_posix()
            for pat in patterns
            for p in folder.glob(pat)
            if p.is_file() and _data_file(p.name)
        }
        found[str(split)] = sorted(hits)
    return found


def _split_files(files: list[str]) -> dict[str, list[str]]:
    """split -> files, by datasets' patterns (``datasets.data_files.get_data_patterns``)."""
    if not files:
        return {}
    sharded: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        m = _SHARDED.fullmatch(parts[-1])
        if len(parts) == 2 and parts[0] == "data" and m:
            sharded.setdefault(m["split"], []).append(f)
    if sharded:
        order = [s for s in _SPLIT_KEYWORDS if s in sharded]
        return {s: sharded[s] for s in order + sorted(set(sharded) - set(order))}
    for in_dirs in (True, False):
        out = {}
        for split, words in _SPLIT_KEYWORDS.items():
            word = "|".join(words)
            if in_dirs:  # a folder named like the split (train/, my-train/, train_2024/ ...)
                pat = re.compile(rf"(?:.*{_SEP})?(?:{word})(?:{_SEP}.*)?")
                hit = [f for f in files if any(pat.fullmatch(d) for d in f.split("/")[:-1])]
            else:  # a file name holding it (train.jsonl, my_test-1.csv, ...)
                pat = re.compile(rf"(?:.*{_SEP})?(?:{word}){_SEP}.*")
                hit = [f for f in files if pat.fullmatch(f.split("/")[-1])]
            if hit:
                out[split] = hit
        if out:
            return out
    return {"train": files}
