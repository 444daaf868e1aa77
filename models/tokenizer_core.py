"""The ``Tokenizer`` class (encode/decode text, render chats, save a Hugging Face folder) and the
helpers on a ``tokenizers`` backend that it and its builders share (``_set_bos_eos``).

Built by ``ember.models.tokenizer.load_tokenizer`` (Hugging Face folders) and
``ember.models.tokenizer_gguf.tokenizer_from_gguf`` (GGUF metadata); ``ember.models.tokenizer``
re-exports all of it, and is where to import it from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from ember import EmberError
from ember.models.chat_template import refuse_hf_options, render, select_template
from ember.models.code_llama_infill import code_llama_config, infill_ids
from ember.models.tokenizer_classes import MAIN_SPECIALS, pipeline_steps
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
        if self.fill_token is not None:  # CodeLlama's: reloaded as the class that splits it
            cfg.update(code_llama_config(self.fill_token, self.template_tokens))
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
    return any(s.get("type") == "ByteLevel" and s.get("add_prefix_space")
               for s in pipeline_steps(backend.pre_tokenizer, "pretokenizers"))


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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
