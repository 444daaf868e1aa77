"""LoRA on embed_tokens and lm_head (ember.models.lora_embed) against PEFT 0.21 as the oracle:
PEFT's adapters load with PEFT's logits, Ember's load in PEFT with Ember's, on untied, tied
(ensure_weight_tying or embedding alone) and Gemma models; gradients through the fused
cross-entropy equal PEFT's; merging keeps the logits; ``ember train`` learns with them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.losses import _ce_sum, adapters_disabled, sft_loss
from ember.engine.packing import Example, collate
from ember.models.loading import load_pretrained
from ember.models.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    resolve_targets,
    save_adapter,
)
from ember.models.lora_embed import LoRAEmbedding
from tests.models.test_interop_peft import VOCAB, _peft_adapter, _peft_logits, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TARGETS = ["q_proj", "embed_tokens", "lm_head"]
CASES = {  # name -> (base, PEFT LoraConfig kwargs)
    "untied": ("llama", dict(target_modules=TARGETS)),
    "untied_rslora_head_only": ("llama", dict(target_modules=["lm_head", "v_proj"],
                                              use_rslora=True)),
    "tied_ensure_weight_tying": ("tied", dict(target_modules=TARGETS, ensure_weight_tying=True)),
    "tied_embedding_alone": ("tied", dict(target_modules=["q_proj", "embed_tokens"])),
    "gemma3_tied": ("gemma3", dict(target_modules=TARGETS, ensure_weight_tying=True)),
}


def _perturb_trainable(model) -> None:
    """Every trainable parameter set to 0.2 * N(0, 1) (global RNG), as after some training."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_head_bases")
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 final_logit_softcapping=3.0)
    return {
        "llama": save_random_model(root / "llama", transformers.LlamaConfig, seed=1),
        "tied": save_random_model(root / "tied", transformers.LlamaConfig, seed=2,
                                  tie_word_embeddings=True),
        "gemma3": save_random_model(root / "gemma3", transformers.Gemma3TextConfig, seed=3,
                                    **gemma),
    }


def _small_lora(model) -> None:
    """PEFT's random init (init_lora_weights=False) is N(0, 1): shrink it to keep logits O(1)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.2)


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def _tol(ref, rel: float = 1e-5) -> float:
    """fp32 parity bound that scales with the logits (their rounding does; the order tests run in
    moves the adapters PEFT draws from the global RNG, and so the logits' size)."""
    return rel * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapters_load_save_and_merge_with_peft_logits(bases, tmp_path, case):
    base, kw = CASES[case]
    ids, ref = _peft_adapter(bases[base], tmp_path / "peft", edit_base=_small_lora, **kw)
    assert ref.abs().max() > 1.0  # the adapters are not a no-op ...
    model, _ = load_pretrained(bases[base])
    plain = _logits(model, ids)
    load_adapter(model, tmp_path / "peft")
    got = _logits(model, ids)
    assert _err(got, ref) <= _tol(ref), _err(got, ref)
    assert _err(plain, ref) > 1e-2  # ... and the check sees them
    with adapters_disabled(model):  # DPO's reference: the base
        assert _err(_logits(model, ids), plain) <= 1e-6
    # Ember -> PEFT: the same logits from PEFT's loader
    save_adapter(model, tmp_path / "ember")
    assert _err(_peft_logits(bases[base], tmp_path / "ember", ids), ref) <= _tol(ref)
    merge_lora(model)
    assert not lora_modules(model)
    if case == "tied_embedding_alone":  # the head keeps the base matrix: untied (was refused)
        assert not model.cfg.tie_word_embeddings and model.lm_head is not None
    assert _err(_logits(model, ids), ref) <= _tol(ref, 2e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_ember_adapters_load_in_peft(bases, tmp_path, tied):
    model, _ = load_pretrained(bases["tied" if tied else "llama"])
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "embed_tokens", "lm_head"),
                                 dropout=0.1))
    assert isinstance(model.embed, LoRAEmbedding) and model.embed.ties_head == tied
    assert ("lm_head" in lora_modules(model)) != tied  # tied: the embedding's adapter serves it
    with torch.no_grad():
        assert torch.equal(model.embed.lora_embedding_A, torch.zeros_like(
            model.embed.lora_embedding_A))  # PEFT's init: A zero, B normal
    _perturb_trainable(model)
    ids = _ids()
    ours = _logits(model, ids)
    save_adapter(model, tmp_path / "ad")
    back = _peft_logits(bases["tied" if tied else "llama"], tmp_path / "ad", ids)
    assert _err(back, ours) <= 1e-5


