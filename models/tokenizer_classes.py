"""The tokenizer classes transformers 5 builds its own pipeline for, mirrored by ``load_tokenizer``.

transformers 5 reads a folder's tokenizer.json as written (``TokenizersBackend``) unless the class
it resolves for the folder defines its own pipeline: that class keeps tokenizer.json's
vocabulary, merges and post-processor and builds the normalizer, pre-tokenizer and decoder
itself, from tokenizer_config.json's flags; its added tokens are tokenizer_config.json's
``added_tokens_decoder`` where the config has one (tokenizer.json's otherwise), its special
tokens the class's defaults where the config names none (Qwen2Tokenizer's ``<|endoftext|>``,
added when the vocabulary lacks it: ``class_specials``), and CodeLlamaTokenizer / GPTNeoXTokenizer
rebuild the post-processor too (``class_bos_eos``). The class is tokenizer_config.json's
``tokenizer_class`` (the model type's registered one where it names none), unless config.json's
model type has a registered tokenizer that transformers prefers (``qwen2``: always
``Qwen2Tokenizer``) or a generic one (Mistral, Ministral, Mixtral, Phi-3, Granite, OLMo2,
StableLM: tokenizer.json as written); a model type transformers registers nothing for (Llama,
DeepSeek) gets the folder's class. Mirrored here:

- ``LlamaTokenizer`` over a SentencePiece-style BPE (Llama 2, TinyLlama, Vicuna): no normalizer,
  a ``Metaspace`` pre-tokenizer from ``add_prefix_space`` and ``legacy`` ("first" prefix,
  "always" when legacy, "never" without prefix). Llama 2's tokenizer.json prepends in its
  normalizer instead, which also prefixes text after a special token ("<s>[INST]") and text that
  starts with a space. A byte-level vocabulary named LlamaTokenizer (DeepSeek) is read as written.
- ``CodeLlamaTokenizer``: the same without ``legacy``; its decoder always drops a leading space.
- ``Qwen2Tokenizer``: NFC, Qwen2's split regex, byte-level. A qwen2 folder written from a GGUF
  file (which has no normalizer, like llama.cpp) is read with NFC, as transformers reads it.
  ``Qwen3_5Tokenizer`` (the qwen3_5 model types): the same with combining marks kept with their
  letters in the split, and without Qwen2Tokenizer's last step (``reset_special_flags``).

- ``GPT2Tokenizer``, ``CodeGenTokenizer``, ``GPTNeoXTokenizer`` over a byte-level BPE: no
  normalizer (GPT-NeoX: NFC), GPT-2's regex in a ``ByteLevel`` whose ``add_prefix_space`` is the
  config's (False where it names none, whatever tokenizer.json says), a ``ByteLevel`` decoder.
  Except where that rebuild would leave out a step of tokenizer.json (``dropped_steps``: SmolLM2's
  and StarCoder's digit split, a cl100k-style Split, a normalizer the class lacks), a known
  transformers 5 regression that changes the model's ids: there Ember reads tokenizer.json as
  written and warns, naming the fix (``"tokenizer_class": "PreTrainedTokenizerFast"``).

Not mirrored: ``GemmaTokenizer``, whose pipeline is the one Gemma's tokenizer.json already has;
its added tokens (and those of a GPT-2 class read as written) are read as transformers reads
them (``own_added_tokens``).

Also how transformers 5 reads the special tokens of any folder: special_tokens_map.json
(``special_tokens_config``) and the named tokens it adds (``named_special_tokens``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

from ember import EmberError

# config.json model type -> the tokenizer class transformers 5 registers for it (its
# TOKENIZER_MAPPING_NAMES, for the text models): None (none: the folder's class), "" (a generic
# backend: tokenizer.json as written) or a class name. A model type not listed is taken as
# registering none, as transformers does for Llama, SmolLM3, DeepSeek, Falcon, ...
_REGISTERED: dict[str, str | None] = {
    "llama": None, "smollm3": None,
    **dict.fromkeys((
        "mistral", "ministral", "ministral3", "mixtral", "mistral3", "phi3", "phimoe", "granite",
        "granitemoe", "granitemoeshared", "granitemoehybrid", "olmo2", "olmo3", "olmo_hybrid",
        "flex_olmo", "stablelm", "gpt_bigcode", "persimmon", "nemotron", "jamba", "arctic",
        "internlm2", "internlm3", "ernie4_5", "ernie4_5_moe", "glm", "glm4", "glm4_moe",
        "glm4_moe_lite", "minimax_m2", "kimi_linear", "minicpm3", "hyperclovax", "chatlm",
        "iquestcoder", "mimo_v2_flash", "modernbert-decoder"), ""),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text",
                     "recurrent_gemma"), "GemmaTokenizer"),
    **dict.fromkeys(("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen2_vl",
                     "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"), "Qwen2Tokenizer"),
    **dict.fromkeys(("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
                    "Qwen3_5Tokenizer"),
    **dict.fromkeys(("phi", "gpt2", "codegen", "gptj", "gpt_neo", "starcoder2", "dbrx", "opt",
                     "jais2"), "GPT2Tokenizer"),
    **dict.fromkeys(("gpt_neox", "olmo", "olmoe", "mpt", "mamba", "mamba2", "falcon_mamba",
                     "rwkv"), "GPTNeoXTokenizer"),
    "code_llama": "CodeLlamaTokenizer",
}
# model types whose registered class transformers uses whatever the folder names
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
_REGISTERED_WINS = ("qwen2", "phi3", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3_5Tokenizer's: letters with their combining marks ([\p{L}\p{M}]+)
_QWEN3_5_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                  r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_SPLITS = {"Qwen2Tokenizer": _QWEN2_SPLIT, "Qwen3_5Tokenizer": _QWEN3_5_SPLIT}


def resolved_class(cfg: dict, model_type: str | None) -> str | None:
    """The tokenizer class transformers 5 builds for a folder (tokenizer_config.json ``cfg``,
    config.json's ``model_type``), without "Fast"; None when it reads tokenizer.json as written.
    The folder's class, unless the model type registers a generic backend (then None), or
    another class and the folder names none or the model type is one whose registered class
    wins."""
    hub = str(cfg.get("tokenizer_class") or "").removesuffix("Fast") or None
    if not model_type:
        return hub
    registered = _REGISTERED.get(model_type)
    if registered is None or registered == hub:
        return hub
    if registered == "":
        return None
    return registered if hub is None or model_type in _REGISTERED_WINS else hub


def special_tokens_config(cfg: Any, smap: Any, folder: Path) -> dict:
    """tokenizer_config.json ``cfg`` with special_tokens_map.json ``smap`` read in as transformers
    5 reads it: ignored when ``cfg`` has ``added_tokens_decoder`` (any folder saved since
    transformers 4.34), else its special tokens override the config's (the legacy files)."""
    for name, value in (("tokenizer_config.json", cfg), ("special_tokens_map.json", smap)):
        if not isinstance(value, dict):
            raise EmberError(f"{folder / name}: expected a JSON object, got "
                             f"{type(value).__name__}; the tokenizer files are corrupt")
    if "added_tokens_decoder" in cfg:
        return cfg
    merged = dict(cfg)
    if "additional_special_tokens" in merged and not merged.get("extra_special_tokens"):
        # transformers 5 renames the config's list as it reads it, in place of an empty extra
        # one: extra, so special in a legacy added_tokens.json (special_tokens_map.json's is
        # merged in later, under its old name)
        merged["extra_special_tokens"] = merged.pop("additional_special_tokens")
    for key, value in smap.items():
        if not key.endswith(("_token", "_tokens")):
            continue
        if key == "additional_special_tokens" and not isinstance(
                merged.get("extra_special_tokens", {}), dict):
            continue  # transformers 5 keeps the extra list and ignores this one (a {name: token}
            # dict is model-specific tokens: this list is the extra one then)
        if key == "extra_special_tokens" and isinstance(value, list):  # merged into the config's
            have = merged.get(key)
            if isinstance(have, dict):  # the config's model-specific tokens: kept, as top-level
                merged.update(have)  # "*_token" keys (transformers: model_specific_special_tokens)
            have = list(have) if isinstance(have, list) else []
            value = have + [t for t in value if t not in have]
        merged[key] = value
    return merged


# The special tokens Ember's Tokenizer keeps as attributes (ember.models.tokenizer), and every
# one transformers names, in its order
MAIN_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
          "mask_token")


