"""A ``Tokenizer`` from GGUF metadata (``tokenizer.ggml.*``): byte-level BPE, splitting text the
way llama.cpp does for the file's ``tokenizer.ggml.pre`` type, and SentencePiece-style BPE
(``ember.models.spm``); and the ids a GGUF file's generation stops at. The inverse of
``ember.models.gguf_tokenizer`` (export). Re-exported by ``ember.models.tokenizer``.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from ember import EmberError
from ember.models.gguf_pretokenizers import _WHOLE_WORDS, _bytes_to_unicode, _pre_tokenizer
from ember.models.tokenizer_core import Tokenizer, _set_bos_eos

# ------------------------------------------------------------------------------------------
# GGUF (the pre-tokenizer tables live in ember.models.gguf_pretokenizers)


_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _byte_level_backend(md: dict[str, Any], tokens: list[str], types: list[int], source: str):
    if "tokenizer.ggml.merges" not in md:
        raise EmberError(f"{source}: GGUF metadata tokenizer.ggml.merges is missing")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Byte-level vocabularies are stored already mapped, except control and user-defined tokens,
    # which llama.cpp's converter writes as plain text (DeepSeek's "<｜end▁of▁sentence｜>"): those
    # keep their text, matched whole in the input like llama.cpp does. Any other token is
    # respelled like transformers' GGUF converter does, so both agree on ids.
    vocab = {(t if set(t) <= alphabet or ty in (_CONTROL, _USER_DEFINED)
              else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, (t, ty) in enumerate(zip(tokens, types, strict=True))}
    pairs = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    if any(len(p) != 2 for p in pairs):
        raise EmberError(f"{source}: malformed tokenizer.ggml.merges entry")
    whole = md.get("tokenizer.ggml.pre") in _WHOLE_WORDS
    unknown = next((m for m in pairs if not {m[0], m[1], m[0] + m[1]} <= vocab.keys()), None)
    if unknown is not None:  # (was: tokenizers' bare "Token ... out of vocabulary")
        raise EmberError(f"{source}: tokenizer.ggml.merges has {' '.join(unknown)!r}, whose "
                         "parts or result are not in tokenizer.ggml.tokens; the file's "
                         "vocabulary is corrupt: convert the model again")
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None,
                                              continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False,
                                              ignore_merges=whole))
    backend.pre_tokenizer = _pre_tokenizer(md, source)
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


# The end-of-turn texts llama.cpp recognises when a file names no eot token (llama-vocab.cpp).
_TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
              "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<end_of_utterance>")


def gguf_stop_ids(md: dict[str, Any]) -> list[int]:
    """Every id that ends a generation for a GGUF file: its eos, eot and eom tokens, then those of
    llama.cpp's end-of-turn tokens that the chat template writes (Gemma's ``<end_of_turn>``,
    Phi-3's ``<|end|>``, Llama 3's ``<|eot_id|>`` in files without ``eot_token_id``), which
    llama.cpp stops at too and the models' generation_config.json lists."""
    ids = [md.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    template = md.get("tokenizer.chat_template") or ""
    if not isinstance(template, str):
        raise EmberError(f"GGUF metadata tokenizer.chat_template is {template!r}, not text; the "
                         "file is corrupt: convert the model again")
    tokens = md.get("tokenizer.ggml.tokens") or []
    ids += [i for i, t in enumerate(tokens) if t in _TURN_ENDS and t in template]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= i < len(tokens)))


def tokenizer_from_gguf(md: dict[str, Any], source: str = "GGUF") -> Tokenizer:
    """Build the tokenizer a GGUF file describes: byte-level BPE (``tokenizer.ggml.model`` gpt2)
    or SentencePiece-style BPE with byte fallback (``llama``; see ``ember.models.spm``)."""
    kind = md.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise EmberError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' "
                         "byte-level BPE and 'llama' SentencePiece BPE); convert the original "
                         "Hugging Face model instead")
    if "tokenizer.ggml.tokens" not in md:
        raise EmberError(f"{source}: GGUF metadata tokenizer.ggml.tokens is missing")
    tokens = list(md["tokenizer.ggml.tokens"])
    if tokens.count("") > 1:  # llama.cpp names empty tokens "[EMPTY_<id>]" (one stays "")
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        md = {**md, "tokenizer.ggml.tokens": tokens}
    if len(set(tokens)) != len(tokens):  # llama.cpp refuses such a file too
        seen: set[str] = set()
        twice = next(t for t in tokens if t in seen or seen.add(t))
        raise EmberError(f"{source}: token {twice!r} appears twice in tokenizer.ggml.tokens; the "
                         "file's vocabulary is corrupt: convert the model again")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise EmberError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        backend, vocab = _byte_level_backend(md, tokens, types, source)
    else:
        from ember.models.spm import spm_backend

        backend = spm_backend(md, source)
        vocab = backend.get_vocab()
    typed = list(zip(tokens, types, strict=True))
    # the unknown piece too: llama.cpp matches it in text like a control token (and transformers'
    # GGUF tokenizer makes it special), so "<unk>" is one token and skipped when decoding
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed
                                if ty in (_UNKNOWN, _CONTROL) and t in vocab])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed
                        if ty == _USER_DEFINED and t in vocab])

    def tok(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise, and to
    # Llama-3 / Tekken byte-level ones.
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama" or md.get(
        "tokenizer.ggml.pre") in _WHOLE_WORDS))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = tok("bos_token_id"), tok("eos_token_id")
    # without the token the flag is off, as transformers turns it off (llama.cpp would add its
    # default id 1: a GGUF export saying add_bos without a BOS id would make it do so)
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if add_bos or add_eos:
        _set_bos_eos(backend, bos if add_bos else None, eos if add_eos else None)
    elif kind == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = gguf_stop_ids(md)
    ctx = next((v for k, v in md.items() if k.endswith(".context_length")), None)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=tok("padding_token_id"),
                     unk_token=tok("unknown_token_id"),
                     chat_template=md.get("tokenizer.chat_template"), add_bos_token=add_bos,
        chat_templates={n: md[f"tokenizer.chat_template.{n}"]
                        for n in md.get("tokenizer.chat_templates") or []
                        if isinstance(md.get(f"tokenizer.chat_template.{n}"), str)},
                     add_eos_token=add_eos, extra_eos_token_ids=extra,
                     model_max_length=int(ctx) if ctx else None)
