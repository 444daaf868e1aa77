"""Reward-model and regression heads (``[head] type = "reward" / "regression"``, engine/reward.py)
through the real path: ``ember train`` on a tiny random model, ``ember eval``, ``ember export``
checked against transformers' ``AutoModelForSequenceClassification(num_labels=1)`` and PEFT; the
reward loss against TRL RewardTrainer's formula (transcribed in float64) on transformers' rewards,
and its gradient-accumulation invariance; the regression loss against transformers' own
``problem_type="regression"`` loss; data forms and bad lines; refused configurations; early
stopping's direction; exact resume; starting from an HF num_labels=1 folder."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.cli import main as cli
from ember.engine.config import load_config
from ember.engine.data import DataConfig, collate, load_examples
from ember.engine.reward import RewardHead, head_outputs, load_pairs, load_values
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve
from ember.models.heads import add_classification_head
from ember.models.loading import load_pretrained, save_pretrained
from tests.engine._shared_launch import shares_launch
from tests.engine._tiny import quiet, rows_of, write_jsonl

ANIMALS, OTHER = ["cat", "dog", "fish"], ["red", "green", "blue", "one", "two", "three", "sun"]


def pair_rows(n: int, seed: int, margins: bool = False) -> list[dict]:
    """The chosen answer names an animal somewhere, the rejected one does not."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "say " + " ".join(g.choice(OTHER) for _ in range(g.randint(1, 3))) + " ->"
        good = [g.choice(OTHER) for _ in range(g.randint(2, 5))]
        good[g.randrange(len(good))] = g.choice(ANIMALS)
        bad = [g.choice(OTHER) for _ in range(g.randint(2, 5))]
        row = {"prompt": prompt, "chosen": " " + " ".join(good), "rejected": " " + " ".join(bad)}
        if margins:
            row["margin"] = g.choice([0, 0.5, 1.25, -0.3])
        rows.append(row)
    return rows


