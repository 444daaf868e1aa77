"""SentencePiece-style BPE vocabularies from GGUF metadata (``tokenizer.ggml.model = "llama"``:
Llama 2, Mistral 7B v0.1-v0.3, TinyLlama, Gemma 1-3, Phi-3 and most older GGUF files).

The file stores the pieces (``tokenizer.ggml.tokens``, spaces written as U+2581), their scores
and types, sometimes merges. The tokenizer is the one transformers builds for such a file, so ids
agree with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``:

- a ``tokenizers`` BPE over the pieces with byte fallback (``<0x41>`` pieces for bytes no piece
  covers) and the unknown piece fused;
- merges from the file, or else recovered from the vocabulary: every split of a piece into two
  pieces, ranked by the piece's score (Gemma: by its position in the file, because Gemma's scores
  do not follow its merge order);
- spaces become U+2581 and a U+2581 is prepended to the text (``Metaspace``, "first" scheme:
  once, not after special tokens); Gemma replaces spaces without a prefix; Phi-3 prepends in the
  normalizer. ``tokenizer.ggml.add_space_prefix = false`` turns the prefix off (llama.cpp's rule;
  transformers ignores the flag and always prepends);
- decoding maps U+2581 back to spaces, fuses byte pieces and drops the prefix space.

Known differences from SentencePiece itself and llama.cpp, shared with transformers (the reader
Ember follows; the one exception is ``add_space_prefix = false`` above, where Ember's ids are
llama.cpp's): text that already starts with a space gets no second U+2581 (" a" is "▁a",
SentencePiece's "▁", "▁a"), and in llama-style files text right after a special token gets no
U+2581 ("<s>Hello": "<s>", "H", ...; llama.cpp prefixes every text fragment: "<s>", "▁He", ...).
Phi-3-style files prefix in the normalizer, so there all three agree.

Files without ``tokenizer.ggml.add_bos_token`` add BOS (llama.cpp's default for this model type).
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from ember import EmberError

SPACE = "\u2581"
_GEMMA = ("gemma", "gemma2", "gemma3")


def recovered_merges(tokens: list[str], rank: dict[str, float], *, longer_first: bool = True
                     ) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: each piece split into two pieces of the vocabulary, best
    ``rank`` first (ties: longer left part, then longer right part, then file order; shorter
    first with ``longer_first=False``, as transformers orders a ``tokenizer.model``'s merges)."""
    sign = 1 if longer_first else -1
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in rank.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in ids and piece[i:] in ids]
        found += sorted(local, key=lambda m: (ids[m[0]], ids[m[1]]))
    found.sort(key=lambda m: (m[2], sign * len(m[0]), sign * len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def spm_backend(md: dict[str, Any], source: str) -> tokenizers.Tokenizer:
    """The ``tokenizers`` backend (model, normalizer, pre-tokenizer, decoder) of a SentencePiece
    GGUF vocabulary; special tokens and the post-processor are the caller's."""
    arch = md.get("general.architecture", "")
    tokens = list(md["tokenizer.ggml.tokens"])
    if arch in _GEMMA:  # runs of spaces are stored as spaces; the pieces spell them with U+2581
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    if "tokenizer.ggml.merges" in md:
        merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
        if any(len(m) != 2 for m in merges):
            raise EmberError(f"{source}: malformed tokenizer.ggml.merges entry")
    else:
        if arch in _GEMMA:
            rank = {t: -float(i) for i, t in enumerate(tokens)}
        else:
            scores = md.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise EmberError(f"{source}: a SentencePiece vocabulary needs "
                                 "tokenizer.ggml.scores (one per token) or tokenizer.ggml.merges; "
                                 "this file has neither")
            rank = dict(zip(tokens, map(float, scores), strict=True))
        merges = recovered_merges(tokens, rank)
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    style = "gemma" if arch in _GEMMA else "phi3" if arch == "phi3" else "llama"
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    return spm_bpe(tokens, merges, unk=unk, style=style, prepend="first" if prefix else "never")


def spm_bpe(tokens: list[str], merges: list[tuple[str, str]], *, unk: str | None, style: str,
            prepend: str) -> tokenizers.Tokenizer:
    """BPE with byte fallback over SentencePiece pieces, split and decoded by ``spm_pipeline``."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                              fuse_unk=True, byte_fallback=True, dropout=None))
    spm_pipeline(backend, style=style, prepend=prepend)
    return backend


def spm_pipeline(backend: tokenizers.Tokenizer, *, style: str, prepend: str) -> None:
    """Give a SentencePiece-piece model transformers' normalizer, pre-tokenizer and decoder for
    ``style`` ("llama": ``Metaspace`` with ``prepend`` "first" / "always" / "never"; "phi3": the
    prefix and spaces in the normalizer; "gemma": spaces replaced, never a prefix)."""
    prefix = prepend != "never" and style != "gemma"
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "gemma":
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif style == "phi3":
        steps = [normalizers.Prepend(SPACE)] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE,
                                                         prepend_scheme=prepend, split=False)
    if prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
