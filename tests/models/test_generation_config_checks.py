"""A generation_config.json's knob values as transformers 5.24's ``generate()`` takes them, with
transformers as the oracle on the same file: a value it refuses (its logits processors' own
checks: always for the processors, when sampling for the warpers) is an EmberError naming the
file, key and value; one for which it builds no processor (top_p 1.5, a negative
no_repeat_ngram_size) is off, generating transformers' tokens. Ember used to treat every value
out of its own range as off without a word (a repetition_penalty of 0 generated unpenalised, a
top_k of -1 sampled with top_k 50)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.generate import generate_ids, knob_defaults
from ember.models.loading import load_hf_folder

transformers = pytest.importorskip("transformers")

VOCAB = 61
EOS = 2
PROMPT = [1, 5, 6, 7]

CASES = [
    ("repetition_penalty", 0),
    ("repetition_penalty", "1.1"),
    ("repetition_penalty", 1.3),
    ("no_repeat_ngram_size", -1),
    ("no_repeat_ngram_size", 2.5),
    ("min_new_tokens", 2.5),
    ("min_length", -3),
    ("min_length", 2.5),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", "0.9"),
    ("top_k", -1),
    ("top_k", 5.0),
    ("top_k", "5"),
    ("top_k", 0),
    ("min_p", 1.5),
    ("typical_p", 1.5),
    ("typical_p", 0),
    ("epsilon_cutoff", 1.5),
    ("eta_cutoff", -0.1),
    ("top_h", 1.5),
    ("top_h", 0),
    ("top_h", 0.5),
    # ints where transformers' processors check for a float (or convert one)
    ("repetition_penalty", 1),
    ("repetition_penalty", 2),
    ("top_p", 1),
    ("top_p", 0),
    ("min_p", 0),
    ("min_p", 1),
    ("typical_p", 1),
    ("epsilon_cutoff", 0),
    ("eta_cutoff", 0),
    ("top_h", 1),
    ("sequence_bias", [[[5], -10]]),
    ("sequence_bias", [[[5], -10.0]]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model, Ember's, its greedy new ids) of a tiny random Llama; eos 2."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():  # spread logits: the knobs change the tokens
        torch.nn.init.normal_(p, std=0.5)
    folder = tmp_path_factory.mktemp("tiny_gen_llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(folder)
    plain = _hf(hf, folder, False)  # greedy, without a knob
    return folder, hf, load_hf_folder(folder, torch.float32, "cpu").eval(), plain


def _hf(hf, folder, sample: bool) -> list[int] | Exception:
    """transformers' new ids (seed 0 when sampling) with the folder's generation_config.json,
    or the exception it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hf.generation_config = transformers.GenerationConfig.from_pretrained(folder)
            torch.manual_seed(0)
            out = hf.generate(
                torch.tensor([PROMPT]), max_new_tokens=3, do_sample=sample, pad_token_id=0
            )
        except (ValueError, TypeError) as e:
            return e
    ids = out[0, len(PROMPT) :].tolist()
    return ids[: ids.index(EOS)] if EOS in ids else ids


def _cli(folder) -> list[str]:
    """``ember generate``'s arguments for two raw greedy tokens of "he" from ``folder``."""
    return ["generate", str(folder), "--raw", "--prompt", "he", "--device", "cpu",
            "--max-new-tokens", "2"]


def _ember(model, folder, sample: bool) -> list[int] | EmberError:
    model.hf_generation_config = json.loads((folder / "generation_config.json").read_text())
    try:
        knobs = knob_defaults(model, sampling=sample)
    except EmberError as e:
        return e
    key = (sample, json.dumps(knobs, sort_keys=True))
    if key not in _RUNS:  # (greedy decoding's knobs are often the same: kept, the test is slow)
        _RUNS[key] = generate_ids(
            model,
            [PROMPT],
            max_new_tokens=3,
            temperature=float(sample),
            seed=0 if sample else None,
            eos_token_ids=[EOS],
            **knobs,
        )[0]
    return _RUNS[key]


_RUNS: dict = {}


@pytest.mark.parametrize(("key", "value"), CASES)
def test_a_file_value_is_refused_where_transformers_refuses_it(tiny, key, value):
    folder, hf, ours, plain = tiny
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": EOS, key: value})
    )
    for sample in (False, True):
        want, got = _hf(hf, folder, sample), _ember(ours, folder, sample)
        if (key, value, sample) == ("top_k", "5", False):
            # transformers' TypeError comparing "5" > 1 (get_generation_mode's contrastive
            # search test); greedy decoding uses no top_k: Ember leaves it unused
            assert isinstance(want, TypeError) and got == plain
            continue
        if isinstance(want, Exception):
            assert isinstance(got, EmberError), (sample, want, got)
            msg = str(got)
            assert str(folder / "generation_config.json") in msg
            assert f"{key} = {value!r}" in msg and "must be" in msg
        else:
            assert got == want, (sample, want, got)


