"""Classification runs (``[head] type = "classification"``) through the real path: ``ember train``
on a tiny random model and a separable synthetic task, ``ember eval``, ``ember export`` checked
against transformers / PEFT; linear probing; the per-document loss under accumulation; labelled
data errors; refused configurations; early stopping on accuracy."""

from __future__ import annotations

import contextlib
import json
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.classification import (
    Classification,
    HeadConfig,
    classification_loss,
    infer_labels,
    load_labelled,
)
from ember.engine.cli import main as cli
from ember.engine.config import load_config
from ember.engine.data import DataConfig, collate
from ember.engine.packing import PackedBatches
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve
from ember.models.heads import add_classification_head, classify
from ember.models.loading import load_pretrained
from tests.engine._tiny import quiet, rows_of, write_jsonl

ANIMALS, OTHER = ["cat", "dog", "fish"], ["red", "green", "blue", "one", "two", "three", "sun"]


def animal_rows(n: int, seed: int) -> list[dict]:
    """Separable by attention, not by the last token: "animal" when any word is an animal."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [g.choice(OTHER) for _ in range(g.randint(3, 8))]
        animal = g.random() < 0.5
        if animal:
            words[g.randrange(len(words))] = g.choice(ANIMALS)
        rows.append({"text": " ".join(words), "label": "animal" if animal else "none"})
    return rows


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return {
        "model": tiny["model"],
        **{
            s: write_jsonl(root / f"{s}.jsonl", animal_rows(n, seed))
            for s, n, seed in (("train", 256, 1), ("val", 64, 2), ("test", 128, 3))
        },
    }


def cls_config(task, run_dir, *extra: str):
    sets = [
        f'model.name="{task["model"]}"',
        f'run_dir="{run_dir}"',
        'device="cpu"',
        'precision="fp32"',
        f'data.train=["{task["train"]}"]',
        f'data.validation="{task["val"]}"',
        f'data.test="{task["test"]}"',
        "data.max_seq_len=64",
        "data.tokens_per_batch=256",
        'head.type="classification"',
        "eval.show=0",
        "plot=false",
        "threads=1",
        *extra,
    ]
    return load_config(None, sets)


def test_ember_train_eval_export_lora(task, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = tmp_path / "run"
    toml = tmp_path / "cls.toml"
    toml.write_text(f"""
