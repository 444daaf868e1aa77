"""``TokenBans`` step by step against the list transformers' ``generate()`` builds
(``_get_logits_processor``): the same logits, each row run alone through transformers'
processors on its own prompt and output, must come out equal (every -inf and every kept value),
with rows of different prompt lengths, rows that stopped advancing and rows that left the
batch."""

from __future__ import annotations

import random

import pytest
import torch

from ember.models.token_bans import TokenBans

transformers = pytest.importorskip("transformers")

V = 48  # a small vocabulary, so n-grams and bad words come back often


@pytest.fixture(scope="module")
def hf():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_processors(hf, prompt_len: int, max_new_tokens: int, eos: list[int], **kw):
    """transformers' processor list for one prompt of ``prompt_len`` tokens, as ``generate()``
    makes it (``_prepare_special_tokens`` sets ``_eos_token_tensor``)."""
    gc = transformers.GenerationConfig(max_length=prompt_len + max_new_tokens, **kw)
    gc._eos_token_tensor = torch.tensor(eos) if eos else None
    return hf._get_logits_processor(generation_config=gc, input_ids_seq_length=prompt_len,
                                    encoder_input_ids=None, device="cpu", model_kwargs={})


CASES = [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3, bad_words_ids=[[5], [7, 8], [9, 10, 11], [7, 12], [3]]),
    dict(suppress_tokens=[1, 4], begin_suppress_tokens=[0, 2], min_new_tokens=3),
    dict(min_length=9, forced_eos_token_id=[3, 6], suppress_tokens=[6]),
    dict(bad_words_ids=[[2, 2], [2, 5]], min_length=6, min_new_tokens=2,
         begin_suppress_tokens=[5], forced_eos_token_id=4, no_repeat_ngram_size=1),
]


@pytest.mark.parametrize("max_new", [1, 7])
@pytest.mark.parametrize("kw", CASES)
def test_token_bans_equal_transformers_processors(hf, kw, max_new):
    rng = random.Random(str(kw) + str(max_new))
    torch.manual_seed(rng.randrange(2**31))
    eos = [3]
    # prompts that repeat themselves, so their n-grams and bad words recur
    prompts = [[rng.choice([2, 5, 7, 8, 9, 10]) for _ in range(n)] for n in (1, 4, 7, 3)]
    procs = [hf_processors(hf, len(p), max_new, eos, **kw) for p in prompts]
    bans = TokenBans(prompts, V, eos, max_new_tokens=max_new, **kw)
    assert bans.active
    out: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))
    for step in range(max_new):
        # bf16-rounded logits: ties, as a bf16 model gives them
        logits = torch.randn(len(rows), V).bfloat16().float()
        got = bans.apply(logits.clone(), rows, [len(out[r]) for r in rows])
        for b, r in enumerate(rows):
            ids = torch.tensor([prompts[r] + out[r]])
            want = procs[r](ids, logits[b:b + 1].clone())[0]
            assert torch.equal(got[b], want), (step, r)
        for b, r in enumerate(rows):
            if r == 2 and step % 2:  # a row that stopped for a step (it has finished)
                continue
            # a likely token, often one the prompt has (so bans come back)
            t = rng.choice([int(got[b].argmax()), *prompts[r]])
            out[r].append(t)
            bans.add(r, t)
        if step == 3:
            rows = [0, 2, 3]  # row 1 left the batch


def test_inactive_and_refused():
    assert not TokenBans([[1, 2]], V, [], min_new_tokens=5, min_length=9).active  # no stop id
    assert not TokenBans([[1, 2]], V, [3]).active
    with pytest.raises(Exception, match=r"bad_words_ids\[0\] is empty"):
        TokenBans([[1]], V, [3], bad_words_ids=[[]])
