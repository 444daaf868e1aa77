"""QLoRA on the real path, with transformers + bitsandbytes + PEFT as the oracles: a
bitsandbytes NF4 checkpoint loads through load_pretrained with bnb's logits; Ember saves quantized
models in bnb's format (and dequantized on request) that transformers loads with the same logits;
an adapter trained over an NF4 base loads in PEFT on the dequantized transformers model, and the
merged export matches; the fused LoRA blocks in the decoder equal the per-projection path."""

from __future__ import annotations

import functools
import json
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import ember.models.lora_layer as lora_layer_mod
import ember.models.transformer as transformer_mod
from ember import EmberError
from ember.kernels import lora_linear, lora_mlp, lora_qkv
from ember.models.config import ModelConfig
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import LoRAConfig, apply_lora, lora_modules, merge_lora, save_adapter
from ember.models.nf4 import Linear4bit, quantize_model_
from ember.models.transformer import Transformer
from tests.numerics import assert_close_to_ref

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TOL = 1e-4  # fp32 logits against transformers (issue 2's parity bound)
HF_CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """transformers sets norms to 1: randomize them too, so a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Dense fp32 tiny Llamas (untied, tied) and transformers' own bnb NF4 save of the first."""
    root = tmp_path_factory.mktemp("qlora")
    dense, tied, bnb = root / "dense", root / "tied", root / "bnb"
    _randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CFG)), 0) \
        .save_pretrained(dense)
    _randomized(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**HF_CFG, tie_word_embeddings=True)), 1).save_pretrained(tied)
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_bnb = transformers.LlamaForCausalLM.from_pretrained(
            dense, quantization_config=qcfg, device_map="cpu")
    hf_bnb.save_pretrained(bnb)
    return {"root": root, "dense": dense, "tied": tied, "bnb": bnb, "hf_bnb": hf_bnb.eval()}


def _ids(seed=0):
    return torch.randint(0, HF_CFG["vocab_size"], (2, 9),
                         generator=torch.Generator().manual_seed(seed))


def _hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu").eval()


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _nf4_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))


# ------------------------------------------------------------------ bnb checkpoints in and out
def test_bnb_checkpoint_loads_directly_with_bnb_logits(ckpts):
    model, _ = load_pretrained(ckpts["bnb"])
    assert len(_nf4_names(model)) == 14 and type(model.lm_head) is nn.Linear
    ids = _ids()
    ours = _logits(model, ids)
    assert _diff(ours, _logits(ckpts["hf_bnb"], ids)) <= TOL
    # transformers' bnb quantization is Ember's, bit for bit: quantize-while-loading agrees.
    requant, _ = load_pretrained(ckpts["dense"], quantize="nf4")
    assert torch.equal(_logits(requant, ids), ours)
    # dtype casts the dense tensors; the 4-bit data stays as stored.
    half, _ = load_pretrained(ckpts["bnb"], dtype="bfloat16")
    assert half.embed.weight.dtype == torch.bfloat16 and half.cfg.torch_dtype == "float32"
    q0, q1 = model.layers[0].mlp.up_proj.quant_weight, half.layers[0].mlp.up_proj.quant_weight
    assert torch.equal(q0.packed, q1.packed) and torch.equal(q0.state.absmax, q1.state.absmax)


