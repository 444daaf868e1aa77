"""Dataset files beyond JSONL (``ember.engine.datafiles``): CSV / TSV with a header row, Parquet,
and any of them or JSONL gzipped. Each gives exactly the examples of the same rows as JSONL."""

from __future__ import annotations

import csv
import gzip
import json
import sys

import pytest

from ember import EmberError
from ember.engine.data import DataConfig, load_examples
from ember.models.tokenizer import Tokenizer
from tests.engine.test_formats import CHATML, chat_backend

ROWS = [
    {"prompt": "What is the capital of France?", "completion": "Paris, of course."},
    {"prompt": "Translate, please:\n\"Bonjour le monde\"", "completion": "Hello world"},
    {"prompt": "Weather in Paris", "completion": "get_weather"},
]
CHATS = [{"messages": [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Weather in Paris"},
                       {"role": "assistant", "content": "Hello world"}]},
         {"messages": [{"role": "user", "content": "Translate"},
                       {"role": "assistant", "content": "Bonjour le monde"}]}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(chat_backend(), eos_token="<|im_end|>", chat_template=CHATML)


def _same(a, b) -> None:
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


def _jsonl(tmp_path, rows, tok):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(path, DataConfig(), tok)[0]


def _csv(path, rows, delimiter=",", encode_lists=True):
    fields = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(fields)
        for r in rows:
            w.writerow([json.dumps(r[k]) if encode_lists and isinstance(r[k], list) else r[k]
                        for k in fields])


@pytest.mark.parametrize("name,delimiter", [("d.csv", ","), ("d.tsv", "\t")])
def test_csv_and_tsv_equal_jsonl(tmp_path, tok, name, delimiter):
    """Quoted cells with the delimiter, quotes and newlines; a chat column holding JSON."""
    ref = _jsonl(tmp_path, ROWS, tok)
    _csv(tmp_path / name, ROWS, delimiter)
    examples, rep = load_examples(tmp_path / name, DataConfig(), tok)
    assert rep.format == "prompt_completion" and rep.examples == 3
    _same(examples, ref)
    assert [e.source for e in examples] == [f"{tmp_path / name}[{i}]" for i in range(3)]
    _csv(tmp_path / "chat.csv", CHATS)
    _same(load_examples(tmp_path / "chat.csv", DataConfig(), tok)[0], _jsonl(tmp_path, CHATS, tok))


def test_gzipped_files(tmp_path, tok):
    ref = _jsonl(tmp_path, ROWS, tok)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    examples, rep = load_examples(tmp_path / "d.jsonl.gz", DataConfig(), tok)
    _same(examples, ref)
    assert examples[1].source == f"{tmp_path / 'd.jsonl.gz'}:2"
    _csv(tmp_path / "d.csv", ROWS)
    with open(tmp_path / "d.csv", "rb") as src, gzip.open(tmp_path / "d.csv.gz", "wb") as dst:
        dst.write(src.read())
    _same(load_examples(tmp_path / "d.csv.gz", DataConfig(), tok)[0], ref)
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as f:
        json.dump(ROWS, f)
    _same(load_examples(tmp_path / "a.json.gz", DataConfig(), tok)[0], ref)


def test_parquet_equals_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for rows in (ROWS, CHATS):  # flat string columns; a list-of-struct column
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        _same(load_examples(tmp_path / "d.parquet", DataConfig(), tok)[0],
              _jsonl(tmp_path, rows, tok))
    # a null where a string is needed is a bad row, named like a JSON array item
    pq.write_table(pa.Table.from_pylist([*ROWS, {"prompt": "Hello world", "completion": None}]),
                   tmp_path / "n.parquet")
    examples, rep = load_examples(tmp_path / "n.parquet", DataConfig(), tok)
    assert rep.examples == 3 and rep.problems[0].startswith(f"{tmp_path / 'n.parquet'}[3]: ")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(EmberError, match=r"x\.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "x.parquet", DataConfig(), tok)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, tok, monkeypatch):
    import sys

    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(EmberError, match=r"needs pyarrow \(pip install pyarrow\)"):
        load_examples(tmp_path / "d.parquet", DataConfig(), tok)


def test_bad_tables(tmp_path, tok):
    (tmp_path / "h.csv").write_text("\n\n")
    with pytest.raises(EmberError, match="no header row"):
        load_examples(tmp_path / "h.csv", DataConfig(), tok)
    (tmp_path / "w.csv").write_text("prompt,completion\nHello world,Paris,extra\n")
    with pytest.raises(EmberError, match=r"w\.csv\[0\]: 3 cells for 2 header fields"):
        load_examples(tmp_path / "w.csv", DataConfig(), tok)
    (tmp_path / "d.csv").write_text("prompt,prompt\na,b\n")
    with pytest.raises(EmberError, match=r"header names \['prompt'\] more than once"):
        load_examples(tmp_path / "d.csv", DataConfig(), tok)
    (tmp_path / "m.csv").write_text('messages\n"[{""role"": ""user"""\n')
    with pytest.raises(EmberError, match=r"m\.csv\[0\]: field 'messages' looks like a JSON array"):
        load_examples(tmp_path / "m.csv", DataConfig(), tok)
    # a number of more digits than Python's json converts (a ValueError, not a JSONDecodeError:
    # it raised out of the CSV reader): the same error for a list field, text for a chat field
    big = "7" * (sys.get_int_max_str_digits() + 1)
    (tmp_path / "n.csv").write_text(f'messages\n"[{big}]"\n')
    with pytest.raises(EmberError, match=r"n\.csv\[0\]: field 'messages' (.|\n)*digits"):
        load_examples(tmp_path / "n.csv", DataConfig(), tok)
    (tmp_path / "p.csv").write_text(f'prompt,completion\n"[{big}]",x\n')
    (ex,), rep = load_examples(tmp_path / "p.csv", DataConfig(max_seq_len=8192), tok)
    assert rep.bad_lines == 0 and f"[{big}]" in tok.decode(ex.input_ids)
    (tmp_path / "k.csv").write_text("question,answer\nHello world,Paris\n\n")
    with pytest.raises(EmberError, match=r"k\.csv\[0\]: no 'text', 'prompt'/'completion'"):
        load_examples(tmp_path / "k.csv", DataConfig(bad_lines="error"), tok)


def test_csv_cells_typed_as_pandas_reads_them(tmp_path, tok):
    """Numbers (labels, margins, answer indices) come back typed, as Hugging Face datasets
    (pandas) reads a CSV (true/false stay text: class names; KTO reads them as booleans); a
    text field starting with "[" stays text; "choices" is a list."""
    from ember.engine.datafiles import iter_items

    path = tmp_path / "t.csv"
    path.write_text('text,prompt,label,score,ok,margin,choices\n'
                    '42,[Q] hi,1,0.5,True,,"[""a"", ""b""]"\n'
                    'x,"[""a"", ""b""]",10,2,false,1.5,"[""c"", ""d""]"\n')
    rows = [json.loads(r) for r in iter_items(path)]
    assert rows == [
        {"text": "42", "prompt": "[Q] hi", "label": 1, "score": 0.5, "ok": "True",
         "choices": ["a", "b"]},
        {"text": "x", "prompt": '["a", "b"]', "label": 10, "score": 2.0, "ok": "false",
         "margin": 1.5, "choices": ["c", "d"]}]
    # A prompt column of text that starts with "[" trains as the text it is.
    rows = [{"prompt": "[INST] What is the capital of France?", "completion": "Paris"},
            {"prompt": "[1, 2] + [3]?", "completion": "[1, 2, 3]"}]
    _csv(tmp_path / "b.csv", rows)
    _same(load_examples(tmp_path / "b.csv", DataConfig(), tok)[0], _jsonl(tmp_path, rows, tok))


def test_heads_and_choices_read_csv(tmp_path, tok):
    """A classifier's labels are inferred from any data file kind (CSV, .json array, gzipped),
    regression labels and multiple-choice answer indices in CSV are numbers."""
    from ember.engine.choices import load_choices
    from ember.engine.classification import infer_labels
    from ember.engine.reward import load_values

    rows = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    _csv(tmp_path / "c.csv", rows)
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=1))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c.csv", "c.json", "c.jsonl.gz"):
        assert infer_labels([tmp_path / name]) == ("0", "1", "2"), name
    (tmp_path / "r.csv").write_text("text,label\nhello,0.25\nworld,3\n")
    examples, rep = load_values(tmp_path / "r.csv", DataConfig(), tok)
    assert [e.value for e in examples] == [0.25, 3.0] and rep.bad_lines == 0
    (tmp_path / "q.csv").write_text('question,choices,answer\nhi,"[""a"", ""b""]",1\n'
                                    'yo,"[""c"", ""d""]",0\n')
    assert len(load_choices(str(tmp_path / "q.csv"), DataConfig(), tok)[1]) == 2
    # KTO's labels from CSV; an SFT run on such a file is refused, not trained on every row.
    from ember.engine.kto import load_kto_examples

    (tmp_path / "k.csv").write_text("prompt,completion,label\nhi,yes,TRUE\nyo,no,false\n")
    examples, _ = load_kto_examples(tmp_path / "k.csv", DataConfig(), tok)
    assert [e.desirable for e in examples] == [True, False]
    with pytest.raises(EmberError, match="a KTO line"):
        load_examples(tmp_path / "k.csv", DataConfig(bad_lines="error"), tok)


