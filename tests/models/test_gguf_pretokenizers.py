"""Byte-level GGUF vocabularies per ``tokenizer.ggml.pre``: a BPE is trained at test time with the
`tokenizers` library and the pre-tokenizer the model's own tokenizer.json declares for that type,
written into GGUF metadata (tokens, merges, pre) as llama.cpp's converter does, and read back by
Ember. Oracle: that tokenizer.json-style `tokenizers.Tokenizer` (ids on tricky text)."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
import transformers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from ember import EmberError
from ember.models.gguf_pretokenizers import _DEEPSEEK_LLM_LETTERS
from ember.models.tokenizer import tokenizer_from_gguf
from tests.models.test_tokenizer import TEXTS

_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# The models' tokenizer.json regexes, written out here (not imported from Ember).
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35 = QWEN2.replace(r"?\p{L}+", r"?[\p{L}\p{M}]+").replace(r"[^\s\p{L}\p{N}]+",
                                                             r"[^\s\p{L}\p{M}\p{N}]+")
UPPER, LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _deepseek_coder():
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in (
        r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


# DeepSeek LLM's tokenizer.json: letters of many scripts, ASCII / fullwidth punctuation, trailing
# spaces and CJK split off in turn, then every digit alone: built by `tokenizers` from the letter
# ranges Ember's GGUF table uses (the oracle checks the splitting, not the transcription)
DEEPSEEK_LLM_LETTERS = _DEEPSEEK_LLM_LETTERS


def _deepseek_llm():
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in (
        r"[\r\n]", r"\s?[" + DEEPSEEK_LLM_LETTERS + "]+", "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        r"\s+$", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


# DeepSeek V3 / R1's tokenizer.json (also the Qwen3-architecture DeepSeek-R1-0528-Qwen3-8B): up to
# three digits, kana and CJK runs, then words that a punctuation mark may open
DEEPSEEK_V3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
               r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _deepseek_v3():
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in (
        r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", DEEPSEEK_V3)]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                      use_regex=False)])


# tokenizer.ggml.pre -> (pre-tokenizer of the model's tokenizer.json, its BPE "ignore_merges")
CASES = {
    "llama-bpe": (lambda: _split(LLAMA3), True),
    "tekken": (lambda: _split(TEKKEN), True),
    "qwen2": (lambda: _split(QWEN2), False),
    "qwen35": (lambda: _split(QWEN35), False),
    "gpt-4o": (lambda: _split(GPT4O), False),
    "seed-coder": (lambda: _split(SEED_CODER), False),
    "gpt-2": (_gpt2, False),
    "deepseek-coder": (_deepseek_coder, False),
    "deepseek-llm": (_deepseek_llm, False),
    "deepseek-v3": (_deepseek_v3, False),
    "smollm": (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                _gpt2()]), False),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRICKY = TEXTS + [
    "  0", "\r\n  9", "x   12345678 y", "I'LL WE'VE it'S", "a\u0301\u0302 e\u0301",
    "HTTPServer iPhone", "中文字符 한국어 テキスト ١٢٣", "Ωμέγα Привет Ｆｕｌｌ！ 「引用」。 x  \n",
    "https://a.b/c?d=1#e", "👨‍👩‍👧 🏳️‍🌈", "\t\t\tx\n\n\n  \n", "ǅemal ŉ", "x" * 200, "<|im_start",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [*"abcXYZ019 '\t\n\r.,!?-_/\\\"<>|()", "é", "ß", "日", "🤖", "\u0301", "\u200d",
                "'s", "'LL", "  ", "\r\n", "İ", "\u00a0", "١"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def _trained(pre: str):
    """(the oracle tokenizer, GGUF tokenizer metadata) for a small BPE trained with ``pre``'s
    pre-tokenizer."""
    make_pre, ignore_merges = CASES[pre]
    trainer = tokenizers.Tokenizer(models.BPE())
    trainer.pre_tokenizer = make_pre()
    trainer.train_from_iterator(TRICKY * 3 + _random_texts(400, 1), trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(trainer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    oracle = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                             ignore_merges=ignore_merges))
    oracle.pre_tokenizer = make_pre()
    oracle.decoder = decoders.ByteLevel()
    oracle.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokens = sorted(vocab, key=vocab.get)
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
          "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    return oracle, md


@pytest.mark.parametrize("pre", list(CASES))
def test_ids_match_the_models_own_pre_tokenizer(pre):
    oracle, md = _trained(pre)
    ours = tokenizer_from_gguf(md)
    for text in TRICKY + _random_texts(300, 7):
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_llama3_keeps_whole_words_and_adds_bos():
    """Llama 3 / Tekken: a pre-token the vocabulary has is one token even where the merges would
    stop short of it (tokenizer.json's ignore_merges, llama.cpp's too); BOS is added unless the
    file says otherwise."""
    tokens = [*SPECIALS, "a", "b", "c", "ab", "bc", "abc"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": ["b c", "a b", "ab c"], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1, 1]}
    abc, a, bc = (tokens.index(t) for t in ("abc", "a", "bc"))
    for pre in ("llama-bpe", "tekken"):
        tok = tokenizer_from_gguf({**md, "tokenizer.ggml.pre": pre})
        assert tok.encode("abc") == [abc] and tok.add_bos_token
        assert tok.encode("abc", add_special_tokens=True) == [1, abc]
        no_bos = tokenizer_from_gguf({**md, "tokenizer.ggml.pre": pre,
                                      "tokenizer.ggml.add_bos_token": False})
        assert no_bos.encode("abc", add_special_tokens=True) == [abc]
    qwen = tokenizer_from_gguf({**md, "tokenizer.ggml.pre": "qwen2"})
    assert qwen.encode("abc") == [a, bc] and not qwen.add_bos_token


def test_missing_pre_warns_and_unknown_pre_is_refused():
    _, md = _trained("gpt-2")
    del md["tokenizer.ggml.pre"]
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre is None"):
        tok = tokenizer_from_gguf(md)
    assert tok.encode("it's 2024") == tokenizer_from_gguf(
        {**md, "tokenizer.ggml.pre": "gpt-2"}).encode("it's 2024")
    for pre in ("kimi-k2", "bloom", "chameleon"):
        with pytest.raises(EmberError, match=f"pre-tokenizer '{pre}'.*not supported"):
            tokenizer_from_gguf({**md, "tokenizer.ggml.pre": pre})


def test_every_split_transformers_reads_gives_its_ids(tmp_path):
    """Each ``tokenizer.ggml.pre`` transformers' GGUF loader has a split for (Qwen 3.5, Jina v5,
    F2LLM v2, Kanana 2, Talkie too) gives transformers' ids: a file written with GGUFWriter,
    read by both."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    _, md = _trained("gpt-2")
    md["tokenizer.ggml.add_bos_token"] = False
    texts = TRICKY + _random_texts(30, 5)
    names: dict[str, list[str]] = {}  # transformers reads each split alike: one file per split
    for pre, split in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(split, []).append(pre)
    for group in names.values():
        theirs = _transformers_read(tmp_path / f"{group[0]}.gguf",
                                    {**md, "tokenizer.ggml.pre": group[0]})
        want = [theirs.encode(text, add_special_tokens=False) for text in texts]
        for pre in group:
            ours = tokenizer_from_gguf({**md, "tokenizer.ggml.pre": pre})
            assert [ours.encode(text) for text in texts] == want, pre