def _peft_model(base, adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
        return peft.PeftModel.from_pretrained(hf, adapter, is_trainable=True).eval()


@pytest.mark.parametrize("case", ["untied", "tied_ensure_weight_tying"])
def test_gradients_through_the_fused_loss_equal_peft(bases, tmp_path, case):
    base, kw = CASES[case]
    _peft_adapter(bases[base], tmp_path / "peft", edit_base=_small_lora, **kw)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 14)]
    examples = [Example(d, [-100] * 3 + d[4:] + [-100], "t", key=str(i))
                for i, d in enumerate(docs)]
    batch = collate(examples)
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / "peft")
    sft_loss(model.eval(), batch, batch.num_loss_tokens).backward()
    pm = _peft_model(bases[base], tmp_path / "peft")
    loss = sum(F.cross_entropy(pm(torch.tensor([e.input_ids])).logits[0],
                               torch.tensor(e.labels), reduction="sum") for e in examples)
    (loss / batch.num_loss_tokens).backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters()
              if p.requires_grad and ("embed_tokens" in n or "lm_head" in n)}
    ours = {"base_model.model.model.embed_tokens.lora_embedding_A": model.embed.lora_embedding_A,
            "base_model.model.model.embed_tokens.lora_embedding_B": model.embed.lora_embedding_B}
    head_a, head_b = (f"base_model.model.lm_head.lora_{k}.weight" for k in "AB")
    if case == "untied":
        ours |= {head_a: model.lm_head.lora_A, head_b: model.lm_head.lora_B}
    else:
        # PEFT's tied head holds Parameters over the embedding's storage (B^T, A^T) with grads of
        # their own; the gradient of the one tied adapter is the sum
        theirs[next(iter(ours))] += theirs.pop(head_b).t()
        theirs[list(ours)[1]] += theirs.pop(head_a).t()
    assert set(theirs) == set(ours)
    for k, p in ours.items():
        ref = theirs[k]
        assert ref.abs().max() > 0, k
        assert _err(p.grad, ref) <= 1e-5 * (1 + ref.abs().max().item()), k


class _FixedMask(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("tied", [False, True])
def test_head_dropout_is_exact(bases, tied):
    """LoRA dropout on the head's branch (PEFT: dropout(h) A^T B^T, base on h) through the fused
    loss: same loss and gradients as that formula written out with the same mask."""
    model, _ = load_pretrained(bases["tied" if tied else "llama"])
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("embed_tokens", "lm_head"),
                                 dropout=0.5))
    head = model.embed if tied else model.lm_head
    h = torch.randn(10, model.cfg.hidden_size)
    mask = (torch.rand(10, model.cfg.hidden_size) > 0.5).float() * 2
    head.dropout = _FixedMask(mask)
    _perturb_trainable(model)
    labels = torch.randint(0, VOCAB, (10,))
    params = list(head.adapter_params().values())
    model.train()
    x, w = model.head_operands(h)
    got = F.cross_entropy(F.linear(x, w), labels)
    fused = _ce_sum(model, h, labels) / 10
    W = model.embed.weight if tied else model.lm_head.base.weight
    A, B = ((model.embed.lora_embedding_B.t(), model.embed.lora_embedding_A.t()) if tied
            else (model.lm_head.lora_A, model.lm_head.lora_B))
    ref = F.cross_entropy(h @ W.t() + head.scale * ((h * mask) @ A.t()) @ B.t(), labels)
    for loss in (got, fused):
        assert abs(loss.item() - ref.item()) <= 1e-5
        gl = torch.autograd.grad(loss, params)
        gr = torch.autograd.grad(ref, params, retain_graph=True)
        for a, b in zip(gl, gr, strict=True):
            assert _err(a, b) <= 1e-5


