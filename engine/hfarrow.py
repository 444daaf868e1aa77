"""Arrow IPC files as Hugging Face ``datasets`` writes them, read with pyarrow (no ``datasets``):

- a ``save_to_disk`` folder's shards (``state.json``'s ``_data_files``, in that order), with
  datasets 1.x's indices mapping (``_indices_data_files``) applied as ``load_from_disk`` did;
- a lone ``.arrow`` file (``datasets.Dataset.from_file``: a shard, or a file of the datasets
  cache, ``<name>-train.arrow`` / ``<name>-train-00000-of-00003.arrow``); a cache folder is a
  folder of such files, split by their names as ``load_dataset(folder)`` splits it
  (``ember.engine.hfdatasets``).

datasets writes the IPC *stream* format (``ArrowWriter``) and reads only that; an IPC *file*
(random-access format) is read too. Rows are read a record batch at a time, so a big dataset is
never held as Python objects whole (1M rows: the JSON lines' size, not ten times it).

``ClassLabel`` columns (integers with names in the schema's ``huggingface`` metadata, which
datasets writes into every Arrow and Parquet file) stay integers, as datasets gives them, except in
the fields Ember reads as text (``completion``, ``output``, ...: ``datafiles._TEXT_FIELDS``), where
the name is what a user means (``features[name].int2str``); ``class_names`` gives the names, in
order, to a classification head.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ember import EmberError


def pyarrow(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
    except ImportError:
        raise EmberError(
            f"{path}: reading a datasets folder needs pyarrow (pip install pyarrow), "
            "or export it to JSONL (load_from_disk(FOLDER).to_json(...))"
        ) from None
    return pa


def _open(path: Path):
    """(schema, record batches) of an Arrow IPC stream or file; memory-mapped, so a batch is
    read when it is used."""
    pa = pyarrow(path)
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            return reader.schema, iter(reader)
        except pa.ArrowInvalid:  # an Arrow IPC file (random-access format) instead
            source.seek(0)
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise EmberError(f"{path}: not a readable Arrow file ({type(e).__name__}: {e})") from None


def _batches(path: Path, batches) -> Iterator:
    try:
        yield from batches
    except Exception as e:  # a shard cut short, damaged past its schema
        raise EmberError(f"{path}: not a readable Arrow file ({type(e).__name__}: {e})") from None


def table(path: Path):
    """The whole table of an Arrow file (a small one: datasets 1.x's indices)."""
    pa = pyarrow(path)
    schema, batches = _open(path)
    return pa.Table.from_batches(list(_batches(path, batches)), schema)


def features(schema) -> dict:
    """datasets' features of an Arrow / Parquet schema (its ``huggingface`` metadata), {} where
    it has none."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feats = json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return feats if isinstance(feats, dict) else {}


def labels_of(schema) -> dict[str, list[str]]:
    """column -> class names of the schema's top-level ``ClassLabel`` columns."""
    out = {}
    for name, f in features(schema).items():
        if (
            isinstance(f, dict)
            and f.get("_type") == "ClassLabel"
            and isinstance(f.get("names"), list)
        ):
            out[name] = [str(n) for n in f["names"]]
    return out


def text_labels(schema) -> dict[str, list[str]]:
    """``labels_of`` the columns Ember reads as text (``datafiles._TEXT_FIELDS``)."""
    from ember.engine.datafiles import _TEXT_FIELDS

    return {k: v for k, v in labels_of(schema).items() if k in _TEXT_FIELDS}


def named(row: dict, text: dict[str, list[str]]) -> dict:
    """``row`` with the class names of its ``text_labels`` columns for their integers."""
    for col, names in text.items():
        v = row.get(col)
        if isinstance(v, int) and 0 <= v < len(names):
            row[col] = names[v]
    return row


def rows(shards: list[Path], where: Path) -> Iterator[dict]:
    """The rows of Arrow shards, in order, a record batch at a time; shards whose columns differ
    from the first's are an EmberError naming ``where``."""
    first = None
    for shard in shards:
        schema, batches = _open(shard)
        plain = schema.remove_metadata()
        if first is None:
            first = plain
        elif not plain.equals(first):
            raise EmberError(
                f"{where}: its shards' columns differ ({shard.name}: {plain.names} of "
                f"{[str(t) for t in plain.types]}, the first: {first.names} of "
                f"{[str(t) for t in first.types]})"
            )
        text = text_labels(schema)
        for batch in _batches(shard, batches):
            for row in batch.to_pylist():
                yield named(row, text) if text else row


def schema_of(path: Path):
    """The schema of an Arrow or Parquet file (its first, for a save_to_disk folder's)."""
    from ember.engine.datafiles import kind, open_data

    if kind(path) == ".parquet":  # (also gzipped or upper case, as the rows are read)
        import pyarrow.parquet as pq

        try:
            with open_data(path) as f:
                return pq.ParquetFile(f).schema_arrow
        except Exception as e:  # pyarrow's errors have no common base worth naming
            raise EmberError(f"{path}: not a readable Parquet file ({e})") from None
    return _open(path)[0]


def state_shards(folder: Path) -> tuple[list[Path], list[Path]]:
    """(data shards, indices shards) of a save_to_disk Dataset folder, from state.json."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        shards = [folder / d["filename"] for d in state["_data_files"]]
        indices = [folder / d["filename"] for d in state.get("_indices_data_files") or []]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmberError(
            f"{folder}/state.json: not a readable datasets state file ({type(e).__name__}: {e})"
        ) from None
    missing = [s.name for s in shards + indices if not s.is_file()]
    if missing:
        raise EmberError(
            f"{folder}: state.json lists {', '.join(missing)}, which is not there; "
            "copy the whole folder"
        )
    return shards, indices


def saved_rows(folder: Path) -> Iterator[dict]:
    """The rows of a save_to_disk Dataset folder, shards in state.json's order (checked before
    the first row is asked for)."""
    shards, indices = state_shards(folder)
    pyarrow(folder)
    if indices:
        return iter(_selected_rows(folder, shards, indices))
    return rows(shards, folder)


def _selected_rows(folder: Path, shards: list[Path], indices: list[Path]) -> list[dict]:
    """datasets 1.x: row i is table[indices[i]] (the whole table is read: a random access)."""
    pa = pyarrow(folder)
    try:
        whole = pa.concat_tables([table(s).replace_schema_metadata() for s in shards])
    except pa.ArrowInvalid as e:
        raise EmberError(f"{folder}: its shards' columns differ ({e})") from None
    try:
        idx = pa.concat_tables([table(s) for s in indices])
        whole = whole.take(idx.column(0))
    except (KeyError, TypeError, IndexError, pa.ArrowException) as e:
        raise EmberError(
            f"{folder}: its indices mapping (_indices_data_files) cannot be "
            f"applied ({type(e).__name__}: {e}); save the dataset again with "
            "a recent datasets (save_to_disk writes the selected rows)"
        ) from None
    text = text_labels(schema_of(shards[0])) if shards else {}
    return [named(r, text) for r in whole.to_pylist()]
