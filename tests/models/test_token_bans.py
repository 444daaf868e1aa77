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
    # SequenceBias first, ExponentialDecayLengthPenalty on the stop ids
    dict(sequence_bias=[[[5], 2.5], [[7, 8], -1.5], [[2, 7, 8], 3.0], [[9, 3], 4.0],
                        [[8], -0.25], [[5, 3], 1.0]],
         exponential_decay_length_penalty=[2, 1.5], no_repeat_ngram_size=2),
    # ForcedBOS after a one-token prompt (begin_suppress_tokens then one token later);
    # ForcedEOS of a one-token bad word (NoBadWords comes before it, SuppressTokens after)
    dict(forced_bos_token_id=8, begin_suppress_tokens=[2, 8], suppress_tokens=[1],
         forced_eos_token_id=[7, 1], bad_words_ids=[[7], [8], [5, 2]]),
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
    bias = "sequence_bias" in kw
    out: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))
    for step in range(max_new):
        # bf16-rounded logits: ties, as a bf16 model gives them
        logits = torch.randn(len(rows), V).bfloat16().float()
        got = bans.apply(bans.bias(logits.clone(), rows), rows, [len(out[r]) for r in rows])
        for b, r in enumerate(rows):
            ids = torch.tensor([prompts[r] + out[r]])
            want = procs[r](ids, logits[b:b + 1].clone())[0]
            assert torch.equal(got[b], want), (step, r)
        for b, r in enumerate(rows):
            if r == 2 and step % 2:  # a row that stopped for a step (it has finished)
                continue
            # a likely token, often one the prompt has (so bans come back)
            t = rng.choice([int(got[b].argmax()), *prompts[r], *([7, 8, 9] if bias else [])])
            out[r].append(t)
            bans.add(r, t)
        if step == 3:
            rows = [0, 2, 3]  # row 1 left the batch


def test_inactive_and_refused():
    assert not TokenBans([[1, 2]], V, [], min_new_tokens=5, min_length=9).active  # no stop id
    assert not TokenBans([[1, 2]], V, [3]).active
    with pytest.raises(Exception, match=r"bad_words_ids\[0\] is empty"):
        TokenBans([[1]], V, [3], bad_words_ids=[[]])


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kw", [
    dict(typical_p=0.5), dict(typical_p=0.95, temperature=0.7, top_k=20),
    dict(epsilon_cutoff=0.03), dict(eta_cutoff=0.05, top_p=0.9),
    dict(typical_p=0.8, epsilon_cutoff=0.01, eta_cutoff=0.002, min_p=0.01, temperature=1.3),
])
def test_warpers_equal_transformers(hf, kw, bf16):
    """typical_p, epsilon_cutoff and eta_cutoff (after temperature, top-k, top-p and min-p) as
    the warpers transformers' generate(do_sample=True) lists: the same surviving tokens and the
    same values, bf16-rounded logits (ties) included."""
    from ember.models.sampling import warp_logits

    torch.manual_seed(len(str(kw)) + bf16)
    logits = torch.randn(6, V) * 3
    logits = logits.bfloat16().float() if bf16 else logits
    logits[0, :8] = logits[0, 8]  # a tie across a cut
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None) | kw
    want = hf_processors(hf, 3, 4, [3], do_sample=True, **args)(torch.tensor([[1, 2, 3]]),
                                                                  logits.clone())
    got = warp_logits(logits, **{k: v for k, v in args.items() if v is not None})
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert 1 < int(torch.isfinite(got).sum()) < got.numel() - 6  # the cut matters
    assert torch.equal(got, want)
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kw", [
    dict(top_h=0.4), dict(top_h=1.0), dict(top_h=0.7, temperature=0.6, top_k=20, min_p=0.05),
    dict(top_h=0.3, top_p=0.9, typical_p=0.9, temperature=1.4),
])
def test_top_h_equals_transformers(hf, kw, bf16):
    """top_h as transformers' TopHLogitsWarper, which generate(do_sample=True) lists right after
    temperature: among the 100 most likely tokens (a vocabulary past 100 here), those whose
    entropy terms sum to <= top_h times those tokens' entropy. Ties, rows with -inf tokens (a
    NaN sum past them) and a peaked row; then the same seeded draw."""
    from ember.models.sampling import sample_next, warp_logits

    torch.manual_seed(len(str(kw)) + bf16)
    logits = torch.randn(5, 160) * 2
    logits = logits.bfloat16().float() if bf16 else logits
    logits[0, :8] = logits[0, 8]  # a tie across a cut
    logits[1, 40:] = float("-inf")  # fewer finite tokens than TopH's 100
    logits[2, ::3] = float("-inf")
    logits[3, 7] = 30.0  # one token holds nearly all the mass
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None) | kw
    want = hf_processors(hf, 3, 4, [3], do_sample=True, **args)(torch.tensor([[1, 2, 3]]),
                                                                  logits.clone())
    ours = {k: v for k, v in args.items() if v is not None}
    got = warp_logits(logits, **ours)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert int(torch.isfinite(got).sum()) < int(torch.isfinite(logits).sum()) - 10  # it cuts
    assert torch.equal(got, want)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        draw = torch.multinomial(want.softmax(-1), 1, generator=g)[:, 0]
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, generator=g, **ours), draw)


def test_renormalize_logits_as_transformers(hf):
    """renormalize_logits: transformers' LogitNormalization (log-softmax) last, then argmax or
    the draw from its softmax."""
    from ember.models.sampling import sample_next

    logits = torch.randn(4, V).bfloat16().float()
    want = hf_processors(hf, 3, 4, [3], renormalize_logits=True)(torch.tensor([[1, 2, 3]]),
                                                                  logits.clone())
    assert torch.equal(sample_next(logits, renormalize_logits=True), want.argmax(-1))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        warped = hf_processors(hf, 3, 4, [3], do_sample=True, top_k=5,
                               renormalize_logits=True)(torch.tensor([[1, 2, 3]]), logits.clone())
        draw = torch.multinomial(warped.softmax(-1), 1, generator=g)[:, 0]
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, 1.0, top_k=5, generator=g,
                                       renormalize_logits=True), draw)


@pytest.mark.parametrize("name", ["suppress_tokens", "begin_suppress_tokens"])
def test_suppressed_ids_outside_the_vocabulary_are_ignored_as_transformers(hf, name):
    """transformers' SuppressTokens / SuppressTokensAtBegin ban ``isin(vocab, ids)``: an id
    outside the vocabulary (a generation_config.json made for a larger one, -1) bans nothing
    and the others still act; Ember refused the whole list. It warns, naming the ids."""
    ids = [4, V + 3, -1]
    logits = torch.randn(2, V)
    want = hf_processors(hf, 3, 4, [3], **{name: ids})(torch.tensor([[5, 6, 7]] * 2), logits)
    with pytest.warns(UserWarning, match=rf"{name} holds ids outside .* \[{V + 3}, -1\]"):
        bans = TokenBans([[5, 6, 7]] * 2, V, [3], max_new_tokens=4, **{name: ids})
    assert torch.equal(bans.apply(logits.clone(), [0, 1], [0, 0]), want)
    assert want[:, 4].isinf().all()
