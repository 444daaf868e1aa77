"""A run's local paths (model.name, model.init, distill.teacher, data files) given relative to
the folder it started in: recorded absolute, so ``ember generate / eval / export RUN`` and
``ember train RUN --resume`` work from any folder; a run that recorded them relative (older
Ember) names the key, its config and the way out."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ember import EmberError
from ember.engine.cli import main
from ember.engine.config import load_config
from tests.engine._tiny import make_tiny_model, tiny_rows, write_jsonl
from tests.engine.test_hfdatasets import _save_to_disk


def _relative_run(root: Path) -> Path:
    """A 1-step LoRA run started in ``root/work`` with every path relative."""
    work = root / "work"
    work.mkdir()
    make_tiny_model(work / "model")
    write_jsonl(work / "train.jsonl", tiny_rows(16, seed=1))
    # the test split: a datasets DatasetDict folder (save_to_disk), recorded as "dd:test"
    _save_to_disk(work / "dd" / "test", tiny_rows(4, seed=3))
    (work / "dd" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    (work / "run.toml").write_text("""
name = "x"
max_steps = 1
device = "cpu"
precision = "fp32"
plot = false
[model]
name = "model"
[lora]
rank = 4
alpha = 8
[data]
train = ["train.jsonl"]
test = "dd"
max_seq_len = 64
tokens_per_batch = 128
[eval]
max_new_tokens = 2
metrics = []
[checkpoint]
every_steps = 1
""")
    return work


def test_a_run_on_a_relative_model_folder_is_used_from_another_folder(tmp_path, monkeypatch,
                                                                      capsys):
    """model.name = "model" (a folder where the run started): ember generate ../work/runs/x from
    another folder said "model 'model' not found". The run's adapter on its base gives
    transformers + peft's logits, loaded from anywhere."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = _relative_run(tmp_path)
    monkeypatch.chdir(work)
    assert main(["train", "run.toml"]) == 0
    recorded = load_config(work / "runs" / "x")
    assert recorded.model.name == str(work / "model")  # a local path, recorded absolute
    assert recorded.data.train == (str(work / "train.jsonl"),)
    assert recorded.data.test == f"{work / 'dd'}:test"  # the split named like the setting
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = "../work/runs/x"
    capsys.readouterr()
    assert main(["generate", run, "--prompt", "say red ->", "--max-new-tokens", "2"]) == 0
    assert main(["eval", run]) == 0  # the run's data.test
    assert "loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", run, "--data", "../work/dd"]) == 0  # a datasets folder: its test split
    assert "loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", run, "--resume", "--set", "max_steps=2"]) == 0
    assert main(["export", run, "--merged", "merged"]) == 0

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    want = PeftModel.from_pretrained(base, work / "runs" / "x" / "final" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(elsewhere / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_run_whose_name_was_not_a_path_keeps_the_name(tmp_path, monkeypatch):
    """A built-in name (no such folder here) stays a name, not a path of the current folder."""
    from ember.engine.runtime import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name=smollm2-135m-instruct", "distill.teacher=smollm2",
                             "data.train=[missing.jsonl]"])
    out = absolute_paths(cfg)
    assert (out.model.name, out.distill.teacher, out.data.train) == (
        "smollm2-135m-instruct", "smollm2", ("missing.jsonl",))


def test_a_run_that_recorded_a_relative_model_names_the_key_and_the_way_out(tmp_path,
                                                                            monkeypatch, capsys):
    """A run directory whose config.toml holds model.name = "model" (as older runs recorded
    it), used from another folder: the error names the key, the config and what to do."""
    make_tiny_model(tmp_path / "work" / "model")
    run = tmp_path / "work" / "runs" / "x"
    run.mkdir(parents=True)
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(4))
    (run / "config.toml").write_text(f'name = "x"\n[model]\nname = "model"\n'
                                     f'[data]\ntrain = ["{train}"]\n')
    (run / "final" / "adapter").mkdir(parents=True)
    shutil.copy(tmp_path / "work" / "model" / "config.json", run / "final" / "adapter")
    monkeypatch.chdir(tmp_path)
    for argv in (["generate", str(run), "--prompt", "hi"], ["eval", str(run), "--data", "x"],
                 ["export", str(run), "--merged", "out"], ["train", str(run), "--resume"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ember: error: the run's model.name 'model' "
                              f"({run / 'config.toml'}) not found: a relative path is taken from "
                              f"the current folder, {tmp_path}; run the command from the folder "
                              "the run started in, or set model.name there to the model's "
                              "absolute path"), (argv, err)


def test_a_missing_teacher_or_model_is_named_before_the_run_directory_is_written(
        tmp_path, monkeypatch, capsys):
    """distill.teacher = "nope" said "model 'nope' not found" (not the key) after the run
    directory and its config.toml were written; model.name the same."""
    make_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(4))
    monkeypatch.chdir(tmp_path)
    base = ["train", "quickstart", "--set", "model.name=model", "--set", "run_dir=run",
            "--set", f"data.train=[{train}]", "--set", "device=cpu"]
    for extra, key in ((["--set", "objective=distill", "--set", "distill.teacher=nope"],
                        "distill.teacher"), (["--set", "model.name=nope"], "model.name")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ember: error: {key} 'nope' not found: give a folder, a .gguf "
                              "file, a built-in model (smollm2-135m-instruct) or a Hugging Face "
                              "Hub id in the local Hugging Face cache (Ember downloads nothing); "
                              f"a relative path is taken from the current folder, {tmp_path}"), err
        assert not (tmp_path / "run").exists()