model.name = "{task["model"]}"
run_dir = "{run}"
device = "cpu"
precision = "fp32"
threads = 1
method = "lora"
epochs = 5
plot = false
[lora]
rank = 8
alpha = 16
[optim]
lr = 1e-2
[data]
train = ["{task["train"]}"]
validation = "{task["val"]}"
test = "{task["test"]}"
max_seq_len = 64
tokens_per_batch = 256
[head]
type = "classification"
[eval]
show = 0
""")
    assert cli(["train", str(toml)]) == 0
    evals = [r for r in rows_of(run) if r["kind"] == "eval"]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["accuracy"] < 0.7, before  # chance on a 50/50 task
    assert after["accuracy"] > 0.9 and after["macro_f1"] > 0.9, after
    assert after["val_loss"] < before["val_loss"] / 2
    resolved = load_config(run)
    assert resolved.head.labels == ("animal", "none")  # inferred, sorted, recorded
    assert resolved.eval.metrics == ("accuracy", "macro_f1")
    capsys.readouterr()

    assert cli(["eval", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 128 and scores["accuracy"] == pytest.approx(after["accuracy"])
    assert cli(["generate", str(run), "--prompt", "cat"]) == 2
    assert "sequence classifier" in capsys.readouterr().err

    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert cli(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    model, tok, _ = load_run_model(run, "cpu")
    texts = [json.loads(line)["text"] for line in open(task["test"])][:6]
    ours = torch.cat([classify(model.eval(), torch.tensor([tok.encode(t, True)])) for t in texts])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # padded rows in HF, packed-free rows in Ember
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert hf.config.id2label == {0: "animal", 1: "none"}
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        task["model"], num_labels=2
    )
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        for other in (hf.eval(), pm.eval()):
            assert (other(**batch).logits - ours).abs().max() < 1e-5


def test_linear_probe_trains_only_the_head(task, tmp_path, capsys):
    run = tmp_path / "probe"
    cfg = resolve(
        cls_config(
            task,
            run,
            'method="full"',
            "train_layers=[]",
            "max_steps=4",
            "optim.lr=1e-2",
            'head.labels=["none", "animal"]',
        )
    )
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    assert [n for n, p in t.model.named_parameters() if p.requires_grad] == ["score.weight"]
    base, _ = load_pretrained(task["model"], "float32")
    params = dict(t.model.named_parameters())
    for n, p in base.named_parameters():  # the decoder is bit-identical
        assert torch.equal(params[n], p), n
    config = json.loads((run / "final" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "none", "1": "animal"}  # the configured order
    model, _, _ = load_run_model(run, "cpu")
    assert torch.equal(model.score.weight, t.model.score.weight)
    assert cli(["eval", str(run), "--data", task["val"], "--metrics", "accuracy"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"data", "examples", "accuracy", "loss"}


def test_loss_is_a_per_document_mean_under_accumulation(task):
    model, tok = load_pretrained(task["model"], "float32")
    add_classification_head(model, ("animal", "none"), pad_token_id=tok.pad_token_id, seed=0)
    examples, rep = load_labelled(task["val"], DataConfig(), tok, ("animal", "none"))
    ex = examples[:7]
    n = len(ex)

    def grads(parts):
        model.zero_grad()
        total = sum(classification_loss(model, collate(p), n)[0] for p in parts)
        total.backward()
        return total.detach(), model.score.weight.grad.clone(), model.embed.weight.grad.clone()

    one = grads([ex])
    split = grads([ex[:2], ex[2:3], ex[3:]])
    alone = torch.cat([classify(model, torch.tensor([e.input_ids])) for e in ex])
    ref = F.cross_entropy(alone, torch.tensor([e.labels[-1] for e in ex]))
    for a, b in zip(one, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one[0], ref.detach(), rtol=1e-5, atol=1e-6)
    assert Classification(resolve(cls_config(task, "unused"))).weight(collate(ex)) == n


def test_bad_labelled_lines_are_reported(task, tmp_path, tiny):
    _, tok = load_pretrained(tiny["model"])
    good = {"text": "red cat", "label": "animal"}
    lines = [
        json.dumps(good),
        json.dumps({"text": "red"}),
        json.dumps({"text": "x", "label": True}),
        json.dumps({"text": "x", "label": ["none"]}),
        json.dumps({"text": "x", "label": "bird"}),
        json.dumps({"text": "x", "label": 7}),
        "{not json",
        json.dumps({"text": "", "label": 0}),
        json.dumps({"text": "blue", "label": 1}),
        "",
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    labels = ("animal", "none")
    examples, rep = load_labelled(path, DataConfig(), tok, labels)
    assert [e.reference for e in examples] == ["animal", "none"]
    assert rep.bad_lines == 7 and rep.blank_lines == 1
    assert rep.kinds == {
        "missing field": 1,
        "wrong type": 2,
        "unknown label": 2,
        "invalid JSON": 1,
        "empty text": 1,
    }
    assert rep.problems[0] == f"{path}:2: missing field 'label' (keys present: ['text'])"
    assert (
        f"{path}:3: field 'label' must be a class name (string) or index (integer), got "
        "boolean" in rep.problems
    )
    assert f"{path}:5: unknown label 'bird' (labels: animal, none)" in rep.problems
    assert "bad lines skipped" in rep.summary() and "and 2 more" in rep.summary()
    with pytest.raises(EmberError, match=r"bad\.jsonl:2: missing field 'label'"):
        load_labelled(path, DataConfig(bad_lines="error"), tok, labels)
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "a", "completion": "b", "label": "none"}) + "\n")
    with pytest.raises(EmberError, match="classification file holds"):
        load_labelled(pc, DataConfig(), tok, labels)

    with pytest.raises(EmberError, match="mix names and indices"):
        infer_labels([path])
    names = tmp_path / "names.jsonl"
    # (a number of more digits than Python's json converts: a ValueError, not a JSONDecodeError)
    big = '{"text": "a", "label": "z", "n": ' + "7" * (sys.get_int_max_str_digits() + 1) + "}"
    names.write_text(
        '{"text": "a", "label": "b"}\n{not json\n{"text": "a"}\n{"text": "c", "label": "a"}\n'
        + big + "\n"
    )
    assert infer_labels([names]) == ("a", "b")  # sorted; bad lines are left to the reader
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": "a", "label": i} for i in (2, 0, 1)])
    assert infer_labels([ints]) == ("0", "1", "2")
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3)
    with pytest.raises(EmberError, match="at least two"):
        infer_labels([one])
    # An unknown label in the test split is counted there, never silently dropped.
    test = write_jsonl(tmp_path / "test.jsonl", [good, {"text": "sun", "label": "plant"}])
    t = Trainer(resolve(cls_config(task, tmp_path / "r", f'data.test="{test}"')), echo=quiet)
    t.objective = Classification(t.raw_cfg)
    t.objective.pad = tok.pad_token_id
    ds = t.objective.load_datasets(resolve(t.raw_cfg).data, tok)
    assert len(ds.test) == 1 and ds.reports[-1].kinds == {"unknown label": 1}


def test_messages_lines_use_the_chat_template(tiny, tmp_path):
    _, tok = load_pretrained(tiny["model"])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs, "label": 1}])
    (ex,), _ = load_labelled(path, DataConfig(), tok, ("a", "b"))
    assert ex.input_ids == tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert ex.labels[-1] == 1 and ex.reference == "b"
    # A line's tools reach the template, also when data.system_prompt is put first.
    tok.chat_template = ("{% if tools %}tools: {{ tools | map(attribute='name') | join(',') }}\n"
                         "{% endif %}" + tok.chat_template)
    tools = [{"name": "lookup", "parameters": {}}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": msgs, "tools": tools, "label": 0}])
    (ex,), _ = load_labelled(path, DataConfig(system_prompt="be brief"), tok, ("a", "b"))
    want = tok.apply_chat_template([{"role": "system", "content": "be brief"}, *msgs], tools=tools)
    assert "tools: lookup" in want
    assert ex.input_ids == tok.encode(want, add_special_tokens=False)


@pytest.mark.parametrize(
    "extra,match",
    [
        (['objective="dpo"'], "with a classification head is not supported"),
        (['method="prompt"'], 'method = "prompt" with a classification head'),
        (['eval.metrics=["json_match"]'], "do not apply to a classifier"),
        (['eval.early_stopping="perplexity"'], "does not apply to a classifier"),
        (['head.type="regression_head"'], "head.type must be"),
        (['head.labels=["a"]'], "at least two distinct"),
        (["head.num_labels=2"], "unknown config key 'head.num_labels'"),
    ],
)
def test_refused_configs(task, tmp_path, extra, match):
    with pytest.raises(EmberError, match=match):
        cls_config(task, tmp_path, *extra)
    with pytest.raises(EmberError, match="head.labels is set but head.type is not"):
        load_config(None, ['head.labels=["a", "b"]'])


def test_early_stopping_on_accuracy(task, tmp_path):
    cfg = cls_config(
        task,
        tmp_path / "es",
        "max_steps=8",
        "eval.every_steps=2",
        'eval.metrics=["accuracy", "macro_f1"]',
        'eval.early_stopping="accuracy"',
        "eval.patience=1",
        "eval.min_delta=1.0",
        "checkpoint.save_final=false",
    )
    res = Trainer(cfg, echo=quiet, progress=False).run()
    assert res.stopped_early and res.steps == 2  # no improvement by 1.0 at the first check
    assert [r["step"] for r in rows_of(tmp_path / "es") if r["kind"] == "eval"] == [0, 2]


def test_classifier_run_resumes_exactly(task, tmp_path):
    extra = (
        "max_steps=4",
        "checkpoint.every_steps=2",
        "eval.metrics=[]",
        "eval.before=false",
        "lora.rank=4",
    )
    Trainer(cls_config(task, tmp_path / "a", *extra), echo=quiet, progress=False).run()
    cfg_b = cls_config(task, tmp_path / "b", *extra)
    Trainer(cfg_b, echo=quiet, progress=False, stop_after=2).run()
    Trainer(cfg_b, resume=True, echo=quiet, progress=False).run()
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)


def test_qlora_classifier_builds_and_trains_the_head(task):
    from ember.engine.runtime import build_model
    from ember.models.nf4 import is_quantized

    cfg = resolve(cls_config(task, "unused", 'model.quantize="nf4"', "lora.rank=4"))
    model, tok = build_model(cfg, "cpu")
    assert is_quantized(model) and type(model.score) is torch.nn.Linear
    examples, _ = load_labelled(
        task["val"], cfg.data, tok, cfg.head.labels, pad=model.cfg.pad_token_id
    )
    classification_loss(model, collate(examples[:4]), 4)[0].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "score.weight" in trained and any("lora_A" in n for n in trained)


def test_lora_head_on_a_bf16_base_is_fp32(task):
    from ember.engine.runtime import build_model

    cfg = resolve(cls_config(task, "unused", 'precision="bf16"', "lora.rank=4"))
    assert cfg.model.dtype == "bfloat16"  # a frozen base in the autocast dtype
    model, tok = build_model(cfg, "cpu")
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32  # trained weights stay fp32, as LoRA's
    examples, _ = load_labelled(task["val"], cfg.data, tok, cfg.head.labels, pad=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = classification_loss(model, collate(examples[:3]), 3)
    loss.backward()
    assert model.score.weight.grad.dtype == torch.float32 and loss.isfinite()


def test_metrics_tell_case_distinct_labels_apart(tiny, tmp_path):
    from ember.engine.classification import label_scores

    model, tok = load_pretrained(tiny["model"], "float32")
    add_classification_head(model, ("A", "a"), pad_token_id=tok.pad_token_id)
    torch.nn.init.zeros_(model.score.weight)  # equal logits: argmax predicts class 0, "A"
    rows = [{"text": t, "label": x} for t, x in (("red", "A"), ("sun", "a"), ("cat", "a"))]
    examples, _ = load_labelled(
        write_jsonl(tmp_path / "c.jsonl", rows), DataConfig(), tok, ("A", "a")
    )
    res = label_scores(model, tok, examples, ["accuracy", "macro_f1"], 256, "cpu", show=1)
    assert res.scores["accuracy"] == pytest.approx(1 / 3)
    assert res.scores["macro_f1"] == pytest.approx((0.5 + 0.0) / 2)
    assert res.samples == [("red", "A", "A")]


def test_fine_tune_an_hf_classifier_folder(task, tmp_path):
    from ember.models.loading import save_pretrained

    model, tok = load_pretrained(task["model"], "float32")
    add_classification_head(model, ("none", "animal"), pad_token_id=tok.pad_token_id, seed=1)
    folder = save_pretrained(model, tmp_path / "hf_classifier", tok)
    plain = cls_config(task, tmp_path / "x", f'model.name="{folder}"').replace(head=HeadConfig())
    with pytest.raises(EmberError, match='is a sequence classifier.*head.type = "classification"'):
        Trainer(plain, echo=quiet, progress=False).run()
    cfg = resolve(
        cls_config(
            task,
            tmp_path / "ft",
            f'model.name="{folder}"',
            "max_steps=2",
            "eval.before=false",
            "lora.rank=4",
        )
    )
    assert cfg.head.labels == ("none", "animal")  # the model's order, not the data's sorted one
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    assert t.model.score.weight.dtype == torch.float32
    assert not torch.equal(t.model.score.weight, model.score.weight)  # the head trained
    again, _, _ = load_run_model(tmp_path / "ft", "cpu")
    assert torch.equal(again.score.weight, t.model.score.weight)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_classifier_stage_continues_a_classifier_stage(task, tmp_path, method):
    # model.init from a classifier run: the head (inside the LoRA adapter, or the saved
    # classifier folder) comes along, so stage 2's baseline is stage 1's final result.
    extra = ("max_steps=3", "lora.rank=4", f'method="{method}"', "eval.metrics=[]")
    first = Trainer(cls_config(task, tmp_path / "one", *extra, "eval.before=false"),
                    echo=quiet, progress=False).run()
    second = Trainer(cls_config(task, tmp_path / "two", *extra,
                                f'model.init="{tmp_path / "one"}"'),
                     echo=quiet, progress=False).run()
    assert second.before["val_loss"] == pytest.approx(first.after["val_loss"], rel=1e-6)


def test_validation_loss_over_the_first_batches(task):
    """eval.max_val_batches: the mean loss of the documents in the first packed batches."""
    from ember.engine.data import PackedBatches

    model, tok = load_pretrained(task["model"], "float32")
    add_classification_head(model, ("animal", "none"), pad_token_id=tok.pad_token_id, seed=0)
    examples, _ = load_labelled(task["val"], DataConfig(), tok, ("animal", "none"))
    objective = Classification(resolve(cls_config(task, "unused")))
    objective.check_model(model, tok)
    plan = PackedBatches(examples, 64, order="file", packing="greedy").plan(0)
    first = [examples[i] for b in plan[:2] for i in b]
    assert 0 < len(first) < len(examples)
    with torch.no_grad():
        want = sum(classification_loss(model, collate([e]), 1)[0] for e in first) / len(first)
    got = objective.val_scores(model, examples, 64, "cpu", contextlib.nullcontext, 2)
    assert got["val_loss"] == pytest.approx(float(want), rel=1e-5)
    full = objective.val_scores(model, examples, 64, "cpu", contextlib.nullcontext, None)
    assert full["val_loss"] != pytest.approx(got["val_loss"], rel=1e-5)


def test_macro_f1_counts_predicted_classes_as_sklearn(monkeypatch):
    """A classifier's macro F1 is scikit-learn's f1_score(average="macro"): a class the head
    predicts but the split never holds enters the average with F1 0. refs [0, 0, 1, 1], preds
    [0, 2, 1, 1]: class 0 F1 2/3, class 1 1, class 2 0 -> 5/9 (sklearn's value; the mean over
    the reference classes only gave 5/6)."""
    from types import SimpleNamespace

    from ember.engine import classification
    from ember.engine.data import IGNORE, Example

    examples = [Example([1, 2], [IGNORE, c], f"x:{i}", reference=str(c))
                for i, c in enumerate([0, 0, 1, 1])]
    monkeypatch.setattr(classification, "predict", lambda *a, **k: ([0, 2, 1, 1], 0.5))
    model = SimpleNamespace(cfg=SimpleNamespace(labels=("a", "b", "c")))
    tok = SimpleNamespace(decode=lambda ids, **k: "")
    res = classification.label_scores(model, tok, examples, ["accuracy", "macro_f1", "f1"], 64,
                                      "cpu")
    assert res.scores["macro_f1"] == pytest.approx(5 / 9) == res.scores["f1"]
    assert res.scores["accuracy"] == 0.75


def test_a_classifier_transformers_cannot_load_is_refused_before_training(task, tmp_path):
    """transformers has no GraniteForSequenceClassification: final/ (a SEQ_CLS adapter or a
    merged folder) could not be written, and the run found out only after training."""
    import shutil

    transformers = pytest.importorskip("transformers")
    assert not hasattr(transformers, "GraniteForSequenceClassification")
    folder = tmp_path / "granite"
    shutil.copytree(task["model"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="granite", architectures=["GraniteForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    with pytest.raises(EmberError, match="GraniteForSequenceClassification.*save_final = false"):
        Trainer(cls_config({**task, "model": str(folder)}, run, 'method="lora"',
                           "max_steps=2"), echo=quiet, progress=False).run()
    assert not list(run.glob("step_*"))
    res = Trainer(cls_config({**task, "model": str(folder)}, tmp_path / "kept", 'method="lora"',
                             "max_steps=1", "checkpoint.save_final=false"),
                  echo=quiet, progress=False).run()
    assert res.steps == 1


def test_classifier_mixes_training_files_and_scores_validation_files_apart(task, tmp_path):
    """data.mix and several validation files work for a classifier as for SFT (they failed: a
    misleading "training source 1 has no examples", a TypeError): each epoch takes the weighted
    shares of the training files, and val_loss/<file> is the mean cross-entropy transformers'
    classifier (the run's PEFT adapter on the base) gives that file's examples."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    small = write_jsonl(tmp_path / "small.jsonl", animal_rows(6, 7))
    other = write_jsonl(tmp_path / "other.jsonl", animal_rows(5, 8))
    cfg = cls_config(task, tmp_path / "run", f'data.train=["{task["train"]}", "{small}"]',
                     "data.mix=[3, 1]", f'data.validation=["{task["val"]}", "{other}"]',
                     "max_steps=2", "lora.rank=4", "optim.lr=1e-2", "optim.warmup_steps=0",
                     "eval.metrics=[]", "eval.before=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    epoch = [t.datasets.train[i].group for b in PackedBatches.from_config(
        t.datasets.train, t.cfg.data).plan(0) for i in b]
    assert [epoch.count(0), epoch.count(1)] == [197, 65]  # 3:1 of the 262 examples
    last = [r for r in rows_of(tmp_path / "run") if r["kind"] == "eval"][-1]
    hf_tok = transformers.AutoTokenizer.from_pretrained(task["model"])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        task["model"], num_labels=2)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "final" / "adapter").eval()
    for name, path in (("val", task["val"]), ("other", other)):
        rows = [json.loads(line) for line in open(path)]
        batch = hf_tok([r["text"] for r in rows], return_tensors="pt", padding=True)
        target = torch.tensor([("animal", "none").index(r["label"]) for r in rows])
        with torch.no_grad():
            ref = F.cross_entropy(pm(**batch).logits, target)
        assert last[f"val_loss/{name}"] == pytest.approx(float(ref), rel=1e-5)


