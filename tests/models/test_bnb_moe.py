"""bitsandbytes 4-bit checkpoints of mixture-of-experts models, with transformers + bitsandbytes as
the oracle. transformers 5 holds the experts as 3-D parameters, which bitsandbytes leaves dense:
its 4-bit MoE checkpoints store NF4 attention (and Qwen2-MoE's shared expert and its gate) and
dense experts. Ember loads them (was: refused), and writes NF4 MoE models in that layout (was: NF4
experts, which transformers cannot load)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from ember.models.loading import load_pretrained, save_pretrained
from ember.models.nf4 import Linear4bit
from tests.models.test_bnb_variants import _bnb_folder, _ids
from tests.models.test_qlora_integration import TOL, _diff, _hf, _logits, _randomized

transformers = pytest.importorskip("transformers")
bnbf = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(family: str) -> nn.Module:
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2)
        return _randomized(transformers.MixtralForCausalLM(cfg), 11)
    if family == "qwen3_moe":  # layer 0 a dense MLP (mlp_only_layers): bnb quantizes it
        cfg = transformers.Qwen3MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, head_dim=16,
                                          mlp_only_layers=[0])
        return _randomized(transformers.Qwen3MoeForCausalLM(cfg), 13)
    cfg = transformers.Qwen2MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48)
    return _randomized(transformers.Qwen2MoeForCausalLM(cfg), 12)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_transformers_moe_checkpoint_loads_and_saves_back(tmp_path, family):
    folder, hf = _bnb_folder(tmp_path, _model(family), True)
    model, _ = load_pretrained(folder)
    layer, hf_layer = model.layers[1], hf.model.layers[1]
    assert isinstance(layer.attn.v_proj, Linear4bit)
    w = hf_layer.self_attn.v_proj.weight
    assert torch.equal(layer.attn.v_proj.quant_weight.dequantize(),
                       bnbf.dequantize_4bit(w.data, w.quant_state))
    assert type(layer.mlp.experts[0].down_proj) is nn.Linear  # dense, as stored
    ids = _ids(96, 5)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _diff(_logits(_hf(out), ids), _logits(hf, ids)) <= TOL


def test_nf4_moe_saves_what_transformers_loads(tmp_path):
    """quantize="nf4" quantizes the experts too; the bnb folder holds them dequantized."""
    dense = tmp_path / "dense"
    _model("mixtral").save_pretrained(dense)
    model, _ = load_pretrained(dense, quantize="nf4")
    assert isinstance(model.layers[0].mlp.experts[3].up_proj, Linear4bit)
    out = save_pretrained(model, tmp_path / "ember")
    sd = load_file(out / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    assert torch.equal(sd[key], model.layers[0].mlp.experts[3].up_proj.quant_weight.dequantize())
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in sd
    ids = _ids(96, 6)
    assert _diff(_logits(_hf(out), ids), _logits(model, ids)) <= TOL


def test_a_bnb_checkpoint_with_3d_expert_stacks_loads(tmp_path):
    """The dense experts of a 4-bit MoE checkpoint stored as transformers 5's 3-D stacks (as a
    state dict holds them: mlp.experts.gate_up_proj / down_proj, the router as mlp.gate) load
    with transformers' logits (the stacks were skipped, leaving the experts unloaded)."""
    from safetensors.torch import save_file

    folder, hf = _bnb_folder(tmp_path, _model("mixtral"), True)
    sd = load_file(folder / "model.safetensors")
    for i in range(BASE["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe."
        w = [[sd.pop(f"{p}experts.{e}.w{j}.weight") for j in (1, 3, 2)] for e in range(4)]
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w1, w3]) for w1, w3, _ in w])
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([w2 for *_, w2 in w])
        sd[f"model.layers.{i}.mlp.gate.weight"] = sd.pop(f"{p}gate.weight")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_pretrained(folder)
    ids = _ids(96, 5)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL


def test_transformers_4_checkpoint_with_nf4_experts_and_router(tmp_path):
    """transformers 4 held Mixtral's experts and router as nn.Linear, so its 4-bit checkpoints
    store them NF4 too. Ember loads them with the dequantized weights' logits (bitsandbytes'
    dequantize_4bit as the oracle), and its save_pretrained writes the experts and the router
    dense, as transformers 5 loads them (was: the router stayed 4-bit, a (128, 1) uint8 tensor
    that transformers refused as a size mismatch)."""
    from safetensors.torch import save_file

    folder, hf = _bnb_folder(tmp_path, _model("mixtral"), True)
    sd = load_file(folder / "model.safetensors")
    dense = {}
    for k in [k for k in sd if ".block_sparse_moe." in k and k.endswith(".weight")]:
        q, state = bnbf.quantize_4bit(sd[k], blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
        sd[k], dense[k] = q, bnbf.dequantize_4bit(q, state)
        sd.update({f"{k}.{name}": v for name, v in state.as_dict(packed=True).items()})
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():  # the oracle: transformers' model with those dequantized weights
        for i, layer in enumerate(hf.model.layers):
            p = f"model.layers.{i}.block_sparse_moe."
            layer.mlp.gate.weight.copy_(dense[f"{p}gate.weight"])
            for e in range(4):
                w1, w3, w2 = (dense[f"{p}experts.{e}.w{j}.weight"] for j in (1, 3, 2))
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat([w1, w3]))
                layer.mlp.experts.down_proj[e].copy_(w2)
    model, _ = load_pretrained(folder)
    assert isinstance(model.layers[0].mlp.gate, Linear4bit)
    ids = _ids(96, 5)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    saved = load_file(out / "model.safetensors")
    assert saved["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in saved  # attention stays 4-bit
    assert _diff(_logits(_hf(out), ids), _logits(model, ids)) <= TOL
