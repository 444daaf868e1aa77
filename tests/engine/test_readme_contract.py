"""What README.md promises a user, tried: CLI help that lists what the README lists, exports that
load in the tool they are for (PEFT) with the run's own logits, errors for a user's mistakes that
say what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ember.engine.cli import build_parser, main
from ember.engine.state import load_run_model
from ember.engine.trainer import train
from tests.engine._tiny import tiny_config


def _help(*argv: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd" or getattr(a, "choices", None))
    return sub.choices[argv[0]].format_help() if argv else parser.format_help()


def test_export_help_lists_every_gguf_type_the_readme_lists():
    from ember.models.gguf_export import GGUF_TYPES

    text = " ".join(_help("export").lower().split())
    missing = [t for t in GGUF_TYPES if t not in text]
    assert not missing, f"ember export --help does not list {missing}"


def test_an_adapter_of_a_context_extended_run_tells_peft_users_the_rope_it_needs(
        tiny, tmp_path, capsys):
    """A PEFT adapter has no place for model.rope_scaling: PEFT on the plain base computes
    another model. The export says so, with the base config's fields to set; set as it says,
    transformers + PEFT give the run's logits."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    run = tmp_path / "run"
    train(tiny_config(tiny, run, 'model.rope_scaling="yarn"', "model.rope_factor=4.0",
                      "max_steps=2", "eval.metrics=[]", "optim.lr=0.02"),
          echo=lambda *a: None, progress=False)
    capsys.readouterr()
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    err = capsys.readouterr().err
    assert "model.rope_scaling" in err and "rope_parameters" in err
    fields = json.loads(err[err.index("{"):err.rindex("}") + 1])
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 100, 150, 7, 12]])
    model, _, _ = load_run_model(run, "cpu")
    with torch.no_grad():
        ours = model.float()(ids)
        config = AutoConfig.from_pretrained(tiny["model"])
        for key, value in fields.items():
            setattr(config, key, value)
        base = AutoModelForCausalLM.from_pretrained(tiny["model"], config=config,
                                                    dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
        unscaled = PeftModel.from_pretrained(plain, tmp_path / "adapter")(ids).logits
    assert (unscaled - ours).abs().max() > 1e-3  # the note matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_an_adapter_for_another_model_names_the_model_it_was_trained_on(tiny, tmp_path, capsys):
    from ember.models import ModelConfig, Transformer
    from ember.models.loading import load_pretrained, save_pretrained

    run = tmp_path / "run"
    train(tiny_config(tiny, run, "max_steps=1", "eval.metrics=[]"), echo=lambda *a: None,
          progress=False)
    _, tok = load_pretrained(tiny["model"])
    narrow = Transformer(ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                     num_layers=2, num_heads=4, num_kv_heads=2,
                                     tie_word_embeddings=True))
    save_pretrained(narrow.init_weights(std=0.05, seed=0), tmp_path / "other", tok)
    capsys.readouterr()
    code = main(["generate", str(tmp_path / "other"), "--adapter", str(run / "final" / "adapter"),
                 "--raw", "--prompt", "say red ->", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "do not fit this model" in err and tiny["model"] in err, err


@pytest.mark.parametrize("key, value, hint", [
    ("method", "qlora", 'model.quantize = "nf4"'),
    ("method", "dora", "lora.use_dora = true"),
    ("method", "dpo", 'objective = "dpo"'),
    ("method", "sft", 'objective = "sft"'),
    ("objective", "lora", 'method = "lora"'),
])
def test_a_method_or_objective_named_as_other_tools_name_it_says_the_ember_setting(
        tiny, tmp_path, key, value, hint):
    """Axolotl's adapter: qlora, a DPO run asked for as a method: the README's setting named."""
    from ember import EmberError

    with pytest.raises(EmberError, match=f"{key} must be one of .*{re.escape(hint)}"):
        tiny_config(tiny, tmp_path, f'{key}="{value}"')


def test_sampling_flags_without_a_temperature_are_said_to_be_unused(tiny, capsys):
    """Greedy is the default: --top-p / --top-k / --min-p / --top-h / --seed alone change
    nothing, which transformers' generate(do_sample=False) says too ("generation flags are not
    valid and may be ignored"); was silent."""
    def err(*flags):
        capsys.readouterr()
        assert main(["generate", tiny["model"], "--raw", "--prompt", "say red ->",
                     "--max-new-tokens", "2", *flags]) == 0
        return capsys.readouterr().err

    said = err("--top-p", "0.5", "--seed", "3")
    assert "--top-p" in said and "--seed" in said and "--temperature" in said
    assert "--top-k" not in said
    assert "--top-p" not in err("--top-p", "0.5", "--temperature", "0.7")
    assert "--temperature" not in err()


def test_eval_help_names_the_multiple_choice_metric_the_readme_tells_to_ask_for():
    text = " ".join(_help("eval").split())
    assert "choice_accuracy_mutual_info" in text


def test_a_run_resumed_through_its_own_config_file_from_another_folder_continues_there(
        tiny, tmp_path, monkeypatch, capsys):
    """README: a run is used from any folder. ``ember train RUN/config.toml --resume`` from
    another folder (the recorded run_dir is relative to the folder the run started in) was a new
    run from step 0 in another folder ("resume: no checkpoint in ...")."""
    from ember.engine.config import load_config

    start, other = tmp_path / "project", tmp_path / "elsewhere"
    start.mkdir()
    other.mkdir()
    monkeypatch.chdir(start)
    cfg = tiny_config(tiny, "run", "max_steps=1", "eval.metrics=[]", "eval.before=false")
    assert cfg.run_dir == "run"
    train(cfg, echo=lambda *a: None, progress=False)
    monkeypatch.chdir(other)
    assert load_config("../project/run/config.toml").out_dir.resolve() == start / "run"
    capsys.readouterr()
    assert main(["train", "../project/run/config.toml", "--resume", "--set", "max_steps=2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not (other / "run").exists()
    steps = [json.loads(r)["step"] for r in (start / "run" / "metrics.jsonl").read_text()
             .splitlines() if json.loads(r)["kind"] == "train"]
    assert steps == [1, 2]


def test_a_project_config_named_config_toml_is_not_taken_for_a_run(tiny, tmp_path,
                                                                    monkeypatch):
    from ember.engine.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('name = "mine"\n')
    assert load_config("config.toml").out_dir == Path("runs/mine")


def test_eval_generate_and_export_take_a_runs_config_file_as_the_run(tiny, tmp_path, capsys):
    """As ember train RUN/config.toml does: was "config.toml is a file but not a .gguf"."""
    run = tmp_path / "run"
    train(tiny_config(tiny, run, "max_steps=1", "eval.metrics=[]", "eval.before=false"),
          echo=lambda *a: None, progress=False)
    said = {}
    for target in (run, run / "config.toml"):
        capsys.readouterr()
        assert main(["generate", str(target), "--prompt", "say red ->",
                     "--max-new-tokens", "3"]) == 0
        said[target.name] = capsys.readouterr().out
    assert said["run"] == said["config.toml"]
    assert main(["export", str(run / "config.toml"), "--adapter", str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "adapter_config.json").is_file()


def test_a_split_that_leaves_no_training_examples_shows_the_lines_skipped(tiny, tmp_path):
    """A file of 2 lines, one bad: was 'val_fraction=0.2 leaves no training examples out of 1'
    with the bad line never shown (the data report came after)."""
    from ember import EmberError
    from ember.engine.config import load_config

    data = tmp_path / "two.jsonl"
    data.write_text('{"prompt": "say red ->", "completion": " red"}\n{"prompt": "say dog ->"}\n')
    with pytest.raises(EmberError, match=r"(?s)out of 1.*two.jsonl:2: missing field 'completion'"):
        train(load_config(None, [f'model.name="{tiny["model"]}"', f'run_dir="{tmp_path}/run"',
                                 'device="cpu"', f'data.train=["{data}"]', "data.max_seq_len=64",
                                 "data.tokens_per_batch=128", "data.val_fraction=0.2",
                                 "max_steps=1", "plot=false"]),
              echo=lambda *a: None, progress=False)
