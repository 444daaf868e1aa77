"""Activation checkpointing and offload: exact gradients, unchanged keys, policies, offload."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ember import EmberError
from ember.engine.activation import (
    ActivationConfig,
    apply_activation_checkpointing,
    checkpointed_layers,
    offloader_of,
    remove_activation_checkpointing,
    set_mlp_chunks,
)
from ember.engine.data import Example, collate
from ember.engine.losses import sft_loss
from ember.models import LoRAConfig, ModelConfig, Transformer, apply_lora

CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=4, num_heads=4,
                  num_kv_heads=2, qk_norm=True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-exact comparisons: one intra-op thread (tests/conftest.py), so no reduction depends on
    how work is split between threads."""


def _batch(seed: int, lengths=(9, 14, 6)):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in lengths:
        ids = torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()
        labels = ids[1:] + [-100]
        exs.append(Example(ids, labels, "t:1"))
    return collate(exs)


def _model(lora_dropout: float | None = None, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = Transformer(CFG).init_weights(seed=1)
    if lora_dropout is not None:
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=lora_dropout, init="gaussian"))
        with torch.no_grad():  # B = 0 would make every adapter gradient but dB trivially 0
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype).train()


def _grads(model, batch, seed=123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = sft_loss(model, batch, batch.num_loss_tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("policy,k,offload", [("every_block", 2, False), ("every_k", 3, False),
                                              ("every_block", 2, True)])
def test_gradients_equal_without_checkpointing(policy, k, offload):
    batch = _batch(0)
    # LoRA with dropout: the recompute must replay the same dropout masks (RNG preserved).
    model = _model(lora_dropout=0.25)
    loss_ref, ref = _grads(model, batch)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    chosen = apply_activation_checkpointing(model, policy, k=k, offload=offload)
    assert chosen == checkpointed_layers(CFG.num_layers, policy, k)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    loss, got = _grads(model, batch)
    assert loss == loss_ref
    assert got.keys() == ref.keys() and len(got) > 8
    for n in ref:  # the recompute runs the same fp32 ops in the same order: bit-identical
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)



_DROPS = dict(resid_dropout=0.2, embed_dropout=0.15, attention_dropout=0.25, qk_norm=False)
_PHI = dict(norm="layernorm", parallel_block=True, gated_mlp=False, activation="gelu_tanh",
            num_kv_heads=4)


def _three_steps(cfg, batch, checkpointing=None):
    """Losses and gradients of three SGD steps from seed 11 (LoRA dropout, NEFTune), and the
    global RNG state after them; ``checkpointing``: (policy, k, offload)."""
    from ember.engine.neftune import add_model_neftune

    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(seed=1)
    with warnings.catch_warnings():  # Phi's MLP has no gate projection to adapt
        warnings.simplefilter("ignore")
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.3, init="gaussian"))
    add_model_neftune(model, 5.0)
    if checkpointing is not None:
        policy, k, offload = checkpointing
        apply_activation_checkpointing(model, policy, k=k, offload=offload)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(11)
    out = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = sft_loss(model.train(), batch, batch.num_loss_tokens)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}))
        opt.step()
    return out, torch.get_rng_state()


@pytest.mark.parametrize("family", ["llama", "phi"])
@pytest.mark.parametrize("checkpointing", [("every_block", 2, False), ("every_k", 2, True)])
def test_every_dropout_replays_over_steps(family, checkpointing):
    """Attention, residual and embedding dropout, LoRA dropout and NEFTune noise at once, on a
    sequential block and a parallel (Phi) one: three optimizer steps give the same losses and
    gradients bit for bit with and without checkpointing, and leave the global RNG in the same
    state (each step's masks, the next step's included, are the same draws)."""
    cfg = CFG.replace(num_layers=3, **_DROPS, **(_PHI if family == "phi" else {}))
    batch = _batch(7)
    ref, rng_ref = _three_steps(cfg, batch)
    got, rng = _three_steps(cfg, batch, checkpointing)
    assert torch.equal(rng, rng_ref)
    assert len({loss for loss, _ in ref}) == 3  # the steps really differ
    for (loss_ref, g_ref), (loss, g) in zip(ref, got, strict=True):
        assert loss == loss_ref and g.keys() == g_ref.keys()
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=0, msg=n)

def test_full_finetune_gradients_and_offload_stats():
    batch = _batch(1, (20, 7))
    model = _model()
    _, ref = _grads(model, batch)
    apply_activation_checkpointing(model, "every_block", offload=True)
    off = offloader_of(model)
    _, got = _grads(model, batch)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
    # One saved input per checkpointed block, the (1, T, D) hidden state; nothing copied on CPU.
    T = batch.num_tokens
    assert off.stats["tensors"] == CFG.num_layers
    assert off.stats["bytes"] == CFG.num_layers * T * CFG.hidden_size * 4
    assert off.stats["offloaded_tensors"] == 0


def test_checkpointing_actually_recomputes():
    """The policy decides which blocks run their forward twice in a training step."""
    batch = _batch(2)
    model = _model()
    calls = [0] * CFG.num_layers
    for i, block in enumerate(model.layers):
        # A pre-hook: recompute stops early, inside the block, once the saved tensors are back.
        block.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    apply_activation_checkpointing(model, "every_k", k=2)
    _grads(model, batch)
    assert calls == [2, 1, 2, 1]
    calls[:] = [0] * CFG.num_layers
    with torch.no_grad():  # no recompute (and no checkpoint overhead) without gradients
        model(batch.input_ids)
    assert calls == [1] * CFG.num_layers
    remove_activation_checkpointing(model)
    calls[:] = [0] * CFG.num_layers
    _grads(model, batch)
    assert calls == [1] * CFG.num_layers


