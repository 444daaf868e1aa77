"""transformers' ``min_new_tokens`` and ``no_repeat_ngram_size`` in Ember's generation: the tokens
of ``generate_ids`` (a left-padded batch, greedy and seeded sampling) equal transformers'
``generate()`` for each prompt on a tiny random Llama, and ``generate`` / ``ember generate`` take
them from the model's generation_config.json as transformers does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.generate import generate, generate_ids
from ember.models.loading import load_hf_folder
from tests.models.test_generate_hf import PROMPTS, _hf_greedy, _with_tokenizer, pair  # noqa: F401

transformers = pytest.importorskip("transformers")


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids[-1:] == [eos] else ids


NGRAM_PROMPTS = [*PROMPTS, [2, 37, 19, 2, 37]]


@pytest.fixture(scope="module")
def plain(pair):  # noqa: F811
    return [_hf_greedy(pair[0], p, 12) for p in NGRAM_PROMPTS]


@pytest.mark.parametrize("n", [2, 3])  # n = 1: the generation_config test below
def test_no_repeat_ngram_size_equals_transformers_generate(pair, plain, n):  # noqa: F811
    """Each row bans the tokens completing an n-gram of its own prompt and output so far."""
    hf, ours = pair
    want = [_hf_greedy(hf, p, 12, no_repeat_ngram_size=n) for p in NGRAM_PROMPTS]
    assert want != plain  # the setting matters here
    assert generate_ids(ours, NGRAM_PROMPTS, max_new_tokens=12, no_repeat_ngram_size=n) == want
    if n != 2:
        return
    # with rows leaving the batch early (their n-grams go with them) and a repetition penalty
    eos = want[0][2]
    stop = [_strip(_hf_greedy(hf, p, 12, no_repeat_ngram_size=n, repetition_penalty=1.3,
                              eos_token_id=eos), eos) for p in NGRAM_PROMPTS]
    assert generate_ids(ours, NGRAM_PROMPTS * 3, max_new_tokens=12, no_repeat_ngram_size=n,
                        repetition_penalty=1.3, eos_token_ids=[eos]) == stop * 3


def test_min_new_tokens_equals_transformers_generate(pair):  # noqa: F811
    """A stop id is not generated before min_new_tokens new tokens (its logit -inf, as
    transformers' MinNewTokensLengthLogitsProcessor), greedy and sampled."""
    hf, ours = pair
    plain = [_hf_greedy(hf, p, 8) for p in PROMPTS]
    eos = [plain[0][1], plain[1][0]]  # stop ids the rows give early
    want = [_hf_greedy(hf, p, 8, eos_token_id=eos, min_new_tokens=5) for p in PROMPTS]
    want = [w[:-1] if w[-1:] and w[-1] in eos else w for w in want]
    assert 4 < len(want[0]) < 8 and 4 < len(want[1])  # held back, then stopped or ran on
    assert generate_ids(ours, PROMPTS, max_new_tokens=8, eos_token_ids=eos,
                        min_new_tokens=5) == want
    for seed in range(3):  # the same seeded draws
        torch.manual_seed(seed)
        p = PROMPTS[1]
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                          max_new_tokens=8, do_sample=True, top_k=0, temperature=2.0,
                          eos_token_id=eos, min_new_tokens=5, pad_token_id=0)
        w = out[0, len(p):].tolist()
        w = w[:-1] if w[-1] in eos else w
        assert generate_ids(ours, [p], max_new_tokens=8, temperature=2.0, seed=seed,
                            eos_token_ids=eos, min_new_tokens=5) == [w]


def test_bad_values_and_drafts_are_refused(pair):  # noqa: F811
    ours = pair[1]
    for kw in (dict(min_new_tokens=-1), dict(no_repeat_ngram_size=1.5),
               dict(no_repeat_ngram_size=True)):
        with pytest.raises(EmberError, match=next(iter(kw))):
            generate_ids(ours, PROMPTS, max_new_tokens=4, **kw)
    with pytest.raises(EmberError, match="no_repeat_ngram_size = 0"):
        generate_ids(ours, PROMPTS, max_new_tokens=4, no_repeat_ngram_size=2,
                     drafts=[[1], [2], [3]])


