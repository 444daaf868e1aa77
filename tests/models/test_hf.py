"""Hugging Face interop: config.json both styles, state-dict key table, safetensors loading/saving,
logits parity with transformers on tiny random models, and clear errors for bad folders."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.models import gguf_cache
from ember.models.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict
from ember.models.loading import iter_checkpoint, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (config class, model class, config kwargs). Widths: 48 (power of 2 times 3), 40 (not a
# multiple of a power of 2 above 8); head_dim != hidden / heads where set explicitly.
CASES = {
    "llama": ("LlamaConfig", dict(hidden_size=48)),
    "llama_tied_llama3": (
        "LlamaConfig",
        dict(hidden_size=48, tie_word_embeddings=True, rope_parameters=LLAMA3),
    ),
    "llama_bias_linear_hd": (
        "LlamaConfig",
        dict(
            hidden_size=40,
            head_dim=8,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "mistral_window": ("MistralConfig", dict(hidden_size=48, sliding_window=5)),
    "qwen2_bias": (
        "Qwen2Config",
        dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1),
    ),
    "qwen2_all_sliding": (
        "Qwen2Config",
        dict(hidden_size=48, use_sliding_window=True, sliding_window=6, max_window_layers=0),
    ),
    "qwen2_mixed_sliding": (  # layer 0 full attention, layer 1 a window of 6
        "Qwen2Config",
        dict(hidden_size=48, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen3_tied_hd": ("Qwen3Config", dict(hidden_size=40, head_dim=16, tie_word_embeddings=True)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norms to 1 and biases to 0; randomize every weight so a dropped
    bias or norm shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)


def _make(tmp_path, case: str, dtype=torch.float32, **save_kw):
    cfg_name, kw = CASES[case]
    config = getattr(transformers, cfg_name)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, seed=len(case))
    model.set_attn_implementation("eager")
    model.to(dtype).eval()
    folder = tmp_path / case
    model.save_pretrained(folder, **save_kw)
    return model, folder


def _ids(T: int = 20, B: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(T))


def _hf_load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def _hf_logits(model, ids):
    return model(ids).logits


def _load(folder, **kw):
    with pytest.warns(UserWarning, match="tokenizer"):
        model, tok = load_pretrained(folder, **kw)
    assert tok is None
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_parity(tmp_path, case):
    hf, folder = _make(tmp_path, case)
    model = _load(folder)
    ids = _ids()
    ref = _hf_logits(hf, ids)
    out = model(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    if "window" in case or "sliding" in case:
        # The window must actually bite on this sequence length in transformers' eager path,
        # otherwise this parity would not test it.
        kw = {**hf.config.to_dict(), "sliding_window": None, "use_sliding_window": False}
        kw.pop("layer_types", None)
        full = transformers.AutoModelForCausalLM.from_config(hf.config.__class__(**kw))
        full.load_state_dict(hf.state_dict())
        full.set_attn_implementation("eager")
        assert (_hf_logits(full.eval(), ids) - ref).abs().max().item() > 1e-2
    if case == "llama_tied_llama3":
        assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.kind == "llama3"


def _legacy(raw: dict) -> dict:
    """transformers 4.x spelling of a 5.x config.json."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = (
        None
        if rope["rope_type"] == "default"
        else {
            "type" if rope["rope_type"] == "linear" else "rope_type": rope.pop("rope_type"),
            **rope,
        }
    )
    raw["torch_dtype"] = raw.pop("dtype")
    raw["transformers_version"] = "4.46.0"
    return raw


@pytest.mark.parametrize("case", ["llama_tied_llama3", "llama_bias_linear_hd", "qwen3_tied_hd"])
@torch.no_grad()
def test_legacy_config_style(tmp_path, case):
    hf, folder = _make(tmp_path, case)
    path = folder / "config.json"
    new = json.loads(path.read_text())
    old = _legacy(new)
    assert "rope_parameters" not in old and "dtype" not in old
    assert config_from_hf(old) == config_from_hf(new)
    path.write_text(json.dumps(old))
    ids = _ids(12)
    out = _load(folder)(ids)
    assert (out - _hf_logits(hf, ids)).abs().max().item() <= 1e-4
    # transformers reads the crafted legacy file as the same model.
    assert torch.equal(_hf_logits(_hf_load(folder), ids), _hf_logits(hf, ids))