def test_misnamed_and_damaged_files(tmp_path, tok):
    """A JSON array in a file named .jsonl is read as one; a .gz file that is not gzip, or whose
    data is cut off, is an EmberError naming it (was gzip's BadGzipFile / EOFError); a file of
    pretty-printed objects says what JSON Lines are."""
    ref = _jsonl(tmp_path, ROWS, tok)
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS, indent=2))
    _same(load_examples(tmp_path / "a.jsonl", DataConfig(), tok)[0], ref)
    (tmp_path / "n.jsonl.gz").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(EmberError, match=r"n\.jsonl\.gz: named \.gz but not gzip-compressed"):
        load_examples(tmp_path / "n.jsonl.gz", DataConfig(), tok)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 200).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(EmberError, match=r"t\.jsonl\.gz: the gzip data is damaged"):
        load_examples(tmp_path / "t.jsonl.gz", DataConfig(), tok)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r, indent=2) for r in ROWS))
    with pytest.raises(EmberError, match="one whole object per line"):
        load_examples(tmp_path / "p.jsonl", DataConfig(), tok)


def test_parquet_columns_json_has_no_type_for(tmp_path, tok):
    """An unused timestamp / binary column no longer makes a Parquet file unreadable (was "a
    value cannot be read as JSON" for the first row); a decimal label reads as a number."""
    import datetime
    import decimal

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from ember.engine.reward import load_values

    when = datetime.datetime(2026, 11, 23, 12, 0)
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in ROWS],
                             "completion": [r["completion"] for r in ROWS],
                             "created": [when] * 3, "raw": [b"\x00\xff", b"x", b""]}),
                   tmp_path / "d.parquet")
    _same(load_examples(tmp_path / "d.parquet", DataConfig(), tok)[0],
          _jsonl(tmp_path, ROWS, tok))
    pq.write_table(pa.table({"text": ["hi", "yo"], "label": [decimal.Decimal("0.25"),
                                                            decimal.Decimal("3")]}),
                   tmp_path / "v.parquet")
    assert [e.value for e in load_values(tmp_path / "v.parquet", DataConfig(), tok)[0]] == [
        0.25, 3.0]