def _transformers_read(path, md: dict):
    """The tokenizer transformers' GGUF loader makes of a file holding the metadata ``md``."""
    from gguf import GGUFWriter

    from tests.models.test_gguf import _offline, _put

    w = GGUFWriter(str(path), "llama")
    for k, v in md.items():
        _put(w, k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with _offline():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_empty_tokens_load_as_in_llama_cpp_and_transformers(tmp_path):
    """Several empty strings in tokenizer.ggml.tokens (vocabulary holes some converters leave):
    llama.cpp names each "[EMPTY_<id>]" and loads the file, so does transformers (was refused
    as a duplicate token); text tokenizes as transformers tokenizes it."""
    _, md = _trained("qwen2")
    n = len(md["tokenizer.ggml.tokens"])
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "", ""]
    md["tokenizer.ggml.token_type"] = [*md["tokenizer.ggml.token_type"], 1, 1]
    theirs = _transformers_read(tmp_path / "e.gguf", md)
    ours = tokenizer_from_gguf(md)
    assert ours.vocab_size == n + 2 and ours.id_to_token(n + 1) == f"[EMPTY_{n + 1}]"
    for text in TRICKY:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("normalizer", ["nfc", "lowercase", "nfkc"])
def test_gguf_export_of_a_byte_level_normalizer(normalizer):
    """GGUF has no field for a normalizer and llama.cpp tokenizes the raw text. Qwen2's NFC is
    dropped, as llama.cpp's converter drops it (it changes only non-NFC text); one that changes
    more (Lowercase: "Hello" is "hello" to the model, "Hello" to llama.cpp) was dropped too, so
    the file tokenized differently from the model's tokenizer: now refused, saying why."""
    from tokenizers import normalizers

    from ember.models.gguf_tokenizer import tokenizer_metadata

    tok, md = _trained("qwen2")
    ours = tokenizer_from_gguf(md)
    ours.backend.normalizer = {"nfc": normalizers.NFC(), "lowercase": normalizers.Lowercase(),
                               "nfkc": normalizers.NFKC()}[normalizer]
    n = len(md["tokenizer.ggml.tokens"])
    if normalizer == "nfc":
        assert tokenizer_metadata(ours, n)["tokenizer.ggml.pre"] == "qwen2"
        return
    with pytest.raises(EmberError, match="normalizer.*llama.cpp"):
        tokenizer_metadata(ours, n)
