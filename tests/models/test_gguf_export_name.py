"""``general.name`` of a GGUF export and llama.cpp's name-keyed tokenizer rule: llama-vocab.cpp
strips the whitespace after special tokens (LLAMA_TOKEN_ATTR_RSTRIP) only in a file whose name,
lower-cased, contains "phi-3" or "phi3". The oracle for what the tokenizer does is transformers'
tokenizer over the same ``tokenizers`` backend; the rule is transcribed from llama-vocab.cpp."""

from __future__ import annotations

import warnings

import pytest
from gguf import GGUFReader
from tokenizers import AddedToken

from ember.models.config import ModelConfig
from ember.models.gguf_export import save_gguf
from ember.models.tokenizer import tokenizer_from_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import VOCAB, tiny_tokenizer_md

transformers = pytest.importorskip("transformers")


def _llama_cpp_rstrips(general_name: str) -> bool:
    """llama-vocab.cpp: ``_contains_any(lowercase(general.name), {"phi-3", "phi3"})``."""
    return any(k in general_name.lower() for k in ("phi-3", "phi3"))


def _model(model_type: str) -> Transformer:
    return Transformer(ModelConfig(model_type=model_type, vocab_size=VOCAB, hidden_size=32,
                                   intermediate_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1))


def _tokenizer(rstrip: bool):
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    tok.backend.add_special_tokens([AddedToken("<|im_start|>", rstrip=rstrip, special=True,
                                               normalized=False)])
    return tok


def _hf_strips(tok) -> bool:
    """Whether transformers' tokenizer drops the space after a special token."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    ids = hf("<|im_start|> the", add_special_tokens=False).input_ids
    return ids == hf("<|im_start|>the", add_special_tokens=False).input_ids


def _name(path) -> str:
    return bytes(GGUFReader(path).fields["general.name"].parts[-1]).decode()


@pytest.mark.parametrize("rstrip", [True, False])
def test_phi3_default_name_makes_llama_cpp_strip_as_the_tokenizer_does(rstrip, tmp_path):
    """A Phi-3 tokenizer with rstrip special tokens (Phi-3's tokenizer.json) exported as
    "model.gguf" was named "model": llama.cpp kept the whitespace HF strips after <|user|> etc."""
    tok = _tokenizer(rstrip)
    assert _hf_strips(tok) == rstrip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default name never warns
        path = save_gguf(_model("phi3"), tok, tmp_path / "model.gguf")
    assert _llama_cpp_rstrips(_name(path)) == _hf_strips(tok)
    assert _name(path).startswith("model")


def test_given_names_are_kept_with_a_warning_when_llama_cpp_differs(tmp_path):
    tok = _tokenizer(True)
    with pytest.warns(UserWarning, match="does not contain 'phi-3'"):
        path = save_gguf(_model("phi3"), tok, tmp_path / "a.gguf", name="My Model")
    assert _name(path) == "My Model"
    path = save_gguf(_model("phi3"), tok, tmp_path / "b.gguf", name="my-phi3-ft")
    assert _name(path) == "my-phi3-ft"
    # a Llama exported under a Phi-3 name: llama.cpp strips, its tokenizer does not
    with pytest.warns(UserWarning, match="contains 'phi-3'/'phi3'"):
        path = save_gguf(_model("llama"), _tokenizer(False), tmp_path / "phi3-distill.gguf")
    assert _name(path) == "phi3-distill" and not _hf_strips(_tokenizer(False))


@pytest.mark.parametrize("name", [123, b"x", "", "  "])
def test_a_name_that_is_not_a_string_is_refused_up_front(name, tmp_path):
    from ember import EmberError

    with pytest.raises(EmberError, match="name .general.name. must be a non-empty string"):
        save_gguf(_model("llama"), _tokenizer(False), tmp_path / "m.gguf", name=name)
    assert not list(tmp_path.iterdir())
