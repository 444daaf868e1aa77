"""Generation: SmolLM2 answers Paris, batched (left-padded) == one prompt at a time, KV cache ==
full recomputation, sampling knobs (seeded, top-k, top-p), per-row EOS, stop strings, bad input."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.generate import generate, generate_ids
from ember.models.sampling import sample_next
from ember.models.tokenizer import tokenizer_from_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import smollm2, smollm2_dir, tiny_tokenizer_md  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Real model


def test_smollm2_answers_paris(smollm2):  # noqa: F811
    model, tok = smollm2
    out = generate(model, tok, ["What is the capital of France?"], chat=True, max_new_tokens=12)
    assert len(out) == 1 and "Paris" in out[0], out


PLAIN = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
         "1, 2, 3,"]


def test_smollm2_batched_equals_unbatched(smollm2):  # noqa: F811
    model, tok = smollm2
    prompts = [tok.encode(p) for p in PLAIN]
    assert len({len(p) for p in prompts}) == 3  # real left padding
    kw = dict(max_new_tokens=8, eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    batched = generate_ids(model, prompts, **kw)
    single = [generate_ids(model, [p], **kw)[0] for p in prompts]
    assert batched == single
    assert all(len(s) > 0 for s in single)


def test_smollm2_kv_cache_equals_recompute(smollm2):  # noqa: F811
    model, tok = smollm2
    prompt = tok.encode(PLAIN[1])
    cached = generate_ids(model, [prompt], max_new_tokens=6)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            last = model.hidden_states(torch.tensor([seq]))[:, -1:]
            seq.append(int(model.logits(last)[0, -1].argmax()))
    assert cached == seq[len(prompt):]


# ---------------------------------------------------------------------------------------------
# Tiny random model (fast)

VOCAB = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])


@pytest.fixture
def tiny():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=96)
    # a large init spreads the logits, so greedy choices are not near-ties
    model = Transformer(cfg).init_weights(std=0.5, seed=int(torch.randint(0, 2**30, ())))
    return model, tokenizer_from_gguf(tiny_tokenizer_md())


def _rand_prompts(lengths):
    return [torch.randint(3, VOCAB, (n,)).tolist() for n in lengths]


def test_left_padding_and_cache_match_recompute(tiny):
    model, _ = tiny
    prompts = _rand_prompts([5, 1, 9, 3])
    out = generate_ids(model, prompts, max_new_tokens=7)
    for p, o in zip(prompts, out, strict=True):
        seq = list(p)
        with torch.no_grad():
            for _ in range(7):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq[len(p):]


def test_eos_stops_each_row_independently(tiny):
    model, _ = tiny
    for _ in range(20):  # find prompts whose row 0 emits a token that row 1 never does
        prompts = _rand_prompts([4, 6])
        free = generate_ids(model, prompts, max_new_tokens=8)
        only_0 = [t for t in free[0][1:] if t not in free[1]]
        if only_0:
            break
    else:
        pytest.fail("no usable stop token in 20 draws")
    stop = only_0[0]
    out = generate_ids(model, prompts, max_new_tokens=8, eos_token_ids=[stop])
    assert out[0] == free[0][:free[0].index(stop)]  # the stop token itself is not returned
    assert len(out[0]) >= 1
    assert out[1] == free[1]  # row 1 keeps going after row 0 finished
    assert generate_ids(model, prompts, max_new_tokens=0) == [[], []]


def _passes(model):
    """Count the model's forward passes (hidden_states calls) made by generate_ids."""
    calls = []
    inner = model.hidden_states

    def counted(*a, **kw):
        # no autograd graph may be built: it would keep every activation alive
        assert torch.is_inference_mode_enabled()
        calls.append(a[0].shape)
        return inner(*a, **kw)

    model.hidden_states = counted
    return calls


