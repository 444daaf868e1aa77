"""NF4 models against bitsandbytes and transformers on CPU: a checkpoint transformers writes with
BitsAndBytesConfig(load_in_4bit, nf4, double quant) is exactly what Ember's quantization of the same
dense weights produces and saves (every tensor, the JSON quant state included), it loads into
Ember with the same dequantized weights and the same layer outputs as bnb's Linear4bit, and a
quantized Ember Transformer matches the transformers model's logits."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn

from ember import EmberError
from ember.kernels.nf4 import NF4Weight
from ember.models.nf4 import (
    Linear4bit,
    assign_quantized_,
    bnb_quantization_config,
    check_quantization_config,
    dequantize_model_,
    load_bnb_4bit_state,
    load_bnb_quantized_,
    load_quantized_,
    nf4_from_bnb,
    nf4_to_bnb,
    quantize_model_,
    rename_bnb_keys,
    replace_linears_with_4bit_,
    split_bnb_key,
)

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny Llama saved dense (fp32) and as transformers' bitsandbytes NF4 checkpoint."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense_dir, q_dir = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("bnb")
    transformers.LlamaForCausalLM(cfg).save_pretrained(dense_dir)
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    hf_q = transformers.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=qcfg,
                                                         device_map="cpu")
    hf_q.save_pretrained(q_dir)
    return {
        "dense": load_file(dense_dir / "model.safetensors"),
        "bnb": load_file(q_dir / "model.safetensors"),
        "config": json.loads((dense_dir / "config.json").read_text()),
        "qconfig": json.loads((q_dir / "config.json").read_text())["quantization_config"],
        "hf_model": hf_q,
        "dense_dir": dense_dir,
    }


def test_checkpoint_loads_and_equals_our_quantization_byte_for_byte(hf_pair):
    sd, dense = hf_pair["bnb"], hf_pair["dense"]
    quantized, rest = load_bnb_4bit_state(sd, hf_pair["qconfig"])
    linears = {k for k, v in dense.items()
               if v.dim() == 2 and "embed" not in k and "lm_head" not in k}
    assert set(quantized) == linears
    assert set(rest) == set(dense) - linears  # norms, embedding and the dense lm_head
    for key, w in quantized.items():
        ours = nf4_to_bnb(NF4Weight.quantize(dense[key]), key)
        theirs = {k: v for k, v in sd.items() if split_bnb_key(k)[0] == key}
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
        assert tuple(w.shape) == tuple(dense[key].shape) and w.dtype == dense[key].dtype


def test_in_memory_state_dict_with_transformers_quantization_config(hf_pair):
    """A bnb model's own state dict and ``config.quantization_config`` (a transformers
    BitsAndBytesConfig, not a dict) load as bnb's weights (was: AttributeError, no .get)."""
    hf = hf_pair["hf_model"]
    quantized, _ = load_bnb_4bit_state(hf.state_dict(), hf.config.quantization_config)
    layer = hf.model.layers[1].mlp.up_proj
    assert torch.equal(quantized["model.layers.1.mlp.up_proj.weight"].dequantize(),
                       bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    with pytest.raises(EmberError, match="quantization_config must be a dict"):
        load_bnb_4bit_state(hf.state_dict(), "nf4")


def test_loaded_weights_and_layers_match_bnb_linear4bit(hf_pair):
    model = hf_pair["hf_model"]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        bnb_layer = model.get_submodule(name)
        ours = Linear4bit(bnb_layer.in_features, bnb_layer.out_features, bias=False)
        ours.load_state_dict(bnb_layer.state_dict())
        dq = bnbf.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state)
        assert torch.equal(ours.quant_weight.dequantize(), dq)
        x = torch.randn(2, 5, bnb_layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), bnb_layer(x), rtol=0, atol=0)
        # and Ember writes bnb's state dict back, tensor for tensor
        mine, theirs = ours.state_dict(), bnb_layer.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_quantized_ember_model_saves_the_transformers_checkpoint_and_matches_logits(hf_pair):
    from ember.models.hf import config_from_hf, ember_key_to_hf, from_hf_state_dict
    from ember.models.transformer import Transformer

    cfg = config_from_hf(hf_pair["config"])
    model = Transformer(cfg)
    model.load_state_dict(from_hf_state_dict(hf_pair["dense"], cfg))
    old = [weakref.ref(m) for m in model.modules() if isinstance(m, nn.Linear)]
    names = quantize_model_(model)
    gc.collect()
    assert "lm_head" not in names and len(names) == 14
    assert sum(r() is not None for r in old) == 1, "replaced dense layers are still alive"
    assert isinstance(model.lm_head, nn.Linear)

    saved = rename_bnb_keys(model.state_dict(), ember_key_to_hf)
    assert saved.keys() == hf_pair["bnb"].keys()
    for k, v in saved.items():
        assert torch.equal(v, hf_pair["bnb"][k]), k
    check_quantization_config(bnb_quantization_config(torch.float32))

    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_pair["hf_model"](ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _meta_model(cfg):
    from ember.models.config import rope_inv_freq
    from ember.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.inv_freq = rope_inv_freq(cfg)  # non-persistent: the loader rebuilds it
    return model


def test_quantize_while_loading_and_state_dict_round_trip(hf_pair):
    from ember.models.hf import config_from_hf, from_hf_state_dict, hf_key_to_ember
    from ember.models.transformer import Transformer

    cfg = config_from_hf(hf_pair["config"])
    ember_sd = from_hf_state_dict(hf_pair["dense"], cfg)
    whole = Transformer(cfg)
    whole.load_state_dict(ember_sd)
    quantize_model_(whole)

    # Tensor by tensor into a meta-device model, as models/loading.py streams shards.
    streamed = _meta_model(cfg)
    names = load_quantized_(streamed, iter(ember_sd.items()), device="cpu",
                            compute_dtype=torch.float32)
    assert len(names) == 14
    prequantized = _meta_model(cfg)
    names = load_bnb_quantized_(prequantized, iter(hf_pair["bnb"].items()), device="cpu",
                                compute_dtype=torch.float32, rename=hf_key_to_ember)
    assert len(names) == 14 and isinstance(prequantized.lm_head, nn.Linear)
    placeholder = Transformer(cfg)
    replace_linears_with_4bit_(placeholder)
    for key, tensor in ember_sd.items():
        if not assign_quantized_(placeholder, key, tensor):
            placeholder.get_parameter(key).data.copy_(tensor)

    reloaded = Transformer(cfg)
    replace_linears_with_4bit_(reloaded)
    reloaded.load_state_dict(whole.state_dict())  # bnb-format keys into empty Linear4bit

    from ember.models.loading import load_hf_folder

    loaded = load_hf_folder(hf_pair["dense_dir"], quantize="nf4")  # the loader's nf4 hook

    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        ref = whole(ids)
        for other in (streamed, prequantized, placeholder, reloaded, loaded):
            assert torch.equal(other(ids), ref)
        dequantize_model_(reloaded, torch.float32)
        assert not any(isinstance(m, Linear4bit) for m in reloaded.modules())
        assert torch.equal(reloaded(ids), ref)


def test_quantize_while_loading_without_double_quant_is_bnbs(hf_pair):
    """``double_quant=False``: the bytes transformers + bitsandbytes write for
    ``bnb_4bit_use_double_quant=False`` (plain fp32 absmax per block), and its logits."""
    transformers = pytest.importorskip("transformers")
    from ember.models.loading import load_hf_folder

    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32)
    hf_q = transformers.LlamaForCausalLM.from_pretrained(
        hf_pair["dense_dir"], quantization_config=qcfg, device_map="cpu")
    model = load_hf_folder(hf_pair["dense_dir"], quantize="nf4", double_quant=False)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    hf_modules = dict(hf_q.named_modules())
    for name, m in layers:
        assert not m.quant_weight.state.nested
        w = hf_modules["model." + name.replace("attn.", "self_attn.")].weight
        assert torch.equal(m.quant_weight.packed, w.data.view(torch.uint8).reshape(-1, 1))
        assert torch.equal(m.quant_weight.state.absmax, w.quant_state.absmax)
    ids = torch.randint(0, hf_pair["config"]["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_q(ids).logits, rtol=0, atol=1e-4)


def test_lora_over_nf4_base_trains_only_adapters():
    from ember.models.lora import LoRAConfig, apply_lora, lora_parameters

    lin = nn.Linear(64, 48)
    model = nn.Sequential()
    model.add_module("q_proj", lin)
    quantize_model_(model)
    base_out = model(torch.randn(3, 64))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj",)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.q_proj.base(x))  # B = 0 at init
    model(x).square().sum().backward()
    params = lora_parameters(model)
    assert len(params) == 2 and all(p.grad is not None for p in params)
    assert model.q_proj.base.bias.grad is None and base_out.shape == (3, 48)


def test_nf4_state_dict_entries_match_bnb_quant_state_in_bf16():
    w = torch.randn(40, 96, dtype=torch.bfloat16)
    pb, sb = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4_to_bnb(NF4Weight.quantize(w), "weight")
    theirs = {"weight." + k: v for k, v in sb.as_dict(packed=True).items()}
    theirs["weight"] = pb
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = nf4_from_bnb(theirs, "weight")
    assert back.dtype == torch.bfloat16 and torch.equal(back.dequantize(),
                                                        bnbf.dequantize_4bit(pb, sb))


def test_module_moves_and_errors():
    q = Linear4bit.from_linear(nn.Linear(64, 8))
    assert q.to(torch.float16).quant_weight.state.absmax.dtype == torch.uint8  # no dtype cast
    assert q.bias.dtype == torch.float16
    with pytest.raises(EmberError, match="no weight"):
        Linear4bit(64, 8)(torch.randn(2, 64))
    with pytest.raises(EmberError, match="does not fit"):
        Linear4bit(64, 8).set_weight(torch.randn(8, 32))
    sd = nf4_to_bnb(NF4Weight.quantize(torch.randn(8, 64)), "w")
    sd["w.quant_state.bitsandbytes__fp4"] = sd.pop("w.quant_state.bitsandbytes__nf4")
    with pytest.raises(EmberError, match="its JSON says quant_type 'nf4'"):
        nf4_from_bnb(sd, "w")
    for bad in ({"quant_method": "gptq"}, {"quant_method": "bitsandbytes"},
                {"quant_method": "bitsandbytes", "load_in_4bit": True,
                 "bnb_4bit_quant_type": "int4"}):
        with pytest.raises(EmberError):
            check_quantization_config(bad)
    check_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
                               "bnb_4bit_quant_type": "fp4"})  # tests/models/test_bnb_variants
    # 8-bit checkpoints load, dequantized (tests/models/test_bnb_int8.py)
    check_quantization_config({"quant_method": "bitsandbytes", "load_in_8bit": True})


