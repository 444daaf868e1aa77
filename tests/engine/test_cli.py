"""The ember CLI end to end on a tiny random model: train, export (adapter / merged), generate,
eval, import-gguf; user errors are one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.engine.cli import main
from tests.engine._tiny import make_tiny_model, moved_without_base, tiny_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(root / "model")
    train = write_jsonl(root / "train.jsonl", tiny_rows(32, seed=1))
    test = write_jsonl(root / "test.jsonl", tiny_rows(6, seed=3))
    cfg = root / "tiny.toml"
    cfg.write_text(f"""
name = "tiny"
run_dir = "{root / 'run'}"
max_steps = 3
device = "cpu"
plot = false
[model]
name = "{model}"
[lora]
rank = 4
alpha = 8
[data]
train = ["{train}"]
val_fraction = 0.2
test = "{test}"
max_seq_len = 64
tokens_per_batch = 128
[eval]
max_new_tokens = 4
""")
    assert main(["train", str(cfg), "--set", "optim.lr=5e-3"]) == 0
    return {"root": root, "model": model, "run": root / "run", "config": cfg, "test": test}


def test_train_writes_a_run(trained, capsys):
    run = trained["run"]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert {"val_loss", "perplexity", "exact_match"} <= set(rows[-1])
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    assert "optim" in (run / "config.toml").read_text()


def _generate(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", *args, "--prompt", "say red dog ->", "--max-new-tokens", "5"]) == 0
    return capsys.readouterr().out


def test_export_and_generate(trained, tmp_path, capsys):
    from ember.engine.state import load_run_model
    from ember.models.loading import load_pretrained

    run = str(trained["run"])
    assert main(["export", run, "--adapter", str(tmp_path / "adapter")]) == 0
    assert main(["export", run, "--merged", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    model, _, _ = load_run_model(run, "cpu")
    merged, _ = load_pretrained(tmp_path / "merged", "float32")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-4, atol=1e-5)
    # The run, the base + exported adapter and the merged model all generate the same text.
    out_run = _generate(capsys, run)
    base, adapter = str(trained["model"]), str(tmp_path / "adapter")
    assert out_run == _generate(capsys, base, "--adapter", adapter, "--raw")
    assert out_run == _generate(capsys, str(tmp_path / "merged"), "--raw")


def test_export_gguf(trained, tmp_path):
    """--gguf merges the run's LoRA adapter (transformers reads the file: tests/models/
    test_gguf_export.py); a plain model folder converts too."""
    from ember.engine.state import load_run_model
    from ember.models.gguf import GGUFFile, load_gguf
    from ember.models.transformer import Transformer

    run, out = str(trained["run"]), tmp_path / "run.gguf"
    assert main(["export", run, "--gguf", str(out), "--gguf-type", "f32"]) == 0
    model, _, _ = load_run_model(run, "cpu")
    cfg, sd, _ = load_gguf(out)
    back = Transformer(cfg).eval()
    back.load_state_dict(sd)
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert main(["export", str(trained["model"]), "--gguf", str(tmp_path / "base.gguf"),
                 "--gguf-type", "q8_0"]) == 0
    with GGUFFile(tmp_path / "base.gguf") as g:
        assert g.metadata["general.file_type"] == 7 and g.metadata["tokenizer.ggml.pre"] == "gpt2"


def test_eval(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained["run"]), "--metrics", "exact_match,accuracy",
                 "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["examples"] == 6 and 0 <= row["exact_match"] <= 1 and row["loss"] > 0
    assert row["perplexity"] == pytest.approx(2.718281828 ** row["loss"], rel=1e-6)


def test_eval_of_a_run_defaults_to_its_metrics(trained, tmp_path, capsys):
    """Without --metrics, ember eval RUN scores what the run was evaluated with (its
    eval.metrics), not always exact_match."""
    import re
    import shutil

    run = shutil.copytree(trained["run"], tmp_path / "run")
    config = run / "config.toml"
    text, n = re.subn(r"(?m)^metrics = .*$", 'metrics = ["accuracy", "f1"]', config.read_text())
    assert n == 1
    config.write_text(text)
    capsys.readouterr()
    assert main(["eval", str(run), "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "f1"} <= set(row) and "exact_match" not in row
    # eval.metrics = [] (no generation metrics in training): loss and perplexity only, as there
    config.write_text(text.replace('metrics = ["accuracy", "f1"]', "metrics = []"))
    assert main(["eval", str(run), "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"data", "examples", "loss", "perplexity"}, row


def test_eval_of_a_run_generates_as_its_evaluations_did(trained, tmp_path, capsys,
                                                        monkeypatch):
    """Without --max-new-tokens / --batch-size, ember eval RUN generates with the run's
    eval.max_new_tokens and eval.batch_size (was: 128 and 64 whatever the run used, so its
    scores could differ from the run's own final evaluation); a model, or the flags, as given."""
    import re
    import shutil

    import ember.engine.evaluation as evaluation

    run = shutil.copytree(trained["run"], tmp_path / "run")
    config = run / "config.toml"
    text, n = re.subn(r"(?m)^batch_size = .*$", "batch_size = 5", config.read_text())
    assert n == 1 and "max_new_tokens = 4\n" in text
    config.write_text(text)
    seen = []
    real = evaluation.generation_eval

    def spy(*args, **kwargs):
        seen.append((kwargs["max_new_tokens"], kwargs["batch_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generation_eval", spy)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run), "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    assert main(["eval", str(trained["model"]), "--raw", "--data", str(trained["test"])]) == 0
    assert seen == [(4, 5), (3, 2), (128, 64)]


def test_eval_of_a_run_from_another_folder_names_its_split_and_the_way_out(trained, tmp_path,
                                                                           capsys, monkeypatch):
    """A run's data.test recorded relative to the folder it started in, ember eval RUN from
    elsewhere: was the bare "test.jsonl: dataset file not found"."""
    import shutil

    run = shutil.copytree(trained["run"], tmp_path / "run")
    config = run / "config.toml"
    config.write_text(config.read_text().replace(f'test = "{trained["test"]}"',
                                                 'test = "test.jsonl"'))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(run), "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().err == (
        f"ember: error: the run's data.test 'test.jsonl' not found (a relative path is taken "
        f"from the current folder, {tmp_path}: run ember eval from the folder the run started "
        "in, or give the file with --data FILE.jsonl)\n")
    assert main(["eval", str(run), "--max-new-tokens", "4", "--data", trained["test"]]) == 0


def test_import_gguf(tmp_path, capsys):
    from ember.models.loading import load_pretrained
    from tests.models.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["import-gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")]) == 0
    model, tok = load_pretrained(tmp_path / "hf")
    assert tok is not None and model.cfg.num_layers == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.toml"], "missing.toml not found"),
    (["train", "quickstart", "--set", "lora.rnk=3"], "unknown config key 'lora.rnk'"),
    (["train", "quickstart", "--set", "optim.lr=-1"], "optim.lr must be > 0"),
    (["export", ".", "--adapter", "x"], "not a run directory"),
    (["export", "no-such-model", "--gguf", "x.gguf"], "not found"),
    (["export", "no-such-model", "--gguf", "x.gguf", "--gguf-type", "Q3_K_XL"],
     "--gguf-type 'Q3_K_XL' is not one of f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k_s"),
    (["generate", "no-such-model", "--prompt", "hi"], "not found"),
    (["export", ".", "--merged", "x", "--gguf-type", "q4_0"], "applies to --gguf OUT.gguf"),
    (["import-gguf", "missing.gguf", "out"], "error: missing.gguf not found\n"),  # was "not a
    (["import-gguf", ".", "out"], ". is a folder; import-gguf converts one .gguf file"),  # .gguf"
])
def test_user_errors_are_one_clean_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: ") and message in err and "Traceback" not in err


