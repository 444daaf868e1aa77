"""GGUF ``starcoder2``: a tiny random transformers Starcoder2ForCausalLM written as llama.cpp's
convert_hf_to_gguf.py writes it (TextModel metadata: ``attention.layer_norm_epsilon`` from
``norm_epsilon``, no window key; gguf's STARCODER2 tensor name map, c_fc / c_proj as
ffn_up / ffn_down, every bias), read by Ember and compared with the HF model's logits
(transformers' GGUF loader has no starcoder2); Ember's own export read back exactly; what
llama.cpp's starcoder2 cannot hold refused or, for the window it ignores, dropped with a
warning."""

from __future__ import annotations

import pytest
import torch
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map

from ember import EmberError
from ember.models.gguf import load_gguf
from ember.models.gguf_export import save_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, _put, tiny_tokenizer_md

transformers = pytest.importorskip("transformers")


def _hf(tied: bool, seed: int):
    cfg = transformers.Starcoder2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        norm_epsilon=1e-5,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    cfg._attn_implementation = "eager"
    model = transformers.Starcoder2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1 + 0.2 * noise if "norm.weight" in n or "layernorm.weight" in n else 0.15 * noise
            )
    return model


def write_starcoder2_gguf(path, model) -> None:
    """convert_hf_to_gguf.py's StarCoder2Model output for ``model`` (F32 tensors)."""
    c = model.config
    md = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "block_count": c.num_hidden_layers,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.layer_norm_epsilon": float(c.norm_epsilon),
        "rope.freq_base": float(c.rope_parameters["rope_theta"]),
    }
    w = GGUFWriter(str(path), "starcoder2")
    for k, v in {
        **{f"starcoder2.{k}": v for k, v in md.items()},
        **tiny_tokenizer_md("starcoder"),
    }.items():
        _put(w, k, v)
    names = get_tensor_name_map(MODEL_ARCH.STARCODER2, c.num_hidden_layers)
    for k, t in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue  # not in a tied checkpoint's safetensors
        w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(cfg, sd, ids):
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_converter_file_matches_hf_and_exports_back(tmp_path, tied):
    hf = _hf(tied, seed=3 + tied)
    write_starcoder2_gguf(tmp_path / "m.gguf", hf)
    cfg, sd, tok = load_gguf(tmp_path / "m.gguf")
    assert cfg.model_type == "starcoder2" and cfg.tie_word_embeddings == tied
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_logits(cfg, sd, ids) - ref).abs().max().item() <= 1e-4
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    save_gguf(model, tok, tmp_path / "out.gguf", dtype="f32")
    cfg2, sd2, _ = load_gguf(tmp_path / "out.gguf")
    assert cfg2 == cfg and sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)
    with pytest.warns(UserWarning, match="sliding window .5. is dropped"):
        save_gguf(Transformer(cfg.replace(sliding_window=5)), tok, tmp_path / "w.gguf")
    assert load_gguf(tmp_path / "w.gguf")[0].sliding_window is None
    for change, needle in (
        (
            dict(attention_bias=False, attention_out_bias=False, mlp_bias=False),
            "requires every projection's bias",
        ),
        (dict(activation="gelu"), "'gelu' would be read as 'gelu_tanh' .llama.cpp's graph"),
    ):
        with pytest.raises(EmberError, match=needle):
            save_gguf(Transformer(cfg.replace(**change)), tok, tmp_path / "bad.gguf")
