"""CodeLlamaTokenizer's infilling: a text with ``<FILL_ME>`` is encoded as prefix and suffix,
``[bos] ▁<PRE> " "+prefix ▁<SUF> suffix ▁<MID>`` (spaces written as U+2581, no prefix space added
to the prefix beyond the one written), against transformers 5's ``AutoTokenizer`` on the same
folder (a small SentencePiece-style BPE trained at test time)."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer

from ember import EmberError
from ember.models.tokenizer import load_tokenizer
from tests.models.test_tokenizer_classes import _vocab
from tests.models.test_tokenizer_pipelines import _trained

INFILL = ["\u2581<PRE>", "\u2581<MID>", "\u2581<SUF>", "\u2581<EOT>"]
BASE = {
    "tokenizer_class": "CodeLlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
TEXTS = [
    "<s><FILL_ME></s>",
    "def f(x):\n    <FILL_ME>\n    return y",
    "a <FILL_ME>b",
    "<FILL_ME> b",
    "a<FILL_ME>",
    "<FILL_ME>",
    "x <s> y<FILL_ME>  z</s>",
    "plain  text",
]


def _load(tmp_path, cfg: dict, infill=INFILL):
    tmp_path.mkdir(exist_ok=True)
    tok = Tokenizer.from_str(_vocab("metaspace_first"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in infill])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**BASE, **cfg}))
    with warnings.catch_warnings():  # <FILL_ME> is not in the vocabulary: said elsewhere
        warnings.simplefilter("ignore")
        ours = load_tokenizer(tmp_path)
    return ours, transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "cfg",
    [{}, {"add_prefix_space": False}, {"add_eos_token": True}, {"split_special_tokens": True}],
)
def test_fill_me_is_split_into_prefix_and_suffix_like_transformers(cfg, tmp_path):
    """Ember encoded "<FILL_ME>" as text ("a <FILL_ME>b": [0, 202, 177, 38, ...], transformers
    [0, 500, 202, 129, 502, 129, 57, 501]). Each text on a fresh transformers tokenizer: its
    infilling leaves the backend's normalizer changed for later calls. With split_special_tokens
    the infilling copy encoded "<s>" in the text as a special token (it lost the flag:
    "<s><FILL_ME></s>" [0, 500, 129, 0, 502, 1, 501], transformers [0, 500, 267, 502, 283, 501])."""
    ours, _ = _load(tmp_path, cfg)
    for text in TEXTS:
        for special in (True, False):
            theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
            want = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == want, (text, special)
    fresh = [transformers.AutoTokenizer.from_pretrained(tmp_path).encode(t) for t in TEXTS]
    assert ours.encode_batch(TEXTS, add_special_tokens=True) == fresh


def test_fill_me_errors(tmp_path):
    """Two <FILL_ME> (transformers: a bare "too many values to unpack") and a vocabulary without
    the infilling tokens (transformers adds them as new tokens, ids past the model's embedding)
    are clear errors; a config without a fill token encodes <FILL_ME> as text, as transformers
    does."""
    ours, theirs = _load(tmp_path / "a", {})
    with pytest.raises(ValueError, match="too many values"):
        theirs.encode("a<FILL_ME>b<FILL_ME>c")
    with pytest.raises(EmberError, match="2 <FILL_ME>.*exactly one"):
        ours.encode("a<FILL_ME>b<FILL_ME>c")
    ours, theirs = _load(tmp_path / "b", {}, infill=[])
    assert max(theirs.encode("a<FILL_ME>b")) >= len(ours) == 500
    with pytest.raises(EmberError, match="▁<PRE>.*infilling"):
        ours.encode("a<FILL_ME>b")
    ours, theirs = _load(tmp_path / "c", {"fill_token": None})
    assert ours.encode("a<FILL_ME>b") == theirs.encode("a<FILL_ME>b", add_special_tokens=False)


@pytest.mark.parametrize("cls", ["CodeLlamaTokenizer", "LlamaTokenizer"])
@pytest.mark.parametrize(
    "bpe",
    [
        {},
        {"byte_fallback": True},
        {"unk_token": "<unk>"},
        {"byte_fallback": True, "unk_token": "<unk>"},
    ],
)
def test_characters_the_vocabulary_lacks_like_transformers(cls, bpe, tmp_path):
    """The class's BPE options, not tokenizer.json's: CodeLlamaTokenizer builds its BPE with
    ``unk_token``, ``fuse_unk`` and ``byte_fallback`` (Ember kept a file without an unk token,
    and dropped "B", which the vocabulary lacks: "Be" [129, 60], transformers [129, 2, 60]);
    LlamaTokenizer with ``fuse_unk`` and ``byte_fallback`` but no unk token, so transformers drops
    such characters ("Be" [129, 60]): Ember keeps them as <unk> (fused: [129, 2, 60]) and warns,
    where the vocabulary lacks byte pieces."""
    tok = _trained("metaspace_first", **bpe)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**BASE, "tokenizer_class": cls}))
    lossy = cls == "LlamaTokenizer" and "unk_token" in bpe
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_tokenizer(tmp_path)
    said = [str(w.message) for w in caught if "drops" in str(w.message)]
    assert bool(said) == lossy and all("<unk>" in s for s in said)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Be", "x \u03a9 y", "a\u2603\u2603b B", "<unk>B"]:
        want = theirs.encode(text, add_special_tokens=False)
        got = ours.encode(text)
        if lossy:  # transformers' ids with each run of lost characters as one <unk>
            assert [i for i in got if i != 2] == [i for i in want if i != 2], text
            assert (2 in got) == (text != "x \u03a9 y"), text
        else:
            assert got == want, text


def test_training_lines_with_the_fill_token(tmp_path):
    """A text line holding <FILL_ME> is encoded as TRL's SFT encodes it: transformers'
    tokenizer(text + eos_token), an infilling prompt whose suffix ends with the eos. A
    prompt/completion line holding it is refused, naming the token: transformers' tokenizer
    reorders such a text into prefix / suffix / middle, which the loss mask over the text's
    characters cannot follow (Ember trained the literal "<FILL_ME>" pieces); two fill tokens are
    a bad line, not a crash."""
    from ember.engine.data import DataConfig, load_examples

    ours, theirs = _load(tmp_path / "t", {})
    rows = tmp_path / "d.jsonl"
    lines = [
        {"text": "def f(x):\n    <FILL_ME>\n    return y"},
        {"text": "a<FILL_ME>b<FILL_ME>c"},
    ]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = DataConfig(max_seq_len=128, tokens_per_batch=128, bad_lines="skip")
    examples, report = load_examples(rows, cfg, ours)
    assert report.bad_lines == 1 and len(examples) == 1
    # TRL's SFT recipe: the eos string appended to the text, the whole tokenized (add_eos)
    want = theirs(lines[0]["text"] + theirs.eos_token)["input_ids"]
    assert examples[0].input_ids == want
    rows.write_text(json.dumps({"prompt": "a <FILL_ME>", "completion": "b"}) + "\n")
    with pytest.raises(EmberError, match="<FILL_ME>.*infilling"):
        load_examples(rows, DataConfig(max_seq_len=128, tokens_per_batch=128), ours)


@pytest.mark.parametrize(
    "cfg",
    [
        {"fill_token": {"content": "<FILL_ME>", "__type": "AddedToken", "special": True}},
        {"fill_token": {"content": "<FILL>", "__type": "AddedToken", "special": True}},
        {"fill_token": "<FILL>"},
        {"prefix_token": "\u2581<EOT>"},
        {"middle_token": "\u2581<EOT>", "suffix_token": "\u2581<EOT>"},
    ],
)
def test_config_infilling_tokens_as_transformers_reads_them(cfg, tmp_path):
    """A fill_token written as an AddedToken dict made every encode raise a TypeError ("'in
    <string>' requires string as left operand, not dict"); transformers 5 takes the dict's
    content. It keeps its own fill / prefix / middle / suffix tokens whatever other plain string
    the config names (prefix_token "▁<EOT>": transformers [0, 500, 202, ...], Ember
    [0, 503, 202, ...]): Ember does too, and warns."""
    _load(tmp_path, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_tokenizer(tmp_path)
    warned = any("CodeLlamaTokenizer ignores it" in str(w.message) for w in caught)
    assert warned == all(isinstance(v, str) for v in cfg.values())
    for text in ["a <FILL_ME>b", "a <FILL>b"]:
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
        want = theirs.encode(text)
        if max(want) >= len(ours):  # transformers added "<FILL>" as a new token: Ember does not
            continue
        assert ours.encode(text, add_special_tokens=True) == want, text


def test_a_null_infilling_token_is_named_as_the_config_s(tmp_path):
    """prefix_token null: transformers refuses the infilling text; Ember's message said the
    vocabulary lacks ▁<PRE>, which it has: it names the config's null."""
    ours, theirs = _load(tmp_path, {"prefix_token": None})
    with pytest.raises(ValueError, match="prefix"):
        theirs.encode("a <FILL_ME>b")
    with pytest.raises(EmberError, match="tokenizer_config.json turns prefix_token off"):
        ours.encode("a <FILL_ME>b")


@pytest.mark.parametrize("cfg", [{}, {"add_eos_token": True}, {"suffix_token": None}])
def test_a_saved_code_llama_tokenizer_still_splits_the_fill_token(cfg, tmp_path):
    """Ember saved a CodeLlama tokenizer as the generic PreTrainedTokenizerFast, so neither
    Ember nor transformers split <FILL_ME> in the reloaded folder ("a <FILL_ME>b": [0, 202,
    177, 38, ...], the folder's own [0, 500, 202, 129, 502, 129, 57, 501])."""
    ours, _ = _load(tmp_path / "a", cfg)
    ours.save_pretrained(tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_tokenizer(tmp_path / "b")
    for text in TEXTS:
        want = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
        try:
            expected = want.encode(text)
        except ValueError:  # (suffix_token null: transformers refuses an infilling text)
            with pytest.raises(ValueError):
                theirs.encode(text)
            with pytest.raises(EmberError):
                again.encode(text, add_special_tokens=True)
            continue
        assert theirs.encode(text) == expected, text
        assert again.encode(text, add_special_tokens=True) == expected, text
