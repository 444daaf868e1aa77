"""The data of a classification run (``engine/classification.py``): the class names inferred
from the training files (``infer_labels``) and the reader of labelled lines (``load_labelled``,
``read_head_file``), which the one-output heads of ``engine/reward.py`` build on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ember import EmberError
from ember.engine.data import (
    IGNORE,
    DataConfig,
    Datasets,
    Example,
    _Bad,
    _Reader,
    _type_name,
    load_datasets,
    read_lines,
    with_system_prompt,
)
from ember.engine.datafiles import iter_items
from ember.engine.hfdatasets import class_names, class_remap


def infer_labels(paths, field: str = "label") -> tuple[str, ...]:
    """datasets' ``ClassLabel`` names of ``field`` (``hfdatasets.class_names``), else the sorted
    distinct labels of the data files of any kind data.train reads (integers: ``"0" ..
    str(max)``, refused where fewer than half of them occur: ids, not class indices). Lines
    that do not parse are left to the data loader to report."""
    if (classes := class_names(paths, field)) and len(classes) > 1:
        return classes
    # One streaming pass: only the distinct labels are kept (the order rule is sorted names or
    # 0..max index), not the file's lines (a list of them was ~120 MB at 1M short rows).
    names, indices, others = set(), set(), {}
    for path in paths:
        try:
            for raw in iter_items(Path(path)):
                try:
                    obj = json.loads(raw.decode("utf-8-sig"))
                except (ValueError, RecursionError):  # (a number past json's digit limit too)
                    continue
                v = obj.get(field) if isinstance(obj, dict) else None
                if isinstance(v, str) and v:
                    names.add(v)
                elif isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    indices.add(v)
                elif v is not None:  # left to the reader (a bad line); named if nothing else is
                    kind = "empty string" if v == "" else _type_name(v)
                    others[kind] = others.get(kind, 0) + 1
        except OSError as e:  # opening it, or a read error part-way (a corrupt .gz)
            raise EmberError(
                f"{path}: cannot read the training file to find the labels ({e})"
            ) from None
    where = ", ".join(map(str, paths))
    if names and indices:
        raise EmberError(
            f"{where}: the {field!r} values mix names and indices; list the class "
            "names in order in [head] labels"
        )
    top = max(indices, default=-1)
    if top + 1 > 2 * len(indices):  # ids, not class indices (1001, 2002: 2003 classes, most
        # never seen; 20000002: a head too big to allocate)
        raise EmberError(
            f"{where}: the {field!r} values are integers up to {top} but only "
            f"{len(indices)} distinct ones occur; as class indices they would make {top + 1} "
            "classes, most never seen in training. If they are ids, write them as strings "
            '(e.g. "1001"; the classes are then the sorted names), or list the class names '
            "in index order in [head] labels"
        )
    labels = (
        tuple(sorted(names))
        if names
        else tuple(str(i) for i in range(top + 1))
    )
    if len(labels) < 2:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(others.items()))
        hint = (
            f"the other {field!r} values ({kinds}) are neither class names (strings) nor "
            'indices (integers >= 0): write the classes as strings (e.g. "true" / "false"), '
            'or train numeric targets with head.type = "regression"'
            + ("; each line has one class (multi-label classification is not supported)"
               if "array" in others else "")
            if others
            else "check the field name (head.label_field) or list the names in [head] labels"
        )
        raise EmberError(
            f"{where}: found {len(labels)} distinct {field!r} value(s) "
            f"{list(labels)}; a classifier needs at least two: {hint}"
        )
    return labels


def strip_pad(ids: list[int], pad: int | None) -> list[int]:
    """``ids`` without trailing ``pad`` tokens (where the head pools: the last real token)."""
    n = len(ids)
    while n and ids[n - 1] == pad:
        n -= 1
    return ids[:n]


class _ClassReader(_Reader):
    def __init__(self, path: Path, cfg: DataConfig, tokenizer, labels, field: str, pad):
        super().__init__(path, cfg, tokenizer)
        self.labels, self.field, self.pad = tuple(labels), field, pad
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.remap = class_remap(path, field, self.labels)  # datasets ClassLabel indices

    def _label(self, obj: dict) -> int:
        if self.field not in obj:
            raise _Bad(
                "missing field", f"missing field {self.field!r} (keys present: {sorted(obj)})"
            )
        v = self.remap(obj[self.field])
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < len(self.labels):
                raise _Bad(
                    "unknown label",
                    f"label index {v} out of range for "
                    f"{len(self.labels)} labels {list(self.labels)}",
                )
            return v
        if not isinstance(v, str):
            raise _Bad(
                "wrong type",
                f"field {self.field!r} must be a class name (string) or "
                f"index (integer), got {_type_name(v)}",
            )
        if v not in self.index:
            raise _Bad("unknown label", f"unknown label {v!r} (labels: {', '.join(self.labels)})")
        return self.index[v]

    def encode(self, line: str) -> tuple[list[int], int]:
        rec = self.record(line)  # validates text / messages; fixes self.fmt on the first line
        if self.fmt not in ("text", "messages", "sharegpt"):
            raise EmberError(
                f'{self.path}: a classification file holds {{"text", '
                f'"{self.field}"}} or {{"messages", "{self.field}"}} lines, '
                f"not {self.fmt} lines"
            )
        label = self._label(json.loads(line))
        enc = self.enc
        if self.fmt == "text":
            ids = enc.text_ids(rec, True)  # as tokenizer(text) for an HF classifier
        elif not enc.has_template:
            raise EmberError(
                "the messages format needs a tokenizer with a chat template; this "
                'one has none (use {"text", "label"} lines instead)'
            )
        else:
            rec = with_system_prompt(self.cfg, rec)
            ids = enc.text_ids(enc._render(rec))
        return ids, label

    def example(self, lineno: int, raw: bytes) -> Example | None:
        rep, where = self.report, self.where(lineno)
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            ids, label = self.encode(line)
            ids = strip_pad(ids, self.pad)
            if not ids:
                raise _Bad("empty text", "no tokens besides padding")
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        m = self.cfg.max_seq_len
        if len(ids) > m:
            what = f"{where}: {len(ids)} tokens > max_seq_len {m}"
            if self.cfg.truncation == "drop":
                rep.dropped_too_long += 1
                rep.note("too long", f"{what} (dropped)")
                return None
            if self.cfg.truncation == "truncate_right":
                ids = strip_pad(ids[:m], self.pad) or ids[:1]
            else:
                keep_bos = int(self._bos(ids) is not None)  # data._Reader._bos
                ids = ids[:keep_bos] + ids[len(ids) - m + keep_bos :]
            rep.truncated += 1
            rep.note("too long", f"{what} ({self.cfg.truncation.replace('_', ' ')})")
        key = hashlib.blake2b(line.strip().encode(), digest_size=16).hexdigest()
        return Example(ids, [IGNORE] * (len(ids) - 1) + [label], where, 0, self.labels[label], key)


def load_labelled(
    path, cfg: DataConfig, tokenizer, labels, field: str = "label", pad: int | None = None
):
    """(examples, DataReport) of one labelled JSONL file; bad lines as ``data.load_examples``."""
    return read_head_file(
        path, lambda p: _ClassReader(p, cfg, tokenizer, labels, field, pad), f" + {field}"
    )


def read_head_file(path, make_reader, what: str = ""):
    """(examples, DataReport) of one file read by a head's reader (``data.read_lines``); an
    empty file or one without a usable line is an error that lists the problems."""
    reader, examples = read_lines(path, make_reader)
    rep = reader.report
    rep.format = f"{reader.fmt or reader.cfg.format}{what}"
    rep.examples = len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(len(e.doc_lengths) for e in examples)
    if rep.lines == rep.blank_lines:
        raise EmberError(f"{path}: the file is empty; expected one JSON object per line")
    if not examples:
        raise EmberError(
            f"{path}: no usable examples: all {rep.lines - rep.blank_lines} lines "
            "are bad or too long\n" + "\n".join(f"  {p}" for p in rep.problems)
        )
    return examples, rep


def load_labelled_datasets(
    cfg: DataConfig, tokenizer, labels, field: str = "label", pad: int | None = None, load=None
) -> Datasets:
    """Train / validation / test of a head's files; ``load(path) -> (examples, report)``
    (default: ``load_labelled``). The splits are made as ``data.load_datasets`` makes them, so
    several training files mix by ``data.mix`` and several validation files (or
    ``data.val_fraction`` of several training files) are scored per source."""
    load_file = load or (lambda p: load_labelled(p, cfg, tokenizer, labels, field, pad))
    return load_datasets(cfg, tokenizer, lambda path, _cfg, _tok: load_file(path))
