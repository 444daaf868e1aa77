"""LoRA: wrapping, freezing, PEFT's adapter format (PEFT itself is the oracle), merging."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.models.loading import load_hf_folder, save_pretrained
from ember.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    base_state_dict,
    load_adapter,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-5


def _hf_config():
    return transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config())
    with torch.no_grad():  # non-trivial norms so a misplaced weight cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


def _hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _ember_model(hf_dir):
    return load_hf_folder(hf_dir, torch.float32).eval()


def _ids(seed=1):
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_apply_lora_freezes_base_and_starts_as_identity(hf_dir):
    model = _ember_model(hf_dir)
    ids = _ids()
    before = model(ids)
    orig_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert torch.equal(model(ids), before)  # B = 0 at init: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 7 * 2
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad}
    sd = model.state_dict()
    assert "layers.0.attn.q_proj.base.weight" in sd and "layers.1.mlp.down_proj.lora_B" in sd
    assert sd["layers.0.attn.q_proj.lora_A"].shape == (4, 48)
    assert set(base_state_dict(model)) == orig_keys
    # Gradients reach the adapters only.
    _randomize(model)
    model(ids).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_dropout_only_in_training(hf_dir):
    model = _ember_model(hf_dir)
    apply_lora(model, LoRAConfig(rank=2, dropout=0.5, targets=("v",)))
    _randomize(model)
    ids = _ids()
    model.train()
    torch.manual_seed(0)
    a = model(ids)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_target_resolution(hf_dir):
    def wrapped(targets):
        m = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=2, targets=targets))
        return sorted(lora_modules(m))

    assert wrapped(("q", "down")) == ["layers.0.attn.q_proj", "layers.0.mlp.down_proj",
                                      "layers.1.attn.q_proj", "layers.1.mlp.down_proj"]
    assert wrapped(("layers.1.mlp.*",)) == ["layers.1.mlp.down_proj", "layers.1.mlp.gate_proj",
                                             "layers.1.mlp.up_proj"]
    assert wrapped((r"layers\.0\.attn\.[qv]_proj",)) == ["layers.0.attn.q_proj",
                                                         "layers.0.attn.v_proj"]
    assert len(wrapped("all-linear")) == 14
    with pytest.raises(EmberError, match=r"\['qq', 'layers\.9\.\*'\] match no linear module"):
        wrapped(("q", "qq", "layers.9.*"))
    # the embedding and head take LoRA by name (tests/models/test_lora_embed_head.py)
    assert wrapped(("lm_head", "embed_tokens")) == ["embed", "lm_head"]
    model = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=2))
    with pytest.raises(EmberError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    for bad in (dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(init="xavier"),
                dict(targets=())):
        with pytest.raises(EmberError):
            LoRAConfig(**bad)


@pytest.mark.parametrize("targets,rslora", [(("q", "k", "v", "o", "gate", "up", "down"), False),
                                            (("layers.1.*", "layers.0.attn.k_proj"), True)])
def test_saved_adapter_loads_in_peft_with_same_logits(hf_dir, tmp_path, targets, rslora):
    model = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=4, alpha=8.0, targets=targets,
                                                        use_rslora=rslora))
    _randomize(model)
    ids = _ids()
    ours = model(ids)
    save_adapter(model, tmp_path, base_model_name_or_path=str(hf_dir))
    peft_model = peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert _max_diff(ours, theirs) <= TOL
    base = _hf_model(hf_dir)
    with torch.no_grad():
        assert _max_diff(base(ids).logits, theirs) > 1e-3  # the adapter really changed something
    # Same files as PEFT writes for the same adapter: same keys, same config fields.
    n_wrapped = len(lora_modules(model))
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 2 * n_wrapped
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    ref_dir = tmp_path / "peft_ref"
    peft_model.save_pretrained(ref_dir)
    assert set(load_file(ref_dir / "adapter_model.safetensors")) == keys
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ref_cfg = json.loads((ref_dir / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(ref_cfg)
    for k in ("peft_type", "r", "lora_alpha", "task_type", "bias", "use_rslora", "fan_in_fan_out",
              "base_model_name_or_path", "lora_dropout"):
        assert ours_cfg[k] == ref_cfg[k], k
    t_ours, t_ref = ours_cfg["target_modules"], ref_cfg["target_modules"]
    assert (set(t_ours) == set(t_ref)) if isinstance(t_ref, list) else t_ours == t_ref
    # And back into ember.
    again = load_adapter(_ember_model(hf_dir), tmp_path)
    assert sorted(lora_modules(again)) == sorted(lora_modules(model))
    assert torch.equal(again(ids), ours)


def test_peft_adapter_loads_in_ember(hf_dir, tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4},
                          task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(_hf_model(hf_dir), cfg).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(tmp_path / "a")
    ids = _ids(2)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    model = load_adapter(_ember_model(hf_dir), tmp_path / "a")
    mods = lora_modules(model)
    assert len(mods) == 6 and mods["layers.0.mlp.down_proj"].rank == 2
    assert mods["layers.1.attn.v_proj"].scale == 4 / 4 and mods["layers.1.attn.q_proj"].scale == 4
    assert _max_diff(model(ids), theirs) <= TOL
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        lora_state_dict(model))
    # Back out through ember (per-module ranks/alphas become rank_pattern/alpha_pattern) into PEFT.
    save_adapter(model, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path / "b").eval()
    with torch.no_grad():
        assert _max_diff(again(ids).logits, theirs) <= TOL
    # Loading into an already-wrapped model overwrites the adapter weights (resume).
    _randomize(model, seed=9)
    load_adapter(model, tmp_path / "a")
    assert _max_diff(model(ids), theirs) <= TOL


def test_merge_then_export_is_a_plain_hf_model(hf_dir, tmp_path):
    model = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=4, alpha=8.0))
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        lora_logits = model(ids)
    keys = set(base_state_dict(model))
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == keys
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        assert _max_diff(model(ids), lora_logits) <= TOL
    save_pretrained(model, tmp_path / "merged")
    hf = _hf_model(tmp_path / "merged")
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, lora_logits) <= TOL


class _Linear4bitLike(nn.Module):
    """The interface LoRALinear relies on in an NF4 base (models/nf4.Linear4bit): quant_weight,
    bias, in/out_features; with a real NF4 weight, quantized from fp32 (the merge adds the update
    to the weight dequantized in the dtype it was quantized from, as bitsandbytes' dequantize_4bit
    and PEFT: a bf16-quantized base is tested against them in test_merge_parity.py)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        from ember.kernels.nf4 import NF4Weight

        self.quant_weight = NF4Weight.quantize(lin.weight.detach())
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features


