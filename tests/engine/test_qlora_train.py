"""QLoRA through ``ember train``: ``model.quantize = "nf4"`` trains adapters on a 4-bit base, the
run reloads on the same base for eval/export, and ``ember export --merged`` writes a plain HF
model in the base's dtype that transformers loads with the QLoRA model's logits (with an
embedding adapter: PEFT's merge in fp32 and fp16). Under torchrun (2 processes, gloo) the NF4
base is sharded (each rank holds half of rank 0's bytes, FSDP-QLoRA) and the run logs,
exports and resumes as one process does."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.engine.cli import main as cli
from ember.engine.runtime import build_model
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.nf4 import Linear4bit, nf4_to_bnb
from ember.models.nf4_storage import unpack_nf4
from ember.models.peft_files import untie_head
from tests.engine._shared_launch import shares_launch
from tests.engine._tiny import quiet, rows_of, tiny_config
from tests.engine.test_distributed import COMMON, _same_rows, continue_from, sets, write_config


def test_qlora_trains_reloads_and_exports_merged(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = resolve(tiny_config(tiny, run, 'model.quantize="nf4"', "max_steps=16", "optim.lr=1e-2",
                              "eval.metrics=[]", "optim.warmup_steps=0"))
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
                                "eval.metrics=[]", "optim.warmup_steps=0")),
            echo=quiet, progress=False).run()
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
    # in the base's dtype (fp32 here), the 4-bit base dequantized into it
    assert hf.dtype == torch.float32 and "quantization_config" not in hf.config.to_dict()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_qlora_embedding_adapter_exports_as_peft_merges_it_in_the_base_dtype(tiny, tmp_path,
                                                                            dtype):
    """QLoRA on an fp32 / fp16 base with LoRA on embed_tokens: ``ember export --merged`` writes
    the base's dtype with each weight what PEFT's ``merge_and_unload`` computes there (the
    embedding's update rounded to that dtype and added, as ``lora.Embedding.merge``; a linear
    layer's bnb-dequantized weight plus its update), and ``--adapter`` loads in PEFT with the
    run's logits. Was: a bf16 model whatever the base, the embedding's update rounded to bf16
    (fp32 base: up to ~4e-3 off PEFT's fp32 sum, 2^-8 relative; fp16: 8x coarser than fp16)."""
    import json

    peft = pytest.importorskip("peft")
    import transformers

    torch_dtype = getattr(torch, dtype)
    base = tmp_path / "base"
    model, tok = load_pretrained(tiny["model"], dtype)
    untie_head(model)  # (most bases; a tied one's merge is PEFT's tied-adapter case)
    save_pretrained(model, base, tok, dtype=torch_dtype)
    run = tmp_path / "run"
    cfg = resolve(tiny_config(dict(tiny, model=str(base)), run, 'model.quantize="nf4"',
                              f'model.dtype="{dtype}"', 'precision="fp32"',
                              'lora.targets=["q_proj", "v_proj", "embed_tokens"]',
                              "max_steps=2", "optim.lr=5e-2", "eval.metrics=[]",
                              "eval.val_loss=false", "optim.warmup_steps=0"))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert cli(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == dtype
    assert {v.dtype for v in ours.values()} == {torch_dtype}

    # the oracle: PEFT on the 4-bit base's dequantized weights (bnb's dequantize_4bit, which
    # PEFT's Linear4bit.merge adds the update to), in the base's dtype
    nf4, _ = load_pretrained(base, dtype, quantize="nf4")
    save_pretrained(nf4, tmp_path / "dequantized", tok, dtype=torch_dtype, dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized",
                                                               dtype=torch_dtype)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(3, model.cfg.vocab_size, (1, 12),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = t.model.eval()(ids).float()
        theirs = pm(ids).logits.float()
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert (theirs - want).abs().max() <= tol * want.abs().max()
    merged = pm.merge_and_unload().state_dict()
    trained = [k for k in ours if "embed_tokens" in k or "q_proj" in k or "v_proj" in k]
    assert len(trained) == 5
    for k in ours:
        assert torch.equal(ours[k], merged[k].to(torch_dtype)), k


def test_quantize_config_errors(tiny, tmp_path):
    with pytest.raises(EmberError, match="model.quantize must be"):
        tiny_config(tiny, tmp_path / "a", 'model.quantize="int8"')
    with pytest.raises(EmberError, match="set method = \"lora\""):
        tiny_config(tiny, tmp_path / "b", 'model.quantize="nf4"', 'method="full"')
    with pytest.raises(EmberError, match="double_quant = false applies to QLoRA"):
        tiny_config(tiny, tmp_path / "c", "model.double_quant=false")


def test_full_fine_tuning_of_a_bnb_4bit_checkpoint_is_refused(tiny, tmp_path):
    """transformers' Trainer refuses to fine-tune a purely 4-bit model; Ember did not: method =
    "full" on a bitsandbytes checkpoint trained only the embeddings and norms, silently (its NF4
    layers are frozen). Now a clear error; LoRA on it (QLoRA) still builds."""
    import shutil

    import transformers
    from transformers.trainer_utils import validate_quantization_for_training

    folder = tmp_path / "bnb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tiny["model"], device_map="cpu",
            quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True))
    hf.save_pretrained(folder)
    for f in Path(tiny["model"]).glob("*token*"):
        shutil.copy(f, folder)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(hf)
    bnb = {**tiny, "model": str(folder)}
    with pytest.raises(EmberError, match="bitsandbytes 4-bit checkpoint.*method = \"lora\""):
        build_model(resolve(tiny_config(bnb, tmp_path / "full", 'method="full"')), "cpu")
    model, _ = build_model(resolve(tiny_config(bnb, tmp_path / "lora")), "cpu")
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _rank_run(config: str, folder: str) -> None:
    """Run on each torchrun rank (the shared launch): trains, then writes the NF4 bytes this rank
    holds and the digest of the gathered NF4 base."""
    import torch.distributed as dist

    from ember.engine.config import load_config

    t = Trainer(load_config(config, []), progress=False)
    t.run()
    held, digest = _nf4_state(t.model)
    (Path(folder) / f"rank{dist.get_rank()}.txt").write_text(f"{held} {digest}")


_EXTRA = ('model.quantize="nf4"', "optim.lr=1e-2", "eval.metrics=[]")


def _torchrun_plan(tiny, folder) -> list[dict]:
    """Trains under torchrun (_rank_run), then the run's checkpoint of step 2 is continued by two
    processes (2 -> 2)."""
    cfg2 = write_config(tiny, folder / "q2", *_EXTRA)  # the same COMMON settings, grad_accum 1
    run = folder / "q22"
    return [{"name": "q2", "call": "tests.engine.test_qlora_train:_rank_run",
             "args": [str(cfg2), str(folder)]},
            {"name": "q22", "continue_from": [str(folder / "q2"), str(run), 2],
             "args": [str(run), "--resume", *sets(f'run_dir="{run}"')]}]


def _nf4_state(model) -> tuple[int, str]:
    """(bytes of NF4 base this process holds, "<NF4 layers> <hash of all their bitsandbytes
    tensors>"). Sharded (a flat ``nf4_storage`` DTensor per layer) the hash is over the gathered
    bytes: every rank must call it."""
    h, n, held = hashlib.sha256(), 0, 0
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        n += 1
        if m.nf4_layout is None:  # its own tensors, all of them here
            w = m.quant_weight
            held += sum(v.numel() * v.element_size() for k, v in nf4_to_bnb(w).items()
                        if "quant_state" not in k)
        else:
            storage = m.nf4_storage
            local = storage.to_local() if hasattr(storage, "to_local") else storage
            held += local.numel() * local.element_size()
            full = storage.full_tensor() if hasattr(storage, "full_tensor") else storage
            w = unpack_nf4(full, m.nf4_layout)
        for k, v in sorted(nf4_to_bnb(w, name).items()):
            h.update(k.encode())
            h.update(v.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return held, f"{n} {h.hexdigest()}"


@shares_launch(_torchrun_plan)  # the two-process runs
def test_qlora_under_torchrun_matches_one_process(tiny, launched):
    """Data-parallel QLoRA (FSDP-QLoRA): 2 processes with grad_accum 1 log the losses of 1
    process with grad_accum 2 while each holds half of the NF4 base, whose gathered bytes are
    those one process quantizes; the adapter (loaded by peft too), the merged export and a
    2 -> 1 and a 2 -> 2 resume from the 2-process checkpoint agree with one process."""
    tmp_path, _ = launched
    one = Trainer(resolve(tiny_config(tiny, tmp_path / "q1", *COMMON, *_EXTRA, "grad_accum=2")),
                  echo=quiet, progress=False)
    one.run()
    total, digest = _nf4_state(one.model)
    held = []
    for r in (0, 1):
        n, got = (tmp_path / f"rank{r}.txt").read_text().split(" ", 1)
        assert got == digest, (r, got, digest)  # the bytes one process quantizes, gathered
        held.append(int(n))
    assert digest.startswith("14 ")  # 7 projections x 2 layers
    # sharded: each rank holds half of the 4-bit base (plus alignment padding), not all of it
    assert sum(held) >= total and max(held) <= 0.55 * total, (held, total)
    want = rows_of(tmp_path / "q1")
    losses = [r["loss"] for r in want if r["kind"] == "train"]
    assert len(set(losses)) == 6 and losses[-1] < losses[0]
    _same_rows(rows_of(tmp_path / "q2"), want)
    name = "final/adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "q1" / name)), load_file(str(tmp_path / "q2" / name))
    assert a.keys() == b.keys() and all("lora_" in k for k in a) and len(a) == 2 * 2 * 7
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    for n in ("q1", "q2"):
        assert cli(["export", str(tmp_path / n), "--merged", str(tmp_path / f"{n}m")]) == 0
    m1 = load_file(str(tmp_path / "q1m" / "model.safetensors"))
    m2 = load_file(str(tmp_path / "q2m" / "model.safetensors"))
    assert m1.keys() == m2.keys()
    for k in m1:  # bf16: adapters within 1e-5 round alike but for a rare tie
        torch.testing.assert_close(m2[k].float(), m1[k].float(), rtol=1e-2, atol=1e-3, msg=k)
    # the 2-process checkpoint of step 2 (DCP, sharded adapters) continued by one process
    run = tmp_path / "q21"
    continue_from(tmp_path / "q2", run, 2)
    assert cli(["train", str(run), "--resume", *sets(f'run_dir="{run}"', "grad_accum=2")]) == 0
    _same_rows(rows_of(run), want)
    # 2 -> 2 (in the shared torchrun launch): the same log, bit for bit
    assert rows_of(tmp_path / "q22", timing=False) == rows_of(tmp_path / "q2", timing=False)
    # the sharded run's adapter in peft, on the dequantized 4-bit base: the run's own logits
    peft = pytest.importorskip("peft")
    from tests.models.test_qlora_integration import TOL, _diff, _hf, _logits

    model, _, _ = load_run_model(tmp_path / "q2", "cpu")
    base = save_pretrained(load_pretrained(tiny["model"], quantize="nf4")[0],
                           tmp_path / "base", dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "q2" / "final" / "adapter")
    ids = torch.randint(3, model.cfg.vocab_size, (2, 12))
    ours = _logits(model.eval(), ids)
    assert _diff(ours, _logits(hf.eval(), ids)) <= TOL
    assert _diff(ours, _logits(_hf(base), ids)) > 100 * TOL  # the adapter matters


def test_qlora_run_counts_the_4bit_weights(tiny):
    """The run's parameter count of a 4-bit base is transformers' count of the same model (the
    packed NF4 weight is not a Parameter, and in flat storage it is bytes, not weights)."""
    import transformers

    from ember.engine.runtime import num_weights

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    want = hf.num_parameters()
    model, _ = load_pretrained(tiny["model"], "float32", quantize="nf4")
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert num_weights(model) == want
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.store_flat_()
    assert num_weights(model) == want
