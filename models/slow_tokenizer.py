"""Tokenizers of Hugging Face folders that have no tokenizer.json, only a "slow" tokenizer's files.

- ``tokenizer.model``: a SentencePiece ModelProto, read by the small protobuf reader below (no
  sentencepiece or protobuf at run time). For model types whose registered tokenizer is
  transformers 5's generic ``TokenizersBackend`` (config.json's mistral, ministral, mixtral,
  phi3, granite, olmo2), whatever class the folder names, the backend it builds from the model's
  own normalizer spec (``_generic_spm_backend``: SentencePiece's ids with ``legacy``, its
  default). Otherwise BPE models become the backend transformers (5.x) builds
  for ``LlamaTokenizer`` (Llama 2, TinyLlama, Vicuna...) or ``GemmaTokenizer``: the
  pieces in file order, merges recovered from that order (``ember.models.spm.recovered_merges``),
  byte fallback, control pieces as special added tokens, user-defined pieces as plain added
  tokens. Llama: ``Metaspace`` with a prefix space once (``legacy: false``, the default), before
  every text segment (``legacy: true``) or never (``add_prefix_space: false``). Gemma: spaces
  replaced, no prefix. Like transformers, the file's normalizer spec (``add_dummy_prefix``,
  charsmap) is not used: the tokenizer class decides.
  Unigram models become a ``tokenizers`` Unigram over the pieces and scores with the same
  splitting: SentencePiece's algorithm and what transformers 4.x built (5.x's ``LlamaTokenizer``
  recovers BPE merges from such a file instead, whose ids differ from SentencePiece's). Word and
  char models are refused.
  One deliberate difference: a BPE model trained without byte fallback maps a character it
  cannot spell to the unknown piece, as SentencePiece does (transformers 5.x silently drops it).
- ``vocab.json`` + ``merges.txt``: byte-level BPE, split like ``GPT2Tokenizer`` (GPT-2's regex;
  ``CodeGenTokenizer`` too) or ``Qwen2Tokenizer`` (its own regex after NFC; the qwen3_5 model
  types' ``Qwen3_5Tokenizer`` with combining marks kept with their letters, which transformers 5
  cannot build from these files: it ignores them, and Ember warns).

Added tokens come from tokenizer_config.json's ``added_tokens_decoder`` (else the legacy
``added_tokens.json``) and the named special tokens; each must land on the id the folder says.
Which class: tokenizer_config.json's ``tokenizer_class`` (but a qwen2 model's byte-level files are
``Qwen2Tokenizer``, as transformers 5 resolves them), else config.json's ``model_type`` (a
tokenizer.model without either: the generic backend, as transformers 5 builds it).
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ember import EmberError
from ember.models.spm import SPACE, recovered_merges, spm_bpe, spm_pipeline
from ember.models.tokenizer_classes import (
    _QWEN_SPLITS,
    _REGISTERED,
    add_named_specials,
    named_special_tokens,
    promoted_tokens,
    resolved_class,
)

_SPM_CLASSES = ("LlamaTokenizer", "GemmaTokenizer")
# transformers 5's generic backend, which it builds for a tokenizer.model of these model types
# whatever class the folder names (their registered tokenizer is TokenizersBackend), and for a
# folder that names no class (Gemma's excepted)
_GENERIC = "TokenizersBackend"
_GENERIC_TYPES = tuple(t for t, cls in _REGISTERED.items() if cls == "")
_BPE_CLASSES = ("GPT2Tokenizer", "Qwen2Tokenizer", "Qwen3_5Tokenizer")
# The special tokens each class assumes when the folder names none (transformers' defaults).
_DEFAULTS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    _GENERIC: {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "GemmaTokenizer": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
                       "pad_token": "<pad>", "mask_token": "<mask>"},
    "GPT2Tokenizer": dict.fromkeys(("unk_token", "bos_token", "eos_token"), "<|endoftext|>"),
    "Qwen2Tokenizer": dict.fromkeys(("unk_token", "eos_token", "pad_token"), "<|endoftext|>"),
    "Qwen3_5Tokenizer": dict.fromkeys(("unk_token", "eos_token", "pad_token"), "<|endoftext|>"),
}


def has_slow_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a slow tokenizer's files (and so ``load_tokenizer`` can try)."""
    return (folder / "tokenizer.model").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def no_tokenizer_error(folder: Path) -> EmberError:
    """The error for a folder with no tokenizer Ember reads, naming the tokenizer files it has
    (T5's spiece.model, Mistral's tekken.json, a WordPiece vocab.txt...)."""
    found = sorted(f.name for f in folder.glob("*") if f.is_file() and (
        f.suffix == ".model" or f.name.startswith("tokenizer.model") or f.name in (
            "vocab.json", "merges.txt", "vocab.txt", "tekken.json")))
    where = "" if not found else (
        f"; it has {', '.join(found)}, which Ember does not read as a tokenizer: convert the "
        "folder once with transformers (AutoTokenizer.from_pretrained(folder)"
        ".save_pretrained(folder)), which writes a tokenizer.json")
    return EmberError(f"no tokenizer.json in {folder} (nor a slow tokenizer's tokenizer.model or "
                      f"vocab.json + merges.txt){where}")


