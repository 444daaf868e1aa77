"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers 5: logits and
gradients (fp32), the load-balancing loss against ``output_router_logits=True``'s ``aux_loss``,
checkpoint and config.json round trips, and the refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.models.hf import config_from_hf, config_to_hf, to_hf_state_dict
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.moe import MoE, collect_router_stats, load_balancing_loss
from tests.models.test_interop_hf import BASE, randomize_

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = BASE["vocab_size"]
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
# name -> (config class, kwargs). Qwen: 5 experts (not a power of 2), k = 2 of them.
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=5, **MOE, shared_expert_intermediate_size=40,
                                          decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen2_moe_step2": ("Qwen2MoeConfig", dict(num_hidden_layers=3, num_experts=4, **MOE,
                                               shared_expert_intermediate_size=16,
                                               decoder_sparse_step=2, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=5, **MOE, head_dim=16, norm_topk_prob=False)),
    "qwen3_moe_norm_dense0": ("Qwen3MoeConfig", dict(num_experts=4, **MOE, norm_topk_prob=True,
                                                     mlp_only_layers=[0])),
}


def _hf_model(case: str, seed: int = 0):
    cls, kw = CASES[case]
    config = getattr(transformers, cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    return model.eval()


def _save(tmp_path, case: str):
    model = _hf_model(case)
    model.save_pretrained(tmp_path / case)
    return model, tmp_path / case


def _ids(T: int = 13, B: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(T))


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pretrained(folder)[0]


def _hf_grads(hf, cfg) -> dict[str, torch.Tensor]:
    """transformers' gradients under Ember's names: its fused in-memory experts (``gate_up_proj``
    (E, 2F, D), ``down_proj`` (E, D, F)) split per expert, the rest renamed by the key table."""
    out = {}
    for name, p in hf.named_parameters():
        if p.grad is None:
            continue
        i = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("experts.gate_up_proj"):
            f = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"layers.{i}.mlp.experts.{e}.gate_proj.weight"] = p.grad[e, :f]
                out[f"layers.{i}.mlp.experts.{e}.up_proj.weight"] = p.grad[e, f:]
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                out[f"layers.{i}.mlp.experts.{e}.down_proj.weight"] = p.grad[e]
        else:
            from ember.models.hf import hf_key_to_ember

            key = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight") if (
                cfg.model_type == "mixtral") else name
            out[hf_key_to_ember(key, cfg)] = p.grad
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_gradients_and_round_trips(tmp_path, case):
    """Logits and every gradient of a backward match transformers (fp32); the stored state dict
    and config.json round-trip exactly; Ember's export loads in transformers with the same
    logits."""
    hf, folder = _save(tmp_path, case)
    model = _load(folder)
    ids = _ids()
    assert any(isinstance(m, MoE) for m in model.modules())
    logits = model(ids)
    ref = hf(ids).logits
    assert (logits - ref).abs().max().item() <= 1e-4
    # a loss that weighs every logit differently, so each routing weight matters
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (logits * w).sum().backward()
    (ref * w).sum().backward()
    theirs = _hf_grads(hf, model.cfg)
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs)  # an expert no token chose: zero gradients in both
    for n, g in ours.items():
        assert (g - theirs[n]).abs().max().item() <= 1e-4 * max(1.0, theirs[n].abs().max()), n

    sd = load_file(folder / "model.safetensors")
    back = to_hf_state_dict(model.state_dict(), model.cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert config_from_hf(config_to_hf(model.cfg)) == model.cfg
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (again(ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe_step2", "qwen3_moe_norm_dense0"])
def test_checkpoints_with_3d_expert_stacks_load_as_transformers_loads_them(tmp_path, case):
    """A checkpoint saved from transformers 5's state dict holds each sparse layer's experts as
    two 3-D stacks (gate_up_proj (E, 2F, D), down_proj (E, D, F); Mixtral's router as mlp.gate),
    which transformers loads; Ember refused their keys. Export writes the per-expert keys that
    save_pretrained writes."""
    from safetensors.torch import save_file

    from ember.models.hf import from_hf_state_dict

    hf = _hf_model(case, seed=3)
    folder = tmp_path / case
    hf.save_pretrained(folder)
    per_expert = load_file(folder / "model.safetensors")
    stacked = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stacked)
    save_file(stacked, folder / "model.safetensors", metadata={"format": "pt"})
    ids = _ids()
    model, _ = load_pretrained(folder)
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (ours - again(ids).logits).abs().max().item() <= 1e-4  # transformers loads it
    cfg = model.cfg
    sd = from_hf_state_dict(stacked, cfg)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    back = to_hf_state_dict(sd, cfg)
    assert back.keys() == per_expert.keys()
    assert all(torch.equal(back[k], per_expert[k]) for k in back)


def test_config_fields(tmp_path):
    """The MoE fields as transformers reads them, including Qwen3-MoE's 4.x name num_experts."""
    _, folder = _save(tmp_path, "qwen2_moe_step2")
    cfg = read_config(folder)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 24)
    assert [cfg.is_sparse(i) for i in range(3)] == [False, True, False]
    assert cfg.shared_expert_intermediate_size == 16 and cfg.norm_topk_prob
    raw = json.loads((tmp_path / "qwen2_moe_step2" / "config.json").read_text())
    assert config_from_hf({**raw, "mlp_only_layers": [1]}).moe is False
    q3 = config_to_hf(_load(_save(tmp_path, "qwen3_moe")[1]).cfg)
    legacy = {**{k: v for k, v in q3.items() if k != "num_local_experts"}, "num_experts": 5}
    assert config_from_hf(legacy).num_experts == 5
    mixtral = read_config(_save(tmp_path, "mixtral")[1])
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == mixtral.intermediate_size


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe_step2", "qwen3_moe"])
def test_aux_loss_matches_transformers(tmp_path, case):
    """Ember's load-balancing loss equals transformers' ``aux_loss`` (no attention mask: every
    token counts, as in Ember's padding-free packed batches), and its gradient flows to the
    routers."""
    hf, folder = _save(tmp_path, case)
    model = _load(folder)
    ids = _ids(T=17)
    out = hf(ids, output_router_logits=True)
    with collect_router_stats(model) as stats:
        model(ids)
    aux = load_balancing_loss(stats, model.cfg.num_experts)
    assert len(stats) == sum(model.cfg.is_sparse(i) for i in range(model.cfg.num_layers))
    assert abs(aux.item() - out.aux_loss.item()) <= 1e-5
    aux.backward()
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, MoE))
    with torch.no_grad(), collect_router_stats(model) as stats:
        model(ids)
    assert stats == []  # forwards without gradients (reference, teacher) do not count
    model(ids)  # outside the block nothing is recorded
    assert all(m.router_stats is None for m in model.modules() if isinstance(m, MoE))


