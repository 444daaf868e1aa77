"""Evaluation by generation: the reference-drafted fast path scores exactly what plain greedy
generation scores, whether the model agrees with the references or not."""

from __future__ import annotations

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