def test_generation_config_min_new_tokens_and_ngrams_apply_as_in_transformers(tmp_path,
                                                                              capsys):
    """transformers' generate() applies a generation_config.json's no_repeat_ngram_size and
    min_new_tokens; Ember ignored them (a note on stderr said so). ``generate()`` and
    ``ember generate`` now take them (an argument given wins), with no note."""
    from ember.engine.cli import main

    tok, _, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    prompts = ["he", "the 12"]

    def hf_text(hf, p: str, **kw) -> str:
        ids = torch.tensor([tok.encode(p)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          pad_token_id=tok.eos_token_id, **kw)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, "no_repeat_ngram_size": 1, "min_new_tokens": 6}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    want = [hf_text(hf, p) for p in prompts]
    assert want != [hf_text(hf, p, no_repeat_ngram_size=0, min_new_tokens=0) for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=12) == want
    assert generate(model, tok, prompts, max_new_tokens=12, no_repeat_ngram_size=0,
                    min_new_tokens=0) == [hf_text(hf, p, no_repeat_ngram_size=0,
                                                  min_new_tokens=0) for p in prompts]
    argv = ["generate", str(tmp_path), "--raw", "--device", "cpu", "--max-new-tokens", "12"]
    assert main([*argv, "--prompt", prompts[0]]) == 0
    got = capsys.readouterr()
    assert got.out == want[0] + "\n" and "note" not in got.err
    assert main([*argv, "--prompt", prompts[0], "--no-repeat-ngram-size", "2",
                 "--min-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == hf_text(hf, prompts[0], no_repeat_ngram_size=2,
                                              min_new_tokens=3) + "\n"
    # a setting Ember does not apply is said in Python too (was: only the CLI's note)
    model.hf_generation_config = {**model.hf_generation_config, "num_beams": 2, "top_h": 0.4,
                                  "guidance_scale": 1.0, "token_healing": True}
    with pytest.warns(UserWarning, match=r"sets num_beams=2, token_healing=True, which") as w:
        generate(model, tok, prompts[:1], max_new_tokens=2)
    assert "guidance_scale" not in str(w[0].message)  # 1.0 is off


def test_bad_words_and_suppressed_tokens_equal_transformers_generate(pair):  # noqa: F811
    """bad_words_ids (one token: never; several: never completed after the others; a lone stop
    id: not banned), suppress_tokens and begin_suppress_tokens (not first) as transformers'
    NoBadWords / SuppressTokens / SuppressTokensAtBegin processors, each row on its own tokens."""
    hf, ours = pair
    plain = [_hf_greedy(hf, p, 8) for p in PROMPTS]
    eos = plain[2][5]
    kw = dict(bad_words_ids=[[plain[0][0]], plain[1][2:4], [eos]],
              suppress_tokens=[plain[2][1]], begin_suppress_tokens=[plain[1][0]])
    want = [_strip(_hf_greedy(hf, p, 8, eos_token_id=eos, **kw), eos) for p in PROMPTS]
    assert all(w != p[:len(w)] for w, p in zip(want, plain, strict=True))  # each one matters
    assert generate_ids(ours, PROMPTS, max_new_tokens=8, eos_token_ids=[eos], **kw) == want
    with pytest.raises(EmberError, match=r"bad_words_ids\[1\] holds 97"):
        generate_ids(ours, PROMPTS, max_new_tokens=4, bad_words_ids=[[1], [2, 97]])
    # an id outside the vocabulary bans nothing in transformers' SuppressTokens: warned, ignored
    with pytest.warns(UserWarning, match=r"suppress_tokens holds ids outside .* \[-1\]"):
        got = generate_ids(ours, PROMPTS, max_new_tokens=8, eos_token_ids=[eos],
                           **{**kw, "suppress_tokens": [-1, *kw["suppress_tokens"]]})
    assert got == want


def test_num_return_sequences_and_file_bans_as_in_transformers(tmp_path, capsys):
    """``generate(..., num_return_sequences=n)`` samples n answers per prompt, in transformers'
    order and with its seeded draws (it was refused: 'repeat the prompt in the list'); greedy is
    refused as transformers does. A generation_config.json's suppress_tokens apply, as in
    transformers' generate() (Ember ignored them; ember generate with a note)."""
    tok, hf, model = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    prompts = ["he", "the 12"]
    x = torch.tensor([tok.encode(prompts[1])])
    for seed in range(2):
        torch.manual_seed(seed)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                          do_sample=True, temperature=2.0, num_return_sequences=3,
                          pad_token_id=tok.eos_token_id)
        want = tok.batch_decode(out[:, x.shape[1]:], skip_special_tokens=True)
        assert len(set(want)) > 1
        assert generate(model, tok, prompts[1], max_new_tokens=6, temperature=2.0, seed=seed,
                        num_return_sequences=3) == want
    with pytest.raises(EmberError, match="needs sampling"):
        generate(model, tok, prompts, num_return_sequences=2)

    tok.save_pretrained(tmp_path)
    plain = generate(model, tok, prompts, max_new_tokens=8)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    banned = tok.encode(plain[0])[0]
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, "suppress_tokens": [banned]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    want = []
    for p in prompts:
        x = torch.tensor([tok.encode(p)])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                          pad_token_id=tok.eos_token_id)
        want.append(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True))
    assert want[0] != plain[0]
    assert generate(model, tok, prompts, max_new_tokens=8) == want
    from ember.engine.cli import main

    assert main(["generate", str(tmp_path), "--raw", "--device", "cpu", "--max-new-tokens", "8",
                 "--prompt", prompts[0]]) == 0
    assert capsys.readouterr().out == want[0] + "\n"