def test_dispatch_computes_only_routed_tokens(tmp_path):
    """Each expert sees exactly the tokens routed to it (no dense compute over all experts)."""
    model = _load(_save(tmp_path, "mixtral")[1])
    moe = model.layers[0].mlp
    seen = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, a, o, e=e: seen.append((e, a[0].shape[0])))
    ids = _ids(T=1, B=1)  # one token: 2 of the 4 experts chosen, 2 idle
    model(ids).sum().backward()
    assert sum(n for _, n in seen) == ids.numel() * moe.top_k
    # experts no token chose still get (zero) gradients: FSDP2 reduces a block's gradients
    # together on every rank
    chosen = {e for e, _ in seen}
    assert len(chosen) == moe.top_k
    for e, expert in enumerate(moe.experts):
        g = expert.down_proj.weight.grad
        assert g is not None and (g.any().item() == (e in chosen))


@pytest.mark.parametrize("change,needle", [
    ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"architectures": ["MixtralForTokenClassification"]}, "architectures"),
    ({"num_local_experts": 0}, "no experts"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    # a bnb config over dense weights (bnb MoE checkpoints load: tests/models/test_bnb_moe.py)
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     "hold no 4-bit weights"),
])
def test_bad_configs_are_refused(tmp_path, change, needle):
    _, folder = _save(tmp_path, "mixtral")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(EmberError, match=needle):
        _load(folder)


def test_other_exports_refuse_moe(tmp_path):
    """GGUF export (of a Qwen3-MoE without llama.cpp's top-k renormalization), transformers'
    accelerate() and a dense family with experts are refused."""
    from ember.models.gguf_export import save_gguf
    from ember.models.hf_backend import accelerate

    hf, folder = _save(tmp_path, "qwen3_moe")
    model = _load(folder)
    with pytest.raises(EmberError, match="mixture-of-experts"):
        save_gguf(model, object(), tmp_path / "m.gguf")
    with pytest.raises(EmberError, match="not a supported model.*mixture-of-experts"):
        accelerate(hf)
    with pytest.raises(EmberError, match="with experts"):
        config_to_hf(model.cfg.replace(model_type="qwen3"))


# HF key (after "model.layers.N.") -> llama.cpp tensor (after "blk.N."), as convert_hf_to_gguf.py
# names them; experts are stacked into one 3-D tensor per projection.
_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
    "ffn_norm.weight", **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv"
                          for k in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight":
    "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    **{f"mlp.shared_expert.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up",
                                                                             "down")},
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
}
_EXPERT = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}


