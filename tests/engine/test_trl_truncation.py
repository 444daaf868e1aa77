"""Over-long lines against TRL 1.16's truncation (TRL is not installed here: its few lines are
restated below, as in test_chat_parity.py): DPO's ``tokenize_fn`` + ``add_eos`` + collator cut
(``truncation_mode="keep_start"``, the prompt-fills-``max_length`` filter) is Ember's
``truncate_right``; Ember's ``truncate_left`` keeps a pair's prompt the same in both halves."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples

transformers = pytest.importorskip("transformers")

WORDS = ("The quick brown fox jumps over the lazy dog while seven tired wizards quietly "
         "count their golden coins beside an old river").split()


@pytest.fixture(scope="module")
def hf():
    """A transformers tokenizer (byte-level BPE) that adds BOS, as Llama's does."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(WORDS)] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                eos_token="</s>")


def _text(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def _trl_dpo(tok, row, max_length):
    """TRL 1.16 DPOTrainer on one string pair: (chosen, rejected) as (input_ids, completion
    tokens) after ``DataCollatorForPreference``'s keep_start cut, or None when the trainer's
    filter drops the pair (its prompt alone fills ``max_length``)."""
    eos = tok.eos_token
    row = {**row, **{k: row[k] if row[k].endswith(eos) else row[k] + eos
                     for k in ("chosen", "rejected")}}  # add_eos
    prompt_ids = tok(row["prompt"])["input_ids"]
    full = [tok(row["prompt"] + row[k])["input_ids"] for k in ("chosen", "rejected")]

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)))

    prompt_len = min(common(prompt_ids, f) for f in full)
    if len(prompt_ids[:prompt_len]) >= max_length:  # the keep_start filter
        return None
    out = []
    for f in full:
        ids = (prompt_ids[:prompt_len] + f[prompt_len:])[:max_length]
        mask = ([0] * prompt_len + [1] * (len(f) - prompt_len))[:max_length]
        out.append((ids, [t for t, m in zip(ids, mask, strict=True) if m]))
    return out


def _ember(tmp_path, tok, rows, **kw):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw.setdefault("tokens_per_batch", 4 * kw["max_seq_len"])
    kw.setdefault("use_chat_template", False)
    return load_examples(path, DataConfig(**kw), tok)


def _halves(ex):
    n = ex.parts[0]
    docs = (ex.input_ids[:n], ex.labels[:n]), (ex.input_ids[n:], ex.labels[n:])
    return [(ids, [t for t in labels if t != IGNORE]) for ids, labels in docs]


ROWS = [{"prompt": _text(14) + " ", "chosen": _text(3, 5), "rejected": _text(9, 20)},
        {"prompt": _text(6, 3) + " ", "chosen": _text(12, 1), "rejected": _text(2, 9)},
        {"prompt": _text(30, 2) + " ", "chosen": _text(2), "rejected": _text(3, 7)}]


@pytest.mark.parametrize("max_len", [20, 40, 60])
def test_truncate_right_is_trl_dpo_keep_start(tmp_path, hf, max_len):
    """Every kept pair's two sequences and trained tokens are TRL's; the pairs TRL's filter
    drops (prompt >= max_length) are dropped and counted."""
    want = [w for r in ROWS if (w := _trl_dpo(hf, r, max_len)) is not None]
    assert want, "the case must keep some pair"
    ex, rep = _ember(tmp_path, hf, ROWS, max_seq_len=max_len, truncation="truncate_right")
    assert [_halves(e) for e in ex] == want
    assert rep.dropped_too_long == len(ROWS) - len(want)
    # the report counts lines: the kept pairs that TRL cuts (one half or both), each once
    cut = sum(any(len(f) > max_len for f, _ in _trl_dpo(hf, r, 10_000)) for r in ROWS
              if _trl_dpo(hf, r, max_len) is not None)
    assert rep.truncated == cut and f"{cut} truncated" in rep.summary()


def test_truncate_left_cuts_one_prompt_from_both_halves(tmp_path, hf):
    """A pair whose longer half is over the limit: the same prompt tokens (after BOS) go from
    both halves, so chosen and rejected answer one prompt; the answers are TRL's tokens whole."""
    m = 50
    for row in ROWS[:2]:
        (c_ids, c_ans), (r_ids, r_ans) = _trl_dpo(hf, row, 10_000)
        assert max(len(c_ids), len(r_ids)) > m >= min(len(c_ids), len(r_ids)) - 2
        cut = max(len(c_ids), len(r_ids)) - m
        (ex,), rep = _ember(tmp_path, hf, [row], max_seq_len=m, truncation="truncate_left")
        (ec, ec_ans), (er, er_ans) = _halves(ex)
        assert (ec_ans, er_ans) == (c_ans, r_ans)
        assert ec == c_ids[:1] + c_ids[1 + cut:] and er == r_ids[:1] + r_ids[1 + cut:]
        assert ec[:len(ec) - len(c_ans)] == er[:len(er) - len(r_ans)]  # one prompt
        assert max(len(ec), len(er)) == m and rep.truncated >= 1