@pytest.mark.parametrize(
    "settings",
    [
        {"suppress_tokens": [5], "forced_eos_token_id": [5]},
        {"suppress_tokens": [5, 9], "forced_bos_token_id": 5},
        {"suppress_tokens": [5], "forced_eos_token_id": [5, 9]},
    ],
)
def test_a_forced_token_also_suppressed_is_refused_as_transformers(tiny, settings):
    """Forcing a token while suppressing it: transformers' validate() refuses it; Ember's greedy
    decoding chose id 0 at the forced step (every logit -inf) and sampling failed in
    multinomial. Forcing one of several tokens, the other not suppressed, is fine in both."""
    folder, hf, ours, _ = tiny
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": EOS, **settings})
    )
    for sample in (False, True):
        want = _hf(hf, folder, sample)
        if isinstance(want, Exception):
            with pytest.raises(EmberError, match="also in suppress_tokens"):
                _ember(ours, folder, sample)
            with pytest.raises(EmberError, match="also in suppress_tokens"):  # as keywords
                generate_ids(ours, [[1]], max_new_tokens=2, temperature=float(sample), **settings)
        else:
            assert _ember(ours, folder, sample) == want


def test_generate_and_the_cli_check_the_file_as_they_decode(tmp_path, capsys):
    """``generate()`` and ``ember generate`` read the file as above: its top_k of -1 is refused
    when sampling only (greedy decoding builds no warper); a valid top_k given overrides it."""
    from ember.engine.cli import main
    from ember.models.generate import generate
    from tests.models.test_generate_hf import _with_tokenizer

    tok, _, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "top_k": -1}))
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    generate(model, tok, "he", max_new_tokens=2)
    with pytest.raises(EmberError, match=r"generation_config\.json: top_k = -1 .* when sampling"):
        generate(model, tok, "he", max_new_tokens=2, temperature=1.0)
    generate(model, tok, "he", max_new_tokens=2, temperature=1.0, top_k=5)
    cli = [*_cli(tmp_path), "--temperature", "1"]
    assert main(cli) != 0
    assert "generation_config.json: top_k = -1 is invalid" in capsys.readouterr().err
    assert main([*cli, "--top-k", "5"]) == 0
    # eos_token_id: not a token id makes transformers' generate() fail (a TypeError making its
    # tensor; Ember ignored it); a negative one gets its warning ('eos_token_id should consist
    # of positive integers'; Ember said nothing)
    model.hf_generation_config = {**gen, "eos_token_id": "2"}
    with pytest.raises(EmberError, match=r"eos_token_id = '2' is invalid"):
        generate(model, tok, "he", max_new_tokens=2)
    model.hf_generation_config = {**gen, "eos_token_id": [-1, gen["eos_token_id"]]}
    with pytest.warns(UserWarning, match="holds a negative id"):
        generate(model, tok, "he", max_new_tokens=2)


def test_an_evaluation_refuses_a_file_value_before_training(tiny):
    """Generation metrics check the file's processors with the evaluation split, before
    training (``check_task_split``), not at the first evaluation after hours of steps."""
    from ember.engine.evaluation import generation_examples
    from ember.engine.packing import IGNORE, Example

    _, _, ours, _ = tiny
    ex = [Example([1, 5, 6, 7], [IGNORE, IGNORE, 6, 7], "t:0", 2, "x")]
    for bad, match in (
        ({"repetition_penalty": 0}, "repetition_penalty = 0 is invalid"),
        ({"suppress_tokens": [5], "forced_eos_token_id": 5}, "also in suppress"),
        # its stop ids as generate() checks them (the tokenizer's reading dropped a string)
        ({"eos_token_id": "2"}, "eos_token_id = '2' is invalid"),
    ):
        ours.hf_generation_config = {"eos_token_id": EOS, **bad}
        with pytest.raises(EmberError, match=match):
            generation_examples(ours, ex, 4, metric_names=["exact_match"])
    ours.hf_generation_config = {"eos_token_id": EOS, "repetition_penalty": 1.2}
    assert generation_examples(ours, ex, 4, metric_names=["exact_match"]) == ex