def _write_gguf(folder, path, arch: str, n_experts: int, omit: tuple = (), split: bool = False):
    """The saved HF folder as llama.cpp's converter writes it (F32, Q/K permuted for llama),
    without the ``<arch>.*`` keys in ``omit``; ``split``: each expert's projection alone
    (``blk.N.ffn_gate.E.weight``), as converters before April 2024 wrote Mixtral."""
    import re

    import numpy as np
    from gguf import GGUFWriter

    from ember.models.gguf import permute_qk
    from tests.models.test_gguf import _put, tiny_tokenizer_md

    raw = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")
    w = GGUFWriter(str(path), arch)
    hd = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    md = {"block_count": raw["num_hidden_layers"], "context_length": 64,
          "embedding_length": raw["hidden_size"], "feed_forward_length": raw["intermediate_size"],
          "attention.head_count": raw["num_attention_heads"], "attention.key_length": hd,
          "attention.head_count_kv": raw["num_key_value_heads"], "rope.dimension_count": hd,
          "rope.freq_base": raw["rope_parameters"]["rope_theta"],
          "attention.layer_norm_rms_epsilon": raw["rms_norm_eps"], "expert_count": n_experts,
          "expert_used_count": raw["num_experts_per_tok"]}
    if "moe_intermediate_size" in raw:
        md["expert_feed_forward_length"] = raw["moe_intermediate_size"]
    if raw.get("shared_expert_intermediate_size"):
        md["expert_shared_feed_forward_length"] = raw["shared_expert_intermediate_size"]
    md = {k: v for k, v in md.items() if k not in omit}
    for k, v in {**{f"{arch}.{k}": v for k, v in md.items()}, **tiny_tokenizer_md()}.items():
        _put(w, k, v)
    stacks: dict = {}
    for k, t in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
        if m is None:
            name = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight":
                    "output.weight", "model.norm.weight": "output_norm.weight"}[k]
        elif (e := re.fullmatch(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight",
                                m[2])):
            stacks.setdefault(f"blk.{m[1]}.ffn_{_EXPERT[e[2]]}_exps.weight", {})[int(e[1])] = t
            continue
        else:
            name = f"blk.{m[1]}.{_GGUF_NAMES[m[2]]}"
            if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                n = raw["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
                t = permute_qk(t, n)
            if name.endswith("ffn_gate_inp_shexp.weight"):
                t = t.reshape(-1)  # a vector in llama.cpp's files
        w.add_tensor(name, t.numpy().astype(np.float32))
    for name, parts in stacks.items():
        if split:
            for e in range(n_experts):
                w.add_tensor(name.replace("_exps.", f".{e}."), parts[e].numpy())
            continue
        w.add_tensor(name, torch.stack([parts[e] for e in range(n_experts)]).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_gguf_logits(cfg, sd: dict, hf) -> None:
    """The model ``load_gguf`` read (``cfg``, ``sd``) gives transformers' logits of ``hf``."""
    from ember.models.transformer import Transformer
    from tests.models.test_gguf import VOCAB as GGUF_VOCAB

    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_rope_("cpu")
    ids = _ids().clamp(max=GGUF_VOCAB - 1)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case,arch", [("mixtral", "llama"), ("qwen2_moe", "qwen2moe"),
                                       ("qwen3_moe", "qwen3moe")])
def test_gguf_import_matches_transformers(tmp_path, case, arch):
    """A GGUF file written as llama.cpp's converter does loads to transformers' logits, and
    exports back to the HF family."""
    from ember.models.gguf import load_gguf
    from tests.models.test_gguf import VOCAB as GGUF_VOCAB

    cls, kw = CASES[case]
    if case == "qwen3_moe":  # llama.cpp's qwen3moe renormalizes the top-k weights
        kw = {**kw, "norm_topk_prob": True}
    config = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": GGUF_VOCAB})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 7)
    hf.eval().save_pretrained(tmp_path / "hf")
    _write_gguf(tmp_path / "hf", tmp_path / "m.gguf", arch, config.num_experts
                if hasattr(config, "num_experts") else config.num_local_experts)
    cfg, sd, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.model_type == case and cfg.num_experts == (5 if case != "mixtral" else 4)
    _assert_gguf_logits(cfg, sd, hf)
    assert config_from_hf(config_to_hf(cfg)).num_experts == cfg.num_experts


def test_greedy_generation_matches_transformers(tmp_path):
    """KV-cache decoding of left-padded rows of different lengths: transformers' greedy tokens."""
    from ember.models.generate import generate_ids

    hf, folder = _save(tmp_path, "qwen2_moe")
    model = _load(folder).eval()
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    got = generate_ids(model, prompts, max_new_tokens=6)
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                               min_new_tokens=6, pad_token_id=0)[0, len(p):].tolist()
        assert g == want


