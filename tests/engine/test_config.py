"""Run configs: TOML / recipes / --set overrides, errors that name the key, resolved round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from ember import EmberError
from ember.engine.config import (
    TrainConfig,
    from_dict,
    load_config,
    parse_override,
    parse_toml,
    recipe_names,
    to_toml,
)
from ember.engine.config_doc import unused_settings
from ember.engine.runtime import cpu_has_bf16, resolve

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides():
    assert load_config() == TrainConfig()
    cfg = load_config(None, ["lora.rank=8", "optim.betas=[0.9, 0.95]", "model.name=my-model",
                             'eval.metrics=["exact_match", "f1"]', "data.train=a.jsonl",
                             "max_steps=10", "optim.lr=1e-4", 'method="full"',
                             "train_layers=[0, -1]"])
    assert cfg.lora.rank == 8 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.name == "my-model"  # a bare word is a string
    assert cfg.eval.metrics == ("exact_match", "f1") and cfg.data.train == ("a.jsonl",)
    assert cfg.max_steps == 10 and cfg.optim.lr == 1e-4 and cfg.train_layers == (0, -1)
    assert parse_override("a.b = [1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("item, key, valid", [
    ("lora.rnk=8", "lora.rnk", "rank"),
    ("lr=1e-3", "'lr'", "optim"),
    ("optim.warmup=3", "optim.warmup", "warmup_steps"),
    ("data.trian=x.jsonl", "data.trian", "train"),
    ("eval.every=5", "eval.every", "every_steps"),
])
def test_unknown_keys_are_named_with_the_valid_ones(item, key, valid):
    with pytest.raises(EmberError, match="unknown config key") as e:
        load_config(None, [item])
    assert key in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("item, match", [
    ('lora.rank="eight"', "lora.rank must be an integer"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("lora=3", "lora must be a table"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2"),
    ("optim.schedule=cosne", "optim.schedule must be one of"),
    ("precision=fp8", "precision must be one of"),
    ('eval.metrics=["bleu"]', "eval.metrics entry must be one of"),
    ('eval.early_stopping="f1"', "eval.early_stopping must be one of"),
    ('freeze=["embed.*"]', "method = \"full\""),
    ("data.max_seq_len=10000", "tokens_per_batch"),
    ("lora.rank", "key=value"),
    ("lora.rank.x=1", "lora.rank must be an integer, got a table"),
    # Caught before training, not as a crash (threads, max_examples) or a late error after it
    # (max_val_batches), nor silently ignored (a negative warmup, no new tokens).
    ("threads=0", "threads must be >= 1"),
    ("optim.warmup_steps=-3", "optim.warmup_steps must be >= 0"),
    ("eval.max_examples=0", "eval.max_examples must be >= 1"),
    ("eval.max_val_batches=0", "set eval.val_loss = false"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1"),
    ("eval.show=-1", "eval.show must be >= 0"),
    ('device="tpu"', "device must be"),  # was torch's RuntimeError at the start of the run
    ("task.train=0", "task.train must be >= 1"),  # was "data.train is empty"
    ('data.validation=""', "data.validation holds an empty file name"),  # was ".: is a dir"
    ('data.train=["a.jsonl", " "]', "data.train holds an empty file name"),
    ('eval.choices=""', "eval.choices is empty"),
    # TOML's nan / inf: were taken (NaN weights after the first step, clipping to NaN, a run
    # whose epochs never end, NaN embeddings)
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number, got nan"),
    ("optim.max_grad_norm=inf", "optim.max_grad_norm must be a finite number, got inf"),
    ("optim.eps=nan", "optim.eps must be a finite number"),
    ("epochs=inf", "epochs must be a finite number"),
    ("neftune_noise_alpha=nan", "neftune_noise_alpha must be a finite number"),
    ("lora.alpha=-inf", "lora.alpha must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.betas=[0.9, nan]", r"optim.betas\[1\] must be a finite number"),
    # were taken: the run directory runs/ itself (name ""), runs/.. = the current folder, or
    # the current folder (run_dir ""): the run's files written among the others
    ("name=", "name must be a folder name for runs/<name>, got ''; give run_dir"),
    ('name=".."', "name must be a folder name"),
    ('name="runs/../x"', "name must be a folder name"),
    ('name="/tmp/x"', "name must be a folder name"),
    ('run_dir=" "', "run_dir is empty"),
    # the current folder, loaded as the model (or its files named in a confusing error)
    ("model.name=", "model.name is empty: give a built-in name, an HF model folder or a .gguf"),
])
def test_bad_values_are_clear_errors(item, match):
    with pytest.raises(EmberError, match=match):
        load_config(None, [item])


def test_top_level_key_after_a_table_says_so(tmp_path):
    """TOML puts a key written after [model] into [model]: the error says why max_steps is
    unknown there."""
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "m"\nmax_steps = 10\n')
    with pytest.raises(EmberError, match=r"'max_steps' is a top-level key: in TOML it must come "
                                         r"before the first \[table\]"):
        load_config(path)


def test_sources(tmp_path):
    assert "quickstart" in recipe_names()
    example = REPO / "examples" / "quickstart.toml"
    assert load_config(example) == load_config("quickstart")  # the example is the recipe
    with pytest.raises(EmberError, match="recipes: .*quickstart"):
        load_config("no-such-recipe")
    with pytest.raises(EmberError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 8\n")
    with pytest.raises(EmberError, match="bad.toml: invalid TOML"):
        load_config(bad)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('name = "x"\n[lora]\nrank = 4\n')
    assert load_config(run).lora.rank == 4  # a run directory stands for its config


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve(load_config("quickstart", [f'run_dir="{tmp_path}"',
                                             "optim.betas=[0.8, 0.9]"]))
    assert cfg.device == "cpu" or cfg.device.startswith("cuda")
    assert cfg.precision in ("bf16", "fp32") and cfg.optim.lr == 2e-3  # the recipe's own
    if cfg.device == "cpu":
        assert cfg.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert cfg.data.train == (str(tmp_path / "data" / "train.jsonl"),)
    assert cfg.data.test == str(tmp_path / "data" / "test.jsonl")
    text = to_toml(cfg)
    assert from_dict(TrainConfig, parse_toml(text, "x")) == cfg
    assert resolve(cfg) == cfg  # nothing "auto" is left
    assert resolve(load_config(None, ['method="full"'])).optim.lr == 2e-5
    assert resolve(load_config(None, ['method="lora"'])).optim.lr == 1e-3  # "auto" for LoRA


def test_support_tickets_task(tmp_path):
    import json

    from ember.engine.tasks import ISSUES, PRODUCTS, generate_splits, write_splits

    sizes = {"train": 300, "validation": 20, "test": 40}
    splits = generate_splits("support-tickets", sizes, seed=0)
    assert splits == generate_splits("support-tickets", sizes, seed=0)  # deterministic
    assert {k: len(v) for k, v in splits.items()} == sizes
    prompts = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert sum(map(len, prompts)) == sum(sizes.values())  # no ticket in two splits
    labels = {"category": set(), "priority": set(), "product": set()}
    for r in splits["train"]:
        rec = json.loads(r["completion"])
        assert rec.keys() == labels.keys() and r["completion"] == " " + json.dumps(rec)
        assert any(a.lower() in r["prompt"].lower() for a in PRODUCTS[rec["product"]])
        for k, v in rec.items():
            labels[k].add(v)
    assert labels == {"category": set(ISSUES), "priority": {"high", "medium", "low"},
                      "product": set(PRODUCTS)}
    paths = write_splits("support-tickets", tmp_path, sizes)
    assert [json.loads(x) for x in paths["test"].read_text().splitlines()] == splits["test"]
    with pytest.raises(EmberError, match="unknown task"):
        generate_splits("nope", sizes)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "cpo", "kto"])
def test_early_stopping_on_perplexity_of_a_preference_run_is_refused(objective):
    """A preference run's evaluation has no perplexity: early stopping on it never stopped and
    never kept the best weights (silently)."""
    with pytest.raises(EmberError, match=f'does not apply to objective = "{objective}"'):
        load_config(None, [f'objective="{objective}"', 'eval.early_stopping="perplexity"'])
    load_config(None, [f'objective="{objective}"', 'eval.early_stopping="val_loss"'])


def test_settings_the_run_does_not_use_are_named():
    """A table of another method / objective, or a knob whose switch is off, is reported (the
    trainer prints each line as a note) instead of silently ignored; the quickstart and a
    config with only what it uses report nothing, and neither does a config built in code."""
    cfg = load_config(None, ["prompt_tuning.num_virtual_tokens=5", "dpo.beta=0.5",
                             "kto.beta=0.2", "eval.patience=2", 'head.label_field="y"',
                             "task.train=5", "activations.every_k=3"])
    lines = unused_settings(cfg)
    assert [ln.split(" ignored")[0] for ln in lines] == [
        "prompt_tuning.num_virtual_tokens", "dpo.beta", "kto.beta", "head.label_field",
        "eval.patience", "task.train", "activations.every_k"]
    assert 'method is "lora"' in lines[0] and 'objective is "sft"' in lines[1]
    used = load_config(None, ['method="prompt"', "prompt_tuning.num_virtual_tokens=5",
                              'objective="simpo"', "simpo.beta=1.0", "eval.patience=2",
                              'eval.early_stopping="val_loss"'])
    assert unused_settings(used) == []
    reward = load_config(None, ['head.type="reward"', "head.center_rewards_coefficient=0.1",
                                'head.label_field="y"'])
    assert unused_settings(reward) == []
    lora_in_full = load_config(None, ['method="full"', "lora.rank=8",
                                      'head.type="classification"', 'head.labels=["a", "b"]'])
    assert [ln.split(" ignored")[0] for ln in unused_settings(lora_in_full)] == ["lora.rank"]
    no_metrics = load_config(None, ["eval.metrics=[]", "eval.max_new_tokens=8"])
    assert unused_settings(no_metrics)[0].startswith("eval.max_new_tokens ignored")
    assert unused_settings(load_config(None, ["eval.max_new_tokens=8"])) == []
    assert unused_settings(load_config(REPO / "examples" / "quickstart.toml")) == []
    assert unused_settings(TrainConfig(method="full", lora=TrainConfig().lora)) == []


@pytest.mark.parametrize("head, metric", [
    ("classification", "accuracy"), ("classification", "macro_f1"), ("reward", "accuracy"),
    ("reward", "margin"), ("regression", "mse"), ("regression", "pearson")])
def test_early_stopping_on_a_head_default_metric(head, metric):
    """A task head's default eval.metrics (README: "the default; early_stopping may use them")
    can be stopped on without listing them (they were refused: "must be one of 'val_loss',
    'perplexity', 'exact_match'"); a metric the head does not score is still refused."""
    cfg = load_config(None, [f'head.type="{head}"', f'eval.early_stopping="{metric}"'])
    assert cfg.eval.early_stopping == metric
    with pytest.raises(EmberError, match="eval.early_stopping must be one of 'val_loss'"):
        load_config(None, [f'head.type="{head}"', 'eval.early_stopping="exact_match"'])
    with pytest.raises(EmberError, match="'perplexity', 'exact_match', got"):
        load_config(None, [f'eval.early_stopping="{metric}"'])  # no head: generation metrics


def test_ember_config_lists_exactly_the_accepted_keys_each_explained():
    """``ember config`` (annotated_toml) is the config's reference: every key a config accepts
    is printed, with its meaning (keys with no source comment had none), and nothing else."""
    import dataclasses
    import re

    from ember.engine.config import TrainConfig
    from ember.engine.config_doc import MORE_DOCS, annotated_toml

    cfg = load_config("quickstart")
    text = annotated_toml(cfg)
    printed, section = set(), ""
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1) + "."
            continue
        if not line:
            continue
        m = re.match(r"(?:# )?(\w+) = (.*?)  # (.+)$", line)
        assert m and m.group(3).strip(), f"no meaning for: {line!r}"
        printed.add(section + m.group(1))
    accepted = set()
    for f in dataclasses.fields(TrainConfig):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            accepted |= {f"{f.name}.{g.name}" for g in dataclasses.fields(sub)}
        else:
            accepted.add(f.name)
    assert printed == accepted
    for sec, keys in MORE_DOCS.items():  # no stale entries
        assert {f"{sec}.{k}" if sec else k for k in keys} <= accepted


