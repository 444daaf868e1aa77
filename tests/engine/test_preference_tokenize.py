"""How each preference objective tokenizes a pair, against TRL 1.16's trainers (TRL is not
installed here: the few lines used are restated below, file and function named): "dpo" as
``trl/trainer/dpo_trainer.py`` ``DPOTrainer._prepare_dataset``, "orpo" and "simpo" as
``trl/experimental/orpo/orpo_trainer.py`` / ``trl/experimental/cpo/cpo_trainer.py``
``tokenize_row``, on the real SmolLM2 tokenizer and a Llama-3-style one."""

from __future__ import annotations

import json
from itertools import takewhile

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.engine.distributed import DistInfo
from ember.engine.objectives import make_objective
from tests.engine._tiny import tiny_config

transformers = pytest.importorskip("transformers")

U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris is the capital of France."}
A2 = {"role": "assistant", "content": "Rome, of course."}
ROWS = {
    "string": ({"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " five"},
               False),
    "string_merging": ({"prompt": "a\n\n\n", "chosen": "b  c", "rejected": "\nd"}, False),
    "string_chat": ({"prompt": U1["content"], "chosen": A1["content"],
                     "rejected": A2["content"]}, True),
    "explicit": ({"prompt": [U1], "chosen": [A1], "rejected": [A2]}, True),
    "implicit": ({"chosen": [U1, A1], "rejected": [U1, A2]}, True),
}
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")


@pytest.fixture(scope="module")
def smollm2():
    """(Ember's tokenizer, transformers' AutoTokenizer) of the real SmolLM2-135M-Instruct."""
    from ember.models.hub import resolve_model
    from ember.models.tokenizer import load_tokenizer

    try:
        path = resolve_model("smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001 (the bundled GGUF package is optional)
        pytest.skip(f"SmolLM2 is not available: {e}")
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def _llama3(path, eos: str):
    """(Ember's tokenizer, AutoTokenizer) of a small Llama-3-style folder: its BOS written by the
    template and prepended by the tokenizer, EOS the end of turn (3.1 Instruct) or not (3 base)."""
    from ember.models.tokenizer import load_tokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = [json.dumps([U1, A1, A2]), LLAMA3, "Question: 2+2?\nAnswer: 4 five a b c d"]
    backend.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token=eos,
        chat_template=LLAMA3, add_bos_token=True).save_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf("a")["input_ids"][0] == hf.bos_token_id  # prepends its BOS, as Llama 3's does
    return load_tokenizer(path), hf


@pytest.fixture(scope="module", params=["smollm2", "llama3.1", "llama3-base"])
def toks(request, tmp_path_factory):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    eos = "<|eot_id|>" if request.param == "llama3.1" else "<|end_of_text|>"
    return _llama3(tmp_path_factory.mktemp("llama3"), eos)


def _common_prefix(a: str, b: str) -> str:
    return "".join(x for x, _ in takewhile(lambda x: x[0] == x[1], zip(a, b, strict=False)))


def _trl_texts(hf, row: dict, chat: bool) -> tuple:
    """trl/data_utils.py ``maybe_extract_prompt`` then ``apply_chat_template`` (a string row
    under Ember's chat template as the conversational row it stands for)."""
    if not chat:
        return row["prompt"], row["chosen"], row["rejected"]
    if isinstance(row.get("chosen"), str):
        row = {"prompt": [{"role": "user", "content": row["prompt"]}],
               "chosen": [{"role": "assistant", "content": row["chosen"]}],
               "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    if "prompt" not in row:  # extract_prompt: the longest common run of messages
        n = next(i for i, (a, b) in enumerate(zip(row["chosen"], row["rejected"], strict=False))
                 if a != b)
        row = {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:],
               "rejected": row["rejected"][n:]}
    prompt = hf.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    whole = [hf.apply_chat_template(row["prompt"] + row[k], tokenize=False)
             for k in ("chosen", "rejected")]
    for w in whole:
        prompt = _common_prefix(prompt, w)
    return prompt, whole[0][len(prompt):], whole[1][len(prompt):]


def _trl_cpo_docs(hf, prompt: str, chosen: str, rejected: str) -> list:
    """(input_ids, labels) of chosen and rejected as ORPOTrainer / CPOTrainer.tokenize_row build
    them (build_tokenized_answer, add_bos_token_if_needed, add_eos_token_if_needed)."""
    prompt_ids = hf(prompt, add_special_tokens=False)["input_ids"]
    docs = []
    for answer in (chosen, rejected):
        full = hf(prompt + answer, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if prompt_ids != full[:start]:
            start -= 1
        p, a = full[:start], full[start:]
        if hf.bos_token_id is not None and (len(p) == 0 or hf.bos_token_id != p[0]):
            p = [hf.bos_token_id] + p
        if len(a) == 0 or hf.eos_token_id != a[-1]:
            a = a + [hf.eos_token_id]
        docs.append((p + a, [-100] * len(p) + a))
    return docs


def _trl_dpo_docs(hf, row: dict, chat: bool) -> list:
    """(input_ids, labels) as DPOTrainer._prepare_dataset's add_eos and tokenize_fn build them
    (the prompt the shorter of the two common prefixes)."""
    if chat:
        prompt, chosen, rejected = (row["prompt"], row["chosen"], row["rejected"])
        if isinstance(chosen, str):
            prompt = [{"role": "user", "content": prompt}]
            chosen, rejected = ([{"role": "assistant", "content": x}] for x in (chosen, rejected))
        elif not isinstance(prompt, list):
            raise AssertionError("implicit rows are not used here")

        def ids(msgs, gen=False):
            return hf.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                          add_generation_prompt=gen)["input_ids"]

        p, full = ids(prompt, True), [ids(prompt + chosen), ids(prompt + rejected)]
    else:
        eos = hf.eos_token
        answers = [x if x.endswith(eos) else x + eos for x in (row["chosen"], row["rejected"])]
        p = hf(text=row["prompt"])["input_ids"]
        full = [hf(text=row["prompt"] + a)["input_ids"] for a in answers]
    n = min(next((i for i, (a, b) in enumerate(zip(p, f, strict=False)) if a != b),
                 min(len(p), len(f))) for f in full)
    return [(f, [-100] * n + f[n:]) for f in full]


def _ember_docs(tmp_path, tok, row: dict, chat: bool, pairs: str) -> list:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error",
                                              use_chat_template=chat), tok, pairs=pairs)
    n = ex.parts[0]
    return [(ex.input_ids[:n], ex.labels[:n]), (ex.input_ids[n:], ex.labels[n:])]


