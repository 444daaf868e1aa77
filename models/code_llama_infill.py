"""CodeLlama's infilling prompt, encoded as transformers 5's ``CodeLlamaTokenizer`` encodes it.

A text holding the fill token (``<FILL_ME>``) is the code before and after the hole; the ids are
``[bos] ▁<PRE> " " + prefix ▁<SUF> suffix ▁<MID> [eos]`` (bos / eos where the tokenizer adds
them), prefix and suffix each encoded with spaces written as U+2581 (a ``Replace`` normalizer, in
place of the usual one) and the pre-tokenizer's own prefix rule. An empty suffix is no infilling:
the prefix alone is encoded as usual (the fill token dropped).

transformers switches its backend's normalizer and post-processor for the call and then leaves
the normalizer as ``Prepend + Replace``, so its later encodes of ordinary text can differ from
its first ones; Ember encodes infilling with a copy and leaves the tokenizer as loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tokenizers
from tokenizers import normalizers

from ember import EmberError

if TYPE_CHECKING:
    from ember.models.tokenizer import Tokenizer

_ROLES = ("prefix_token", "suffix_token", "middle_token")
_DEFAULTS = dict(zip(_ROLES, ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"), strict=True))
FILL = "<FILL_ME>"  # CodeLlamaTokenizer's fill token


def infill_backend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``backend`` with transformers' infilling normalizer and no post-processor."""
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    # (not in to_str(): split_special_tokens encodes "<s>" in the text as text there too)
    copy.encode_special_tokens = backend.encode_special_tokens
    copy.normalizer = normalizers.Replace(" ", "\u2581")
    copy.post_processor = None
    return copy


def infill_ids(tok: Tokenizer, text: str, add_special_tokens: bool) -> list[int] | None:
    """The ids of ``text`` as an infilling prompt; None when it holds no fill token (or the
    tokenizer has none)."""
    fill = tok.fill_token
    if fill is None or fill not in text:
        return None
    n = text.count(fill)
    if n != 1:
        raise EmberError(
            f"the text holds {n} {fill} tokens; an infilling prompt has exactly one "
            "(the hole between the code before and after it)"
        )
    prefix, suffix = text.split(fill)
    if not suffix:
        return tok.encode(prefix, add_special_tokens=add_special_tokens)
    ids = [tok.token_to_id(t) if (t := tok.template_tokens.get(r)) else None for r in _ROLES]
    if None in ids:
        missing = [r for r, i in zip(_ROLES, ids, strict=True) if i is None]
        # a role without a token whose default the vocabulary has: the config turned it off
        off = [r for r in missing if r not in tok.template_tokens
               and tok.token_to_id(_DEFAULTS[r]) is not None]
        lacks = [f"{r} ({tok.template_tokens.get(r) or _DEFAULTS[r]})"
                 for r in missing if r not in off]
        why = [f"tokenizer_config.json turns {', '.join(off)} off (null)"] if off else []
        why += [f"the vocabulary lacks {', '.join(lacks)}"] if lacks else []
        raise EmberError(
            f"the text holds {fill}, an infilling prompt, but {' and '.join(why)}: this "
            f"tokenizer does not support infilling; remove {fill} from the text"
        )
    pre, suf, mid = ids
    if tok._infill is None:  # built once per tokenizer: a copy of the whole vocabulary
        tok._infill = infill_backend(tok.backend)
    enc = tok._infill.encode_batch([" " + prefix, suffix], add_special_tokens=False)
    bos = [tok.bos_token_id] if add_special_tokens and tok.add_bos_token else []
    eos = [tok.eos_token_id] if add_special_tokens and tok.add_eos_token else []
    return [*bos, pre, *enc[0].ids, suf, *enc[1].ids, mid, *eos]


def class_infill_tokens(cfg: dict, given: dict, where: object) -> tuple[dict, str | None,
                                                                        list[str]]:
    """(``cfg`` with CodeLlamaTokenizer's infilling tokens as transformers 5 loads them, the
    fill token, warnings). transformers 5 keeps the class's own prefix / middle / suffix / fill
    tokens whatever plain string ``given`` (the folder's tokenizer_config.json) names, and takes
    an AddedToken dict's ({"content": ...}, as transformers writes one); a null turns one off.
    (transformers then fails on an infilling text with a prefix / middle / suffix dict, "'
    AddedToken' object is not iterable": Ember uses its content.)"""
    defaults = {**_DEFAULTS, "fill_token": FILL}
    out, notes = dict(cfg), []
    for role, default in defaults.items():
        if role not in given:
            continue
        v = given[role]
        if v is None or isinstance(v, dict):
            out[role] = v.get("content") if isinstance(v, dict) else None
        elif v != default:
            notes.append(f"{where}: tokenizer_config.json sets {role} {v!r}; transformers 5's "
                         f"CodeLlamaTokenizer ignores it and uses {default!r}, and so does Ember "
                         "(null turns it off)")
            out[role] = default
        else:
            out[role] = default
    return out, out.get("fill_token", FILL), notes


def code_llama_config(fill: str, template_tokens: dict[str, str]) -> dict:
    """The tokenizer_config.json entries that make transformers 5 and ``load_tokenizer`` load a
    tokenizer with fill token ``fill`` as CodeLlamaTokenizer again (saved as the generic class,
    neither split <FILL_ME> any more): the class, each infilling token (null where it has none:
    a missing key would be the class's default), and a fill token other than the class's as an
    AddedToken dict (a plain string is ignored, ``class_infill_tokens``)."""
    cfg: dict = {"tokenizer_class": "CodeLlamaTokenizer"}
    cfg.update({r: template_tokens.get(r) for r in _ROLES})
    cfg["fill_token"] = fill if fill == FILL else {
        "content": fill, "__type": "AddedToken", "lstrip": False, "rstrip": False,
        "normalized": False, "single_word": False, "special": True}
    return cfg