@pytest.mark.parametrize("double_quant,quant_type", [(True, "nf4"), (False, "nf4"),
                                                     (True, "fp4")])
def test_flat_storage_holds_bnbs_bytes_as_one_parameter(double_quant, quant_type):
    """``store_flat_`` (what FSDP shards): one frozen bf16 Parameter whose views are exactly
    bitsandbytes' tensors, the same outputs, no dtype cast, and a copy built from the layout
    alone (another process's meta model) filled by ``load_state_dict``."""
    w = torch.randn(24, 97 * 2)  # 4-bit blocks of 64 straddle rows; an odd block count
    pb, sb = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                compress_statistics=double_quant)
    theirs = {"weight." + k: v for k, v in sb.as_dict(packed=True).items()}
    theirs["weight"] = pb
    q = Linear4bit(w.shape[1], w.shape[0])
    q.set_weight(nf4_from_bnb(theirs, "weight"))
    x = torch.randn(3, w.shape[1])
    want = q(x)
    q.store_flat_()
    (name, p), = ((n, p) for n, p in q.named_parameters() if n != "bias")
    assert name == "nf4_storage" and p.dim() == 1 and p.dtype == torch.bfloat16
    assert not p.requires_grad and p.numel() * 2 == q.nf4_layout.nbytes
    mine = nf4_to_bnb(q.quant_weight, "weight")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(q(x), want)
    assert q.state_dict().keys() == {"bias", "nf4_storage"}
    raw = p.detach().view(torch.int16).clone()  # bf16 NaN payloads: compare the bits
    q.half().float()
    assert torch.equal(q.nf4_storage.view(torch.int16), raw)
    with pytest.raises(EmberError, match="cannot be replaced"):
        q.set_weight(w)
    copy = Linear4bit(w.shape[1], w.shape[0])
    copy.store_flat_(q.nf4_layout)
    assert copy.nf4_storage.is_meta
    copy.to_empty(device="cpu")
    copy.load_state_dict(q.state_dict())
    assert torch.equal(copy.nf4_storage.view(torch.int16), raw)
    assert "flat storage" in repr(copy)


