"""A run with ``lora.init = "pissa"``: it trains from the residual base, resumes onto the same
residual, keeps the starting model as DPO's reference (not the residual the adapters leave when
switched off), and exports the plain LoRA that PEFT applies to the original base."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve, train
from ember.models.loading import load_pretrained
from tests.engine._shared_launch import shares_launch
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
    monkeypatch.setattr("ember.engine.trainer_setup.base_fingerprint", lambda *a, **k: "other")
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



@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nf4_base_run_resumes_and_exports(tiny, tmp_path, init):
    """QLoRA with lora.init = "pissa" (QPiSSA: the dense weights decomposed, the residual
    quantized) / "olora" (PEFT's 4-bit OLoRA: the residual re-quantized): a resume rebuilds the
    same residual (checked for pissa, the streamed dense weights; olora's rebuild is the same
    deterministic QR); the final adapter on the original NF4 base computes the trained model
    within NF4's own error; without the final export the checkpoint rebuilds it exactly."""
    extra = ("max_steps=2", "checkpoint.every_steps=1", f'lora.init="{init}"',
             'model.quantize="nf4"', 'lora.targets=["q", "v", "down"]', "optim.lr=1e-2", *FAST)
    t = Trainer(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    t.run()
    if init == "pissa":
        cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
        train(cfg_b, echo=quiet, progress=False, stop_after=1)
        train(cfg_b, resume=True, echo=quiet, progress=False)
        assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        trained = t.model.eval()(ids)
        final = load_run_model(tmp_path / "a", "cpu")[0](ids)
        dense, nf4 = (load_pretrained(tiny["model"], quantize=q)[0].eval()(ids)
                      for q in (None, "nf4"))
        assert 0 < (final - trained).abs().max() < (dense - nf4).abs().max()  # NF4's own error
        shutil.rmtree(tmp_path / "a" / "final")
        torch.testing.assert_close(load_run_model(tmp_path / "a", "cpu")[0](ids), trained,
                                   rtol=0, atol=1e-5)


def _nf4_cfg(init: str) -> tuple[str, ...]:
    return (f'lora.init="{init}"', 'model.quantize="nf4"', 'lora.targets=["q", "v", "down"]',
            "optim.lr=1e-2", "max_steps=2", "eval.every_steps=2", "eval.metrics=[]",
            "eval.before=false", "checkpoint.every_steps=0")


def _nf4_plan(tiny, folder) -> list[dict]:
    from tests.engine.test_distributed import write_config

    return [{"name": init, "args": [str(write_config(tiny, folder / f"two_{init}",
                                                     *_nf4_cfg(init)))]}
            for init in ("pissa", "olora")]


@shares_launch(_nf4_plan)
def test_nf4_base_inits_under_torchrun_match_one_process(tiny, launched):
    """QPiSSA (rank 0 reads the dense weights; the others build on "meta" and get the residual
    by broadcast) and NF4 OLoRA under torchrun (FSDP2, 2 processes): the log and the final
    adapter of one process with twice the grad_accum."""
    from ember.engine.cli import main
    from tests.engine.test_distributed import _same_rows, sets, write_config

    tmp_path, _ = launched
    for init in ("pissa", "olora"):
        one = tmp_path / f"one_{init}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", str(write_config(tiny, one, *_nf4_cfg(init))),
                         *sets("grad_accum=2")]) == 0
        _same_rows(rows_of(tmp_path / f"two_{init}"), rows_of(one))
        name = "final/adapter/adapter_model.safetensors"
        a, b = load_file(str(one / name)), load_file(str(tmp_path / f"two_{init}" / name))
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_nf4_merged_export_from_a_checkpoint_is_the_final_one(tiny, tmp_path, monkeypatch):
    """export --merged of an NF4 OLoRA run without its final adapter: the original NF4 base +
    the converted adapter, as from the final adapter (was: the re-quantized residual + B A,
    another model by the residual's re-quantization error). Only the adapted modules' original
    weights are read and quantized again (was: the whole base, every linear a second time)."""
    from ember.engine.cli import main
    from ember.kernels.nf4 import NF4Weight
    from ember.models.loading import load_pretrained
    from ember.models.nf4 import Linear4bit

    quantized, real = [], NF4Weight.quantize.__func__

    def counted(cls, w, *args, **kwargs):
        quantized.append(tuple(w.shape))
        return real(cls, w, *args, **kwargs)

    run = tmp_path / "a"
    train(tiny_config(tiny, run, "max_steps=1", 'lora.init="olora"', 'model.quantize="nf4"',
                      'lora.targets=["q", "down"]', "optim.lr=1e-2", *FAST),
          echo=quiet, progress=False)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    outs = []
    with contextlib.redirect_stdout(io.StringIO()):
        for name in ("final", "ckpt"):
            if name == "ckpt":
                shutil.rmtree(run / "final")
                monkeypatch.setattr(NF4Weight, "quantize", classmethod(counted))
            assert main(["export", "--merged", str(tmp_path / name), str(run)]) == 0
            monkeypatch.undo()
            with torch.no_grad():
                outs.append(load_pretrained(tmp_path / name)[0].eval()(ids))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    base = load_pretrained(tiny["model"], quantize="nf4")[0]
    linears = sum(isinstance(m, Linear4bit) for m in base.modules())
    adapted = 2 * base.cfg.num_layers  # q and down: each residual, then its original weight
    assert len(quantized) == linears + 2 * adapted, (len(quantized), linears, adapted)
