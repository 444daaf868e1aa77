"""``precompute_ref_log_probs`` for DPO and KTO: the reference scores every training and
validation document once before the first step; the values kept on the examples equal each
document's summed answer log-prob under the starting model computed here from full logits, one
document at a time; training then runs no reference forward (DPO, KTO without its KL term) and
logs the curve a run scoring the reference live does; a full fine-tune's frozen copy is released
unless KTO's KL documents still need it; a stopped and resumed run logs what an uninterrupted one
does, loading the values saved in the run directory instead of scoring the data again, unless the
tokenized data or the reference changed (engine/reference_cache.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ember import EmberError
from ember.engine import preference_reference
from ember.engine.distributed import DistInfo
from ember.engine.reference_cache import cache_key, load_cached
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


def _count_precomputes(monkeypatch) -> list[int]:
    """The examples of each reference precompute pass (one per split scored)."""
    calls = []
    real = preference_reference.attach_ref_logps

    def counted(examples, *a, **k):
        calls.append(len(examples))
        return real(examples, *a, **k)

    monkeypatch.setattr(preference_reference, "attach_ref_logps", counted)
    return calls


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
def test_kto_precomputed_reference(tiny, prefs, tmp_path, monkeypatch, loss_type, keeps_copy):
    """KTO's examples use the precomputed values; its KL documents (other prompts' completions,
    new each batch) are still scored live, so a full fine-tune keeps its frozen copy for them. A
    rerun in the same run directory loads the saved values (keyed by the frozen copy's
    fingerprint)."""
    extra = ('method="full"', "optim.lr=1e-3", "max_steps=3", f'kto.loss_type="{loss_type}"')
    train(_cfg(tiny, prefs, tmp_path / "live", "kto", *extra), echo=quiet, progress=False)
    cfg = _cfg(tiny, prefs, tmp_path / "pre", "kto", *extra, "kto.precompute_ref_log_probs=true")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    assert bool(t.objective.frozen_models()) == keeps_copy
    assert all(e.ref_logps is not None and len(e.ref_logps) == 1 for e in t.datasets.train)
    e = t.datasets.train[1]
    assert list(e.ref_logps) == pytest.approx(_oracle_sums(tiny["model"], e), abs=2e-5)
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "live"), **LIVE_TOL)
    if keeps_copy:  # (one of the two suffices)
        calls = _count_precomputes(monkeypatch)
        # (no checkpoint: the resume starts again from step 0, with the saved values)
        again = Trainer(cfg, resume=True, echo=quiet, progress=False)
        again.run()
        assert calls == []
        assert [e.ref_logps for e in again.datasets.train] == [
            e.ref_logps for e in t.datasets.train]


def test_precomputed_reference_resumes_exactly(tiny, prefs, tmp_path, monkeypatch):
    """The resume loads the values the stopped run saved (no precompute pass) and logs what an
    uninterrupted run does; an edited validation line (a resume may change it) recomputes that
    split only, and so would another data.max_seq_len (a new run in the same directory)."""
    val, trn = tmp_path / "val.jsonl", tmp_path / "train.jsonl"
    val.write_text(Path(prefs).read_text())
    trn.write_text(Path(prefs).read_text())
    extra = ("max_steps=4", "checkpoint.every_steps=2", "dpo.precompute_ref_log_probs=true")
    train(_cfg(tiny, prefs, tmp_path / "a", "dpo", *extra), echo=quiet, progress=False)
    calls = _count_precomputes(monkeypatch)
    cfg_b = _cfg(tiny, trn, tmp_path / "b", "dpo", *extra, f'data.validation="{val}"')
    train(cfg_b, echo=quiet, progress=False, stop_after=2)
    assert calls == [12, 12]  # the training and the validation pairs
    said = []
    t = Trainer(cfg_b, resume=True, echo=said.append, progress=False)
    t.run()
    assert calls == [12, 12], "the resume ran the reference precompute again"
    assert any("reference log-probs of 48 documents loaded from" in s for s in said), said
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)

    prints = {"base": t.base_print, **t.frozen_prints}
    longest = max(n for e in t.datasets.train for n in e.doc_lengths)
    for max_len, applies in ((32, True), (longest - 1, False)):
        ds = t.objective.load_datasets(dataclasses.replace(t.cfg.data, max_seq_len=max_len),
                                       t.tokenizer)
        splits = {"train": ds.train, "validation": ds.validation}
        n, why = load_cached(t.cfg.out_dir, splits,
                             cache_key(splits, prints, t.objective.cache_settings), DistInfo())
        assert (n == 48) == applies and ("train examples differ" in why) != applies, why
        if applies:
            assert [e.ref_logps for e in ds.train] == [e.ref_logps for e in t.datasets.train]

    lines = val.read_text().splitlines()
    lines[3] = lines[3].replace("say ", "say please ")
    val.write_text("\n".join(lines) + "\n")
    said.clear()
    t = Trainer(cfg_b, resume=True, echo=said.append, progress=False)
    t.run()
    assert calls == [12, 12, 12]  # the validation pairs only
    assert any("do not apply (the validation examples differ" in s for s in said), said
    assert any("of 24 documents precomputed and 24 loaded from" in s for s in said), said
    ds = t.datasets
    assert list(ds.validation[3].ref_logps) == pytest.approx(
        _oracle_sums(tiny["model"], ds.validation[3]), abs=2e-5)

    # an edited training line: the resume is refused (another batch order), before the
    # precompute rather than after it
    trn.write_text(val.read_text())
    with pytest.raises(EmberError, match="dataset or batching settings differ"):
        train(cfg_b, resume=True, echo=quiet, progress=False)
    assert calls == [12, 12, 12]


def _config_fields(cls, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass, as the dotted path ``--set`` takes."""
    import typing

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out += (_config_fields(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t)
                else [prefix + f.name])
    return out


def test_every_config_field_is_placed_for_the_reference_cache_key():
    """A setting that changes the reference's forward but not its weights or examples must be in
    the cache key, else a resume reuses values computed under the old setting: every TrainConfig
    field is either in FORWARD_SETTINGS or declared (with why) not to change that forward."""
    from ember.engine.config import TrainConfig
    from ember.engine.reference_cache import (
        FORWARD_SETTINGS,
        NOT_FORWARD_SETTINGS,
        forward_settings,
    )

    declared = [n for names in NOT_FORWARD_SETTINGS.values() for n in names]
    fields = _config_fields(TrainConfig)
    # "section.*": every field of the section
    placed = [f for n in [*FORWARD_SETTINGS, *declared] for f in (
        [f for f in fields if f.startswith(n[:-1])] or [n] if n.endswith(".*") else [n])]
    assert len(placed) == len(set(placed)), "a field is placed twice"
    assert not set(fields) - set(placed), (
        f"place {sorted(set(fields) - set(placed))} in reference_cache.FORWARD_SETTINGS (if it "
        "changes the reference's log-probs) or NOT_FORWARD_SETTINGS")
    assert not set(placed) - set(fields), f"no such fields: {sorted(set(placed) - set(fields))}"
    cfg = TrainConfig()
    assert forward_settings(cfg) == {
        "objective": cfg.objective, "method": cfg.method, "precision": cfg.precision,
        "model.dtype": cfg.model.dtype, "model.quantize": cfg.model.quantize,
        "model.double_quant": cfg.model.double_quant, "model.rope_scaling": cfg.model.rope_scaling,
        "model.rope_factor": cfg.model.rope_factor,
        "dist.mixed_precision": cfg.dist.mixed_precision, "dpo.ld_alpha": None}
