"""QLoRA through ``ember train``: ``model.quantize = "nf4"`` trains adapters on a 4-bit base, the
run reloads on the same base for eval/export, and ``ember export --merged`` writes a plain bf16 HF
model that transformers loads with the QLoRA model's logits."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.cli import main as cli
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve
from ember.models.nf4 import Linear4bit
from tests.engine._tiny import quiet, rows_of, tiny_config


def test_qlora_trains_reloads_and_exports_merged(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = resolve(tiny_config(tiny, run, 'model.quantize="nf4"', "max_steps=16", "optim.lr=1e-2",
                              "eval.metrics=[]"))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    quantized = [n for n, m in t.model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection of the 2 layers is NF4 under its adapter
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    losses = [r["loss"] for r in rows_of(run) if r["kind"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.85, losses
    # the same run on the unquantized base: NF4 changes the weights a little, not the learning
    Trainer(resolve(tiny_config(tiny, tmp_path / "dense", "max_steps=16", "optim.lr=1e-2",
                                "eval.metrics=[]")), echo=quiet, progress=False).run()
    dense = [r["loss"] for r in rows_of(tmp_path / "dense") if r["kind"] == "train"]
    assert losses != dense
    q, d = sum(losses[-8:]) / 8, sum(dense[-8:]) / 8
    assert abs(q - d) < 0.03 * d, (losses, dense)

    model, _, _ = load_run_model(run, "cpu")  # the same 4-bit base + the saved adapter
    ids = torch.randint(3, model.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        want = t.model.eval()(ids).float()
        assert torch.equal(model.eval()(ids).float(), want)

    out = tmp_path / "merged"
    assert cli(["export", str(run), "--merged", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and "quantization_config" not in hf.config.to_dict()
    with torch.no_grad():
        got = hf.float()(ids).logits
    # the merged weights are rounded to bf16 once: logits agree to that precision
    assert (got - want).abs().max() <= 0.02 * want.abs().max(), (got - want).abs().max()


def test_quantize_config_errors(tiny, tmp_path):
    with pytest.raises(EmberError, match="model.quantize must be"):
        tiny_config(tiny, tmp_path / "a", 'model.quantize="int8"')
    with pytest.raises(EmberError, match="set method = \"lora\""):
        tiny_config(tiny, tmp_path / "b", 'model.quantize="nf4"', 'method="full"')
