"""Tokenizer: a ``tokenizers.Tokenizer`` plus the special tokens and the chat template of a model.

Reads and writes Hugging Face folders (tokenizer.json + tokenizer_config.json [+
chat_template.jinja, special_tokens_map.json, generation_config.json]; folders with only a slow
tokenizer's files through ``ember.models.slow_tokenizer``) and builds tokenizers from
GGUF metadata (``tokenizer.ggml.*``): byte-level BPE, splitting text the way llama.cpp does for the
file's ``tokenizer.ggml.pre`` type, and SentencePiece-style BPE (``ember.models.spm``).

Chat templates (the model's own Jinja, named ones too) are chosen and rendered as transformers
does it, in ``ember.models.chat_template``.

The ``Tokenizer`` class lives in ``ember.models.tokenizer_core``, the GGUF builder in
``ember.models.tokenizer_gguf``; both are re-exported here, the place to import them from.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import tokenizers

from ember import EmberError
from ember.models.chat_template import read_templates
from ember.models.code_llama_infill import class_infill_tokens
from ember.models.tokenizer_classes import (
    MAIN_SPECIALS,
    add_config_tokens,
    add_named_specials,
    built_class,
    class_bos_eos,
    class_pipeline,
    class_specials,
    class_warnings,
    extra_special_tokens,
    folder_class,
    missing_class_specials,
    named_special_tokens,
    other_special_tokens,
    own_added_tokens,
    promoted_tokens,
    rebuilt_class,
    reset_special_flags,
    same_added_tokens,
    special_tokens_config,
    template_tokens,
    without_added_tokens,
)
from ember.models.tokenizer_core import (  # noqa: F401  (the tokenizer's API, re-exported)
    Tokenizer,
    _set_bos_eos,
)
from ember.models.tokenizer_gguf import (  # noqa: F401  (the tokenizer's API, re-exported)
    gguf_stop_ids,
    tokenizer_from_gguf,
)


def _added_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None,
                   default: tuple[bool, bool]) -> tuple[bool, bool]:
    """Whether ``encode(..., add_special_tokens=True)`` puts ``bos`` before the text and ``eos``
    after it: tokenizer.json's post-processor decides, and a folder saved by transformers 5 has
    no add_bos_token in its config (Llama 3's never had). ``default`` when no probe text shows."""
    for probe in ("a", "Hello", "0", " "):
        enc = backend.encode(probe, add_special_tokens=True)
        text = [k for k, special in enumerate(enc.special_tokens_mask) if not special]
        if text:
            head, tail = enc.ids[:text[0]], enc.ids[text[-1] + 1:]
            ids = [backend.token_to_id(t) if t is not None else None for t in (bos, eos)]
            return ids[0] is not None and ids[0] in head, ids[1] is not None and ids[1] in tail
    return default


def stop_token_ids(tokenizer) -> list[int]:
    """Every id that ends a generation or a turn, sorted: an Ember ``Tokenizer``'s
    ``eos_token_ids`` (eos plus e.g. ``<|eot_id|>``) and ``eos_token_id``. Also takes a
    transformers tokenizer, whose ``eos_token_ids`` (transformers 5) is the one eos id as an int
    and None without an eos. Empty when the tokenizer defines no eos at all."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return sorted({int(i) for i in ids if i is not None})


def generation_ids(tokenizer) -> tuple[list[int], int]:
    """(``stop_token_ids``, the id to pad prompts with for generation): the tokenizer's pad,
    else its first stop id, else 0 (padding is masked, so any id does; a base model may define
    neither, and then generates ``max_new_tokens`` tokens)."""
    eos = stop_token_ids(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos, next((i for i in (pad, *eos) if i is not None), 0)


def _token_str(v: Any) -> str | None:
    """tokenizer_config values are a str, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmberError(f"cannot read {path}: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a Hugging Face folder (ours or one written by transformers); a
    folder without tokenizer.json is built from its slow tokenizer's files (tokenizer.model or
    vocab.json + merges.txt, see ``ember.models.slow_tokenizer``). Where transformers 5 builds a
    tokenizer class's own pipeline over tokenizer.json's vocabulary (LlamaTokenizer, Qwen2
    folders), so does Ember (``ember.models.tokenizer_classes``)."""
    folder = Path(path)
    if folder.is_file() and folder.name == "tokenizer.json":
        folder = folder.parent
    tj = folder / "tokenizer.json"
    cfg = _read_json(folder / "tokenizer_config.json") if (
        folder / "tokenizer_config.json").is_file() else {}
    smap = _read_json(folder / "special_tokens_map.json") if (
        folder / "special_tokens_map.json").is_file() else {}
    cfg, smap = special_tokens_config(cfg, smap, folder), {}
    specials = {n: _token_str(cfg.get(n, smap.get(n))) for n in MAIN_SPECIALS}
    slow = not tj.is_file()
    defaults: dict[str, str] = {}  # the slow class's own special tokens (Gemma's mask)
    fill = None  # CodeLlamaTokenizer's fill token (<FILL_ME>)
    generic = False  # slow files built as transformers 5's generic SentencePiece backend
    if slow:
        from ember.models.slow_tokenizer import has_slow_tokenizer, no_tokenizer_error, slow_backend

        if not has_slow_tokenizer(folder):
            raise no_tokenizer_error(folder)
        model_cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        model_type = model_cfg.get("model_type") if isinstance(model_cfg, dict) else None
        backend, defaults, generic, pieces = slow_backend(folder, cfg, smap, str(model_type or ""))
        cfg = {**cfg, "additional_special_tokens": pieces} if pieces else cfg
        specials.update({n: t for n, t in defaults.items()
                         if n in specials and backend.token_to_id(t) is not None})
    else:
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            from ember.models.safetensors_io import lfs_pointer

            raise EmberError(f"cannot parse {tj}: {lfs_pointer(tj, 'the tokenizer') or e}"
                             ) from None
        dropout = getattr(backend.model, "dropout", None)
        if dropout:  # random merges on every encode: a training-time knob, not the model's ids
            warnings.warn(f"{tj}: BPE dropout {dropout} is ignored: Ember tokenizes without it, "
                          "as at inference (transformers would drop merges at random on every "
                          "encode)", stacklevel=2)
            backend.model.dropout = None
        named = folder_class(folder, cfg)  # (reads config.json's model type: once)
        cls, rebuilt = built_class(backend, named), rebuilt_class(backend, named)
        for message in class_warnings(backend, named, folder):
            warnings.warn(message, stacklevel=2)
        given = cfg  # the tokens the folder names; the class's own defaults fill in the rest
        if own_added_tokens(cfg, named, rebuilt) and not same_added_tokens(
                backend, cfg.get("added_tokens_decoder")):
            backend = without_added_tokens(backend)
        add_config_tokens(backend, cfg.get("added_tokens_decoder"))
        # The class's defaults the vocabulary lacks (Qwen2Tokenizer's <|endoftext|> beside a
        # vocabulary without it) are left out, silently: transformers adds them as new tokens
        # past the model's embedding (an eos id the model cannot embed: training crashed with
        # "index out of range"); Ember keeps the vocabulary the model has, as for named ones.
        absent = {t.content for t in missing_class_specials(backend, given, cls)}
        cfg = {k: v for k, v in class_specials(cfg, cls).items()
               if k in given or _token_str(v) not in absent}
        specials = {n: _token_str(cfg.get(n)) for n in MAIN_SPECIALS}
        add_named_specials(backend, named_special_tokens(cfg), promoted_tokens(cfg, cls))
        if rebuilt == "Qwen2Tokenizer":
            reset_special_flags(backend, named_special_tokens(cfg))
        class_pipeline(backend, rebuilt, cfg)
        if cls == "CodeLlamaTokenizer":  # its infilling tokens, as transformers 5 keeps them
            cfg, fill, notes = class_infill_tokens(cfg, given, folder)
            for note in notes:
                warnings.warn(note, stacklevel=2)
        forced = class_bos_eos(cls)
        if forced is not None:  # the class's own post-processor, whatever tokenizer.json's
            ends = [specials[n] if on and specials[n] is not None
                    and backend.token_to_id(specials[n]) is not None else None
                    for n, on in zip(("bos_token", "eos_token"), forced, strict=True)]
            backend.post_processor = None
            _set_bos_eos(backend, *ends)
    template, named = read_templates(cfg, folder)
    from ember.models.safetensors_io import read_generation_config

    with warnings.catch_warnings():  # an unreadable file: the model's loading says it
        warnings.simplefilter("ignore")
        gen = read_generation_config(folder)

    def eos_of(d: Any) -> list[int]:
        # token ids only: the model's generate() check (config_stop_ids) says what is wrong
        # with the others, as transformers' generate() fails or warns there
        eos = d.get("eos_token_id") if isinstance(d, dict) else None
        return [i for i in (eos if isinstance(eos, list) else [eos])
                if isinstance(i, int) and not isinstance(i, bool) and i >= 0]

    def config_eos() -> list[int]:
        path = folder / "config.json"
        return eos_of(_read_json(path)) if path.is_file() else []

    # the stop ids transformers' generate() takes: generation_config.json's, config.json's only
    # without a readable one (GenerationConfig.from_model_config)
    extra_eos = eos_of(gen) if gen is not None else config_eos()
    if specials["eos_token"] is None:
        first = extra_eos or config_eos()
        if first:
            specials["eos_token"] = backend.id_to_token(int(first[0]))
    for name, tok in specials.items():
        if tok is not None and backend.token_to_id(tok) is None:
            # transformers adds such tokens at load time; we keep the vocabulary the model has
            where = "the slow tokenizer's vocabulary" if slow else "tokenizer.json"
            warnings.warn(f"{folder}: {name} {tok!r} is not in {where}; ignoring it",
                          stacklevel=2)
            specials[name] = None
    missing = [t for t in other_special_tokens(cfg) if backend.token_to_id(t) is None]
    if missing:
        warnings.warn(f"{folder}: special tokens {missing} are not in "
                      f"{'the slow tokenizer' if slow else 'tokenizer.json'}; Ember encodes them "
                      "as plain text (transformers adds them as new tokens, with ids past the "
                      "vocabulary)", stacklevel=2)
    add_bos, add_eos = bool(cfg.get("add_bos_token", False)), bool(cfg.get("add_eos_token", False))
    if slow:  # tokenizer.json carries its post-processor; here it comes from the flags
        # (without the token, the flag is off, as transformers turns it off)
        add_bos, add_eos = add_bos and bool(specials["bos_token"]), add_eos and bool(
            specials["eos_token"])
        _set_bos_eos(backend, specials["bos_token"] if add_bos else None,
                     specials["eos_token"] if add_eos else None)
    else:  # what the post-processor adds, as transformers 5 encodes (whatever the config says)
        add_bos, add_eos = _added_bos_eos(backend, specials["bos_token"], specials["eos_token"],
                                          (add_bos, add_eos))
    # transformers encodes special tokens written in the text as text when the config says so
    backend.encode_special_tokens = bool(cfg.get("split_special_tokens"))
    max_len = cfg.get("model_max_length")
    # transformers 5 builds LlamaTokenizer / GemmaTokenizer as a BPE, whose decoding it never
    # cleans up; Ember's Unigram for a unigram tokenizer.model must not either. Its generic
    # backend keeps a unigram model a Unigram, which it cleans up (as a tokenizer.json's)
    clean_up = bool(cfg.get("clean_up_tokenization_spaces")) and (not slow or generic)
    return Tokenizer(backend, **specials, chat_template=template, chat_templates=named,
                     clean_up_tokenization_spaces=clean_up, template_tokens=template_tokens(
                         {**{k: v for k, v in defaults.items() if backend.token_to_id(v)
                             is not None}, **cfg}),
                     extra_special_tokens=[t for t in extra_special_tokens(cfg)
                                           if backend.token_to_id(t) is not None],
                     fill_token=fill, add_bos_token=add_bos, add_eos_token=add_eos,
                     extra_eos_token_ids=extra_eos,
                     model_max_length=int(max_len) if isinstance(max_len, int | float)
                     and max_len < 1e12 else None)