def test_drafts_give_exactly_greedy_output_and_save_passes(tiny):
    model, _ = tiny
    prompts = _rand_prompts([5, 1, 9, 3, 4, 7])
    n = 9
    free = generate_ids(model, prompts, max_new_tokens=n)
    assert any(len(f) == n for f in free)
    fix = free[2][:]
    fix[3] = (fix[3] + 1) % VOCAB  # right up to token 3, then wrong
    drafts = [free[0],  # exactly right
              free[1][:2],  # a right prefix, shorter than the output
              fix,
              [(free[3][0] + 1) % VOCAB] + free[3][1:],  # wrong from the first token
              [],  # no guess
              free[5] + [7, 8, 9, 10]]  # right, and longer than max_new_tokens allows
    calls = _passes(model)
    out = generate_ids(model, prompts, max_new_tokens=n, drafts=drafts)
    assert out == free
    # prefill, one draft pass, then one pass per token for the rows whose guess was wrong (the
    # finished rows leave the batch)
    assert len(calls) <= n and calls[1][1] > 1 and calls[-1][0] < len(prompts)
    # all guesses right: prefill + one draft pass (+ at most one for a row at its stop token)
    calls.clear()
    assert generate_ids(model, prompts, max_new_tokens=n, drafts=free) == free
    assert len(calls) <= 3


def test_sliding_window_counts_tokens_not_slots(tiny):
    """A window of 4 tokens with left padding and with the holes rejected drafts leave in the
    cache: generation equals recomputing the unpadded sequence, drafts or not (the window must
    count real tokens; counting cache slots would cut keys short after a hole)."""
    _, _ = tiny
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=96, sliding_window=4)
    model = Transformer(cfg).init_weights(std=0.5, seed=3)
    prompts = _rand_prompts([6, 2, 9])
    n = 10
    free = generate_ids(model, prompts, max_new_tokens=n)
    for p, o in zip(prompts, free, strict=True):
        seq = list(p)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq[len(p):]
    wrong = [f[:] for f in free]
    for w in wrong:  # right for 2 tokens, then wrong: the rest of each draft becomes a hole
        w[2] = (w[2] + 1) % VOCAB
    assert generate_ids(model, prompts, max_new_tokens=n, drafts=wrong) == free


def test_lock_step_decoding_keeps_pace_with_other_processes(tiny):
    """``sync``: a call among processes that decode longer makes as many passes as they do
    (one-token passes once its rows are done, or when it has no prompts), with the same output;
    ``sync`` sees whether this call still generates."""
    model, _ = tiny
    prompts, n = _rand_prompts([4, 6, 2]), 5
    calls = _passes(model)
    free = generate_ids(model, prompts, max_new_tokens=n)
    alone = len(calls)
    assert alone > 1
    for extra in (0, 3):
        flags = []

        def sync(flag, flags=flags, others=alone - 1 + extra):  # others: their passes left
            flags.append(flag)
            return flag or len(flags) <= others

        calls.clear()
        assert generate_ids(model, prompts, max_new_tokens=n, sync=sync) == free
        assert len(calls) == alone + extra and calls[alone:] == [(1, 1)] * extra
        assert flags == [True] * (alone - 1) + [False] * (extra + 1)
        flags.clear()
        calls.clear()
        assert generate_ids(model, [], max_new_tokens=n, sync=sync) == []
        assert calls == [(1, 1)] * (alone + extra)


def test_drafts_with_eos_and_stop_rules(tiny):
    model, _ = tiny
    prompts = _rand_prompts([4, 6, 2])
    free = generate_ids(model, prompts, max_new_tokens=8)
    stop = free[0][3]
    want = generate_ids(model, prompts, max_new_tokens=8, eos_token_ids=[stop])
    guess = [w + [stop] for w in want]  # a reference ends with its EOS token
    assert generate_ids(model, prompts, max_new_tokens=8, eos_token_ids=[stop],
                        drafts=guess) == want

    def short(row, ids):
        return len(ids) >= 2 + row

    want = generate_ids(model, prompts, max_new_tokens=8, should_stop=short)
    assert generate_ids(model, prompts, max_new_tokens=8, should_stop=short,
                        drafts=free) == want
    with pytest.raises(EmberError, match="temperature = 0"):
        generate_ids(model, prompts, temperature=1.0, drafts=free)
    with pytest.raises(EmberError, match="one per prompt"):
        generate_ids(model, prompts, drafts=free[:2])
    with pytest.raises(EmberError, match="draft 1 has token ids outside"):
        generate_ids(model, prompts, drafts=[[], [VOCAB], []])


