"""GGUF ``phi2`` (Phi-1/1.5/2): a tiny random transformers PhiForCausalLM written as llama.cpp's
convert_hf_to_gguf.py writes it (its Phi2Model metadata: feed_forward_length 4 x n_embd,
head_count_kv = head_count, layer_norm_epsilon, rope.dimension_count = partial rotary x head_dim;
its tensor name map, q/k/v separate, or one fused attn_qkv as files converted from the original
phi-2 code hold them), read by Ember and compared with the HF model's logits (transformers'
GGUF loader has no phi2); Ember's own export read back exactly; what phi2 cannot hold refused."""

from __future__ import annotations

import pytest
import torch
from gguf import MODEL_ARCH, GGUFReader, GGUFWriter, get_tensor_name_map

from ember import EmberError
from ember.models.gguf import import_gguf, load_gguf
from ember.models.gguf_export import save_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, _put, tiny_tokenizer_md

transformers = pytest.importorskip("transformers")


def _hf(partial: float, seed: int, hidden: int = 64, heads: int = 4):
    # intermediate 4 x hidden: the converter writes feed_forward_length = 4 x n_embd
    cfg = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=hidden,
                                 intermediate_size=4 * hidden, num_hidden_layers=2,
                                 num_attention_heads=heads,
                                 partial_rotary_factor=partial, max_position_embeddings=128,
                                 layer_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    model = transformers.PhiForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "layernorm.weight" in n else 0.15 * noise)
    return model


def write_phi2_gguf(path, model, fused: bool) -> None:
    """convert_hf_to_gguf.py's Phi2Model output for ``model`` (F32 tensors)."""
    c = model.config
    n_embd, n_head = c.hidden_size, c.num_attention_heads
    md = {"context_length": c.max_position_embeddings, "embedding_length": n_embd,
          "feed_forward_length": 4 * n_embd, "block_count": c.num_hidden_layers,
          "attention.head_count": n_head, "attention.head_count_kv": n_head,
          "attention.layer_norm_epsilon": float(c.layer_norm_eps),
          "rope.dimension_count": int(c.rope_parameters["partial_rotary_factor"] * n_embd)
          // n_head}
    w = GGUFWriter(str(path), "phi2")
    for k, v in {**{f"phi2.{k}": v for k, v in md.items()},
                 **tiny_tokenizer_md("phi-2")}.items():
        _put(w, k, v)
    names = get_tensor_name_map(MODEL_ARCH.PHI2, c.num_hidden_layers)
    sd = {names.get_name(k, try_suffixes=(".weight", ".bias")): t.float()
          for k, t in model.state_dict().items()}
    for name, t in sd.items():
        kind = name.split(".")[-2]
        if fused and kind in ("attn_k", "attn_v"):
            continue
        if fused and kind == "attn_q":
            parts = [sd[name.replace("attn_q", p)] for p in ("attn_q", "attn_k", "attn_v")]
            name, t = name.replace("attn_q", "attn_qkv"), torch.cat(parts)
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(cfg, sd, ids):
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids)


def _ids():
    return torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("partial,fused", [(0.4, True), (0.5, False)],
                         ids=["phi2_fused_qkv", "phi15_separate_qkv"])
def test_converter_file_matches_the_hf_model(tmp_path, partial, fused):
    hf = _hf(partial, seed=int(partial * 10))
    write_phi2_gguf(tmp_path / "m.gguf", hf, fused)
    cfg, sd, tok = load_gguf(tmp_path / "m.gguf")
    assert (cfg.model_type, cfg.rotary_dim, cfg.norm) == ("phi", int(16 * partial), "layernorm")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_logits(cfg, sd, ids) - ref).abs().max().item() <= 1e-4
    # the importer dropping a phi2 feature would show: the head bias, the norm biases
    for key in ("head_bias", "norm.bias", "layers.1.attn_norm.bias", "layers.0.attn.k_proj.bias"):
        assert (_logits(cfg, {**sd, key: sd[key] * 0}, ids) - ref).abs().max().item() > 1e-3
    folder = import_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-4


def test_export_reads_back_exactly_and_refuses_what_phi2_cannot_hold(tmp_path):
    hf = _hf(0.4, seed=7)
    write_phi2_gguf(tmp_path / "m.gguf", hf, fused=True)
    cfg, sd, tok = load_gguf(tmp_path / "m.gguf")
    model = Transformer(cfg.replace(resid_dropout=0.1)).eval()  # dropout: not in GGUF, no effect
    model.load_state_dict(sd)
    save_gguf(model, tok, tmp_path / "out.gguf", dtype="f32")
    cfg2, sd2, _ = load_gguf(tmp_path / "out.gguf")
    assert cfg2 == cfg and sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)
    save_gguf(model, tok, tmp_path / "q8.gguf", dtype="Q8_0")
    cfg3, sd3, _ = load_gguf(tmp_path / "q8.gguf")
    assert all(torch.equal(sd3[k], sd[k]) for k in sd if sd[k].ndim == 1)  # biases stay F32
    ids = _ids()
    assert (_logits(cfg3, sd3, ids) - _logits(cfg, sd, ids)).abs().max().item() <= 0.25
    for change in (dict(qk_norm=True), dict(tie_word_embeddings=True)):
        other = Transformer(cfg.replace(**change))
        with pytest.raises(EmberError, match="phi2 architecture has no q/k LayerNorms"):
            save_gguf(other, tok, tmp_path / "bad.gguf")


def test_odd_head_dim_converter_file_and_export(tmp_path):
    """head_dim 5 (hidden 40 / 8 heads) with partial_rotary_factor 0.4: 2 rotated dims, 3 passed
    through. The converter's rope.dimension_count, int(0.4 x 40) // 8 = 2, is Ember's
    rotary_dim; its file runs as the HF model does, and Ember's export of it reads back exactly
    with the same count (an odd width was untested)."""
    hf = _hf(0.4, seed=3, hidden=40, heads=8)
    write_phi2_gguf(tmp_path / "m.gguf", hf, fused=True)
    cfg, sd, tok = load_gguf(tmp_path / "m.gguf")
    assert (cfg.head_dim, cfg.rotary_dim) == (5, 2)
    ids = _ids()
    with torch.no_grad():
        assert (_logits(cfg, sd, ids) - hf(ids).logits).abs().max().item() <= 1e-4
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    save_gguf(model, tok, tmp_path / "out.gguf", dtype="f32")
    fields = GGUFReader(tmp_path / "out.gguf").fields
    assert fields["phi2.rope.dimension_count"].parts[-1][0] == 2
    assert "phi2.attention.key_length" not in fields  # n_embd / n_head, llama.cpp's default
    cfg2, sd2, _ = load_gguf(tmp_path / "out.gguf")
    assert cfg2 == cfg and all(torch.equal(sd2[k], sd[k]) for k in sd)
