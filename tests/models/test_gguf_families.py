"""GGUF import of Gemma 1/2/3 and Phi-3: tiny random transformers models written to GGUF the way
llama.cpp's convert_hf_to_gguf.py writes them (its tensor name map, Gemma norms stored as 1 + w,
Phi-3's fused attn_qkv / ffn_up, only the metadata keys the converter writes), read back by Ember
and compared with (a) the original HF model, (b) transformers loading the same GGUF (Gemma (1)
GGUF is not supported by transformers: (a) only), (c) transformers loading ``import_gguf``'s
folder. Each feature that changes the computation is also switched off in Ember's config to show
the comparison would catch the importer dropping it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map, quants
from gguf import GGMLQuantizationType as Q

from ember import EmberError
from ember.models.gguf import import_gguf, load_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, _offline, _put, tiny_tokenizer_md, write_tiny_gguf

transformers = pytest.importorskip("transformers")

TOL = 1e-4
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, rms_norm_eps=1e-6)
CASES = {  # name -> (gguf arch, HF config class, config kwargs)
    "gemma": ("gemma", "GemmaConfig", dict(num_hidden_layers=3, head_dim=16)),
    "gemma2": ("gemma2", "Gemma2Config", dict(
        num_hidden_layers=4, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
        attn_logit_softcapping=3.0, final_logit_softcapping=8.0)),
    "gemma3": ("gemma3", "Gemma3TextConfig", dict(
        num_hidden_layers=7, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
        final_logit_softcapping=8.0, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})),
    "phi3": ("phi3", "Phi3Config", dict(
        num_hidden_layers=3, sliding_window=5, original_max_position_embeddings=256,
        tie_word_embeddings=False)),
}
# config.json fields transformers' GGUF loader does not read for these archs (it falls back to
# its class defaults): passed to it from the original config so it computes the same model
NOT_READ_BY_TRANSFORMERS = {
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
    "gemma3": ("query_pre_attn_scalar", "final_logit_softcapping", "rope_parameters"),
    "phi3": ("sliding_window",),
}


def _hf_model(case: str):
    arch, cls, kw = CASES[case]
    cfg = getattr(transformers, cls)(**DIMS, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, case)))
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # weights big enough for softcaps and windows to matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    return model


def _metadata(arch: str, c) -> dict:
    """The ``<arch>.*`` keys convert_hf_to_gguf.py writes for this family (and no others)."""
    md = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads,
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
    if arch.startswith("gemma"):
        md.update({"attention.key_length": c.head_dim, "attention.value_length": c.head_dim})
    if arch == "gemma2":
        md.update({"attn_logit_softcapping": c.attn_logit_softcapping,
                   "final_logit_softcapping": c.final_logit_softcapping,
                   "attention.sliding_window": c.sliding_window})
    if arch == "gemma3":
        full = c.rope_parameters["full_attention"]
        md.update({"rope.freq_base": full["rope_theta"], "rope.scaling.type": "linear",
                   "rope.scaling.factor": full["factor"],
                   "final_logit_softcapping": c.final_logit_softcapping,
                   "attention.sliding_window": c.sliding_window})
    if arch == "phi3":
        md.update({"rope.scaling.original_context_length": c.original_max_position_embeddings,
                   "rope.dimension_count": c.hidden_size // c.num_attention_heads,
                   "rope.freq_base": c.rope_parameters["rope_theta"],
                   "attention.sliding_window": c.sliding_window or 0})
    return {f"{arch}.{k}": float(v) if isinstance(v, float) else v for k, v in md.items()}


def write_family_gguf(path, case: str, model, md: dict | None = None,
                      extra_tensors: dict | None = None, quant: dict | None = None) -> None:
    """The GGUF file of ``model``; ``case``: a key of ``CASES`` or a GGUF architecture without
    Q/K permutation (qwen2, qwen3); ``md``: the architecture metadata (default ``_metadata``);
    ``quant``: GGUF tensor kind (``attn_qkv``) -> ggml type, F32 otherwise."""
    arch = CASES[case][0] if case in CASES else case
    c = model.config
    w = GGUFWriter(str(path), arch)
    for k, v in {**(_metadata(arch, c) if md is None else md), **tiny_tokenizer_md()}.items():
        _put(w, k, v)
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch),
                                c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.float()
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            t = t + 1  # llama.cpp stores Gemma's (1 + w)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        qt = (quant or {}).get(name.split(".")[-2])
        if qt is None:
            w.add_tensor(name, t.numpy())
        else:
            w.add_tensor(name, quants.quantize(t.numpy(), qt), raw_dtype=qt)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ember(cfg, sd, ids):
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids)


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _dropped(case: str, cfg) -> dict:
    """Ember configs with one imported feature switched off: each must change the logits."""
    out = {"norm +1 convention": "norm"} if case != "phi3" else {}
    if case.startswith("gemma"):
        out["embedding scale"] = cfg.replace(embedding_scale=None)
    if case in ("gemma2", "gemma3"):
        out["alternating sliding windows"] = cfg.replace(layer_types=None, sliding_window=None)
        out["final softcap"] = cfg.replace(final_softcap=None)
    if case == "gemma2":
        out["attention softcap"] = cfg.replace(attn_softcap=None)
    if case == "gemma3":
        out["local rope base"] = cfg.replace(rope_local_theta=None)
        out["global linear rope scaling"] = cfg.replace(rope_scaling=None)
    if case == "phi3":
        out["sliding window"] = cfg.replace(sliding_window=None)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_family_gguf_matches_hf_and_transformers_gguf(case, tmp_path):
    arch = CASES[case][0]
    hf = _hf_model(case)
    path = tmp_path / f"{case}.gguf"
    write_family_gguf(path, case, hf)
    cfg, sd, tok = load_gguf(path)
    assert cfg.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    ids = torch.randint(0, VOCAB, (2, 13))  # 13 > the window of 5: sliding layers differ
    ours = _ember(cfg, sd, ids)
    with torch.no_grad():
        ref = hf(ids).logits
    diffs = {"original HF model": _diff(ours, ref)}

    if arch != "gemma":  # transformers has no GGUF support for Gemma (1)
        kw = {k: getattr(hf.config, k) for k in NOT_READ_BY_TRANSFORMERS.get(arch, ())}
        with _offline():
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
                **kw).eval()
        with torch.no_grad():
            diffs["transformers GGUF"] = _diff(ours, theirs(ids).logits)

    folder = import_gguf(path, tmp_path / "hf")
    with _offline():
        imported = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        diffs["transformers on import_gguf folder"] = _diff(imported(ids).logits, ref)
    print(f"{case}: max |logit diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= TOL for v in diffs.values()), diffs

    for feature, changed in _dropped(case, cfg).items():
        if changed == "norm":  # the file's 1 + w taken as w
            changed, sd2 = cfg, {k: v + 1 if k.endswith("norm.weight") else v
                                 for k, v in sd.items()}
        else:
            sd2 = sd
        assert _diff(_ember(changed, sd2, ids), ref) > 1e-2, f"{case}: {feature} has no effect"


def test_quantized_phi3_fused_weights_split_after_dequantization(tmp_path):
    hf = _hf_model("phi3")
    path = tmp_path / "q.gguf"
    write_family_gguf(path, "phi3", hf, quant={"attn_qkv": Q.Q8_0, "ffn_up": Q.Q5_1,
                                               "ffn_down": Q.Q5_0})
    cfg, sd, _ = load_gguf(path)
    hd, kv = cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()
    want = torch.from_numpy(quants.dequantize(quants.quantize(qkv, Q.Q8_0), Q.Q8_0))
    q_rows = cfg.num_heads * hd
    assert torch.equal(sd["layers.1.attn.q_proj.weight"], want[:q_rows])
    assert torch.equal(sd["layers.1.attn.k_proj.weight"], want[q_rows:q_rows + kv])
    assert torch.equal(sd["layers.1.attn.v_proj.weight"], want[q_rows + kv:])
    ids = torch.randint(0, VOCAB, (2, 13))
    with _offline():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
            sliding_window=hf.config.sliding_window).eval()
    with torch.no_grad():
        diff = _diff(_ember(cfg, sd, ids), theirs(ids).logits)
    print(f"phi3 quantized: max |logit diff| transformers GGUF {diff:.2e}")
    assert diff <= TOL


def test_load_pretrained_gguf_path(tmp_path, monkeypatch):
    from ember.models.loading import load_pretrained

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    hf = _hf_model("gemma3")
    write_family_gguf(tmp_path / "g3.gguf", "gemma3", hf)
    model, _ = load_pretrained(tmp_path / "g3.gguf", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert _diff(model(ids), hf(ids).logits) <= TOL
    cfg = model.cfg
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert cfg.rope_local_theta == 10000.0 and cfg.attn_softcap is None


def test_gemma_defaults_and_window_pattern(tmp_path):
    """Keys the converter may leave out take llama.cpp's values; a sliding_window_pattern key
    overrides the family's period."""
    hf = _hf_model("gemma2")
    dropped = {f"gemma2.{k}" for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                       "attention.sliding_window")}
    path = tmp_path / "g2.gguf"
    md = {k: v for k, v in _metadata("gemma2", hf.config).items() if k not in dropped}
    write_family_gguf(path, "gemma2", hf, md)
    cfg, _, _ = load_gguf(path)
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window) == (50.0, 30.0, 4096)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.query_pre_attn_scalar == 32 and cfg.norm_offset == 1.0
    write_family_gguf(path, "gemma2", hf, {**md, "gemma2.attention.sliding_window_pattern": [
        True, True, False, True]})
    assert load_gguf(path)[0].layer_types == ("sliding_attention",) * 2 + (
        "full_attention", "sliding_attention")
    # Gemma 3 without a window: every layer global
    hf3 = _hf_model("gemma3")
    md3 = {k: v for k, v in _metadata("gemma3", hf3.config).items()
           if k != "gemma3.attention.sliding_window"}
    write_family_gguf(path, "gemma3", hf3, md3)
    cfg3 = load_gguf(path)[0]
    assert cfg3.sliding_window is None and set(cfg3.layer_types) == {"full_attention"}


