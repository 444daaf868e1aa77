"""GGUF export of a tokenizer: an Ember ``Tokenizer`` -> ``tokenizer.*`` metadata, the inverse of
``ember.models.tokenizer.tokenizer_from_gguf`` (and what llama.cpp's ``convert_hf_to_gguf.py``
writes).

- ``tokenizer.ggml.model`` "gpt2": byte-level BPE (below). "llama": SentencePiece-style BPE with
  byte fallback (Llama 2, Mistral v0.1-v0.3, Gemma, Phi-3), see ``ember.models.gguf_tokenizer_spm``.
  Other tokenizers (Unigram, WordPiece, BPE with neither byte fallback nor byte-level decoding)
  are refused: none of the families Ember exports uses them.
- ``tokenizer.ggml.pre``: llama.cpp names a pre-tokenizer instead of storing its regex. Like the
  converter (which hashes the tokenization of a probe text), the tokenizer's pre-tokenizer is run
  on a probe text and compared with the split of each name the importer knows; the first name
  that splits identically (and agrees on BPE ``ignore_merges``) is written. Names that share a
  split (``smollm`` / ``starcoder``) come back as the first of them.
- tokens in id order (vocabulary gaps up to the embedding size filled with ``[PAD<i>]`` tokens of
  type unused, as the converter does), types (control for special added tokens, user-defined for
  other added tokens, normal otherwise), merges, special token ids, add_bos / add_eos, the chat
  template, and end-of-turn ids that the template does not already imply.

A normalizer (Qwen2's NFC) has no GGUF field and is dropped, as llama.cpp's converter drops it;
one that changes more text than NFC does (Lowercase, NFKC) is refused.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from typing import Any

from ember import EmberError
from ember.models.gguf_pretokenizers import _PRE_SPLITS, _WHOLE_WORDS, _pre_tokenizer
from ember.models.tokenizer import Tokenizer, gguf_stop_ids

_CONTROL, _USER_DEFINED, _NORMAL, _UNUSED = 3, 4, 1, 5
# a text that tells the known splits apart: contractions, digit runs, letters and marks of
# several scripts, punctuation runs, newlines, tabs and runs of spaces, code
PROBE = ("Hello World! I'm  it's THE   end... 3 33 333 3333 1234567 ₂ ⅷ\n\n\t\t x\r\n"
         "ÀÉÎ éàü ÿ naïve nai\u0308ve Ωμέγα Привет мир 你好世界 こんにちは 안녕하세요 🦙🚀 ︵ 𝟘\n"
         "def f(x):\n    return x**2 // 3 # ok?!\n  '''s 'LL 'Ve\n ```js\nconst a = [1,2];```"
         " ١٢٣ ๑๒๓ 1st2nd 3rd-4th")
# preferred name per split (what convert_hf_to_gguf.py writes for the best-known model of each),
# then every other name the importer knows
_PREFERRED = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "seed-coder", "deepseek-coder", "gpt2",
              "smollm", "smaug-bpe")


def _candidate_names() -> list[str]:
    return list(dict.fromkeys((*_PREFERRED, *_PRE_SPLITS)))


def _split(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def gguf_pre_name(tok: Tokenizer, ignore_merges: bool) -> str:
    """The ``tokenizer.ggml.pre`` name whose split equals this tokenizer's on ``PROBE``."""
    pre = tok.backend.pre_tokenizer
    if pre is None:
        raise EmberError("save_gguf: the tokenizer has no pre-tokenizer; llama.cpp needs one of "
                         "its named byte-level pre-tokenizers")
    ours = _split(pre, PROBE)
    for name in _candidate_names():
        if (name in _WHOLE_WORDS) != ignore_merges:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = _pre_tokenizer({"tokenizer.ggml.pre": name}, "")
        if _split(theirs, PROBE) == ours:
            return name
    raise EmberError("save_gguf: the tokenizer's pre-tokenizer (how it splits text before BPE) "
                     "matches none that llama.cpp names (tokenizer.ggml.pre; known: "
                     f"{', '.join(sorted(_PRE_SPLITS))}), so llama.cpp would tokenize "
                     "differently; export the merged HF folder (ember export --merged) and "
                     "convert it with a llama.cpp that knows this tokenizer")


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise EmberError(f"save_gguf: BPE merge {m!r} cannot be written as 'a b' text")
        out.append(" ".join(pair))
    return out