def test_resume_needs_the_flag(trained, capsys):
    assert main(["train", str(trained["config"])]) == 2
    assert "--resume" in capsys.readouterr().err


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "ember.engine.cli", "train", "nope.toml"],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "ember: error: config file nope.toml not found"


def test_eval_max_examples_limits_loss_and_generation_alike(trained, capsys):
    """--max-examples N scores the file's first N examples for every number it prints (the
    loss covered the whole file while generation metrics took N): the loss equals transformers'
    mean cross-entropy over those N examples' answer tokens."""
    from transformers import AutoModelForCausalLM

    from ember.engine.data import DataConfig, load_examples
    from ember.models.loading import load_pretrained

    capsys.readouterr()
    assert main(["eval", str(trained["model"]), "--data", trained["test"], "--raw",
                 "--device", "cpu", "--max-examples", "2", "--max-new-tokens", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, tok = load_pretrained(str(trained["model"]), "float32")
    examples, _ = load_examples(trained["test"], DataConfig(use_chat_template=False), tok)
    hf = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()
    total, count = 0.0, 0
    for e in examples[:2]:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        with torch.no_grad():
            logits = hf(ids).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits, labels[0], ignore_index=-100,
                                                         reduction="sum"))
        count += int((labels != -100).sum())
    assert row["loss"] == pytest.approx(total / count, rel=1e-4)
    assert row["examples"] == 2 and "exact_match" in row


