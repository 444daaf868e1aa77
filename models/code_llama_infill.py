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


def infill_backend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``backend`` with transformers' infilling normalizer and no post-processor."""
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
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
        names = [
            f"{r} ({tok.template_tokens.get(r) or _DEFAULTS[r]})"
            for r, i in zip(_ROLES, ids, strict=True)
            if i is None
        ]
        raise EmberError(
            f"the text holds {fill}, an infilling prompt, but the vocabulary lacks "
            f"{', '.join(names)}: this model does not support infilling; remove "
            f"{fill} from the text"
        )
    pre, suf, mid = ids
    if tok._infill is None:  # built once per tokenizer: a copy of the whole vocabulary
        tok._infill = infill_backend(tok.backend)
    enc = tok._infill.encode_batch([" " + prefix, suffix], add_special_tokens=False)
    bos = [tok.bos_token_id] if add_special_tokens and tok.add_bos_token else []
    eos = [tok.eos_token_id] if add_special_tokens and tok.add_eos_token else []
    return [*bos, pre, *enc[0].ids, suf, *enc[1].ids, mid, *eos]
