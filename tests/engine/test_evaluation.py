"""Evaluation by generation: the reference-drafted fast path scores exactly what plain greedy
generation scores, whether the model agrees with the references or not."""

from __future__ import annotations

import re

import pytest
import torch

from ember.engine import metrics as M
from ember.engine.evaluation import generation_eval
from ember.engine.packing import IGNORE, Example
from ember.models.config import ModelConfig
from ember.models.generate import generate_ids
from ember.models.tokenizer import stop_token_ids, tokenizer_from_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import tiny_tokenizer_md


def test_generation_eval_equals_plain_greedy_generation():
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    vocab = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])
    cfg = ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=96)
    model = Transformer(cfg).init_weights(std=0.5, seed=int(torch.randint(0, 2**30, ())))
    eos = sorted(tok.eos_token_ids)
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (5, 2, 8, 3, 6, 4)]
    free = generate_ids(model, prompts, max_new_tokens=10, eos_token_ids=eos)
    texts = [tok.decode(f, skip_special_tokens=True) for f in free]
    # rows 0-2: the reference is what the model says; rows 3-5: the model's first two tokens,
    # then others (the draft is accepted, then rejected in the middle)
    answers = [f + eos[:1] for f in free[:3]] + [
        f[:2] + [(f[2] + 1) % vocab if len(f) > 2 else 5, 6] + eos[:1] for f in free[3:]]
    examples = [Example(p + a, [IGNORE] * (len(p) - 1) + a + [IGNORE], f"t:{i}", len(p),
                        tok.decode(a, skip_special_tokens=True))
                for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    for metrics in (["exact_match"], ["exact_match", "f1"]):
        res = generation_eval(model, tok, examples, metrics, max_new_tokens=10, batch_size=4,
                              show=6)
        refs = [e.reference for e in examples]
        preds = [s[1] for s in res.samples]
        want = M.compute(metrics, texts, refs)
        if metrics == ["exact_match"]:  # rows that left their reference stop early
            assert [p for p in preds[:3]] == texts[:3]
            assert all(texts[i].startswith(preds[i]) for i in range(3, 6))
        else:
            assert preds == texts
        assert res.scores == want
        assert res.scores["exact_match"] == (
            sum(M.normalize(t) == M.normalize(r) for t, r in zip(texts, refs, strict=True)) / 6)


def test_json_metrics_tell_booleans_from_numbers():
    """A JSON true is not the number 1, nor false 0 (Python's True == 1 made these match); 1 and
    1.0 are the same JSON number."""
    refs = ['{"urgent": true, "n": 1}', '{"ok": false, "xs": [1, 2]}', '[true, 0]']
    assert M.compute(["json_match"], ['{"urgent": 1, "n": 1}', '{"ok": 0.0, "xs": [1, 2]}',
                                      '[1, false]'], refs) == {"json_match": 0.0}
    assert M.compute(["json_match"], ['{"n": 1.0, "urgent": true}', '{"xs": [1, 2], "ok": false}',
                                      '[true, 0.0]'], refs) == {"json_match": 1.0}
    preds = ['{"urgent": 1, "n": 1}', '{"ok": false, "xs": [1, true]}', '[true, 0]']
    scores = M.compute(["field_accuracy"], preds, refs[:2] + ['{"a": true}'])
    assert scores == {"field_accuracy": (0.5 + 0.5 + 0.0) / 3}


def test_generation_eval_takes_a_transformers_tokenizer():
    """transformers 5's tokenizers answer ``eos_token_ids`` with one int (Ember's with a set):
    the same predictions and scores either way (it was a TypeError from ``sorted``)."""
    transformers = pytest.importorskip("transformers")
    ours = tokenizer_from_gguf(tiny_tokenizer_md())
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend,
                                              eos_token=ours.eos_token)
    assert isinstance(hf.eos_token_ids, int)
    assert stop_token_ids(hf) == stop_token_ids(ours) == sorted(ours.eos_token_ids)
    vocab = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])
    cfg = ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=96)
    model = Transformer(cfg).init_weights(std=0.5, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 2, 7)]
    examples = [Example(p + [7, 2], [IGNORE] * (len(p) - 1) + [7, 2, IGNORE], f"t:{i}", len(p),
                        ours.decode([7], skip_special_tokens=True))
                for i, p in enumerate(prompts)]
    got = [generation_eval(model, t, examples, ["exact_match", "f1"], max_new_tokens=6,
                           show=3)
           for t in (ours, hf)]
    assert got[0].scores == got[1].scores
    assert len(got[0].samples) == 3
    assert [s[1] for s in got[0].samples] == [s[1] for s in got[1].samples]
    # no eos at all: generation runs max_new_tokens (was an IndexError picking the pad id)
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend)
    assert stop_token_ids(bare) == []
    generation_eval(model, bare, examples, ["exact_match"], max_new_tokens=3)