def test_json_object_with_a_data_array(tmp_path, tok):
    """A .json file that is one object holding its examples under "data" (SQuAD's layout, what
    ``datasets.load_dataset("json", field="data")`` reads), indented or not: its items, named
    file[index] (was: every line reported as invalid JSON, or a "keys present: ['data']" line)."""
    ref = _jsonl(tmp_path, CHATS, tok)
    for indent in (None, 2):
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"version": "1.0", "data": CHATS}, indent=indent))
        examples, rep = load_examples(path, DataConfig(), tok)
        _same(examples, ref)
        assert rep.format == "messages" and [e.source for e in examples] == [
            f"{path}[{i}]" for i in range(2)]
    # one example per line that happens to have a "data" field stays JSON Lines
    path.write_text(json.dumps({"text": "Hello world", "data": [1]}) + "\n")
    assert load_examples(path, DataConfig(), tok)[1].format == "text"


def test_parquet_messages_whose_keys_differ_by_row(tmp_path, tok):
    """Arrow gives every message every key any message has (the schema is one struct), so a
    dataset where one message has a "name" or "tool_call_id" stores null in all the others: the
    rows read as their JSONL (was: each such row refused, "name must be a string, got null")."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Weather in Paris", "name": "maria"},
                          {"role": "assistant", "content": "Hello world"}]}, *CHATS]
    table = pa.Table.from_pylist(rows)
    assert table.to_pylist()[1]["messages"][0]["name"] is None
    pq.write_table(table, tmp_path / "d.parquet")
    examples, rep = load_examples(tmp_path / "d.parquet", DataConfig(), tok)
    assert rep.bad_lines == 0
    _same(examples, _jsonl(tmp_path, rows, tok))


def test_csv_cells_python_reads_as_numbers_but_pandas_does_not_stay_text(tmp_path):
    """Python's float() reads "1_1" (digits grouped by "_") and non-ASCII digits as numbers, so
    a class-name column of "1_1", "1_2" became the numbers 11.0 and 12.0 (two classes merged with
    "11" and "12"). Hugging Face datasets reads a CSV with pandas, which keeps them as text;
    pyarrow's CSV reader (installed here, pandas is not) types them the same way and is the
    oracle."""
    pa_csv = pytest.importorskip("pyarrow.csv")
    from ember.engine.datafiles import iter_items

    columns = {"label": ["1_1", "1_2"], "group": ["１２", "3"], "score": ["1e5", "2.5"],
               "n": ["3", "-4"]}
    path = tmp_path / "t.csv"
    _csv(path, [{"text": f"t{i}", **{k: v[i] for k, v in columns.items()}} for i in range(2)])
    want = pa_csv.read_csv(str(path)).to_pylist()
    rows = [json.loads(r) for r in iter_items(path)]
    assert [{k: r[k] for k in columns} for r in rows] == [{k: r[k] for k in columns}
                                                          for r in want]
    assert [r["label"] for r in rows] == ["1_1", "1_2"]


def test_messages_written_as_python_reprs_are_refused_not_trained_as_text(tmp_path, tok):
    """A list column written to CSV without JSON-encoding it (pandas' and datasets' to_csv write
    str() of the list, as Python's csv writer does here) holds "[{'role': 'user', ...}]". In a
    chosen / rejected / prompt / completion column that text was trained as a string pair: the
    model learned Python reprs. It is refused, saying how to write the cells; a completion of
    text that starts with "[" still trains as text."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"chosen": msgs, "rejected": [msgs[0], {"role": "assistant", "content": "no"}]}]
    _csv(tmp_path / "p.csv", rows, encode_lists=False)
    assert "[{'role': 'user'" in (tmp_path / "p.csv").read_text()
    with pytest.raises(EmberError, match=r"p\.csv\[0\]: field 'chosen' holds messages written as "
                                         r"a Python repr.*json\.dumps"):
        load_examples(tmp_path / "p.csv", DataConfig(), tok)
    _csv(tmp_path / "m.csv", [{"messages": msgs}], encode_lists=False)
    with pytest.raises(EmberError, match=r"field 'messages' looks like a JSON array.*to_csv"):
        load_examples(tmp_path / "m.csv", DataConfig(), tok)
    rows = [{"prompt": "Give a Python list of one dict", "completion": "[{'a': 1}]"}]
    _csv(tmp_path / "c.csv", rows)
    _same(load_examples(tmp_path / "c.csv", DataConfig(), tok)[0], _jsonl(tmp_path, rows, tok))


def test_csv_missing_value_markers_in_number_columns(tmp_path):
    """pandas (Hugging Face datasets' CSV reader) and pyarrow read "NA", "null", "NaN", "N/A" ...
    in a column of numbers as missing values; Ember typed such a column as text, so its labels
    became the strings "1", "3" (class names, not the numbers), and "nan" cells were NaN labels.
    Oracle: pyarrow's CSV reader (pandas is not installed here): the same values, a missing
    value being a missing field."""
    pa_csv = pytest.importorskip("pyarrow.csv")
    from ember.engine.datafiles import iter_items

    columns = {"label": ["1", "NA", "3"], "score": ["0.5", "null", "nan"],
               "margin": ["N/A", "2", "-1"]}
    path = tmp_path / "t.csv"
    _csv(path, [{"text": f"t{i}", **{k: v[i] for k, v in columns.items()}} for i in range(3)])
    want = pa_csv.read_csv(str(path)).to_pylist()
    rows = [json.loads(r) for r in iter_items(path)]
    assert [{k: r.get(k) for k in columns} for r in rows] == [{k: r[k] for k in columns}
                                                              for r in want]
    assert rows[0]["label"] == 1 and "label" not in rows[1]


# pandas' read_csv default na_values (pandas/_libs/parsers.pyx STR_NA_VALUES, pandas 2.x), less ""
PANDAS_NA = ["-1.#IND", "1.#QNAN", "1.#IND", "-1.#QNAN", "#N/A N/A", "#N/A", "N/A", "n/a", "NA",
             "<NA>", "#NA", "NULL", "null", "NaN", "-NaN", "nan", "-nan", "None"]


def test_csv_none_and_pd_na_cells_of_number_columns_are_missing_as_in_pandas(tmp_path):
    """pandas (datasets' CSV reader) also reads "None" and "<NA>" (what to_csv writes for a
    missing value of a nullable column) as missing values; Ember took a column holding them for
    text, so its labels became the strings "1", "3". Oracle: pyarrow's CSV reader with pandas'
    default na_values (pandas is not installed here)."""
    pa_csv = pytest.importorskip("pyarrow.csv")
    from ember.engine.datafiles import iter_items

    columns = {"label": ["1", "None", "3"], "score": ["0.5", "<NA>", "2"]}
    path = tmp_path / "t.csv"
    _csv(path, [{"text": f"t{i}", **{k: v[i] for k, v in columns.items()}} for i in range(3)])
    opts = pa_csv.ConvertOptions(null_values=PANDAS_NA, strings_can_be_null=False)
    want = pa_csv.read_csv(str(path), convert_options=opts).to_pylist()
    rows = [json.loads(r) for r in iter_items(path)]
    assert [{k: r.get(k) for k in columns} for r in rows] == [{k: r[k] for k in columns}
                                                              for r in want]
    assert rows[0]["label"] == 1 and "label" not in rows[1] and "score" not in rows[1]


def test_indented_json_object_that_is_not_a_data_holder_says_why(tmp_path, tok):
    """A .json file of one indented object (one example alone, or examples under another key
    than "data") was read as JSON Lines: "invalid JSON: Expecting property name" at line 1. It
    now says what a .json dataset is, and which array to rename."""
    (tmp_path / "t.json").write_text(json.dumps({"version": 1, "train": ROWS}, indent=2))
    with pytest.raises(EmberError, match=r"t\.json: one JSON object \(keys \['train', "
                                         r"'version'\]\), not a dataset.*rename its 'train'"):
        load_examples(tmp_path / "t.json", DataConfig(), tok)
    (tmp_path / "e.json").write_text(json.dumps(ROWS[0], indent=2))
    with pytest.raises(EmberError, match=r"e\.json: one JSON object .*JSON Lines\)$"):
        load_examples(tmp_path / "e.json", DataConfig(), tok)


def test_bom_on_a_later_line_says_files_were_joined(tmp_path, tok):
    """Two files saved with a UTF-8 BOM joined with `cat`: the BOM that starts a later line is
    refused as json.loads refuses it (it was "Unexpected UTF-8 BOM (decode using utf-8-sig)"),
    saying what happened and what to do; the rows of either file alone read as without it."""
    rows = ROWS[:2]
    part = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8-sig")
    (tmp_path / "cat.jsonl").write_bytes(part + part)
    later = part.splitlines()[0].decode("utf-8")  # the second file's first line, as read
    with pytest.raises(json.JSONDecodeError, match="BOM"):
        json.loads(later)  # the oracle refuses it too
    with pytest.raises(EmberError, match=r"cat\.jsonl:3: invalid JSON: the line starts with a "
                                         r"UTF-8 byte-order mark \(BOM\), as when files saved "
                                         r"with one are joined with `cat`; remove it"):
        load_examples(tmp_path / "cat.jsonl", DataConfig(bad_lines="error"), tok)
    examples, rep = load_examples(tmp_path / "cat.jsonl", DataConfig(), tok)
    assert rep.bad_lines == 1 and len(examples) == 3
    (tmp_path / "one.jsonl").write_bytes(part)
    _same(load_examples(tmp_path / "one.jsonl", DataConfig(), tok)[0], _jsonl(tmp_path, rows, tok))
