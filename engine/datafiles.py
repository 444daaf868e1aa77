"""Dataset files other than plain JSONL, turned into the same JSON lines the readers parse
(``ember.engine.data.read_lines``), so every format, check and message applies unchanged:

- ``.json``: one JSON array of objects, or one object ``{"data": [...]}`` holding them (a
  ``.json`` file of one object per line is JSONL);
- ``.csv`` / ``.tsv``: a header row naming the fields, one example per row (RFC 4180 quoting);
  a cell of a list field (``messages``, ``conversations``, ``tools``, ``choices``) that holds a
  JSON array is decoded, as exporting chat data to CSV writes it; so is a ``prompt``,
  ``completion``, ``chosen`` or ``rejected`` cell holding a JSON array of message objects (any
  other such cell is text, "[" or not; one holding messages as a Python repr, "[{'role': ...",
  as pandas' ``to_csv`` writes a list column, is refused). Other columns are typed as pandas
  (Hugging Face ``datasets``) reads a CSV: a column whose cells are all integers, or all
  numbers, holds numbers (labels, margins, answer indices), an empty cell there, or one of
  pandas' default missing-value markers ("NA", "null", "NaN", "None", "<NA>", ...), is a missing
  field; the text
  fields (``text``, ``prompt``, ``question``, ...) stay strings, and so do true/false cells (a
  class name for a classifier; KTO's ``label`` reads "true" / "false" as its booleans);
- ``.parquet`` (what Hugging Face datasets are stored as): rows as objects, list and struct
  columns as JSON arrays and objects; needs ``pyarrow`` (``pip install pyarrow``);
- any of these, or JSONL, compressed with gzip (``.jsonl.gz``, ``.csv.gz`` ...).
- ``.arrow``: an Arrow file as Hugging Face datasets writes it (``Dataset.from_file``: a
  ``save_to_disk`` shard, a file of the datasets cache), read a record batch at a time
  (``ember.engine.hfarrow``); needs ``pyarrow``.
Hugging Face ``datasets`` folders (``save_to_disk`` output, Hub-style folders of data files, the
datasets cache's folders of Arrow files) are read by ``ember.engine.hfdatasets``.
Items of the non-JSONL kinds are named ``file[index]`` (0-based) in reports.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from ember import EmberError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_LIST_FIELDS = ("messages", "conversations", "tools", "choices")  # always arrays
_CHAT_FIELDS = ("prompt", "completion", "chosen", "rejected")  # text, or an array of messages
# Fields that are text whatever they look like ("42" stays the string "42").
_TEXT_FIELDS = (*_CHAT_FIELDS, "text", "instruction", "input", "output", "system", "question")
_INT = re.compile(r"[+-]?[0-9]+")
# Cells that pandas (read_csv's default na_values, pandas' STR_NA_VALUES: what Hugging Face
# datasets reads a CSV with) reads as a missing value in a column of numbers; pyarrow's defaults
# are the same less "None" and "<NA>".
_NA = frozenset(("#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                 "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))


def kind(path: Path) -> str:
    """The data suffix, under any ``.gz``: ``.jsonl``, ``.json``, ``.csv``, ``.tsv``,
    ``.parquet`` or whatever else the name ends with."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def check_data_path(path: Path) -> None:
    """EmberError for a path that is no data file or datasets folder Ember reads, saying what to
    give instead: a folder without data files."""
    from ember.engine import hfdatasets

    src = hfdatasets.source(path)
    if src is not None and hfdatasets.kind(src[0]) is not None:
        return  # a datasets folder, read by ember.engine.hfdatasets
    if path.is_dir():
        # (a folder holding data files outside hidden folders is a datasets folder, above)
        raise EmberError(f"{path}: is a directory without data files (JSONL, JSON, CSV/TSV, "
                         "Parquet, Arrow, or a datasets save_to_disk / Hub folder); give a data "
                         "file; data.train may list several")
    if kind(path) == ".arrow" and path.suffix.lower() == ".gz":  # (read memory-mapped)
        raise EmberError(f"{path}: a gzipped Arrow file; decompress it (gunzip FILE) and give the "
                         ".arrow file")