def test_truncate_left_answer_longer_than_the_limit(tmp_path, hf):
    """An answer that alone is over the limit: the whole prompt goes from both halves (no
    prompt is kept in either) and that answer loses its beginning."""
    row = {"prompt": _text(4) + " ", "chosen": _text(30, 3), "rejected": _text(3, 11)}
    (c_ids, c_ans), (r_ids, r_ans) = _trl_dpo(hf, row, 10_000)
    m = 24
    (ex,), _ = _ember(tmp_path, hf, [row], max_seq_len=m, truncation="truncate_left")
    (ec, _), (er, er_ans) = _halves(ex)
    assert ec == c_ids[:1] + c_ids[-(m - 1):]
    assert er == r_ids[:1] + r_ans and er_ans == r_ans


def _trl_sft(tok, row, max_length):
    """TRL 1.16 SFTTrainer on one non-conversational line (``completion_only_loss`` on for
    prompt-completion): (input_ids, trained tokens) after its keep_start cut, or None when its
    fully-masked filter drops it. Its labels are unshifted: position 0's never counts."""
    eos = tok.eos_token
    if "text" in row:
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = tok(text)["input_ids"]
        mask = [1] * len(ids)
    else:
        completion = row["completion"] if row["completion"].endswith(eos) else (
            row["completion"] + eos)
        prompt_ids = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + completion)["input_ids"]
        n = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                 min(len(prompt_ids), len(ids)))
        mask = [0] * n + [1] * (len(ids) - n)
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return ids, [t for t, m in zip(ids[1:], mask[1:], strict=True) if m]


SFT_ROWS = [{"prompt": _text(10) + " ", "completion": _text(6, 4)},
            {"prompt": _text(3, 7) + " ", "completion": _text(2, 1)},
            {"prompt": _text(25, 2) + " ", "completion": _text(4, 9)}]


@pytest.mark.parametrize("max_len", [12, 33, 40])
def test_sft_truncate_right_is_trl_keep_start(tmp_path, hf, max_len):
    """Plain text and prompt-completion lines: EOS appended before the cut, the kept tokens and
    the trained ones are TRL's; a line whose completion is cut away is dropped and counted."""
    text_rows = [{"text": _text(20, 3)}, {"text": _text(3)}]
    for rows in (text_rows, SFT_ROWS):
        want = [w for r in rows if (w := _trl_sft(hf, r, max_len)) is not None]
        ex, rep = _ember(tmp_path, hf, rows, max_seq_len=max_len, truncation="truncate_right")
        assert [(e.input_ids, [t for t in e.labels if t != IGNORE]) for e in ex] == want
        assert rep.dropped_too_long == len(rows) - len(want)


# ChatML marking what an assistant turn says ({% generation %}: its content and <|im_end|>)
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
              "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml(hf):
    """The fixture's vocabulary with ChatML specials and template, adding no BOS, its bos_token
    <|im_start|> (as SmolLM2's)."""
    backend = Backend.from_str(hf.backend_tokenizer.to_str())  # the fixture's, left alone
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.post_processor = None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        chat_template=CHATML_GEN)


def test_truncate_left_keeps_only_a_bos_the_tokenizer_adds(tmp_path, chatml):
    """SmolLM2's bos_token is <|im_start|>, which opens every chat render but which its tokenizer
    never prepends: truncate_left keeps the end exactly as TRL's keep_end (no stray first
    <|im_start|> before the cut); the trained tokens are TRL's assistant mask, cut alike."""
    msgs = [{"role": "user", "content": _text(20)}, {"role": "assistant", "content": _text(3)}]
    got = chatml.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    m = 24
    ids, mask = got["input_ids"][-m:], got["assistant_masks"][-m:]
    assert ids[0] != chatml.bos_token_id and len(got["input_ids"]) > m
    (ex,), rep = _ember(tmp_path, chatml, [{"messages": msgs}], max_seq_len=m,
                        truncation="truncate_left", use_chat_template=True)
    assert ex.input_ids == ids and rep.truncated == 1
    assert [t for t in ex.labels if t != IGNORE] == [t for t, k in zip(ids[1:], mask[1:],
                                                                       strict=True) if k]


