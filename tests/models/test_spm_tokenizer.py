"""SentencePiece GGUF vocabularies (``tokenizer.ggml.model = "llama"``): a real SentencePiece BPE
model is trained at test time, written into GGUF metadata the way llama.cpp's converter does
(pieces, scores, token types, no merges), and read back. Oracles: transformers' GGUF tokenizer
(ids, for Llama-style, Gemma-style and Phi-3-style files) and SentencePiece itself (ids)."""

from __future__ import annotations

from collections import Counter

import pytest
from gguf import GGUFWriter

from ember import EmberError
from ember.models.gguf import GGUFFile
from ember.models.spm import recovered_merges
from ember.models.tokenizer import load_tokenizer, tokenizer_from_gguf
from tests.models.test_gguf import _offline, _put
from tests.models.test_tokenizer import TEXTS

spm = pytest.importorskip("sentencepiece")

# What the vocabulary is learned from: the test texts plus enough repetition for long pieces.
CORPUS = TEXTS * 3 + ["the quick brown fox jumps over the lazy dog"] * 20 + [
    "hello world, hello there. " * 5, "  indented  code:\n\tif x:\n\t\treturn 1\n"]
EXTRA = ["the  lazy   dog", " leading space", "trailing space ", "\n\nnew lines\n",
         "unseen: ζψ Ж ☃ 𝔘", "<s>inline special</s> and <|im_start|>user", "x" * 40]
# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    # Llama's settings: BPE, byte fallback, no normalization, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=600,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>"], minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(d / "m.model"))


def _metadata(sp, arch: str, **extra) -> dict:
    """The tokenizer metadata llama.cpp's convert_hf_to_gguf writes for a SentencePiece model."""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        piece = sp.id_to_piece(i)
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else BYTE if sp.is_byte(i) else USER_DEFINED if piece == "<|im_start|>"
                     else NORMAL)
    return {"general.architecture": arch, "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0, **extra}


def _write(path, md: dict):
    w = GGUFWriter(str(path), md["general.architecture"])
    for k, v in md.items():
        if k != "general.architecture":
            _put(w, k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _theirs(path):
    transformers = pytest.importorskip("transformers")
    with _offline():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "phi3"])
def test_ids_match_transformers(sp_model, arch, tmp_path):
    # convert_hf_to_gguf.py writes add_space_prefix = false for Gemma 2/3
    extra = {"tokenizer.ggml.add_space_prefix": False} if arch.startswith("gemma") else {}
    path = _write(tmp_path / f"{arch}.gguf", _metadata(sp_model, arch, **extra))
    with GGUFFile(path) as g:
        ours = tokenizer_from_gguf(g.metadata)
    theirs = _theirs(path)
    for text in TEXTS + EXTRA:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text)["input_ids"], (arch, text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (arch, text)
    assert ours.bos_token == theirs.bos_token == "<s>" and ours.add_bos_token
    # ember import-gguf writes tokenizer.json: transformers and Ember read it back alike.
    ours.save_pretrained(tmp_path / "hf")
    import transformers

    folder = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    again = load_tokenizer(tmp_path / "hf")
    for text in TEXTS + EXTRA:
        ids = ours.encode(text, add_special_tokens=True)
        assert folder(text)["input_ids"] == ids == again.encode(text, add_special_tokens=True)


def test_llama_style_equals_sentencepiece_and_round_trips(sp_model, tmp_path):
    path = _write(tmp_path / "m.gguf", _metadata(sp_model, "llama"))
    with GGUFFile(path) as g:
        ours = tokenizer_from_gguf(g.metadata)
    # Two known differences, both transformers' (the oracle above) as much as ours: SentencePiece
    # does not know special tokens inside text, and it prepends U+2581 even to text that starts
    # with a space, where transformers' GGUF tokenizer ("first" Metaspace scheme) does not.
    for text in TEXTS + EXTRA:
        if "<" in text or text[:1].isspace():
            continue
        ids = ours.encode(text)
        assert ids == sp_model.encode(text), text
        assert ours.decode(ids) == sp_model.decode(ids) == text, text
    assert ours.encode(" a") == sp_model.encode(" a")[1:]
    # Byte fallback: characters no piece covers become <0xXX> pieces and decode back.
    ids = ours.encode("☃")
    assert [ours.id_to_token(i) for i in ids] == ["▁", "<0xE2>", "<0x98>", "<0x83>"]
    assert ours.decode(ids) == "☃"
    # Control tokens stay whole; user-defined ones too, and decode as text.
    ids = ours.encode("<s>a<|im_start|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 3
    assert ours.decode(ids) == "a<|im_start|>"


def test_no_space_prefix_flag(sp_model):
    ours = tokenizer_from_gguf(_metadata(sp_model, "llama",
                                         **{"tokenizer.ggml.add_space_prefix": False}))
    ids = ours.encode("hello")
    assert ours.id_to_token(ids[0])[0] != "▁" and ours.decode(ids) == "hello"


def test_bos_flag_and_merges_from_file(sp_model):
    md = _metadata(sp_model, "llama", **{"tokenizer.ggml.add_bos_token": False})
    tok = tokenizer_from_gguf(md)
    assert not tok.add_bos_token and tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    # A file that lists its merges uses them (here: the recovered ones, so the ids agree).
    rank = dict(zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], strict=True))
    merges = [f"{a} {b}" for a, b in recovered_merges(md["tokenizer.ggml.tokens"], rank)]
    with_merges = tokenizer_from_gguf({**md, "tokenizer.ggml.merges": merges})
    for text in TEXTS:
        assert with_merges.encode(text) == tok.encode(text)


