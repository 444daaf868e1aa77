"""``import_gguf`` streams: each GGUF tensor is dequantized when its shard is written (one tensor
in memory at a time, not the whole model in fp32), each exactly once, and the sharded folder it
writes is the model ``load_gguf`` reads, which transformers loads to the original logits."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from ember.models import gguf
from ember.models.gguf import import_gguf
from ember.models.loading import load_pretrained
from tests.models.test_gguf import _offline, write_tiny_gguf
from tests.models.test_gguf_export_moe import _export, _ids, _logits, _model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


def _watch_dequantization(monkeypatch):
    """Record, at every GGUF tensor dequantized, how many earlier ones are still alive."""
    made, alive_at_call, names = [], [], []
    real = gguf.GGUFFile.tensor

    def tensor(self, name):
        alive_at_call.append(sum(r() is not None for r in made))
        names.append(name)
        t = real(self, name)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(gguf.GGUFFile, "tensor", tensor)
    return alive_at_call, names


def test_import_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    expected = write_tiny_gguf(src)
    alive, names = _watch_dequantization(monkeypatch)
    out = import_gguf(src, tmp_path / "out", max_shard_size=1)  # a shard per tensor

    assert len(names) == len(set(names)) == len(gguf.GGUFFile(src).tensors)
    assert max(alive) <= 2, alive  # the one being written and the last loop variable
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(index["weight_map"]) > 10
    model, _ = load_pretrained(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in expected.items())


def test_stacked_experts_dequantized_once_and_load_in_transformers(tmp_path, monkeypatch):
    """A Mixtral file's stacked expert tensors split into one HF weight per expert, over several
    shards: each stack is dequantized once; transformers loads the folder to the HF logits."""
    hf, model = _model(tmp_path, "mixtral")
    path = _export(model, tmp_path / "m.gguf")
    _, names = _watch_dequantization(monkeypatch)
    out = import_gguf(path, tmp_path / "imported", max_shard_size=40_000)
    assert len(names) == len(set(names))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    with _offline():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids()
    assert (_logits(theirs, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4
