"""Hugging Face ``datasets`` folders as data (``ember.engine.hfdatasets``): save_to_disk
Dataset / DatasetDict folders (built with pyarrow as datasets 5.2 writes them) and Hub-style
folders of data files, each read as the rows datasets gives (checked against datasets 5.2's
load_from_disk / load_dataset(folder, split=...) on these layouts)."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from ember import EmberError
from ember.engine.data import DataConfig, load_datasets, load_examples
from ember.models.tokenizer import Tokenizer
from tests.engine.test_datafiles import CHATS, ROWS, _csv, _jsonl, _same
from tests.engine.test_formats import CHATML, chat_backend


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(chat_backend(), eos_token="<|im_end|>", chat_template=CHATML)


def _arrow(path, rows, features=None, stream=True):
    """An Arrow file as datasets' ArrowWriter writes it: the IPC stream format (``stream=False``:
    the IPC file format, which datasets does not write), its features (``ClassLabel`` names)
    in the schema's ``huggingface`` metadata."""
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(rows)
    if features is not None:
        meta = {"huggingface": json.dumps({"info": {"features": features}})}
        table = table.replace_schema_metadata(meta)
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if stream else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            writer.write_table(table)


def _save_to_disk(folder, rows, shards=1, indices=None, features=None):
    """A folder as ``datasets.Dataset.from_list(rows).save_to_disk(folder, num_shards=shards)``
    writes it (datasets 5.2: Arrow IPC stream shards, state.json listing them in order,
    dataset_info.json), written with pyarrow; ``indices``: datasets 1.x's indices mapping of a
    select / shuffle (``_indices_data_files``, an Arrow file of one uint64 column)."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    names = []
    size = -(-len(rows) // shards)
    for i in range(shards):
        names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
        _arrow(folder / names[-1], rows[i * size:(i + 1) * size], features)
    state = {"_data_files": [{"filename": n} for n in names],
             "_fingerprint": "0", "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": None}
    if indices is not None:
        idx = pa.table({"indices": pa.array(indices, pa.uint64())})
        with pa.OSFile(str(folder / "indices.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, idx.schema) as writer:
                writer.write_table(idx)
        state["_indices_data_files"] = [{"filename": "indices.arrow"}]
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")


def _cache(folder, splits, name="json", features=None):
    """A datasets cache folder (``~/.cache/huggingface/datasets/json/default-<hash>/0.0.0/<hash>``)
    as ``load_dataset("json", data_files=...)`` leaves it (datasets 5.2): ``{name}-{split}.arrow``,
    or ``{name}-{split}-00000-of-00003.arrow`` shards, dataset_info.json, no state.json; and a
    ``cache-<fingerprint>.arrow`` that a ``.map`` wrote beside them. ``splits``: split ->
    (rows, shards)."""
    folder.mkdir(parents=True)
    info = {"features": features, "dataset_name": name, "splits": {}}
    for split, (rows, shards) in splits.items():
        size = -(-len(rows) // shards)
        for i in range(shards):
            tail = f"-{i:05d}-of-{shards:05d}" if shards > 1 else ""
            _arrow(folder / f"{name}-{split}{tail}.arrow", rows[i * size:(i + 1) * size], features)
        info["splits"][split] = {"name": split, "num_examples": len(rows), "dataset_name": name}
        if shards > 1:
            info["splits"][split]["shard_lengths"] = [len(rows[i * size:(i + 1) * size])
                                                      for i in range(shards)]
    (folder / "dataset_info.json").write_text(json.dumps(info))
    _arrow(folder / "cache-5d2ba7a3e1d0e3b1.arrow", [{"x": 1}])


def test_save_to_disk_folders_read_as_load_from_disk(tmp_path, tok):
    """A datasets save_to_disk folder was refused ("export it with to_json"): it now reads as
    load_from_disk(folder) gives it (checked with datasets 5.2: every shard in state.json's
    order, nested list/struct columns as JSON, a DatasetDict's split per setting), named
    folder[index] / folder:split[index]; datasets 1.x's indices mapping is applied."""
    rows = [*ROWS, *ROWS[:2]]
    _save_to_disk(tmp_path / "one", rows, shards=3)
    examples, rep = load_examples(tmp_path / "one", DataConfig(), tok)
    _same(examples, _jsonl(tmp_path, rows, tok))
    assert [e.source for e in examples] == [f"{tmp_path / 'one'}[{i}]" for i in range(5)]
    _save_to_disk(tmp_path / "chat", CHATS)  # a list-of-struct column
    _same(load_examples(tmp_path / "chat", DataConfig(), tok)[0], _jsonl(tmp_path, CHATS, tok))
    _save_to_disk(tmp_path / "sel", ROWS, indices=[2, 0])
    _same(load_examples(tmp_path / "sel", DataConfig(), tok)[0],
          _jsonl(tmp_path, [ROWS[2], ROWS[0]], tok))

    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", ROWS, shards=2)
    _save_to_disk(dd / "test", ROWS[1:])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    ds = load_datasets(DataConfig(train=(str(dd),), test=str(dd)), tok)
    _same(ds.train, _jsonl(tmp_path, ROWS, tok))
    _same(ds.test, _jsonl(tmp_path, ROWS[1:], tok))
    assert ds.test[1].source == f"{dd}:test[1]"
    _same(load_examples(f"{dd}:test", DataConfig(), tok)[0], ds.test)
    for cfg, why in (
            (DataConfig(train=(str(dd),), validation=str(dd)),
             r"splits train, test but no 'validation' split for data\.validation; name the one "
             r"to use, e\.g\. data\.validation = \".*dd:train\""),
            (DataConfig(train=(f"{dd}:dev",)), r"dd:dev: no split 'dev' in .*dd \(it has train, "
                                               r"test\)"),
            (DataConfig(train=(f"{tmp_path / 'one'}:train",)), r"one saved Dataset, without "
                                                                r"splits: give the folder alone")):
        with pytest.raises(EmberError, match=why):
            load_datasets(cfg, tok)
    with pytest.raises(EmberError, match=r"dd: a Hugging Face datasets folder with the splits "
                                         r"train, test: name one, e\.g\. \".*dd:train\""):
        load_examples(dd, DataConfig(), tok)  # no setting to name the split


def test_datasets_folder_paths_in_a_run_config(tmp_path, monkeypatch):
    """A run records "folder:split" (absolute, the split named like the setting), so eval /
    resume read the same split from any folder; a missing folder is named before the model
    loads."""
    from ember.engine.cli import _check_data_files
    from ember.engine.config import ModelSpec, TrainConfig
    from ember.engine.hfdatasets import named_splits
    from ember.engine.runtime import absolute_paths

    _save_to_disk(tmp_path / "dd" / "train", ROWS)
    _save_to_disk(tmp_path / "dd" / "validation", ROWS)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(data=DataConfig(train=("dd",), validation="dd:train")))
    assert cfg.data.validation == f"{tmp_path / 'dd'}:train"
    assert named_splits(cfg.data).train == (f"{tmp_path / 'dd'}:train",)
    # a model name "name:tag" beside a folder "name" is no datasets path
    named = absolute_paths(TrainConfig(model=ModelSpec(name="dd:tag"), data=DataConfig()))
    assert named.model.name == "dd:tag"
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/dd:train" (was read as a relative "~" path)
    assert absolute_paths(TrainConfig(data=DataConfig(train=("~/dd:train",)))).data.train == (
        f"{tmp_path / 'dd'}:train",)
    _check_data_files(cfg)
    from ember.engine.mixing import source_names

    (tmp_path / "dd.v2").mkdir()  # per-source names (val_loss/<name>): the whole "folder:split"
    assert source_names(["dd:train", "dd.v2:train"], "data.train") == ["dd:train", "dd.v2:train"]
    from ember.engine.cli_generate import _file_prompts

    # ember generate --prompts FOLDER: its test split, as ember eval --data FOLDER
    with pytest.raises(EmberError, match=r"no 'test' split for --prompts; name the one to use, "
                                         r"e\.g\. --prompts \".*dd:train\""):
        _file_prompts("dd")
    assert [p[0] for p in _file_prompts("dd:validation")] == [r["prompt"] for r in ROWS]
    with pytest.raises(EmberError, match=r"data file not found: data\.test = 'gone:test'"):
        _check_data_files(TrainConfig(data=DataConfig(train=("dd",), test="gone:test")))


