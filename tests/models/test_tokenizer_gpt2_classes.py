"""GPT2Tokenizer, CodeGenTokenizer and GPTNeoXTokenizer over a tokenizer.json, against
transformers 5's ``AutoTokenizer`` on the same folder (a small byte-level BPE trained at test
time). transformers 5 rebuilds their pipeline from the class and tokenizer_config.json: GPT-2's
regex in a ``ByteLevel`` whose ``add_prefix_space`` is the config's (False when it names none,
whatever tokenizer.json says), no normalizer (GPT-NeoX: NFC), a ``ByteLevel`` decoder. Where
tokenizer.json splits text before GPT-2's regex (SmolLM2's digits, a cl100k-style regex),
transformers 5 drops that step (huggingface/transformers#45701): Ember keeps the model's own
split and says so."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer
from tokenizers import normalizers as norms

from ember.models.tokenizer import load_tokenizer
from tests.models.test_tokenizer_classes import _vocab
from tests.models.test_tokenizer_pipelines import TEXTS

CLASSES = ["GPT2Tokenizer", "CodeGenTokenizer", "GPTNeoXTokenizer"]
BASE = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def _write(tmp_path, name: str, cfg: dict, normalizer=None) -> Tokenizer:
    tok = Tokenizer.from_str(_vocab(name))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


@pytest.mark.parametrize("cfg", [{}, {"add_prefix_space": True}, {"add_prefix_space": False}])
@pytest.mark.parametrize("name", ["bytelevel", "bytelevel_prefix"])
@pytest.mark.parametrize("cls", CLASSES)
def test_the_class_pipeline_as_transformers_rebuilds_it(cls, name, cfg, tmp_path):
    """A config's add_prefix_space against tokenizer.json's (Ember read the file: "Hello world"
    [283, 292], transformers [225, 283, 292] with add_prefix_space true; a file that prefixes
    beside a config that does not: [347, 291] against [282, 291]); GPT-NeoX's NFC ("e" + U+0301:
    7 ids against 6)."""
    _write(
        tmp_path,
        name,
        {"tokenizer_class": cls, **BASE, **cfg},
        norms.NFC() if cls == "GPTNeoXTokenizer" else None,
    )
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for special in (False, True):
        assert ours.encode_batch(TEXTS, add_special_tokens=special) == [
            theirs.encode(t, add_special_tokens=special) for t in TEXTS
        ], special
    ids = [theirs.encode(t, add_special_tokens=True) for t in TEXTS]
    for skip in (False, True):
        assert ours.decode_batch(ids, skip_special_tokens=skip) == theirs.batch_decode(
            ids, skip_special_tokens=skip
        ), skip


@pytest.mark.parametrize(
    ("name", "normalizer", "step", "text"),
    [
        ("digits", None, "Digits", "  0"),
        ("bytelevel", norms.Lowercase(), "Lowercase", "Hi"),
        ("metaspace_first", None, "not byte-level.*Metaspace", "Hello world"),
    ],
)
@pytest.mark.parametrize("cls", CLASSES)
def test_a_step_transformers_drops_is_kept_and_said(cls, name, normalizer, step, text, tmp_path):
    """tokenizer.json splits digits off first (SmolLM2, StarCoder) or lowercases: transformers 5
    drops the step ("  0": [225, 225, 20], the model's own [265, 20]); over a vocabulary that is
    not byte-level at all its byte-level pipeline spells nothing right. Ember keeps the model's
    tokenizer.json, with a warning that names the step, the difference and the fix (it warned
    nothing for the SentencePiece-style vocabulary)."""
    tok = _write(tmp_path, name, {"tokenizer_class": cls, **BASE}, normalizer)
    with pytest.warns(UserWarning, match=rf"{step}.*transformers 5.*PreTrainedTokenizerFast"):
        ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode_batch(TEXTS) == [t.ids for t in tok.encode_batch(TEXTS)]
    assert ours.encode(text) != theirs.encode(text, add_special_tokens=False)
    # the fix the warning names: transformers then reads tokenizer.json as written too
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **BASE})
    )
    fixed = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode_batch(TEXTS) == [fixed.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("LlamaTokenizer", "metaspace_first"),
        ("CodeLlamaTokenizer", "metaspace_first"),
        ("Qwen2Tokenizer", "qwen2"),
        ("GPT2Tokenizer", "bytelevel"),
        ("CodeGenTokenizer", "bytelevel"),
        ("GPTNeoXTokenizer", "bytelevel"),
        ("GemmaTokenizer", "gemma"),
        ("PreTrainedTokenizerFast", "metaspace_first"),
    ],
)
def test_added_token_flags_and_decoding_per_class(cls, name, clean, tmp_path):
    """Each class transformers 5 builds, with added tokens that strip around them (special) or
    match whole words only, normalized (not special), and clean_up_tokenization_spaces on and off:
    ids with and without special tokens, decoding with and without them, the special tokens
    listed (a sweep of 198 such folders found no other difference)."""
    tok = Tokenizer.from_str(_vocab(name))
    tok.add_special_tokens([AddedToken("[MASK]", special=True, lstrip=True, rstrip=True)])
    tok.add_tokens([AddedToken("Hello", single_word=True, normalized=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    g = name == "gemma"
    cfg = {
        "tokenizer_class": cls,
        "bos_token": "<bos>" if g else "<s>",
        "eos_token": "<eos>" if g else "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": clean,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():  # class defaults the vocabulary lacks: said elsewhere
        warnings.simplefilter("ignore")
        ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    new = {t for t, i in theirs.get_vocab().items() if i >= len(ours)}
    texts = TEXTS[:40] + ["a [MASK] b", "x Hello  y", "don't , ok . is n't", "Hello[MASK]Hello"]
    for special in (False, True):
        assert ours.encode_batch(texts, add_special_tokens=special) == [
            theirs.encode(t, add_special_tokens=special) for t in texts
        ], special
    ids = [theirs.encode(t, add_special_tokens=True) for t in texts]
    for skip in (False, True):
        assert ours.decode_batch(ids, skip_special_tokens=skip) == theirs.batch_decode(
            ids, skip_special_tokens=skip
        ), skip
    assert ours.all_special_tokens == [t for t in theirs.all_special_tokens if t not in new]