def test_a_folder_that_is_not_a_run_says_so(tmp_path):
    """``ember train FOLDER --resume`` on a folder without config.toml named a "config file"."""
    with pytest.raises(EmberError, match="folder without config.toml: not a run directory"):
        load_config(str(tmp_path))
    with pytest.raises(EmberError, match="not found .nor a run directory"):
        load_config(str(tmp_path / "runs" / "quickstart"))


def test_a_run_directory_is_its_own_run_dir_from_any_folder(tmp_path, monkeypatch):
    """``ember train RUN --resume`` (cli docstring: RUN_DIR) from another folder took the run
    directory as runs/<name> of the current folder: a new run from step 0 there, silently."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(load_config(None, ["name=a"])))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.toml").write_text(to_toml(load_config(None, ["run_dir=old/place"])))
    monkeypatch.chdir(tmp_path / "runs")
    assert load_config(run).out_dir == run
    assert load_config(str(moved), ["max_steps=9"]).out_dir == moved  # a moved run directory
    # --set name / run_dir: a new run from the directory's settings
    assert load_config(run, ["name=b"]).out_dir == Path("runs/b")
    assert load_config(run, ["run_dir=c"]).out_dir == Path("c")
    monkeypatch.chdir(tmp_path)  # where the run started: its config as written
    assert load_config(run).run_dir is None and load_config(run).out_dir == Path("runs/a")


def test_a_config_from_a_pipe_is_read(tmp_path):
    """``ember train <(...)`` / ``/dev/stdin``: a named pipe exists but is no regular file; it was
    "config file /dev/fd/63 not found"."""
    import os
    import threading

    text = 'max_steps = 7\n[lora]\nrank = 2\n'
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(text,), daemon=True)
    writer.start()
    try:
        cfg = load_config(str(fifo))
    finally:
        writer.join(timeout=5)
    assert cfg == from_dict(TrainConfig, tomllib.loads(text))


def test_an_empty_teacher_is_no_teacher():
    """distill.teacher = "" was taken: the current folder loaded as the teacher."""
    with pytest.raises(EmberError, match='objective = "distill" needs distill.teacher'):
        load_config(None, ["objective=distill", 'distill.teacher=" "'])


@pytest.mark.parametrize("dtype", ["", "fp8", "float64", "int8", "bfloat"])
def test_a_model_dtype_the_loader_refuses_is_refused_in_the_config(dtype):
    """model.dtype was checked only when the model loaded (after the run directory was made);
    the config takes exactly what the loader (resolve_dtype, torch's names) takes."""
    from ember.models.loading import resolve_dtype

    with pytest.raises(EmberError):
        resolve_dtype(dtype)
    with pytest.raises(EmberError, match=r'model.dtype must be "auto", "float32"'):
        load_config(None, [f'model.dtype="{dtype}"'])
    for ok in ("auto", "bf16", "float16", "fp32", "torch.bfloat16"):
        assert load_config(None, [f"model.dtype={ok}"]).model.dtype == ok


def test_cpu_bf16_detection_can_be_forced(monkeypatch, tmp_path):
    """EMBER_CPU_BF16 decides "auto" precision on CPU (the suite sets 0: fp32 tolerances hold on
    a CPU with native bf16 too); anything but 0 / 1 is an error, not a silent default."""
    monkeypatch.setenv("EMBER_CPU_BF16", "1")
    cfg = resolve(load_config(None, ['device="cpu"', 'method="lora"', f'run_dir="{tmp_path}"']))
    assert cfg.precision == "bf16" and cfg.model.dtype == "bfloat16"
    monkeypatch.setenv("EMBER_CPU_BF16", "0")
    cfg = resolve(load_config(None, ['device="cpu"', 'method="lora"', f'run_dir="{tmp_path}"']))
    assert cfg.precision == "fp32" and cfg.model.dtype == "float32"
    monkeypatch.setenv("EMBER_CPU_BF16", "yes")
    with pytest.raises(EmberError, match="EMBER_CPU_BF16 must be 0 or 1"):
        cpu_has_bf16()
