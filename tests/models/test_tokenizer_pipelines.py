"""tokenizer.json pipelines the way real models write them, swept against transformers 5: every
pre-tokenizer type fast tokenizers use (ByteLevel with / without prefix and regex, the Split
regexes of Llama 3, Qwen2, GPT-4o and DeepSeek LLM, Metaspace's prepend schemes and split,
Digits, Punctuation, Sequence), normalizers, BPE options, added-token flags and post-processors.
A small BPE is trained at test time per vocabulary kind; the oracle is ``AutoTokenizer`` on the
same folder (ids with and without special tokens, decoding with and without them)."""

from __future__ import annotations

import json
import random

import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, trainers
from tokenizers import normalizers as norms
from tokenizers import pre_tokenizers as pre
from tokenizers import processors as post

from ember.models.tokenizer import load_tokenizer
from tests.models.test_gguf_pretokenizers import GPT4O, LLAMA3, QWEN2, TRICKY, _deepseek_llm

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
_rng = random.Random(3)
_PIECES = [
    "Hello",
    " world",
    "'s",
    "'LL",
    " 12345",
    "٣",
    "日本",
    "🤖",
    "e\u0301",
    "\r\n",
    "\t",
    "   ",
    "<s>",
    "</s>",
    "<|im_end|>",
    "[MASK]",
    "x",
    " ",
    ",",
    "ﬁ",
    "Ｆ",
    "ǅ",
]
TEXTS = list(
    dict.fromkeys(
        TRICKY[:40]
        + ["", " ", "  x", "x  ", "hello[MASK]world"]
        + ["".join(_rng.choices(_PIECES, k=_rng.randint(1, 6))) for _ in range(60)]
    )
)
CORPUS = TRICKY * 2 + TEXTS * 2


def _bl(prefix=False, regex=True):
    return pre.ByteLevel(add_prefix_space=prefix, use_regex=regex)


def _split(regex):
    return pre.Sequence([pre.Split(Regex(regex), behavior="isolated"), _bl(regex=False)])


# name -> (pre-tokenizer, byte-level vocabulary?)
PRES = {
    "bytelevel": (_bl, True),
    "bytelevel_prefix": (lambda: _bl(prefix=True), True),
    "bytelevel_noregex": (lambda: _bl(regex=False), True),
    "llama3": (lambda: _split(LLAMA3), True),
    "qwen2": (lambda: _split(QWEN2), True),
    "gpt4o": (lambda: _split(GPT4O), True),
    "deepseek_llm": (_deepseek_llm, True),
    "digits": (lambda: pre.Sequence([pre.Digits(individual_digits=True), _bl()]), True),
    "punctuation": (lambda: pre.Sequence([pre.WhitespaceSplit(), pre.Punctuation()]), False),
    "metaspace_first": (lambda: pre.Metaspace(prepend_scheme="first"), False),
    "metaspace_always": (lambda: pre.Metaspace(prepend_scheme="always"), False),
    "metaspace_never": (lambda: pre.Metaspace(prepend_scheme="never"), False),
    "metaspace_split": (lambda: pre.Metaspace(prepend_scheme="always", split=True), False),
}


def _trained(name: str, normalizer=None, **bpe) -> Tokenizer:
    make, byte_level = PRES[name]
    tok = Tokenizer(models.BPE(**bpe))
    tok.pre_tokenizer = make()
    if normalizer is not None:
        tok.normalizer = normalizer
    prefix = {k: v for k, v in bpe.items() if k == "continuing_subword_prefix"}
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre.ByteLevel.alphabet() if byte_level else [],
            **prefix,
        ),
    )
    if byte_level:
        tok.decoder = decoders.ByteLevel()
    elif name.startswith("metaspace"):
        tok.decoder = decoders.Metaspace(prepend_scheme=tok.pre_tokenizer.prepend_scheme)
    return tok


def _assert_like_transformers(tok: Tokenizer, tmp_path, cfg: dict | None = None):
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                **(cfg or {}),
            }
        )
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
    return ours, theirs


@pytest.mark.parametrize("name", list(PRES))
def test_pre_tokenizers_encode_and_decode_like_transformers(name, tmp_path):
    ours, theirs = _assert_like_transformers(_trained(name), tmp_path)
    # decode(encode(text)): the text itself where transformers gives it back (byte-level)
    back = [ours.decode(ours.encode(t), skip_special_tokens=False) for t in TEXTS]
    assert back == [theirs.decode(theirs.encode(t, add_special_tokens=False)) for t in TEXTS]
    if PRES[name][1] and name != "bytelevel_prefix":
        assert back == TEXTS


