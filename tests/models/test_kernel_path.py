"""The model's real GPU path end to end: every op the model calls forced onto its Triton kernel
(``EMBER_KERNELS=triton``; on CPU the Triton interpreter, TRITON_INTERPRET=1 from conftest)
gives the loss, every gradient, the cached decode logits and a short training run of the
PyTorch reference path (``EMBER_KERNELS=ref``, itself tested against transformers), on tiny
fp32 models of each family: full fine-tuning, LoRA (fused q/k/v and MLP groups), DoRA and
QLoRA (NF4 dequant, and the fused/gemv NF4 matmul for a few rows). A counter on each kernel
module's dispatch checks that the Triton side really ran (a silent fallback would compare the
reference with itself)."""

from __future__ import annotations

import collections
import importlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from ember.engine.losses import sft_loss
from ember.engine.packing import Batch
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora
from ember.models.nf4 import quantize_model_
from ember.models.transformer import KVCache

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral_window": ("MistralConfig", dict(sliding_window=5)),
    "qwen2_bias": ("Qwen2Config", {}),
    "qwen3_qk_norm": ("Qwen3Config", dict(head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, attn_logit_softcapping=1.5,
                                    final_logit_softcapping=2.0, sliding_window=5)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=5,
                                        layer_types=["sliding_attention", "full_attention"])),
    # head_dim 24 (not a power of 2), 3 query heads on 1 kv head, rotary over half of each head
    "phi3_partial_rotary": ("Phi3Config", dict(hidden_size=72, num_attention_heads=3,
                                               num_key_value_heads=1, partial_rotary_factor=0.5,
                                               pad_token_id=0, eos_token_id=1)),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KERNEL_MODULES = ("attention", "cross_entropy", "lora", "nf4", "rms_norm", "rope", "swiglu")


@pytest.fixture(autouse=True)
def _needs_triton():
    from ember.kernels._dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def triton_ops(monkeypatch):
    """The ops dispatched to Triton so far: a Counter of op names."""
    ops = collections.Counter()
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"ember.kernels.{name}")

        def counted(t, impl, op, _orig=mod.use_triton):
            yes = _orig(t, impl, op)
            ops[op] += yes
            return yes

        monkeypatch.setattr(mod, "use_triton", counted)
    return ops


def _model(tmp_path, family: str, mode: str = "full"):
    cls, kw = FAMILIES[family]
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**BASE, **kw}))
    g = torch.Generator().manual_seed(len(family))
    with torch.no_grad():  # every weight random, norms around 1
        for n, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.1 * noise)
    hf.save_pretrained(tmp_path / family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_pretrained(tmp_path / family)
    if "qlora" in mode:
        quantize_model_(model)
    if mode != "full":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS, use_dora="dora" in mode))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _packed(lens=(11, 6, 7), seed=0) -> Batch:
    """Documents of different lengths, positions restarting, the first labels and each
    document's last one ignored."""
    ids = torch.randint(1, VOCAB, (1, sum(lens)), generator=torch.Generator().manual_seed(seed))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.roll(ids, -1, 1)
    labels[0, cu[1:] - 1] = -100
    labels[0, :2] = -100
    return Batch(input_ids=ids, labels=labels,
                 position_ids=torch.cat([torch.arange(n) for n in lens])[None], cu_seqlens=cu,
                 max_seqlen=max(lens), num_loss_tokens=int((labels != -100).sum()),
                 num_docs=len(lens))


def _padded_loss(model):
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[1, 9:] = 0  # a right-padded row
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def _loss_and_grads(model, monkeypatch, impl, loss_fn):
    monkeypatch.setenv("EMBER_KERNELS", impl)
    model.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


def _assert_triton_equals_ref(model, monkeypatch, triton_ops, loss_fn, expect_ops):
    loss_r, grads_r = _loss_and_grads(model, monkeypatch, "ref", loss_fn)
    assert not any(triton_ops.values())
    loss_t, grads_t = _loss_and_grads(model, monkeypatch, "triton", loss_fn)
    assert set(expect_ops) <= {op for op, n in triton_ops.items() if n}, triton_ops
    triton_ops.clear()
    assert (loss_t - loss_r).abs().item() <= 1e-5 * loss_r.abs().item()
    assert grads_t.keys() == grads_r.keys() and all(g is not None for g in grads_t.values())
    bad = {n: (grads_t[n] - g).abs().max().item() for n, g in grads_r.items()
           if (grads_t[n] - g).abs().max() > 1e-5 * g.abs().max() + 1e-8}
    assert not bad, bad


