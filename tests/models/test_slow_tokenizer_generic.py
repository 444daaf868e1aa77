"""tokenizer.model folders that transformers 5 reads with its generic ``TokenizersBackend``
(``ember.models.slow_tokenizer._generic_spm_backend``): Mistral / Ministral / Mixtral / Phi-3 /
Granite / OLMo2 model types, whatever class the folder names. Oracles: transformers'
``AutoTokenizer`` on the same folder, SentencePiece itself, llama.cpp's converter (GGUF types).
Fixtures and helpers are ``test_slow_tokenizer``'s."""

from __future__ import annotations

import json

import pytest

from ember.models.tokenizer import load_tokenizer
from tests.models.test_slow_tokenizer import (  # noqa: F401  (trained: the fixture)
    STRINGS,
    _assert_like_transformers,
    _assert_same_ids,
    _case_folder,
    _folder,
    _theirs,
    trained,
)

spm = pytest.importorskip("sentencepiece")


@pytest.mark.parametrize("name, model_type", [
    ("llama_legacy_eos", "mistral"), ("llama", "mistral"), ("llama_no_prefix", "mixtral"),
    ("phi3_like", "phi3"), ("llama", "granite"), ("llama_legacy_eos", "ministral")])
def test_generic_model_types_follow_the_sentencepiece_spec(
        trained, tmp_path, name, model_type):  # noqa: F811
    """A Mistral / Phi-3 folder with only tokenizer.model: transformers 5 builds its generic
    backend (TokenizersBackend) from the model's normalizer spec whatever class the folder names:
    a prefix before every segment and a second one before leading spaces with ``legacy`` (the
    default), before the text's start even when a special token opens it, user-defined pieces
    split off, ``add_prefix_space`` ignored. Ember built LlamaTokenizer's pipeline (e.g. " Hi"
    was [▁Hi], transformers [▁, ▁Hi]; "<|im_start|>x": no "▁" first)."""
    folder = _case_folder(trained, tmp_path, name)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert type(_theirs(folder)).__name__ == "TokenizersBackend"
    _assert_like_transformers(folder)


@pytest.mark.parametrize("model", ["unigram", "nfkc", "nobytes"])
def test_generic_backend_other_sentencepiece_models(trained, tmp_path, model):  # noqa: F811
    """The generic backend of a unigram model, of one with a normalization charsmap and extra
    whitespace removal and no dummy prefix, of one without byte fallback: transformers' ids and
    text, and SentencePiece's ids (``legacy`` by default) where no special token is written."""
    _, models, _ = trained
    folder = _folder(tmp_path, model, {"tokenizer_class": "LlamaTokenizer"}, model=models[model])
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    ours, theirs = load_tokenizer(folder), _theirs(folder)
    _assert_same_ids(ours, theirs)
    ids = theirs(STRINGS)["input_ids"]
    assert ours.decode_batch(ids, skip_special_tokens=False) == theirs.batch_decode(ids)
    plain = [s for s in STRINGS if "<" not in s]
    sp = spm.SentencePieceProcessor(model_file=models[model])
    assert ours.encode_batch(plain) == sp.encode(plain)


def test_generic_backend_exports_user_defined_pieces_to_gguf(trained, tmp_path):  # noqa: F811
    """The generic backend splits user-defined pieces off in its pre-tokenizer instead of adding
    them as tokens; a GGUF export must still type them user-defined, as llama.cpp's converter
    types them from tokenizer.model (they were written as normal pieces: llama.cpp and Ember's
    reader spelled "<|im_start|>" out of 10 pieces)."""
    from ember.models.gguf_tokenizer import tokenizer_metadata
    from ember.models.tokenizer import tokenizer_from_gguf

    folder = _case_folder(trained, tmp_path, "llama")
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    tok = load_tokenizer(folder)
    md = tokenizer_metadata(tok, tok.vocab_size, "llama")
    i = tok.token_to_id("<|im_start|>")
    assert md["tokenizer.ggml.token_type"][i] == 4 and md["tokenizer.ggml.tokens"][i] == (
        "<|im_start|>")
    back = tokenizer_from_gguf({"general.architecture": "llama", **md})
    assert back.encode("<|im_start|>user")[0] == i and i in back.encode("hi<|im_start|>x")


def test_generic_unigram_cleans_up_decoding_like_transformers(trained, tmp_path):  # noqa: F811
    """clean_up_tokenization_spaces on a unigram tokenizer.model in a Mistral folder: the generic
    backend is a Unigram, whose decoding transformers 5 cleans up ("Hello , world ." -> "Hello,
    world."); Ember did not (only LlamaTokenizer's BPE of such a file is never cleaned up)."""
    _, models, _ = trained
    folder = _folder(tmp_path, "uni", {"tokenizer_class": "LlamaTokenizer",
                                       "clean_up_tokenization_spaces": True},
                     model=models["unigram"])
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    ours, theirs = load_tokenizer(folder), _theirs(folder)
    ids = theirs([*STRINGS, "Hello , world . it 's done !"])["input_ids"]
    assert ours.decode_batch(ids, skip_special_tokens=False) == theirs.batch_decode(ids)
    assert ours.decode(ids[-1]) == "Hello, world. it's done!"
