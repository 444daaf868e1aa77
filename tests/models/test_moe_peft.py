"""PEFT adapters of mixture-of-experts models against peft 0.21 on transformers 5: LoRA on the
attention (both ways), LoRA on the experts (Ember -> PEFT's ``target_parameters`` on the fused
expert parameters, rank 2r for gate_up), and what PEFT cannot hold, refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter
from tests.models.test_moe import _hf_model, _ids, _load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


def _peft_logits(folder, adapter, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return pm(ids).logits


def _train_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))



def _assert_loads_like_peft(pm, folder, tmp_path) -> None:
    """The PEFT model ``pm``'s adapter, saved, loads in Ember on ``folder`` with PEFT's logits."""
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    want = _peft_logits(folder, tmp_path / "peft", ids)
    model = load_adapter(_load(folder), tmp_path / "peft")
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() <= 1e-4

@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_attention_lora_both_ways(tmp_path, case):
    """PEFT's adapter on q/v (and Qwen2-MoE's shared expert) loads in Ember with PEFT's logits;
    Ember's adapter loads in PEFT with Ember's logits."""
    hf = _hf_model(case)
    folder = tmp_path / case
    hf.save_pretrained(folder)
    targets = ["q_proj", "v_proj"] + (["shared_expert.up_proj"] if case == "qwen2_moe" else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    _assert_loads_like_peft(pm, folder, tmp_path)

    ours = apply_lora(_load(folder), LoRAConfig(rank=4, alpha=8, targets=("q", "k", "o")))
    _train_adapters(ours)
    save_adapter(ours, tmp_path / "ember")
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - _peft_logits(folder, tmp_path / "ember", ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("case,targets,rslora", [
    ("mixtral", ("q", "gate", "up", "down"), False),
    ("qwen3_moe", ("gate", "up", "down"), True),
    ("qwen2_moe_step2", ("down", "v"), False),
])
def test_expert_lora_exports_to_peft_target_parameters(tmp_path, case, targets, rslora):
    hf = _hf_model(case)
    folder = tmp_path / case
    hf.save_pretrained(folder)
    model = apply_lora(_load(folder), LoRAConfig(rank=3, alpha=5, targets=targets,
                                                 use_rslora=rslora))
    _train_adapters(model)
    save_adapter(model, tmp_path / "ember")
    config = json.loads((tmp_path / "ember" / "adapter_config.json").read_text())
    assert config["target_parameters"]
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    got = _peft_logits(folder, tmp_path / "ember", ids)
    assert (ours - got).abs().max().item() <= 1e-4
    # the adapters matter: the base model's logits are far from these
    with torch.no_grad():
        assert (_load(folder)(ids) - ours).abs().max() > 1e-2
    back = load_adapter(_load(folder), tmp_path / "ember")
    with torch.no_grad():
        assert (back(ids) - ours).abs().max().item() <= 1e-5
    # the adapters trained, exactly (gate and up came back at rank 2r with equal A's, PEFT's
    # fused gate_up, which a continued run, model.init, could not train as the run had)
    mine, theirs = lora_modules(model), lora_modules(back)
    assert sorted(mine) == sorted(theirs)
    for n, m in mine.items():
        assert (theirs[n].rank, theirs[n].scale) == (m.rank, m.scale), n
        assert torch.equal(theirs[n].lora_A, m.lora_A) and torch.equal(theirs[n].lora_B, m.lora_B)


@pytest.mark.parametrize("case,params", [
    ("mixtral", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    ("qwen3_moe", ["mlp.experts.down_proj"]),
])
def test_peft_expert_adapter_loads_with_peft_logits(tmp_path, case, params):
    """An adapter PEFT made with target_parameters on the fused experts (and q_proj) loads in
    Ember with PEFT's logits."""
    hf = _hf_model(case)
    folder = tmp_path / case
    hf.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=params,
            rank_pattern={"down_proj": 3}, init_lora_weights=False))
    _assert_loads_like_peft(pm, folder, tmp_path)


@pytest.mark.parametrize("targets,needle", [
    (("layers.1.mlp.experts.0.gate_proj", "layers.1.mlp.experts.0.up_proj"), "of its"),
    (("gate",), "gate and up"),
    # PEFT on transformers 5 would put a dense layer's down_proj adapter on the experts
    (("layers.0.mlp.down_proj",), "dense MLP"),
])
def test_expert_lora_peft_cannot_hold_is_refused(tmp_path, targets, needle):
    hf = _hf_model("qwen3_moe_norm_dense0" if "layers.0.mlp.down_proj" in targets else "mixtral")
    hf.save_pretrained(tmp_path / "m")
    model = apply_lora(_load(tmp_path / "m"), LoRAConfig(rank=2, alpha=4, targets=targets))
    with pytest.raises(EmberError, match=needle):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_config_patterns_do_not_reach_split_experts(tmp_path):
    """alpha_pattern {"gate_proj": 3} is for Qwen2-MoE's shared expert (PEFT never matches it
    against experts.gate_up_proj); it also matched the per-expert gate_proj Ember splits the
    experts into, ahead of their own entry: gate scaled by 3 / r instead of 6 / r (logits off
    by ~0.7)."""
    hf = _hf_model("qwen2_moe")
    hf.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=["q_proj", "gate_proj"],
            target_parameters=["mlp.experts.gate_up_proj"], alpha_pattern={"gate_proj": 3},
            init_lora_weights=False))
    _assert_loads_like_peft(pm, tmp_path / "m", tmp_path)


