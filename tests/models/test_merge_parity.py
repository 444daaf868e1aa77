"""``ember export RUN --merged OUT`` against PEFT's ``merge_and_unload()`` + ``save_pretrained``
on the same base and adapter: the merged weights bit for bit (bf16 / fp16 bases too), the base's
dtype in config.json; for a QLoRA run, bitsandbytes' dequantized NF4 base plus PEFT's update, as
PEFT's 4-bit merge computes it before re-quantizing."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember.engine.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 96


def _base(folder, dtype: torch.dtype, seed: int = 0, cls: str = "LlamaConfig", **kw):
    """A tiny random Llama (or ``cls``) saved in ``dtype``."""
    config = getattr(transformers, cls)(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, rms_norm_eps=1e-5, **kw)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1 if "norm" in n else 0) + 0.1 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(folder)
    return folder


def _adapter(base, out, **lora_kw):
    """A PEFT adapter on ``base`` with every adapter tensor random (as trained)."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     **lora_kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn_like(p))
        pm.save_pretrained(out)
    return out


def _export(base, adapter, tmp_path, *, quantize: str | None = None, double_quant: bool = True):
    """A run directory whose final adapter is ``adapter``, exported with ``--merged``."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    shutil.copytree(adapter, run / "final" / "adapter")
    q = (f'model.quantize = "{quantize}"\nmodel.double_quant = {str(double_quant).lower()}\n'
         if quantize else "")
    (run / "config.toml").write_text(f'model.name = "{base}"\n{q}run_dir = "{run}"\n'
                                     f'device = "cpu"\nprecision = "fp32"\nmethod = "lora"\n'
                                     f'[data]\ntrain = ["unused.jsonl"]\n')
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(out)]) == 0
    return out


@pytest.mark.parametrize("dtype,kw", [
    # the embedding's update is rounded to bf16 / fp16 before PEFT adds it (was: added in fp32,
    # 1 in 4 embedding values half a unit in the last place off PEFT's)
    (torch.bfloat16, dict(target_modules=["q_proj", "embed_tokens", "lm_head"])),
    (torch.float16, dict(target_modules=["v_proj", "embed_tokens"])),
    (torch.bfloat16, dict(target_modules="all-linear", use_rslora=True)),
    (torch.bfloat16, dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    # MoE experts (PEFT's target_parameters): the update rounded to bf16 first, as PEFT's
    # ParamWrapper.merge (was: added in fp32, 1 in 4 expert weights a bf16 rounding off)
    (torch.bfloat16, dict(target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          base=dict(cls="MixtralConfig", num_local_experts=3,
                                    num_experts_per_tok=2))),
])
def test_merged_export_is_peft_merge_and_unload_bit_for_bit(tmp_path, dtype, kw):
    kw = dict(kw)
    base = _base(tmp_path / "base", dtype, **kw.pop("base", {}))
    adapter = _adapter(base, tmp_path / "adapter", **kw)
    out = _export(base, adapter, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
        peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload().save_pretrained(
            tmp_path / "peft")
    ours, theirs = load_file(out / "model.safetensors"), load_file(
        tmp_path / "peft" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    bad = [k for k in theirs if ours[k].dtype != theirs[k].dtype
           or not torch.equal(ours[k], theirs[k])]
    assert not bad, bad
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert cfg["tie_word_embeddings"] is False


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_merged_export_is_bnb_dequantized_base_plus_peft_update(tmp_path, double_quant):
    """PEFT's merge onto a bitsandbytes 4-bit layer is ``dequantize_4bit(W) + delta`` (then
    re-quantized); Ember writes that sum in bf16. bitsandbytes dequantizes a bf16 base to bf16
    (was: Ember dequantized to fp32, 1 in 4 merged values a bf16 rounding off)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_bnb_weight

    base = _base(tmp_path / "base", torch.bfloat16)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    out = _export(base, adapter, tmp_path, quantize="nf4", double_quant=double_quant)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.bfloat16,
                                        bnb_4bit_use_double_quant=double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=q)
        pm = peft.PeftModel.from_pretrained(hf, adapter)
    ours = load_file(out / "model.safetensors")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    merged = 0
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), bnb.nn.Linear4bit):
            w = m.get_base_layer().weight
            with torch.no_grad():
                want = dequantize_bnb_weight(w, state=w.quant_state) + m.get_delta_weight("default")
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(ours[key], want.to(torch.bfloat16)), key
            merged += 1
    assert merged == 4


def test_tied_model_with_its_embedding_adapted_alone_exports_untied(tmp_path):
    """PEFT without ensure_weight_tying, embed_tokens targeted on a tied model: the adapted model
    embeds with the update and keeps the base matrix as its head. PEFT's merge adds the update to
    the one shared matrix (the head changes too: its merged logits are not the adapter's); Ember
    writes the model untied, the embedding PEFT's merged one bit for bit, the head the base's, and
    transformers loads it with PEFT's (unmerged) logits (was refused)."""
    base = _base(tmp_path / "base", torch.float32, tie_word_embeddings=True)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    out = _export(base, adapter, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
        with torch.no_grad():
            ref = pm(ids).logits
        embed = pm.merge_and_unload().model.embed_tokens.weight.detach()
        ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        got = ours(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    saved, stored = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(saved["model.embed_tokens.weight"], embed)
    assert torch.equal(saved["lm_head.weight"], stored["model.embed_tokens.weight"])
