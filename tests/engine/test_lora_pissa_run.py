"""A run with ``lora.init = "pissa"``: it trains from the residual base, resumes onto the same
residual, keeps the starting model as DPO's reference (not the residual the adapters leave when
switched off), and exports the plain LoRA that PEFT applies to the original base."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch

from ember import EmberError
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve, train
from tests.engine._tiny import quiet, rows_of, tiny_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAST = ("eval.metrics=[]", "optim.warmup_steps=0", 'optim.schedule="constant"')


def test_pissa_dpo_run_resumes_and_exports(tiny, prefs, tmp_path, monkeypatch):
    """pissa_niter_K: its randomized SVD draws from the run's seed, at the resume too."""
    extra = ('objective="dpo"', f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
             "max_steps=2", "checkpoint.every_steps=1", "eval.every_steps=1",
             'lora.init="pissa_niter_2"', 'lora.targets=["q", "v", "down"]', "optim.lr=1e-2", *FAST)
    t = Trainer(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    res = t.run()
    # the reference is the starting model: every reward 0 and the first loss log 2
    assert res.before["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    first = next(r["loss"] for r in rows_of(tmp_path / "a") if r["kind"] == "train")
    assert first == pytest.approx(math.log(2), abs=1e-6)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=1)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    # a residual that came out otherwise at a resume (another machine): refused, saying why
    monkeypatch.setattr("ember.engine.trainer.base_fingerprint", lambda *a, **k: "other")
    with pytest.raises(EmberError, match="lora.init 'pissa_niter_2', the residual base"):
        train(cfg_b.replace(max_steps=3), resume=True, echo=quiet, progress=False)
    monkeypatch.undo()

    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        trained = t.model.eval()(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a" / "final" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, trained, rtol=0, atol=1e-4)
    # without the final export: the last checkpoint's adapters over the residual rebuilt as the
    # run drew it
    shutil.rmtree(tmp_path / "a" / "final")
    with torch.no_grad():
        torch.testing.assert_close(load_run_model(tmp_path / "a", "cpu")[0](ids), trained,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_resumes_at_another_thread_count(tiny, tmp_path, init):
    """The residual base is rebuilt at a resume: with another CPU thread count (a one-process run
    continued under torchrun, whose ranks get OMP_NUM_THREADS=1; another ``threads``) LAPACK's
    decomposition came out otherwise in its last bits, and the resume was refused as built on
    other base weights (tests/models/test_lora_pissa.py checks the init itself)."""
    cfg = tiny_config(tiny, tmp_path / "run", f'lora.init="{init}"', "max_steps=2", "threads=3",
                      "checkpoint.every_steps=1", "eval.every_steps=0", "eval.before=false",
                      "checkpoint.save_final=false", *FAST)
    train(cfg, echo=quiet, progress=False, stop_after=1)
    train(cfg.replace(threads=1), resume=True, echo=quiet, progress=False)
    assert [r["step"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"] == [1, 2]


def test_pissa_refused_for_a_continued_adapter(tiny, tmp_path):
    run = tmp_path / "sft"
    train(tiny_config(tiny, run, "max_steps=1", 'lora.targets=["q"]', *FAST), echo=quiet,
          progress=False)
    with pytest.raises(EmberError, match="lora.init = 'olora' starts new adapters"):
        resolve(tiny_config(tiny, tmp_path / "b", f'model.init="{run}"', 'lora.init="olora"'))