def test_hub_folders_split_as_load_dataset_infers(tmp_path, tok):
    """A Hub-style folder of data files reads the split datasets.load_dataset(folder) infers
    (datasets 5.2 gave these splits and rows): data/{split}-NNNNN-of-NNNNN shards (any split
    name, shards in order), else folder names, else file names (dev -> validation), else all
    files as train; a split reads the files of its most common format (a tie: Parquet, JSON
    Lines, JSON, CSV). Blank JSONL lines are not rows (the index is the row's in the split)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), hub / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), hub / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(CHATS), hub / "test_sft-00000-of-00001.parquet")
    (tmp_path / "hub" / "README.md").write_text("---\n---\n")
    from ember.engine.hfdatasets import splits

    assert splits(tmp_path / "hub") == ["train", "test_sft"]
    ds = load_datasets(DataConfig(train=(str(tmp_path / "hub"),)), tok)
    _same(ds.train, _jsonl(tmp_path, ROWS, tok))
    assert ("\n  read from 2 files: data/train-00000-of-00002.parquet, "
            "data/train-00001-of-00002.parquet") in ds.summary()  # what the split was taken as
    _same(load_examples(f"{tmp_path / 'hub'}:test_sft", DataConfig(), tok)[0],
          _jsonl(tmp_path, CHATS, tok))
    names = tmp_path / "names"
    (names / ".cache").mkdir(parents=True)
    (names / ".cache" / "test.jsonl").write_text("not data\n")
    (names / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    _csv(names / "dev.csv", ROWS[2:])
    _csv(names / "train_x.csv", CHATS)  # a train file of the format fewer train files have
    assert splits(names) == ["train", "validation"]
    ds = load_datasets(DataConfig(train=(str(names),), validation=str(names)), tok)
    _same(ds.train, _jsonl(tmp_path, ROWS[:2], tok))
    assert ds.train[1].source == f"{names}:train[1]"
    _same(ds.validation, _jsonl(tmp_path, ROWS[2:], tok))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (flat / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert splits(flat) == ["train"]
    _same(load_datasets(DataConfig(train=(str(flat),)), tok).train,
          _jsonl(tmp_path, ROWS[:2], tok))


def test_hub_folder_configs_from_its_readme(tmp_path, tok):
    """A Hub snapshot whose README.md lists configs (gsm8k's main/ and socratic/) read both
    configs' train files as one train split (their names hold "train"); it now reads a
    config's data_files as datasets 5.2's load_dataset(folder, config, split=...) does:
    "folder:config:split", or the only / default config; several without a default are
    refused, naming them."""
    pytest.importorskip("yaml")
    for config, rows in (("main", ROWS), ("socratic", CHATS)):
        (tmp_path / "gsm" / config).mkdir(parents=True)
        _csv(tmp_path / "gsm" / config / "train-00000-of-00001.csv", rows)
    readme = ("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
              "    path: main/train-*\n- config_name: socratic\n  data_files:\n"
              "  - split: train\n    path: socratic/train-*\n---\n# gsm\n")
    (tmp_path / "gsm" / "README.md").write_text(readme)
    gsm = tmp_path / "gsm"
    _same(load_examples(f"{gsm}:socratic:train", DataConfig(), tok)[0],
          _jsonl(tmp_path, CHATS, tok))
    with pytest.raises(EmberError, match=r"gsm: a Hub dataset with the configs main, socratic "
                                         r"\(README\.md\) and no default one: name one with its "
                                         r"split, e\.g\. \".*gsm:main:train\""):
        load_datasets(DataConfig(train=(str(gsm),)), tok)
    (gsm / "README.md").write_text(readme.replace("path: main/train-*\n",
                                                  "path: main/train-*\n  default: true\n"))
    _same(load_datasets(DataConfig(train=(str(gsm),)), tok).train, _jsonl(tmp_path, ROWS, tok))
    with pytest.raises(EmberError, match=r"no config 'other' in README\.md \(it has main, "
                                         r"socratic\)"):
        load_examples(f"{gsm}:other:train", DataConfig(), tok)
    (gsm / "README.md").write_text("---\nconfigs:\n- config_name: x\n  data_files: none/*\n---\n")
    with pytest.raises(EmberError, match=r"gsm: a Hugging Face datasets folder without data "
                                         r"files in any split \(README\.md's configs match none"):
        load_datasets(DataConfig(train=(str(gsm),)), tok)


def test_arrow_files_and_datasets_cache_folders_read_as_datasets_reads_them(tmp_path, tok):
    """An Arrow file (a save_to_disk shard, a datasets cache file) and a datasets cache folder
    (Arrow files and dataset_info.json, no state.json) were refused ("export it with to_json"):
    a file reads as datasets.Dataset.from_file(file) gives it; a cache folder's splits are its
    dataset_info.json's, each read from the files datasets' builder named and reads, shards in
    order (datasets 5.2: load_dataset(...)[split] of the load that wrote it; load_dataset(folder)
    gives the same here, but merges train_sft and train_gen into one "train" split); the .map
    cache file is in no split; an IPC file-format file reads too. A folder above two cache
    folders of a dataset is refused (load_dataset reads both: every row twice)."""
    from ember.engine.hfdatasets import splits

    _save_to_disk(tmp_path / "one", ROWS)
    shard = tmp_path / "one" / "data-00000-of-00001.arrow"
    examples, _ = load_examples(shard, DataConfig(), tok)
    _same(examples, _jsonl(tmp_path, ROWS, tok))
    assert examples[2].source == f"{shard}[2]"
    _arrow(tmp_path / "f.arrow", CHATS, stream=False)
    _same(load_examples(tmp_path / "f.arrow", DataConfig(), tok)[0],
          _jsonl(tmp_path, CHATS, tok))
    cache = tmp_path / "json" / "default-0a1b" / "0.0.0" / "2c3d"
    _cache(cache, {"train": ([*ROWS, *ROWS], 3), "test": (ROWS[1:], 1)})
    ds = load_datasets(DataConfig(train=(str(cache),), test=str(cache)), tok)
    _same(ds.train, _jsonl(tmp_path, [*ROWS, *ROWS], tok))
    _same(ds.test, _jsonl(tmp_path, ROWS[1:], tok))
    assert ("read from 3 files: json-train-00000-of-00003.arrow, json-train-00001-of-00003"
            ".arrow, json-train-00002-of-00003.arrow") in ds.summary()
    chat = tmp_path / "ultrachat"  # Hub-style split names: load_dataset(folder) gives "train"
    _cache(chat, {"train_sft": (ROWS, 2), "train_gen": (ROWS[:1], 1), "test_sft": (ROWS[2:], 1)},
           name="ultrachat_200k")  # (all of train_sft and train_gen), "test"; the builder these
    assert splits(chat) == ["train_sft", "train_gen", "test_sft"]  # splits, as here
    _same(load_examples(f"{chat}:train_sft", DataConfig(), tok)[0], _jsonl(tmp_path, ROWS, tok))
    _cache(tmp_path / "json" / "default-4e5f" / "0.0.0" / "2c3d", {"train": (ROWS, 1)})
    with pytest.raises(EmberError, match=r"json: its 'train' files lie in 2 datasets cache folders "
                                         r"\(default-0a1b/0\.0\.0/2c3d, default-4e5f/0\.0\.0/2c3d\)"
                                         r".*name one, e\.g\. \".*json/default-0a1b/0\.0\.0/"
                                         r"2c3d:train\""):
        load_examples(f"{tmp_path / 'json'}:train", DataConfig(), tok)  # datasets: 9 rows
    (tmp_path / "f.arrow.gz").write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(EmberError, match=r"f\.arrow\.gz: a gzipped Arrow file; decompress it"):
        load_examples(tmp_path / "f.arrow.gz", DataConfig(), tok)
    (tmp_path / "bad.arrow").write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(EmberError, match=r"bad\.arrow: not a readable Arrow file"):
        load_examples(tmp_path / "bad.arrow", DataConfig(), tok)


def test_folders_without_data_and_missing_shards_say_what_to_give(tmp_path, tok, monkeypatch):
    """A folder with no data files said only "is a directory"; pyarrow missing, or a shard that
    state.json lists missing, are named."""
    _save_to_disk(tmp_path / "one", ROWS)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EmberError, match=r"empty: is a directory without data files"):
        load_examples(tmp_path / "empty", DataConfig(), tok)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pyarrow", None)  # import fails
        with pytest.raises(EmberError, match=r"one: reading a datasets folder needs pyarrow "
                                             r"\(pip install pyarrow\)"):
            load_examples(tmp_path / "one", DataConfig(), tok)
    (tmp_path / "one" / "state.json").write_text('{"_data_files": [{"filename": "gone.arrow"}]}')
    with pytest.raises(EmberError, match=r"one: state\.json lists gone\.arrow, which is not "
                                         r"there"):
        load_examples(tmp_path / "one", DataConfig(), tok)


def test_a_folder_given_as_data_names_its_data_files_without_walking_the_tree(tmp_path, tok):
    """A folder without data files outside hidden folders (.git, .cache) says it is a directory
    (was: the whole tree walked and .git / .cache files listed as data); one with data files is
    split as datasets 5.2's load_dataset splits it: only data/train.jsonl is a train file here
    (a/b/c/deep.jsonl is in no split)."""
    from ember.engine.hfdatasets import _hub_splits

    for name in (".git/objects/x.json", ".cache/hub/y.jsonl"):
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text("{}\n")
    with pytest.raises(EmberError, match=r"repo: is a directory without data files .*; give "
                                         r"a data file; data\.train may list several"):
        load_examples(tmp_path / "repo", DataConfig(), tok)
    for name in ("data/train.jsonl", "a/b/c/deep.jsonl"):
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text(json.dumps(ROWS[0]) + "\n")
    assert _hub_splits(tmp_path / "repo") == {"train": ["data/train.jsonl"]}


LABELS = {"text": {"dtype": "string", "_type": "Value"},
          "label": {"names": ["neg", "neu", "pos"], "_type": "ClassLabel"}}


def test_class_label_columns_keep_datasets_class_names(tmp_path, tok):
    """A datasets ClassLabel column (integers; names in the files' features) made a classifier's
    labels "0", "1" from the integers seen (here "pos", 2, is in no train row: 2 classes for 3,
    and id2label without the names); they are now the ClassLabel's names in its order, as
    transformers' run_classification takes them (features["label"].names: datasets 5.2 gives
    neg, neu, pos for these files: save_to_disk, cache, Parquet, a Hub folder of JSONL whose
    README's dataset_info has the ClassLabel). A ClassLabel column Ember
    reads as text (an SFT completion) is its class name (features[...].int2str). head.labels
    (or a model's id2label) naming the ClassLabel's classes in another order took a row's
    integer as an index into them (neu read as neg): it is mapped by name, as transformers'
    run_glue maps a dataset's indices to a model's label2id (case-insensitive); other names:
    by position, as before."""
    from ember.engine.classification import infer_labels

    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"text": "fine", "label": 1}, {"text": "awful", "label": 0}]
    _save_to_disk(tmp_path / "saved", rows, features=LABELS)
    _cache(tmp_path / "cache", {"train": (rows, 2)}, features=LABELS)
    _arrow(tmp_path / "x.arrow", rows, LABELS)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "good", "label": "pos"}) + "\n")
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": LABELS}})})
    pq.write_table(table, tmp_path / "x.parquet")
    # gzipped / upper case: the names were lost (the schema read as Arrow), the rows kept theirs
    (tmp_path / "y.PARQUET.gz").write_bytes(gzip.compress((tmp_path / "x.parquet").read_bytes()))
    want = ("neg", "neu", "pos")
    for paths in ([tmp_path / "saved"], [f"{tmp_path / 'cache'}:train"], [tmp_path / "x.arrow"],
                  [tmp_path / "x.parquet", tmp_path / "more.jsonl"], [tmp_path / "y.PARQUET.gz"]):
        assert infer_labels(paths) == want, paths
    assert infer_labels([tmp_path / "more.jsonl", tmp_path / "saved"]) == want
    from ember.engine.classification import load_labelled_datasets

    for labels, want_ids in ((("pos", "NEU", "neg"), [1, 2]), (("a", "b", "c"), [1, 0])):
        ds = load_labelled_datasets(DataConfig(train=(str(tmp_path / "saved"),)), tok, labels)
        assert [e.labels[-1] for e in ds.train] == want_ids, labels
    other = {**LABELS, "label": {"names": ["pos", "neg"], "_type": "ClassLabel"}}
    _save_to_disk(tmp_path / "other", rows, features=other)
    with pytest.raises(EmberError, match=r"the 'label' classes differ between the datasets: .*"
                                         r"saved: \['neg', 'neu', 'pos'\]; .*other: \['pos', "
                                         r"'neg'\] .*align_labels_with_mapping"):
        infer_labels([tmp_path / "saved", tmp_path / "other"])
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (hub / "README.md").write_text(  # as push_to_hub writes a ClassLabel into the card
        "---\ndataset_info:\n- config_name: default\n  features:\n  - name: text\n    dtype: "
        "string\n  - name: label\n    dtype:\n      class_label:\n        names:\n"
        "          '0': neg\n          '1': neu\n          '2': pos\n---\n")
    assert infer_labels([f"{hub}:train"]) == want
    sft = [{"prompt": "Sentiment of: fine", "completion": 2},
           {"prompt": "Sentiment of: awful", "completion": 0}]
    feats = {"prompt": LABELS["text"], "completion": LABELS["label"]}
    _save_to_disk(tmp_path / "sft", sft, features=feats)
    named = [{"prompt": "Sentiment of: fine", "completion": "pos"},
             {"prompt": "Sentiment of: awful", "completion": "neg"}]
    _same(load_examples(tmp_path / "sft", DataConfig(), tok)[0], _jsonl(tmp_path, named, tok))
    pq.write_table(pa.Table.from_pylist(sft).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": feats}})}), tmp_path / "sft.parquet")
    _same(load_examples(tmp_path / "sft.parquet", DataConfig(), tok)[0],
          _jsonl(tmp_path, named, tok))


def test_a_load_walks_each_datasets_folder_once(tmp_path, tok, monkeypatch):
    """Loading train / validation / test of a Hub-style folder walked it 30 times (kind, splits,
    items, hub_files of each split: 2000 shards a split took 6.9 s, now 2.8 s); now once per
    load_datasets (and once per config resolution), and a folder changed between two loads is
    seen by the second (no listing is kept)."""
    import os

    from ember.engine.hfdatasets import splits

    hub = tmp_path / "hub"
    hub.mkdir()
    for split in ("train", "validation"):
        _csv(hub / f"{split}.csv", ROWS)
    walks = []
    real = os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a[0]) or real(*a, **k))
    cfg = DataConfig(train=(str(hub),), validation=str(hub))
    ds = load_datasets(cfg, tok)
    assert len(ds.train) == len(ds.validation) == 3
    assert walks == [hub]
    _csv(hub / "test.csv", ROWS[:1])
    assert splits(hub) == ["train", "validation", "test"]
    assert len(load_datasets(DataConfig(train=(str(hub),), test=str(hub)), tok).test) == 1


def test_arrow_and_parquet_rows_are_read_a_batch_at_a_time(tmp_path):
    """A save_to_disk folder's rows were held whole as Python dicts and JSON lines, and so were
    a Parquet file's (1M rows: 383 MB of Python objects at the peak, 386 MB for Parquet); they
    are now read a record batch (row group) at a time, in order."""
    import tracemalloc

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from ember.engine.datafiles import iter_items

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=1000)
    _save_to_disk(tmp_path / "saved", rows, shards=3)
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        tracemalloc.start()
        try:
            for got, want in zip(iter_items(path), rows, strict=True):
                assert json.loads(got) == want
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.5e6, (path, peak)  # (was 4.7 MB and 2.5 MB; now 0.4 MB, 0.7 MB)
