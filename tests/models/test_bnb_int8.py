"""bitsandbytes 8-bit (LLM.int8) checkpoints, made at test time by transformers +
bitsandbytes on the CPU: Ember's dense weights equal bitsandbytes' own dequantization bit for
bit, logits match transformers on those weights, and the checkpoint can be the base of QLoRA."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.nf4 import Linear4bit
from tests.models.test_hf import BASE, VOCAB, _randomize

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    """A Qwen2 (biases) saved dense and as LLM.int8, sharded so that scales and weights can sit
    in different files; the head is kept dense (bnb's default skip)."""
    root = tmp_path_factory.mktemp("int8")
    config = transformers.Qwen2Config(**BASE, hidden_size=48)
    dense = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(dense, seed=5)
    dense.save_pretrained(root / "dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = transformers.AutoModelForCausalLM.from_pretrained(
            root / "dense", device_map="cpu",
            quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
        q.save_pretrained(root / "int8", max_shard_size="20KB")
    return root


def _stored(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for key, file in index.items():
        with safe_open(folder / file, "pt") as f:
            out[key] = f.get_tensor(key)
    return out


def _dequantized(stored) -> dict[str, torch.Tensor]:
    """HF key -> the dense weight, bitsandbytes dequantizing the int8 ones."""
    out = {}
    for key, t in stored.items():
        if key.endswith((".SCB", ".weight_format")):
            continue
        scb = key.removesuffix("weight") + "SCB"
        out[key] = (bnb.functional.int8_vectorwise_dequant(t, stored[scb])
                    if t.dtype == torch.int8 else t)
    return out


@torch.no_grad()
def test_weights_and_logits(int8_folder):
    stored = _stored(int8_folder / "int8")
    assert sum(t.dtype == torch.int8 for t in stored.values()) == 14  # 7 linears x 2 layers
    want = _dequantized(stored)
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(int8_folder / "int8", "float32")
    ours = model.state_dict()
    assert ours["layers.0.attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(ours["layers.1.mlp.down_proj.weight"],
                       want["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours["layers.0.attn.k_proj.weight"],
                       want["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(ours["layers.0.attn.k_proj.bias"],
                       want["model.layers.0.self_attn.k_proj.bias"])
    # transformers' dense model holding bitsandbytes' dequantized weights is the oracle
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        int8_folder / "dense", attn_implementation="eager").eval()
    hf.load_state_dict(want, strict=False)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    # and it is an 8-bit copy of the dense model: close to it, not equal
    dense = transformers.AutoModelForCausalLM.from_pretrained(int8_folder / "dense").eval()
    gap = (model(ids) - dense(ids).logits).abs().max()
    assert 0 < gap < 0.05


def test_qlora_from_an_int8_checkpoint(int8_folder):
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(int8_folder / "int8", "float32", quantize="nf4")
    assert isinstance(model.layers[0].attn.q_proj, Linear4bit)


def test_broken_int8_checkpoints_are_refused(int8_folder, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(int8_folder / "int8", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    scb = "model.layers.0.self_attn.q_proj.SCB"
    file = bad / index["weight_map"].pop(scb)
    with safe_open(file, "pt") as f:
        keep = {k: f.get_tensor(k) for k in f.keys() if k != scb}
    save_file(keep, file, metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EmberError, match="q_proj.weight is int8 without its bitsandbytes row "
                                         "scales \\(model.layers.0.self_attn.q_proj.SCB\\)"):
        load_pretrained(bad, "float32")


def test_an_int8_state_dict_is_not_taken_for_a_4bit_one(int8_folder):
    from ember.models.nf4 import load_bnb_4bit_state

    with pytest.raises(EmberError, match="8-bit \\(LLM.int8\\) state dict"):
        load_bnb_4bit_state(_stored(int8_folder / "int8"),
                            {"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_int8_weights_in_a_gpu_tile_layout_are_refused(int8_folder, tmp_path):
    """weight_format 2 (old bitsandbytes' col_turing) holds the int8 weight in GPU tiles: read
    as rows it is scrambled, so it is refused as bitsandbytes does (was: loaded as rows)."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "tiled"
    shutil.copytree(int8_folder / "int8", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight_format"
    file = bad / index["weight_map"][key]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors[key].item() == 0  # 'row', as transformers writes it today
    tensors[key] = torch.tensor(2, dtype=torch.uint8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(EmberError, match="up_proj.weight_format is 'col_turing'; only int8 "
                                         "weights in bitsandbytes' 'row' format load"):
        load_pretrained(bad, "float32")


def test_an_int8_checkpoint_whose_config_says_4bit_is_refused_by_name(int8_folder, tmp_path):
    """int8 is also a bnb_4bit_quant_storage dtype, so a 4-bit config reads int8 tensors: an
    LLM.int8 weight (with its SCB) under a load_in_4bit quantization_config is named as such."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int8_folder / "int8", bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"].update(load_in_8bit=False, _load_in_8bit=False,
                                         load_in_4bit=True, _load_in_4bit=True)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(EmberError, match=r"has dtype I8.*an 8-bit LLM.int8 weight, with its "
                                         r"model\.layers\.\d\..*\.SCB.*load_in_8bit"):
        load_pretrained(bad, "float32")