def test_bad_output_paths_devices_and_lengths_are_one_clean_line(trained, tmp_path, capsys):
    """Each was a traceback (IsADirectoryError after the whole merge, FileNotFoundError /
    NotADirectoryError from the OS, torch's RuntimeError or "Torch not compiled with CUDA
    enabled"), a silent CPU fallback (a run with --device cuda) or an empty answer (0 tokens,
    which transformers' generate refuses)."""
    from transformers import GenerationConfig

    run, folder, file = str(trained["run"]), tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(RuntimeError):
        torch.device("tpu")
    cases = [
        (["export", run, "--gguf", str(folder)], "is a folder; give the file to write"),
        (["export", run, "--merged", str(file)], "is a file; give the folder"),
        (["export", run, "--merged", str(file / "sub")], str(file)),
        (["generate", run, "--prompt", "hi", "--max-new-tokens", "0"], "must be >= 1, got 0"),
        (["generate", run, "--prompt", "hi", "--device", "tpu"], "--device must be cpu, cuda"),
        (["eval", str(trained["model"]), "--device", "gpu"], "--device must be cpu, cuda"),
    ]
    if not torch.cuda.is_available():
        cases += [(["generate", run, "--prompt", "hi", "--device", "cuda"],
                   "CUDA is not available"),
                  (["chat", str(trained["model"]), "--device", "cuda:0"],
                   "CUDA is not available")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ember: error: ") and message in err, (argv, err)
    assert list(folder.iterdir()) == []


def test_a_missing_data_file_is_named_before_the_model_loads(trained, tmp_path, capsys):
    """Was found only after the model had loaded (a minute for a large one); every missing
    file is named with its key."""
    argv = ["train", str(trained["config"]), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"model.name={tmp_path / 'no-model'}",
            "--set", f"data.train={trained['test']},{tmp_path / 'nope.jsonl'}",
            "--set", f"data.test={tmp_path / 'gone.jsonl'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: data file not found: data.train = ")
    assert "no-model" not in err
    assert "nope.jsonl'; data.test = " in err and "gone.jsonl" in err
    assert not (tmp_path / "run").exists()


def test_no_training_data_is_named_before_the_model_loads(tmp_path, capsys):
    """An empty config (or one without data.train or task.name) loaded the model first, wrote
    the run directory, then said data.train is empty."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["train", str(empty), "--set", f"model.name={tmp_path / 'no-model'}",
                 "--set", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: data.train is empty: give one or more JSONL files")
    assert "task.name = one of 'support-tickets'" in err and len(err.splitlines()) == 1
    assert "no-model" not in err and not (tmp_path / "run").exists()


def test_a_task_run_checks_the_files_it_does_not_generate_before_the_model_loads(
        tmp_path, capsys, monkeypatch):
    """With [task] no file was checked: a missing eval.choices, or a task run continued from
    another folder (its recorded split paths relative to where it started), were found after
    the model loaded."""
    no_model = f"model.name={tmp_path / 'no-model'}"
    cfg = tmp_path / "task.toml"
    cfg.write_text('[task]\nname = "support-tickets"\n')
    assert main(["train", str(cfg), "--set", no_model, "--set", "eval.choices=nope.jsonl",
                 "--set", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"ember: error: data file not found: eval.choices = 'nope.jsonl' (a relative "
                   f"path is taken from the current folder, {Path.cwd()})\n")
    run = tmp_path / "runs" / "t"  # started in tmp_path: its resolved config, as written
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'name = "t"\n[model]\nname = "{tmp_path / "no-model"}"\n'
                                     '[task]\nname = "support-tickets"\n[data]\n'
                                     'train = ["runs/t/data/train.jsonl"]\n')
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("")
    monkeypatch.chdir(run)
    assert main(["train", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: data file not found: data.train = "
                          "'runs/t/data/train.jsonl'") and "no-model" not in err
    assert err.rstrip().endswith("a [task] run of an older Ember recorded its generated files' "
                                 "paths relative to the folder it started in: continue it from "
                                 "there")


def test_export_never_writes_over_what_it_reads(tmp_path, capsys):
    """``ember export RUN --merged BASE`` wrote the merged weights over the run's base model (the
    run then loaded its adapter onto merged weights: silently wrong); ``export MODEL --merged
    MODEL`` and OUT = the run directory wrote where the export reads."""
    base = make_tiny_model(tmp_path / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'name = "r"\nrun_dir = "{run}"\n[model]\nname = "{base}"\n')
    cases = [(["export", str(run), "--merged", str(base)], "the run's base model (model.name)"),
             (["export", str(run), "--adapter", str(run)], "the run directory"),
             (["export", str(base), "--merged", str(base) + "/"], "the model exported")]
    for argv, what in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ember: error: {argv[2]} {argv[3]} is {what}: writing there "
                              "would replace what the export reads")
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


def test_eval_refuses_unknown_or_unusable_metrics_before_scoring(trained, tmp_path, capsys,
                                                                   monkeypatch):
    """``--metrics bleu`` was found only after the whole loss pass (and never on a file of text
    lines: rc 0, the metric silently left out); ``--metrics exact_match`` on text lines (no
    reference to compare with) printed the loss without it; "exact_match, accuracy" (a space
    after the comma) was an unknown metric ' accuracy'. A prompt too long for --max-new-tokens
    is named by its line before the loss pass."""
    import ember.engine.evaluation as evaluation

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "red dog"}, {"text": "one two"}])
    base = ["eval", str(trained["model"]), "--raw", "--device", "cpu", "--max-new-tokens", "2"]
    loss = evaluation.validation_loss
    monkeypatch.setattr(evaluation, "validation_loss", lambda *a, **k: pytest.fail("scored"))
    for data in (text, trained["test"]):
        capsys.readouterr()
        assert main([*base, "--data", data, "--metrics", "exact_match,bleu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ember: error: unknown metric 'bleu'; --metrics takes "), err
    assert main([*base, "--data", text, "--metrics", "exact_match"]) == 2
    assert "has no prompt/completion or messages examples" in capsys.readouterr().err
    assert main([*base, "--data", trained["test"], "--metrics", "json_match"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(  # was after the loss and
        f"ember: error: {trained['test']}:1: json_match needs JSON references")  # generation
    # a prompt with no room for --max-new-tokens: its line, before the loss (was after it)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "say red ->", "completion": " red"},
                                                 {"prompt": "red " * 300, "completion": " red"}])
    assert main([*base, "--data", long]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"ember: error: {long}:2: an evaluation prompt of ") and (
        "exceeds the model's context of 256 tokens; lower eval.max_new_tokens (ember eval: "
        "--max-new-tokens)") in err, err
    monkeypatch.setattr(evaluation, "validation_loss", loss)
    assert main([*base, "--data", text]) == 0  # loss, perplexity and lm-eval's rolling ones
    assert set(json.loads(capsys.readouterr().out)) == {
        "data", "examples", "loss", "perplexity", "word_perplexity", "byte_perplexity",
        "bits_per_byte", "rolling_window"}
    assert main([*base, "--data", trained["test"], "--metrics", "exact_match, accuracy",
                 "--max-examples", "2"]) == 0
    assert {"exact_match", "accuracy"} <= set(json.loads(capsys.readouterr().out))


def test_a_resume_with_other_settings_names_each_key_and_both_values(trained, capsys):
    """Was "differs from the checkpoint's in lora, optim": the table, not which key or what."""
    assert main(["train", str(trained["run"]), "--resume", "--set", "lora.rank=8",
                 "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "in lora.rank (4 in the checkpoint, now 8), optim.lr (0.005 in the checkpoint, " \
           "now 0.5); resume with the same settings" in err


def test_a_reader_that_stops_early_is_no_traceback():
    """``ember config | head`` (or ``less`` quit early) printed a BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "ember.engine.cli", "config"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the command writes (its start takes far longer)
    err = p.stderr.read()
    assert p.wait() == 141 and err == ""