def named_special_tokens(cfg: dict) -> list[AddedToken]:
    """Every special token ``cfg`` names: bos, eos, unk, sep, pad, cls, mask, then the lists
    (transformers 5 also writes a {name: token} dict) of additional / extra ones, as transformers
    5 adds those not yet added: special, with the flags of one written as a dict ({"content",
    "lstrip", "rstrip", ...}: Llama 2's and GPT-2's "__type": "AddedToken"), not normalized
    otherwise."""
    values = [cfg.get(k) for k in NAMED_SPECIALS]
    # model-specific tokens: any other top-level "*_token" string (image_token ...), special too
    values += [v for k, v in cfg.items() if k.endswith("_token") and k not in NAMED_SPECIALS
               and isinstance(v, str | dict)]
    extra = cfg.get("extra_special_tokens")
    values += list(extra.values()) if isinstance(extra, dict) else []
    values += _extra_list(cfg)
    # transformers skips a token equal to one listed before (an AddedToken to an AddedToken of
    # the same text, a str to the same str), then adds them in order: the last of a text wins
    out: dict[str, AddedToken] = {}
    seen = set()
    for v in values:
        d = v if isinstance(v, dict) else {"content": v}
        if not isinstance(d.get("content"), str) or (isinstance(v, dict), d["content"]) in seen:
            continue
        seen.add((isinstance(v, dict), d["content"]))
        flags = {k: bool(d[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                 if k in d}
        out.pop(d["content"], None)
        out[d["content"]] = AddedToken(d["content"], special=True,
                                       **{"normalized": False, **flags})
    return list(out.values())


def _extra_list(cfg: dict) -> list:
    """The one list of extra special tokens transformers 5 reads (``from_pretrained``): the
    ``extra_special_tokens`` list where it is one and not empty, else the legacy
    ``additional_special_tokens`` one (also beside an ``extra_special_tokens`` {name: token}
    dict); the other list is ignored, its tokens not special."""
    v = cfg.get("extra_special_tokens")
    if not (isinstance(v, list) and v) and "additional_special_tokens" in cfg:
        v = cfg["additional_special_tokens"]
    return v if isinstance(v, list) else []


def extra_special_tokens(cfg: dict) -> list[str]:
    """The extra special tokens transformers 5 keeps (its ``extra_special_tokens`` attribute, saved
    back by ``save_pretrained``): ``_extra_list``'s."""
    v = [t.get("content") if isinstance(t, dict) else t for t in _extra_list(cfg)]
    return list(dict.fromkeys(t for t in v if isinstance(t, str)))


def promoted_tokens(cfg: dict, cls: str | None) -> set[str]:
    """The special tokens that transformers 5 makes special even where the folder adds them as
    not special: the named and model-specific ones; the extra lists' too for Qwen2Tokenizer
    (which rebuilds its backend), not for the other classes."""
    if cls == "Qwen2Tokenizer":
        return {t.content for t in named_special_tokens(cfg)}
    return {t.content for t in named_special_tokens({
        k: v for k, v in cfg.items()
        if k not in ("additional_special_tokens", "extra_special_tokens") or isinstance(v, dict)})}


def add_named_specials(backend: tokenizers.Tokenizer, tokens: list[AddedToken],
                       promote: set[str] | frozenset[str] = frozenset()) -> None:
    """Make ``tokens`` (``named_special_tokens``) special in ``backend``, as transformers 5 makes
    them: those the vocabulary has but not as added tokens are added; an added token in
    ``promote`` (``promoted_tokens``) that is not special (added_tokens_decoder's "special":
    false) becomes special, its other flags kept (transformers 5 does not for a legacy
    added_tokens.json's tokens). Those the vocabulary lacks are left out (``load_tokenizer``
    warns)."""
    have = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    new = []
    for t in tokens:
        old = have.get(t.content)
        if old is None and backend.token_to_id(t.content) is not None:
            new.append(t)
        elif old is not None and not old.special and t.content in promote:
            new.append(AddedToken(old.content, single_word=old.single_word, lstrip=old.lstrip,
                                  rstrip=old.rstrip, normalized=old.normalized, special=True))
    backend.add_special_tokens(new)


def reset_special_flags(backend: tokenizers.Tokenizer, tokens: list[AddedToken]) -> None:
    """Qwen2Tokenizer's last step (transformers 5): every special token it names is added again
    as ``AddedToken(content, special=True)``, so their lstrip / rstrip / single_word / normalized
    flags are false whatever the config said."""
    backend.add_tokens([AddedToken(t.content, special=True) for t in tokens
                        if backend.token_to_id(t.content) is not None])


def other_special_tokens(cfg: dict) -> list[str]:
    """The special tokens ``cfg`` names besides bos, eos, unk and pad."""
    main = [cfg.get(k) for k in MAIN_SPECIALS]
    main = [v.get("content") if isinstance(v, dict) else v for v in main]
    return [t.content for t in named_special_tokens(cfg) if t.content not in main]


def template_tokens(cfg: dict) -> dict[str, str]:
    """The special tokens besides bos, eos, unk and pad that transformers 5 passes to a chat
    template as variables (``{**tokenizer.special_tokens_map, **kwargs}``): sep, cls and mask,
    then the model-specific ones (``extra_special_tokens`` given as a {name: token} dict, and any
    other top-level ``*_token`` string of the config, e.g. ``image_token``)."""
    out = {}
    extra = cfg.get("extra_special_tokens")
    named = {k: cfg.get(k) for k in NAMED_SPECIALS[3:] if k != "pad_token"}
    auto = {k: v for k, v in cfg.items() if k.endswith("_token") and k not in NAMED_SPECIALS}
    for key, v in {**named, **auto, **(extra if isinstance(extra, dict) else {})}.items():
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[key] = v
    return out


def folder_class(folder: Path, cfg: dict) -> str | None:
    """``resolved_class`` for ``folder``, with config.json's model type."""
    config = folder / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            model_type = None
    return resolved_class(cfg, model_type if isinstance(model_type, str) else None)


def built_class(backend: tokenizers.Tokenizer, cls: str | None) -> str | None:
    """The folder's class ``cls`` (``folder_class``), except a LlamaTokenizer over a byte-level
    tokenizer.json (DeepSeek's), which transformers 5 reads as written (``TokenizersBackend``):
    None."""
    if cls == "LlamaTokenizer" and _byte_level(backend):
        return None
    return cls


def _byte_level(backend: tokenizers.Tokenizer) -> bool:
    return any(b"ByteLevel" in part.__getstate__()
               for part in (backend.pre_tokenizer, backend.decoder) if part is not None)


def rebuilt_class(backend: tokenizers.Tokenizer, cls: str | None) -> str | None:
    """The folder's class ``cls`` (``folder_class``) where transformers 5 builds its own pipeline
    over ``backend`` (the folder's tokenizer.json): LlamaTokenizer / CodeLlamaTokenizer over a
    SentencePiece-style BPE, Qwen2Tokenizer, GPT2Tokenizer, CodeGenTokenizer and
    GPTNeoXTokenizer over a byte-level one, except where the GPT-2 classes would drop a step of
    tokenizer.json (``dropped_steps``); None where Ember reads tokenizer.json as written."""
    if cls not in ("LlamaTokenizer", "CodeLlamaTokenizer", *_QWEN_SPLITS, *_GPT2_CLASSES):
        return None
    if type(backend.model).__name__ != "BPE":
        return None
    if cls in _GPT2_CLASSES:
        return cls if _byte_level(backend) and not dropped_steps(backend, cls) else None
    return cls if _byte_level(backend) == (cls in _QWEN_SPLITS) else None


# classes whose __init__ builds GPT-2's pipeline over the file's vocabulary and merges: the
# normalizer each sets (GPT-NeoX: NFC), ByteLevel with GPT-2's regex, a ByteLevel decoder
_GPT2_CLASSES = {"GPT2Tokenizer": None, "CodeGenTokenizer": None, "GPTNeoXTokenizer": "NFC"}


def pipeline_steps(part: Any, key: str) -> list[dict]:
    """The steps of a tokenizers normalizer / pre-tokenizer ``part`` (None: none) as their JSON
    specs, a ``Sequence`` unwrapped (``key``: its list, "normalizers" or "pretokenizers")."""
    if part is None:
        return []
    spec = json.loads(part.__getstate__())
    return spec.get(key, [spec]) if spec.get("type") == "Sequence" else [spec]


def dropped_steps(backend: tokenizers.Tokenizer, cls: str | None) -> list[str]:
    """The steps of tokenizer.json ``backend`` that transformers 5's ``cls`` (a GPT-2 class)
    leaves out of its rebuilt pipeline: a normalizer other than the class's, a pre-tokenizer step
    before GPT-2's regex (SmolLM2's and StarCoder's ``Digits``, OLMo 3's cl100k ``Split``), BPE's
    ``ignore_merges``. Those change the model's ids (huggingface/transformers#45701): Ember keeps
    tokenizer.json's pipeline there and warns (``class_warnings``)."""
    if cls not in _GPT2_CLASSES or type(backend.model).__name__ != "BPE":
        return []
    own = _GPT2_CLASSES[cls]
    out = [s["type"] for s in pipeline_steps(backend.normalizer, "normalizers") if s["type"] != own]
    for s in pipeline_steps(backend.pre_tokenizer, "pretokenizers"):
        if s["type"] != "ByteLevel":
            out.append(s["type"])
        elif not s.get("use_regex", True):
            out.append("ByteLevel(use_regex=false)")
    if getattr(backend.model, "ignore_merges", False):
        out.append("ignore_merges")
    return list(dict.fromkeys(out))


def class_warnings(backend: tokenizers.Tokenizer, cls: str | None, folder: Path) -> list[str]:
    """What to tell the user about how transformers 5's ``cls`` reads tokenizer.json ``backend``
    (before ``class_pipeline``): the steps it leaves out (``dropped_steps``; a GPT-2 class over
    a vocabulary that is not byte-level leaves out all of them); the characters a
    LlamaTokenizer drops, whose BPE has no unk token (where the vocabulary lacks byte pieces)."""
    out = []
    steps = dropped_steps(backend, cls)
    if steps and not _byte_level(backend):
        out.append(
            f"{folder}: tokenizer_class {cls} over a vocabulary that is not byte-level "
            f"(tokenizer.json's {', '.join(steps)}): transformers 5 rebuilds it as GPT-2's "
            "byte-level pipeline, whose ids are not the model's. Ember reads tokenizer.json as "
            'written; set "tokenizer_class": "PreTrainedTokenizerFast" in tokenizer_config.json '
            "to make transformers read it so too")
    elif steps:
        out.append(
            f"{folder}: tokenizer_class {cls} makes transformers 5 rebuild this tokenizer as "
            f"GPT-2's pipeline, leaving out tokenizer.json's {', '.join(steps)} (a known "
            "transformers 5 regression, huggingface/transformers#45701): its ids then differ "
            "from the model's own on some texts. Ember keeps tokenizer.json's pipeline; set "
            '"tokenizer_class": "PreTrainedTokenizerFast" in tokenizer_config.json to make '
            "transformers read it as written too")
    unk = getattr(backend.model, "unk_token", None)
    if rebuilt_class(backend, cls) == "LlamaTokenizer" and unk is not None and any(
            backend.token_to_id(f"<0x{b:02X}>") is None for b in range(256)):
        out.append(
            f"{folder}: transformers 5's LlamaTokenizer drops the characters this vocabulary "
            f"cannot spell (it lacks byte pieces and the class's BPE has no unk token); Ember "
            f"encodes each run of them as {unk} (tokenizer.json's unk token)")
    return out


# the special tokens each class's ``__init__`` defaults to, for a config that does not name them
# (a null in the config is no token); transformers adds one the vocabulary lacks as a new token
_EOT = "<|endoftext|>"
_LLAMA = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
_CLASS_SPECIALS = {
    "LlamaTokenizer": _LLAMA,
    "CodeLlamaTokenizer": {**_LLAMA, "prefix_token": "\u2581<PRE>", "middle_token": "\u2581<MID>",
                           "suffix_token": "\u2581<SUF>", "eot_token": "\u2581<EOT>",
                           "fill_token": "<FILL_ME>"},  # its infilling tokens, special too
    "Qwen2Tokenizer": {"unk_token": _EOT, "eos_token": _EOT, "pad_token": _EOT},
    "Qwen3_5Tokenizer": {"unk_token": _EOT, "eos_token": _EOT, "pad_token": _EOT},
    "GPT2Tokenizer": {"unk_token": _EOT, "bos_token": _EOT, "eos_token": _EOT},
    "CodeGenTokenizer": {"unk_token": _EOT, "bos_token": _EOT, "eos_token": _EOT},
    "GPTNeoXTokenizer": {"unk_token": _EOT, "bos_token": _EOT, "eos_token": _EOT,
                         "pad_token": "<|padding|>"},
    "GemmaTokenizer": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
                       "pad_token": "<pad>", "mask_token": "<mask>"},
}
# classes whose ``__init__`` rebuilds tokenizer.json's post-processor: (BOS, EOS) they add.
# transformers drops the config's add_bos_token / add_eos_token beside a tokenizer.json, and
# CodeLlamaTokenizer passes its own add_bos_token=True on, which rebuilds it as BOS + text
_CLASS_BOS_EOS = {"CodeLlamaTokenizer": (True, False), "GPTNeoXTokenizer": (False, False)}


def class_specials(cfg: dict, cls: str | None) -> dict:
    """``cfg`` with the special tokens ``cls`` defaults to where it names none."""
    return {**_CLASS_SPECIALS.get(cls or "", {}), **cfg}


def missing_class_specials(backend: tokenizers.Tokenizer, cfg: dict, cls: str | None
                           ) -> list[AddedToken]:
    """The class's default special tokens (``class_specials``) that ``cfg`` leaves to it and the
    vocabulary lacks: transformers 5 adds them as new tokens (Qwen2Tokenizer's <|endoftext|>)."""
    own = _CLASS_SPECIALS.get(cls or "", {})
    return [AddedToken(t, special=True, normalized=False)
            for t in dict.fromkeys(own[k] for k in sorted(own, key=_named_first)
                                   if k not in cfg and backend.token_to_id(own[k]) is None)]


def _named_first(key: str) -> int:
    """transformers' order: bos, eos, unk, sep, pad, cls, mask, then the others as listed."""
    return NAMED_SPECIALS.index(key) if key in NAMED_SPECIALS else len(NAMED_SPECIALS)


def class_bos_eos(cls: str | None) -> tuple[bool, bool] | None:
    """(BOS, EOS) that ``cls`` adds whatever tokenizer.json's post-processor does; None where the
    post-processor decides."""
    return _CLASS_BOS_EOS.get(cls or "")


# classes that transformers 5 also builds over tokenizer.json's vocabulary, whose pipelines Ember
# does not mirror (see above) but whose added tokens it reads as there (``own_added_tokens``)
_OWN_ADDED_TOKENS = ("GPT2Tokenizer", "CodeGenTokenizer", "GPTNeoXTokenizer", "GemmaTokenizer")


def own_added_tokens(cfg: dict, cls: str | None, rebuilt: str | None) -> bool:
    """Whether transformers 5 reads the folder (class ``cls``, ``folder_class``; ``rebuilt``:
    ``rebuilt_class``) with a class that drops tokenizer.json's added tokens for
    tokenizer_config.json's ``added_tokens_decoder`` (``without_added_tokens``)."""
    if not isinstance(cfg.get("added_tokens_decoder"), dict):
        return False
    return rebuilt is not None or cls in _OWN_ADDED_TOKENS


def without_added_tokens(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``backend`` with none of tokenizer.json's added tokens, as a class transformers 5 rebuilds
    reads it when tokenizer_config.json has ``added_tokens_decoder``: that list (renames, flags,
    omissions and all) is then the tokenizer's added tokens, added in id order."""
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def class_pipeline(backend: tokenizers.Tokenizer, cls: str | None, cfg: dict) -> None:
    """Give ``backend`` the normalizer, pre-tokenizer and decoder transformers 5 gives it for
    ``cls`` (``rebuilt_class``); unchanged for None."""
    if cls is None:
        return
    if cls in _GPT2_CLASSES:
        backend.normalizer = normalizers.NFC() if _GPT2_CLASSES[cls] else None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(cfg.get("add_prefix_space")), use_regex=True)
        backend.decoder = decoders.ByteLevel()
        return
    if cls in _QWEN_SPLITS:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLITS[cls]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space")),
                                     use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        return
    from ember.models.spm import spm_pipeline

    prefix = cfg.get("add_prefix_space")
    prepend = ("never" if prefix is not None and not prefix
               else "always" if cls == "LlamaTokenizer" and cfg.get("legacy", False)
               else "first")
    backend.normalizer = None
    spm_pipeline(backend, style="llama", prepend=prepend)
    # the class's BPE options: CodeLlama's model has the unk token, Llama's none (an unknown
    # character without a byte piece then vanishes in transformers: Ember keeps tokenizer.json's
    # unk token, see class_warnings)
    backend.model.fuse_unk, backend.model.byte_fallback = True, True
    unk = cfg.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    if cls == "CodeLlamaTokenizer" and isinstance(unk, str) and (
            backend.token_to_id(unk) is not None):
        backend.model.unk_token = unk
    if cls == "CodeLlamaTokenizer":  # its decoder drops a leading space even without a prefix
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                             decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1)])


