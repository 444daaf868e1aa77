"""Qwen3.5's tokenizer class (``Qwen3_5Tokenizer``, which transformers 5 uses for the qwen3_5
model types whatever class the folder names) over a tokenizer.json, against ``AutoTokenizer`` on
the same folder (a small byte-level BPE trained at test time): Qwen2's pipeline with a split
regex that keeps combining marks with their letters (``[\\p{L}\\p{M}]+``), NFC, the config's
add_prefix_space, and Qwen2's default special tokens."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from tokenizers import Tokenizer

from ember.models.tokenizer import load_tokenizer
from tests.models.test_tokenizer_classes import _vocab
from tests.models.test_tokenizer_pipelines import TEXTS


@pytest.mark.parametrize("cfg", [{}, {"add_prefix_space": True}, {"eos_token": "<|im_end|>"}])
@pytest.mark.parametrize("cls", ["Qwen2Tokenizer", "PreTrainedTokenizerFast", None])
@pytest.mark.parametrize("name", ["qwen2", "bytelevel"])
def test_qwen3_5_folders_like_transformers(name, cls, cfg, tmp_path):
    """Ember read the file as written: "e" + U+0301 [69, 296, ...] against transformers' NFC
    [132, 99, ...]; "Hello world" with add_prefix_space [283, 291] against [225, 283, 291]; no
    eos where the config names none (transformers: <|endoftext|>, which this vocabulary lacks:
    it adds it past the vocabulary, Ember leaves it out)."""
    Tokenizer.from_str(_vocab(name)).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**({"tokenizer_class": cls} if cls else {}), **cfg})
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    with warnings.catch_warnings():  # class defaults the vocabulary lacks: said elsewhere
        warnings.simplefilter("ignore")
        ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "Qwen3_5Tokenizer"
    new = {t for t, i in theirs.get_vocab().items() if i >= len(ours)}
    texts = [t for t in TEXTS if not any(n in t for n in new)]
    for special in (False, True):
        assert ours.encode_batch(texts, add_special_tokens=special) == [
            theirs.encode(t, add_special_tokens=special) for t in texts
        ], special
    ids = [theirs.encode(t, add_special_tokens=True) for t in texts]
    for skip in (False, True):
        assert ours.decode_batch(ids, skip_special_tokens=skip) == theirs.batch_decode(
            ids, skip_special_tokens=skip
        ), skip
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        want = getattr(theirs, attr)
        assert getattr(ours, attr) == (None if want in new else want), attr
    assert ours.all_special_tokens == [t for t in theirs.all_special_tokens if t not in new]


@pytest.mark.parametrize("cls", ["Qwen2Tokenizer", None])
def test_slow_qwen3_5_folders_split_as_the_class(cls, tmp_path):
    """A qwen3_5 folder with only vocab.json + merges.txt was split with Qwen2's regex (a
    combining mark apart from its letter: "x\\u0301y" [88, 225, 228, 89] where Qwen3.5's split
    gives [88, 296, 89]). transformers 5's Qwen3_5Tokenizer ignores those files (a one-token
    vocabulary: every text encodes to []), so the oracle is transformers on the same vocabulary
    as tokenizer.json; Ember warns that transformers cannot read the folder."""
    marks = "x\u0301y \u0928\u092e\u0938\u094d\u0924\u0947 a\u0308\u0301b"
    texts = [*TEXTS, marks, "\u0915\u093f!"]
    cfg = json.dumps({"tokenizer_class": cls} if cls else {})
    for sub in ("slow", "fast"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "tokenizer_config.json").write_text(cfg)
        (tmp_path / sub / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    tok = Tokenizer.from_str(_vocab("qwen2"))
    tok.model.save(str(tmp_path / "slow"))
    tok.save(str(tmp_path / "fast" / "tokenizer.json"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "slow").encode("Hello") == []
    with pytest.warns(UserWarning, match="Qwen3_5Tokenizer does not read vocab.json"):
        ours = load_tokenizer(tmp_path / "slow")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "fast")
    # (the file's added tokens are not in vocab.json: texts without them)
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    texts = [t for t in texts if not any(a in t for a in added)]
    want = [theirs.encode(t, add_special_tokens=False) for t in texts]
    assert marks in texts and ours.encode_batch(texts) == want