def test_sampling_is_seeded_and_knobs_reduce_to_greedy(tiny):
    model, _ = tiny
    prompts = _rand_prompts([3, 5])
    greedy = generate_ids(model, prompts, max_new_tokens=6)
    a = generate_ids(model, prompts, max_new_tokens=6, temperature=1.5, seed=7)
    b = generate_ids(model, prompts, max_new_tokens=6, temperature=1.5, seed=7)
    assert a == b
    others = [generate_ids(model, prompts, max_new_tokens=6, temperature=1.5, seed=s)
              for s in range(8, 12)]
    assert any(o != a for o in others)
    assert generate_ids(model, prompts, max_new_tokens=6, temperature=1.0, top_k=1,
                        seed=3) == greedy
    assert generate_ids(model, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                        seed=3) == greedy


def test_generators_per_prompt_sample_as_each_prompt_alone(tiny):
    """``generators``: each row draws from its own, so a prompt's tokens are what it samples
    alone (with EOS ending one row early too); the wrong count, or with a seed, is refused."""
    model, _ = tiny
    prompts = _rand_prompts([3, 5, 2])

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(max_new_tokens=6, temperature=1.5, top_k=0)
    alone = [generate_ids(model, [p], generators=gens([10 + i]), **kw)[0]
             for i, p in enumerate(prompts)]
    assert generate_ids(model, prompts, generators=gens([10, 11, 12]), **kw) == alone
    stop = alone[1][2]  # row 1 ends early; the others still sample as alone
    cut = [a[:a.index(stop)] if stop in a else a for a in alone]
    assert generate_ids(model, prompts, generators=gens([10, 11, 12]), eos_token_ids=[stop],
                        **kw) == cut
    for bad in (dict(generators=gens([1])), dict(generators=gens([1, 2, 3]), seed=1)):
        with pytest.raises(EmberError, match="one per prompt"):
            generate_ids(model, prompts, **kw, **bad)