def _targets(labels) -> list:
    return [t for t in labels if t not in (IGNORE, -100)]


@pytest.mark.parametrize("case", list(ROWS))
def test_orpo_and_simpo_pairs_are_tokenized_as_trls_cpo_trainer(tmp_path, toks, case):
    """TRL's ORPO and CPO (SimPO) tokenize a pair without special tokens, then put the BOS
    first and an EOS after each answer unless already there: SmolLM2's <|im_start|> before a
    plain prompt, its <|im_end|> after a ChatML answer's "<|im_end|>\\n", Llama 3 base's
    <|end_of_text|> after <|eot_id|>; each answer's labels start after its own prompt (was:
    DPO's rule for every objective, which adds none of these)."""
    ours, hf = toks
    row, chat = ROWS[case]
    want = _trl_cpo_docs(hf, *_trl_texts(hf, row, chat))
    got = _ember_docs(tmp_path, ours, row, chat, "cpo")
    for (ids, labels), (want_ids, want_labels) in zip(got, want, strict=True):
        assert ids == want_ids, (hf.decode(ids), hf.decode(want_ids))
        assert _targets(labels) == _targets(want_labels)
        assert len(labels) - len(_targets(labels)) == want_labels.count(-100)


@pytest.mark.parametrize("case", ["string", "string_merging", "string_chat", "explicit"])
def test_dpo_pairs_are_tokenized_as_trls_dpo_trainer(tmp_path, toks, case):
    """DPO keeps TRL 1.16's DPOTrainer rule: the tokenizer's own special tokens, an EOS text
    after string answers only, the shorter common prefix as both prompts."""
    ours, hf = toks
    row, chat = ROWS[case]
    want = _trl_dpo_docs(hf, row, chat)
    got = _ember_docs(tmp_path, ours, row, chat, "dpo")
    for (ids, labels), (want_ids, want_labels) in zip(got, want, strict=True):
        assert ids == want_ids, (hf.decode(ids), hf.decode(want_ids))
        assert _targets(labels) == _targets(want_labels)


@pytest.mark.parametrize("objective,rule", [("orpo", "cpo"), ("simpo", "cpo"), ("cpo", "cpo"),
                                            ("dpo", "dpo")])