def test_qwen2_moe_without_shared_expert(tmp_path):
    """shared_expert_intermediate_size=0: transformers still builds (and saves) a shared expert of
    width 0 and its gate, which add nothing; Ember refused those keys ("unexpected key(s)"). It
    loads with transformers' logits and gradients, and its export loads back in transformers."""
    cls, kw = CASES["qwen2_moe"]
    config = getattr(transformers, cls)(**{**BASE, **kw, "shared_expert_intermediate_size": 0})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 4)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = _load(tmp_path / "hf")
    assert not hasattr(model.layers[0].mlp, "shared_expert")
    ids = _ids()
    logits, ref = model(ids), hf(ids).logits
    assert (logits - ref).abs().max().item() <= 1e-4
    logits.square().sum().backward()
    ref.square().sum().backward()
    theirs = _hf_grads(hf, model.cfg)
    for n, p in model.named_parameters():
        assert (p.grad - theirs[n]).abs().max().item() <= 1e-4 * max(1.0, theirs[n].abs().max()), n
    save_pretrained(model, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (again(ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case,arch", [("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe")])
def test_gguf_without_expert_widths_takes_llama_cpp_fallbacks(tmp_path, case, arch):
    """Qwen1.5-MoE files converted before ``expert_feed_forward_length`` /
    ``expert_shared_feed_forward_length`` existed: llama.cpp reads experts n_ff / k wide and the
    shared expert n_ff wide (Qwen1.5-MoE-A2.7B: 5632 / 4 = 1408, shared 5632). Ember took the
    experts as n_ff wide and the shared expert as absent, refusing such files on their shapes."""
    from ember.models.gguf import load_gguf
    from tests.models.test_gguf import VOCAB as GGUF_VOCAB

    cls, kw = CASES[case]
    kw = {**kw, "norm_topk_prob": case == "qwen3_moe", "intermediate_size": 48,
          "moe_intermediate_size": 24}  # n_ff = 2 * 24, k = 2
    if case == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = 48
    config = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": GGUF_VOCAB})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 8)
    hf.eval().save_pretrained(tmp_path / "hf")
    _write_gguf(tmp_path / "hf", tmp_path / "m.gguf", arch, config.num_experts,
                omit=("expert_feed_forward_length", "expert_shared_feed_forward_length"))
    cfg, sd, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.moe_intermediate_size == 24
    _assert_gguf_logits(cfg, sd, hf)


def test_mixtral_config_with_num_experts_alias(tmp_path):
    """MixtralConfig's attribute_map reads ``num_experts`` as ``num_local_experts``: a config.json
    that names it so loads in transformers; Ember refused the field ("not supported for
    model_type 'mistral'")."""
    hf, folder = _save(tmp_path, "mixtral")
    raw = json.loads((folder / "config.json").read_text())
    raw["num_experts"] = raw.pop("num_local_experts")
    (folder / "config.json").write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = _load(folder)
    assert model.cfg.num_experts == theirs.config.num_local_experts == 4
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
    (folder / "config.json").write_text(json.dumps({**raw, "num_local_experts": 8}))
    with pytest.raises(EmberError, match="disagree"):
        _load(folder)


def test_gguf_mixtral_with_split_experts(tmp_path):
    """Mixtral GGUF files converted before April 2024 (e.g. the widely shared Mixtral-8x7B ones)
    store each expert's projection as its own tensor, ``blk.N.ffn_gate.E.weight``, which
    llama.cpp still merges on load; Ember refused them as unexpected tensors. They load to the
    logits of the HF model they were converted from."""
    from ember.models.gguf import load_gguf
    from tests.models.test_gguf import VOCAB as GGUF_VOCAB

    cls, kw = CASES["mixtral"]
    config = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": GGUF_VOCAB})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 9)
    hf.eval().save_pretrained(tmp_path / "hf")
    _write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "llama", 4, split=True)
    cfg, sd, _ = load_gguf(tmp_path / "m.gguf")
    _assert_gguf_logits(cfg, sd, hf)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_bare_moe_base_model_loads_as_transformers_loads_it(tmp_path, case):
    """``Qwen2MoeModel.save_pretrained`` (architectures ["Qwen2MoeModel"], no ``model.`` prefix,
    no head): AutoModelForCausalLM loads it tied, as it loads a dense family's base model, which
    Ember reads; the MoE families refused the architectures name. Untied, the missing head is
    named (transformers would start from a random one)."""
    cls, kw = CASES[case]
    config = getattr(transformers, cls)(**{**BASE, **kw, "tie_word_embeddings": True})
    base = transformers.AutoModel.from_config(config)
    randomize_(base, 11)
    base.save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("model.") for k in base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bare").eval()
    ids = _ids()
    with torch.no_grad():
        assert (_load(tmp_path / "bare")(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    path = tmp_path / "bare" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(EmberError, match=r"missing key\(s\): lm_head.weight \(untied"):
        _load(tmp_path / "bare")
