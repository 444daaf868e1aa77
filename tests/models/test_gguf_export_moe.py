"""GGUF export of mixture-of-experts models (Mixtral as ``llama`` with ``expert_count``,
``qwen2moe`` with its shared expert, ``qwen3moe``): the tensor table and expert keys of a file
written as llama.cpp's converter does (``tests.models.test_moe._write_gguf``), Ember's re-import
to the same weights and logits, transformers' GGUF loader (Qwen) to the same logits, the
quantized types row by row as ``gguf.quants`` / llama-quantize, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

from ember import EmberError
from ember.models.gguf import load_gguf
from ember.models.gguf_export import save_gguf
from ember.models.tokenizer import tokenizer_from_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, _offline, tiny_tokenizer_md
from tests.models.test_interop_hf import BASE, randomize_
from tests.models.test_moe import CASES, _load, _write_gguf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

# case -> GGUF architecture; Qwen3-MoE as llama.cpp computes it (top-k renormalized)
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# rows of whole Q8_0/Q4_0 blocks (hidden 64, experts 32 / 64 wide), so expert stacks quantize
DIMS = {"vocab_size": VOCAB, "hidden_size": 64}
# config fields transformers' GGUF loader does not read (it keeps its defaults)
NOT_READ_BY_TRANSFORMERS = {
    "qwen2moe": ("moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob"),
    "qwen3moe": ("moe_intermediate_size", "norm_topk_prob")}
WIDTHS = {"mixtral": {"intermediate_size": 64}, "qwen2_moe": {"moe_intermediate_size": 32},
          "qwen3_moe": {"moe_intermediate_size": 32, "norm_topk_prob": True}}


def _model(tmp_path, case: str, **kw):
    cls, base_kw = CASES[case]
    config = getattr(transformers, cls)(**{**BASE, **base_kw, **DIMS, **WIDTHS[case], **kw})
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 3)
    hf.eval().save_pretrained(tmp_path / "hf")
    return hf, _load(tmp_path / "hf").eval()


def _export(model, path, dtype="f32"):
    return save_gguf(model, tokenizer_from_gguf(tiny_tokenizer_md()), path, dtype=dtype)


def _reimport(path) -> Transformer:
    cfg, sd, _ = load_gguf(path)
    back = Transformer(cfg).eval()
    back.load_state_dict(sd)
    return back


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("case", list(ARCH))
def test_export_matches_the_converter_and_reimports(case, tmp_path):
    arch = ARCH[case]
    hf, model = _model(tmp_path, case)
    path = _export(model, tmp_path / "m.gguf")
    n = model.cfg.num_experts
    _write_gguf(tmp_path / "hf", tmp_path / "conv.gguf", arch, n)

    ours, conv = GGUFReader(path), GGUFReader(tmp_path / "conv.gguf")
    table = {t.name: (tuple(t.shape), t.tensor_type) for t in ours.tensors}
    assert table == {t.name: (tuple(t.shape), t.tensor_type) for t in conv.tensors}
    assert table["blk.1.ffn_down_exps.weight"][0] == (
        model.cfg.moe_intermediate_size, 64, n)  # ggml order: (F, D, E)

    def experts(r):
        return {k: r.fields[k].contents() for k in r.fields if ".expert_" in k}

    assert experts(ours) == experts(conv) and f"{arch}.expert_count" in experts(ours)
    assert ours.fields["general.architecture"].contents() == arch

    cfg_back, sd_back, _ = load_gguf(path)
    assert cfg_back.model_type == case and cfg_back.num_experts == n
    src = model.state_dict()
    assert set(sd_back) == set(src) and all(torch.equal(sd_back[k], v) for k, v in src.items())
    back = Transformer(cfg_back).eval()
    back.load_state_dict(sd_back)
    ids = _ids()
    ref = _logits(model, ids)
    diffs = {"HF": (ref - _logits(hf, ids)).abs().max().item(),
             "re-import": (ref - _logits(back, ids)).abs().max().item()}
    # a swapped gate / up of one expert must show in the logits
    swapped = {**sd_back, "layers.0.mlp.experts.1.gate_proj.weight":
               sd_back["layers.0.mlp.experts.1.up_proj.weight"],
               "layers.0.mlp.experts.1.up_proj.weight":
               sd_back["layers.0.mlp.experts.1.gate_proj.weight"]}
    back.load_state_dict(swapped)
    assert (ref - _logits(back, ids)).abs().max().item() > 1e-3
    if arch != "llama":  # transformers' GGUF loader has no Mixtral
        with _offline():
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, gguf_file=path.name, dtype=torch.float32,
                **{k: getattr(hf.config, k) for k in NOT_READ_BY_TRANSFORMERS[arch]}).eval()
        diffs["transformers GGUF"] = (ref - _logits(theirs, ids)).abs().max().item()
    print(f"{case}: max |logit diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert diffs["re-import"] <= 1e-5 and all(v <= 1e-4 for v in diffs.values()), diffs


@pytest.mark.parametrize("dtype,want", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0),
                                        ("q4_0", Q.Q4_0), ("q5_1", Q.Q5_1)])
def test_types_and_row_wise_quantization(dtype, want, tmp_path):
    _, model = _model(tmp_path, "qwen2_moe")
    path = _export(model, tmp_path / "m.gguf", dtype)
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_up_shexp", "attn_k"):
        assert types[f"blk.0.{name}.weight"] == want, name
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32  # the router: never quantized
    assert types["blk.0.ffn_gate_inp_shexp.weight"] == Q.F32
    sd = model.state_dict()
    stack = torch.stack([sd[f"layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(5)])
    raw = np.asarray(next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight").data)
    if dtype not in ("f16", "bf16"):  # the 3-D stack: llama.cpp's bytes, row after row
        np.testing.assert_array_equal(raw.reshape(-1),
                                      quants.quantize(stack.numpy(), want).reshape(-1))
    got = torch.from_numpy(quants.dequantize(raw, want).reshape(stack.shape).copy()).float()
    back = _reimport(path)
    assert torch.equal(back.state_dict()["layers.1.mlp.experts.4.down_proj.weight"], got[4])
    ids = _ids()
    err = (_logits(model, ids) - _logits(back, ids)).abs().max().item()
    print(f"{dtype}: re-import vs fp32 max |logit diff| {err:.2e}")
    assert 0 < err <= {"f16": 0.02, "bf16": 0.1, "q8_0": 0.1}.get(dtype, 1.0)


@pytest.mark.filterwarnings("ignore:.*not whole blocks")
def test_k_quant_mix_types_bytes_and_transformers(tmp_path):
    """A llama-quantize K-quant file type (Q4_K_M) of a Qwen2-MoE (hidden 256: whole 256-blocks
    for the rows of gate / up; down's rows of 32 fall back): the per-tensor types of
    llama-quant.cpp's llama_tensor_get_type_impl (every tensor whose name holds ffn_down,
    experts and shared expert alike, gets Q6_K, here its fallback Q8_0, in the layers
    use_more_bits picks: the layer parsed from the name, n_layer = block_count; attn_v
    likewise; output Q6_K; router F32), each expert of a stack quantized row by row as
    llama-quantize does, and transformers' GGUF loader dequantizing the file to Ember's
    re-import's logits. Was: refused."""
    from ember.models.gguf_quants import quantize

    _, model = _model(tmp_path, "qwen2_moe", hidden_size=256, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, num_experts=2)
    path = _export(model, tmp_path / "m.gguf", "q4_k_m")
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # use_more_bits(i, 2): the last layer only; Q4_K / Q6_K of 32-wide rows: Q5_0 / Q8_0
    for i, (v, down) in enumerate([(Q.Q4_K, Q.Q5_0), (Q.Q6_K, Q.Q8_0)]):
        assert types[f"blk.{i}.attn_v.weight"] == v, i
        assert types[f"blk.{i}.ffn_down_exps.weight"] == types[
            f"blk.{i}.ffn_down_shexp.weight"] == down, i
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps",
                     "ffn_gate_shexp", "ffn_up_shexp"):
            assert types[f"blk.{i}.{name}.weight"] == Q.Q4_K, (i, name)
        for name in ("ffn_gate_inp", "ffn_gate_inp_shexp", "attn_norm", "ffn_norm"):
            assert types[f"blk.{i}.{name}.weight"] == Q.F32, (i, name)
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    sd = model.state_dict()
    stack = torch.stack([sd[f"layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(2)])
    raw = next(t for t in reader.tensors if t.name == "blk.1.ffn_up_exps.weight").data
    assert np.asarray(raw).tobytes() == quantize(stack.reshape(-1, 256), Q.Q4_K).numpy().tobytes()
    back = _reimport(path)
    ids = _ids()
    ours = _logits(back, ids)
    with _offline():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32,
            **{k: getattr(model.cfg, k) for k in ("moe_intermediate_size",
                                                  "shared_expert_intermediate_size",
                                                  "norm_topk_prob")}).eval()
    err = (ours - _logits(theirs, ids)).abs().max().item()
    print(f"q4_k_m: re-import vs transformers GGUF max |logit diff| {err:.2e}")
    assert err <= 1e-4
    # the weights came back within each type's error (relative rms on random weights: Q4_K
    # 0.07); logits are no measure here, a flipped expert choice moves them a lot
    got = back.state_dict()
    for key, bound in (("layers.0.mlp.experts.1.gate_proj.weight", 0.1),
                       ("layers.1.mlp.experts.1.down_proj.weight", 0.01)):
        rel = ((got[key] - sd[key]).pow(2).mean() / sd[key].pow(2).mean()).sqrt().item()
        assert 0 < rel <= bound, (key, rel)


@pytest.mark.filterwarnings("ignore:.*not whole blocks")
@pytest.mark.parametrize("dtype,rest", [("q4_0", Q.Q4_0), ("q4_k_m", Q.Q5_0)])
def test_eight_experts_get_q8_0_attention_k_and_v(dtype, rest, tmp_path):
    """llama_tensor_get_type: an 8-expert model (Mixtral 8x7B) keeps attn_k / attn_v at Q8_0
    (Q4_K_M too) and, for Q4_K_S / Q4_K_M, gives attn_output Q5_K (here falling back to Q5_1:
    rows of 64; was Q4_K's fallback Q5_0); the rest (Q4_K_M: Q4_K, whose 64-wide rows fall
    back to Q5_0) as the type."""
    _, model = _model(tmp_path, "mixtral", num_local_experts=8)
    types = {t.name: t.tensor_type for t in GGUFReader(_export(model, tmp_path / "m.gguf",
                                                               dtype)).tensors}
    assert types["blk.1.attn_k.weight"] == types["blk.1.attn_v.weight"] == Q.Q8_0
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_up_exps.weight"] == rest
    assert types["blk.1.attn_output.weight"] == (Q.Q5_1 if dtype == "q4_k_m" else rest)
    # output: Q6_K, but 64-wide rows are not whole 256-blocks: Q8_0
    assert types["output.weight"] == Q.Q8_0 and types["blk.1.ffn_gate_inp.weight"] == Q.F32


def test_what_gguf_cannot_express_is_refused(tmp_path):
    _, model = _model(tmp_path, "qwen3_moe", norm_topk_prob=False)
    with pytest.raises(EmberError, match="norm_topk_prob=False.*qwen3moe"):
        _export(model, tmp_path / "a.gguf")
    _, model = _model(tmp_path, "qwen2_moe", mlp_only_layers=[0])
    with pytest.raises(EmberError, match=r"dense MLP layers \[0\]"):
        _export(model, tmp_path / "b.gguf")
    # llama.cpp's qwen2moe always has a shared expert (read n_ff wide without its key)
    _, model = _model(tmp_path, "qwen2_moe", shared_expert_intermediate_size=0)
    with pytest.raises(EmberError, match="no shared expert"):
        _export(model, tmp_path / "d.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