def test_deepcopy_and_reapply():
    model = _model()
    apply_activation_checkpointing(model, "every_block")
    twin = copy.deepcopy(model)
    # The copied blocks' forward is bound to the copy, not to the original blocks.
    assert twin.layers[0].forward.__self__ is twin.layers[0]
    batch = _batch(3)
    _, a = _grads(model, batch)
    _, b = _grads(twin, batch)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    assert apply_activation_checkpointing(model, "every_k", k=3) == [0, 3]
    assert "forward" not in vars(model.layers[1])


@pytest.mark.parametrize("policy,chunk", [("none", 7), ("every_block", 7), ("every_block", 64)])
def test_mlp_chunks_equal_gradients(policy, chunk):
    """The MLP in token chunks (alone or nested in block checkpointing) is the same computation:
    loss and gradients equal up to the matmuls' blocking (29 tokens: chunks of 7 leave a ragged
    last one; 64 >= the batch runs unchunked). No dropout here: chunks draw their masks in
    another order (test_mlp_chunks_replay_dropout covers the recompute's masks)."""
    batch = _batch(4)
    model = _model(lora_dropout=0.0)
    loss_ref, ref = _grads(model, batch)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, policy)
    set_mlp_chunks(model, chunk)
    assert list(model.state_dict()) == keys
    calls = [0]
    model.layers[1].mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    loss, got = _grads(model, batch)
    # Forward once per chunk and again per chunk in backward; the block's own recompute (which
    # stops early, once the last saved tensor is back) runs up to n more.
    n = -(-batch.num_tokens // chunk)
    if chunk >= batch.num_tokens:
        assert calls[0] == (1 if policy == "none" else 2)
    elif policy == "none":
        assert calls[0] == 2 * n
    else:
        assert 2 * n < calls[0] <= 3 * n
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    set_mlp_chunks(model, 0)  # back to the class's branch
    assert "mlp_branch" not in vars(model.layers[0])


def test_mlp_chunks_replay_dropout(monkeypatch):
    """With LoRA dropout, each chunk's recompute in backward replays the chunk's forward masks:
    the gradients equal those of the same chunks run without checkpoints (bit for bit)."""
    import ember.engine.activation as act

    batch = _batch(6)
    model = _model(lora_dropout=0.3)
    set_mlp_chunks(model, 5)
    loss, got = _grads(model, batch)
    monkeypatch.setattr(act, "checkpoint", lambda fn, *a, use_reentrant: fn(*a))
    loss_ref, ref = _grads(model, batch)
    assert loss == loss_ref
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_mlp_chunks_bound_saved_activations():
    """No saved tensor holds the MLP width for more than one chunk of tokens, batched input
    (B=2: chunks run over the flattened tokens) included; outputs unchanged."""
    model = _model()
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))

    def biggest_mlp_saved():
        sizes = []

        def pack(t):
            if t.shape and t.shape[-1] == CFG.intermediate_size:
                sizes.append(t.numel() // CFG.intermediate_size)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids)
        return max(sizes, default=0), out

    full, ref = biggest_mlp_saved()
    assert full == 48  # all 2 x 24 tokens' gate/up outputs
    set_mlp_chunks(model, 10)
    chunked, out = biggest_mlp_saved()
    assert chunked == 0  # only each chunk's input is kept; its MLP is re-run in backward
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bad_settings():
    model = _model()
    with pytest.raises(EmberError, match="checkpointing must be one of"):
        apply_activation_checkpointing(model, "sometimes")
    with pytest.raises(EmberError, match="every_k must be an integer >= 1"):
        apply_activation_checkpointing(model, "every_k", k=0)
    with pytest.raises(EmberError, match="offload needs activation checkpointing"):
        ActivationConfig(offload=True)
    with pytest.raises(EmberError, match="mlp_chunk_tokens must be an integer >= 0"):
        ActivationConfig(mlp_chunk_tokens=-8)
    with pytest.raises(EmberError, match="mlp_chunk_tokens must be an integer >= 0"):
        set_mlp_chunks(model, 2.5)
    with pytest.raises(EmberError, match="`layers` ModuleList"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "every_block")
    assert checkpointed_layers(5, "none") == []


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_checkpointing_memory_and_gradients(offload):
    cfg = ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_layers=6,
                      num_heads=8, num_kv_heads=4)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(seed=0).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (1, 4096), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h = model.hidden_states(ids)
        torch.cuda.synchronize()
        # Offloaded inputs are freed once their copy-out finished; the allocator books that on
        # its next allocation.
        torch.empty(1, device="cuda")
        after_fwd = torch.cuda.memory_allocated() - base
        h.float().square().mean().backward()
        torch.cuda.synchronize()
        return after_fwd, {n: p.grad.float() for n, p in model.named_parameters()
                           if p.grad is not None}

    held_ref, ref = step()
    # hidden_states stops before the output head: every parameter but the head gets a gradient.
    assert set(dict(model.named_parameters())) - set(ref) == {"lm_head.weight"}
    apply_activation_checkpointing(model, "every_block", offload=offload)
    held, got = step()
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
    block_input = 4096 * cfg.hidden_size * 2
    if offload:
        assert offloader_of(model).stats["offloaded_tensors"] == cfg.num_layers
        # Only the final norm's input (and small tables) stay on the GPU.
        assert held < 3 * block_input, (held, held_ref)
    else:
        assert held < (cfg.num_layers + 3) * block_input < held_ref / 3, (held, held_ref)