# ------------------------------------------------------------------------------------------
# SentencePiece ModelProto (sentencepiece_model.proto), only the fields used here

_UNIGRAM, _BPE = 1, 2
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_CONTROL, _USER_DEFINED = 3, 4
_NORMALIZER_FLAGS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


@dataclass(frozen=True)
class SpmModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    unk_piece: str = "<unk>"
    # the normalizer spec (protobuf defaults); only transformers' generic backend uses it
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    precompiled_charsmap: bytes = b""


def _fields(buf: bytes, source: str):
    """(field number, value) for each field of one protobuf message: ints for varints, bytes for
    length-delimited fields, raw 4/8 bytes for fixed-width ones."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        out = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise EmberError(f"{source}: truncated or corrupt protobuf (not a SentencePiece "
                                 "model?)")
            b = buf[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
            continue
        size = varint() if wire == 2 else {1: 8, 5: 4}.get(wire)
        if size is None or pos + size > end:
            raise EmberError(f"{source}: corrupt protobuf (wire type {wire} for field {number}); "
                             "is this a SentencePiece tokenizer.model?")
        yield number, buf[pos:pos + size]
        pos += size


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_spm_model(path: Path) -> SpmModel:
    """Pieces, scores, types and the trainer fields Ember needs from a ``tokenizer.model``."""
    source = str(path)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise EmberError(f"cannot read {path}: {e}") from None
    from ember.models.safetensors_io import lfs_pointer

    pointer = lfs_pointer(path, "the tokenizer")
    if pointer:
        raise EmberError(f"cannot read {path}: {pointer}")
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", buf[:buf.find(b"\n")] if b"\n" in buf else b""):
        raise EmberError(f"{path} is a tiktoken vocabulary (Llama 3's original format), not a "
                         "SentencePiece model; Ember reads it from a tokenizer.json: convert the "
                         "folder once with transformers (AutoTokenizer.from_pretrained(folder)"
                         ".save_pretrained(folder))")
    pieces, scores, types = [], [], []
    trainer: dict[str, Any] = {}
    for number, value in _fields(buf, source):
        if number == 1 and isinstance(value, bytes):  # SentencePiece {piece, score, type}
            piece, score, kind = "", 0.0, 1
            for n, v in _fields(value, source):
                if n == 1 and isinstance(v, bytes):
                    piece = v.decode("utf-8", errors="replace")
                elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and isinstance(v, int):
                    kind = v
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 2 and isinstance(value, bytes):  # TrainerSpec
            for n, v in _fields(value, source):
                if n == 3 and isinstance(v, int):
                    trainer["model_type"] = v
                elif n == 35 and isinstance(v, int):
                    trainer["byte_fallback"] = bool(v)
                elif n == 40 and isinstance(v, int):
                    trainer["unk_id"] = _int32(v)
                elif n == 45 and isinstance(v, bytes):
                    trainer["unk_piece"] = v.decode("utf-8", errors="replace")
        elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
            for n, v in _fields(value, source):
                if n == 2 and isinstance(v, bytes):
                    trainer["precompiled_charsmap"] = v
                elif n in _NORMALIZER_FLAGS and isinstance(v, int):
                    trainer[_NORMALIZER_FLAGS[n]] = bool(v)
    if not pieces:
        raise EmberError(f"{source}: no pieces: not a SentencePiece model (or an empty one)")
    return SpmModel(pieces, scores, types, **trainer)


def _spm_backend(folder: Path, cls: str, cfg: dict) -> tokenizers.Tokenizer:
    path = folder / "tokenizer.model"
    sp = read_spm_model(path)
    if sp.model_type not in (_BPE, _UNIGRAM):
        kind = _MODEL_TYPES.get(sp.model_type, str(sp.model_type))
        raise EmberError(f"{path}: a SentencePiece {kind} model; Ember reads BPE and unigram "
                         "ones. Convert the folder once with transformers "
                         "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) or use "
                         "a model that ships a tokenizer.json")
    if len(set(sp.pieces)) != len(sp.pieces):
        raise EmberError(f"{path}: the same piece appears twice; the file is corrupt")
    if cls == _GENERIC:
        return _generic_spm_backend(sp, cfg)
    unk = sp.pieces[sp.unk_id] if 0 <= sp.unk_id < len(sp.pieces) else None
    if cls == "GemmaTokenizer":
        style, prepend = "gemma", "never"
    else:
        prefix = cfg.get("add_prefix_space")
        style, prepend = "llama", ("never" if prefix is not None and not prefix
                                   else "always" if cfg.get("legacy", False) else "first")
    if sp.model_type == _UNIGRAM:  # SentencePiece's own algorithm, not transformers 5.x's BPE
        if unk is None:
            raise EmberError(f"{path}: unk_id {sp.unk_id} is not a piece; the file is corrupt")
        # SentencePiece spells text with normal and user-defined pieces only: a byte piece
        # ("<0x41>"), an unused, control or unknown one never matches the text that writes it
        # (tokenizers' Unigram would take "<0x41>" for the byte "A"), so they score below any
        # spelling (byte fallback and the unknown piece do not use their scores). Not below an
        # unknown character, which tokenizers scores under every piece: "<0x38>" still takes
        # the byte piece in a model without the character "8"
        normal = [x for x, t in zip(sp.scores, sp.types, strict=True) if t == 1] or [0.0]
        never = (min(normal) - 10) * (max(map(len, sp.pieces)) + 1) - 1e4
        scores = [x if t in (1, _USER_DEFINED) else never
                  for x, t in zip(sp.scores, sp.types, strict=True)]
        backend = tokenizers.Tokenizer(models.Unigram(list(zip(sp.pieces, scores, strict=True)),
                                                      unk_id=sp.unk_id,
                                                      byte_fallback=sp.byte_fallback))
        spm_pipeline(backend, style=style, prepend=prepend)
    else:
        merges = recovered_merges(sp.pieces, {t: -float(i) for i, t in enumerate(sp.pieces)},
                                  longer_first=False)
        backend = spm_bpe(sp.pieces, merges, unk=unk, style=style, prepend=prepend)
    added = [AddedToken(p, special=t == _CONTROL, normalized=False)
             for p, t in zip(sp.pieces, sp.types, strict=True) if t in (_CONTROL, _USER_DEFINED)]
    backend.add_tokens(added)
    return backend


def _generic_spm_backend(sp: SpmModel, cfg: dict) -> tokenizers.Tokenizer:
    """transformers 5's ``TokenizersBackend`` for a tokenizer.model (Mistral, Phi-3 folders without
    tokenizer.json: ``SpmConverter.build_tokenizer_from_spm_proto``), which follows the model's
    own normalizer spec as SentencePiece does: the charsmap, extra-whitespace removal, spaces
    escaped, a dummy prefix before every text segment (``legacy``, the default: also before text
    that starts with a space) or the first one only (``legacy: false``); user-defined pieces split
    off whole, not added tokens; BPE merges of normal pieces ranked by score."""
    legacy = bool(cfg.get("legacy", True))
    pieces = list(sp.pieces)
    renames = {int(i): d["content"] for i, d in (cfg.get("added_tokens_decoder") or {}).items()
               if str(i).isdigit() and isinstance(d, dict) and isinstance(d.get("content"), str)}
    kept = {t for i, t in enumerate(pieces) if i not in renames}
    pieces = [renames[i] if i in renames and renames[i] not in kept else t
              for i, t in enumerate(pieces)]
    user = [t for t, k in zip(pieces, sp.types, strict=True) if k == _USER_DEFINED]
    if sp.model_type == _UNIGRAM:
        model = models.Unigram(list(zip(pieces, sp.scores, strict=True)), unk_id=sp.unk_id,
                               byte_fallback=sp.byte_fallback)
    else:
        normal = {t: (x, i) for i, (t, x, k) in enumerate(zip(pieces, sp.scores, sp.types,
                                                              strict=True)) if k == 1}
        ranked = sorted((-score, i, t[:j], t[j:]) for t, (score, i) in normal.items()
                        for j in range(1, len(t)) if t[:j] in normal and t[j:] in normal)
        model = models.BPE(vocab={t: i for i, t in enumerate(pieces)},
                           merges=[(a, b) for _, _, a, b in ranked], unk_token=sp.unk_piece,
                           fuse_unk=True, byte_fallback=sp.byte_fallback, dropout=None,
                           ignore_merges=bool(user))
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Precompiled(sp.precompiled_charsmap)] if sp.precompiled_charsmap else []
    if sp.remove_extra_whitespaces:  # spaces only, as SentencePiece
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if sp.add_dummy_prefix and legacy:  # Metaspace skips the prefix where "▁" starts the text
        steps.append(normalizers.Replace(Regex(f"\\A{SPACE}"), SPACE * 2))
    backend.normalizer = normalizers.Sequence(steps)
    split = [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always" if legacy
                                      else "first", split=False)] if sp.add_dummy_prefix else []
    if user:
        split.append(pre_tokenizers.Split(Regex("|".join(
            re.escape(t) for t in sorted(user, key=len, reverse=True))), behavior="isolated"))
    if split:
        backend.pre_tokenizer = pre_tokenizers.Sequence(split)
    decode = [decoders.Replace(SPACE, " ")] + ([decoders.ByteFallback()] if sp.byte_fallback
                                               else [])
    if sp.add_dummy_prefix:
        decode += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif sp.byte_fallback:
        decode.append(decoders.Fuse())
    backend.decoder = decoders.Sequence(decode)
    backend.add_tokens([AddedToken(t, special=True, normalized=False)
                        for t, k in zip(pieces, sp.types, strict=True) if k == _CONTROL])
    return backend


# ------------------------------------------------------------------------------------------
# Byte-level BPE (vocab.json + merges.txt)


def _bpe_backend(folder: Path, cls: str, cfg: dict) -> tokenizers.Tokenizer:
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise EmberError(f"{folder}: {cls} needs vocab.json and merges.txt; {f.name} is "
                             "missing")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmberError(f"cannot read the slow tokenizer in {folder}: {e}") from None
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and type(v) is int and 0 <= v < 2**32 for k, v in vocab.items()):
        raise EmberError(f"{vocab_file}: expected a JSON object of token -> id (ids from 0)")
    seen: dict[int, str] = {}
    for t, i in vocab.items():
        if i in seen:
            raise EmberError(f"{vocab_file}: {seen[i]!r} and {t!r} have the same id {i}; the "
                             "file is corrupt")
        seen[i] = t
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        pair = tuple(line.split())
        if len(pair) != 2 or any(p not in vocab for p in pair):
            raise EmberError(f"{merges_file}:{n}: {line!r} is not a merge of two tokens of "
                             "vocab.json")
        if pair[0] + pair[1] not in vocab:  # (tokenizers panics on it)
            raise EmberError(f"{merges_file}:{n}: {line!r} merges into {pair[0] + pair[1]!r}, "
                             "which vocab.json lacks; the tokenizer files do not belong together")
        merges.append(pair)
    prefix = bool(cfg.get("add_prefix_space") or False)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                              continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
    if cls in _QWEN_SPLITS:  # Qwen3.5's keeps combining marks with their letters
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLITS[cls]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
    return backend


# ------------------------------------------------------------------------------------------
# The hook load_tokenizer calls


def _tokenizer_class(folder: Path, cfg: dict, model_type: str) -> str:
    if model_type in _GENERIC_TYPES and (folder / "tokenizer.model").is_file():
        return _GENERIC
    cls = cfg.get("tokenizer_class")
    if isinstance(cls, str):
        base = cls.removesuffix("Fast")
        if base == "CodeGenTokenizer":  # Phi-1.5 / Phi-2: GPT-2's pipeline in transformers 5
            base = "GPT2Tokenizer"  # (but a qwen2 model's is still Qwen2Tokenizer, below)
        if base in _BPE_CLASSES:  # a qwen2 model's is Qwen2Tokenizer, whatever the folder says
            registered = resolved_class(cfg, model_type)
            return registered if registered in _BPE_CLASSES else base
        if base in _SPM_CLASSES:
            return base
        raise EmberError(f"{folder}: tokenizer_class {cls!r} with no tokenizer.json; Ember builds "
                         f"{', '.join(_SPM_CLASSES + _BPE_CLASSES)}, CodeGenTokenizer from "
                         "their slow files. Convert the folder once with transformers "
                         "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    if (folder / "tokenizer.model").is_file():  # (transformers 5: Llama's and no model type too)
        return "GemmaTokenizer" if model_type.startswith("gemma") else _GENERIC
    registered = resolved_class(cfg, model_type)  # (Qwen3_5Tokenizer for the qwen3_5 types)
    if registered in _BPE_CLASSES:
        return registered
    return "Qwen2Tokenizer" if model_type.startswith("qwen") else "GPT2Tokenizer"


def _added_token(d: dict, content: str) -> AddedToken:
    flags = {k: bool(d[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
             if k in d}
    return AddedToken(content, **flags)


def slow_backend(folder: Path, cfg: dict, smap: dict, model_type: str = ""
                 ) -> tuple[tokenizers.Tokenizer, dict[str, str], bool, list[str]]:
    """The backend transformers builds from ``folder``'s slow files (without post-processor: the
    caller adds bos/eos), the special tokens its tokenizer class assumes where the folder names
    none (those the vocabulary lacks are left out: transformers would add them as new tokens),
    whether that backend is transformers 5's generic one (which cleans up decoding), and the
    additional special tokens transformers 5 lists for a tokenizer.model in place of the config's
    (its control and user-defined pieces, in id order; control ones only for the generic backend;
    none for vocab.json + merges.txt)."""
    cls = _tokenizer_class(folder, cfg, model_type)
    pieces: list[str] = []
    if cls in (*_SPM_CLASSES, _GENERIC):
        if not (folder / "tokenizer.model").is_file():
            raise EmberError(f"{folder}: {cls} needs tokenizer.model, which is missing")
        backend = _spm_backend(folder, cls, cfg)
        # (its added tokens so far are exactly those pieces: the generic one splits user-defined
        # pieces off in its pre-tokenizer instead)
        pieces = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items())]
    else:
        backend = _bpe_backend(folder, cls, cfg)
        if cls == "Qwen3_5Tokenizer":
            warnings.warn(f"{folder}: transformers 5's Qwen3_5Tokenizer does not read vocab.json "
                          "and merges.txt (it loads a one-token vocabulary and encodes every "
                          "text to no ids); Ember builds the class's pipeline over them. For "
                          "transformers, save the tokenizer with Ember (tokenizer.json)",
                          stacklevel=3)
    defaults = {k: v for k, v in _DEFAULTS[cls].items() if k not in cfg and k not in smap}
    every = {**smap, **cfg, **defaults}
    specials = named_special_tokens(every)
    # the tokens of added_tokens.json that are special: transformers 5 counts the named and the
    # extra ones there, not (its 4.x name) additional_special_tokens
    named = {t.content for t in named_special_tokens(
        {k: v for k, v in every.items() if k != "additional_special_tokens"})}

    # (id, token) pairs the folder pins: added_tokens_decoder, else the legacy added_tokens.json
    pinned: list[tuple[int, AddedToken]] = []
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for i, d in decoder.items():
            if not isinstance(d, dict) or not isinstance(d.get("content"), str) or not str(
                    i).isdigit():
                raise EmberError(f"{folder}/tokenizer_config.json: added_tokens_decoder entry "
                                 f"{i!r} needs an id as key and a 'content' string")
            # the generic backend matches them in the raw text, so that each segment between
            # them gets its own prefix (transformers: normalized False where the model prefixes)
            d = {**d, "normalized": False} if cls == _GENERIC else d
            pinned.append((int(i), _added_token(d, d["content"])))
    elif (folder / "added_tokens.json").is_file():
        try:
            table = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EmberError(f"cannot read {folder / 'added_tokens.json'}: {e}") from None
        if not isinstance(table, dict) or not all(isinstance(i, int) for i in table.values()):
            raise EmberError(f"{folder / 'added_tokens.json'}: expected a JSON object of token "
                             "-> id")
        for t, i in table.items():
            pinned.append((i, AddedToken(t, special=t in named, normalized=t not in named)))
    for i, tok in sorted(pinned, key=lambda p: p[0]):
        if tok.special:
            backend.add_special_tokens([tok])
        else:
            backend.add_tokens([tok])
        if backend.token_to_id(tok.content) != i:
            raise EmberError(f"{folder}: added token {tok.content!r} should have id {i} but the "
                             f"vocabulary gives it {backend.token_to_id(tok.content)}; the "
                             "tokenizer files disagree")
    # named special tokens become special (matched whole, skipped when decoding), if the
    # vocabulary has them; load_tokenizer reports those it has not
    add_named_specials(backend, specials,
                       promoted_tokens(every, cls) if isinstance(decoder, dict) else set())
    return backend, defaults, cls == _GENERIC, pieces
