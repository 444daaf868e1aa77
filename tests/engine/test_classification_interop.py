"""A classification run's model as transformers reads it: the saved / exported folder's tokenizer
pads a batch for transformers' ``*ForSequenceClassification`` with the id it pools around."""

from __future__ import annotations

import pytest
import torch

from ember.engine.classification import attach_head
from ember.engine.config import load_config
from ember.models import ModelConfig, Transformer
from ember.models.heads import classify
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

WORDS = ["cat", "dog", "red", "blue", "one", "two", "sun"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def _base_without_pad_token(folder):
    """A tiny Llama whose tokenizer and config.json name no pad token (as Llama 3's and many
    base models' do): Ember pools a classifier around EOS."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, eos_token="<eos>")
    cfg = ModelConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id)
    save_pretrained(Transformer(cfg).init_weights(std=0.1, seed=0), folder, tok)
    return folder


def test_exported_classifier_tokenizer_pads_with_the_pooled_pad_id(tmp_path):
    """The head pools around EOS (the pad id written to config.json), but the tokenizer was
    written without a pad token: transformers' tokenizer refused to pad a batch ("Asking to pad
    but the tokenizer does not have a padding token"), so the exported classifier could only
    score one text at a time. It now names EOS its pad token, as a transformers script does
    (``tokenizer.pad_token = tokenizer.eos_token``), and a padded batch gives Ember's logits."""
    base = _base_without_pad_token(tmp_path / "base")
    cfg = load_config(None, [f'model.name="{base}"', 'head.type="classification"',
                             'head.labels=["a", "b", "c"]', f'data.train=["{tmp_path}/x.jsonl"]'])
    model, tok = load_pretrained(base)
    assert tok.pad_token is None and model.cfg.pad_token_id is None
    attach_head(model, cfg, tok)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_pretrained(model, tmp_path / "out", tok)
    texts = ["cat dog", "red blue one two sun<eos>", "sun"]  # the second pools before its EOS
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.pad_token_id == tok.eos_token_id == hf_tok.pad_token_id
    with torch.no_grad():
        ref = hf(**batch).logits
        ours = torch.cat([classify(model.eval(), torch.tensor([tok.encode(t, True)]))
                          for t in texts])
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    assert (ref[0] - ref[1]).abs().max() > 1e-3