def value_rows(n: int, seed: int) -> list[dict]:
    """A number per text: how many animals it names."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [g.choice(OTHER) for _ in range(g.randint(3, 7))]
        k = g.randint(0, 3)
        for i in g.sample(range(len(words)), k):
            words[i] = g.choice(ANIMALS)
        rows.append({"text": " ".join(words), "label": float(k)})
    return rows


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return make_task(tiny, tmp_path_factory.mktemp("reward"))


def make_task(tiny, root) -> dict:
    out = {"model": tiny["model"]}
    for s, n, seed in (("train", 96, 1), ("val", 48, 2)):
        out[s] = write_jsonl(root / f"{s}.jsonl", pair_rows(n, seed))
    for s, n, seed in (("rtrain", 128, 4), ("rval", 48, 5)):
        out[s] = write_jsonl(root / f"{s}.jsonl", value_rows(n, seed))
    out["margins"] = write_jsonl(root / "margins.jsonl", pair_rows(7, 9, margins=True))
    return out


def head_config(task, run_dir, kind: str = "reward", *extra: str):
    train, val = ("train", "val") if kind == "reward" else ("rtrain", "rval")
    return load_config(None, [
        f'model.name="{task["model"]}"', f'run_dir="{run_dir}"', 'device="cpu"',
        'precision="fp32"', f'data.train=["{task[train]}"]', f'data.validation="{task[val]}"',
        "data.max_seq_len=64", "data.tokens_per_batch=256", f'head.type="{kind}"', "plot=false",
        "threads=1", "lora.rank=8", "lora.alpha=16", *extra])


def _padded(docs: list[list[int]], pad: int) -> dict:
    T = max(map(len, docs))
    ids = torch.tensor([d + [pad] * (T - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d in docs])
    return {"input_ids": ids, "attention_mask": mask}


def _docs(examples) -> list[list[int]]:
    out = []
    for e in examples:
        start = 0
        for n in e.doc_lengths:
            out.append(e.input_ids[start:start + n])
            start += n
    return out


def test_reward_train_eval_export_lora(task, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = tmp_path / "run"
    cfg = head_config(task, run, "reward", "epochs=3", "optim.lr=1e-2")
    toml = tmp_path / "rm.toml"
    from ember.engine.config import to_toml

    toml.write_text(to_toml(cfg))
    assert cli(["train", str(toml)]) == 0
    evals = [r for r in rows_of(run) if r["kind"] == "eval"]
    before, after = evals[0], evals[-1]
    print("reward accuracy before/after:", before["accuracy"], after["accuracy"])
    assert before["step"] == 0 and before["accuracy"] < 0.7, before
    assert after["accuracy"] > 0.95 and after["val_accuracy"] == after["accuracy"], after
    assert after["val_loss"] < before["val_loss"] / 4 and after["margin"] > 1
    train = [r for r in rows_of(run) if r["kind"] == "train"]
    assert {"accuracy", "margin"} <= set(train[-1])
    assert load_config(run).eval.metrics == ("accuracy", "margin")
    capsys.readouterr()

    assert cli(["eval", str(run), "--data", task["val"]]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 48 and scores["accuracy"] == pytest.approx(after["accuracy"])
    assert scores["loss"] == pytest.approx(after["val_loss"], rel=1e-4)

    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert cli(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "merged"), "--data", task["val"]]) == 0  # an HF folder
    assert json.loads(capsys.readouterr().out)["accuracy"] == scores["accuracy"]
    model, tok, _ = load_run_model(run, "cpu")
    examples, _ = load_pairs(task["val"], DataConfig(), tok, tok.pad_token_id)
    examples = examples[:5]
    with torch.no_grad():
        ours = head_outputs(model.eval(), collate(examples))
    batch = _padded(_docs(examples), tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert hf.config.num_labels == 1 and hf.config.problem_type is None  # as TRL saves it
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        task["model"], num_labels=1)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        for other in (hf.eval(), pm.eval()):
            assert (other(**batch).logits[:, 0] - ours).abs().max() < 1e-5


def test_reward_loss_is_trls_and_accumulation_invariant(task, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = load_pretrained(task["model"], "float32")
    add_classification_head(model, ("LABEL_0",), pad_token_id=tok.pad_token_id, seed=3)
    folder = save_pretrained(model, tmp_path / "rm", tok)
    examples, _ = load_pairs(task["margins"], DataConfig(), tok, tok.pad_token_id)
    n = len(examples)
    rows = [json.loads(x) for x in open(task["margins"])]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for e, r in zip(examples, rows, strict=True):  # TRL's tokens: tokenizer(prompt + answer + eos)
        want = [hf_tok(r["prompt"] + r[k] + hf_tok.eos_token)["input_ids"]
                for k in ("chosen", "rejected")]
        assert _docs([e]) == want and e.value == r.get("margin", 0)
    coef = 0.07
    obj = RewardHead(resolve(head_config(task, "unused", "reward",
                                         f"head.center_rewards_coefficient={coef}")))
    obj.pad = tok.pad_token_id

    def grads(parts):
        model.zero_grad()
        total = sum(obj.loss(model, collate(p), n) for p in parts)
        total.backward()
        return total.detach(), model.score.weight.grad.clone(), model.embed.weight.grad.clone()

    one = grads([examples])
    split = grads([examples[:2], examples[2:3], examples[3:]])
    for a, b in zip(one, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).double().eval()
    with torch.no_grad():
        r = hf(**_padded(_docs(examples), tok.pad_token_id)).logits[:, 0]
    rc, rr = r[0::2], r[1::2]
    m = torch.tensor([row.get("margin", 0.0) for row in rows], dtype=torch.float64)
    trl = -F.logsigmoid(rc - rr - m).mean() + coef * torch.mean((rc + rr) ** 2)
    assert abs(float(one[0]) - float(trl)) < 1e-5, (float(one[0]), float(trl))
    # Evaluation: a task_eval right after the validation pass on the same split reuses it; on
    # another split (a test file) it scores that split.
    from ember.engine import reward
    from ember.engine.config import EvalConfig

    calls = []
    score = reward.score_documents
    reward.score_documents = lambda *a, **k: calls.append(len(a[1])) or score(*a, **k)
    try:
        ev = EvalConfig(metrics=("accuracy", "margin"))
        val = obj.val_scores(model, examples, 256, "cpu", contextlib.nullcontext, None)
        other = obj.task_eval(model, tok, examples[:3], ev, contextlib.nullcontext).scores
        val = obj.val_scores(model, examples, 256, "cpu", contextlib.nullcontext, None)
        same = obj.task_eval(model, tok, examples, ev, contextlib.nullcontext).scores
    finally:
        reward.score_documents = score
    assert calls == [n, 3, n] and same == {"accuracy": val["val_accuracy"],
                                           "margin": val["val_margin"]}
    assert other["accuracy"] == float((rc[:3] > rr[:3]).double().mean())
    sums = obj.step_metrics(lambda xs: xs)
    assert sums["accuracy"] == pytest.approx(float((rc > rr).double().mean()))
    assert sums["margin"] == pytest.approx(float((rc - rr).mean()), abs=1e-6)  # of both passes


def test_pad_equal_to_eos_pools_as_transformers(task, tmp_path):
    # A pad id that is also EOS (a common setup): transformers pools at the last non-pad token,
    # so before the EOS that TRL appends; Ember strips trailing pads, so pools there too.
    transformers = pytest.importorskip("transformers")
    model, tok = load_pretrained(task["model"], "float32")
    eos = tok.eos_token_id
    add_classification_head(model, ("LABEL_0",), pad_token_id=eos, seed=4)
    folder = save_pretrained(model, tmp_path / "rm", tok)
    examples, _ = load_pairs(task["margins"], DataConfig(), tok, eos)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    trl = [hf_tok(r["prompt"] + r[k] + hf_tok.eos_token)["input_ids"]
           for r in map(json.loads, open(task["margins"])) for k in ("chosen", "rejected")]
    assert all(d[-1] == eos for d in trl) and _docs(examples) == [d[:-1] for d in trl]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert hf.config.pad_token_id == eos
    with torch.no_grad():
        ours = head_outputs(model.eval(), collate(examples))
        theirs = hf(**_padded(trl, eos)).logits[:, 0]
    assert (ours - theirs).abs().max() < 1e-5


def test_reward_data_forms_and_bad_lines(tiny, tmp_path):
    _, tok = load_pretrained(tiny["model"])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    u, a, b = ({"role": r, "content": c} for r, c in
               (("user", "red cat"), ("assistant", "a cat"), ("assistant", "no")))
    forms = [{"prompt": "red cat", "chosen": "a cat", "rejected": "no"},
             {"prompt": [u], "chosen": [a], "rejected": [b]},
             {"chosen": [u, a], "rejected": [u, b], "margin": 2}]
    path = write_jsonl(tmp_path / "forms.jsonl", forms)
    examples, rep = load_pairs(path, DataConfig(), tok, tok.pad_token_id)
    assert rep.bad_lines == 0 and [e.value for e in examples] == [0.0, 0.0, 2.0]
    assert _docs(examples[:1]) == _docs(examples[1:2]) == _docs(examples[2:])
    dpo, _ = load_examples(path, DataConfig(), tok)  # DPO's reader: the same documents
    assert _docs(dpo) == _docs(examples)

    good = json.dumps(forms[0])
    lines = [good, json.dumps({**forms[0], "margin": "1"}),
             good[:-1] + ', "margin": NaN}', good[:-1] + ', "margin": Infinity}',
             json.dumps({**forms[0], "margin": True}), json.dumps({"prompt": "x", "chosen": "y"}),
             json.dumps({**forms[0], "rejected": "a cat"}), "{oops", ""]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    examples, rep = load_pairs(bad, DataConfig(), tok, tok.pad_token_id)
    assert len(examples) == 1 and rep.bad_lines == 7 and rep.blank_lines == 1
    assert rep.kinds == {"wrong type": 2, "not finite": 2, "missing field": 1,
                         "identical pair": 1, "invalid JSON": 1}
    assert f"{bad}:2: field 'margin' must be a number, got string" in rep.problems
    assert f"{bad}:3: field 'margin' must be a finite number, got nan" in rep.problems
    with pytest.raises(EmberError, match=r"bad\.jsonl:2: field 'margin'"):
        load_pairs(bad, DataConfig(bad_lines="error"), tok, tok.pad_token_id)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "red", "label": 1.0}])
    with pytest.raises(EmberError, match="reward head trains on preference lines"):
        load_pairs(text, DataConfig(), tok)


def test_bad_regression_labels_are_reported(tiny, tmp_path):
    _, tok = load_pretrained(tiny["model"])
    lines = [json.dumps({"text": "red cat", "label": 1.5}), json.dumps({"text": "red"}),
             json.dumps({"text": "x", "label": "2"}), json.dumps({"text": "x", "label": True}),
             '{"text": "x", "label": NaN}', '{"text": "x", "label": -Infinity}',
             json.dumps({"text": "x", "label": 10**400}),
             json.dumps({"text": "x", "label": [1]}), json.dumps({"text": "blue", "label": -2})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    examples, rep = load_values(path, DataConfig(), tok, "label", tok.pad_token_id)
    assert [e.value for e in examples] == [1.5, -2.0]
    assert rep.bad_lines == 7
    assert rep.kinds == {"missing field": 1, "wrong type": 3, "not finite": 3}
    assert rep.problems[0] == f"{path}:2: missing field 'label' (keys present: ['text'])"
    assert f"{path}:4: field 'label' must be a number, got boolean" in rep.problems
    with pytest.raises(EmberError, match=r"bad\.jsonl:2: missing field 'label'"):
        load_values(path, DataConfig(bad_lines="error"), tok, "label", tok.pad_token_id)


def test_regression_train_and_export_match_transformers(task, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "reg"
    cfg = head_config(task, run, "regression", 'method="full"', "epochs=3", "optim.lr=3e-3")
    res = Trainer(cfg, echo=quiet, progress=False).run()
    print("regression val mse before/after:", res.before["mse"], res.after["mse"])
    assert res.after["mse"] < res.before["mse"] / 3, (res.before, res.after)
    assert res.after["rmse"] == pytest.approx(math.sqrt(res.after["mse"]))
    assert res.after["val_loss"] == pytest.approx(res.after["mse"])
    assert res.after["pearson"] > 0.5
    capsys.readouterr()
    assert cli(["eval", str(run), "--metrics", "mse,pearson"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"data", "examples", "loss", "mse", "pearson"}
    assert scores["mse"] == pytest.approx(res.after["mse"], rel=1e-5)

    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    model, tok, _ = load_run_model(run, "cpu")
    examples, _ = load_values(task["rval"], DataConfig(), tok, "label", tok.pad_token_id)
    examples = examples[:6]
    obj = load_run_objective(run)
    obj.pad = tok.pad_token_id
    with torch.no_grad():
        ours = obj.loss(model.eval(), collate(examples), len(examples))
        out = hf.eval()(**_padded(_docs(examples), tok.pad_token_id),
                        labels=torch.tensor([e.value for e in examples]))
    assert abs(float(out.loss) - float(ours)) < 1e-5, (float(out.loss), float(ours))


def load_run_objective(run):
    from ember.engine.distributed import DistInfo
    from ember.engine.objectives import make_objective

    return make_objective(load_config(run), DistInfo())


@pytest.mark.parametrize("extra,match", [
    (['head.type="reward"', 'objective="dpo"'], "with a reward head is not supported"),
    (['head.type="reward"', 'method="prompt"'], 'method = "prompt" with a reward head'),
    (['head.type="reward"', 'eval.metrics=["mse"]'], "do not apply to a reward head"),
    (['head.type="regression"', 'eval.metrics=["accuracy"]'], "do not apply to a regression"),
    (['head.type="regression"', 'eval.metrics=["mse"]', 'eval.early_stopping="perplexity"'],
     "does not apply to a regression head"),
    (['head.type="reward"', 'head.labels=["a", "b"]'], "one output: remove head.labels"),
    (['head.type="regression"', "head.center_rewards_coefficient=0.1"], 'type = "reward" only'),
    (['head.type="reward"', "head.center_rewards_coefficient=-1"], "must be >= 0"),
    (['head.type="multilabel"'], "head.type must be one of"),
    (['eval.metrics=["mse"]'], "score a reward or regression head"),
])
def test_refused_configs(task, tmp_path, extra, match):
    with pytest.raises(EmberError, match=match):
        load_config(None, [f'model.name="{task["model"]}"', *extra])


@pytest.mark.parametrize("name,values,stops", [
    ("mse", [1.0, 0.5, 0.4], False), ("mse", [1.0, 1.5, 2.0], True),
    ("rmse", [1.0, 0.9, 0.8], False), ("pearson", [0.1, 0.05, 0.0], True),
    ("pearson", [0.1, 0.2, 0.3], False),
])
def test_early_stopping_direction(task, name, values, stops):
    from ember.engine.state import Progress

    cfg = head_config(task, "unused", "regression", 'eval.metrics=["mse", "rmse", "pearson"]',
                      f'eval.early_stopping="{name}"',
                      "eval.patience=2", "eval.every_steps=1")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.cfg, prog = cfg, Progress()
    assert [t._early_stop({name: v}, prog) for v in values][-1] is stops


def test_reward_run_resumes_exactly(task, tmp_path):
    extra = ("max_steps=4", "checkpoint.every_steps=2", "eval.before=false",
             "eval.every_steps=2", "lora.rank=4")
    Trainer(head_config(task, tmp_path / "a", "reward", *extra), echo=quiet,
            progress=False).run()
    cfg_b = head_config(task, tmp_path / "b", "reward", *extra)
    Trainer(cfg_b, echo=quiet, progress=False, stop_after=2).run()
    Trainer(cfg_b, resume=True, echo=quiet, progress=False).run()
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)


def test_reward_from_an_hf_num_labels_1_folder(task, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        task["model"], num_labels=1, id2label={0: "reward"})
    folder = tmp_path / "hf_rm"
    hf.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(task["model"]).save_pretrained(folder)
    cfg = resolve(head_config(task, tmp_path / "ft", "reward", f'model.name="{folder}"',
                              "max_steps=1", "optim.lr=1e-9", "checkpoint.save_final=false"))
    res = Trainer(cfg, echo=quiet, progress=False).run()
    model, tok = load_pretrained(str(folder), "float32")
    assert model.cfg.labels == ("reward",) and model.cfg.problem_type is None
    examples, _ = load_pairs(task["val"], DataConfig(), tok, tok.pad_token_id)
    with torch.no_grad():
        r = hf.eval()(**_padded(_docs(examples), tok.pad_token_id)).logits[:, 0].double()
    acc = float((r[0::2] > r[1::2]).double().mean())
    assert res.before["accuracy"] == pytest.approx(acc)  # the folder's own head, not a new one
    assert res.before["margin"] == pytest.approx(float((r[0::2] - r[1::2]).mean()), abs=1e-5)
    with pytest.raises(EmberError, match='has one output .* "reward" or "regression"'):
        resolve(head_config(task, tmp_path / "c", "classification", f'model.name="{folder}"'))
    lm = head_config(task, tmp_path / "lm", "reward", f'model.name="{folder}"')
    with pytest.raises(EmberError, match='one output: "reward" or "regression"'):
        Trainer(lm.replace(head=type(lm.head)()), echo=quiet, progress=False).run()
    two = transformers.AutoModelForSequenceClassification.from_pretrained(
        task["model"], num_labels=2)
    two.save_pretrained(tmp_path / "two")
    transformers.AutoTokenizer.from_pretrained(task["model"]).save_pretrained(tmp_path / "two")
    cfg = head_config(task, tmp_path / "x", "reward", f'model.name="{tmp_path / "two"}"')
    with pytest.raises(EmberError, match="already a classifier with labels"):
        Trainer(cfg, echo=quiet, progress=False).run()


def test_qlora_reward_head_builds_and_trains(task):
    from ember.engine.runtime import build_model
    from ember.models.nf4 import is_quantized

    cfg = resolve(head_config(task, "unused", "reward", 'model.quantize="nf4"', "lora.rank=4"))
    model, tok = build_model(cfg, "cpu")
    assert is_quantized(model) and model.score.weight.shape == (1, model.cfg.hidden_size)
    obj = RewardHead(cfg)
    obj.pad = tok.pad_token_id
    examples, _ = load_pairs(task["val"], cfg.data, tok, tok.pad_token_id)
    obj.loss(model, collate(examples[:4]), 4).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "score.weight" in trained and any("lora_A" in n for n in trained)


_TWO_EXTRA = ('method="full"', "max_steps=4", "optim.lr=3e-3", "data.tokens_per_batch=96",
              "eval.every_steps=2", "checkpoint.save_final=false")


def _two_plan(tiny, folder) -> list[dict]:
    from ember.engine.config import to_toml

    task = make_task(tiny, folder)
    for name, accum in (("one", 2), ("two", 1)):
        path = folder / f"{name}.toml"
        path.write_text(to_toml(head_config(task, folder / name, "reward", *_TWO_EXTRA,
                                            f"grad_accum={accum}")))
    return [{"name": "two", "args": [str(folder / "two.toml")]}]


@pytest.mark.slow  # its two-process run in the shared torchrun launch
@shares_launch(_two_plan)
def test_two_processes_match_one(launched):
    from tests.engine.test_distributed import _same_rows

    tmp_path, _ = launched
    assert cli(["train", str(tmp_path / "one.toml")]) == 0
    one = rows_of(tmp_path / "one")
    assert len({r["loss"] for r in one if r["kind"] == "train"}) == 4
    assert [r["step"] for r in one if r["kind"] == "eval"] == [0, 2, 4]
    _same_rows(rows_of(tmp_path / "two"), one)


def test_ember_config_documents_the_head_keys(task):
    from ember.engine.config_doc import annotated_toml

    text = annotated_toml(head_config(task, "unused", "reward"))
    assert 'type = "reward"  # "classification" | "reward"' in text
    assert "center_rewards_coefficient = 0.0  # reward: + coefficient * mean(" in text