def test_quantized_base_is_wrapped_and_merged_to_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=True)
    q = _Linear4bitLike(lin)
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].attn = nn.Module()
    holder.layers[0].attn.q_proj = q
    apply_lora(holder, LoRAConfig(rank=3, targets=("q",)))
    m = holder.layers[0].attn.q_proj
    assert isinstance(m, LoRALinear) and m.base is q and m.lora_A.shape == (3, 64)
    assert m.lora_A.dtype == torch.float32 and not m.lora_A.is_meta
    _randomize(holder)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = m(x)
        w = q.quant_weight.dequantize(torch.float32) + m.scale * (m.lora_B @ m.lora_A)
    merge_lora(holder)
    merged = holder.layers[0].attn.q_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert torch.equal(merged.weight, w) and torch.equal(merged.bias, lin.bias)
    with torch.no_grad():
        assert _max_diff(merged(x), want) <= TOL


def _good_adapter(hf_dir, path):
    model = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=4, targets=("q", "v")))
    _randomize(model)
    save_adapter(model, path)
    return path


def _edit(path, cfg=None, tensors=None):
    if cfg is not None:
        c = json.loads((path / "adapter_config.json").read_text())
        c.update(cfg)
        (path / "adapter_config.json").write_text(json.dumps(c))
    if tensors is not None:
        sd = tensors(load_file(path / "adapter_model.safetensors"))
        save_file(sd, path / "adapter_model.safetensors")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("name,edit,match", [
    ("no_dir", lambda p: p.rename(p.with_name("gone")), "does not exist"),
    ("no_config", lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    ("bad_json", lambda p: (p / "adapter_config.json").write_text("{r: 4"), "not valid JSON"),
    ("not_lora", lambda p: _edit(p, {"peft_type": "IA3"}), "only LORA"),
    ("dora_no_magnitude", lambda p: _edit(p, {"use_dora": True}),
     "use_dora=True but lora_magnitude_vector is missing"),
    ("magnitude_not_dora", lambda p: _edit(p, tensors=lambda sd: {
        **sd, f"{Q0}.lora_magnitude_vector": torch.ones(48)}),
     "use_dora=False but lora_magnitude_vector is present"),
    ("magnitude_shape", lambda p: _edit(p, {"use_dora": True}, tensors=lambda sd: {
        **sd, **{k.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(47)
                 for k in sd if k.endswith("lora_A.weight")}}),
     r"lora_magnitude_vector \(47,\) does not fit"),
    ("bias", lambda p: _edit(p, {"bias": "all"}, tensors=lambda sd: {
        **sd, f"{Q0}.bias": torch.ones(48)}), "bias='all'.*fits no bias of this model"),
    ("r_bool", lambda p: _edit(p, {"r": True}), "r must be a positive number"),
    ("pissa", lambda p: _edit(p, {"init_lora_weights": "pissa"}), "modified base model"),
    ("save", lambda p: _edit(p, {"modules_to_save": ["lm_head"]}), "modules_to_save"),
    ("no_weights", lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model"),
    ("corrupt", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 20),
     "cannot read adapter weights"),
    ("rank", lambda p: _edit(p, {"r": 8}), r"q_proj: lora_A \(4, 48\).*expected \(8, 48\)"),
    ("unknown_key", lambda p: _edit(p, tensors=lambda sd: {
        **sd, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.ones(4, 48)}),
     r"1 keys match no projection.*layers\.7"),
    ("half_pair", lambda p: _edit(p, tensors=lambda sd: {
        k: v for k, v in sd.items() if k != f"{Q0}.lora_B.weight"}), "lora_A or lora_B missing"),
    ("missing_module", lambda p: _edit(p, tensors=lambda sd: {
        k: v for k, v in sd.items() if not k.startswith(Q0)}), "targets 1 modules with no weights"),
    ("bad_shape", lambda p: _edit(p, tensors=lambda sd: {
        **sd, f"{Q0}.lora_B.weight": torch.ones(47, 4)}), r"lora_B \(47, 4\)"),
])
def test_bad_adapters_give_clear_errors(hf_dir, tmp_path, name, edit, match):
    path = _good_adapter(hf_dir, tmp_path / "ad")
    edit(path)
    with pytest.raises(EmberError, match=match):
        load_adapter(_ember_model(hf_dir), path)


def test_save_without_adapters_is_an_error(hf_dir, tmp_path):
    with pytest.raises(EmberError, match="no LoRA adapters"):
        save_adapter(_ember_model(hf_dir), tmp_path)


def test_save_onto_a_file_is_a_clear_error(hf_dir, tmp_path):
    """PEFT's save_pretrained refuses a path that is a file; save_adapter raised a bare
    FileExistsError from mkdir."""
    target = tmp_path / "taken"
    target.write_text("not a folder")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        peft_model.save_pretrained(target)
    model = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=4, targets=("q",)))
    with pytest.raises(EmberError, match="exists and is not a folder"):
        save_adapter(model, target)
    assert target.read_text() == "not a folder"