@pytest.mark.parametrize("arch,layers", [("gemma2", 46), ("gemma3", 62), ("gemma2", 42)])
def test_27b_query_scale_rule(arch, layers):
    """llama.cpp's 27B rule (the file has no key for it): 46-layer Gemma 2 and 62-layer Gemma 3
    scale queries by hidden / heads, every other size by head_dim. (Checked on the config: a
    46-layer model runs for a minute on CPU; the scalar's effect on logits is covered by the
    gemma2 / gemma3 parity cases and tests/models/test_gemma.py.)"""
    from ember.models.gguf_arch import arch_fields

    base = {"hidden_size": 4608, "num_heads": 32, "num_layers": layers, "head_dim": 128}
    got = arch_fields(arch, {}, lambda key: None, base)["query_pre_attn_scalar"]
    assert got == (144.0 if layers in (46, 62) else 128.0)


def test_refused_files(tmp_path):
    """(LongRoPE and partial rotary: tests/models/test_gguf_rope.py.)"""
    path = tmp_path / "p.gguf"
    hf3 = _hf_model("gemma3")
    write_family_gguf(path, "gemma3", hf3, extra_tensors={"v.patch_embd.weight": np.ones(4)})
    with pytest.raises(EmberError, match="multimodal GGUF.*v.patch_embd.weight"):
        load_gguf(path)
    write_tiny_gguf(tmp_path / "clip.gguf", arch="clip")
    with pytest.raises(EmberError, match="mmproj"):
        load_gguf(tmp_path / "clip.gguf")
    write_tiny_gguf(tmp_path / "g4.gguf", arch="gemma4")
    with pytest.raises(EmberError, match="architecture 'gemma4' is not supported"):
        load_gguf(tmp_path / "g4.gguf")


