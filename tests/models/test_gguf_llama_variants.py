"""GGUF ``granite``, ``smollm3``, ``olmo2`` both ways. transformers' GGUF loader reads none, so the
oracle is a writer in this file that follows llama.cpp's convert_hf_to_gguf.py (``GraniteModel`` and
``SmolLM3Model``, both ``LlamaModel``: Q/K rows permuted per head; Granite drops head_dim and
writes its multipliers as ``attention.scale`` / ``embedding_scale`` / ``residual_scale`` where
non-zero and ``logit_scale``) applied to tiny random transformers models, whose logits Ember's
import must give (fp32, <= 1e-4); Ember's export must read back to the same model. llama.cpp's
SmolLM3 hard-codes NoPE on every 4th layer and no window, so the HF model here has transformers'
default ``no_rope_layer_interval`` 4, and other patterns are refused on export. ``olmo2`` likewise
(``Olmo2Model``, a ``TextModel``: no permutation); tied or biased OLMo2 exports are refused."""

from __future__ import annotations

import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map

from ember import EmberError
from ember.models.gguf import load_gguf, permute_qk
from ember.models.gguf_export import save_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, _offline, _put, tiny_tokenizer_md

transformers = pytest.importorskip("transformers")

MULT = dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.05,
            logits_scaling=4.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def _hf(cls: str, layers: int, seed: int, **kw):
    """A random transformers ``cls`` model (eager attention) of the tests' shape."""
    cfg = getattr(transformers, cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def _granite(tied: bool = False):
    return _hf("GraniteConfig", 3, 3, tie_word_embeddings=tied, **MULT)


def _smollm3(cls: str = "SmolLM3Config", **kw):
    return _hf(cls, 5, 4, **kw)


def write_llama_variant_gguf(path, model, drop: tuple[str, ...] = (), extra: dict | None = None):
    """The file convert_hf_to_gguf.py writes for ``model`` (F32 tensors)."""
    c = model.config
    arch = c.model_type
    md = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "rope.dimension_count": c.hidden_size // c.num_attention_heads,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads,
          "rope.freq_base": float(c.rope_parameters["rope_theta"]),
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "vocab_size": c.vocab_size}
    if arch == "granite":
        md.update({"attention.scale": float(c.attention_multiplier),
                   "embedding_scale": float(c.embedding_multiplier),
                   "residual_scale": float(c.residual_multiplier),
                   "logit_scale": float(c.logits_scaling)})
    w = GGUFWriter(str(path), arch)
    for k, v in {**{f"{arch}.{k}": v for k, v in md.items() if k not in drop},
                 **tiny_tokenizer_md(), **(extra or {})}.items():
        _put(w, k, v)
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch),
                                c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "olmo2":  # TextModel: no permutation (llama.cpp's NeoX RoPE)
            pass
        elif key.endswith("q_proj.weight"):
            t = permute_qk(t, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            t = permute_qk(t, c.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ember(cfg, sd, ids):
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids), model


@pytest.mark.parametrize("tied", [False, True])
def test_granite_gguf_matches_hf_and_exports_back(tmp_path, tied):
    hf = _granite(tied)
    write_llama_variant_gguf(tmp_path / "g.gguf", hf)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    cfg, sd, tok = load_gguf(tmp_path / "g.gguf")
    assert (cfg.embedding_scale, cfg.residual_multiplier, cfg.attention_multiplier,
            cfg.logits_scaling, cfg.tie_word_embeddings) == (3.0, 0.4, 0.05, 4.0, tied)
    got, model = _ember(cfg, sd, ids)
    assert (got - want).abs().max().item() <= 1e-4
    for name, plain in dict(embedding_scale=None, residual_multiplier=1.0,
                            attention_multiplier=None, logits_scaling=1.0).items():
        assert (_ember(cfg.replace(**{name: plain}), sd, ids)[0] - want).abs().max() > 1e-2
    save_gguf(model, tok, tmp_path / "back.gguf", dtype="f32")
    cfg2, sd2, _ = load_gguf(tmp_path / "back.gguf")
    assert cfg2 == cfg and sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_granite_gguf_defaults_and_refusals(tmp_path):
    hf = _granite()
    # no attention.scale / residual_scale / embedding_scale: llama.cpp's 1/sqrt(hd), 1, none
    write_llama_variant_gguf(tmp_path / "d.gguf", hf,
                       drop=("attention.scale", "residual_scale", "embedding_scale"))
    cfg, _, _ = load_gguf(tmp_path / "d.gguf")
    assert (cfg.embedding_scale, cfg.residual_multiplier, cfg.softmax_scale) == (None, 1.0, None)
    write_llama_variant_gguf(tmp_path / "n.gguf", hf, drop=("logit_scale",))
    with pytest.raises(EmberError, match="granite.logit_scale is missing"):
        load_gguf(tmp_path / "n.gguf")
    write_llama_variant_gguf(tmp_path / "r.gguf", hf,
                             extra={"granite.rope.scaling.finetuned": False})
    with pytest.raises(EmberError, match="no RoPE"):
        load_gguf(tmp_path / "r.gguf")


def test_smollm3_gguf_matches_hf_and_exports_back(tmp_path):
    hf = _smollm3()
    write_llama_variant_gguf(tmp_path / "s.gguf", hf)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    cfg, sd, tok = load_gguf(tmp_path / "s.gguf")
    assert cfg.nope_layers == (3,) and cfg.tie_word_embeddings and cfg.sliding_window is None
    got, model = _ember(cfg, sd, ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (_ember(cfg.replace(nope_layers=()), sd, ids)[0] - want).abs().max() > 1e-2
    save_gguf(model, tok, tmp_path / "back.gguf", dtype="f32")
    cfg2, sd2, _ = load_gguf(tmp_path / "back.gguf")
    assert cfg2 == cfg and all(torch.equal(sd2[k], sd[k]) for k in sd)
    # what llama.cpp's smollm3 cannot express: other NoPE layers, a sliding window
    for change, needle in ((dict(nope_layers=(1,)), "nope_layers"),
                           (dict(sliding_window=4), "windows")):
        other = Transformer(cfg.replace(**change))
        other.load_state_dict(sd)
        with pytest.raises(EmberError, match=f"cannot express this model.*{needle}"):
            save_gguf(other, tok, tmp_path / "x.gguf", dtype="f32")


def test_olmo2_gguf_matches_hf_and_exports_back(tmp_path):
    hf = _smollm3("Olmo2Config")
    write_llama_variant_gguf(tmp_path / "o.gguf", hf)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    cfg, sd, tok = load_gguf(tmp_path / "o.gguf")
    assert cfg.sandwich_norms and not cfg.pre_norms and cfg.qk_norm and cfg.qk_norm_full
    got, model = _ember(cfg, sd, ids)
    assert (got - want).abs().max().item() <= 1e-4
    save_gguf(model, tok, tmp_path / "back.gguf", dtype="f32")
    cfg2, sd2, _ = load_gguf(tmp_path / "back.gguf")
    assert cfg2 == cfg and all(torch.equal(sd2[k], sd[k]) for k in sd)
    tied = Transformer(cfg.replace(tie_word_embeddings=True))
    with pytest.raises(EmberError, match="llama.cpp's olmo2 has a separate output matrix"):
        save_gguf(tied, tok, tmp_path / "x.gguf", dtype="f32")
    write_llama_variant_gguf(tmp_path / "w.gguf", hf, extra={"olmo2.attention.sliding_window": 4})
    with pytest.raises(EmberError, match="OLMo 3 file"):
        load_gguf(tmp_path / "w.gguf")


def test_per_layer_head_count_arrays_of_one_value(tmp_path):
    """llama.cpp reads ``attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` as
    one value or one per layer; a file with the same value on every layer is the HF model
    (was refused as "varies per layer"); sizes that really vary are refused, naming the key."""
    hf = _hf("LlamaConfig", 3, 5)
    keys = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    c = hf.config
    per_layer = {f"llama.{k}": [v] * 3 for k, v in zip(keys, (
        c.num_attention_heads, c.num_key_value_heads, c.intermediate_size), strict=True)}
    write_llama_variant_gguf(tmp_path / "a.gguf", hf, drop=keys, extra=per_layer)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    cfg, sd, _ = load_gguf(tmp_path / "a.gguf")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (4, 2, 96)
    assert (_ember(cfg, sd, ids)[0] - want).abs().max().item() <= 1e-4
    varying = {**per_layer, "llama.attention.head_count_kv": [2, 1, 2]}
    write_llama_variant_gguf(tmp_path / "v.gguf", hf, drop=keys, extra=varying)
    with pytest.raises(EmberError, match=r"head_count_kv varies per layer \(\[2, 1, 2\]\)"):
        load_gguf(tmp_path / "v.gguf")
    # one value per layer means block_count values: llama.cpp refuses another length ("key
    # llama.feed_forward_length has wrong array length; expected 3, got 2"); was: read as 96
    short = {**per_layer, "llama.feed_forward_length": [c.intermediate_size] * 2}
    write_llama_variant_gguf(tmp_path / "s.gguf", hf, drop=keys, extra=short)
    with pytest.raises(EmberError, match=r"feed_forward_length holds 2 per-layer values for 3 "
                                         r"layers \(llama.block_count\)"):
        load_gguf(tmp_path / "s.gguf")


def test_head_size_without_key_length_comes_from_the_weights(tmp_path):
    """A Llama file without ``attention.key_length`` (converters before it) whose heads are not
    hidden / heads (Mistral Nemo: 128, not 5120 / 32): the head size the q weight and
    ``rope.dimension_count`` give, as transformers' GGUF loader reads it (was refused as
    "partial rotary")."""
    hf = _hf("LlamaConfig", 2, 6, head_dim=32)  # hidden 64 / 4 heads would be 16
    write_llama_variant_gguf(tmp_path / "m.gguf", hf, drop=("rope.dimension_count",),
                             extra={"llama.rope.dimension_count": 32})
    cfg, sd, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.head_dim == 32
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    ours = _ember(cfg, sd, ids)[0]
    with torch.no_grad(), _offline():
        want = hf(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()(ids).logits
    assert (ours - want).abs().max().item() <= 1e-4
    assert (ours - theirs).abs().max().item() <= 1e-4
