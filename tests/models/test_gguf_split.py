"""GGUF models split in several files, as llama.cpp's gguf-split and ``convert_hf_to_gguf.py
--split-max-size`` write them (``<prefix>-00001-of-00003.gguf`` ..., ``split.*`` metadata, the
model's metadata in the first file only): the first file loads the whole model, through the cache
too, and the wrong or a missing file is named (was: 'tensors missing' from the first file)."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from gguf import GGUFWriter

import tests.models.test_gguf as tiny
from ember import EmberError
from ember.models.gguf import GGUFFile, load_gguf


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A tiny model written by gguf's own writer in 3 files of at most 8 tensors, and the fp32
    weights it must load to."""
    monkeypatch.setattr(tiny, "GGUFWriter", functools.partial(GGUFWriter, split_max_tensors=8))
    expected = tiny.write_tiny_gguf(tmp_path / "model.gguf")
    files = sorted(tmp_path.glob("model-*.gguf"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return files, expected


def test_the_first_file_loads_the_whole_model(split_model, tmp_path, monkeypatch):
    files, expected = split_model
    with GGUFFile(files[0]) as g:
        assert {t.shard for t in g.tensors.values()} == {0, 1, 2}
        assert len(g.tensors) == g.metadata["split.tensors.count"] == 21
    cfg, sd, tok = load_gguf(files[0])
    assert cfg.num_layers == 2 and set(sd) == set(expected)
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    assert tok.eos_token == "<|im_end|>"

    from ember.models.loading import load_pretrained

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    model, _ = load_pretrained(files[0])
    assert torch.equal(model.state_dict()["layers.1.mlp.down_proj.weight"],
                       expected["layers.1.mlp.down_proj.weight"])


def test_another_file_or_a_missing_one_is_named(split_model, tmp_path):
    files, _ = split_model
    with pytest.raises(EmberError, match="file 2 of a model split in 3.*open the first, named "
                                         "<prefix>-00001-of-00003.gguf"):
        load_gguf(files[1])
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files[0], alone / files[0].name)
    shutil.copy(files[2], alone / files[2].name)
    with pytest.raises(EmberError, match="split in 3 files and model-00002-of-00003.gguf is "
                                         "missing"):
        load_gguf(alone / files[0].name)
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(files[0], renamed)
    with pytest.raises(EmberError, match="file 1 of a model split in 3"):
        load_gguf(renamed)