def test_quantized_model_saves_bnb_format_that_transformers_loads(ckpts, tmp_path):
    model, _ = load_pretrained(ckpts["dense"], quantize="nf4")
    out = save_pretrained(model, tmp_path / "q")
    ours, theirs = load_file(out / "model.safetensors"), load_file(ckpts["bnb"] /
                                                                    "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "not bnb's bytes"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((ckpts["bnb"] / "config.json").read_text())["quantization_config"]
    ids = _ids(1)
    assert _diff(_logits(_hf(out), ids), _logits(model, ids)) <= TOL

    # Tied embeddings and a linear kept dense: llm_int8_skip_modules tells transformers so.
    tied, _ = load_pretrained(ckpts["tied"])
    quantize_model_(tied, skip=("layers.1.attn.o_proj",))
    out = save_pretrained(tied, tmp_path / "tied")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    hf = _hf(out)
    assert type(hf.model.layers[1].self_attn.o_proj) is nn.Linear
    assert _diff(_logits(hf, ids), _logits(tied, ids)) <= TOL
    back, _ = load_pretrained(out)
    assert _nf4_names(back) == _nf4_names(tied) and len(_nf4_names(back)) == 13
    assert torch.equal(_logits(back, ids), _logits(tied, ids))


def test_quantized_output_head_round_trips_through_transformers(ckpts, tmp_path):
    """lm_head in 4-bit too (llm_int8_skip_modules=[]): Ember loads it back as a dense head,
    since logits() and the fused loss take the (V, D) matrix."""
    model, _ = load_pretrained(ckpts["dense"])
    quantize_model_(model, skip=())
    out = save_pretrained(model, tmp_path / "all4bit")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == []
    hf = _hf(out)
    assert type(hf.lm_head) is not nn.Linear  # bnb's Linear4bit
    back, _ = load_pretrained(out)
    assert type(back.lm_head) is nn.Linear and len(_nf4_names(back)) == 14
    assert torch.equal(back.lm_head.weight, model.lm_head.quant_weight.dequantize())
    ids = _ids(5)
    assert _diff(_logits(back, ids), _logits(hf, ids)) <= TOL
    # the in-memory model with its 4-bit head computes too, the same logits (was: AttributeError
    # 'output_weight', the head read as a dense matrix)
    assert torch.equal(_logits(model, ids), _logits(back, ids))


def test_dequantized_save_is_a_plain_model(ckpts, tmp_path):
    model, _ = load_pretrained(ckpts["bnb"])
    out = save_pretrained(model, tmp_path / "fp32", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    ids = _ids(2)
    assert _diff(_logits(_hf(out), ids), _logits(model, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "bf16", dtype="bfloat16", dequantize=True)
    sd = load_file(out / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    w = model.layers[1].attn.k_proj.quant_weight.dequantize(torch.bfloat16)
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"], w)


def test_quant_storage_dtype_loads(ckpts, tmp_path):
    """bnb_4bit_quant_storage=bfloat16 stores the packed bytes as bf16 (half as many rows)."""
    folder = tmp_path / "bf16_storage"
    shutil.copytree(ckpts["bnb"], folder)
    sd = load_file(folder / "model.safetensors")
    for k in [k for k in sd if k + ".absmax" in sd]:
        sd[k] = sd[k].reshape(-1, 2).view(torch.bfloat16)  # (n/4, 1), as bnb stores it
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    ids = _ids(3)
    assert torch.equal(_logits(load_pretrained(folder)[0], ids),
                       _logits(load_pretrained(ckpts["bnb"])[0], ids))


_Q = "model.layers.0.self_attn.q_proj.weight"


def _edit_json(sd, **change):
    """Change (None: drop) fields of q_proj's JSON quant state."""
    key = _Q + ".quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _edited(ckpts, tmp_path, qc_change=None, weights=None, config_change=None):
    folder = tmp_path / "edited"
    shutil.copytree(ckpts["bnb"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(qc_change or {})
    config.update(config_change or {})
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        sd = load_file(folder / "model.safetensors")
        weights(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("edit,needle", [
    (dict(qc_change={"bnb_4bit_quant_type": "int4"}), "bnb_4bit_quant_type"),
    (dict(qc_change={"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True}),
     "but the checkpoint holds 4-bit entries"),
    (dict(qc_change={"quant_method": "gptq"}), "quant_method"),
    (dict(config_change={"intermediate_size": 80}), "model.layers.0.mlp.down_proj.weight"),
    (dict(weights=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight.absmax")),
     "model.layers.1.mlp.up_proj.weight"),
    (dict(weights=lambda sd: sd.pop("model.layers.0.self_attn.q_proj.weight")),
     "model.layers.0.self_attn.q_proj.weight"),
    (dict(config_change={"quantization_config": None}), "quantization_config"),
    # quant states named FP4 holding NF4's JSON (was: StopIteration from the dtype count)
    (dict(weights=lambda sd: sd.update({k.replace("__nf4", "__fp4"): sd.pop(k)
                                        for k in [k for k in sd if k.endswith("__nf4")]})),
     "its JSON says quant_type 'nf4'"),
    (dict(weights=lambda sd: sd.update({k.replace("__nf4", "__int4"): sd.pop(k)
                                        for k in [k for k in sd if k.endswith("__nf4")]})),
     "not a bitsandbytes 4-bit quant state"),
    # entries that do not fit their quant state (were: garbage weights, or IndexError /
    # RuntimeError / KeyError from deep inside)
    (dict(weights=lambda sd: _edit_json(sd, blocksize=128)),
     "weight in 4-bit blocks of 128 needs 32 uint8"),
    (dict(weights=lambda sd: _edit_json(sd, nested_offset=None)),
     "double-quantized but its quant state has no nested_offset"),
    (dict(weights=lambda sd: _edit_json(sd, dtype=None)), "the quant state lacks dtype"),
    # int8 / float64 are only for packed 4-bit weights (bnb_4bit_quant_storage)
    (dict(weights=lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].double()})),
     "tensor model.norm.weight has dtype F64"),
    (dict(weights=lambda sd: sd.update({_Q + ".quant_map": sd[_Q + ".quant_map"][:15]})),
     "q_proj.weight.quant_map is float32 with 15 values"),
])
def test_bad_bnb_checkpoints_name_the_problem(ckpts, tmp_path, edit, needle):
    folder = _edited(ckpts, tmp_path, **edit)
    with pytest.raises(EmberError, match=needle.replace(".", r"\.")):
        load_pretrained(folder)


def test_bnb_config_without_quant_method_loads_as_transformers_does(ckpts, tmp_path):
    """A quantization_config with load_in_4bit but no quant_method (written before transformers
    had one) is bitsandbytes to transformers' AutoQuantizationConfig: it loads (was: refused as
    quant_method=None)."""
    folder = _edited(ckpts, tmp_path, qc_change={"_load_in_4bit": None, "_load_in_8bit": None})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {k: v for k, v in config["quantization_config"].items()
                                     if v is not None and k != "quant_method"}
    (folder / "config.json").write_text(json.dumps(config))
    ids = _ids(6)
    theirs = _logits(_hf(folder), ids)
    assert torch.equal(theirs, _logits(ckpts["hf_bnb"], ids))
    assert _diff(_logits(load_pretrained(folder)[0], ids), theirs) <= TOL


# ------------------------------------------------------------------------ QLoRA export to PEFT
def test_qlora_adapter_loads_in_peft_on_the_dequantized_model(ckpts, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = load_pretrained(ckpts["dense"], quantize="nf4")
    base_dir = save_pretrained(model, tmp_path / "base", dequantize=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    # One training step, so the adapter is a trained one (through the fused blocks).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids(4)
    nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    ours = _logits(model, ids)
    adapter = save_adapter(model, tmp_path / "adapter")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(_hf(base_dir), adapter).eval()
    theirs = _logits(hf, ids)
    assert _diff(ours, theirs) <= TOL and _diff(ours, _logits(_hf(base_dir), ids)) > 100 * TOL

    merge_lora(model)
    assert not _nf4_names(model) and not lora_modules(model)
    assert _diff(_logits(model, ids), ours) <= TOL
    merged = save_pretrained(model, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert _diff(_logits(_hf(merged), ids), theirs) <= TOL


# ------------------------------------------------------------------ fused LoRA blocks in the model
def _counting(monkeypatch, device):
    """Count the fused calls; on CPU run every LoRA op through its Triton path (interpreter)."""
    calls = {"lora_qkv": 0, "lora_mlp": 0}
    impl = "triton" if device == "cpu" else None

    def wrap(name, fn):
        def run(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kw, impl=impl)
        return run

    monkeypatch.setattr(transformer_mod, "lora_qkv", wrap("lora_qkv", lora_qkv))
    monkeypatch.setattr(transformer_mod, "lora_mlp", wrap("lora_mlp", lora_mlp))
    monkeypatch.setattr(lora_layer_mod, "lora_linear", functools.partial(lora_linear, impl=impl))
    return calls


def _tiny(device, *, nf4: bool, targets=("q", "k", "v", "o", "gate", "up", "down"),
          dropout=0.0, bias=True):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, attention_bias=bias, mlp_bias=bias)
    model = Transformer(cfg).init_weights(std=0.1, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    if nf4:
        quantize_model_(model)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout, targets=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    return model.to(device)


def _run(model, ids):
    for p in model.parameters():
        p.grad = None
    logits = model(ids)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fused_blocks_match_the_per_projection_path(monkeypatch, device, nf4):
    calls = _counting(monkeypatch, device)
    model = _tiny(device, nf4=nf4)
    ids = _ids().remainder(64).to(device)
    fused, fused_grads = _run(model, ids)
    assert calls == {"lora_qkv": 2, "lora_mlp": 2}
    ref, ref_grads = _run(model.set_fused_lora(False), ids)
    assert calls == {"lora_qkv": 2, "lora_mlp": 2}
    assert len(ref_grads) == 28  # A and B of 7 projections x 2 layers
    # Same math reassociated: held to the fp32 floor of the shared numerics rule.
    assert_close_to_ref("logits", fused, ref, ref)
    for name, grad in fused_grads.items():
        assert_close_to_ref(name, grad, ref_grads[name], ref_grads[name])


def test_fused_blocks_only_where_they_compute_the_same(monkeypatch, device):
    calls = _counting(monkeypatch, device)
    ids = _ids().remainder(64).to(device)
    _run(_tiny(device, nf4=False, targets=("q", "k", "gate", "up"), bias=False), ids)
    assert calls == {"lora_qkv": 0, "lora_mlp": 0}  # partial targets: per projection
    model = _tiny(device, nf4=False, dropout=0.1, bias=False)
    _run(model.train(), ids)
    assert calls == {"lora_qkv": 0, "lora_mlp": 0}  # one dropout mask per projection, as PEFT
    with torch.no_grad():
        model.eval()(ids)
    assert calls == {"lora_qkv": 2, "lora_mlp": 2}  # no dropout at eval: fused


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_gpu_fused_blocks_bf16(nf4):
    """bf16 on the GPU kernels: fused vs per-projection, both against the per-projection path in
    fp32 on the same (bf16-rounded) weights, by the shared numerics rule."""
    model = _tiny("cuda", nf4=False).to(torch.bfloat16)
    if nf4:
        quantize_model_(model)  # the bf16 bases under the adapters
    ids = _ids().remainder(64).cuda()
    fused, fused_grads = _run(model, ids)
    ref, ref_grads = _run(model.set_fused_lora(False), ids)
    ref32, ref32_grads = _run(model.float(), ids)
    assert_close_to_ref("logits", fused, ref, ref32)
    for name, grad in fused_grads.items():
        assert_close_to_ref(name, grad, ref_grads[name], ref32_grads[name])
