"""Distillation and preference objectives through ``ember train`` on tiny random models: the
student moves towards its teacher, alpha = 0 is plain SFT, DPO (each loss type) raises the reward
margin of chosen over rejected with the base weights untouched, ORPO and SimPO learn the
preference with one forward per batch and no reference, preference pairs stay together in packed
batches, and mismatched data or teachers are clear errors. The losses themselves are checked in
test_trainer.py and test_preference_losses.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.config import load_config
from ember.engine.data import IGNORE, DataConfig, collate, load_examples
from ember.engine.losses import distillation_loss
from ember.engine.trainer import Trainer, train
from ember.models.loading import load_pretrained
from tests.engine._tiny import WORDS, make_tiny_model, quiet, rows_of, tiny_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Another random model with the tiny model's tokenizer (the tokenizer training is
    deterministic; the weights differ by seed)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1))


def _train_rows(run_dir) -> list[dict]:
    return [r for r in rows_of(run_dir, timing=False) if r["kind"] == "train"]


def test_distillation_moves_the_student_to_its_teacher(tiny, teacher, tmp_path):
    small = tiny["small"]
    run = tmp_path / "run"
    cfg = tiny_config(tiny, run, 'method="full"', 'objective="distill"',
                      f'distill.teacher="{teacher}"', "distill.alpha=1.0", "max_steps=8",
                      "optim.lr=3e-3", "optim.warmup_steps=1", "eval.metrics=[]",
                      f'data.train=["{small}"]')
    train(cfg, echo=quiet, progress=False)
    rows = _train_rows(run)
    assert all(r["loss"] == r["kd_loss"] for r in rows)
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"] / 2
    # The KL to the teacher on the training answers, before and after, measured afresh.
    base, tok = load_pretrained(tiny["model"], "float32")
    student, _ = load_pretrained(run / "final" / "model", "float32")
    t, _ = load_pretrained(teacher, "float32")
    batch = collate(load_examples(small, DataConfig(), tok)[0])
    with torch.no_grad():
        before, after = (float(distillation_loss(m, t, batch, batch.num_loss_tokens))
                         for m in (base, student))
    assert after < before / 2, (before, after)


def test_distillation_with_alpha_0_is_sft(tiny, tmp_path):
    extra = ("max_steps=3", "lora.dropout=0.1", "grad_accum=2", "eval.metrics=[]",
             "eval.val_loss=false", "checkpoint.save_final=false",
             "optim.warmup_steps=0")  # step 1 moves the student off its teacher (lr > 0)
    sft = Trainer(tiny_config(tiny, tmp_path / "sft", *extra), echo=quiet, progress=False)
    sft.run()
    # The teacher is the student's own starting model: any teacher would do with alpha = 0.
    kd = Trainer(tiny_config(tiny, tmp_path / "kd", *extra, 'objective="distill"',
                             f'distill.teacher="{tiny["model"]}"', "distill.alpha=0.0"),
                 echo=quiet, progress=False)
    kd.run()
    a, b = _train_rows(tmp_path / "sft"), _train_rows(tmp_path / "kd")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] == [r["sft_loss"] for r in b]
    assert all(r["kd_loss"] > 0 for r in b[1:])
    pa, pb = dict(sft.model.named_parameters()), dict(kd.model.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_dpo_raises_the_margin_and_trains_only_adapters(tiny, prefs, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny, run, 'objective="dpo"', "dpo.beta=0.5", "max_steps=10",
                      "optim.lr=1e-2", "optim.warmup_steps=1", "eval.metrics=[]",
                      f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
                      "data.tokens_per_batch=96")
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    # At the start the policy is its reference (LoRA's B = 0): every reward is 0, loss log 2.
    assert res.before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.before["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert res.after["val_loss"] < 0.5 * math.log(2)
    assert res.after["val_reward_accuracy"] >= 0.9 and res.after["val_reward_margin"] > 1
    rows = _train_rows(run)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(rows[0])
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    base, _ = load_pretrained(tiny["model"], "float32")
    trained = dict(t.model.named_parameters())
    for name, p in base.named_parameters():
        key = name.replace(".weight", ".base.weight") if name.endswith("proj.weight") else name
        assert torch.equal(trained[key], p), name
    assert all(trained[n].abs().sum() > 0 for n in trained if n.endswith("lora_B"))


def test_dpo_with_full_finetuning_uses_a_frozen_copy(tiny, prefs, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", 'method="full"', 'objective="dpo"',
                      "max_steps=3", "optim.lr=1e-3", "eval.metrics=[]",
                      f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
                      "data.tokens_per_batch=96", "checkpoint.save_final=false")
    res = train(cfg, echo=quiet, progress=False)
    assert res.before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.after["val_reward_margin"] > 0


def test_pairs_stay_together_in_packed_batches(tiny, prefs):
    _, tok = load_pretrained(tiny["model"], "float32")
    examples, rep = load_examples(prefs, DataConfig(), tok)
    assert rep.format == "preference" and all(len(e.parts) == 2 for e in examples)
    b = collate(examples[:3])
    assert b.num_docs == 6 and b.cu_seqlens.tolist() == [0, *torch.tensor(
        [n for e in examples[:3] for n in e.parts]).cumsum(0).tolist()]
    ends = b.cu_seqlens[1:].long() - 1
    assert (b.labels[0, ends] == IGNORE).all()  # no document predicts across a boundary
    assert (b.position_ids[0, b.cu_seqlens[:-1].long()] == 0).all()
    e = examples[0]
    chosen = tok.decode(e.input_ids[e.prompt_len:e.parts[0]], skip_special_tokens=True)
    assert chosen == e.reference and e.reference.strip() in WORDS


def test_objective_errors(tiny, prefs, tmp_path):
    with pytest.raises(EmberError, match=r"prefs\.jsonl:1: a preference line .*objective = "
                                         r"\"dpo\", \"orpo\", \"simpo\" or \"cpo\""):
        train(tiny_config(tiny, tmp_path / "a", f'data.train=["{prefs}"]'), echo=quiet,
              progress=False)
    with pytest.raises(EmberError, match=r"train\.jsonl:\d+: objective = \"dpo\" trains on "
                                         "preference lines"):
        train(tiny_config(tiny, tmp_path / "b", 'objective="dpo"'), echo=quiet, progress=False)
    with pytest.raises(EmberError, match=r"train\.jsonl:\d+: objective = \"orpo\" trains on "
                                         "preference lines"):
        train(tiny_config(tiny, tmp_path / "b2", 'objective="orpo"'), echo=quiet, progress=False)
    with pytest.raises(EmberError, match="needs distill.teacher"):
        load_config(None, ['objective="distill"'])
    with pytest.raises(EmberError, match='with method = "prompt" is not supported'):
        load_config(None, ['objective="dpo"', 'method="prompt"'])
    with pytest.raises(EmberError, match="distill.alpha must be in"):
        load_config(None, ["distill.alpha=1.5"])
    with pytest.raises(EmberError, match="unknown config key 'dpo.reference'"):
        load_config(None, ['dpo.reference="x"'])
    # A teacher with another vocabulary cannot be distilled from.
    from ember.models import Transformer
    from ember.models.loading import save_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    other = Transformer(model.cfg.__class__(**{**vars(model.cfg), "vocab_size": 320}))
    save_pretrained(other.init_weights(seed=0), tmp_path / "other", tok)
    with pytest.raises(EmberError, match="does not share the student's vocabulary"):
        train(tiny_config(tiny, tmp_path / "c", 'objective="distill"',
                          f'distill.teacher="{tmp_path / "other"}"'), echo=quiet, progress=False)


REFERENCE_FREE = {
    "orpo": ('objective="orpo"', "orpo.beta=1.0", "optim.lr=1e-2", "max_steps=20"),
    "simpo": ('objective="simpo"', "simpo.sft_weight=0.2", 'method="full"', "optim.lr=1e-3",
              "max_steps=10"),
    "cpo": ('objective="cpo"', "cpo.cpo_alpha=0.2", 'method="full"', "optim.lr=1e-3",
            "max_steps=10"),
}


@pytest.mark.parametrize("objective", REFERENCE_FREE)
def test_reference_free_objectives_learn_the_preference_with_one_forward(
        tiny, prefs, tmp_path, monkeypatch, objective):
    """ORPO (LoRA) and SimPO (full fine-tuning): the loss falls and the reward accuracy rises,
    with one forward per batch and no reference: no frozen copy, no adapters-off forward."""
    from ember.engine import preference_reference
    from ember.engine.evaluation import eval_batches
    from ember.models import Transformer

    def no_reference(*_a, **_k):
        raise AssertionError(f"objective {objective} built or ran a reference")

    for name in ("adapters_disabled", "adapters_swapped", "frozen_start", "shard_frozen"):
        monkeypatch.setattr(preference_reference, name, no_reference)
    forwards = []
    hidden = Transformer.hidden_states
    monkeypatch.setattr(Transformer, "hidden_states",
                        lambda self, *a, **k: forwards.append(1) or hidden(self, *a, **k))
    run = tmp_path / "run"
    cfg = tiny_config(tiny, run, *REFERENCE_FREE[objective], "optim.warmup_steps=1",
                      "eval.metrics=[]", f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
                      "data.tokens_per_batch=96")
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    assert t.objective.frozen_models() == {}
    n_val = len(list(eval_batches(t.datasets.validation, 96)))
    # One forward per training batch (one per step) and per validation batch (before and after).
    assert len(forwards) == cfg.max_steps + 2 * n_val
    rows = _train_rows(run)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
            "nll_loss"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert res.after["val_loss"] < res.before["val_loss"]
    assert res.after["val_reward_accuracy"] > res.before["val_reward_accuracy"]
    assert res.after["val_reward_accuracy"] >= 0.9
    assert res.after["val_reward_margin"] > res.before["val_reward_margin"]


@pytest.mark.parametrize("sets", [('dpo.loss_type="ipo"', "dpo.sft_weight=0.5"),
                                  ('dpo.loss_type="hinge"',),
                                  ('dpo.loss_type="robust"', "dpo.label_smoothing=0.1"),
                                  ('dpo.loss_type=["sigmoid", "bco_pair", "sft"]',  # MPO
                                   "dpo.loss_weights=[1.0, 0.5, 0.2]")])
def test_dpo_loss_types_train(tiny, prefs, tmp_path, sets):
    cfg = tiny_config(tiny, tmp_path / "run", 'objective="dpo"', "dpo.beta=0.5", *sets,
                      "max_steps=10", "optim.lr=1e-2", "optim.warmup_steps=1", "eval.metrics=[]",
                      f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
                      "data.tokens_per_batch=96", "checkpoint.save_final=false")
    res = train(cfg, echo=quiet, progress=False)
    assert res.before["val_reward_margin"] == pytest.approx(0, abs=1e-6)  # policy = reference
    assert res.after["val_loss"] < res.before["val_loss"]
    assert res.after["val_reward_accuracy"] >= 0.9 and res.after["val_reward_margin"] > 0
    rows = _train_rows(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("objective", ["dpo", "kto", "cpo"])
def test_ember_eval_of_a_preference_run_scores_it_as_training_did(tiny, prefs, tmp_path,
                                                                  objective, capsys):
    """``ember eval RUN --data pairs.jsonl`` on a DPO / KTO run reports the run's own validation
    scores against its reference (was: the SFT loss over chosen and rejected answers for DPO, and
    every line refused as "a KTO line" for KTO)."""
    import dataclasses
    import json

    from ember.engine.cli import main as cli

    run, pairs = tmp_path / objective, tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(prefs).readlines()[:4]))
    cfg = tiny_config({**tiny, "train": pairs, "val": pairs}, run, f'objective="{objective}"',
                      "max_steps=1", "optim.lr=1e-2", "eval.metrics=[]", "eval.before=false",
                      "data.tokens_per_batch=96", "data.max_seq_len=32")
    train(cfg.replace(data=dataclasses.replace(cfg.data, test=None)), echo=quiet,
          progress=False)
    last = [r for r in rows_of(run, timing=False) if r["kind"] == "eval"][-1]
    capsys.readouterr()
    assert cli(["eval", str(run), "--data", str(pairs)]) in (0, None)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = {k: v for k, v in last.items() if k.startswith("val_")}
    assert want and {k: got[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_teacher_with_a_padded_vocabulary_names_both_sizes_and_the_fix(tiny, tmp_path):
    """A teacher of the same family whose embeddings are padded to another size (Qwen2.5-7B
    152064 vs 0.5B 151936) is not "another family": the error names both sizes and the fix, and
    the fix (transformers' ``resize_token_embeddings``) gives a teacher that distills."""
    import shutil

    from transformers import AutoModelForCausalLM

    from ember.models import Transformer
    from ember.models.loading import save_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    v = model.cfg.vocab_size
    padded = tmp_path / "padded"
    save_pretrained(Transformer(model.cfg.__class__(**{**vars(model.cfg), "vocab_size": v + 20}))
                    .init_weights(seed=0), padded, tok)
    with pytest.raises(EmberError, match=rf"{v + 20} rows, the student's {v} .*"
                                         rf"resize_token_embeddings\({v}\).* nothing is lost"):
        train(tiny_config(tiny, tmp_path / "a", 'objective="distill"',
                          f'distill.teacher="{padded}"'), echo=quiet, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(padded)
    hf.resize_token_embeddings(v)
    hf.save_pretrained(tmp_path / "resized")
    for f in padded.iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / "resized" / f.name)
    train(tiny_config(tiny, tmp_path / "b", 'objective="distill"', "max_steps=1",
                      f'distill.teacher="{tmp_path / "resized"}"'), echo=quiet, progress=False)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL 1.16 GKD's ``generalized_jsd_loss`` (reduction "batchmean": the mean over the tokens
    whose label is not -100), restated (TRL is not installed here)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = (b * F.kl_div(mix, t, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(mix, s, reduction="none", log_target=True))
    jsd = jsd[labels != -100]
    return jsd.sum() / (labels != -100).sum().clamp(min=1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_kd_term_is_trls_forward_kl_times_t_squared(tiny, teacher, temperature):
    """The KD term against TRL's GKD / DistillationTrainer loss with beta = 0 (forward KL
    KL(teacher || student)), on the answer tokens of a packed batch, token mean: Ember's is
    T^2 times TRL's (Hinton's scaling, which TRL does not apply), loss and gradient."""
    from ember.engine.losses import distill_sft_loss

    student, tok = load_pretrained(tiny["model"], "float32")
    t_model, _ = load_pretrained(teacher, "float32")
    examples = load_examples(tiny["small"], DataConfig(), tok)[0][:3]
    batch = collate(examples)
    loss, kd, _ = distill_sft_loss(student, t_model, batch, batch.num_loss_tokens, temperature,
                                   alpha=1.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_rows, t_rows, labels = [], [], []
    for e in examples:  # each document alone, full logits (TRL's padded batch, no packing)
        ids = torch.tensor([e.input_ids])
        s_rows.append(student(ids)[0])
        with torch.no_grad():
            t_rows.append(t_model(ids)[0])
        labels.append(torch.tensor(e.labels))
    want = temperature ** 2 * _trl_generalized_jsd(torch.cat(s_rows), torch.cat(t_rows),
                                                   torch.cat(labels), 0.0, temperature)
    want.backward()
    torch.testing.assert_close(kd, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_classifier_teacher_is_refused(tiny, tmp_path, tied):
    """A reward / classification model (transformers' LlamaForSequenceClassification) as the
    teacher has no next-token distribution: refused up front, naming the fix. Was: a bare
    ValueError from the head at the first step (untied), or, with tied embeddings (Qwen2.5-0.5B's
    layout, which its reward models keep), a run that silently distilled from the classifier's
    input embeddings used as a head."""
    import shutil

    from transformers import LlamaConfig, LlamaForSequenceClassification

    model, _ = load_pretrained(tiny["model"], "float32")
    c = model.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                         num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         num_labels=1, pad_token_id=c.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForSequenceClassification(hf_cfg).save_pretrained(tmp_path / "rm")
    for f in Path(tiny["model"]).iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / "rm" / f.name)
    with pytest.raises(EmberError, match=r"is a sequence classifier .*pick a causal language "
                                         r"model \(\*ForCausalLM\) as the teacher"):
        train(tiny_config(tiny, tmp_path / "run", 'objective="distill"', "max_steps=1",
                          f'distill.teacher="{tmp_path / "rm"}"', "eval.metrics=[]"),
              echo=quiet, progress=False)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_teacher_without_the_distill_objective_is_refused(tiny, teacher, tmp_path, objective):
    """A [distill] table whose run forgot objective = "distill" trained without the teacher,
    silently (plain SFT / DPO); it is refused before anything loads, naming the fix."""
    from ember.engine.distributed import DistInfo
    from ember.engine.objectives import make_objective

    cfg = tiny_config(tiny, tmp_path, f'objective="{objective}"', f'distill.teacher="{teacher}"')
    with pytest.raises(EmberError, match=rf"distill\.teacher is set .* objective = '{objective}'"
                                         r", which has no teacher: set objective = \"distill\""):
        make_objective(cfg, DistInfo())
    with pytest.raises(EmberError, match=r"distill\.teacher is set"):
        train(cfg, echo=quiet, progress=False)
    assert not (tmp_path / "config.toml").exists()  # refused before the run directory is written


def test_a_run_an_older_ember_ran_with_a_stray_teacher_resumes(tiny, teacher, tmp_path):
    """An older Ember trained a [distill] teacher without objective = "distill" as plain SFT:
    its runs resume (and their checkpoints' config must not change) as they ran; a new run is
    refused (above). The resumed run's adapter gives transformers + peft's logits."""
    import hashlib
    import json
    from dataclasses import replace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.engine import dcp
    from ember.engine.config import to_toml
    from ember.engine.state import load_run_model

    run = tmp_path / "run"
    cfg = tiny_config(tiny, run, "max_steps=1", "eval.metrics=[]", "checkpoint.every_steps=1")
    train(cfg, echo=quiet, progress=False)
    for where in (run, *(run / "checkpoints").iterdir()):  # as the older Ember recorded it
        data = to_toml(load_config(where / "config.toml", [f'distill.teacher="{teacher}"'])
                       ).encode()
        (where / "config.toml").write_bytes(data)
        if (where / dcp.MANIFEST).exists():  # (the checkpoint vouches for its files)
            manifest = json.loads((where / dcp.MANIFEST).read_text())
            manifest["files"]["config.toml"] = {"bytes": len(data),
                                                "sha256": hashlib.sha256(data).hexdigest()}
            (where / dcp.MANIFEST).write_text(json.dumps(manifest))
    old = cfg.replace(distill=replace(cfg.distill, teacher=teacher), max_steps=2)
    train(old, resume=True, echo=quiet, progress=False)
    assert [r["step"] for r in _train_rows(run)] == [1, 2]
    assert "teacher" in to_toml(load_config(run))  # (the run's config as it was)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    want = PeftModel.from_pretrained(base, run / "final" / "adapter")
    model, _, _ = load_run_model(run, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), want(ids).logits, atol=1e-4, rtol=1e-4)


def _trl_disable_dropout_in_model(model) -> None:
    """TRL 1.16's ``trl/trainer/utils.py disable_dropout_in_model``, verbatim (the oracle)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


@pytest.mark.parametrize("objective,off", [("dpo", True), ("kto", True), ("dpo", False)])
def test_preference_objectives_turn_lora_dropout_off_as_trl(tiny, tmp_path, objective, off):
    """TRL's DPO/ORPO/CPO/KTO configs default to disable_dropout=True: PEFT's lora_dropout
    draws nothing in training forwards (was: Ember drew it, so a TRL recipe with lora_dropout
    0.1 trained differently, and DPO's policy and reference disagreed at step 0). Off: two
    training forwards give the same log-probs, equal to transformers + peft's after TRL's
    disable_dropout_in_model, and the exported adapter keeps lora_dropout 0.1 as PEFT's config
    does; disable_dropout = false keeps drawing it."""
    import json
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.engine.objectives import disable_run_dropout
    from ember.engine.runtime import build_model
    from ember.models.lora import lora_modules
    from ember.models.peft_adapter import save_adapter

    sets = [f'objective="{objective}"', "lora.dropout=0.1"]
    if not off:
        sets.append(f"{objective}.disable_dropout=false")
    cfg = tiny_config(tiny, tmp_path / "run", *sets)
    model, _ = build_model(cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0: the adapters' (dropped-out) input counts
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=g))
    note = disable_run_dropout(cfg, model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=g)
    model.train()
    with torch.no_grad():
        a, b = (F.log_softmax(model(ids), -1) for _ in range(2))
    if not off:
        assert note is None and (a - b).abs().max().item() > 1e-3
        return
    assert note.startswith(f"{objective}.disable_dropout (TRL's default): off for this run: "
                           "LoRA dropout 0.1")
    assert torch.equal(a, b)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()
                      )["lora_dropout"] == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                                       tmp_path / "adapter", is_trainable=True)
    _trl_disable_dropout_in_model(pm)
    with torch.no_grad():
        ref = F.log_softmax(pm.train()(ids).logits, -1)
    assert (a - ref).abs().max().item() <= 1e-4


def test_disable_dropout_is_documented_and_guards_a_resume(tiny, tmp_path):
    """``ember config`` shows <objective>.disable_dropout (TRL's default, true) for every
    preference section. A checkpoint an older Ember wrote (no such key: it trained with dropout
    on) resumes only with the setting false, as it trained: today's default would change the
    run silently, so it is refused by name like any other changed setting."""
    from ember.engine.config import to_toml
    from ember.engine.config_doc import annotated_toml
    from ember.engine.state import _check_same_run, checkpoint_config

    cfg = tiny_config(tiny, tmp_path / "run", 'objective="dpo"', "lora.dropout=0.1")
    shown = annotated_toml(cfg)
    for section in ("dpo", "orpo", "simpo", "cpo", "kto"):
        body = shown.split(f"\n[{section}]\n")[1].split("\n[")[0]
        assert "\ndisable_dropout = true  # Turn off, for the run," in "\n" + body, section
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    older = "\n".join(x for x in to_toml(cfg).splitlines() if not x.startswith("disable_dropout"))
    (ckpt / "config.toml").write_text(older + "\n")
    assert checkpoint_config(ckpt).dpo.disable_dropout is False
    assert checkpoint_config(ckpt).kto.disable_dropout is True  # not the run's objective
    with pytest.raises(EmberError, match=r"dpo\.disable_dropout \(False in the checkpoint, "
                                         r"now True\)"):
        _check_same_run(ckpt, cfg)
    _check_same_run(ckpt, tiny_config(tiny, tmp_path / "run", 'objective="dpo"',
                                      "lora.dropout=0.1", "dpo.disable_dropout=false"))
    (ckpt / "config.toml").write_text(to_toml(cfg))  # written now: the setting is recorded
    assert checkpoint_config(ckpt).dpo.disable_dropout is True
    _check_same_run(ckpt, cfg)


def test_a_dpo_run_says_what_dropout_it_turned_off(tiny, prefs, tmp_path):
    """The trainer applies dpo.disable_dropout after the LoRA wrapping and says so at start-up;
    the run trains with no LoRA dropout module left."""
    from ember.models.lora import lora_modules

    lines = []
    cfg = tiny_config(tiny, tmp_path / "run", 'objective="dpo"', "lora.dropout=0.1",
                      "max_steps=1", "eval.metrics=[]", f'data.train=["{prefs}"]',
                      f'data.validation="{prefs}"', "data.tokens_per_batch=96",
                      "checkpoint.save_final=false")
    t = Trainer(cfg, echo=lambda *a, **_k: lines.append(" ".join(map(str, a))), progress=False)
    t.run()
    assert ("dpo.disable_dropout (TRL's default): off for this run: LoRA dropout 0.1 (set "
            "dpo.disable_dropout = false to keep it)") in lines
    assert all(m.dropout is None for m in lora_modules(t.model).values())