def test_each_preference_objective_loads_pairs_with_its_trl_rule(tiny, tmp_path, smollm2,
                                                                  objective, rule):
    """The objective's own load_datasets picks the rule (what training and ember eval read)."""
    ours, _ = smollm2
    row, chat = ROWS["explicit"]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    obj = make_objective(tiny_config(tiny, tmp_path / "run", f'objective="{objective}"'),
                         DistInfo())
    ds = obj.load_datasets(DataConfig(train=str(path), bad_lines="error"), ours)
    (ex,) = ds.train
    n = ex.parts[0]
    want = _ember_docs(tmp_path, ours, row, chat, rule)
    assert (ex.input_ids[:n], ex.labels[:n]) == tuple(want[0])
    assert (ex.input_ids[n:], ex.labels[n:]) == tuple(want[1])


KTO_ROWS = {
    "string": ({"prompt": "Question: 2+2?\nAnswer:", "completion": " 4", "label": True}, False),
    "string_merging": ({"prompt": "a\n\n\n", "completion": "b  c", "label": False}, False),
    "chat": ({"prompt": [U1], "completion": [A1], "label": True}, True),
}


@pytest.mark.parametrize("case", list(KTO_ROWS))
def test_kto_lines_are_tokenized_as_trls_kto_trainer(tmp_path, toks, case):
    """KTOTrainer._prepare_dataset (trl/trainer/kto_trainer.py): an EOS text after a string
    completion, the tokenizer's own special tokens, the completion from common_prefix_length."""
    from ember.engine.kto import load_kto_examples

    ours, hf = toks
    row, chat = KTO_ROWS[case]
    if chat:
        def ids(msgs, gen=False):
            return hf.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                          add_generation_prompt=gen)["input_ids"]

        p, full = ids(row["prompt"], True), ids(row["prompt"] + row["completion"])
    else:
        eos = hf.eos_token
        completion = row["completion"] + ("" if row["completion"].endswith(eos) else eos)
        p, full = hf(text=row["prompt"])["input_ids"], hf(text=row["prompt"] + completion)[
            "input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b),
             min(len(p), len(full)))
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,), _ = load_kto_examples(path, DataConfig(train=str(path), bad_lines="error",
                                                  use_chat_template=chat), ours)
    assert ex.input_ids == full, (hf.decode(ex.input_ids), hf.decode(full))
    assert _targets(ex.labels) == full[max(n, 1):]


def test_kto_pair_lines_unpair_as_trl(tmp_path, toks):
    """A preference line under KTO: TRL unpairs it (unpair_preference_dataset) and tokenizes each
    answer alone, its own common prefix with the prompt (not DPO's shorter of the two)."""
    from ember.engine.kto import load_kto_examples

    ours, hf = toks
    row = ROWS["string_merging"][0]
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(row) + "\n")
    got, _ = load_kto_examples(path, DataConfig(train=str(path), bad_lines="error",
                                                use_chat_template=False), ours)
    p = hf(text=row["prompt"])["input_ids"]
    for ex, key in zip(got, ("chosen", "rejected"), strict=True):
        full = hf(text=row["prompt"] + row[key] + hf.eos_token)["input_ids"]
        n = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b),
                 min(len(p), len(full)))
        assert ex.input_ids == full
        assert _targets(ex.labels) == full[max(n, 1):]


def test_orpo_and_simpo_pass_a_chat_pairs_tools_to_the_template(tmp_path):
    """Ember's rule where it differs from TRL: ORPO / SimPO render a chat pair with its "tools"
    (TRL's experimental ORPO / CPO trainers call maybe_apply_chat_template without them); the
    rest is tokenize_row's rule."""
    from tests.engine.test_trl_formats import CHATML_TOOLS, TOOLS

    ours, hf = _llama3(tmp_path / "tok", "<|eot_id|>")
    hf.chat_template = ours.chat_template = CHATML_TOOLS
    row = {"prompt": [U1], "chosen": [A1], "rejected": [A2], "tools": TOOLS}
    prompt = hf.apply_chat_template([U1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    whole = [hf.apply_chat_template([U1, a], tools=TOOLS, tokenize=False) for a in (A1, A2)]
    assert all(w.startswith(prompt) for w in whole) and '"capital"' in prompt
    want = _trl_cpo_docs(hf, prompt, *(w[len(prompt):] for w in whole))
    got = _ember_docs(tmp_path, ours, row, True, "cpo")
    assert [d[0] for d in got] == [d[0] for d in want]
    assert [_targets(d[1]) for d in got] == [_targets(d[1]) for d in want]