def test_classifier_head_stays_dense_as_transformers_keeps_it(tmp_path):
    """transformers' bitsandbytes loading keeps a *ForSequenceClassification head (``score``, the
    last module) dense, and PEFT trains it whole: Ember quantized it, so its class logits
    differed and ``score.weight`` (set trainable by the classification trainer) did not exist."""
    transformers = pytest.importorskip("transformers")
    from ember.models.heads import classify
    from ember.models.loading import load_pretrained

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=qcfg, device_map="cpu")
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(tmp_path, quantize="nf4", double_quant=False)
    dense = {n for n, m in hf.named_modules() if type(m) is nn.Linear}
    assert dense == {"score"}
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == dense
    assert torch.equal(model.score.weight, hf.score.weight)
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(classify(model, ids), hf(input_ids=ids).logits)
    assert quantize_model_(model) == []  # already quantized; score still skipped


def test_non_finite_weight_names_its_tensor_while_quantizing(tmp_path):
    """A NaN in a checkpoint's linear weight: transformers + bitsandbytes load it into NaN
    logits without a word; Ember's quantize-while-loading (and quantize_model_) crashed with an
    IndexError deep in the double quantization. Now: an error naming the tensor."""
    transformers = pytest.importorskip("transformers")
    from ember.models.loading import load_pretrained

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    hf.save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)
    hf_q = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg,
                                                         device_map="cpu")
    with torch.no_grad():
        assert not torch.isfinite(hf_q(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(EmberError, match=r"layers\.1\.mlp\.down_proj\.weight: .*inf or NaN"):
        load_pretrained(tmp_path, quantize="nf4")
    with pytest.warns(UserWarning, match="tokenizer"):
        dense, _ = load_pretrained(tmp_path)
    with pytest.raises(EmberError, match=r"layers\.1\.mlp\.down_proj\.weight: .*inf or NaN"):
        quantize_model_(dense)


def test_skip_as_one_string_is_one_pattern(hf_pair):
    """skip="lm_head" was iterated character by character, so nothing was skipped and the head
    got quantized; transformers' bnb loading (the oracle) keeps lm_head dense."""
    from ember.models.loading import load_pretrained

    assert type(hf_pair["hf_model"].lm_head) is nn.Linear
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(hf_pair["dense_dir"])
    names = quantize_model_(model, skip="lm_head")
    assert "lm_head" not in names and type(model.lm_head) is nn.Linear
    assert len(names) == 14  # 7 projections x 2 layers, as transformers' Linear4bit layers
    assert len([m for m in hf_pair["hf_model"].modules() if type(m).__name__ == "Linear4bit"]) == 14