def tokenizer_metadata(tok: Tokenizer, vocab_size: int, arch: str | None = None
                       ) -> dict[str, Any]:
    """``tokenizer.*`` GGUF metadata for ``tok`` and a model whose embedding has ``vocab_size``
    rows (ids the tokenizer does not use become ``[PAD<i>]`` tokens); ``arch``: the file's
    ``general.architecture`` (Gemma's SentencePiece vocabularies are read back differently)."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    decoder = json.dumps(spec.get("decoder"))
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not spm and (model.get("type") != "BPE" or "ByteLevel" not in decoder):
        kind = model.get("type")
        if kind == "BPE":
            kind = "BPE (with neither byte fallback nor byte-level decoding)"
        raise EmberError(
            "save_gguf: only BPE tokenizers can be written to GGUF: byte-level (GPT-2 style: Llama "
            "3, Qwen, SmolLM) or SentencePiece-style with byte fallback (Llama 2, Mistral, Gemma, "
            f"Phi-3); this one is a {kind} tokenizer (llama.cpp reads Unigram or WordPiece "
            "vocabularies only for other model families). Export the merged HF folder (ember "
            "export --merged) instead")
    if spm:
        # (imported here: that module checks the export on this module's PROBE)
        from ember.models.gguf_tokenizer_spm import check_round_trip, spm_vocab_metadata

        md = spm_vocab_metadata(tok, spec, vocab_size, arch)
        _add_specials(tok, md)
        unk = tok.backend.token_to_id(model.get("unk_token") or "")
        if unk is not None:
            md.setdefault("tokenizer.ggml.unknown_token_id", unk)
        check_round_trip(tok, md, arch)
        return md
    _check_dropped_normalizer(tok)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = tok.backend.get_added_tokens_decoder()
    vocab.update({t.content: i for i, t in added.items()})
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise EmberError(f"save_gguf: the tokenizer has ids up to {n - 1} but the model's "
                         f"embedding only {vocab_size} rows; resize the embedding first")
    tokens: list[str | None] = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [_NORMAL] * n
    for i, t in added.items():
        types[i] = _CONTROL if t.special else _USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": gguf_pre_name(tok, bool(model.get("ignore_merges"))),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": _merges(model),
    }
    _add_specials(tok, md)
    return md


def _check_dropped_normalizer(tok: Tokenizer) -> None:
    """A byte-level file has no normalizer (llama.cpp tokenizes the raw text): refuse one that
    changes more than NFC does (Qwen2's NFC is dropped, as the converter drops it)."""
    norm = tok.backend.normalizer
    if norm is None:
        return
    for text in (PROBE, *PROBE.split()):
        ours = norm.normalize_str(text)
        if ours != unicodedata.normalize("NFC", text):
            raise EmberError(
                f"save_gguf: the tokenizer's normalizer turns {text[:40]!r} into {ours[:40]!r}; "
                "GGUF cannot say so and llama.cpp would tokenize the raw text, so the file "
                "would not give the model's ids. Export the merged HF folder (ember export "
                "--merged) instead")


def _add_specials(tok: Tokenizer, md: dict[str, Any]) -> None:
    """Special token ids, add_bos / add_eos, the chat template and extra stop ids, into ``md``."""
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "unknown_token_id": tok.unk_token_id, "padding_token_id": tok._id(tok.pad_token)}
    md.update({f"tokenizer.ggml.{k}": int(v) for k, v in ids.items() if v is not None})
    md["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos_token)
    md["tokenizer.ggml.add_eos_token"] = bool(tok.add_eos_token)
    if tok.chat_template is not None:
        md["tokenizer.chat_template"] = tok.chat_template
    # named ones ("tool_use", "rag") as gguf's add_chat_template writes them (name: [A-Za-z0-9_])
    named = {re.sub(r"[^A-Za-z0-9]", "_", n): t for n, t in tok.chat_templates.items()}
    md.update({f"tokenizer.chat_template.{n}": t for n, t in named.items()})
    if named:
        md["tokenizer.chat_templates"] = sorted(named)
    # stop ids llama.cpp would not find from eos and the template: eot, then eom
    extra = sorted(set(tok.eos_token_ids) - set(gguf_stop_ids(md)))
    for key, i in zip(("eot_token_id", "eom_token_id"), extra, strict=False):
        md[f"tokenizer.ggml.{key}"] = int(i)
    if len(extra) > 2:
        raise EmberError(f"save_gguf: the tokenizer stops at {len(extra)} ids besides eos "
                         f"({extra}); GGUF holds two (eot, eom). Drop the others from "
                         "generation_config.json's eos_token_id")