def _tiny_hf_llama(vocab: int, seed: int, eos: int | None):
    """A tiny transformers Llama with spread logits (no near-ties between greedy choices)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=eos, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return hf


def test_generation_eval_predicts_what_transformers_generates_and_refuses_bad_sizes(tmp_path):
    """The predictions are transformers' greedy completions (prompt removed, stop at eos, the
    eos not in the text), batches of 2 that do not divide 5 examples, the first
    ``max_examples`` of them; ``max_examples`` or ``batch_size`` < 1 is an EmberError (``ember
    eval --max-examples 0`` was a ValueError from max() of nothing, ``--batch-size 0`` one from
    range()), and so is ``max_new_tokens`` < 1 (every prediction empty, scored 0)."""
    import warnings

    from ember import EmberError
    from ember.models.loading import load_hf_folder

    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    vocab = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])
    eos = tok.eos_token_id
    hf = _tiny_hf_llama(vocab, 5, eos)
    with torch.no_grad():
        hf.lm_head.weight[eos] *= 1.5  # some rows end at eos
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 2, 7, 3, 4)]
    want = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                          max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        want.append(tok.decode(out[0, len(p):].tolist(), skip_special_tokens=True))
    assert any(w == "" or len(w) < 8 for w in want)
    refs = [w if i % 2 else "not it" for i, w in enumerate(want)]
    examples = [Example(p + [7, eos], [IGNORE] * (len(p) - 1) + [7, eos, IGNORE], f"t:{i}",
                        len(p), r) for i, (p, r) in enumerate(zip(prompts, refs, strict=True))]
    res = generation_eval(model, tok, examples, ["exact_match", "f1"], max_new_tokens=8,
                          batch_size=2, show=5)
    assert [s[1] for s in res.samples] == want
    assert res.scores["exact_match"] == sum(M.normalize(w) == M.normalize(r)
                                            for w, r in zip(want, refs, strict=True)) / 5
    res = generation_eval(model, tok, examples, ["f1"], max_new_tokens=8, max_examples=3,
                          show=5)
    assert res.examples == 3 and [s[1] for s in res.samples] == want[:3]
    for kw, msg in ((dict(max_examples=0), "max_examples must be >= 1"),
                    (dict(batch_size=0), "batch size must be >= 1"),
                    (dict(max_new_tokens=0), "max_new_tokens >= 1")):
        with pytest.raises(EmberError, match=msg):
            generation_eval(model, tok, examples, ["exact_match"], **{"max_new_tokens": 8, **kw})


def test_generation_eval_of_a_dynamic_ntk_model_runs_past_the_context(tmp_path):
    """Dynamic NTK RoPE generates past max_position_embeddings (generate_ids allows it, as
    transformers does); generation metrics refused such prompts ('exceeds the model's
    context'). The predictions are transformers' greedy completions (prompt 10-12 + 14 new
    tokens, context 16)."""
    import warnings

    from ember.models.loading import load_hf_folder

    pytest.importorskip("transformers")
    from tests.models.test_generate_hf import dynamic_ntk_llama

    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    hf = dynamic_ntk_llama(len(tiny_tokenizer_md()["tokenizer.ggml.tokens"]))
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (10, 12)]
    want = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                              max_new_tokens=14, do_sample=False, pad_token_id=0)
            want.append(tok.decode(out[0, len(p):].tolist(), skip_special_tokens=True))
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    examples = [Example(p + [7], [IGNORE] * (len(p) - 1) + [7, IGNORE], f"t:{i}", len(p), w)
                for i, (p, w) in enumerate(zip(prompts, want, strict=True))]
    res = generation_eval(model, tok, examples, ["exact_match", "f1"], max_new_tokens=14,
                          show=2)
    assert [s[1] for s in res.samples] == want and res.scores["exact_match"] == 1.0


def test_ember_eval_of_a_classifier_scores_the_first_examples_as_transformers(tmp_path, capsys):
    """``ember eval`` of a transformers sequence classifier: accuracy and mean cross-entropy of
    the first ``--max-examples`` lines are transformers' (its logits on each text); a negative
    ``--max-examples`` is refused (``examples[:-1]`` silently dropped the last line)."""
    import json
    import warnings

    from ember.engine.cli import main
    from ember.models.tokenizer import Tokenizer
    from tests.engine.test_formats import chat_backend

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(chat_backend(), eos_token="<|im_end|>", pad_token="<pad>")
    labels = ["neg", "pos", "neu"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                   id2label=dict(enumerate(labels)),
                                   label2id={name: i for i, name in enumerate(labels)})
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    texts = ["red dog", "a blue cat", "the cat sat on a mat", "dog", "green red blue"]
    gold = ["pos", "neg", "neu", "pos", "neg"]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": g}) + "\n"
                            for t, g in zip(texts, gold, strict=True)))
    hits, losses = [], []
    for t, g in zip(texts[:3], gold, strict=False):
        with torch.no_grad():
            logits = hf(torch.tensor([tok.encode(t, add_special_tokens=True)])).logits[0]
        hits.append(labels[int(logits.argmax())] == g)
        losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(
            labels.index(g)))))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--data", str(data), "--max-examples", "3",
                 "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["examples"] == 3 and got["accuracy"] == sum(hits) / 3
    assert got["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert main(["eval", str(tmp_path / "m"), "--data", str(data), "--max-examples", "-1"]) == 2
    assert "--max-examples must be >= 1, got -1" in capsys.readouterr().err
    # "accuracy, macro_f1" (a space after the comma) was "--metrics [' macro_f1'] do not apply
    # to a classifier"; macro F1 is sklearn's of transformers' argmax labels
    from tests.engine.test_metrics import sklearn_macro_f1

    assert main(["eval", str(tmp_path / "m"), "--data", str(data), "--max-examples", "3",
                 "--device", "cpu", "--metrics", "accuracy, macro_f1"]) == 0
    got = json.loads(capsys.readouterr().out)
    preds = []
    for t in texts[:3]:
        with torch.no_grad():
            logits = hf(torch.tensor([tok.encode(t, add_special_tokens=True)])).logits[0]
        preds.append(labels[int(logits.argmax())])
    assert got["accuracy"] == sum(hits) / 3
    assert got["macro_f1"] == pytest.approx(sklearn_macro_f1(gold[:3], preds), abs=1e-12)


@pytest.mark.parametrize(("metric", "completion", "why"), [
    ("json_match", " red", "json_match needs JSON references, this one is not JSON: ' red'"),
    ("field_accuracy", " [1, 2]", "field_accuracy scores the fields of JSON object references, "
                                  "this one is not a JSON object"),
    ("field_accuracy", " {}", "field_accuracy scores the fields of JSON object references, "
                              "this one is an empty JSON object")])
def test_references_a_metric_cannot_score_are_refused_before_training(tiny, tmp_path, metric,
                                                                      completion, why):
    """json_match of a reference that is not JSON (field_accuracy: not a JSON object with
    fields) raised only when the predictions were scored: after the whole run with
    eval.before = false (its checkpoint and export lost), after the loss pass and generation
    in ember eval, and without the line. Now refused before the first step, naming the line;
    an empty object was called "not a JSON object"."""
    from ember import EmberError
    from ember.engine.trainer import train
    from tests.engine._tiny import quiet, tiny_config, write_jsonl

    rows = [{"prompt": "say red ->", "completion": ' {"a": 1}'}] * 2 + [
        {"prompt": "say blue ->", "completion": completion}]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = tiny_config(tiny, tmp_path / "r", "max_steps=2", "eval.before=false",
                      f"eval.metrics=['exact_match', '{metric}']", f'data.test="{test}"')
    with pytest.raises(EmberError, match="^" + re.escape(f"{test}:3: {why}")):
        train(cfg, echo=quiet, progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no step was trained


def test_exact_match_early_stop_survives_a_decoder_that_cleans_up_spaces():
    """A tokenizer with clean_up_tokenization_spaces (a SentencePiece Unigram one here) decodes
    "▁Hello ▁" as "Hello " but "▁Hello ▁ ." as "Hello." (transformers' clean-up deletes the
    space): the row that left its reference at "Hello " was stopped there, scoring 0 where the
    greedy answer "Hello." is the reference. The model is a bigram table (say -> ▁Hello -> ▁ ->
    . -> eos), so greedy decoding is known; the reference text is transformers' decode."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from ember.models.tokenizer import Tokenizer

    pieces = ["<unk>", "<eos>", "▁Hello", "▁", ".", "▁say", "▁world"]
    backend = Backend(models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=0))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    ours = Tokenizer(backend, eos_token="<eos>", clean_up_tokenization_spaces=True)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                              clean_up_tokenization_spaces=True)
    greedy = [2, 3, 4]
    assert hf.decode(greedy[:2]) == "Hello " and hf.decode(greedy) == "Hello."
    V, H = len(pieces), 8
    cfg = ModelConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = Transformer(cfg).init_weights(std=0.02, seed=0).eval()
    with torch.no_grad():  # no attention or MLP output: the next token depends on this one
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.embed.weight.copy_(torch.eye(V, H))
        model.lm_head.weight.zero_()
        for cur, nxt in ((5, 2), (2, 3), (3, 4), (4, 1)):
            model.lm_head.weight[nxt, cur] = 5.0
    assert generate_ids(model, [[5]], max_new_tokens=6, eos_token_ids=[1]) == [greedy]
    refs = [hf.decode(greedy), hf.decode([2, 6])]  # "Hello." (the answer), "Hello world"
    examples = [Example([5, *greedy, 1], [*greedy, 1, IGNORE], f"t:{i}", 1, r)
                for i, r in enumerate(refs)]
    for tok in (ours, hf):
        res = generation_eval(model, tok, examples, ["exact_match"], max_new_tokens=6, show=2)
        assert res.scores == {"exact_match": 0.5}, (tok, res.samples)
        assert res.samples[0][1] == "Hello."


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.8}, {"no_repeat_ngram_size": 1}])
def test_generation_eval_applies_the_generation_config_repetition_penalty(tmp_path, setting):
    """transformers' ``generate(do_sample=False)`` applies the folder's generation_config.json
    ``repetition_penalty`` (Qwen2.5-Instruct's 1.05), ``no_repeat_ngram_size``, ... to greedy
    decoding; evaluation decoded without them (the ngram setting: until now). The references are
    the plain completions, so the reference draft, were it still verified against plain greedy
    choices, would give those instead."""
    import json
    import warnings

    from ember.models.loading import load_hf_folder

    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    vocab = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])
    hf = _tiny_hf_llama(vocab, 6, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**gen, **setting}))
    model = load_hf_folder(tmp_path, torch.float32, "cpu").eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 3, 6)]

    def hf_greedy(p, **kw):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                          max_new_tokens=8, do_sample=False, pad_token_id=0, **kw)
        return out[0, len(p):].tolist()

    plain = [hf_greedy(p, repetition_penalty=1.0, no_repeat_ngram_size=0) for p in prompts]
    want = [tok.decode(hf_greedy(p, **setting), skip_special_tokens=True) for p in prompts]
    refs = [tok.decode(a, skip_special_tokens=True) for a in plain]
    assert want != refs
    examples = [Example(p + a, [IGNORE] * (len(p) - 1) + a + [IGNORE], f"t:{i}", len(p), r)
                for i, (p, a, r) in enumerate(zip(prompts, plain, refs, strict=True))]
    res = generation_eval(model, tok, examples, ["f1"], max_new_tokens=8, batch_size=2, show=3)
    assert [s[1] for s in res.samples] == want


