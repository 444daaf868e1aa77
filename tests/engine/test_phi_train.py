"""``ember train`` on a tiny random Phi-2-shaped model (LayerNorms, parallel blocks, plain MLP,
biased head): LoRA with the default targets learns, the fused loss includes the head's bias, the
MLP chunking of a parallel block gives the same loss and gradients, and the exported adapter and
merged folder load back."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember.engine.activation import set_mlp_chunks
from ember.engine.data import DataConfig, PackedBatches, load_examples
from ember.engine.losses import sft_loss
from ember.engine.trainer import train
from ember.models.hf import config_from_hf
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.transformer import Transformer
from tests.engine._tiny import quiet, rows_of, tiny_config


@pytest.fixture(scope="module")
def phi(tiny, tmp_path_factory):
    """The tiny fixture with its model replaced by a random phi one (same tokenizer)."""
    _, tok = load_pretrained(tiny["model"])
    cfg = config_from_hf(dict(
        model_type="phi", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        partial_rotary_factor=0.4, resid_pdrop=0.1, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model = Transformer(cfg).init_weights(std=0.05, seed=0)
    with torch.no_grad():  # a head bias that matters
        model.head_bias.copy_(torch.randn(cfg.vocab_size, generator=torch.Generator()
                                          .manual_seed(0)))
    folder = tmp_path_factory.mktemp("phi") / "model"
    save_pretrained(model, folder, tok)
    return {**tiny, "model": str(folder)}


def _batch(phi):
    model, tok = load_pretrained(phi["model"], "float32")
    examples, _ = load_examples(phi["train"], DataConfig(), tok)
    return model, next(iter(PackedBatches(examples[:5], 128)))


def test_sft_loss_includes_the_head_bias(phi):
    model, batch = _batch(phi)
    logits = model(batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen)[0]
    ref = torch.nn.functional.cross_entropy(logits, batch.labels[0], ignore_index=-100)
    got = sft_loss(model, batch, batch.num_loss_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_mlp_chunks_of_a_parallel_block_give_the_same_loss_and_grads(phi):
    model, batch = _batch(phi)
    model.train()
    for block in model.layers:  # chunks draw dropout masks in another order (as LoRA dropout)
        block.resid_dropout = 0.0

    def loss_and_grads():
        model.zero_grad()
        loss = sft_loss(model, batch, batch.num_loss_tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_g = loss_and_grads()
    set_mlp_chunks(model, 16)
    got, got_g = loss_and_grads()
    assert batch.input_ids.numel() > 16
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert max((got_g[n] - g).abs().max().item() for n, g in ref_g.items()) <= 1e-5


def test_lora_with_default_targets_learns_and_exports(phi, tmp_path):
    cfg = tiny_config(phi, tmp_path / "run", "max_steps=20", "optim.lr=3e-2",
                      "optim.warmup_steps=1", "eval.metrics=[]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(cfg, echo=quiet, progress=False)
    assert any("'gate' skipped" in str(w.message) for w in caught)
    losses = [r["loss"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert res.after["val_loss"] < 0.85 * res.before["val_loss"], (res.before, res.after)
    adapter = tmp_path / "run" / "final" / "adapter"
    model, tok = load_pretrained(phi["model"])
    from ember.models.lora import load_adapter, lora_modules, merge_lora

    load_adapter(model, adapter)
    assert len(lora_modules(model)) == 2 * 6  # q, k, v, dense, fc1, fc2 per layer
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ours = model.eval()(ids)
    save_pretrained(merge_lora(model), tmp_path / "merged", tok)
    merged, _ = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged.eval()(ids) - ours).abs().max().item() <= 1e-4
