"""bitsandbytes 4-bit checkpoints as users write them, with transformers + bitsandbytes + PEFT as
the oracles (CPU): variants the main QLoRA tests (test_qlora_integration.py) do not cover.

Phi-3 stores q/k/v and gate/up as one fused weight, which bnb quantizes as a whole: Ember cuts
the NF4 weight into its parts (bit-identical rows) and stacks them back on export, byte for byte
when the cuts fall between the nested absmax blocks (every real Phi-3 size), else with plain fp32
absmax (the same dequantized weights); where a cut falls inside a 4-bit block, the parts load
dense (bnb's dequantized rows)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import LoRAConfig, apply_lora, lora_modules
from ember.models.nf4 import quantize_model_
from ember.models.peft_adapter import save_adapter
from tests.models.test_qlora_integration import TOL, _diff, _hf, _logits, _randomized

transformers = pytest.importorskip("transformers")
bnbf = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


def _bnb_folder(root, model, double_quant: bool, auto: str = "AutoModelForCausalLM",
                quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                storage: str = "uint8", skip: list[str] | None = None):
    """model saved dense, then as transformers writes it after a 4-bit NF4 (or FP4) load."""
    dense, q = root / "dense", root / "bnb"
    model.save_pretrained(dense)
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage, llm_int8_skip_modules=skip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = getattr(transformers, auto).from_pretrained(
            dense, quantization_config=qcfg, device_map="cpu")
    hf.save_pretrained(q)
    return q, hf.eval()


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


# hidden 128 with 4 kv heads: every cut of qkv_proj / gate_up_proj is a multiple of 256 absmax
# blocks (sliced nested absmax, byte-identical export); hidden 64 with 2 kv heads is not.
@pytest.mark.parametrize("hidden,kv_heads,double_quant,exact", [
    (128, 4, True, True), (64, 2, True, False), (64, 2, False, True)])
def test_phi3_bnb_checkpoint_loads_saves_and_takes_peft_adapters(tmp_path, hidden, kv_heads,
                                                                double_quant, exact):
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=hidden, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, max_position_embeddings=64,
                                  pad_token_id=0)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.Phi3ForCausalLM(cfg), 3),
                             double_quant)
    model, _ = load_pretrained(folder)
    ids = _ids(96)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    for layer, hf_layer in zip(model.layers, hf.model.layers, strict=True):
        for parts, fused in (((layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj),
                              hf_layer.self_attn.qkv_proj),
                             ((layer.mlp.gate_proj, layer.mlp.up_proj), hf_layer.mlp.gate_up_proj)):
            ours = torch.cat([p.quant_weight.dequantize() for p in parts])
            assert torch.equal(ours, bnbf.dequantize_4bit(fused.weight.data,
                                                          fused.weight.quant_state))

    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    if exact:
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _diff(_logits(_hf(out), ids), _logits(hf, ids)) <= TOL
    back, _ = load_pretrained(out)
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    _peft_matches(model, folder, tmp_path, ids)


@pytest.mark.parametrize("hidden,kv_heads", [(128, 4), (64, 2)])
def test_phi3_quantize_while_loading_is_bnbs_quantization_of_the_fused_weights(tmp_path, hidden,
                                                                              kv_heads):
    """bnb quantizes qkv_proj / gate_up_proj whole (one absmax mean for the double quantization):
    quantize='nf4' gives the same NF4 weights, and Ember's save is transformers' checkpoint."""
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=hidden, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, max_position_embeddings=64,
                                  pad_token_id=0)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.Phi3ForCausalLM(cfg), 4), True)
    model, _ = load_pretrained(tmp_path / "dense", quantize="nf4")
    from_bnb, _ = load_pretrained(folder)
    ids = _ids(96, 1)
    assert torch.equal(_logits(model, ids), _logits(from_bnb, ids))
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    if hidden == 128:  # cuts between nested absmax blocks: the very bytes
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _diff(_logits(_hf(out), ids), _logits(hf, ids)) <= TOL


def test_phi3_fused_weights_whose_cuts_fall_inside_4bit_blocks(tmp_path):
    """Widths not multiples of 64 (hidden 40: q ends at 1600 values, k at 2400; gate at 2800)
    put the qkv / gate_up cuts inside bnb's 4-bit blocks, so no part is an NF4 weight of its own.
    The parts load dense, holding bnb's dequantized rows: transformers' logits, from its
    checkpoint and from quantize='nf4' alike, a save transformers loads back, QLoRA adapters PEFT
    takes on its bnb model (were: the checkpoint refused; quantize='nf4' quantized each part
    alone, weights other than bnb's)."""
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=40, intermediate_size=70,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.Phi3ForCausalLM(cfg), 10), True)
    model, _ = load_pretrained(folder)
    attn, mlp, hf_layer = model.layers[0].attn, model.layers[0].mlp, hf.model.layers[0]
    for parts, fused in (((attn.q_proj, attn.k_proj, attn.v_proj), hf_layer.self_attn.qkv_proj),
                         ((mlp.gate_proj, mlp.up_proj), hf_layer.mlp.gate_up_proj)):
        assert all(type(p) is torch.nn.Linear for p in parts)
        assert torch.equal(torch.cat([p.weight for p in parts]),
                           bnbf.dequantize_4bit(fused.weight.data, fused.weight.quant_state))
    ids = _ids(96, 5)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    requant, _ = load_pretrained(tmp_path / "dense", quantize="nf4")
    assert torch.equal(_logits(requant, ids), _logits(model, ids))
    quantize_model_(requant := load_pretrained(tmp_path / "dense")[0])
    assert torch.equal(_logits(requant, ids), _logits(model, ids))
    out = save_pretrained(model, tmp_path / "ember")
    assert _diff(_logits(_hf(out), ids), _logits(hf, ids)) <= TOL
    _peft_matches(model, folder, tmp_path, ids)