def _st_summary(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            for k in g.keys():
                out[k] = g.get_tensor(k)
    return out


@pytest.mark.parametrize(
    "case,dtype",
    [
        ("llama_tied_llama3", torch.bfloat16),
        ("qwen2_all_sliding", torch.float32),
        ("qwen3_tied_hd", torch.float32),
        ("mistral_window", torch.bfloat16),
    ],
)
@torch.no_grad()
def test_round_trip_save(tmp_path, case, dtype):
    hf, folder = _make(tmp_path, case, dtype)
    model = _load(folder)
    assert model.embed.weight.dtype == dtype  # dtype=None keeps the stored dtype
    out = save_pretrained(model, tmp_path / "out")
    theirs, ours = _st_summary(folder), _st_summary(out)
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
    reloaded = _hf_load(out)
    assert reloaded.dtype == dtype
    ids = _ids(12)
    assert torch.equal(_hf_logits(reloaded, ids), _hf_logits(_hf_load(folder), ids))
    # Ember reads its own output back to the same config.
    assert _load(out).cfg == model.cfg


@torch.no_grad()
def test_sharded_load_and_save(tmp_path):
    hf, folder = _make(tmp_path, "qwen2_bias", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model = _load(folder)
    ids = _ids(12)
    assert (model(ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4
    out = save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == files
    assert sorted(index["weight_map"]) == sorted(hf.state_dict())
    assert torch.equal(_hf_logits(_hf_load(out), ids), _hf_logits(_hf_load(folder), ids))
    # Saving over an existing model folder replaces it (the old shards are gone).
    save_pretrained(model, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip(case):
    cfg_name, kw = CASES[case]
    hf = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cfg_name)(**{**BASE, **kw})
    )
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    if cfg.tie_word_embeddings:
        # transformers' in-memory state dict has the tied head; its files don't. Accept both.
        assert "lm_head.weight" in sd
        ember = from_hf_state_dict(sd, cfg)
        del sd["lm_head.weight"]
    ember = from_hf_state_dict(sd, cfg)
    old_buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    assert from_hf_state_dict({**sd, **old_buffer}, cfg).keys() == ember.keys()
    back = to_hf_state_dict(ember, cfg)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    assert "lm_head.weight" not in ember if cfg.tie_word_embeddings else "lm_head.weight" in ember


def test_iter_checkpoint_streams_stored_tensors(tmp_path):
    hf, folder = _make(tmp_path, "qwen3_tied_hd", torch.bfloat16)
    got = dict(iter_checkpoint(folder))
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.torch_dtype == "bfloat16"
    assert got.keys() == from_hf_state_dict(hf.state_dict(), cfg).keys()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in got.values())


@torch.no_grad()
def test_dtype_and_config_export(tmp_path):
    hf, folder = _make(tmp_path, "llama_tied_llama3", torch.bfloat16)
    model = _load(folder, dtype="fp32")
    assert model.embed.weight.dtype == torch.float32 and model.cfg.torch_dtype == "bfloat16"
    assert model.inv_freq.dtype == torch.float32
    exact = model.inv_freq.clone()
    model.to(torch.bfloat16).to(torch.float32)  # .to() must not round the RoPE table
    assert torch.equal(model.inv_freq, exact)
    out = save_pretrained(model, tmp_path / "out", dtype=torch.bfloat16)
    raw = json.loads((out / "config.json").read_text())
    assert raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["bos_token_id"] == 1
    assert config_from_hf(raw) == model.cfg
    assert config_from_hf(config_to_hf(model.cfg)) == model.cfg


def _err(fn, *args, **kw) -> str:
    with pytest.raises(EmberError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_folders(tmp_path):
    hf, folder = _make(tmp_path, "llama")
    (tmp_path / "empty").mkdir()
    assert "config.json" in _err(load_pretrained, tmp_path / "empty")
    assert "nope" in _err(load_pretrained, tmp_path / "nope")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    assert "model.safetensors" in _err(load_pretrained, no_weights)

    # A pickle that would leave a marker file if anything ever unpickled it.
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (no_weights / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    msg = _err(load_pretrained, no_weights)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and not marker.exists()

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in _err(load_pretrained, folder)


def test_bad_shards(tmp_path):
    _, folder = _make(tmp_path, "llama", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    msg = _err(load_pretrained, folder)
    assert victim in msg and "listed in model.safetensors.index.json" in msg  # was: the shard


def _edit_weights(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_bad_weights(tmp_path):
    _, folder = _make(tmp_path, "llama")
    key = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(folder, lambda sd: sd.__setitem__(key, torch.zeros(8, 48)))
    msg = _err(load_pretrained, folder)
    assert key in msg and "(8, 48)" in msg and "(24, 48)" in msg
    _edit_weights(folder, lambda sd: sd.pop(key))
    assert key in _err(load_pretrained, folder)
    _edit_weights(
        folder,
        lambda sd: sd.update(
            {key: torch.zeros(24, 48), "model.layers.0.mlp.fancy.weight": torch.zeros(2)}
        ),
    )
    assert "model.layers.0.mlp.fancy.weight" in _err(load_pretrained, folder)
    _edit_weights(folder, lambda sd: sd.update({key: torch.zeros(24, 48, dtype=torch.int8)}))
    assert key in _err(load_pretrained, folder)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"architectures": ["LlamaForTokenClassification"]}, "LlamaForTokenClassification"),
        ({"rope_parameters": {"rope_type": "su", "factor": 4.0, "rope_theta": 1e4}}, "'su'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
            "low_freq_factor",
        ),
        ({"some_new_field": 1}, "some_new_field"),
        ({"hidden_act": "prelu"}, "prelu"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"hidden_size": "48"}, "hidden_size"),
        ({"dtype": "float8_e4m3fn"}, "float8_e4m3fn"),
    ],
)
def test_bad_configs(tmp_path, change, needle):
    _, folder = _make(tmp_path, "llama")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **change}))
    msg = _err(load_pretrained, folder)
    assert needle in msg and "config.json" in msg