def test_router_parameter_patterns_by_parameter_name(tmp_path):
    """PEFT's LoRA on a router through target_parameters ("gate.weight", as its all-linear does
    on Mixtral) looks rank and alpha up by the parameter's name: Ember looked them up by the
    module's ("...mlp.gate"), refusing rank_pattern {"gate.weight": 3} and taking alpha 5 from
    {"gate": 5}, a pattern PEFT never applies there."""
    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=["gate.weight"],
            rank_pattern={"gate.weight": 3}, alpha_pattern={"gate": 5, "gate.weight": 16},
            init_lora_weights=False))
    _assert_loads_like_peft(pm, tmp_path / "m", tmp_path)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_router_adapters_round_trip(tmp_path, case):
    """PEFT's all-linear on Mixtral / Qwen3-MoE adapts the routers through target_parameters
    ("gate.weight"); Ember loaded such an adapter but refused to save it (nor any LoRA on a
    router: "PEFT cannot wrap them"), so it could not be trained on. It now saves as PEFT's
    target_parameters and loads back in PEFT with PEFT's logits; with dropout it is refused."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=2, lora_alpha=6, target_modules="all-linear", rank_pattern={"gate.weight": 3},
            init_lora_weights=False))
    _assert_loads_like_peft(pm, tmp_path / "m", tmp_path)
    model = load_adapter(_load(tmp_path / "m"), tmp_path / "peft")
    save_adapter(model, tmp_path / "ember")
    ids = _ids()
    want = _peft_logits(tmp_path / "m", tmp_path / "peft", ids)
    assert (_peft_logits(tmp_path / "m", tmp_path / "ember", ids) - want).abs().max() <= 1e-4
    ours = apply_lora(_load(tmp_path / "m"),
                      LoRAConfig(rank=2, alpha=4, dropout=0.1, targets=("layers.1.mlp.gate",)))
    with pytest.raises(EmberError, match="router layers.1.mlp.gate with DoRA or dropout"):
        save_adapter(ours, tmp_path / "drop")
    # a preference run turns the dropout off (disable_dropout) but the adapter is still one with
    # lora_dropout 0.1, which PEFT's LoRA on parameters refuses: still refused
    from ember.models.dropout import disable_dropout_

    assert disable_dropout_(ours) == ["LoRA dropout 0.1"]
    with pytest.raises(EmberError, match="router layers.1.mlp.gate with DoRA or dropout"):
        save_adapter(ours, tmp_path / "drop")


@pytest.mark.parametrize("targets", [["w1", "w2", "w3", "gate"], "all-linear"])
def test_transformers_4_mixtral_adapter_loads_with_peft_logits(tmp_path, targets):
    """A Mixtral adapter made on transformers 4 names the experts' modules
    ``block_sparse_moe.experts.E.w1`` / ``w3`` / ``w2`` and the router ``block_sparse_moe.gate``
    (then an nn.Linear: targeted by name or by all-linear, as in many Hub adapters); PEFT 0.21
    converts it onto transformers 5's experts and router. Ember refused its keys ("match no
    projection"), then its router under all-linear ("PEFT would drop them": it does not); it now
    loads with PEFT's logits and saves back in PEFT 0.21's format."""
    from safetensors.torch import save_file

    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "m")
    c, g, sd = hf.config, torch.Generator().manual_seed(0), {}
    D, F = c.hidden_size, c.intermediate_size
    for i in range(c.num_hidden_layers):
        mods = {f"block_sparse_moe.experts.{e}.{n}": (F, D) if n == "w2" else (D, F)
                for e in range(c.num_local_experts) for n in ("w1", "w2", "w3")}
        mods["block_sparse_moe.gate"] = (D, c.num_local_experts)
        if targets == "all-linear":
            mods.update({f"self_attn.{n}_proj": tuple(reversed(p.shape)) for n in "qkvo"
                         for p in [getattr(hf.model.layers[i].self_attn, f"{n}_proj").weight]})
        for name, (fin, fout) in mods.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            sd[f"{key}.lora_A.weight"] = 0.3 * torch.randn(2, fin, generator=g)
            sd[f"{key}.lora_B.weight"] = 0.3 * torch.randn(fout, 2, generator=g)
    (tmp_path / "v4").mkdir()
    save_file(sd, tmp_path / "v4" / "adapter_model.safetensors")
    (tmp_path / "v4" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
         "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}))
    ids = _ids()
    want = _peft_logits(tmp_path / "m", tmp_path / "v4", ids)
    model = load_adapter(_load(tmp_path / "m"), tmp_path / "v4")
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() <= 1e-4
        assert (_load(tmp_path / "m")(ids) - want).abs().max().item() > 1e-1  # it matters
    save_adapter(model, tmp_path / "ember")
    assert (_peft_logits(tmp_path / "m", tmp_path / "ember", ids) - want).abs().max() <= 1e-4


def test_literal_all_linear_config_covers_the_shared_expert_gate(tmp_path):
    """PEFT's all-linear on Qwen2-MoE adapts ``mlp.shared_expert_gate`` (an nn.Linear to one
    output); an adapter_config that keeps the literal "all-linear" (PEFT applies it as such)
    made Ember refuse those weights ("PEFT would drop them"); it loads with PEFT's logits."""
    hf = _hf_model("qwen2_moe")
    hf.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear",
                                                     init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": "all-linear"}))
    ids = _ids()
    want = _peft_logits(tmp_path / "m", tmp_path / "peft", ids)
    model = load_adapter(_load(tmp_path / "m"), tmp_path / "peft")
    assert any(n.endswith("mlp.shared_expert_gate.lora_A") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() <= 1e-4
