"""Generation against transformers' ``generate`` on a tiny random Llama: greedy tokens of a
left-padded batch with prompts of different lengths equal transformers' for each prompt."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember.models.generate import generate_ids
from ember.models.loading import load_hf_folder

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
