"""How llama.cpp splits text before byte-level BPE, per GGUF ``tokenizer.ggml.pre``: the split
regexes (as the models' own tokenizer.json writes them) and the ``tokenizers`` pre-tokenizer built
from them. Used to read GGUF vocabularies (``ember.models.tokenizer.tokenizer_from_gguf``) and to
name a tokenizer's split when writing one (``ember.models.gguf_tokenizer``)."""

from __future__ import annotations

import warnings
from typing import Any

from tokenizers import Regex, pre_tokenizers

from ember import EmberError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# llama.cpp's split regexes per tokenizer.ggml.pre (llama-vocab.cpp, as the models' own
# tokenizer.json writes them); applied before byte mapping.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 3.5: Qwen2's, with combining marks kept in words and out of punctuation runs
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek Coder (Llama architecture): several regexes, each splitting the previous one's pieces
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_GPT2, _DIGITS = "gpt2", "digits"  # GPT-2's regex; the same after splitting every digit alone
_LLAMA3_PRES = (
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
)
_PRE_SPLITS = {
    **dict.fromkeys((*_LLAMA3_PRES, "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), _QWEN2
    ),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "tekken": _TEKKEN,
    "seed-coder": _SEED_CODER,
    "deepseek-coder": _DEEPSEEK_CODER,
    **dict.fromkeys(
        (
            "gpt2",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "gigachat",
            "a.x-4.0",
            "mellum",
            "exaone4",
            "jina-es",
            "jina-de",
            "jina-v2-es",
            "jina-v2-de",
        ),
        _GPT2,
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS
    ),
}
# llama.cpp keeps a pre-token the vocabulary has whole instead of merging it (tokenizer.json's
# "ignore_merges") and adds BOS unless the file says otherwise, for these types only.
_WHOLE_WORDS = frozenset((*_LLAMA3_PRES, "tekken"))


def _pre_tokenizer(md: dict[str, Any], source: str):
    pre = md.get("tokenizer.ggml.pre")
    if pre is None or pre == "default":
        # llama.cpp's fallback for such files is a different split, and warns the same way
        warnings.warn(
            f"{source}: tokenizer.ggml.pre is {pre!r}: the file does not say how its "
            "vocabulary splits text; splitting like GPT-2 (as transformers does), which "
            "may differ from the model's own tokenizer. Re-convert the model with a "
            "current llama.cpp to be sure",
            stacklevel=3,
        )
        pre = "gpt2"
    split = _PRE_SPLITS.get(pre)
    if split is None:
        raise EmberError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(tokenizer.ggml.pre; known: {', '.join(sorted(_PRE_SPLITS))}); import "
            "the original Hugging Face model, whose tokenizer.json says how to split"
        )
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=split in (_GPT2, _DIGITS)
    )
    if split == _GPT2:
        return byte_level
    if split == _DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regexes = (split,) if isinstance(split, str) else split
    return pre_tokenizers.Sequence(
        [*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes), byte_level]
    )