def test_phi3_quantize_model_quantizes_the_fused_weights_whole(tmp_path):
    """quantize_model_ on a loaded Phi-3 quantizes q/k/v and gate/up stacked, as bitsandbytes
    quantizes qkv_proj / gate_up_proj (was: one by one, each with its own double-quantization
    offset: other weights than transformers', and a save that refused to fuse them)."""
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=128, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=64,
                                  pad_token_id=0)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.Phi3ForCausalLM(cfg), 11), True)
    model, _ = load_pretrained(tmp_path / "dense")
    assert len(quantize_model_(model)) == 7
    ids = _ids(96, 6)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _peft_matches(model, folder, tmp_path, ids):
    """An Ember QLoRA adapter (random B) loads with PEFT on transformers' bnb model."""
    peft = pytest.importorskip("peft")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    adapter = save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(_hf(folder), adapter).eval()
    assert _diff(_logits(peft_model, ids), _logits(model, ids)) <= TOL


@pytest.mark.parametrize("family", ["Gemma2", "Gemma3Text"])
def test_gemma_sandwich_norm_bnb_checkpoint(tmp_path, family):
    """Gemma 2/3 name their norms differently (post_attention_layernorm is the attention output's
    norm): the bnb loader renames with the model's config (was: refused)."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        max_position_embeddings=64)
    cls = "Gemma3ForCausalLM" if family == "Gemma3Text" else f"{family}ForCausalLM"
    folder, hf = _bnb_folder(tmp_path, _randomized(getattr(transformers, cls)(cfg), 6), True)
    model, _ = load_pretrained(folder)
    ids = _ids(96, 2)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    _peft_matches(model, folder, tmp_path, ids)


def _reloads_with_logits(out, ids, logits) -> None:
    """transformers loads the classifier Ember saved in ``out`` with these logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForSequenceClassification.from_pretrained(
            out, device_map="cpu").eval()
    with torch.no_grad():
        assert _diff(back(ids).logits, logits) <= TOL


def test_classifier_bnb_checkpoint_saves_with_its_score_head_dense(tmp_path):
    """A *ForSequenceClassification keeps ``score`` dense: Ember's quantization_config must say so
    (it listed only projections and lm_head, so transformers expected a 4-bit score)."""
    from ember.models.heads import classify

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = _randomized(transformers.LlamaForSequenceClassification(cfg), 7)
    folder, hf = _bnb_folder(tmp_path, model, True, "AutoModelForSequenceClassification")
    ours, _ = load_pretrained(folder)
    ids = _ids(96, 3).clamp(min=1)
    with torch.no_grad():
        logits = classify(ours, ids)
        assert _diff(logits, hf(ids).logits) <= TOL
    out = save_pretrained(ours, tmp_path / "ember")
    saved, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in saved)
    _reloads_with_logits(out, ids, logits)


