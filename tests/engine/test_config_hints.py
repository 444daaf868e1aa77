"""A new user's config mistakes: each is one clear error that says what was meant or where the
file belongs, and ``ember config``'s own output trains without spurious notes."""

from __future__ import annotations

import datetime
import json
import re

import pytest
import tomllib
import torch

from ember import EmberError
from ember.engine.cli import main
from ember.engine.config import TrainConfig, from_dict, load_config, to_toml
from ember.engine.config_doc import unused_settings
from ember.engine.runtime import resolve


def test_a_toml_date_is_a_named_error_not_a_crash(tmp_path, capsys):
    """An unquoted date is valid TOML (tomllib reads a datetime.date); it was a TypeError
    traceback from the config's deep copy (json.dumps) instead of naming the key."""
    path = tmp_path / "run.toml"
    path.write_text('name = 2024-01-01\n[data]\ntrain = ["a.jsonl"]\n')
    assert isinstance(tomllib.loads(path.read_text())["name"], datetime.date)
    with pytest.raises(EmberError, match="name must be a string, got date"):
        load_config(path)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: name must be a string") and "Traceback" not in err


@pytest.mark.parametrize("item, guess", [
    ("lora.rnak=8", "'rank'"),
    ("data.trian=x.jsonl", "'train'"),
    ("Lora.rank=8", "'lora'"),             # TOML keys are case-sensitive
    ("lr=1e-3", "'optim.lr'"),             # a section's key at the top level
    ("rank=8", "'lora.rank'"),
    ("max_step=3", "'max_steps'"),
    ("optim.warmup=3", "'warmup_type' or 'warmup_steps'"),  # (optim.warmup_type: wsd's)
    ("lora.lr=1e-3", "'optim.lr'"),        # another table's key (was no suggestion)
    ("optim.rank=8", "'lora.rank'"),
    ("data.metrics=[f1]", "'eval.metrics'"),  # (bare words in brackets: not a TOML error)
])
def test_a_misspelled_key_gets_a_suggestion(item, guess):
    with pytest.raises(EmberError, match="unknown config key") as e:
        load_config(None, [item])
    assert f"(did you mean {guess}?)" in str(e.value)


@pytest.mark.parametrize("item", ["optim.learning_rate=1e-3", "optim.max_steps=3"])
def test_no_suggestion_when_nothing_is_close(item):
    """Nothing close, or a top-level key after a table (explained by its own hint)."""
    with pytest.raises(EmberError, match="unknown config key") as e:
        load_config(None, [item])
    assert "did you mean" not in str(e.value)


