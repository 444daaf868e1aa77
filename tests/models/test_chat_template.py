"""Chat templates rendered with the variables transformers gives them: the oracle is
``PreTrainedTokenizerFast.apply_chat_template`` over the same vocabulary and template."""

from __future__ import annotations

import pytest

from ember.models.tokenizer import Tokenizer, tokenizer_from_gguf
from tests.models.test_gguf import tiny_tokenizer_md

transformers = pytest.importorskip("transformers")

# Llama-3 / Mistral style: the template writes bos_token itself; pad_token is tested as defined
SPECIALS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if pad_token is defined %}[pad {{ pad_token }}]{% endif %}"
    "{% if unk_token is not defined %}[no unk]{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("bos, pad, unk", [(None, None, None), ("<|im_start|>", None, None),
                                           (None, "<|endoftext|>", "<|endoftext|>")])
def test_missing_special_tokens_are_undefined_as_in_transformers(bos, pad, unk):
    """A model without a bos (Qwen2.5, whose tokenizer_config has "bos_token": null), pad or unk
    token: the template sees the name undefined, so ``{{ bos_token }}`` renders "" (was "None")
    and ``is defined`` tests agree with transformers."""
    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    ours = Tokenizer(backend, bos_token=bos, eos_token="<|im_end|>", pad_token=pad,
                     unk_token=unk, chat_template=SPECIALS_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|im_end|>", pad_token=pad,
        unk_token=unk, chat_template=SPECIALS_TEMPLATE)
    for gen in (False, True):
        want = theirs.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen) == want
        assert "None" not in want
