"""GGUF export of a SentencePiece-style vocabulary (Llama 2, Mistral v0.1-v0.3, TinyLlama, Gemma
1-3, Phi-3): an Ember ``Tokenizer`` whose backend is the BPE Hugging Face builds for such models
(byte fallback with ``<0xNN>`` pieces, spaces as U+2581 from a ``Metaspace`` pre-tokenizer or a
``Prepend`` / ``Replace`` normalizer) -> ``tokenizer.ggml.model = "llama"`` metadata, the inverse
of ``ember.models.spm``.

What llama.cpp's ``convert_hf_to_gguf.py`` writes (``_create_vocab_sentencepiece``): the pieces in
id order, spelled with U+2581; types unknown / control (special added tokens) / user-defined
(other added tokens, their U+2581 written back as spaces, because llama.cpp matches them in the
raw text) / byte (``<0xNN>``) / normal, and ``[PAD<i>]`` unused tokens for ids up to the
embedding size; no merges; ``tokenizer.ggml.pre`` "default"; ``add_space_prefix``.

Scores. The converter copies them from ``tokenizer.model``, which an HF folder need not have
(its ``LlamaHfVocab`` fallback writes -1000 for every piece: llama.cpp then merges left to right).
llama.cpp tokenizes such a vocabulary like SentencePiece's BPE: it merges the adjacent pair whose
concatenation is the best-scoring piece, whatever the merge list says. So each piece's score is
minus the rank of the first merge that creates it (an earlier merge scores higher), and pieces no
merge creates (characters, bytes, special and added tokens, padding) score below every merge, in
id order. Ember's and transformers' GGUF readers rebuild the merges from these scores (or, for
Gemma, from the file order, which then has to agree), so all three tokenize alike.

That is exact when the merge list is the one a SentencePiece model implies (every split of a
piece into two pieces, ranked by the piece: what HF's converters write for all these models). A
merge list that is not (a BPE trained with ``tokenizers``, where "abc" is reached only from "ab" +
"c") can tokenize differently; the export therefore reads its own metadata back with Ember's
importer and compares the ids with the tokenizer's on a probe text (scripts, digits, runs of
spaces, newlines, emojis through byte fallback), refusing with the first text that differs.

Also refused, because llama.cpp would tokenize differently: byte fallback without all 256
``<0xNN>`` pieces (llama.cpp aborts on a byte it cannot spell); a normalizer or pre-tokenizer that
does more than write spaces as U+2581 after an optional leading one (lowercasing, NFKC, splitting
"a b" apart); for Gemma, a tokenizer that prepends a space, or merges that do not create pieces in
id order. Unlike the converter, added tokens keep the tokenizer's own ``special`` flag (it also
makes ``<|...|>`` / ``<unused..>`` lookalikes control). Known differences that are the runtimes',
not the file's: llama.cpp prepends U+2581 after every special token and to text that already
starts with a space, HF's "first" ``Metaspace`` does neither (its ``Prepend`` normalizer does the
former); transformers ignores ``add_space_prefix`` (it always prepends, and never for Gemma).
"""

from __future__ import annotations

import re
from typing import Any

from ember import EmberError
from ember.models.gguf_tokenizer import PROBE
from ember.models.tokenizer import Tokenizer

SPACE = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_GEMMA = ("gemma", "gemma2", "gemma3")
# checked after the export: text that does not start with a space and holds no special token
# (where llama.cpp and the HF tokenizers knowingly differ on the prefix space)
CHECKS = (PROBE, "the quick brown fox jumps over the lazy dog, hello world, hello there.",
          "x" * 40 + "    " + "ab" * 20 + "\n\n\n  \t")


def space_prefix(tok: Tokenizer) -> bool:
    """Whether the tokenizer prepends U+2581 to the text (Llama 2, Phi-3) or not (Gemma), from
    what its normalizer and pre-tokenizer make of sample texts; EmberError when they do anything
    llama.cpp's SentencePiece path cannot (which only turns spaces into U+2581, after an optional
    leading one)."""
    backend = tok.backend

    def view(text: str) -> str:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        if backend.pre_tokenizer is not None:
            text = "".join(p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text))
        return text

    seen = view("a b")
    if seen not in ("a" + SPACE + "b", SPACE + "a" + SPACE + "b"):
        raise EmberError(f"save_gguf: the tokenizer's normalizer / pre-tokenizer turns 'a b' into "
                         f"{seen!r}; llama.cpp's SentencePiece tokenizer only writes spaces as "
                         f"U+2581 (and may prepend one), so it would tokenize differently")
    prefix = seen.startswith(SPACE)
    for text in CHECKS:
        want = (SPACE if prefix else "") + text.replace(" ", SPACE)
        if view(text) != want:
            raise EmberError("save_gguf: the tokenizer's normalizer / pre-tokenizer changes more "
                             f"than spaces (e.g. in {text[:40]!r}), which llama.cpp's "
                             "SentencePiece tokenizer cannot do")
    return prefix


def _first_ranks(merges: list) -> dict[str, int]:
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    return rank