@pytest.mark.parametrize("kv", [1, 4])
def test_phi3_fused_qkv_that_the_head_counts_do_not_describe_is_refused(kv, tmp_path):
    """attn_qkv rows != (head_count + 2 head_count_kv) x head_dim: transformers' GGUF loader
    refuses the file (its fused qkv_proj has another size); was: with head_count_kv 1 the rows
    past q, k, v were dropped and a wrong model loaded, with 4 a 0-row v_proj."""
    hf = _hf_model("phi3")  # 4 heads, 2 kv heads of 16: 128 rows
    path = tmp_path / "p.gguf"
    md = {**_metadata("phi3", hf.config), "phi3.attention.head_count_kv": kv}
    write_family_gguf(path, "phi3", hf, md)
    with _offline(), pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    want = (4 + 2 * kv) * 16
    with pytest.raises(EmberError, match=rf"p\.gguf: blk\.0\.attn_qkv\.weight has 128 rows, but "
                                         rf"phi3\.attention\.head_count 4 \+ 2 x head_count_kv "
                                         rf"{kv} heads of 16 imply {want}"):
        load_gguf(path)
    with pytest.raises(EmberError, match="attn_qkv.weight has 128 rows"):
        import_gguf(path, tmp_path / "hf")


@pytest.mark.parametrize("case", ["phi3", "gemma2"])
def test_a_file_without_the_norm_epsilon_gets_transformers_default(case, tmp_path):
    """No ``attention.layer_norm_rms_epsilon`` (llama.cpp refuses the file): the epsilon
    transformers' GGUF loader gives the model (its class default: 1e-5 for Phi-3, 1e-6 for
    Gemma 2; was 1e-5 for all), with a warning."""
    hf = _hf_model(case)
    arch = CASES[case][0]
    md = {k: v for k, v in _metadata(arch, hf.config).items()
          if k != f"{arch}.attention.layer_norm_rms_epsilon"}
    path = tmp_path / "m.gguf"
    write_family_gguf(path, case, hf, md)
    with pytest.warns(UserWarning, match="layer_norm_rms_epsilon is missing"):
        cfg, _, _ = load_gguf(path)
    with _offline():
        theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert cfg.rms_norm_eps == theirs.rms_norm_eps == {"phi3": 1e-5, "gemma2": 1e-6}[case]