@pytest.mark.parametrize(
    "name, normalizer",
    [
        ("bytelevel", norms.NFC()),
        ("bytelevel", norms.NFKC()),
        ("bytelevel", norms.Lowercase()),
        ("punctuation", norms.Strip()),
        ("bytelevel", norms.Sequence([norms.NFKC(), norms.Replace("``", '"'), norms.Lowercase()])),
        ("metaspace_never", norms.Sequence([norms.Prepend("▁"), norms.Replace(" ", "▁")])),
    ],
)
def test_normalizers_like_transformers(name, normalizer, tmp_path):
    _assert_like_transformers(_trained(name, normalizer), tmp_path)


@pytest.mark.parametrize(
    "name, bpe",
    [
        ("metaspace_first", {"byte_fallback": True}),
        ("punctuation", {"unk_token": "<unk>"}),
        ("llama3", {"ignore_merges": True}),
        ("punctuation", {"continuing_subword_prefix": "##", "unk_token": "<unk>"}),
    ],
)
def test_bpe_options_like_transformers(name, bpe, tmp_path):
    tok = _trained(name, **bpe)
    if "continuing_subword_prefix" in bpe:
        tok.decoder = decoders.WordPiece(prefix="##")
    _assert_like_transformers(tok, tmp_path)


@pytest.mark.parametrize(
    "processor",
    [
        post.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 1)],
        ),
        post.ByteLevel(trim_offsets=True),
    ],
)
@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True, "add_eos_token": False}])
def test_post_processors_and_config_flags_like_transformers(processor, flags, tmp_path):
    """(ids only: transformers' add_bos_token is the config's flag, Ember's says what encoding
    adds, see test_bos_eos_flags_follow_the_post_processor)"""
    tok = _trained("llama3")
    tok.post_processor = processor
    _assert_like_transformers(tok, tmp_path, flags)


@pytest.mark.parametrize(
    "flags",
    [
        {"lstrip": True},
        {"rstrip": True},
        {"single_word": True},
        {"normalized": True},
        {"lstrip": True, "rstrip": True},
    ],
)
@pytest.mark.parametrize("special", [True, False])
def test_added_token_flags_like_transformers(flags, special, tmp_path):
    tok = _trained("bytelevel", norms.Lowercase())
    added = [
        AddedToken("[MASK]", special=special, **flags),
        AddedToken("Hello", special=special, **flags),
    ]
    if special:
        tok.add_special_tokens(added)
    else:
        tok.add_tokens(added)
    _assert_like_transformers(tok, tmp_path)


def test_deepseek_llm_tokenizer_json_named_llama_tokenizer(tmp_path):
    """DeepSeek LLM's folder says LlamaTokenizerFast over a byte-level tokenizer.json: read as
    written (transformers 5 too: its TokenizersBackend, not LlamaTokenizer's Metaspace)."""
    tok = _trained("deepseek_llm")
    tok.post_processor = post.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ours, _ = _assert_like_transformers(
        tok,
        tmp_path,
        {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "legacy": True},
    )
    assert ours.encode("x", add_special_tokens=True)[0] == 0


def test_bpe_dropout_is_ignored_with_a_warning(tmp_path):
    """A tokenizer.json saved with BPE dropout (a training-time regularizer): transformers and
    the tokenizers library drop merges at random on every encode, so the same text got other
    ids each call (the loss mask, packing and cached reference log-probs assume one
    tokenization). Ember encodes without dropout, as at inference, and says so."""
    tok = _trained("bytelevel")
    spec = json.loads(tok.to_str())
    spec["model"]["dropout"] = 0.5
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.warns(UserWarning, match="dropout 0.5.*ignor"):
        ours = load_tokenizer(tmp_path)
    text = "Hello world, the quick brown fox jumps over the lazy dog 12345"
    assert len({tuple(ours.encode(text)) for _ in range(20)}) == 1
    assert ours.encode(text) == tok.encode(text).ids
    ours.save_pretrained(tmp_path / "out")  # and the saved copy encodes the same way
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["dropout"] in (
        None,
        0.0,
    )