def test_a_language_model_stage_from_a_classifier_adapter_says_set_head_type(task, tiny,
                                                                               tmp_path):
    """A classifier run's adapter (PEFT reads it as a SEQ_CLS adapter) continued by a stage
    without [head]: an error that names head.type, not one about loading the base as a
    classifier through the Python API."""
    peft = pytest.importorskip("peft")
    Trainer(cls_config(task, tmp_path / "cls", "max_steps=1", "lora.rank=4", "eval.metrics=[]",
                       "eval.before=false", "eval.val_loss=false"), echo=quiet,
            progress=False).run()
    adapter = tmp_path / "cls" / "final" / "adapter"
    assert peft.PeftConfig.from_pretrained(adapter).task_type == "SEQ_CLS"
    for init in (tmp_path / "cls", adapter):
        for method in ("lora", "full"):
            with pytest.raises(EmberError, match=r'set head.type = "classification"'):
                resolve(load_config(None, [
                    f'model.name="{task["model"]}"', f'model.init="{init}"',
                    f'method="{method}"', f'data.train=["{tiny["train"]}"]', 'device="cpu"']))


@pytest.mark.parametrize("values", [[True, False, True], [1.0, 0.0, 1.0],
                                    [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
def test_labels_neither_names_nor_indices_are_named_in_the_error(tmp_path, values):
    """transformers' loss takes bool or float labels as multi-label targets, never as class
    indices (its problem_type inference): a multi-hot row trains multi-label there, one value
    per row fails. Ember refuses them all, but said only "found 0 distinct 'label' values ...
    check the field name" for a file whose every line has that field; the error now names what
    the values are (and that multi-label is not supported)."""
    from transformers import PretrainedConfig
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    hf_cfg = PretrainedConfig(num_labels=2)
    multi = isinstance(values[0], list)
    with contextlib.nullcontext() if multi else pytest.raises((ValueError, RuntimeError)):
        ForSequenceClassificationLoss(torch.tensor(values), torch.randn(3, 2), hf_cfg)
    assert hf_cfg.problem_type == "multi_label_classification"
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": v} for v in values])
    kind = {bool: "boolean", float: "number", list: "array"}[type(values[0])]
    with pytest.raises(EmberError, match=rf"'label' values \(3 {kind}\) are neither class names"
                       + (".*multi-label classification is not supported" if multi else "")):
        infer_labels([path])
