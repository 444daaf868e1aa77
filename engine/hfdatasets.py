"""Hugging Face ``datasets`` folders read as data, without the ``datasets`` package:

- a ``save_to_disk`` folder of a ``Dataset``: ``state.json`` listing the Arrow IPC *stream*
  shards (``_data_files``), read in that order with pyarrow; an indices mapping
  (``_indices_data_files``, written by datasets 1.x for a ``select`` / ``shuffle``d dataset) is
  applied as ``load_from_disk`` applied it;
- a ``save_to_disk`` folder of a ``DatasetDict``: ``dataset_dict.json`` over one such folder per
  split;
- a Hub-style folder of data files (a snapshot: ``data/train-00000-of-00002.parquet``,
  ``train.jsonl``, ``test.csv``, ...; a datasets cache folder: ``json-train.arrow``,
  ``json-test-00000-of-00002.arrow``, ...), split as ``datasets.load_dataset(folder)`` infers splits
  from file and folder names (``datasets.data_files``): ``data/{split}-NNNNN-of-NNNNN.*`` shards
  first, then folder names, then file names holding train/training, validation/valid/dev/val,
  test/testing/eval/evaluation; else every file is the train split; a README.md whose front
  matter lists ``configs`` gives each config's ``data_files`` instead (the only or default
  config, or ``"folder:config:split"``; needs PyYAML).

A split is named ``"folder:split"``; ``"folder"`` alone is a ``Dataset`` folder's rows, or the
split named like the setting that gives it (``with_split``: data.train takes ``train``). Rows come
in stored order, every shard, as JSON lines (nested list / struct columns as JSON arrays and
objects, as the Parquet reader writes them); they are named ``"folder:split[index]"`` in reports,
the index being the row's in ``load_from_disk(folder)[split]`` / ``load_dataset(folder,
split=split)``. Rows are read as they are used (``ember.engine.hfarrow``); a folder is walked once
per load (``one_walk``). ``class_names``: a ``ClassLabel`` column's names, for a classifier.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ember import EmberError
from ember.engine import hfarrow
from ember.engine.hfdatasets_hub import (
    _MODULES,
    _RANK,
    _cache_splits,
    _data_file,
    _readme_front,
    _readme_labels,
    _readme_splits,
    _split_files,
)

# datasets' FILES_TO_IGNORE
_IGNORED = {
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
}
_BUDGET = 20000  # names looked at in a Hub-style folder before it is refused as too big


def source(path: Path) -> tuple[Path, str | None] | None:
    """(folder, split) of a data path that names a datasets folder (``"folder"``,
    ``"folder:split"``, or ``"folder:config:split"`` for a Hub folder whose README lists configs:
    split "config:split"); None for anything else (a file, or a path that does not exist)."""
    path = path.expanduser()  # (a TOML path "~/data/ds:train", as absolute_paths expands one)
    if path.is_dir():
        return path, None
    folder, sep, split = str(path).rpartition(":")
    if not sep or not split or "/" in split or path.exists():
        return None
    if Path(folder).is_dir():
        return Path(folder), split
    folder, sep, config = folder.rpartition(":")
    if sep and config and "/" not in config and Path(folder).is_dir():
        return Path(folder), f"{config}:{split}"
    return None


def exists(value: str) -> bool:
    """Whether a data path exists: a file, a folder, or ``"folder:split"`` of an existing folder
    (the split itself is checked when it is read)."""
    return Path(value).exists() or source(Path(value)) is not None


def absolute(value: str) -> str:
    """``value`` made absolute, a ``:split`` suffix kept."""
    src = source(Path(value))
    if src is not None and src[1] is not None:
        return f"{os.path.abspath(src[0])}:{src[1]}"
    return os.path.abspath(value)


def kind(folder: Path) -> str | None:
    """What a folder is: "dataset" (a save_to_disk Dataset), "dict" (a save_to_disk
    DatasetDict), "hub" (a folder of data files) or None (none of them)."""
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file():
        return "dataset"
    return "hub" if _readme_front(folder) is not None or _hub_files(folder) else None


def splits(folder: Path, config: str | None = None) -> list[str]:
    """The split names of a DatasetDict or Hub-style folder (of its README's ``config``), in
    datasets' order; an EmberError where it has none."""
    k = kind(folder)
    names = _dict_splits(folder) if k == "dict" else list(_hub_splits(folder, config))
    if not names:
        raise EmberError(
            f"{folder}: a Hugging Face datasets folder without data files in any "
            "split" + (" (README.md's configs match none)" if k == "hub" else "")
        )
    return names


def with_split(value: str, split: str, setting: str = "") -> str:
    """``"folder:split"`` for a data path that is a DatasetDict or Hub-style folder given without
    a split (``split``: the setting's, "train" for data.train; ``setting``: its name, default
    ``data.<split>``); anything else unchanged. A folder without that split is an EmberError
    naming its splits."""
    setting = setting or f"data.{split}"
    src = source(Path(value))
    if src is None or src[1] is not None or kind(src[0]) not in ("dict", "hub"):
        return value
    have = splits(src[0])
    if split not in have:
        given = f"{setting} " if setting.startswith("--") else f"{setting} = "
        raise EmberError(
            f"{value}: a Hugging Face datasets folder with the splits {', '.join(have)} but no "
            f"{split!r} split for {setting}; name the one to use, e.g. {given}"
            f'"{value}:{have[0]}"'
        )
    return f"{value}:{split}"


def named_splits(data):
    """A ``DataConfig`` whose datasets folders given without a split name the split of their
    setting: data.train's ``train``, data.validation's ``validation``, data.test's ``test``."""
    from dataclasses import replace

    val = data.validation
    if isinstance(val, str):
        val = with_split(val, "validation")
    elif val is not None:
        val = tuple(with_split(v, "validation") for v in val)
    new = replace(
        data,
        train=tuple(with_split(p, "train") for p in data.train),
        validation=val,
        test=None if data.test is None else with_split(data.test, "test"),
    )
    return data if new == data else new


def _dict_splits(folder: Path) -> list[str]:
    try:
        names = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmberError(
            f"{folder}/dataset_dict.json: not a readable DatasetDict description "
            f"({type(e).__name__}: {e})"
        ) from None
    return [str(s) for s in names]


# Listings of the folders walked while one_walk is under way (None: not under way, each call
# walks): a load asks kind / splits / items / hub_files of each split, ~10 walks of each folder.
_WALKS: dict | None = None


@contextlib.contextmanager
def one_walk() -> Iterator[None]:
    """Within it (and as a decorator: a config's resolution, a load of its splits), each
    datasets folder is walked once and that listing serves every split and setting; nothing is
    kept after (a folder may change between runs: no listing is trusted across them)."""
    global _WALKS
    if _WALKS is not None:  # nested: the outer one's listings
        yield
        return
    _WALKS = {}
    try:
        yield
    finally:
        _WALKS = None


def _walked(what: str, folder: Path, config: str | None, walk):
    if _WALKS is None:
        return walk()
    key = (what, os.path.abspath(folder), config)
    if key not in _WALKS:
        _WALKS[key] = walk()
    return _WALKS[key]


def _hub_files(folder: Path) -> list[str]:
    """The data files of a Hub-style folder, relative, sorted; hidden and ``__*`` folders and
    files left out, as datasets leaves them out."""
    return _walked("files", folder, None, lambda: _walk_files(folder))


def _walk_files(folder: Path) -> list[str]:
    found, budget = [], _BUDGET
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        budget -= len(names) + len(dirs)
        if budget < 0:
            raise EmberError(
                f"{folder}: a folder of more than {_BUDGET} files and folders, "
                "not read as a dataset folder; give its data files"
            )
        rel = Path(root).relative_to(folder)
        found += [
            (rel / n).as_posix()
            for n in names
            if not n.startswith((".", "__")) and n not in _IGNORED and _data_file(n)
        ]
    return sorted(found)


def _hub_splits(folder: Path, config: str | None = None) -> dict[str, list[str]]:
    """split -> files of a Hub-style folder: those its README's ``configs`` give (``config``, or
    its only or default one), else as ``datasets.data_files.get_data_patterns`` resolves them;
    each split keeps the files of the format most of its files have, as ``load_dataset`` reads
    only those (where splits differ in format, datasets refuses the folder: Ember reads each);
    empty: no data files."""
    return _walked("splits", folder, config, lambda: _walk_splits(folder, config))


def _walk_splits(folder: Path, config: str | None) -> dict[str, list[str]]:
    from ember.engine.datafiles import kind as suffix

    listed = _readme_splits(folder, config)
    if listed is None and config is not None:
        raise EmberError(
            f"{folder}: no README.md configs, so no config {config!r}: name the "
            "split alone (FOLDER:split)"
        )
    if listed is None:
        files = _hub_files(folder)
        listed = _cache_splits(folder, files) or _split_files(files)
    out = {}
    for split, files in listed.items():
        count = Counter(suffix(Path(f)) for f in files)
        if count:
            module = _MODULES[max(count, key=lambda k: (count[k], _RANK.index(k)))]
            out[split] = [f for f in files if _MODULES[suffix(Path(f))] == module]
    return out


def items(path: Path) -> Iterator[bytes]:
    """The rows of a datasets folder path (``source``) as JSON lines, read as they are asked for
    (what is wrong with the folder or split is raised at once)."""
    from ember.engine.datafiles import _json_line

    folder, split = source(path)
    config, _, split = split.rpartition(":") if split else ("", "", None)
    config = config or None
    k = kind(folder)
    if k is None:
        raise EmberError(
            f"{folder}: neither a Hugging Face datasets save_to_disk folder "
            "(state.json / dataset_dict.json) nor a folder of data files"
        )
    if k == "dataset":
        if split is not None:
            raise EmberError(
                f"{path}: {folder} is one saved Dataset, without splits: give the folder alone"
            )
        rows = hfarrow.saved_rows(folder)
    elif split is None:
        raise EmberError(
            f"{folder}: a Hugging Face datasets folder with the splits "
            f'{", ".join(splits(folder))}: name one, e.g. "{folder}:'
            f'{splits(folder)[0]}"'
        )
    elif split not in splits(folder, config):
        have = ", ".join(splits(folder, config))
        raise EmberError(f"{path}: no split {split!r} in {folder} (it has {have})")
    elif k == "dict":
        sub = folder / split
        if not (sub / "state.json").is_file():
            raise EmberError(
                f"{sub}: the DatasetDict's {split!r} folder has no state.json; "
                "save the dataset again (save_to_disk)"
            )
        rows = hfarrow.saved_rows(sub)
    else:
        files = _hub_splits(folder, config)[split]
        _one_cache(folder, split, files)
        return _hub_rows(folder, files)
    return (_json_line(r, path, i) for i, r in enumerate(rows))


def _one_cache(folder: Path, split: str, files: list[str]) -> None:
    """An EmberError where a split's files lie in several datasets cache folders (a folder of
    the datasets cache above them: ``json/`` holds a ``default-<hash>/0.0.0/<hash>/`` folder per
    load_dataset call): load_dataset(folder) reads every one of them, each row once per copy."""
    leaves = sorted({str(Path(f).parent) for f in files})
    leaves = [d for d in leaves if (folder / d / "dataset_info.json").is_file()]
    if len(leaves) > 1:
        raise EmberError(
            f"{folder}: its {split!r} files lie in {len(leaves)} datasets cache folders "
            f"({', '.join(leaves[:3])}{', ...' * (len(leaves) > 3)}), each a dataset of its "
            "own with its dataset_info.json (the datasets cache keeps one per load_dataset call: "
            f'read together, each row once per copy): name one, e.g. "{folder / leaves[0]}:{split}"'
        )


def hub_files(path: Path) -> list[str]:
    """The files a Hub-style folder's split (``"folder:split"``) reads, relative to the folder;
    empty for anything else (a file, a save_to_disk folder, a split that is not there)."""
    src = source(path)
    if src is None or src[1] is None or kind(src[0]) != "hub":
        return []
    config, _, split = src[1].rpartition(":")
    with contextlib.suppress(EmberError):
        return list(_hub_splits(src[0], config or None).get(split, []))  # (a copy: one_walk)
    return []


def _hub_rows(folder: Path, files: list[str]) -> Iterator[bytes]:
    """The split's rows: each file's in order, files in sorted order; blank JSONL lines skipped,
    as datasets' JSON reader skips them."""
    from ember.engine.datafiles import open_data, table_items

    for name in files:
        f_path = folder / name
        with open_data(f_path) as f:
            rows = table_items(f_path, f)
            yield from (r for r in (f if rows is None else rows) if r.strip())


def class_names(paths, field: str) -> tuple[str, ...] | None:
    """The class names of ``field`` where datasets stores it as a ``ClassLabel`` (integers with
    names in its Arrow / Parquet files' features, or in a Hub folder README's ``dataset_info``,
    which load_dataset casts its files to) in any of the data paths (``data.train``), in
    their order, as transformers' run_classification takes them (``features[field].names``);
    None where no path has one. Paths whose names differ are an EmberError: an index would mean
    one class in one path and another in the next."""
    found: dict[str, tuple[str, ...]] = {}
    for p in paths:
        with contextlib.suppress(EmberError):  # (reading the path reports what is wrong)
            names = _readme_class_names(Path(p)).get(field)
            file = None if names else _first_table_file(Path(p))
            if file is not None:
                names = hfarrow.labels_of(hfarrow.schema_of(file)).get(field)
            if names:
                found[str(p)] = tuple(names)
    if len(set(found.values())) > 1:
        raise EmberError(
            f"the {field!r} classes differ between the datasets: "
            + "; ".join(f"{p}: {list(n)}" for p, n in found.items())
            + " (datasets ClassLabel names): the same index names a different class in each; "
            "map them to one list (datasets' align_labels_with_mapping) and save them again"
        )
    return next(iter(found.values()), None)


def class_remap(path, field: str, labels: tuple[str, ...]):
    """A function mapping a row's ``field`` value to the index ``labels`` gives its class, where
    the path's ``ClassLabel`` names are ``labels`` in another order (matched case-insensitively,
    as transformers' run_glue maps a dataset's label indices to a model's label2id): a row's
    integer is an index into the ClassLabel's names, not into ``labels``; else the identity
    (other names: the indices are taken as they are, as before)."""
    names = class_names([path], field)
    low = {label.lower(): i for i, label in enumerate(labels)}
    if (
        not names
        or list(names) == list(labels)
        or len(low) != len(labels)
        or sorted(n.lower() for n in names) != sorted(low)
    ):
        return lambda v: v
    table = [low[n.lower()] for n in names]
    return lambda v: (
        table[v] if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(table) else v
    )


def _readme_class_names(path: Path) -> dict[str, list[str]]:
    """``_readme_labels`` of a Hub-style folder's split (``"folder:split"``), {} for others."""
    src = source(path)
    if src is None or src[1] is None or kind(src[0]) != "hub":
        return {}
    config, _, _ = src[1].rpartition(":")
    return _readme_labels(src[0], config or None)


def _first_table_file(path: Path) -> Path | None:
    """The first Arrow / Parquet file a data path reads (where datasets' features are), or
    None (a JSONL, JSON or CSV file or split)."""
    from ember.engine.datafiles import kind as suffix

    src = source(path)
    if src is None:
        return path if suffix(path) in (".arrow", ".parquet") and path.is_file() else None
    folder, split = src
    config, _, split = split.rpartition(":") if split else ("", "", None)
    k = kind(folder)
    if k == "dataset" and split is None:
        files = hfarrow.state_shards(folder)[0]
    elif k == "dict" and split is not None:
        files = hfarrow.state_shards(folder / split)[0]
    elif k == "hub" and split is not None:
        files = [folder / f for f in _hub_splits(folder, config or None).get(split, [])]
    else:
        files = []
    return next((f for f in files if suffix(f) in (".arrow", ".parquet")), None)
