"""Generation against transformers: greedy tokens of a left-padded batch with prompts of different
lengths equal ``generate``'s for each prompt on a tiny random Llama (with a repetition penalty
too), and the sampling filters equal transformers' logits processors on the same logits."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember.models.generate import generate_ids
from ember.models.loading import load_hf_folder
from ember.models.sampling import penalize_repetition, warp_logits

transformers = pytest.importorskip("transformers")

VOCAB = 97


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, the same weights loaded by Ember)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():  # spread logits: no near-ties between greedy choices
        torch.nn.init.normal_(p, std=0.4)
    folder = tmp_path_factory.mktemp("tiny_llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(folder)
    return hf, load_hf_folder(folder, torch.float32, "cpu").eval()


def _hf_greedy(hf, prompt: list[int], n: int, **kw) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11], [20, 21, 22]]


@pytest.fixture(scope="module")
def hf_greedy(pair):
    return [_hf_greedy(pair[0], p, 6) for p in PROMPTS]


@pytest.mark.parametrize("pad", [0, VOCAB, -1])
def test_left_padded_batch_equals_transformers_per_prompt(pair, hf_greedy, pad):
    """Any pad id works, padding being masked: one outside the embedding (a tokenizer's <pad>
    added after the model's vocabulary, a config's -1) was an IndexError from the lookup."""
    got = generate_ids(pair[1], PROMPTS, max_new_tokens=6, pad_token_id=pad)
    assert got == hf_greedy


def test_repetition_penalty_equals_transformers_generate(pair):
    """The penalty counts each row's own prompt (not its left padding) and output so far."""
    hf, ours = pair
    prompts = [*PROMPTS, [2, 37, 19]]  # the last: what the model repeats, already in the prompt
    want = [_hf_greedy(hf, p, 8, repetition_penalty=1.8) for p in prompts]
    assert want[-1] != _hf_greedy(hf, prompts[-1], 8)  # the penalty changes the tokens
    assert generate_ids(ours, prompts, max_new_tokens=8, repetition_penalty=1.8) == want
    # rows that stop early leave the batch (the penalty's memory of each row goes with it)
    stop = [_hf_greedy(hf, p, 8, repetition_penalty=1.8, eos_token_id=19) for p in prompts]
    stop = [s[:-1] if s[-1:] == [19] else s for s in stop]
    assert sum(len(s) < 8 for s in stop) >= 2
    assert generate_ids(ours, prompts * 3, max_new_tokens=8, repetition_penalty=1.8,
                        eos_token_ids=[19]) == stop * 3


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=5), dict(top_p=0.8),
                                dict(min_p=0.05), dict(temperature=1.5, min_p=0.2),
                                dict(temperature=0.5, top_k=12, top_p=0.9, min_p=0.1),
                                dict(top_p=0.0), dict(temperature=0.7, top_p=0.0)])