@pytest.mark.parametrize("prefix", [True, False])
def test_qwen2_add_prefix_space_survives_save_pretrained(prefix, tmp_path):
    """A model type qwen2 folder is read by transformers 5's Qwen2Tokenizer, which builds its
    ByteLevel from tokenizer_config.json's ``add_prefix_space`` (Ember too). Ember's saved config
    lacked the flag, so with ``add_prefix_space = true`` the saved folder lost the prefix in
    transformers and in Ember ("Hello world": ids [225, 283, 291] became [283, 291])."""
    tok = _trained("qwen2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    ours, theirs = _assert_like_transformers(
        tok, tmp_path, {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": prefix}
    )
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    again, theirs_again = load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out)
    want = [theirs.encode(t, add_special_tokens=False) for t in TEXTS]
    assert again.encode_batch(TEXTS) == want
    assert [theirs_again.encode(t, add_special_tokens=False) for t in TEXTS] == want


def _model_trained(model, trainer, pre_tokenizer, normalizer=None, decoder=None) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(CORPUS, trainer)
    if decoder is not None:
        tok.decoder = decoder
    return tok


def _bpe(pre_tokenizer, normalizer=None, decoder=None, byte_level=False, **bpe) -> Tokenizer:
    alphabet = pre.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False, initial_alphabet=alphabet
    )
    return _model_trained(models.BPE(**bpe), trainer, pre_tokenizer, normalizer, decoder)


def _wordpiece() -> Tokenizer:
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=[*SPECIALS, "[CLS]", "[SEP]"], show_progress=False
    )
    tok = _model_trained(
        models.WordPiece(unk_token="<unk>"),
        trainer,
        pre.BertPreTokenizer(),
        norms.BertNormalizer(),
        decoders.WordPiece(),
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = post.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def _unigram() -> Tokenizer:
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    return _model_trained(
        models.Unigram(), trainer, pre.Metaspace(), norms.NFKC(), decoders.Metaspace()
    )


_SPM_DECODER = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
# name -> tokenizer: the rest of what real tokenizer.json files combine
MORE = {
    "split_behaviors": lambda: _bpe(
        pre.Sequence(
            [
                pre.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre.Split(" ", behavior="merged_with_next"),
                pre.Split(",", behavior="merged_with_previous"),
                pre.Split(Regex(r"\t+"), behavior="removed"),
                _bl(regex=False),
            ]
        ),
        decoder=decoders.ByteLevel(),
        byte_level=True,
    ),
    "split_contiguous_inverted": lambda: _bpe(
        pre.Sequence(
            [
                pre.Split(Regex(r"[^\p{L}\p{N}]"), behavior="contiguous"),
                pre.Split(Regex(r"\p{L}+"), behavior="isolated", invert=True),
                _bl(regex=False),
            ]
        ),
        decoder=decoders.ByteLevel(),
        byte_level=True,
    ),
    "scripts_whitespace": lambda: _bpe(
        pre.Sequence([pre.UnicodeScripts(), pre.Whitespace()]), unk_token="<unk>"
    ),
    "nfd_strip_accents": lambda: _bpe(
        pre.WhitespaceSplit(),
        norms.Sequence([norms.NFD(), norms.StripAccents(), norms.Lowercase()]),
        unk_token="<unk>",
    ),
    # Llama 2 / Mistral v0.1: the prefix in the normalizer, byte fallback, the prefix stripped
    "spm_legacy_normalizer": lambda: _bpe(
        None,
        norms.Sequence([norms.Prepend("▁"), norms.Replace(" ", "▁")]),
        decoders.Sequence([*_SPM_DECODER, decoders.Strip(" ", 1, 0)]),
        byte_fallback=True,
        fuse_unk=True,
        unk_token="<unk>",
    ),
    "replace_regex_strip": lambda: _bpe(
        _bl(),
        norms.Sequence([norms.Replace(Regex(r"\s+"), " "), norms.Strip()]),
        decoders.ByteLevel(),
        byte_level=True,
    ),
    "wordpiece": _wordpiece,
    "unigram": _unigram,
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_pipelines_like_transformers(name, tmp_path):
    """Split with each behavior (and inverted), UnicodeScripts, NFD + StripAccents, Llama 2's
    normalizer with ByteFallback + Fuse + Strip, a regex Replace, WordPiece with Bert's
    normalizer, pre-tokenizer, decoder and [CLS]/[SEP] template, Unigram with NFKC; decoding
    cleaned up as tokenizer_config.json asks (transformers 5: never for BPE)."""
    _assert_like_transformers(MORE[name](), tmp_path, {"clean_up_tokenization_spaces": True})
