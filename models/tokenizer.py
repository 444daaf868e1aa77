"""Tokenizer: a ``tokenizers.Tokenizer`` plus the special tokens and the chat template of a model.

Reads and writes Hugging Face folders (tokenizer.json + tokenizer_config.json [+
chat_template.jinja, special_tokens_map.json, generation_config.json]; folders with only a slow
tokenizer's files through ``ember.models.slow_tokenizer``) and builds tokenizers from
GGUF metadata (``tokenizer.ggml.*``): byte-level BPE, splitting text the way llama.cpp does for the
file's ``tokenizer.ggml.pre`` type, and SentencePiece-style BPE (``ember.models.spm``).

Chat templates (the model's own Jinja, named ones too) are chosen and rendered as transformers
does it, in ``ember.models.chat_template``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from ember import EmberError
from ember.models.chat_template import (
    read_templates,
    refuse_hf_options,
    render,
    select_template,
)
from ember.models.code_llama_infill import infill_ids
from ember.models.gguf_pretokenizers import _WHOLE_WORDS, _bytes_to_unicode, _pre_tokenizer
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
from ember.models.tokenizer_specials import all_special_tokens


class Tokenizer:
    """Encode/decode text and render chats.

    ``pad_token_id`` falls back to ``eos_token_id`` when the model defines no pad token (padding
    positions are masked everywhere, so any id works and eos is always in the vocabulary).
    ``eos_token_ids`` is every id that ends a generation (eos plus e.g. ``<|eot_id|>`` from
    generation_config.json or GGUF metadata).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, add_eos_token: bool = False,
                 extra_eos_token_ids: Iterable[int] = (), model_max_length: int | None = None,
                 chat_templates: dict[str, str] | None = None,
                 clean_up_tokenization_spaces: bool = False,
                 template_tokens: dict[str, str] | None = None,
                 extra_special_tokens: Iterable[str] = (), fill_token: str | None = None):
        self.backend = backend
        # CodeLlama's: a text holding it is an infilling prompt (ember.models.code_llama_infill)
        self.fill_token, self._infill = fill_token, None
        # additional special tokens, saved back so that transformers lists them again
        self.extra_special_tokens = list(extra_special_tokens)
        # sep, cls, mask and model-specific tokens: chat template variables, as in transformers
        self.template_tokens = dict(template_tokens or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template  # the default one
        self.chat_templates = dict(chat_templates or {})  # other named ones ("tool_use", "rag")
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.model_max_length = model_max_length
        for name in MAIN_SPECIALS:
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise EmberError(f"tokenizer: {name} {tok!r} is not in the vocabulary")
        self._extra_eos = frozenset(int(i) for i in extra_eos_token_ids)

    # ---- ids -------------------------------------------------------------------------------------
    def _id(self, tok: str | None) -> int | None:
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.eos_token_id
        return self._extra_eos | ({eos} if eos is not None else set())

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_tokens(self) -> list[str]:
        """The named, then the extra special tokens, as transformers 5 lists them (not every
        added token flagged special: ``ember.models.tokenizer_specials``)."""
        return all_special_tokens(self)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in all_special_tokens(self)]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise EmberError(f"tokenizer.encode expects a str, got {type(text).__name__}")
        infill = infill_ids(self, text, add_special_tokens) if self.fill_token else None
        if infill is not None:
            return infill
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False
                     ) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EmberError("tokenizer.encode_batch expects a list of str (one text: use "
                             f"encode), got {type(texts).__name__}")
        if self.fill_token and any(self.fill_token in t for t in texts):
            return [self.encode(t, add_special_tokens) for t in texts]
        return [e.ids for e in self.backend.encode_batch(list(texts),
                                                         add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` as transformers 5 decodes it (tokenizer.json's decoder, then
        tokenizer_config.json's ``clean_up_tokenization_spaces``, which transformers ignores for
        BPE), except that special tokens are skipped unless ``skip_special_tokens=False``:
        transformers keeps them by default. Ember's own callers pass the flag explicitly."""
        return self._clean(self.backend.decode([int(i) for i in ids],
                                               skip_special_tokens=skip_special_tokens))

    def decode_batch(self, batch: Sequence[Iterable[int]], skip_special_tokens: bool = True
                     ) -> list[str]:
        return [self._clean(t) for t in self.backend.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens)]

    def _cleans_up(self) -> bool:
        return self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE"

    def _clean(self, text: str) -> str:
        """transformers' ``clean_up_tokenization`` (spaces before punctuation and English
        contractions), applied as transformers 5 applies it: when the config asks, never for
        BPE (where it would corrupt text)."""
        if not self._cleans_up():
            return text
        for a, b in (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (
                " n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"):
            text = text.replace(a, b)
        return text

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, continue_final_message: bool | str = False,
                            chat_template: str | None = None,
                            generation_spans: list[tuple[int, int]] | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's template; extra
        keyword arguments become template variables (e.g. ``tools``, ``enable_thinking``).
        Rendered as transformers 5 renders it (``ember.models.chat_template``): ``tools`` select
        a model's ``tool_use`` template, ``chat_template`` names another (or is one), and
        ``continue_final_message`` (True, or the field to continue) ends the text inside the last
        message instead of closing its turn, for the model to continue it. ``generation_spans``: a
        list that receives the (start, end) characters of each ``{% generation %}`` block."""
        # transformers refuses an empty conversation; Ember's encoder renders one (the generation
        # prompt a greeting opens with) through the private ``_empty_ok``
        if not kwargs.pop("_empty_ok", False) and isinstance(messages, list | tuple) and (
                not messages):
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at "
                             "least one message.")
        refuse_hf_options(kwargs, tokenize)
        template = select_template(self.chat_template, self.chat_templates, chat_template,
                                   kwargs.get("tools"))
        # only the tokens the model has: a missing one is undefined (renders ""), as in
        # transformers, not None (which would render as "None")
        context = {**self.template_tokens, **{name: getattr(self, name) for name in MAIN_SPECIALS
                                              if getattr(self, name) is not None}}
        context.update(kwargs)
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        text = render(template, messages, context, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message,
                      generation=generation_spans)
        return self.encode(text) if tokenize else text

    # ---- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, readable by
        ``load_tokenizer`` and by transformers' ``AutoTokenizer`` (4.x and 5.x)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        specials = {n: getattr(self, n) for n in MAIN_SPECIALS if getattr(self, n) is not None}
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": self._cleans_up(),
            "model_max_length": self.model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
            "split_special_tokens": self.backend.encode_special_tokens,
            **self.template_tokens, **specials,
        }
        if _prefixes_bytes(self.backend):  # transformers' Qwen2Tokenizer rebuilds its ByteLevel
            cfg["add_prefix_space"] = True  # from this flag (so does load_tokenizer)
        if self.extra_special_tokens:  # the name transformers 4 and 5 both read as a list
            cfg["additional_special_tokens"] = self.extra_special_tokens
        if self.chat_templates:  # several named ones: the list form, read by transformers 4 and 5
            named = {"default": self.chat_template, **self.chat_templates}
            cfg["chat_template"] = [{"name": n, "template": t} for n, t in named.items()
                                    if t is not None]
        elif self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        _write_json(out / "tokenizer_config.json", cfg)
        _write_json(out / "special_tokens_map.json", specials)


def _prefixes_bytes(backend: tokenizers.Tokenizer) -> bool:
    """Whether ``backend`` splits with a byte-level pre-tokenizer that prefixes a space."""
    pre = backend.pre_tokenizer
    if pre is None:
        return False
    spec = json.loads(pre.__getstate__())
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    return any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps)


def _set_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Make ``encode(..., add_special_tokens=True)`` add ``bos`` before and ``eos`` after the text
    (either may be None); a no-op when both are."""
    if bos is None and eos is None:
        return
    single = ([bos] if bos else []) + ["$A"] + ([eos] if eos else [])
    pair = single + ["$B" if s == "$A" else s for s in single]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos))
                        if t is not None and backend.token_to_id(t) is not None])


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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        fill = class_specials(given, cls).get("fill_token") if cls == "CodeLlamaTokenizer" else None
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
