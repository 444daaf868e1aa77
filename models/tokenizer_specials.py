"""Which tokens a tokenizer lists as special, as transformers 5 lists them.

transformers 5's ``all_special_tokens`` is the *named* special tokens (bos, eos, unk, sep, pad,
cls, mask, then the model-specific ones such as ``image_token``) followed by the extra special
tokens, each text once; ``all_special_ids`` their ids in that order. A token added to the
vocabulary as special but named nowhere (Qwen2's ``<|im_start|>`` in a folder whose config does
not list it) is not among them, although decoding with ``skip_special_tokens=True`` skips it
(that follows the added token's ``special`` flag: ``special_added_ids``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tokenizers

from ember.models.tokenizer_classes import NAMED_SPECIALS

if TYPE_CHECKING:
    from ember.models.tokenizer import Tokenizer


def all_special_tokens(tok: Tokenizer) -> list[str]:
    """``tok``'s named special tokens in transformers' order, then its extra special tokens, each
    once; only those in the vocabulary (Ember leaves a token the vocabulary lacks out, where
    transformers would add it with an id past the model's embedding)."""
    named = {
        **{k: tok.template_tokens.get(k) for k in NAMED_SPECIALS},
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
    }
    named.update((k, v) for k, v in tok.template_tokens.items() if k not in NAMED_SPECIALS)
    out = [t for t in (*named.values(), *tok.extra_special_tokens) if t is not None]
    return [t for t in dict.fromkeys(out) if tok.backend.token_to_id(t) is not None]


def special_added_ids(backend: tokenizers.Tokenizer) -> set[int]:
    """The ids of every added token flagged special: the ones decoding with
    ``skip_special_tokens=True`` skips (named or not)."""
    return {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