def test_export_merged_keeps_the_dtype_of_a_bf16_base(tiny, tmp_path):
    """A bf16 base trains in fp32 on the CPU; ``export --merged`` writes the merged model in
    the base's bf16, as PEFT's merge_and_unload on the bf16 transformers model keeps it (was
    fp32, twice the base's size). Oracle: transformers loads both folders as bfloat16."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ember.models.loading import load_pretrained, save_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    base = tmp_path / "base"
    save_pretrained(model, base, tok, dtype=torch.bfloat16)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model.name = "{base}"\nrun_dir = "{tmp_path / "run"}"\ndevice = "cpu"\n'
                   f'precision = "fp32"\nmax_steps = 1\nplot = false\n'
                   f'[data]\ntrain = ["{tiny["small"]}"]\nmax_seq_len = 64\n'
                   f'[eval]\nshow = 0\n')
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--merged", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(base).dtype == torch.bfloat16


def test_a_reader_that_stops_early_does_not_end_training(tiny, tmp_path):
    """``ember train c.toml | head``: the run stopped with a BrokenPipeError at the next line it
    printed, without a checkpoint or final/; it now trains to the end, its output going nowhere."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model.name = "{tiny["model"]}"\nrun_dir = "{tmp_path / "run"}"\n'
                   f'device = "cpu"\nprecision = "fp32"\nmax_steps = 2\nplot = false\n'
                   f'[data]\ntrain = ["{tiny["small"]}"]\nmax_seq_len = 64\n[eval]\nshow = 0\n')
    p = subprocess.Popen([sys.executable, "-m", "ember.engine.cli", "train", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the run prints its first line
    err = p.stderr.read()
    assert p.wait() == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if json.loads(r)["kind"] == "train"] == [1, 2]


def test_export_adapter_of_a_moved_run_needs_no_base(trained, tmp_path, capsys):
    """``export RUN --adapter`` of a finished LoRA run writes final/adapter's files as they are
    (PEFT's format already; was: it loaded the base, and failed with "model.name not found" on a
    run moved without it, though the adapter needs nothing else). --merged still needs the base,
    and final/adapter is still checked (a truncated weights file is refused by name)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.engine.state import load_run_model

    run = trained["run"]
    moved = moved_without_base(run, trained["model"], tmp_path / "moved")
    assert main(["export", str(run), "--adapter", str(tmp_path / "here")]) == 0
    assert main(["export", str(moved), "--adapter", str(tmp_path / "there")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "there" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    capsys.readouterr()
    assert main(["export", str(moved), "--merged", str(tmp_path / "m")]) == 2
    assert "model.name" in capsys.readouterr().err and not (tmp_path / "m").exists()
    # the oracle: PEFT applies the exported adapter to the base as the run does
    model, _, _ = load_run_model(run, "cpu")
    base = AutoModelForCausalLM.from_pretrained(trained["model"], torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "there")).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    weights = moved / "final" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["export", str(moved), "--adapter", str(tmp_path / "bad")]) == 2
    assert "cannot read adapter weights" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