def test_a_data_file_or_model_given_as_the_config_says_where_it_goes(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n')
    with pytest.raises(EmberError, match=r"is a data file, not a run config .*data.train = "):
        load_config(data)  # was "invalid TOML: Invalid statement (at line 1, column 1)"
    (tmp_path / "json-train.arrow").write_bytes(b"\xff\xff\xff\xff")  # datasets' cache file
    with pytest.raises(EmberError, match=r"is a data file, not a run config .*data.train = "):
        load_config(tmp_path / "json-train.arrow")  # was "not valid UTF-8"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(EmberError, match=r"is a model, not a run config .*model.name = "):
        load_config(gguf)
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(EmberError, match=r"is a model folder, not a run directory .*model.name"):
        load_config(folder)  # was "a folder without config.toml"
    with pytest.raises(EmberError, match=rf"is a model's config.json, not a run config .*"
                                         rf"model.name = \"{folder}\" \(the folder"):
        load_config(folder / "config.json")  # was "a data file"


def test_ember_config_output_trains_without_spurious_notes(tmp_path, capsys):
    """``ember config > my.toml`` then ``ember train my.toml``: the file gives every key (other
    methods' and objectives' tables at their defaults), which printed ten "ignored" notes; a
    key changed from its default in such a table is still named."""
    assert main(["config", "quickstart", "--set", "lora.rank=8"]) == 0
    path = tmp_path / "my.toml"
    out = capsys.readouterr()
    path.write_text(out.out)
    assert out.err == ""
    cfg = load_config(path)
    assert cfg == load_config("quickstart", ["lora.rank=8"])
    assert unused_settings(cfg) == []
    run = tmp_path / "run_config.toml"  # a run's resolved config.toml, copied to start anew
    run.write_text(to_toml(resolve(cfg)))
    assert unused_settings(load_config(run)) == []
    changed = unused_settings(load_config(path, ["dpo.beta=0.3", "eval.patience=4"]))
    assert [line.split(" ignored")[0] for line in changed] == ["dpo.beta", "eval.patience"]
    assert main(["config", str(path), "--set", "dpo.beta=0.3"]) == 0  # the notes train prints
    err = capsys.readouterr().err
    assert err.startswith("note: dpo.beta ignored: it applies to objective")
    assert err.count("\n") == 1


def test_a_bare_comma_list_sets_a_list_key():
    """``--set eval.metrics=exact_match,f1`` (as ``ember eval --metrics`` takes them) was the one
    string 'exact_match,f1' (an unknown metric, a missing file 'a.jsonl,b.jsonl', a LoRA target
    matching nothing); it is the list, equal to the TOML list form. Keys that take one value, and
    quoted values, keep their commas."""
    sets = ["eval.metrics=exact_match,f1", "lora.targets=q, v", "optim.betas=0.8,0.95",
            "data.train=a.jsonl,b.jsonl", "data.validation=c.jsonl,d.jsonl"]
    toml = ['eval.metrics=["exact_match", "f1"]', 'lora.targets=["q", "v"]',
            "optim.betas=[0.8, 0.95]", 'data.train=["a.jsonl", "b.jsonl"]',
            'data.validation=["c.jsonl", "d.jsonl"]']
    assert load_config(None, sets) == load_config(None, toml)
    assert load_config(None, ["name=a,b"]).name == "a,b"
    # nothing: the empty list (was the one name "", an unknown metric)
    assert tomllib.loads("v = []")["v"] == []
    empty = ["eval.metrics=", "freeze=", "data.train="]
    assert load_config(None, empty) == load_config(None, [k + "[]" for k in empty])
    assert load_config(None, ["data.train='a,b.jsonl'"]).data.train == ("a,b.jsonl",)


def test_bare_words_in_brackets_set_a_list_key_other_broken_toml_is_named():
    """``--set lora.targets=[q,v]`` (bare words: not TOML) was the targets '[q' and 'v]'; it is
    the list TOML's quoted form gives. A broken inline table for a table key was taken as that
    text: it is an error with tomllib's reason. Other text that starts with a bracket stays the
    bare word it is (a regex target, a system prompt)."""
    bare = ["lora.targets=[q, v]", "eval.metrics=[exact_match,f1]", "data.train=[a.jsonl]"]
    toml = [k + "=" + json.dumps(tomllib.loads(f"v = {v}")["v"]) for k, v in (
        ("lora.targets", '["q", "v"]'), ("eval.metrics", '["exact_match", "f1"]'),
        ("data.train", '["a.jsonl"]'))]
    assert load_config(None, bare) == load_config(None, toml)
    for item in ("lora={rank=8", "lora={rank=eight}", "model={name=m"):
        with pytest.raises(EmberError, match=r"not a TOML value \((Unclosed|Invalid) .*quote"):
            load_config(None, [item])
    cfg = load_config(None, ["lora.targets=[qk]_proj,v", "data.system_prompt=[INST] be brief",
                             "name=[draft"])
    assert cfg.lora.targets == ("[qk]_proj", "v") and cfg.name == "[draft"
    assert cfg.data.system_prompt == "[INST] be brief"


def test_an_integer_beyond_toml_s_64_bits_is_refused():
    """TOML integers are 64-bit, tomllib reads any; seed = 2**64 was a traceback from torch at
    the start of the run (torch.manual_seed takes 64 bits)."""
    big = 2**64
    assert tomllib.loads(f"seed = {big}")["seed"] == big
    with pytest.raises(ValueError, match="Overflow"):
        torch.manual_seed(big)
    for item in (f"seed={big}", f"max_steps={2**63}", f"seed={-2**63 - 1}"):
        with pytest.raises(EmberError, match="is out of range: TOML integers are 64-bit"):
            load_config(None, [item])
    assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1
    assert load_config(None, [f"seed={-2**63}"]).seed == -2**63


def test_an_inline_table_in_set_merges_into_the_files_table(tmp_path):
    """``--set 'lora={rank=8}'`` replaced the file's whole [lora] table: its alpha and targets
    went back to their defaults without a word. It is ``--set lora.rank=8`` now."""
    path = tmp_path / "run.toml"
    path.write_text('[lora]\nrank = 4\nalpha = 8\ntargets = ["q", "v"]\n'
                    '[eval]\nmetrics = ["f1"]\nmax_new_tokens = 9\n')
    inline = load_config(path, ["lora={rank=8}", 'eval={metrics=["exact_match"]}'])
    dotted = load_config(path, ["lora.rank=8", 'eval.metrics=["exact_match"]'])
    assert inline == dotted
    lora = inline.lora
    assert (lora.alpha, lora.targets, inline.eval.max_new_tokens) == (8, ("q", "v"), 9)


def test_a_string_with_any_character_round_trips_through_the_written_config():
    """A DEL (U+007F) in a string was written raw: TOML forbids it, so the run's own
    config.toml (and ``ember config``'s output) could not be read back (--resume failed with
    "invalid TOML"). tomllib is the oracle."""
    from ember.engine.config_doc import annotated_toml

    text = 'a\x7fb "q" \\ ü \t\n\x01 end'
    cfg = load_config(None, [f"data.system_prompt={json.dumps(text)}", f"name={json.dumps(text)}"])
    assert cfg.data.system_prompt == cfg.name == text
    for written in (to_toml(cfg), annotated_toml(cfg)):
        data = tomllib.loads(written)
        assert data["name"] == data["data"]["system_prompt"] == text


def test_a_config_saved_in_another_encoding_or_format_says_so(tmp_path, capsys):
    """A UTF-16 or Latin-1 file (Windows editors, PowerShell's >) was a UnicodeDecodeError
    traceback; a UTF-8 byte order mark (Notepad) is skipped, the rest read as tomllib reads it;
    YAML or JSON written by mistake is named as such."""
    text = 'max_steps = 3\n[lora]\nrank = 2\n[data]\nsystem_prompt = "été"\n'
    expect = from_dict(TrainConfig, tomllib.loads(text))
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(bom) == expect and expect.data.system_prompt == "été"
    cases = {"u16.toml": (text.encode("utf-16"), "u16.toml is UTF-16 text; TOML files are UTF-8"),
             "latin1.toml": (text.encode("latin-1"), r"latin1.toml is not UTF-8 text \(byte "
                             f"{text.index('é')}: b'.xe9'\\); TOML files are UTF-8"),
             "c.yaml": (b"max_steps: 3\n", "line 1, column 10.*this looks like YAML"),
             "j.toml": (b'{"max_steps": 3}\n', "invalid TOML: .*at line 1.*this looks like JSON")}
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EmberError, match=match):
            load_config(tmp_path / name)
    capsys.readouterr()
    assert main(["config", str(tmp_path / "u16.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: ") and len(err.splitlines()) == 1


def test_a_later_set_of_a_key_wins_as_the_help_says(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "a later --set of the same key wins" in " ".join(capsys.readouterr().out.split())
    cfg = load_config(None, ["lora.rank=4", "lora.rank=8", "lora={alpha=2, dropout=0.1}",
                             "lora.alpha=3", "lora={dropout=0.2}"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (8, 3, 0.2)


@pytest.mark.parametrize("text, meant", [
    ("max_steps = 10.0", 10), ('max_steps = "10"', 10), ('plot = "True"', True),
    ("plot = 0", False), ('[optim]\nlr = "1e-4"', 1e-4), ("[eval]\nbefore = 1", True),
    ("name = 2024", "2024"), ("[model]\nname = 7", "7")])
def test_a_value_of_the_wrong_type_that_plainly_means_one_says_how_to_write_it(tmp_path, text,
                                                                                meant):
    """``max_steps = 10.0``, a quoted number, a quoted or capitalised boolean: the error said
    what was wrong but not what to write; the line it suggests is TOML (tomllib) that loads."""
    bad = tmp_path / "bad.toml"
    bad.write_text(text + "\n")
    with pytest.raises(EmberError, match=r"must be .*, got .* \(write ") as e:
        load_config(bad)
    line = re.search(r"\(write (.+?)(:| without|,|\))", str(e.value)).group(1)
    good = tmp_path / "good.toml"
    good.write_text(line + "\n")
    section, _, name = line.split(" = ")[0].rpartition(".")
    want = tomllib.loads(line)
    cfg = load_config(good)
    if section:
        cfg, want = getattr(cfg, section), want[section]
    assert getattr(cfg, name) == want[name] == meant
    if "--set '" in str(e.value):  # the --set form it gives for a string
        item = str(e.value).split("--set '")[1].split("'")[0]
        assert load_config(None, [item]) == load_config(good)


@pytest.mark.parametrize("text, meant", [('model = "m"', "model.name"),
                                         ('optim = "adamw_8bit"', "optim.name"),
                                         ('head = "classification"', "head.type")])
def test_a_table_given_as_its_name_suggests_the_key(tmp_path, text, meant):
    """``model = "my-model"`` said only that model must be a table."""
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(EmberError, match=rf"must be a table .*\(did you mean {meant}\?\)"):
        load_config(path)
    value = tomllib.loads(text)[meant.split(".")[0]]
    section, name = meant.split(".")
    assert getattr(getattr(load_config(None, [f"{meant}={value}"]), section), name) == value


def test_a_recipe_named_with_toml_says_its_name(tmp_path, monkeypatch):
    """``ember train quickstart.toml`` outside the repository said only "not found"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EmberError, match=r"^config file quickstart.toml not found \(the recipe "
                                         r"is named without .toml: quickstart\)$"):
        load_config("quickstart.toml")
    with pytest.raises(EmberError, match=r"^config file other.toml not found$"):
        load_config("other.toml")