def test_classifier_bnb_checkpoint_with_a_4bit_score_head(tmp_path):
    """llm_int8_skip_modules without "score" makes transformers quantize the classifier head too:
    Ember loads it dequantized (bnb's weights), with transformers' logits (was: score stayed a
    Linear4bit and classify() failed, "'Linear4bit' object has no attribute 'weight'")."""
    from ember.models.heads import classify

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = _randomized(transformers.LlamaForSequenceClassification(cfg), 13)
    folder, hf = _bnb_folder(tmp_path, model, True, "AutoModelForSequenceClassification",
                             skip=["down_proj"])
    assert "score.weight.absmax" in load_file(folder / "model.safetensors")
    ours, _ = load_pretrained(folder)
    score = hf.score.weight
    assert torch.equal(ours.score.weight, bnbf.dequantize_4bit(score.data, score.quant_state))
    ids = _ids(96, 9).clamp(min=1)
    with torch.no_grad():
        logits = classify(ours, ids)
        assert _diff(logits, hf(ids).logits) <= TOL
    out = save_pretrained(ours, tmp_path / "ember")
    _reloads_with_logits(out, ids, logits)
    # the same quantization in memory: quantize_model_ with that skip list keeps a 4-bit score,
    # which classify() reads dequantized (was: AttributeError, Linear4bit has no weight)
    requant, _ = load_pretrained(tmp_path / "dense")
    quantize_model_(requant, skip=["down_proj"])
    assert type(requant.score) is not torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(classify(requant, ids), logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_checkpoint_loads_bit_exact_and_saves_transformers_bytes(tmp_path, double_quant):
    """bnb_4bit_quant_type="fp4" (BitsAndBytesConfig(load_in_4bit=True)'s default) is NF4's
    format with FP4's 16-value code: its weights dequantize as bnb's, the logits are transformers',
    the save is transformers' checkpoint byte for byte, and PEFT takes a QLoRA adapter trained on
    it (was: refused as unsupported)."""
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.Qwen2ForCausalLM(cfg), 8),
                             double_quant, quant_type="fp4")
    model, _ = load_pretrained(folder)
    hf_down = hf.model.layers[1].mlp.down_proj.weight
    assert torch.equal(model.layers[1].mlp.down_proj.quant_weight.dequantize(),
                       bnbf.dequantize_4bit(hf_down.data, hf_down.quant_state))
    ids = _ids(96, 4)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    out = save_pretrained(model, tmp_path / "ember")
    ours, theirs = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = _hf(out)
    assert back.config.quantization_config.bnb_4bit_quant_type == "fp4"
    assert _diff(_logits(back, ids), _logits(hf, ids)) <= TOL
    _peft_matches(model, folder, tmp_path, ids)


def test_save_keeps_the_checkpoints_compute_dtype(tmp_path):
    """A QLoRA checkpoint computing in bf16 (bnb_4bit_compute_dtype) over fp32 weights saves
    with that compute dtype, so transformers computes the saved folder exactly as the original
    (was: the saved dtype, float32: other logits)."""
    import json

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.LlamaForCausalLM(cfg), 9), True,
                             compute_dtype=torch.bfloat16)
    model, _ = load_pretrained(folder)
    out = save_pretrained(model, tmp_path / "ember")
    qc = [json.loads((f / "config.json").read_text())["quantization_config"]
          for f in (folder, out)]
    assert qc[0]["bnb_4bit_compute_dtype"] == "bfloat16" and qc[1] == qc[0]
    ids = _ids(96, 7)
    assert torch.equal(_logits(_hf(out), ids), _logits(hf, ids))


@pytest.mark.parametrize("storage", ["int8", "float64", "bfloat16"])
def test_every_quant_storage_dtype_transformers_takes_loads(tmp_path, storage):
    """bnb_4bit_quant_storage packs the 4-bit bytes into int8 / float64 too (transformers'
    BitsAndBytesConfig takes them): they load as bnb's weights, with transformers' logits (were:
    refused, "dtype I8; only F32, F16 and BF16 weights are supported"; load_bnb_4bit_state took
    int8 storage for an LLM.int8 state dict)."""
    from ember.models.nf4 import load_bnb_4bit_state

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    folder, hf = _bnb_folder(tmp_path, _randomized(transformers.LlamaForCausalLM(cfg), 12), True,
                             storage=storage)
    sd = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert sd[key].dtype == getattr(torch, storage)
    hf_up = hf.model.layers[0].mlp.up_proj.weight
    theirs = bnbf.dequantize_4bit(hf_up.data, hf_up.quant_state)
    assert torch.equal(load_bnb_4bit_state(sd)[0][key].dequantize(), theirs)
    model, _ = load_pretrained(folder)
    assert torch.equal(model.layers[0].mlp.up_proj.quant_weight.dequantize(), theirs)
    ids = _ids(96, 8)
    assert _diff(_logits(model, ids), _logits(hf, ids)) <= TOL
    assert _diff(_logits(_hf(save_pretrained(model, tmp_path / "ember")), ids),
                 _logits(hf, ids)) <= TOL


def test_qlora_on_a_4bit_output_head_is_pefts(tmp_path):
    """quantize_model_(skip=()) keeps lm_head 4-bit (transformers' llm_int8_skip_modules=[]); a
    LoRA on it computes over the dequantized head, as PEFT's LoRA on bnb's Linear4bit head (was:
    AttributeError, Linear4bit has no weight)."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    folder, _ = _bnb_folder(tmp_path, _randomized(transformers.LlamaForCausalLM(cfg), 14), True,
                            skip=[])
    model, _ = load_pretrained(tmp_path / "dense")
    quantize_model_(model, skip=())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "lm_head")))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    adapter = save_adapter(model, tmp_path / "adapter")
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf(folder), adapter).eval()
    assert type(theirs.base_model.model.lm_head.base_layer) is not torch.nn.Linear  # bnb 4-bit
    ids = _ids(96, 10)
    assert _diff(_logits(model, ids), _logits(theirs, ids)) <= TOL