def test_generation_eval_completes_the_generation_prompt():
    """An example whose chat template renders the generation prompt otherwise than its
    training context (``Example.generation_prompt``: Mistral Nemo's system message, R1's
    ``<think>\\n``) is completed from that prompt, as ``ember generate`` and vLLM complete it;
    the training tokens still give the draft."""
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    vocab = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])
    cfg = ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_layers=1,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=96)
    model = Transformer(cfg).init_weights(std=0.5, seed=int(torch.randint(0, 2**30, ())))
    eos = sorted(tok.eos_token_ids)
    context = torch.randint(3, vocab, (6,)).tolist()
    prompt = context[:3] + torch.randint(3, vocab, (4,)).tolist() + context[3:]
    want, = generate_ids(model, [prompt], max_new_tokens=4, eos_token_ids=eos)
    other, = generate_ids(model, [context], max_new_tokens=4, eos_token_ids=eos)
    answer = other + eos[:1]  # the training answer: what the context alone would give
    ex = Example(context + answer, [IGNORE] * (len(context) - 1) + answer + [IGNORE], "t:1",
                 len(context), tok.decode(answer, skip_special_tokens=True),
                 generation_prompt=prompt)
    res = generation_eval(model, tok, [ex], ["f1"], max_new_tokens=4, show=1)
    assert res.samples[0][0] == tok.decode(prompt, skip_special_tokens=False)
    assert res.samples[0][1] == tok.decode(want, skip_special_tokens=True)


def test_a_plain_prompt_is_completed_from_the_tokens_training_shares_with_it(tmp_path):
    """A plain prompt ending in a space that the answer's first token takes in ("Answer: " +
    "yes": " yes") is completed after "Answer:" (what the model learned to continue), not
    after the prompt's own lone " " token that ``ember generate`` (transformers, lm-eval's
    generate_until) feeds: a deliberate difference, README's generation metrics."""
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ember.engine.data import DataConfig, load_examples, render_prompt
    from ember.models.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["Answer: yes", "Answer: no"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, eos_token="</s>")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Answer: ", "completion": "yes"}))
    cfg = DataConfig(train=str(path))
    (ex,), _ = load_examples(path, cfg, tok)
    assert tok.decode(ex.prompt_ids) == "Answer:"
    assert tok.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=False) == " yes</s>"
    assert tok.decode(render_prompt(tok, cfg, "Answer: ")) == "Answer: "