@pytest.mark.parametrize("max_len", [20, 40])
def test_kto_truncate_right_is_trl_kto(tmp_path, hf, max_len):
    """KTO lines (TRL 1.16's KTOTrainer: completion + EOS, prompt by common prefix, cut at
    max_length from the right, a prompt filling max_length dropped) - the same tokens."""
    from ember.engine.kto import load_kto_examples

    rows = [{**r, "label": k % 2 == 0} for k, r in enumerate(SFT_ROWS)]
    want = [w for r in rows if (w := _trl_sft(hf, r, max_len)) is not None]
    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex, rep = load_kto_examples(path, DataConfig(max_seq_len=max_len, tokens_per_batch=4 * max_len,
                                                 truncation="truncate_right",
                                                 use_chat_template=False), hf)
    assert [(e.input_ids, [t for t in e.labels if t != IGNORE]) for e in ex] == want
    assert rep.dropped_too_long == len(rows) - len(want) and want


def _trl_bfd_fills(lengths: list[int], seq_length: int) -> list[int]:
    """TRL 1.16's ``_pack_bfd`` binning restated (its segment tree is a search for the smallest
    free space that fits; bins with that space are taken first in, first out): bin fills."""
    from collections import defaultdict, deque

    space_to_bin, bins = defaultdict(deque), []
    for length in sorted(lengths, reverse=True):
        fits = [s for s, q in space_to_bin.items() if q and s >= length]
        if fits:
            b = space_to_bin[min(fits)].popleft()
        else:
            b = {"length": 0}
            bins.append(b)
        b["length"] += length
        if seq_length - b["length"] > 0:
            space_to_bin[seq_length - b["length"]].append(b)
    return sorted(b["length"] for b in bins)


def test_best_fit_packing_fills_bins_as_trl_bfd():
    """data.packing = "best_fit" bins documents as TRL's packing_strategy "bfd" with max_length
    = tokens_per_batch (documents already cut at max_seq_len, so "bfd"'s own cut never acts):
    the same number of bins, equally full."""
    import random

    from ember.engine.packing import _best_fit

    rng = random.Random(0)
    for cap in (16, 37, 100):
        lengths = [rng.randint(1, cap) for _ in range(60)]
        order = list(range(len(lengths)))
        rng.shuffle(order)
        bins = _best_fit(order, lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert sorted(sum(lengths[i] for i in b) for b in bins) == _trl_bfd_fills(lengths, cap)


@pytest.mark.parametrize("max_len", [40, 60, 90])
def test_chat_pairs_truncate_right_is_trl_dpo_keep_start(tmp_path, chatml, max_len):
    """Chat pairs: TRL's completion is the render less the generation prompt's tokens (the
    template's "<|im_end|>\n" included), cut with the prompt at max_length; pairs whose prompt
    fills it are dropped."""
    rows, want = [], []
    for k, n in enumerate((6, 12, 16)):
        prompt = [{"role": "user", "content": _text(n, k)}]
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": _text(4, 3)}],
               "rejected": [{"role": "assistant", "content": _text(9, 11)}]}
        rows.append(row)
        prompt_ids = chatml.apply_chat_template(prompt, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        if len(prompt_ids) >= max_len:
            continue
        pair = []
        for key in ("chosen", "rejected"):
            full = chatml.apply_chat_template(prompt + row[key], tokenize=True,
                                              return_dict=True)["input_ids"]
            assert full[:len(prompt_ids)] == prompt_ids
            pair.append((full[:max_len], full[len(prompt_ids):max_len]))
        want.append(pair)
    assert want
    ex, rep = _ember(tmp_path, chatml, rows, max_seq_len=max_len, truncation="truncate_right",
                     use_chat_template=True)
    assert [_halves(e) for e in ex] == want
    assert rep.dropped_too_long == len(rows) - len(want)


def test_chat_pairs_truncate_left_keep_one_prompt(tmp_path, chatml):
    """A chat pair over the limit (no BOS to keep): both renders lose the same first tokens,
    as many as the longer needs; the answers are TRL's completion tokens whole."""
    prompt = [{"role": "user", "content": _text(12)}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": _text(2, 3)}],
           "rejected": [{"role": "assistant", "content": _text(9, 11)}]}
    n = len(chatml.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])
    full = [chatml.apply_chat_template(prompt + row[k], tokenize=True, return_dict=True)[
        "input_ids"] for k in ("chosen", "rejected")]
    m = max(map(len, full)) - n // 2
    (ex,), _ = _ember(tmp_path, chatml, [row], max_seq_len=m, truncation="truncate_left",
                      use_chat_template=True)
    cut = max(map(len, full)) - m
    assert _halves(ex) == [(f[cut:], f[n:]) for f in full]


def test_trl_mode_names_get_ember_names():
    """TRL 1.16's truncation_mode and packing_strategy values (the choices SFTConfig and
    DPOConfig list) are refused with Ember's name for each, or why it has none."""
    for key, value, ours in (("truncation", "keep_start", "truncate_right"),
                             ("truncation", "keep_end", "truncate_left"),
                             ("packing", "bfd", "best_fit"), ("packing", "bfd_split", "best_fit"),
                             ("packing", "wrapped", "greedy")):
        with pytest.raises(EmberError, match=rf"data\.{key} = '{value}' is TRL's name.*{ours}"):
            DataConfig(**{key: value})


