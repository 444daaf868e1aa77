"""GGUF import of long-context RoPE: Phi-3 LongRoPE (short / long factor tensors, attention factor,
original context) with full and partial rotary (Phi-3.5 and Phi-4-mini shapes), and YaRN
(Qwen2.5 / Qwen3 long-context configs). Tiny random transformers models are written to GGUF with
the keys and tensors llama.cpp's convert_hf_to_gguf.py writes for them, read back by Ember and
compared with the original HF model on sequences below and beyond the original context
(transformers' own GGUF loader ignores these keys, so it is no oracle here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGUFQuantizationType
from gguf import GGUFReader, GGUFValueType

from ember import EmberError
from ember.models.config import rope_inv_freq
from ember.models.gguf import import_gguf, load_gguf
from ember.models.gguf_export import save_gguf
from ember.models.loading import load_pretrained
from ember.models.tokenizer import tokenizer_from_gguf
from tests.models.test_gguf import VOCAB, _offline, tiny_tokenizer_md, write_tiny_gguf
from tests.models.test_gguf_families import DIMS, _diff, _ember, write_family_gguf

transformers = pytest.importorskip("transformers")

TOL = 1e-4
ORIG = 24  # original context; tests run 13 tokens (short factors) and 40 (long factors)


def _randomize_(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.endswith("norm.weight") else 1.0 if "embed" in name else 0.15
            p.copy_(torch.randn_like(p) * scale)


def _phi3(partial: float):
    rot = int(16 * partial)  # head_dim 16
    g = torch.Generator().manual_seed(int(partial * 100))
    short = (1.0 + torch.rand(rot // 2, generator=g)).tolist()
    long = (1.0 + 8 * torch.rand(rot // 2, generator=g)).tolist()
    cfg = transformers.Phi3Config(**{**DIMS, "max_position_embeddings": 4 * ORIG},
                                  num_hidden_layers=2, tie_word_embeddings=False,
                                  original_max_position_embeddings=ORIG, rope_parameters={
                                      "rope_type": "longrope", "rope_theta": 10000.0,
                                      "short_factor": short, "long_factor": long,
                                      "partial_rotary_factor": partial})
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize_(model)
    return model, short, long, rot


def _phi3_metadata(c, rot: int, attn: float | None) -> dict:
    """Phi3MiniModel.set_gguf_parameters + generate_extra_tensors' keys."""
    md = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads,
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
          "rope.dimension_count": rot, "rope.freq_base": 10000.0,
          "rope.scaling.original_context_length": ORIG, "attention.sliding_window": 0}
    if attn is not None:
        md["rope.scaling.attn_factor"] = attn
    return {f"phi3.{k}": v for k, v in md.items()}


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_phi3_longrope_gguf_matches_hf(partial, tmp_path):
    hf, short, long, rot = _phi3(partial)
    scale = hf.config.max_position_embeddings / ORIG
    attn = math.sqrt(1 + math.log(scale) / math.log(ORIG))
    path = tmp_path / "phi.gguf"
    write_family_gguf(path, "phi3", hf, _phi3_metadata(hf.config, rot, attn), extra_tensors={
        "rope_factors_long.weight": long, "rope_factors_short.weight": short})
    cfg, sd, _ = load_gguf(path)
    rs = cfg.rope_scaling
    assert rs.kind == "longrope" and rs.original_max_position_embeddings == ORIG
    assert cfg.partial_rotary_factor == partial and cfg.rotary_dim == rot
    assert rs.long_factor == pytest.approx(long, rel=1e-6)
    for T in (13, 40):  # below / beyond the original context: short / long factors
        ids = torch.randint(0, VOCAB, (2, T))
        with torch.no_grad():
            ref = hf(ids).logits
        ours = _ember(cfg, sd, ids)
        print(f"phi3 longrope partial={partial} T={T}: max |logit diff| {_diff(ours, ref):.2e}")
        assert _diff(ours, ref) <= TOL
        # each part of the file matters: the factors and the attention factor
        plain = cfg.replace(rope_scaling=None)
        assert _diff(_ember(plain, sd, ids), ref) > 1e-2
        no_attn = cfg.replace(rope_scaling=type(rs)(**{**rs.__dict__, "attention_factor": 1.0}))
        assert _diff(_ember(no_attn, sd, ids), ref) > 1e-2
    # ember import-gguf's folder: transformers reads the same LongRoPE / partial rotary back
    with _offline():
        folder = import_gguf(path, tmp_path / "hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert _diff(theirs(ids).logits, hf(ids).logits) <= TOL


def test_phi3_longrope_default_attention_factor_and_bad_files(tmp_path):
    hf, short, long, rot = _phi3(1.0)
    path = tmp_path / "phi.gguf"
    tensors = {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    write_family_gguf(path, "phi3", hf, _phi3_metadata(hf.config, rot, None), extra_tensors=tensors)
    cfg, sd, _ = load_gguf(path)  # attn_factor left out: transformers' formula
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert _diff(_ember(cfg, sd, ids), hf(ids).logits) <= TOL
    write_family_gguf(path, "phi3", hf, _phi3_metadata(hf.config, rot, None),
                      extra_tensors={"rope_factors_long.weight": long})
    with pytest.raises(EmberError, match="rope_factors_short.weight.*missing"):
        load_gguf(path)
    write_family_gguf(path, "phi3", hf, _phi3_metadata(hf.config, rot, None), extra_tensors={
        "rope_factors_long.weight": long[:-1], "rope_factors_short.weight": short[:-1]})
    with pytest.raises(EmberError, match="rotary_dim / 2 = 8 positive factors, got 7"):
        load_gguf(path)


def _qwen(arch: str, rope: dict):
    cls = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig"}[arch]
    cfg = getattr(transformers, cls)(**{**DIMS, "max_position_embeddings": 4 * ORIG},
                                     num_hidden_layers=2, head_dim=16, tie_word_embeddings=False,
                                     rope_parameters={"rope_theta": 10000.0, **rope})
    cfg._attn_implementation = "eager"
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize_(model)
    return model


def _qwen_metadata(arch: str, c, yarn: dict) -> dict:
    """TextModel.set_gguf_parameters' keys for a YaRN config (only those the config has)."""
    md = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads, "attention.key_length": 16,
          "attention.value_length": 16,
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.freq_base": 10000.0,
          "rope.scaling.type": "yarn", "rope.scaling.factor": yarn["factor"],
          "rope.scaling.original_context_length": yarn["original_max_position_embeddings"]}
    for hf_key, key in (("attention_factor", "yarn_attn_factor"), ("beta_fast", "yarn_beta_fast"),
                        ("beta_slow", "yarn_beta_slow")):
        if hf_key in yarn:
            md[f"rope.scaling.{key}"] = yarn[hf_key]
    return {f"{arch}.{k}": float(v) if isinstance(v, float) else v for k, v in md.items()}


@pytest.mark.parametrize("arch,extra", [
    ("qwen2", {}),
    ("qwen3", {"beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3}),
])
def test_yarn_gguf_matches_hf(arch, extra, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG, **extra}
    hf = _qwen(arch, yarn)
    path = tmp_path / "q.gguf"
    write_family_gguf(path, arch, hf, _qwen_metadata(arch, hf.config, yarn))
    cfg, sd, _ = load_gguf(path)
    assert cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 4.0
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = _ember(cfg, sd, ids)
    print(f"{arch} yarn {extra}: max |logit diff| {_diff(ours, ref):.2e}")
    assert _diff(ours, ref) <= TOL
    assert _diff(_ember(cfg.replace(rope_scaling=None), sd, ids), ref) > 1e-2


def test_olmo2_yarn_attn_factor_key_is_transformers_attention_factor(tmp_path):
    # Olmo2Model.set_gguf_parameters writes rope_scaling's attention_factor as
    # rope.scaling.attn_factor (no yarn_attn_factor)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
            "attention_factor": 1.3}
    cfg = transformers.Olmo2Config(**{**DIMS, "max_position_embeddings": 4 * ORIG},
                                   num_hidden_layers=2, tie_word_embeddings=False,
                                   rope_parameters={"rope_theta": 10000.0, **yarn})
    cfg._attn_implementation = "eager"
    torch.manual_seed(4)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize_(hf)
    md = {k.replace("qwen2.", "olmo2."): v for k, v in _qwen_metadata("qwen2", cfg, yarn).items()
          if "key_length" not in k and "value_length" not in k and "yarn_attn" not in k}
    path = tmp_path / "o.gguf"
    write_family_gguf(path, "olmo2", hf, {**md, "olmo2.rope.scaling.attn_factor": 1.3})
    ours, sd, _ = load_gguf(path)
    assert ours.rope_scaling.attention_factor == 1.3
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    assert _diff(_ember(ours, sd, ids), ref) <= TOL


def test_yarn_refusals(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}
    hf = _qwen("qwen2", yarn)
    path = tmp_path / "q.gguf"
    md = _qwen_metadata("qwen2", hf.config, yarn)
    write_family_gguf(path, "qwen2", hf, {**md, "qwen2.rope.scaling.yarn_ext_factor": 0.5})
    with pytest.raises(EmberError, match="yarn_ext_factor=0.5"):
        load_gguf(path)
    write_family_gguf(path, "qwen2", hf, {**md, "qwen2.rope.scaling.attn_factor": -1.0})
    with pytest.raises(EmberError, match="YaRN attention factor must be > 0, got -1.0"):
        load_gguf(path)
    plain = {k: v for k, v in md.items() if ".rope.scaling." not in k}
    write_family_gguf(path, "qwen2", hf, {**plain, "qwen2.rope.scaling.attn_factor": 0.5})
    with pytest.raises(EmberError, match="attn_factor=0.5 .llama.cpp multiplies cos / sin"):
        load_gguf(path)
    write_family_gguf(path, "qwen2", hf, {**plain, "qwen2.rope.scaling.attn_factor": 1.0})
    assert load_gguf(path)[0].rope_scaling is None
    write_family_gguf(path, "qwen2", hf, {**md, "qwen2.rope.scaling.yarn_log_multiplier": 0.1})
    with pytest.raises(EmberError, match="yarn_log_multiplier"):
        load_gguf(path)
    write_family_gguf(path, "qwen2", hf, {**md, "qwen2.rope.dimension_count": 8})
    with pytest.raises(EmberError, match="only supported for phi3 / phi2"):
        load_gguf(path)
    write_family_gguf(path, "qwen2", hf, md, extra_tensors={
        "rope_freqs.weight": np.ones(8), "rope_factors_long.weight": np.ones(8)})
    with pytest.raises(EmberError, match="both rope_freqs and rope_factors"):
        load_gguf(path)


def _ember_from_hf(hf, folder):
    hf.save_pretrained(folder)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        model, _ = load_pretrained(folder, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_yarn_export_writes_the_converters_keys_and_matches_hf(arch, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}
    hf = _qwen(arch, yarn)
    path = save_gguf(_ember_from_hf(hf, tmp_path / "hf"), tokenizer_from_gguf(
        tiny_tokenizer_md()), tmp_path / "y.gguf", dtype="f32")
    reader = GGUFReader(path)
    rope = {k: reader.fields[k] for k in reader.fields if k.startswith(f"{arch}.rope.scaling.")}
    assert {k: f.contents() for k, f in rope.items()} == {  # convert_hf_to_gguf's, no more
        f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": 4.0,
        f"{arch}.rope.scaling.original_context_length": ORIG}
    assert rope[f"{arch}.rope.scaling.factor"].types == [GGUFValueType.FLOAT32]
    assert rope[f"{arch}.rope.scaling.original_context_length"].types == [GGUFValueType.UINT32]
    cfg, sd, _ = load_gguf(path)
    ids = torch.randint(0, VOCAB, (2, 40))  # beyond the original context
    with torch.no_grad():
        ref = hf(ids).logits
    assert _diff(_ember(cfg, sd, ids), ref) <= TOL


@pytest.mark.parametrize("extra,field", [
    ({"beta_fast": 16.0}, "beta_fast=16.0"), ({"beta_slow": 2.0}, "beta_slow=2.0"),
    ({"attention_factor": 1.3}, "attention_factor=1.3"), ({"truncate": False}, "truncate=False")])
def test_yarn_export_refuses_what_llama_cpp_cannot_read(extra, field, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG, **extra}
    model = _ember_from_hf(_qwen("qwen2", yarn), tmp_path / "hf")
    with pytest.raises(EmberError, match=f"qwen2 YaRN has no key for this model's {field}"):
        save_gguf(model, tokenizer_from_gguf(tiny_tokenizer_md()), tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def test_gemma3_sliding_rope_base_from_freq_base_swa(tmp_path):
    # transformers 5's Gemma 3 keeps the sliding layers' base in rope_parameters; the converter
    # writes it as rope.freq_base_swa
    from tests.models.test_gguf_families import CASES, _metadata

    _, cls, kw = CASES["gemma3"]
    rope = {**kw["rope_parameters"], "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 500.0}}
    cfg = getattr(transformers, cls)(**{**DIMS, **kw, "rope_parameters": rope})
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize_(hf)
    path = tmp_path / "g3.gguf"
    write_family_gguf(path, "gemma3", hf, {**_metadata("gemma3", cfg),
                                           "gemma3.rope.freq_base_swa": 500.0})
    ours, sd, _ = load_gguf(path)
    assert ours.rope_local_theta == 500.0
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        ref = hf(ids).logits
    assert _diff(_ember(ours, sd, ids), ref) <= TOL
    # 0 (was read as the 10000 default) or NaN (was NaN frequencies): a corrupt file
    for bad in (0.0, float("nan")):
        write_family_gguf(path, "gemma3", hf, {**_metadata("gemma3", cfg),
                                               "gemma3.rope.freq_base_swa": bad})
        with pytest.raises(EmberError, match=f"gemma3.rope.freq_base_swa is {bad}, "
                                             "not a positive number"):
            load_gguf(path)


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_phi3_longrope_export_as_the_converter_and_matches_hf(partial, tmp_path):
    hf, short, long, rot = _phi3(partial)
    path = save_gguf(_ember_from_hf(hf, tmp_path / "hf"), tokenizer_from_gguf(
        tiny_tokenizer_md()), tmp_path / "p.gguf", dtype="f32")
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for name, want in (("rope_factors_long.weight", long), ("rope_factors_short.weight", short)):
        assert tensors[name].tensor_type == GGUFQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(tensors[name].data), np.float32(want))
    md = {k: f.contents() for k, f in reader.fields.items() if k.startswith("phi3.rope.")}
    assert md == {"phi3.rope.freq_base": 10000.0, "phi3.rope.dimension_count": rot,
                  "phi3.rope.scaling.original_context_length": ORIG,  # Phi3MiniModel's keys
                  "phi3.rope.scaling.attn_factor": pytest.approx(
                      math.sqrt(1 + math.log(4) / math.log(ORIG)), rel=1e-6)}
    cfg, sd, _ = load_gguf(path)
    for n in (13, 40):  # short factors, then long ones
        ids = torch.randint(0, VOCAB, (2, n))
        with torch.no_grad():
            ref = hf(ids).logits
        assert _diff(_ember(cfg, sd, ids), ref) <= TOL


@pytest.mark.parametrize("orig,low,high", [(64, 1.0, 4.0), (128, 2.0, 4.0), (8192, 1.0, 4.0)])
def test_llama3_rope_freqs_without_original_context_key(orig, low, high, tmp_path):
    """convert_hf_to_gguf.py writes a Llama 3.1 rope scaling as the rope_freqs tensor only (no
    rope.scaling.original_context_length): the original context is the one the divisors imply,
    so the frequencies equal transformers' own llama3 RoPE for any original context."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}
    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=rope)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2).float() / 64)
    factors = plain / theirs  # the tensor the converter writes: one divisor per frequency
    assert factors.min() == 1.0 and factors.max() == 8.0
    write_tiny_gguf(tmp_path / "l3.gguf", hidden=128, heads=2, kv_heads=1, rope_freqs=factors,
                    metadata={"llama.rope.freq_base": 500000.0})
    cfg, _, _ = load_gguf(tmp_path / "l3.gguf")
    assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0
    torch.testing.assert_close(rope_inv_freq(cfg), theirs, rtol=1e-5, atol=0)


def test_llama3_export_with_factors_the_importer_cannot_match_is_refused_with_a_way_out(
        tmp_path):
    """A Llama 3 RoPE with low/high frequency factors other than the released ones (here 2 / 8)
    goes to the file as rope_freqs divisors that the importer cannot match back: save_gguf
    refuses as a save_gguf error that says what to export instead (was: the importer's "this
    GGUF is not supported", naming a temporary file, at export time)."""
    rope = {"rope_type": "llama3", "rope_theta": 123.0, "factor": 2.0, "low_freq_factor": 2.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 16}
    hf = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, rope_parameters=rope,
                                  tie_word_embeddings=True)
    model = _ember_from_hf(transformers.LlamaForCausalLM(hf), tmp_path / "hf")
    with pytest.raises(EmberError, match=r"save_gguf: .*low_freq_factor=2\.0.*"
                                         r"high_freq_factor=8\.0.*ember export --merged"):
        save_gguf(model, tokenizer_from_gguf(tiny_tokenizer_md()), tmp_path / "l3.gguf")
    assert not (tmp_path / "l3.gguf").exists()