def test_a_failed_save_leaves_the_adapter_folder_as_it_was(hf_dir, tmp_path, monkeypatch):
    """save_adapter over an adapter that fails while writing (a crash, a full disk) must leave
    the old adapter whole: it replaced the weights first, so the folder held new weights beside
    the old adapter_config.json (or, for a first save, weights without a config)."""
    import ember.models.peft_files as pf

    out = tmp_path / "adapter"
    old = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=4, targets=("q",)))
    save_adapter(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    new = apply_lora(_ember_model(hf_dir), LoRAConfig(rank=8, targets=("q", "v")))

    def broken_dumps(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pf.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="No space"):
        save_adapter(new, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert peft.PeftModel.from_pretrained(hf, out).peft_config["default"].r == 4


def test_a_failed_apply_lora_leaves_the_model_as_it_was(hf_dir):
    """PiSSA at rank 32 is refused at layers.0.attn.v_proj (24 rows): the embedding and q_proj
    before it were left wrapped, q_proj's base replaced by the residual, every weight frozen (a
    retry then: "already has LoRA adapters"). All or nothing: the model as it was, the refusal
    unchanged."""
    model = _ember_model(hf_dir)
    mods = {n: id(m) for n, m in model.named_modules()}
    params = {n: (id(p), p.requires_grad) for n, p in model.named_parameters()}
    model.embed.weight.requires_grad_(False)  # a frozen one stays frozen
    params["embed.weight"] = (params["embed.weight"][0], False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(rank=32, alpha=8.0, targets=("embed_tokens", "q_proj", "v_proj"),
                     init="pissa")
    with pytest.raises(EmberError, match=r"rank 32 exceeds the smaller side of a \(24, 48\)"):
        apply_lora(model, cfg)
    assert {n: id(m) for n, m in model.named_modules()} == mods
    assert {n: (id(p), p.requires_grad) for n, p in model.named_parameters()} == params
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())
    assert "peft_base_init" not in model.__dict__
    apply_lora(model, dataclasses.replace(cfg, rank=4))
    assert len(lora_modules(model)) == 5