def test_training_through_ember_train(tmp_path):
    """``ember train`` with LoRA on the embedding and head (the tiny model is tied: one adapter
    for both) and ``lora.embedding_lr``: the loss goes down, the embedding adapter learns at its
    own lr, and the exported adapter gives PEFT the logits of the run's model."""
    from ember.engine.state import load_run_model
    from ember.engine.trainer import Trainer, resolve
    from tests.engine._tiny import (
        make_tiny_model,
        quiet,
        rows_of,
        tiny_config,
        tiny_rows,
        write_jsonl,
    )

    tiny = {"model": str(make_tiny_model(tmp_path / "model")),
            "train": write_jsonl(tmp_path / "train.jsonl", tiny_rows(24, seed=1)),
            "val": write_jsonl(tmp_path / "val.jsonl", tiny_rows(4, seed=2)),
            "test": write_jsonl(tmp_path / "test.jsonl", tiny_rows(4, seed=3))}
    cfg = resolve(tiny_config(tiny, tmp_path / "run", "max_steps=12", "optim.lr=1e-2",
                              "optim.warmup_steps=1", "eval.metrics=[]",
                              'lora.targets=["q", "v", "embed_tokens", "lm_head"]',
                              "lora.embedding_lr=2e-3", "lora.dropout=0.1"))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    losses = [r["loss"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.9, losses
    emb_a = t.model.embed.lora_embedding_A.abs().max().item()  # A starts at zero
    q_b = t.model.layers[0].attn.q_proj.lora_B.abs().max().item()  # so does B
    # Adam moves an entry by about lr per step at most: 12 steps at 2e-3 vs 1e-2
    assert emb_a < 12 * 2e-3 < q_b, (emb_a, q_b)
    adapter = tmp_path / "run" / "final" / "adapter"
    model, _, _ = load_run_model(tmp_path / "run", "cpu")
    assert isinstance(model.embed, LoRAEmbedding) and model.embed.ties_head
    ids = _ids().clamp(max=model.cfg.vocab_size - 1)
    assert _err(_peft_logits(tiny["model"], adapter, ids), _logits(model, ids)) <= 1e-5
    # a next stage continues the adapter (model.init), embedding and head included
    cfg2 = resolve(tiny_config(tiny, tmp_path / "s2", "max_steps=1", "eval.metrics=[]",
                               f'model.init="{tmp_path / "run"}"'))
    t2 = Trainer(cfg2, echo=quiet, progress=False)
    t2.run()
    assert set(lora_modules(t2.model)) == set(lora_modules(t.model))


@pytest.mark.parametrize(
    "base,kw,needle",
    [
        # (DoRA on an untied embedding: tests/models/test_peft_variants.py)
        ("tied", dict(targets=("q", "embed_tokens"), use_dora=True), "DoRA"),
        ("llama", dict(targets=("lm_head",), use_dora=True), "DoRA"),
        ("llama", dict(targets=("nothing_like_this",)), "match no"),
    ],
)
def test_bad_targets_are_refused(bases, base, kw, needle):
    model, _ = load_pretrained(bases[base])
    with pytest.raises(EmberError, match=needle):
        apply_lora(model, LoRAConfig(rank=4, alpha=8, **kw))


def test_all_linear_leaves_out_embedding_and_head(bases):
    model, _ = load_pretrained(bases["llama"])
    names = resolve_targets(model, ("all-linear",))
    assert "lm_head" not in names and "embed" not in names and len(names) == 14
    assert resolve_targets(model, ("embed_tokens", "lm_head")) == ["embed", "lm_head"]
    tied, _ = load_pretrained(bases["tied"])
    assert resolve_targets(tied, ("lm_head",)) == ["embed"]  # one tied adapter


def test_bad_adapters_and_settings_are_refused(bases, tmp_path):
    _peft_adapter(bases["llama"], tmp_path / "dora", target_modules=["q_proj", "lm_head"],
                  use_dora=True)
    model, _ = load_pretrained(bases["llama"])
    with pytest.raises(EmberError, match="DoRA"):
        load_adapter(model, tmp_path / "dora")
    # a tied model, PEFT without ensure_weight_tying: two adapters on the one shared matrix,
    # held by untying the head (was refused here; tests/models/test_peft_tied_saved.py)
    ids, ref = _peft_adapter(bases["tied"], tmp_path / "two", target_modules=TARGETS)
    model, _ = load_pretrained(bases["tied"])
    load_adapter(model, tmp_path / "two")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    model, _ = load_pretrained(bases["tied"])
    with pytest.raises(EmberError, match="embedding_lr"):
        LoRAConfig(embedding_lr=0.0)
    from ember.engine.config import OptimConfig
    from ember.engine.runtime import make_optimizer

    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q",)))
    with pytest.raises(EmberError, match="embedding_lr"):
        make_optimizer(model, OptimConfig(), "cpu", embedding_lr=1e-4)


def test_qlora_base_keeps_a_dense_head_and_embedding(bases, tmp_path):
    """NF4 quantizes the projections only: LoRA on the embedding and head of a 4-bit base loads in
    PEFT on the dequantized base with the same logits, and merges into a plain model."""
    from ember.models.loading import save_pretrained
    from ember.models.nf4 import Linear4bit

    model, _ = load_pretrained(bases["llama"], quantize="nf4")
    base_dir = save_pretrained(model, tmp_path / "base", dequantize=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("v", "embed_tokens", "lm_head")))
    assert isinstance(model.lm_head.base, torch.nn.Linear)
    assert isinstance(model.embed.base, torch.nn.Embedding)
    assert isinstance(model.layers[0].attn.v_proj.base, Linear4bit)
    _perturb_trainable(model)
    ids = _ids()
    ours = _logits(model, ids)
    save_adapter(model, tmp_path / "ad")
    assert _err(_peft_logits(base_dir, tmp_path / "ad", ids), ours) <= 1e-4
    merge_lora(model)
    assert not lora_modules(model) and _err(_logits(model, ids), ours) <= 1e-4


@pytest.mark.parametrize("targets,save_kw", [
    (["q_proj", "embed_tokens", "lm_head"], None),  # PEFT saves the base layers' weights too
    (["q_proj"], dict(save_embedding_layers=True)),
])
def test_adapter_with_saved_base_embeddings_onto_a_bf16_base(bases, tmp_path, targets, save_kw):
    """PEFT saves the fp32 embedding / head it adapted; on a base loaded in bf16 it loads them
    cast to bf16, which is the base's own weight: the adapter is PEFT's function (was refused
    as new full weights: compared in fp32)."""
    base = bases["llama"]
    _peft_adapter(base, tmp_path / "ad", save_kw=save_kw, edit_base=_small_lora,
                  target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    model, _ = load_pretrained(base, dtype="bfloat16")
    load_adapter(model, tmp_path / "ad")
    assert model.embed.weight.dtype == torch.bfloat16
    ids = _ids()
    # the same weights in both, compared in fp32 so that bf16 rounding of the math is no factor
    assert _err(_logits(model.float(), ids), _logits(pm.float(), ids).logits) <= 1e-5