def _config_added(decoder: Any) -> dict[int, AddedToken]:
    """tokenizer_config.json's ``added_tokens_decoder`` as {id: AddedToken}, in id order."""
    if not isinstance(decoder, dict):
        return {}
    entries = sorted((int(i), d) for i, d in decoder.items() if str(i).isdigit()
                     and isinstance(d, dict) and isinstance(d.get("content"), str))
    return {i: AddedToken(d["content"], **{k: bool(d[k]) for k in (
        "single_word", "lstrip", "rstrip", "normalized", "special") if k in d})
        for i, d in entries}


def add_config_tokens(backend: tokenizers.Tokenizer, decoder: Any) -> None:
    """tokenizer_config.json's ``added_tokens_decoder`` in id order, as transformers 5 adds it:
    a token tokenizer.json lacks is added, one it has with other flags takes the config's."""
    have = {repr(t) for t in backend.get_added_tokens_decoder().values()}
    for token in _config_added(decoder).values():
        if repr(token) not in have:
            backend.add_tokens([token])


def same_added_tokens(backend: tokenizers.Tokenizer, decoder: Any) -> bool:
    """Whether tokenizer.json's added tokens are exactly the config's (ids, text and flags), as a
    folder transformers saved has them: dropping and re-adding them would change nothing (and
    re-serialises the whole tokenizer: 0.3 s for SmolLM2's 49k vocabulary)."""
    have = {i: repr(t) for i, t in backend.get_added_tokens_decoder().items()}
    return have == {i: repr(t) for i, t in _config_added(decoder).items()}