def test_min_length_and_forced_eos_equal_transformers_generate(pair):  # noqa: F811
    """min_length (no stop id before prompt + output hold that many tokens, each row its own
    prompt) and forced_eos_token_id (the only token allowed last, then suppress_tokens) as
    transformers' MinLength / ForcedEOSToken processors; Ember ignored both."""
    hf, ours = pair
    plain = [_hf_greedy(hf, p, 8) for p in PROMPTS]
    eos = [plain[0][1], plain[1][0]]
    # 8 in all: 1, 7 and 5 new tokens for prompts of 7, 1 and 3 (transformers per prompt)
    def hf_ids(**kw) -> list[list[int]]:
        out = [_hf_greedy(pair[0], p, 8, eos_token_id=eos, **kw) for p in PROMPTS]
        return [w[:-1] if w[-1:] and w[-1] in eos else w for w in out]

    want = hf_ids(min_length=8)
    assert len(want[1]) >= 7 and want != hf_ids()
    assert generate_ids(ours, PROMPTS, max_new_tokens=8, eos_token_ids=eos,
                        min_length=8) == want
    forced = [_hf_greedy(hf, p, 6, forced_eos_token_id=[5, 7], suppress_tokens=[5])
              for p in PROMPTS]
    assert all(f[-1] == 7 and f[:-1] == p[:5] for f, p in zip(forced, plain, strict=True))
    assert generate_ids(ours, PROMPTS, max_new_tokens=6, forced_eos_token_id=[5, 7],
                        suppress_tokens=[5]) == forced


def test_knobs_are_one_list(pair):  # noqa: F811
    """Every logits processor / warper is a field of ``Knobs``: the generation_config.json
    defaults cover exactly them, an unknown keyword is refused by name, and a draft is refused
    naming the processor that is on."""
    from ember.models.generation_config import Knobs, knob_defaults

    ours = pair[1]
    assert set(knob_defaults(ours)) == set(Knobs().as_dict())
    with pytest.raises(EmberError, match="does not take 'typical_q'"):
        generate_ids(ours, PROMPTS, max_new_tokens=2, typical_q=0.5)
    with pytest.raises(EmberError, match=r"forced_eos_token_id set"):
        generate_ids(ours, PROMPTS[:1], max_new_tokens=2, forced_eos_token_id=0, drafts=[[1]])


def test_generation_config_sampling_and_bias_settings_apply_as_in_transformers(tmp_path, capsys):
    """A generation_config.json's top_h, typical_p, epsilon_cutoff, eta_cutoff (sampling),
    sequence_bias, exponential_decay_length_penalty and renormalize_logits act in generate() as
    in transformers' generate() from that folder (Ember named them in a warning and ignored
    them): greedy and seeded sampled tokens equal."""
    tok, _, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    prompts = ["he", "the 12"]
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    plain = generate(model, tok, prompts, max_new_tokens=10)
    first = tok.encode(plain[1])[:3]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    settings = {"sequence_bias": [[[first[0]], -30.0], [[first[1], first[2]], 9.0]],
                "exponential_decay_length_penalty": [3, 1.7], "renormalize_logits": True,
                "typical_p": 0.6, "epsilon_cutoff": 0.001, "eta_cutoff": 0.002,
                "top_h": 0.8, "eos_token_id": eos}
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, **settings}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()

    def hf_text(p: str, **kw) -> str:
        ids = torch.tensor([tok.encode(p)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                          pad_token_id=eos, **kw)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unapplied to warn about
        got = generate(model, tok, prompts, max_new_tokens=10)
    want = [hf_text(p, do_sample=False) for p in prompts]
    assert got == want and want != plain
    differs = False
    for seed in range(3):
        torch.manual_seed(seed)
        want = hf_text(prompts[1], do_sample=True, temperature=1.5, top_k=0)
        assert generate(model, tok, prompts[1], max_new_tokens=10, temperature=1.5, top_k=0,
                        seed=seed) == [want]
        differs |= generate(model, tok, prompts[1], max_new_tokens=10, temperature=1.5,
                            top_k=0, seed=seed, typical_p=1.0, epsilon_cutoff=0.0,
                            eta_cutoff=0.0, top_h=0) != [want]
    assert differs  # the warpers matter here
    # top_h alone (the json's, then --top-h): transformers' TopH right after temperature
    from ember.engine.cli import main

    alone = dict(typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    argv = ["generate", str(tmp_path), "--raw", "--device", "cpu", "--max-new-tokens", "10",
            "--prompt", prompts[1], "--temperature", "1.5", "--top-k", "0"]
    differs = False
    for seed in range(3):
        torch.manual_seed(seed)
        want = hf_text(prompts[1], do_sample=True, temperature=1.5, top_k=0, **alone)
        assert generate(model, tok, prompts[1], max_new_tokens=10, temperature=1.5, top_k=0,
                        seed=seed, **alone) == [want]
        differs |= generate(model, tok, prompts[1], max_new_tokens=10, temperature=1.5,
                            top_k=0, seed=seed, top_h=0, **alone) != [want]
        torch.manual_seed(seed)
        want = hf_text(prompts[1], do_sample=True, temperature=1.5, top_k=0, top_h=0.3)
        assert main([*argv, "--top-h", "0.3", "--seed", str(seed)]) == 0
        assert capsys.readouterr().out == want + "\n"
    assert differs  # top_h matters here
