"""transformers' PyTorch checkpoints (pytorch_model.bin, sharded with pytorch_model.bin.index.json)
load through torch.load(weights_only=True): the same model as the safetensors folder and as
transformers reads the .bin folder; a pickle that would run code is refused without running."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.models.loading import load_pretrained
from tests.models.test_hf import _hf_load, _hf_logits, _ids, _load, _make


def _to_bin(folder, out, shards: int = 1):
    """The safetensors folder rewritten as torch.save state dicts, as transformers 4.x saved."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    sd = load_file(folder / "model.safetensors")
    if shards == 1:
        torch.save(sd, out / "pytorch_model.bin")
        return out
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, out / name)
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("shards", [1, 3])
@torch.no_grad()
def test_bin_folders_load_like_safetensors(tmp_path, shards):
    _, folder = _make(tmp_path, "qwen3_tied_hd")
    binary = _to_bin(folder, tmp_path / "bin", shards)
    ids = _ids()
    ours, ref = _load(binary)(ids), _load(folder)(ids)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(ours, _hf_logits(_hf_load(binary), ids), rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(binary, "bfloat16", quantize="nf4")
    assert model.layers[0].attn.q_proj.__class__.__name__ == "Linear4bit"


def test_code_in_a_bin_file_never_runs(tmp_path):
    _, folder = _make(tmp_path, "llama")
    evil_dir = _to_bin(folder, tmp_path / "evil")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sd = torch.load(evil_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**sd, "model.norm.weight": Evil()}, evil_dir / "pytorch_model.bin")
    with pytest.raises(EmberError, match="torch.load\\(weights_only=True\\) refused it"):
        load_pretrained(evil_dir)
    assert not marker.exists()
    torch.save([1, 2], evil_dir / "pytorch_model.bin")
    with pytest.raises(EmberError, match="does not hold a state dict"):
        load_pretrained(evil_dir)
