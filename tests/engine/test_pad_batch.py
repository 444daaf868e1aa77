"""``pad_batch`` against transformers: each padded row, run through a tiny HF Llama with the
batch's attention mask and positions, gives the logits of its document run alone (unpadded)."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.packing import IGNORE, Example, collate, pad_batch


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def _doc(n: int, seed: int) -> list[int]:
    return torch.randint(3, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _labels(ids: list[int]) -> list[int]:
    return ids[1:] + [IGNORE]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_documents_get_their_own_rows_as_transformers_sees_them(side):
    """A preference pair (``parts``: chosen, rejected) in a padded batch: the rejected answer must
    not attend to the chosen one nor continue its positions. transformers on the padded rows ==
    transformers on each document alone, rows in ``collate``'s document order."""
    hf = _tiny_llama()
    chosen, rejected, plain = _doc(5, 1), _doc(4, 2), _doc(7, 3)
    pair = Example(chosen + rejected, _labels(chosen) + _labels(rejected), "p:1", parts=(5, 4))
    single = Example(plain, _labels(plain), "p:2")
    pb = pad_batch([pair, single], pad_id=0, side=side)
    docs = [chosen, rejected, plain]
    assert pb.input_ids.shape[0] == collate([pair, single]).num_docs == 3
    assert pb.num_loss_tokens == pair.num_loss_tokens + single.num_loss_tokens
    with torch.no_grad():
        out = hf(pb.input_ids, attention_mask=pb.attention_mask,
                 position_ids=pb.position_ids).logits
        for row, d in enumerate(docs):
            m = pb.attention_mask[row].bool()
            assert pb.input_ids[row][m].tolist() == d
            assert pb.labels[row][m].tolist() == _labels(d)
            alone = hf(torch.tensor([d])).logits[0]
            assert (out[row][m] - alone).abs().max().item() <= 1e-5


def test_no_examples_is_a_clear_error():
    with pytest.raises(EmberError, match="no examples"):
        pad_batch([], pad_id=0)