def _isolated_pieces(spec: dict, vocab: dict[str, int]) -> set[str]:
    """The pieces a pre-tokenizer ``Split`` isolates whole: the user-defined pieces of
    transformers' generic SentencePiece backend, which splits them off instead of adding them as
    tokens (``ember.models.slow_tokenizer``); llama.cpp matches them in the raw text when typed
    user-defined, as its converter types them from tokenizer.model. ``spec``: the backend's
    tokenizer.json dict."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out: set[str] = set()
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex")
        if step.get("type") != "Split" or step.get("behavior") != "Isolated" or not pattern:
            continue
        try:  # an alternation of escaped pieces; other regexes (Oniguruma's \p{..}) are skipped
            regex = re.compile(pattern)
        except re.error:
            continue
        out |= {t for t in vocab if regex.fullmatch(t)}
    return out


def spm_vocab_metadata(tok: Tokenizer, spec: dict, vocab_size: int, arch: str | None
                       ) -> dict[str, Any]:
    """The vocabulary part of the metadata (tokens, scores, types, add_space_prefix) of an SPM-style
    BPE tokenizer ``tok`` for an embedding of ``vocab_size`` rows; ``spec``: its backend as the
    tokenizer.json dict, which the caller has already serialised (once: ~0.1 s at 32k pieces)."""
    model = spec.get("model") or {}
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise EmberError(f"save_gguf: the vocabulary has byte fallback but no {missing[0]} piece "
                         f"({len(missing)} of the 256 missing); llama.cpp stops on a byte it has "
                         "no <0xNN> piece for")
    added = tok.backend.get_added_tokens_decoder()
    n = max(vocab_size, max([*vocab.values(), *added]) + 1)
    if n > vocab_size:
        raise EmberError(f"save_gguf: the tokenizer has ids up to {n - 1} but the model's "
                         f"embedding only {vocab_size} rows; resize the embedding first")
    merges = model.get("merges") or []
    first = _first_ranks(merges)
    tokens: list[str | None] = [None] * n
    types = [_UNUSED] * n
    unk = model.get("unk_token")
    user = _isolated_pieces(spec, vocab)
    for t, i in vocab.items():
        tokens[i] = t  # (a user-defined piece too: the converter copies tokenizer.model's)
        types[i] = (_BYTE if _BYTE_PIECE.fullmatch(t) else _UNKNOWN if t == unk else
                    _USER_DEFINED if t in user else _NORMAL)
    for i, t in added.items():
        tokens[i] = t.content if t.special else t.content.replace(SPACE, " ")
        # the unk piece stays UNKNOWN when the folder also lists it as a special added token
        # (transformers 5 makes every named special token one; llama.cpp's converter types it 2)
        types[i] = _UNKNOWN if t.content == unk else _CONTROL if t.special else _USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    # merged pieces: minus their first merge's rank; the rest below them, in id order
    made = {i: first[t] for t, i in vocab.items() if t in first}
    scores = [-float(made[i]) if i in made else -float(len(merges) + i) for i in range(n)]
    if arch in _GEMMA:
        # Ember's and transformers' Gemma readers rank pieces by file position, llama.cpp by score
        ids = [i for _, i in sorted((r, i) for i, r in made.items())]
        if ids != sorted(ids):
            raise EmberError("save_gguf: the vocabulary's merges do not create its pieces in id "
                             "order; Gemma GGUF readers (transformers, Ember) rank merges by "
                             "position in the file, llama.cpp by score, so they would disagree")
    prefix = space_prefix(tok)
    if prefix and arch in _GEMMA:
        raise EmberError("save_gguf: this tokenizer prepends a space (U+2581) to the text, which "
                         "Gemma GGUF readers (transformers, Ember) never do; export it with a "
                         "Llama-family model, or use the model's own Gemma tokenizer")
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": prefix}


def check_round_trip(tok: Tokenizer, md: dict[str, Any], arch: str | None) -> None:
    """Read ``md`` back with Ember's importer (which tokenizes like llama.cpp: merges rebuilt from
    the scores) and compare the ids with ``tok``'s on ``CHECKS``; EmberError at the first text
    that differs."""
    from ember.models.tokenizer import tokenizer_from_gguf

    back = tokenizer_from_gguf({"general.architecture": arch or "llama", **md}, "save_gguf")
    for text in CHECKS:
        ours, theirs = tok.encode(text), back.encode(text)
        if ours != theirs:
            at = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                      min(len(ours), len(theirs)))
            a, b = (t.id_to_token(ids[at]) if at < len(ids) else None
                    for t, ids in ((tok, ours), (back, theirs)))
            raise EmberError(
                f"save_gguf: written as SentencePiece scores, this vocabulary tokenizes {text!r} "
                f"differently (token {at}: {b!r} instead of {a!r}). llama.cpp merges any two "
                "adjacent pieces that form a piece, best score first, while this tokenizer's "
                "merge list allows only some of them (typically a BPE trained with the tokenizers "
                "library, not converted from a SentencePiece model); GGUF cannot hold such a "
                "merge list for this tokenizer type. Export the merged HF folder instead "
                "(ember export --merged)")