def test_a_run_loads_without_its_teacher_and_a_full_run_without_its_base(tmp_path):
    """Loading a run's model needs its base (a LoRA run) and nothing else: a distillation run
    whose teacher is gone, or a full run (final/model) whose base is gone, still loads; the
    adapter on its base gives peft's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ember.engine.state import load_run_model

    base = make_tiny_model(tmp_path / "model")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora_run, full_run = tmp_path / "lora_run", tmp_path / "full_run"
    peft_model.save_pretrained(lora_run / "final" / "adapter")
    (lora_run / "config.toml").write_text(
        f'name = "d"\nobjective = "distill"\n[model]\nname = "{base}"\n[lora]\nrank = 4\n'
        f'alpha = 8\ntargets = ["q_proj", "v_proj"]\n[distill]\nteacher = "{tmp_path / "gone"}"\n')
    shutil.copytree(base, full_run / "final" / "model")
    (full_run / "config.toml").write_text(
        f'name = "f"\nmethod = "full"\n[model]\nname = "{tmp_path / "gone"}"\n')
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    model, _, _ = load_run_model(lora_run, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), peft_model(ids).logits, atol=1e-4,
                                   rtol=1e-4)
    model, _, _ = load_run_model(full_run, "cpu")
    want = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), want(ids).logits, atol=1e-4, rtol=1e-4)


def _tiny_task_run(tmp_path, monkeypatch, *extra: str):
    """A 1-step LoRA [task] run "t" started in tmp_path/work on its model folder "model" (the
    current folder left there): returns tmp_path/work."""
    work = tmp_path / "work"
    make_tiny_model(work / "model")
    monkeypatch.chdir(work)
    sets = ["model.name=model", "name=t", "task.name=support-tickets", "task.train=8",
            "task.validation=0", "task.test=3", "max_steps=1", "device=cpu", "plot=false",
            "data.max_seq_len=64", "data.tokens_per_batch=128", "eval.metrics=[]",
            "lora.rank=4", "lora.alpha=8", *extra]
    assert main(["train", "quickstart", *[x for s in sets for x in ("--set", s)]]) == 0
    return work


def test_a_task_run_is_evaluated_from_another_folder(tmp_path, monkeypatch, capsys):
    """A [task] run's generated splits were recorded as runs/<name>/data/... of the folder it
    started in: ember eval ../work/runs/t from elsewhere said its data.test was not found."""
    work = _tiny_task_run(tmp_path, monkeypatch)
    recorded = load_config(work / "runs" / "t").data
    assert (recorded.train, recorded.test) == ((str(work / "runs/t/data/train.jsonl"),),
                                               str(work / "runs/t/data/test.jsonl"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["eval", "../work/runs/t"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_checkpoint_with_relative_paths_resumes_from_the_folder_it_started_in(tmp_path,
                                                                              monkeypatch):
    """A checkpoint written before paths were recorded absolute (model.name = "model") equals
    the resolved config of its run (model.name absolute) from the folder it started in."""
    from ember.engine.config import to_toml
    from ember.engine.runtime import absolute_paths
    from ember.engine.state import _check_same_run

    make_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", tiny_rows(4))
    monkeypatch.chdir(tmp_path)
    old = load_config(None, ["model.name=model", "data.train=[train.jsonl]"])
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "config.toml").write_text(to_toml(old))
    now = absolute_paths(old)
    assert now.model.name == str(tmp_path / "model")
    _check_same_run(tmp_path / "step_1", now)


def _trained_then_moved(tmp_path, monkeypatch):
    """_relative_run trained (1 step, a checkpoint) in tmp_path/work, the folder then moved to
    tmp_path/moved (the current folder): (work, moved)."""
    work = _relative_run(tmp_path)
    monkeypatch.chdir(work)
    assert main(["train", "run.toml"]) == 0
    monkeypatch.chdir(tmp_path)
    moved = work.rename(tmp_path / "moved")
    monkeypatch.chdir(moved)
    return work, moved


def _is_pefts(base_dir, run) -> None:
    """The LoRA run's model gives transformers + peft's logits of its adapter on base_dir."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.engine.state import load_run_model

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, run / "final" / "adapter")
    model, _, _ = load_run_model(run, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), want(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_run_resumes_after_its_folder_moved(tmp_path, monkeypatch, capsys):
    """Runs record their local paths absolute: a project folder moved (or renamed, or mounted
    elsewhere) after a checkpoint was "the config differs from the checkpoint's in model.name,
    data.train" on ember train run.toml --resume from the new place, where the relative paths
    of older runs resumed. A path recorded absolute that is gone, named alike where the run
    resumes, is the same file; the resumed run's adapter on the moved base gives transformers +
    peft's logits."""


    work, moved = _trained_then_moved(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["train", "run.toml", "--resume", "--set", "max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"resume: model.name was '{work / 'model'}', now '{moved / 'model'}'" in out
    assert "resumed from runs/x/checkpoints/step_00000001" in out
    assert load_config(moved / "runs" / "x").model.name == str(moved / "model")

    _is_pefts(moved / "model", moved / "runs" / "x")


def test_a_changed_path_is_still_refused_on_resume(tmp_path, monkeypatch):
    """Another existing file, or a name in place of a gone path, is not a moved one."""
    from ember.engine.config import to_toml
    from ember.engine.state import _check_same_run

    make_tiny_model(tmp_path / "model")
    make_tiny_model(tmp_path / "other" / "model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "config.toml").write_text(to_toml(load_config(
        None, [f"model.name={tmp_path / 'model'}", "data.train=[/gone/train.jsonl]"])))
    for sets in ([f"model.name={tmp_path / 'other' / 'model'}", "data.train=[/gone/train.jsonl]"],
                 ["model.name=smollm2-135m-instruct", "data.train=[/gone/train.jsonl]"]):
        with pytest.raises(EmberError, match="differs from the checkpoint's in model.name"):
            _check_same_run(tmp_path / "step_1", load_config(None, sets))


def test_a_stage_starts_from_an_earlier_run_after_the_folder_moved(tmp_path, monkeypatch,
                                                                   capsys):
    """A LoRA run recorded its base absolute; the project folder moved, a next stage (model.init
    = that run) loaded the gone base: "model '.../work/model' not found", naming no key. The
    stage's model.name (the same base, where it is now) is loaded; the stage's adapter on it
    gives transformers + peft's logits."""


    work, moved = _trained_then_moved(tmp_path, monkeypatch)
    assert main(["train", "run.toml", "--set", "name=y", "--set", "model.init=runs/x"]) == 0
    _is_pefts(moved / "model", moved / "runs" / "y")
    make_tiny_model(moved / "other")
    capsys.readouterr()
    assert main(["train", "run.toml", "--set", "name=z", "--set", "model.init=runs/x",
                 "--set", "model.name=other"]) == 2
    assert re.search(r"was trained on the base model .*work/model', which is gone; set "
                     r"model.name to that model where it is now", capsys.readouterr().err)


def test_a_task_run_resumes_after_its_folder_moved(tmp_path, monkeypatch, capsys):
    """A [task] run's generated splits live in its run directory, recorded absolute: the folder
    moved, ember train runs/t --resume said "data file not found" for the run's own files. They
    are read where the run directory is now; its adapter gives transformers + peft's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.engine.state import load_run_model

    work = _tiny_task_run(tmp_path, monkeypatch, "checkpoint.every_steps=1")
    monkeypatch.chdir(tmp_path)
    moved = work.rename(tmp_path / "moved")
    monkeypatch.chdir(moved)
    capsys.readouterr()
    assert main(["train", "runs/t", "--resume", "--set", "max_steps=2",
                 "--set", "model.name=model"]) == 0
    out = capsys.readouterr().out
    assert f"now '{moved / 'runs/t/data/test.jsonl'}'" in out
    assert "resumed from runs/t/checkpoints/step_00000001" in out
    assert load_config(moved / "runs" / "t").data.train == (str(moved / "runs/t/data/train.jsonl"),)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(moved / "model", dtype=torch.float32)
    want = PeftModel.from_pretrained(base, moved / "runs" / "t" / "final" / "adapter")
    model, _, _ = load_run_model(moved / "runs" / "t", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), want(ids).logits, atol=1e-4, rtol=1e-4)