CORE = ("rms_norm", "apply_rope", "flash_attention", "linear_cross_entropy")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune_loss_and_every_gradient_triton_equals_ref(tmp_path, monkeypatch,
                                                                  triton_ops, family):
    model = _model(tmp_path, family)
    act = "geglu" if family.startswith("gemma") else "swiglu"
    batch = _packed()
    _assert_triton_equals_ref(model, monkeypatch, triton_ops,
                              lambda m: sft_loss(m, batch, batch.num_loss_tokens), (*CORE, act))
    _assert_triton_equals_ref(model, monkeypatch, triton_ops, _padded_loss,
                              ("rms_norm", "apply_rope", "flash_attention", act))


@pytest.mark.parametrize("family,mode", [
    ("qwen2_bias", "lora"), ("qwen2_bias", "qlora"), ("llama", "dora"), ("llama", "qlora_dora"),
    ("phi3_partial_rotary", "qlora")])
def test_adapters_loss_and_gradients_triton_equals_ref(tmp_path, monkeypatch, triton_ops,
                                                       family, mode):
    model = _model(tmp_path, family, mode)
    expect = [*CORE] + (["lora_linear"] if "dora" in mode else ["lora_qkv", "lora_mlp"])
    if "qlora" in mode:
        expect.append("nf4_dequantize")
    batch = _packed()
    _assert_triton_equals_ref(model, monkeypatch, triton_ops,
                              lambda m: sft_loss(m, batch, batch.num_loss_tokens), expect)


@pytest.mark.parametrize("family,mode", [("llama", "qlora"), ("qwen2_bias", "qlora"),
                                         ("gemma2", "full"),
                                         ("phi3_partial_rotary", "qlora")])
def test_cached_decode_logits_triton_equal_ref(tmp_path, monkeypatch, triton_ops, family, mode):
    """Prefill 7 tokens then decode 1, 3 (the NF4 gemv kernel's rows) and 6 (the fused one's)
    into a KV cache: the logits of every step agree (Phi-3's hidden 72 takes the dequant path)."""
    import ember.kernels.nf4 as nf4_kernels

    paths = collections.Counter()

    def fused_mm(x2, weight, bias, path="fused", split=None, _orig=nf4_kernels.fused_mm):
        paths[path] += 1
        return _orig(x2, weight, bias, path, split)

    monkeypatch.setattr(nf4_kernels, "fused_mm", fused_mm)
    model = _model(tmp_path, family, mode).eval()
    ids = torch.randint(1, VOCAB, (1, 17), generator=torch.Generator().manual_seed(4))
    steps = [(0, 7), (7, 8), (8, 11), (11, 17)]
    out = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("EMBER_KERNELS", impl)
        cache = KVCache(model.cfg, 1, 32, "cpu", torch.float32)
        with torch.no_grad():
            out[impl] = torch.cat([model(ids[:, a:b], cache=cache) for a, b in steps], 1)
    assert triton_ops["flash_attention"]
    if mode == "qlora":  # the small-M kernels need in_features a multiple of the blocksize 64
        assert triton_ops["lora_qkv"]
        assert bool(paths["gemv"] and paths["fused"]) == (model.cfg.hidden_size % 64 == 0), paths
    ref = out["ref"]
    assert (out["triton"] - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    full = model(ids)  # and the cache changes nothing
    assert (full - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.slow
def test_three_training_steps_through_the_cli_triton_equal_ref(tmp_path, monkeypatch):
    """``ember train`` (QLoRA, 3 optimizer steps): the loss curve under Triton is ref's."""
    from tests.engine._tiny import cli_train_tiny, make_tiny_model

    base = make_tiny_model(tmp_path / "base")
    losses = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("EMBER_KERNELS", impl)
        (tmp_path / impl).mkdir()
        run = cli_train_tiny(tmp_path / impl, base, "qlora")
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses["triton"] == pytest.approx(losses["ref"], rel=1e-5, abs=0)


def test_packed_lora_model_compiles_with_fullgraph():
    """A LoRA model on a packed batch (cu_seqlens, max_seqlen) under
    torch.compile(fullgraph=True), as a compiled training step runs it: flash attention read
    cu_seqlens on the host ("Could not guard on data-dependent expression"). The same hidden
    states and LoRA gradients as eager (whose per-document attention is SDPA, tested against
    transformers elsewhere)."""
    from ember.models import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=4, num_kv_heads=2)
    model = Transformer(cfg).init_weights(seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, init="gaussian"))
    ids = torch.randint(0, 61, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    kw = dict(cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen=7)
    params = [p for p in model.parameters() if p.requires_grad]
    want = model.hidden_states(ids, pos, **kw)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    torch._dynamo.reset()
    step = torch.compile(lambda ids: model.hidden_states(ids, pos, **kw), backend="aot_eager",
                         fullgraph=True)
    got = step(ids)
    assert torch.allclose(got, want, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got.square().sum(), params), want_grads, strict=True):
        # fp32 sums in another order (one masked attention over all tokens): ~1e-5 apart
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