def test_top_p_and_top_k_keep_the_right_tokens():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log().expand(4000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    draw = sample_next(logits, temperature=1.0, top_p=0.6, generator=g)
    assert set(draw.tolist()) == {1, 2}  # 0.5 < 0.6, so the nucleus needs the second token
    assert abs((draw == 1).float().mean().item() - 0.5 / 0.8) < 0.05
    draw = sample_next(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(draw.tolist()) == {1}
    draw = sample_next(logits, temperature=1.0, top_k=3, generator=g)
    assert set(draw.tolist()) == {1, 2, 3}
    assert abs((draw == 3).float().mean().item() - 0.15 / 0.95) < 0.05


def test_generate_text_stop_strings_and_chat(tiny):
    model, tok = tiny
    for seed in range(20):  # a random model may emit EOS at once; find one that talks
        model.init_weights(std=0.5, seed=seed)
        free = generate(model, tok, ["he"], max_new_tokens=12)[0]
        if len(free) >= 8:
            break
    else:
        pytest.fail("every random model stopped within 8 characters")
    stop = free[3:5]
    cut = generate(model, tok, ["he"], max_new_tokens=12, stop_strings=[stop])[0]
    assert cut == free[:free.index(stop)]
    conv = [{"role": "user", "content": "he"}]
    assert generate(model, tok, [conv], max_new_tokens=4) == generate(
        model, tok, ["he"], chat=True, max_new_tokens=4)
    assert generate(model, tok, "he", max_new_tokens=3) == generate(model, tok, ["he"],
                                                                    max_new_tokens=3)


def test_bad_inputs(tiny):
    model, tok = tiny
    for kw, msg in [(dict(temperature=-1.0), "temperature"), (dict(top_p=-0.1), "top_p"),
                    (dict(top_k=-2), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
                    (dict(top_h=1.5), r"top_h must be in \[0, 1\]"), (dict(top_h="x"), "top_h"),
                    (dict(max_new_tokens=200), "exceeds the model's context")]:
        with pytest.raises(EmberError, match=msg):
            generate_ids(model, [[5, 6]], **kw)
    with pytest.raises(EmberError, match="prompt 1 is empty"):
        generate_ids(model, [[5], []])
    with pytest.raises(EmberError, match="outside the vocabulary"):
        generate_ids(model, [[5, VOCAB]])
    with pytest.raises(EmberError, match="stop_strings must be a list"):
        generate(model, tok, ["he"], stop_strings="x")
    with pytest.raises(EmberError, match="must be a str or a conversation"):
        generate(model, tok, [123])


def test_cache_takes_the_compute_dtype_under_autocast(tiny):
    """fp32 weights under bf16 autocast (full fine-tuning's eval): keys arrive in bf16, and the
    cache must hold them as such, padded batch or not."""
    model, _ = tiny
    for prompts in (_rand_prompts([4]), _rand_prompts([4, 2])):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = generate_ids(model, prompts, max_new_tokens=3)
        assert [len(o) for o in out] == [3] * len(prompts)


def test_a_conversation_ending_with_the_assistant_is_continued():
    """A prefilled answer (the last message the assistant's) is continued, as transformers'
    text-generation pipeline does (``continue_final_message``); Ember closed the prefill's turn
    and opened a new assistant turn after it."""
    transformers = pytest.importorskip("transformers")
    from ember.models.generate import encode_prompts

    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend,
                                                  chat_template=tok.chat_template)
    prefill = [{"role": "user", "content": "he"}, {"role": "assistant", "content": "the 12"}]
    ask = prefill[:1]
    for conv in (prefill, ask):
        cont = conv[-1]["role"] == "assistant"  # the pipeline's rule
        want = theirs.apply_chat_template(conv, add_generation_prompt=not cont,
                                          continue_final_message=cont, tokenize=False)
        assert encode_prompts(tok, [conv]) == [theirs.encode(want, add_special_tokens=False)]
    assert tok.decode(encode_prompts(tok, [prefill])[0]).endswith("the 12")  # no turn after it


def test_a_stop_string_spelled_byte_by_byte_stops_generation(monkeypatch):
    """A stop string of rare characters spans one token per UTF-8 byte (byte-level and
    byte-fallback vocabularies): generation stops at the token that completes it (it ran on to
    max_new_tokens: the decoded tail was as many tokens as the string has characters, + 4)."""
    import importlib

    import tokenizers
    from tokenizers import decoders, pre_tokenizers

    from ember.models.tokenizer import Tokenizer

    gen_mod = importlib.import_module("ember.models.generate")  # (the package exports generate)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one token per byte, no merges
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = Tokenizer(backend)
    stop = "Ω𝟘ж"  # 3 characters, 8 bytes: 8 tokens
    script = tok.encode("he " + stop + " and on and on and on")
    fed = []

    def scripted(model, prompts, *, should_stop, **kw):  # generation as the script says
        out = []
        for t in script:
            out.append(t)
            fed.append(t)
            if should_stop(0, out):
                break
        return [out]

    monkeypatch.setattr(gen_mod, "generate_ids", scripted)
    text = gen_mod.generate(None, tok, ["he"], max_new_tokens=len(script), stop_strings=[stop])
    assert text == ["he "]
    assert tok.decode(fed) == "he " + stop  # stopped at the token that completed it


def test_transformers_generate_options_get_a_clear_error(tiny):
    """transformers' generate() keywords Ember's does not take (num_beams, do_sample,
    max_length, ...) raised Python's bare "unexpected keyword argument"; the error now names
    each one with what Ember does instead, and lists the options it has."""
    import inspect

    model, tok = tiny
    with pytest.raises(EmberError) as e:
        generate(model, tok, ["he"], max_new_tokens=2, num_beams=3, do_sample=True,
                 typo_option=1)
    msg = str(e.value)
    for needle in ("num_beams: not supported", "do_sample: sampling is "
                   "temperature > 0", "typo_option: not an option", "its options:"):
        assert needle in msg
    # every option the message lists is one generate() takes (its logits processors and
    # warpers as the fields of Knobs)
    from ember.models.generation_config import Knobs

    listed = msg.rsplit("its options: ", 1)[1].rstrip(")").split(", ")
    assert set(listed) <= set(inspect.signature(generate).parameters) | set(Knobs().as_dict())


def test_masked_attention_keeps_a_nan_and_zeroes_only_rows_without_keys():
    """The per-key-mask attention (left padding, holes) gives 0 for a row that sees no key and
    NaN for a NaN query: it used nan_to_num, so a diverged weight gave finite logits."""
    from ember.models.config import ModelConfig
    from ember.models.transformer import _masked_attention

    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, h, 16, generator=g) for h in (2, 1, 1))
    key_mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    clean = _masked_attention(q, k, v, key_mask, cfg, None)
    assert (clean[0, :2] == 0).all() and clean.isfinite().all()
    q[1, 3, 0, 0] = float("nan")
    out = _masked_attention(q, k, v, key_mask, cfg, None)
    assert out[1, 3, 0].isnan().all()
    out[1, 3, 0] = clean[1, 3, 0]
    torch.testing.assert_close(out, clean)