@pytest.mark.parametrize("max_len", [30, 70, 110])
def test_chat_sft_truncate_right_is_trl_assistant_masks(tmp_path, chatml, max_len):
    """Conversations (TRL's assistant_only_loss with a {% generation %} template, keep_start):
    the kept tokens and the trained ones are TRL's assistant mask cut at max_length; a
    conversation cut before its first answer is dropped (TRL's fully-masked filter)."""
    rows = [{"messages": [{"role": "user", "content": _text(n)},
                          {"role": "assistant", "content": _text(5, 4)},
                          {"role": "user", "content": _text(3, 9)},
                          {"role": "assistant", "content": _text(8, 13)}]} for n in (4, 30)]
    want = []
    for row in rows:
        got = chatml.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, mask = got["input_ids"][:max_len], got["assistant_masks"][:max_len]
        if any(mask):
            want.append((ids, [t for t, k in zip(ids[1:], mask[1:], strict=True) if k]))
    assert want
    ex, rep = _ember(tmp_path, chatml, rows, max_seq_len=max_len, truncation="truncate_right",
                     use_chat_template=True)
    assert [(e.input_ids, [t for t in e.labels if t != IGNORE]) for e in ex] == want
    assert rep.dropped_too_long == len(rows) - len(want)


def _template_bos(hf):
    """The fixture's vocabulary, adding no BOS, with a template that writes one."""
    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.add_special_tokens(["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"])
    backend.post_processor = None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
        chat_template="{{ bos_token }}" + CHATML_GEN)


def test_truncate_left_keeps_a_bos_the_template_writes_once(tmp_path, hf):
    """A template that writes the BOS itself (Llama 3.1's ``{{ bos_token }}``) for a tokenizer
    that does not prepend one: truncate_left keeps that BOS and the end of transformers' render."""
    tok = _template_bos(hf)
    msgs = [{"role": "user", "content": _text(20)}, {"role": "assistant", "content": _text(3)}]
    got = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    full, mask, m = got["input_ids"], got["assistant_masks"], 24
    assert full[0] == tok.bos_token_id and tok(_text(2))["input_ids"][0] != tok.bos_token_id
    (ex,), _ = _ember(tmp_path, tok, [{"messages": msgs}], max_seq_len=m,
                      truncation="truncate_left", use_chat_template=True)
    assert ex.input_ids == full[:1] + full[-(m - 1):]
    assert [t for t in ex.labels if t != IGNORE] == [
        t for t, k in zip(full[-(m - 1):], mask[-(m - 1):], strict=True) if k]


def test_classification_truncate_left_keeps_bos_as_sft(tmp_path, chatml, hf):
    """The classification reader cuts as the SFT one: a SmolLM2-style conversation keeps the end
    of transformers' render (no stray first <|im_start|>), a template-written BOS is kept."""
    from ember.engine.classification import load_labelled

    msgs = [{"role": "user", "content": _text(20)}, {"role": "assistant", "content": _text(3)}]
    path, m = tmp_path / "c.jsonl", 24
    path.write_text(json.dumps({"messages": msgs, "label": "a"}) + "\n")
    for tok, bos in ((chatml, 0), (_template_bos(hf), 1)):
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        (ex,), rep = load_labelled(path, DataConfig(max_seq_len=m, tokens_per_batch=4 * m),
                                   tok, ["a", "b"])
        assert ex.input_ids == full[:bos] + full[len(full) - m + bos:] and rep.truncated == 1


def test_choice_questions_keep_a_template_written_bos(tmp_path, hf):
    """A multiple-choice question cut from the left keeps the BOS its chat template writes (the
    tokenizer prepends none), then the end of the context and the whole choice."""
    from ember.engine.choices import load_choices

    tok, m = _template_bos(hf), 24
    row = {"question": _text(20), "choices": [_text(2, 3), _text(3, 7)], "answer": 0}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,), _, rep = load_choices(path, DataConfig(max_seq_len=m, tokens_per_batch=4 * m), tok)
    assert rep.truncated == 1
    at = 0
    for choice, n in zip(row["choices"], ex.parts, strict=True):
        msgs = [{"role": "user", "content": row["question"]},
                {"role": "assistant", "content": choice}]
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        doc = ex.input_ids[at:at + n]
        assert doc[0] == tok.bos_token_id and len(doc) == m
        rest = doc[1:]  # the context's end and the choice: a run of transformers' render
        assert any(full[i:i + len(rest)] == rest for i in range(1, len(full)))
        at += n