def test_recovered_merges_order():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    rank = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -2.0, "abc": -3.0}
    # Best score first; "abc" splits two ways, the longer left part first.
    assert recovered_merges(tokens, rank) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_bad_metadata(sp_model):
    md = _metadata(sp_model, "llama")
    del md["tokenizer.ggml.scores"]
    with pytest.raises(EmberError, match="needs tokenizer.ggml.scores"):
        tokenizer_from_gguf(md)
    with pytest.raises(EmberError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf({**_metadata(sp_model, "llama"), "tokenizer.ggml.model": "bert"})


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_unknown_piece_in_text_is_one_special_token(sp_model, arch, tmp_path):
    """The unknown piece (type 2) is matched whole in text and skipped when decoding, as
    transformers' GGUF tokenizer (and llama.cpp) do (was: "<unk>" spelled out piece by piece)."""
    path = _write(tmp_path / f"{arch}.gguf", _metadata(sp_model, arch))
    with GGUFFile(path) as g:
        ours = tokenizer_from_gguf(g.metadata)
    theirs = _theirs(path)
    for text in ["<unk>", "a <unk> b", "x<unk><s>y", "<unk"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text)["input_ids"], (arch, text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), (arch, text, skip)
    assert 0 in ours.encode("a <unk> b") and 0 in ours.all_special_ids


@pytest.mark.parametrize("model_type", [None, "llama", "mistral"])
@pytest.mark.parametrize("flags", [{"legacy": False}, {"legacy": True}, {},
                                   {"add_prefix_space": False}])
@pytest.mark.parametrize("cls", ["LlamaTokenizer", "CodeLlamaTokenizer"])
def test_llama_tokenizer_class_folder_encodes_like_transformers(sp_model, cls, flags, model_type,
                                                                tmp_path):
    """A Llama-2-style folder (tokenizer.json prepending U+2581 in its normalizer, as Llama 2's
    and Phi-3's do) whose tokenizer_config.json names LlamaTokenizer: transformers 5 builds its
    own Metaspace from ``legacy`` / ``add_prefix_space`` (for model type llama; Mistral's loads
    tokenizer.json as it is; CodeLlamaTokenizer ignores ``legacy``). Ember used tokenizer.json's
    normalizer, so text after a special token ("<s>[INST]") and text starting with a space got
    another U+2581."""
    import json

    transformers = pytest.importorskip("transformers")
    tokenizer_from_gguf(_metadata(sp_model, "phi3")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg |= {"tokenizer_class": cls, **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with _offline():
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in [*TEXTS, *EXTRA, "<s>[INST] hi [/INST]", " a", "a</s> b", "</s>x"]:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], (text, special)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), (text, skip)


def test_phi3_named_file_keeps_spaces_after_specials_as_transformers(sp_model, tmp_path):
    """llama.cpp gives special tokens RSTRIP when general.name says Phi-3 (a runtime rule, not in
    the file); transformers' GGUF import does not, and Ember reads the file as transformers
    does: the text after ``</s>`` or ``<|im_start|>`` keeps its spaces and new lines."""
    md = _metadata(sp_model, "phi3", **{"general.name": "Phi-3-mini-4k-instruct"})
    path = _write(tmp_path / "phi3.gguf", md)
    with GGUFFile(path) as g:
        ours = tokenizer_from_gguf(g.metadata)
    theirs = _theirs(path)
    for text in ("hi</s>  \n next", "<|im_start|> \nuser", "<s>\n\nx"):
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text


# Text right after a special token, where transformers' and llama.cpp's SentencePiece readers
# differ (Mistral's control tokens [INST] / [/INST] included)
AFTER_SPECIAL = ["<s>Hello", "</s> world", "[INST]hi[/INST]", "<s>[INST] hi [/INST] ok</s>",
                 "a<|im_start|>user", "<|im_start|> user", " Hello", "<s>  x"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("prefix", [None, False])
def test_text_after_special_tokens_follows_transformers_unless_no_space_prefix(sp_model, arch,
                                                                               prefix, tmp_path):
    """Ember reads a SentencePiece GGUF as transformers' GGUF loader does, with one exception.
    llama.cpp (``llama_cpp_spm``, transcribed from llama-vocab.cpp) prefixes U+2581 after every
    special token and before text that starts with a space; transformers does that for Phi-3
    (a ``Prepend`` normalizer) but not for llama files (a "first" ``Metaspace``: "<s>Hello" is
    "<s>", "H", ... there, "<s>", "▁He", ... in llama.cpp). The exception: a file whose
    ``add_space_prefix`` is false (its model had no dummy prefix), which transformers ignores
    (it prefixes anyway) and Ember follows as llama.cpp does, id for id."""
    from tests.models.test_gguf_export_spm import llama_cpp_spm

    md = _metadata(sp_model, arch, **({} if prefix is None else {
        "tokenizer.ggml.add_space_prefix": prefix}))
    md["tokenizer.ggml.tokens"] += ["[INST]", "[/INST]"]
    md["tokenizer.ggml.scores"] += [0.0, 0.0]
    md["tokenizer.ggml.token_type"] += [CONTROL, CONTROL]
    path = _write(tmp_path / f"{arch}.gguf", md)
    ours = tokenizer_from_gguf(md)
    theirs = _theirs(path)
    for text in AFTER_SPECIAL:
        ids = ours.encode(text, add_special_tokens=True)
        llama_cpp = llama_cpp_spm(md, text, add_special=True, parse_special=True)
        if prefix is None:
            assert ids == theirs(text)["input_ids"], text
        if prefix is False or arch == "phi3":
            assert ids == llama_cpp, text
        else:
            assert ids != llama_cpp, text  # the known difference, on every one of these texts
            extra = Counter(llama_cpp) - Counter(ids)  # llama.cpp's added U+2581 pieces
            assert text == "<s>Hello" or {ours.id_to_token(i) for i in extra} == {"▁"}, text
    if prefix is False:  # transformers prefixes anyway
        assert theirs("Hello")["input_ids"] != ours.encode("Hello", add_special_tokens=True)


def test_no_bos_token_id_means_no_bos_flag(sp_model, tmp_path):
    """A SentencePiece GGUF without ``bos_token_id`` (llama.cpp would default it to id 1,
    transformers and Ember have no BOS): Ember added no BOS but said ``add_bos_token`` (the file's
    default), so a GGUF export wrote add_bos_token = true with no BOS id and llama.cpp prepended
    id 1 to text Ember trained on without it. The flag is now off, as transformers has it."""
    from ember.models.gguf_tokenizer import tokenizer_metadata
    from tests.models.test_gguf_export_spm import llama_cpp_spm

    md = _metadata(sp_model, "llama", **{"tokenizer.ggml.add_eos_token": True})
    del md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]
    ours = tokenizer_from_gguf(md)
    theirs = _theirs(_write(tmp_path / "m.gguf", md))
    assert (ours.add_bos_token, ours.add_eos_token) == (False, False) == (
        theirs.add_bos_token, theirs.add_eos_token)
    exported = tokenizer_metadata(ours, len(md["tokenizer.ggml.tokens"]))
    assert not exported["tokenizer.ggml.add_bos_token"]
    for text in ("hello", "the lazy dog"):
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == theirs(text)["input_ids"] == llama_cpp_spm(exported, text, add_special=True)