@pytest.mark.parametrize("ties", [False, True])
def test_sampling_filters_equal_transformers_warpers(kw, ties):
    """Ties at a cut (bf16 logits have many) keep the same tokens as transformers (top-p kept a
    different subset of equal tokens: it summed the nucleus from the other end)."""
    from transformers.generation import logits_process as lp

    logits = torch.randn(16, 301) * 3
    if ties:  # a cut inside a group of equal logits, in most rows
        logits = logits.round()
    warpers = [lp.TemperatureLogitsWarper(kw.get("temperature", 1.0))]
    if "top_k" in kw:
        warpers.append(lp.TopKLogitsWarper(kw["top_k"]))
    if "top_p" in kw:
        warpers.append(lp.TopPLogitsWarper(kw["top_p"]))
    if "min_p" in kw:
        warpers.append(lp.MinPLogitsWarper(kw["min_p"]))
    want = logits.clone()
    for w in warpers:
        want = w(None, want)
    got = warp_logits(logits, **kw)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want)
    ids = torch.randint(0, 301, (16, 9))
    seen = torch.zeros(16, 301, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(penalize_repetition(logits, seen, 1.3),
                               lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_top_p_zero_samples_the_top_token_as_transformers(pair):
    """top_p=0 was refused ('top_p must be in (0, 1]'); transformers' TopP keeps the most likely
    token (min_tokens_to_keep=1), so sampling with top_p=0 is greedy decoding."""
    hf, ours = pair
    want = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=5, do_sample=True, top_p=0.0, top_k=0,
                        pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert generate_ids(ours, PROMPTS, max_new_tokens=5, temperature=1.0, top_p=0.0,
                        seed=1) == want



def _hf_sampled_batch(hf, prompts: list[list[int]], n: int, eos: int, **kw) -> list[list[int]]:
    """transformers' seeded (0) sampling of the left-padded batch, each row cut at ``eos``."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, top_k=20,
                      pad_token_id=0, eos_token_id=eos, **kw)[:, L:].tolist()
    return [r[:r.index(eos)] if eos in r else r for r in out]


@pytest.mark.parametrize(("kw", "eos"), [(dict(num_return_sequences=3), 27),
                                         (dict(min_new_tokens=3), 82)])
def test_a_sampled_batch_whose_rows_stop_equals_transformers_batched_sampling(pair, kw, eos):
    """One generator for the batch draws what transformers' batched generate draws with that
    seed, after a row stopped too: transformers keeps drawing for finished rows (a (B, V) draw
    each step), Ember drew for the rows left only, so the others' tokens changed from the next
    step on (num_return_sequences=3: rows 0, 1, 4 and 5 differed from their 4th token)."""
    hf, ours = pair
    prompts = PROMPTS[:2]
    want = _hf_sampled_batch(hf, prompts, 8, eos, **kw)
    assert any(len(w) < 8 for w in want) and any(len(w) == 8 for w in want)
    n = kw.get("num_return_sequences", 1)
    got = generate_ids(ours, [p for p in prompts for _ in range(n)], max_new_tokens=8,
                       temperature=1.0, top_k=20, seed=0, eos_token_ids=[eos],
                       min_new_tokens=kw.get("min_new_tokens", 0))
    assert got == want


def dynamic_ntk_llama(vocab: int):
    """A tiny random transformers Llama with dynamic NTK RoPE and a 16-token context, weights
    large enough (std 0.4) that greedy tokens depend on the RoPE base."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=16,
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                   tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return hf


def test_dynamic_ntk_generates_past_the_context_as_transformers(tmp_path):
    """Dynamic NTK RoPE exists to run past max_position_embeddings: generation there was refused
    ('exceeds the model's context'); it now equals transformers' greedy generate, whose base grows
    at every step past the context (prompt 10 + 14 new tokens, context 16)."""
    hf = dynamic_ntk_llama(VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
        want = _hf_greedy(hf, list(range(3, 13)), 14)
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    assert generate_ids(model, [list(range(3, 13))], max_new_tokens=14) == [want]
    # A batch: each row as transformers generates its prompt alone. Batched, the longest row's
    # length set every row's base (transformers' batched generate does too), so the short rows
    # changed tokens as soon as the long one passed the context.
    prompts = [list(range(3, 15)), [11], [20, 21, 22]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [_hf_greedy(hf, p, 30) for p in prompts]
    assert generate_ids(model, prompts, max_new_tokens=30) == want


def _with_tokenizer(folder, eos_token: str, boost: str):
    """(transformers tokenizer over the tiny GGUF vocabulary, with its chat template; a tiny
    transformers Llama over it, ``boost``'s logit scaled up so that some rows emit it early; the
    same weights loaded by Ember)."""
    from ember.models.tokenizer import tokenizer_from_gguf
    from tests.models.test_gguf import VOCAB as TOK_VOCAB
    from tests.models.test_gguf import tiny_tokenizer_md

    md = tiny_tokenizer_md()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_from_gguf(md).backend, eos_token=eos_token,
        chat_template=md["tokenizer.chat_template"])
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=TOK_VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=96,
                                   tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=tok.eos_token_id, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    with torch.no_grad():
        hf.lm_head.weight[tok.convert_tokens_to_ids(boost)] *= 1.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(folder)
    return tok, hf, load_hf_folder(folder, torch.float32, "cpu").eval()


def _hf_ids(hf, tok, prompt: str, n: int) -> list[int]:
    """transformers' greedy new ids for a plain prompt, its generation_config's stop ids on."""
    ids = tok.encode(prompt)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                      max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


def _hf_text(hf, tok, prompt, n: int, **kw) -> str:
    ids = (tok.encode(prompt) if isinstance(prompt, str) else
           tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                      max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, **kw)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_generate_text_with_a_transformers_tokenizer_equals_transformers(tmp_path):
    """``generate(model, tokenizer, ...)`` with a transformers tokenizer (chat template, stop at
    its eos) gives transformers' completions; it was a TypeError (transformers 5's
    ``eos_token_ids`` is one int) and the chat template's ids came back as a BatchEncoding."""
    from ember.models.generate import generate

    tok, hf, model = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    prompts = ["he 12", [{"role": "user", "content": "the"}],
               [{"role": "system", "content": "12"}, {"role": "user", "content": "t he"}]]
    want = [_hf_text(hf, tok, p, 10) for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=10) == want


def test_a_stop_string_naming_a_special_token_stops_as_transformers(tmp_path):
    """``stop_strings=["<|im_end|>"]`` on a model whose eos is another token: transformers'
    stop_strings match token strings, so generation ends at that special token (not in the
    decoded text); Ember matched decoded text without special tokens, so it never stopped and
    the row ran on to max_new_tokens. A plain stop string in the same call still cuts its row
    (Ember returns the text before the stop; transformers keeps it) and leaves the others."""
    from ember.models.generate import generate

    tok, hf, model = _with_tokenizer(tmp_path, "<|endoftext|>", "<|im_end|>")
    prompts = ["he 12", "the", "t he", "12 12", "h"]
    for stops in (["<|im_end|>"], ["<|im_end|>", "5q"]):
        want = [_hf_text(hf, tok, p, 12, stop_strings=stops, tokenizer=tok) for p in prompts]
        plain = [_hf_text(hf, tok, p, 12) for p in prompts]
        assert sum(w != f for w, f in zip(want, plain, strict=True)) >= len(stops)
        want = [w[:min([w.find(s) for s in stops if s in w] or [len(w)])] for w in want]
        assert generate(model, tok, prompts, max_new_tokens=12, stop_strings=stops) == want


def test_a_stop_string_begun_in_the_prompt_stops_as_transformers(tmp_path):
    """A stop string whose start is the prompt's end and whose end is in the generated tokens
    stops generation in transformers (``StopStringCriteria`` matches the end of the whole
    sequence); Ember matched the generated text alone, so it never stopped and returned the
    whole completion. Ember returns the text before the stop string: here nothing. A stop string
    wholly inside a prompt does not stop its row, in transformers nor in Ember."""
    from ember.models.generate import generate

    tok, hf, model = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    prompts = ["he 12", "the", "t he"]
    plain = [_hf_text(hf, tok, p, 10) for p in prompts]
    assert all(len(t) >= 2 for t in plain)
    for row in (0, 2):
        stops = [prompts[row][-2:] + plain[row][:2]]
        want = [_hf_text(hf, tok, p, 10, stop_strings=stops, tokenizer=tok) for p in prompts]
        assert want[row] != plain[row]  # transformers stopped early
        expect = []
        for p, w in zip(prompts, want, strict=True):  # the text before the stop string
            at = min([(p + w).find(s) for s in stops if s in p + w] or [len(p + w)])
            expect.append(w[:max(0, at - len(p))])
        assert expect[row] == ""
        assert generate(model, tok, prompts, max_new_tokens=10, stop_strings=stops) == expect


def test_generate_stops_at_the_generation_config_stop_ids_as_transformers(tmp_path):
    """generation_config.json lists several stop ids (Llama 3: [128001, 128008, 128009]) and
    the transformers tokenizer's eos is one of them: transformers' generate stops at each;
    ``generate(model, transformers_tokenizer, ...)`` stopped only at the tokenizer's eos and ran
    on to max_new_tokens. (Ember leaves the stop token out of the text; transformers keeps a
    non-special one.)"""
    import json

    from ember.models.generate import generate

    tok, hf, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    prompts = ["he 12", "the", "t he"]
    plain = [_hf_ids(hf, tok, p, 10) for p in prompts]
    stop = plain[0][3]  # a token the first row emits mid-way
    assert stop != tok.eos_token_id
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, stop]
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    want = [_hf_ids(hf, tok, p, 10) for p in prompts]
    assert want[0][-1] == stop and len(want[0]) < len(plain[0])
    want = [tok.decode(w[:-1] if w[-1] in (stop, tok.eos_token_id) else w,
                       skip_special_tokens=True) for w in want]
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    assert generate(model, tok, prompts, max_new_tokens=10) == want


def test_bad_sampling_values_are_refused_like_transformers_and_one_eos_id_is_taken(pair):
    """Values transformers' processors refuse (a NaN temperature, a fractional top_k) are an
    EmberError naming the knob (they were a RuntimeError from torch.multinomial and a TypeError
    from torch.topk); a flat list of ids or a non-integer id says how to give prompts (were a
    TypeError, or 5.5 silently read as 5); one eos id as an int, like transformers'
    ``eos_token_id``, stops generation as transformers does (was a TypeError)."""
    from transformers.generation import logits_process as lp

    from ember import EmberError

    hf, ours = pair
    with pytest.raises(ValueError):
        lp.TemperatureLogitsWarper(float("nan"))
    with pytest.raises(ValueError):
        lp.TopKLogitsWarper(2.5)
    for kw in (dict(temperature=float("nan")), dict(temperature=1.0, top_k=2.5)):
        with pytest.raises(EmberError, match=list(kw)[-1]):
            generate_ids(ours, [[5, 6]], max_new_tokens=3, **kw)
    for prompts, msg in [([5, 6], "wrap a single prompt"), ([[5.5, 6]], "not an integer: 5.5"),
                         ("5 6", "list of token-id lists"),
                         (torch.tensor([5, 6]), "wrap a single prompt")]:
        with pytest.raises(EmberError, match=msg):
            generate_ids(ours, prompts, max_new_tokens=3)
    free = _hf_greedy(hf, PROMPTS[0], 8)
    stop = free[3]
    want = _hf_greedy(hf, PROMPTS[0], 8, eos_token_id=stop)
    assert want[-1] == stop and len(want) < 8
    assert generate_ids(ours, [PROMPTS[0]], max_new_tokens=8, eos_token_ids=stop) == [want[:-1]]


def test_drafts_across_the_longrope_switch_equal_transformers(tmp_path):
    """Phi-3 LongRoPE (original context 16) with speculative drafts (right, wrong in the middle,
    wrong at once) for prompts whose generation crosses the switch to the long table: the
    tokens of transformers' greedy generate per prompt. A draft cut at the switch was fed again
    after it, the batch paying both passes' width: 'KV cache full'."""
    torch.manual_seed(0)
    factors = dict(short_factor=[1.0 + 0.1 * i for i in range(4)],
                   long_factor=[2.0 + 0.5 * i for i in range(4)])
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  original_max_position_embeddings=16,
                                  rope_scaling={"type": "longrope", **factors},
                                  tie_word_embeddings=False, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=None)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 1, 4, 7, 2, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
        want = [_hf_greedy(hf, p, 20) for p in prompts]
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    drafts = [w if i % 3 == 0 else [3, 4, 5] if i % 3 == 2 else
              [*w[:5], (w[5] + 1) % VOCAB, *w[6:]] for i, w in enumerate(want)]
    assert generate_ids(model, prompts, max_new_tokens=20, drafts=drafts) == want


def test_drafts_past_the_dynamic_ntk_context_equal_transformers(tmp_path):
    """Dynamic NTK RoPE (context 12, base 100: the growth moves the tokens) with speculative
    drafts (right, wrong in the middle) whose generation passes the context: transformers' greedy
    generate grows the base one position per step, so a draft pass past the context (one base
    for all its tokens, from its last position) gave other tokens than greedy decoding."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=12,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                    "rope_theta": 100.0},
                                   tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
        want = [_hf_greedy(hf, p, 12) for p in prompts]
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    drafts = [want[0], [*want[1][:3], (want[1][3] + 1) % VOCAB, *want[1][4:]]]
    assert generate_ids(model, prompts, max_new_tokens=12, drafts=drafts) == want


def test_knobs_not_given_are_the_generation_config_s_as_in_transformers(tmp_path, capsys):
    """transformers' ``generate()`` takes the knobs it is not given from the folder's
    generation_config.json (Qwen2.5-Instruct's repetition_penalty 1.05 applies to greedy
    decoding too), else its defaults (top_k 50 when sampling). Ember's ``generate()`` and
    ``ember generate`` ran greedy without the file's penalty and sampled with no top-k cut."""
    import json

    from ember.engine.cli import main
    from ember.models.generate import generate

    tok, _, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, "do_sample": False, "repetition_penalty": 1.8}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    prompt = "he 12 the"
    ids = torch.tensor([tok.encode(prompt)])

    def hf_new(**kw) -> str:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          pad_token_id=tok.eos_token_id, **kw)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    want = hf_new()  # no knobs: greedy with the file's penalty
    assert want != hf_new(repetition_penalty=1.0)
    assert generate(model, tok, prompt, max_new_tokens=8) == [want]
    assert main(["generate", str(tmp_path), "--raw", "--prompt", prompt, "--device", "cpu",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"

    # sampling, no top_k given: transformers' 50 (the file sets none); the same seeded draws
    for seed in range(3):
        torch.manual_seed(seed)
        want = hf_new(do_sample=True, temperature=3.0, repetition_penalty=1.0)
        assert generate(model, tok, prompt, max_new_tokens=8, temperature=3.0, seed=seed,
                        repetition_penalty=1.0) == [want]

    # a value out of range in the file (top_p 1.5): transformers leaves that filter off and
    # generates; Ember too (it refused the run, the file's value failing its checks)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, "do_sample": True, "top_p": 1.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    torch.manual_seed(0)
    want = hf_new(temperature=3.0)
    assert generate(model, tok, prompt, max_new_tokens=8, temperature=3.0, seed=0) == [want]


def test_generation_config_settings_ember_does_not_apply_are_stated(tmp_path, capsys):
    """A generation_config.json setting that changes transformers' greedy output and that
    Ember has no such processor for (num_beams) is named on stderr by ember
    generate, not silently ignored; a folder without one gets no note."""
    import json

    from ember.engine.cli import main

    tok, _, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    argv = ["generate", str(tmp_path), "--raw", "--prompt", "he", "--device", "cpu",
            "--max-new-tokens", "12"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "note" not in plain.err
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, "num_beams": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tok.encode("he")])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                      pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    assert tok.decode(new, skip_special_tokens=True) + "\n" != plain.out  # it matters
    assert main(argv) == 0
    assert "sets num_beams=3, which Ember" in capsys.readouterr().err
