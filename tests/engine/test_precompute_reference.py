"""``precompute_ref_log_probs`` for DPO and KTO: the reference scores every training and
validation document once before the first step; the values kept on the examples equal each
document's summed answer log-prob under the starting model computed here from full logits, one
document at a time; training then runs no reference forward (DPO, KTO without its KL term) and
logs the curve a run scoring the reference live does; a full fine-tune's frozen copy is released
unless KTO's KL documents still need it; a stopped and resumed run logs what an uninterrupted one
does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember.engine.trainer import Trainer, train
from ember.models import Transformer
from ember.models.loading import load_pretrained
from tests.engine._tiny import quiet, rows_of, tiny_config

LIVE_TOL = dict(rel=1e-4, abs=1e-5)  # the same math; the batches' packing differs


def _cfg(tiny, prefs, run, objective, *extra):
    cfg = tiny_config({**tiny, "train": prefs, "val": prefs}, run, f'objective="{objective}"',
                      f"{objective}.beta=0.5", "eval.metrics=[]", "optim.lr=1e-2",
                      "optim.warmup_steps=1", "data.max_seq_len=32", "data.tokens_per_batch=96",
                      "eval.every_steps=2", "eval.max_val_batches=2", "lora.dropout=0.0",
                      "checkpoint.save_final=false", *extra)
    return cfg.replace(data=dataclasses.replace(cfg.data, test=None))


def _losses(run) -> list[float]:
    return [r["loss"] for r in rows_of(run, timing=False) if r["kind"] == "train"]


def _count_training_forwards(monkeypatch) -> list[bool]:
    """Each forward in training mode: whether it keeps gradients (the reference's do not)."""
    seen = []
    hidden = Transformer.hidden_states

    def record(self, ids, *a, **k):
        if self.training:
            seen.append(torch.is_grad_enabled())
        return hidden(self, ids, *a, **k)

    monkeypatch.setattr(Transformer, "hidden_states", record)
    return seen


def _oracle_sums(model_dir, example) -> list[float]:
    """Each document's summed log p(label) over its answer tokens under the base model, from the
    full logits of that document alone."""
    model, _ = load_pretrained(model_dir, "float32")
    out, start = [], 0
    for n in example.doc_lengths:
        ids = torch.tensor([example.input_ids[start:start + n]])
        labels = torch.tensor(example.labels[start:start + n])
        with torch.no_grad():
            logp = model(ids)[0].double().log_softmax(-1)
        keep = labels >= 0
        out.append(float(logp[keep].gather(-1, labels[keep, None]).sum()))
        start += n
    return out


def test_dpo_precomputed_reference_is_the_start_model_and_saves_its_forwards(
        tiny, prefs, tmp_path, monkeypatch):
    extra = ("max_steps=6",)
    live = Trainer(_cfg(tiny, prefs, tmp_path / "live", "dpo", *extra), echo=quiet,
                   progress=False)
    res_live = live.run()
    seen = _count_training_forwards(monkeypatch)
    pre = Trainer(_cfg(tiny, prefs, tmp_path / "pre", "dpo", *extra,
                       "dpo.precompute_ref_log_probs=true"), echo=quiet, progress=False)
    res_pre = pre.run()
    # One forward per micro-batch, the policy's; no reference forward during training.
    assert seen and all(seen)
    ds = pre.datasets
    assert all(e.ref_logps is not None and len(e.ref_logps) == 2
               for e in ds.train + ds.validation)
    for e in (ds.train[0], ds.train[-1], ds.validation[3]):
        assert list(e.ref_logps) == pytest.approx(_oracle_sums(tiny["model"], e), abs=2e-5)
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "live"), **LIVE_TOL)
    for k in ("val_loss", "val_reward_margin"):
        assert res_pre.after[k] == pytest.approx(res_live.after[k], **LIVE_TOL)
    assert res_pre.after["val_reward_margin"] > res_pre.before["val_reward_margin"]


def test_dpo_full_finetuning_releases_the_frozen_copy(tiny, prefs, tmp_path):
    extra = ('method="full"', "optim.lr=1e-3", "max_steps=3")
    train(_cfg(tiny, prefs, tmp_path / "live", "dpo", *extra), echo=quiet, progress=False)
    said = []
    t = Trainer(_cfg(tiny, prefs, tmp_path / "pre", "dpo", *extra,
                     "dpo.precompute_ref_log_probs=true"), echo=said.append, progress=False)
    t.run()
    assert t.objective.frozen_models() == {}
    assert any("precomputed" in s and "released" in s for s in said), said
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "live"), **LIVE_TOL)


@pytest.mark.parametrize("loss_type,keeps_copy", [("kto", True), ("apo_zero_unpaired", False)])
def test_kto_precomputed_reference(tiny, prefs, tmp_path, loss_type, keeps_copy):
    """KTO's examples use the precomputed values; its KL documents (other prompts' completions,
    new each batch) are still scored live, so a full fine-tune keeps its frozen copy for them."""
    extra = ('method="full"', "optim.lr=1e-3", "max_steps=3", f'kto.loss_type="{loss_type}"')
    train(_cfg(tiny, prefs, tmp_path / "live", "kto", *extra), echo=quiet, progress=False)
    t = Trainer(_cfg(tiny, prefs, tmp_path / "pre", "kto", *extra,
                     "kto.precompute_ref_log_probs=true"), echo=quiet, progress=False)
    t.run()
    assert bool(t.objective.frozen_models()) == keeps_copy
    assert all(e.ref_logps is not None and len(e.ref_logps) == 1 for e in t.datasets.train)
    e = t.datasets.train[1]
    assert list(e.ref_logps) == pytest.approx(_oracle_sums(tiny["model"], e), abs=2e-5)
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "live"), **LIVE_TOL)


def test_precomputed_reference_resumes_exactly(tiny, prefs, tmp_path):
    extra = ("max_steps=4", "checkpoint.every_steps=2", "dpo.precompute_ref_log_probs=true")
    train(_cfg(tiny, prefs, tmp_path / "a", "dpo", *extra), echo=quiet, progress=False)
    cfg_b = _cfg(tiny, prefs, tmp_path / "b", "dpo", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=2)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