@pytest.mark.parametrize("dtype", [["bfloat16"], ["float32", "bfloat16"]])
def test_a_dtype_that_is_not_a_name_is_refused_by_name(tmp_path, dtype):
    """config.json's dtype a list: transformers cannot load the folder (an IndexError from deep
    inside); Ember raised a bare TypeError (unhashable) instead of naming the field."""
    _, folder = _make(tmp_path, "llama")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "dtype": dtype}))
    with pytest.raises(Exception):  # noqa: B017 (the oracle: transformers fails too, any error)
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    msg = _err(load_pretrained, folder)
    assert "dtype" in msg and "config.json" in msg


@pytest.mark.parametrize("architectures", [True, False])
def test_a_model_type_that_is_not_a_name_is_refused_by_name(tmp_path, architectures):
    """config.json's model_type a list (with or without architectures, whose absence makes the
    loader look for a classifier's score.weight): transformers cannot load the folder
    (unhashable); Ember raised a bare TypeError from deep inside instead of naming the field."""
    _, folder = _make(tmp_path, "llama")
    raw = json.loads((folder / "config.json").read_text())
    raw = {**raw, "model_type": ["llama"]}
    if not architectures:
        del raw["architectures"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(Exception):  # noqa: B017 (the oracle: transformers fails too, any error)
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    msg = _err(load_pretrained, folder)
    assert "model_type" in msg and "config.json" in msg


def test_qwen_window_semantics():
    base = {**BASE, "hidden_size": 48, "model_type": "qwen2"}
    assert config_from_hf({**base, "sliding_window": 8}).sliding_window is None  # not enabled
    assert (
        config_from_hf(
            {**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}
        ).sliding_window
        is None
    )  # no layer >= 2
    mixed = {**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    cfg = config_from_hf(mixed)
    assert cfg.layer_types == ("full_attention", "sliding_attention")
    assert [cfg.window(i) for i in range(2)] == [None, 8]
    back = config_to_hf(cfg)
    assert back["layer_types"] == list(cfg.layer_types) and back["max_window_layers"] == 1
    types = {
        **base,
        "use_sliding_window": True,
        "sliding_window": 8,
        "layer_types": ["sliding_attention"] * 2,
    }
    assert config_from_hf(types).sliding_window == 8
    assert "layer_types" in _err(config_from_hf, {**types, "layer_types": ["full_attention"]})


def test_export_refuses_what_hf_cannot_express(tmp_path):
    cfg = config_from_hf({**BASE, "hidden_size": 48, "model_type": "llama"})
    assert "sliding_window" in _err(config_to_hf, cfg.replace(sliding_window=4))
    assert "qk_norm" in _err(config_to_hf, cfg.replace(qk_norm=True))
    assert "attention_out_bias" in _err(config_to_hf, cfg.replace(model_type="qwen2"))


def test_save_is_atomic(tmp_path, monkeypatch):
    _, folder = _make(tmp_path, "llama")
    model = _load(folder)
    import ember.models.shard_writer as shard_writer

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shard_writer, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no half folder, no temp dir
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk full"):  # a failed save into a folder of
        save_pretrained(model, tmp_path / "busy")  # other files leaves them as they were
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    monkeypatch.undo()


def test_gguf_path_imports_once_into_cache(tmp_path, monkeypatch):
    """A .gguf path is imported (by ember.models.gguf.import_gguf) into a cache folder keyed by
    the file's hash, once; the import itself is tested with the GGUF code."""
    import sys
    import types

    _, folder = _make(tmp_path, "llama")
    calls = []

    def fake_import(src, out_dir):
        calls.append(src)
        save_pretrained(_load(folder), out_dir)

    monkeypatch.setitem(
        sys.modules, "ember.models.gguf", types.SimpleNamespace(import_gguf=fake_import)
    )
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    a = _load(gguf)
    b = _load(gguf)
    assert len(calls) == 1 and a.cfg == b.cfg
    cache = tmp_path / "cache" / "gguf"
    (first,) = cache.iterdir()
    assert first.name.startswith("m-")
    # An import cached under the old naming (no importer version), and another Ember version
    # (its models/ source changed): the file is imported afresh; the other imports go once
    # unused for GGUF_STALE_AFTER_S (another version may be loading from them right now).
    legacy = cache / first.name.rsplit("-", 1)[0]
    shutil.copytree(first, legacy)
    monkeypatch.setattr(gguf_cache, "importer_digest", lambda: "0ther000")
    c = _load(gguf)
    assert len(calls) == 2 and c.cfg == a.cfg
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [legacy.name, first.name, legacy.name + "-0ther000"])
    _age(first, legacy)
    _load(gguf)
    assert len(calls) == 2
    assert [p.name for p in cache.iterdir()] == [legacy.name + "-0ther000"]


def _age(*folders) -> None:
    import os
    import time

    old = time.time() - gguf_cache.GGUF_STALE_AFTER_S - 60
    for f in folders:
        os.utime(f, (old, old))


def test_gguf_cache_two_versions_never_remove_a_folder_in_use(tmp_path, monkeypatch):
    """Two Ember versions (two venvs) sharing the cache: the second one's import of a file
    removed the first one's folder, which the first may be loading from at that moment.
    transformers still loads the first version's folder (the same logits as the second's), and
    the folder goes only once unused for GGUF_STALE_AFTER_S."""
    import sys
    import types

    from ember.models.hub import resolve_model

    _, folder = _make(tmp_path, "llama")
    monkeypatch.setitem(sys.modules, "ember.models.gguf", types.SimpleNamespace(
        import_gguf=lambda src, out: shutil.copytree(folder, out)))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(gguf_cache, "importer_digest", lambda: "aaaa0000")
    old = resolve_model(gguf)  # version A resolved it and is about to load it
    monkeypatch.setattr(gguf_cache, "importer_digest", lambda: "bbbb0000")
    new = resolve_model(gguf)
    assert old != new and old.is_dir() and new.is_dir()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(old).eval()(ids).logits
        assert torch.allclose(_load(new)(ids), want, atol=1e-5)
    _age(old)
    assert resolve_model(gguf) == new and not old.exists()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [new.name]


def test_tokenizer_travels_with_the_model(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    _, folder = _make(tmp_path, "qwen2_bias")
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "again"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    model, tok = load_pretrained(folder)
    ids = tok.encode("hello world again")
    assert [i for i in ids if i > 1] == [2, 3, 4]
    out = save_pretrained(model, tmp_path / "out", tok)
    model2, tok2 = load_pretrained(out)
    assert tok2.encode("hello world again") == ids and model2.cfg == model.cfg


def test_quantize_call_site(tmp_path, monkeypatch):
    """quantize='nf4' hands ember.models.nf4.load_quantized_ the meta model and the raw tensor
    stream (stored dtype, on CPU); the NF4 code itself is tested with it."""
    import sys
    import types

    import ember.models.loading as loading

    _, folder = _make(tmp_path, "llama", torch.bfloat16)
    assert "quantize" in _err(load_pretrained, folder, quantize="int8")
    seen = {}

    def load_quantized_(model, tensors, *, device, compute_dtype, double_quant, fused):
        assert fused == []  # no fused weights in a Llama
        assert double_quant is True  # the default, as bitsandbytes' QLoRA recipe
        assert all(p.is_meta for p in model.parameters())
        pairs = list(tensors)
        seen.update({k: t.dtype for k, t in pairs})
        loading._assign_(model, pairs, device, compute_dtype)

    monkeypatch.setitem(
        sys.modules, "ember.models.nf4", types.SimpleNamespace(load_quantized_=load_quantized_)
    )
    with pytest.warns(UserWarning):
        model, _ = load_pretrained(folder, dtype="float32", quantize="nf4")
    assert set(seen) == set(model.state_dict()) and set(seen.values()) == {torch.bfloat16}
    assert model.embed.weight.dtype == torch.float32 and not model.inv_freq.is_meta