def open_data(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it is named ``*.gz``; nothing for a datasets folder
    (``table_items`` reads its rows)."""
    from ember.engine import hfdatasets

    check_data_path(path)
    if hfdatasets.source(path) is not None or kind(path) == ".arrow":
        return io.BytesIO()  # (read with pyarrow by table_items)
    if path.suffix.lower() == ".gz":
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise EmberError(f"{path}: named .gz but not gzip-compressed; rename it without "
                                 ".gz, or compress it (gzip FILE)")
        return _GzipReader(path)
    return open(path, "rb")


class _GzipReader(gzip.GzipFile):
    """A gzip file whose damage (truncated, corrupt) is an EmberError that names it."""

    def __init__(self, path: Path):
        super().__init__(path, "rb")
        self.path = path

    def _damaged(self, e: Exception) -> EmberError:
        return EmberError(f"{self.path}: the gzip data is damaged ({type(e).__name__}: {e}); "
                          "re-create the file")

    def read(self, *a):
        try:
            return super().read(*a)
        except (EOFError, OSError, zlib.error) as e:
            raise self._damaged(e) from None

    def readline(self, *a):
        try:
            return super().readline(*a)
        except (EOFError, OSError, zlib.error) as e:
            raise self._damaged(e) from None


def _json_line(obj, path: Path, index: int) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, default=_plain).encode()
    except (TypeError, ValueError) as e:
        raise EmberError(f"{path}[{index}]: a value cannot be read as JSON ({e})") from None


def _plain(value):
    """A JSON stand-in for a Parquet value JSON has no type for (a column the example does not
    use, such as a timestamp, must not make the file unreadable): decimals as numbers, dates and
    times in ISO 8601, bytes as UTF-8 text, anything else as its str()."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _json_array(path: Path, f: IO[bytes]) -> list[bytes] | None:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    f.seek(0)
    if head.startswith(b"{") and kind(path) == ".json":
        return _data_field(path, f)
    if not head.startswith(b"["):
        return None
    try:
        items = json.loads(f.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, RecursionError) as e:
        raise EmberError(f"{path}: not a readable JSON array ({e})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.colno == 1:  # a JSON value per line, the first an array
            raise EmberError(f"{path}: line {e.lineno} starts another JSON value: JSON Lines hold "
                             "one object per line (a list of chat messages is written "
                             '{"messages": [...]})') from None
        raise EmberError(f"{path}: invalid JSON: {e.msg} (line {e.lineno} column {e.colno}); a "
                         ".json dataset is one array of objects, or one object per line") from None
    except ValueError as e:  # an integer past Python's digit limit
        from ember.engine.formats import json_problem

        raise EmberError(f"{path}: invalid JSON: {json_problem(e)}") from None
    return [_json_line(x, path, i) for i, x in enumerate(items)]


def _data_field(path: Path, f: IO[bytes]) -> list[bytes] | None:
    """The items of a .json file that is one object holding them as ``{"data": [...], ...}``
    (SQuAD's layout; ``datasets.load_dataset("json", field="data")``); None for JSON Lines (told
    by their first line, so a big one is not read whole here)."""
    from ember.engine.formats import detect

    def holder(obj) -> bool:
        return isinstance(obj, dict) and isinstance(obj.get("data"), list) and detect(obj) is None

    try:
        first = json.loads(f.readline().decode("utf-8-sig"))
    except (UnicodeDecodeError, RecursionError, ValueError):
        first = None  # an indented object, or a broken line (reported line by line)
    f.seek(0)
    if first is not None and not holder(first):
        return None
    try:
        obj = json.loads(f.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, RecursionError, ValueError):
        obj = None
    f.seek(0)
    if first is None and isinstance(obj, dict) and not holder(obj):
        # one indented object: an example alone, or examples under another key than "data"
        arrays = [k for k, v in obj.items() if isinstance(v, list) and v
                  and all(isinstance(x, dict) for x in v)]
        raise EmberError(f"{path}: one JSON object (keys {sorted(obj)[:8]}), not a dataset: a "
                         ".json dataset is one array of objects, one object {\"data\": [...]} "
                         "holding them, or one object per line (JSON Lines)"
                         + (f"; rename its {arrays[0]!r} array to \"data\"" if arrays else ""))
    return [_json_line(x, path, i) for i, x in enumerate(obj["data"])] if holder(obj) else None


def _csv_rows(path: Path, f: IO[bytes], delimiter: str) -> list[bytes]:
    try:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        rows = list(csv.reader(text, delimiter=delimiter))
    except UnicodeDecodeError as e:
        raise EmberError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        what = "CSV" if delimiter == "," else "TSV"
        raise EmberError(f"{path}: not a readable {what} file ({e})") from None
    if not rows or not any(h.strip() for h in rows[0]):
        raise EmberError(f"{path}: no header row; the first row must name the fields (text, or "
                         "prompt and completion, or messages, ...)")
    header = [h.strip() for h in rows[0]]
    dup = sorted({h for h in header if header.count(h) > 1 and h})
    if dup:
        raise EmberError(f"{path}: header names {dup} more than once")
    body = rows[1:]
    for i, row in enumerate(body):
        if any(c.strip() for c in row) and len(row) != len(header):
            raise EmberError(f"{path}[{i}]: {len(row)} cells for {len(header)} header fields "
                             f"({header}); quote cells that contain the delimiter")
    typed = {j: _column_type([r[j] for r in body if any(c.strip() for c in r)])
             for j, name in enumerate(header) if name and name not in _TEXT_FIELDS
             and name not in _LIST_FIELDS}
    out = []
    for i, row in enumerate(body):
        if not any(c.strip() for c in row):
            out.append(b"")  # a blank row: counted as blank, like a blank JSONL line
            continue
        obj = {}
        for j, (name, cell) in enumerate(zip(header, row, strict=True)):
            if not name:
                continue
            value = cell
            if name in _LIST_FIELDS and cell.lstrip().startswith("["):
                try:
                    value = json.loads(cell)
                except ValueError as e:  # (a number past Python's digit limit too)
                    from ember.engine.formats import json_problem

                    raise EmberError(f"{path}[{i}]: field {name!r} looks like a JSON array but "
                                     f"is not valid JSON ({json_problem(e)})"
                                     + _REPR_HINT * _python_repr(cell)) from None
            elif name in _CHAT_FIELDS and cell.lstrip().startswith("["):
                value = _messages_or_text(cell)
                if value is cell and _python_repr(cell):
                    raise EmberError(f"{path}[{i}]: field {name!r} holds messages written as a "
                                     "Python repr, not JSON" + _REPR_HINT)
            elif typed.get(j) is not None:
                if not cell.strip() or cell.strip() in _NA:
                    continue  # an empty or NA cell of a number column: the field is missing
                value = typed[j](cell.strip())
            obj[name] = value
        out.append(_json_line(obj, path, i))
    return out


def _column_type(cells: list[str]):
    """How pandas would type a CSV column of numbers: int or float, or None (text). Python's
    float() also reads digits grouped with "_" ("1_1") and non-ASCII digits, which pandas (and
    pyarrow) keep as text: class names such as "1_1" must not become the number 11. Their
    missing-value cells ("NA", "null", "NaN", ...) are left out, as pandas reads them."""
    cells = [c.strip() for c in cells if c.strip() and c.strip() not in _NA]
    if not cells:
        return None
    if all(_INT.fullmatch(c) for c in cells):
        return int
    if any("_" in c or not c.isascii() for c in cells):
        return None
    try:
        for c in cells:
            float(c)
    except ValueError:
        return None
    return float


_REPR_HINT = ("; single-quoted dicts are what pandas' to_csv (and datasets' to_csv) write for "
              "list columns: write the cells with json.dumps, or export to JSONL / Parquet")
_REPR = re.compile(r"\[\s*\{\s*'(role|content|from|value)'\s*:")  # [{'role': ...


def _python_repr(cell: str) -> bool:
    """Whether a cell is a Python repr of messages (pandas' to_csv of a list column), which JSON
    cannot read and which must not be trained as the text it spells."""
    return _REPR.match(cell.lstrip()) is not None


def _messages_or_text(cell: str):
    """A chat field's cell: its JSON array of message objects, or the text as it is."""
    try:
        value = json.loads(cell)
    except ValueError:  # (a number past Python's digit limit too)
        return cell
    return value if isinstance(value, list) and value and all(
        isinstance(m, dict) for m in value) else cell


def _parquet_rows(path: Path, f: IO[bytes]) -> Iterator[bytes]:
    """The rows of a Parquet file, a batch at a time (a 1M-row file as Python objects whole was
    ~400 MB); a file that is no Parquet is an EmberError at once."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmberError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or "
                         "convert the file to JSONL") from None
    try:
        file = pq.ParquetFile(f)
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise EmberError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    from ember.engine.hfarrow import named, text_labels

    text = text_labels(file.schema_arrow)  # datasets' ClassLabel names, where they are text
    return (_json_line(named(row, text), path, i)
            for i, row in enumerate(_parquet_batch_rows(path, file)))


def _parquet_batch_rows(path: Path, file) -> Iterator[dict]:
    try:
        for batch in file.iter_batches(batch_size=1000):
            yield from batch.to_pylist()
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise EmberError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def table_items(path: Path, f: IO[bytes]) -> Iterable[bytes] | None:
    """The examples of a JSON-array, CSV/TSV, Parquet or Arrow file or of a datasets folder as
    JSON lines; None for JSONL (read line by line from ``f``)."""
    from ember.engine import hfarrow, hfdatasets

    if hfdatasets.source(path) is not None:
        return hfdatasets.items(path)
    k = kind(path)
    if k == ".arrow":
        return (_json_line(r, path, i) for i, r in enumerate(hfarrow.rows([path], path)))
    if k not in TABLE_SUFFIXES:  # a .json array, or one in a file named .jsonl (a JSON Lines
        return _json_array(path, f)  # line never starts with "["): else None, read as lines
    if k in (".csv", ".tsv"):
        return _csv_rows(path, f, "," if k == ".csv" else "\t")
    if k == ".parquet":
        return _parquet_rows(path, f)
    return None


def iter_items(path: Path) -> Iterator[bytes]:
    """The raw examples of a data file of any kind above: JSONL lines, or the items of a
    JSON-array / CSV / TSV / Parquet file as JSON lines."""
    with open_data(path) as f:
        items = table_items(path, f)
        yield from (f if items is None else items)