def test_a_numpy_temperature_samples_and_checks_the_file_s_warpers(tiny):
    """A numpy float temperature (as a sweep script passes it) is sampling: the file's warpers
    are checked as with a Python float (generate() decided 'greedy' for anything not an
    int | float, so a file's top_k -1 became 50 where the same float refused it). The check
    comes before any tokenizing."""
    import numpy as np

    from ember.models.generate import generate

    model = tiny[2]
    kept, model.hf_generation_config = getattr(model, "hf_generation_config", None), {"top_k": -1}
    try:
        for t in (0.7, np.float32(0.7)):
            with pytest.raises(EmberError, match="top_k = -1 is invalid"):
                generate(model, None, ["hi"], max_new_tokens=2, temperature=t)
    finally:
        model.hf_generation_config = kept


@pytest.mark.parametrize("eos", ["2", "abc", [-1, "eos"]])
def test_the_cli_checks_the_file_stop_ids_as_generate(tmp_path, capsys, monkeypatch, eos):
    """The stop ids of generation_config.json: ``ember generate`` read them through the
    tokenizer, unchecked: "2" stopped at id 2 (transformers' generate() fails: a TypeError
    making its tensor), "abc" was int()'s ValueError traceback from the tokenizer's load, -1
    was taken silently (transformers warns). Both paths now say what ``generate()`` says."""
    from ember.engine.cli import main
    from ember.models.generate import generate
    from ember.models.loading import load_pretrained
    from tests.models.test_generate_hf import _with_tokenizer

    tok, hf, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    eos = [-1, gen["eos_token_id"]] if isinstance(eos, list) else eos
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    model, ours = load_pretrained(tmp_path, "float32", "cpu")
    cli = _cli(tmp_path)
    if isinstance(eos, str):
        assert isinstance(_hf(hf, tmp_path, False), TypeError)  # the oracle
        with pytest.raises(EmberError, match=f"eos_token_id = '{eos}' is invalid"):
            generate(model, ours, "he", max_new_tokens=2)
        assert main(cli) != 0
        assert f"generation_config.json: eos_token_id = '{eos}' is invalid" in (
            capsys.readouterr().err
        )
    else:
        said = []  # the oracle: transformers' generate() logs its warning
        monkeypatch.setattr(transformers.generation.utils.logger, "warning", said.append)
        _hf(hf, tmp_path, False)
        assert any("should consist of positive integers" in m for m in said)
        with pytest.warns(UserWarning, match="holds a negative id"):
            want = generate(model, ours, "he", max_new_tokens=2)
        with pytest.warns(UserWarning, match="holds a negative id"):
            assert main(cli) == 0
        assert capsys.readouterr().out == want[0] + "\n"


@pytest.mark.parametrize("gen", [{"bos_token_id": None}, "{not json", "[2]"])
def test_stop_ids_come_from_config_json_only_without_a_usable_generation_config(tmp_path, gen):
    """transformers' generate() stops at generation_config.json's eos_token_id, config.json's
    only when the folder has no generation_config.json it can read. Ember's tokenizer took
    config.json's when the file set none (stopping where transformers goes on), refused to load
    a folder whose file is not JSON ('cannot read': transformers loads it) and failed with an
    AttributeError on one that is not an object; it now reads the file as the model does."""
    from ember.models.generate import stop_and_pad_ids
    from ember.models.loading import load_pretrained
    from tests.models.test_generate_hf import _with_tokenizer

    tok, hf, _ = _with_tokenizer(tmp_path, "<|im_end|>", "<|im_end|>")
    tok.save_pretrained(tmp_path)
    ids = tok.encode("he")
    plain = hf.generate(torch.tensor([ids]), max_new_tokens=6, pad_token_id=0)[0, len(ids) :]
    stop = int(plain[2])
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": stop}))
    (tmp_path / "generation_config.json").write_text(
        gen if isinstance(gen, str) else json.dumps(gen)
    )
    if gen != "[2]":  # (transformers fails on a file that is not an object: a TypeError)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        out = again.generate(torch.tensor([ids]), max_new_tokens=6, pad_token_id=0)[0].tolist()
        assert (len(out) - len(ids) == 3) == isinstance(gen, str)  # stops at config.json's
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model, ours = load_pretrained(tmp_path, "float32", "cpu")
    assert (stop in stop_and_pad_ids(model, ours)[0]) == isinstance(gen, str)
    if isinstance(gen, str):
        assert sum("generation_config.json" in str(w.message) for w in said) == 1
