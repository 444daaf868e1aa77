"""Continuing a PEFT adapter (``model.init``) trains what ``PeftModel.from_pretrained(...,
is_trainable=True)`` trains, by the same step: one optimizer step in Ember on the continued
adapter (``continue_adapters``' ``_train_saved_modules``, then ``make_optimizer`` or SGD)
equals PEFT's step on the same batch, and the adapter Ember saves is the one PEFT's step gave."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember.engine.config import OptimConfig
from ember.engine.runtime import make_optimizer
from ember.engine.stages import _train_saved_modules
from ember.models.loading import load_pretrained
from ember.models.lora import load_adapter, lora_modules, save_adapter
from tests.models.test_interop_peft import VOCAB, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
IDS[0, 3], IDS[1, 5] = 15, 44  # the trainable tokens are in the batch


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue_peft")
    return {name: save_random_model(root / name, transformers.LlamaConfig, seed=i + 11, **kw)
            for i, (name, kw) in enumerate({"plain": {}, "tied": dict(tie_word_embeddings=True),
                                            "biased": dict(attention_bias=True)}.items())}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over every position (the same masking on both sides)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                             IDS[:, 1:].reshape(-1))


def _optimizer(params, kind: str):
    if kind == "sgd":
        return torch.optim.SGD([p for _, p in params], lr=0.5)
    # transformers' Trainer decays all but biases and norms (get_decay_parameter_names)
    named = list(params)
    groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.3},
              {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.05, foreach=True)


def _peft_step(base, adapter, out, kind: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf, adapter, is_trainable=True)
        params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
        opt = _optimizer(params, kind)
        _loss(pm(input_ids=IDS).logits).backward()
        opt.step()
        pm.save_pretrained(out)


def _ember_step(base, adapter, out, kind: str, bias: str = "none"):
    model, _ = load_pretrained(base, "float32")
    load_adapter(model, adapter)
    _train_saved_modules(model, lora_modules(model), bias)  # as continue_adapters
    if kind == "sgd":
        opt = _optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], kind)
    else:  # the trainer's own AdamW groups
        opt = make_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.3), "cpu")
    _loss(model.train()(IDS)).backward()
    opt.step()
    save_adapter(model, out)
    return model


def _assert_same_adapters(a, b) -> None:
    ta, tb = (load_file(f / "adapter_model.safetensors") for f in (a, b))
    # PEFT's save_embedding_layers="auto" with LoRA on embed_tokens (a tied lm_head): a copy of
    # the base's own
    tb = {k: v for k, v in tb.items()
          if not k.endswith(("embed_tokens.base_layer.weight", "lm_head.base_layer.weight"))}
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k] - tb[k]).abs().max() <= 1e-5 * max(1.0, tb[k].abs().max().item()), k


def _new_token_rows(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.copy_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("base,indices", [
    ("plain", [44, 15]), ("tied", [44, 15]),
    ("plain", {"embed_tokens": [15], "lm_head": [4, 44]}),
    ("tied", {"lm_head": [4, 44]}),  # the head's rows alone: PEFT (and Ember) untie it
])
def test_continued_trainable_tokens_train_as_peft(bases, tmp_path, base, indices, kind):
    """PEFT trains the trainable_token_indices rows of a continued adapter (its
    trainable_tokens_delta) and no other row; Ember left them frozen (the saved rows came back
    unchanged). AdamW with weight decay: the decay touches those rows only, as PEFT's."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
            trainable_token_indices=indices))
        _new_token_rows(pm.base_model.model)
        pm.save_pretrained(tmp_path / "ad")
    _peft_step(bases[base], tmp_path / "ad", tmp_path / "peft", kind)
    model = _ember_step(bases[base], tmp_path / "ad", tmp_path / "ember", kind)
    _assert_same_adapters(tmp_path / "ember", tmp_path / "peft")
    before = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    after = load_file(tmp_path / "ember" / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if "trainable_tokens" in k)
    # every other row is still the base's own
    hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32)
    rows = indices if isinstance(indices, list) else indices.get("embed_tokens", [])
    others = [i for i in range(VOCAB) if i not in rows]
    assert torch.equal(model.embed.weight.detach()[others],
                       hf.get_input_embeddings().weight.detach()[others])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("base,kw", [
    ("plain", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})),
    ("plain", dict(target_modules=["q_proj", "o_proj"], use_rslora=True)),
    ("plain", dict(target_modules=["q_proj", "gate_proj"], use_dora=True)),
    ("plain", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True)),  # was refused
    ("plain", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("plain", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("biased", dict(target_modules=["q_proj", "o_proj"], bias="lora_only")),
    ("biased", dict(target_modules=["q_proj"], bias="all")),
    ("plain", dict(target_modules=["q_proj", "embed_tokens"])),
    ("tied", dict(target_modules=["q_proj", "embed_tokens"])),
    # a tied model: PEFT trains an untied copy of the listed module (Ember unties its head)
    ("tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("tied", dict(target_modules=["q_proj", "embed_tokens", "lm_head"])),  # two adapters
])
def test_continued_adapter_steps_as_peft(bases, tmp_path, base, kw, kind):
    """One step on a continued adapter is PEFT's step: the same tensors trained by the same
    amounts, saved under PEFT's keys."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     **kw))
        if kw.get("bias", "none") != "none":
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if n.endswith("bias"):
                        p.add_(0.1)
        pm.save_pretrained(tmp_path / "ad")
    _peft_step(bases[base], tmp_path / "ad", tmp_path / "peft", kind)
    model = _ember_step(bases[base], tmp_path / "ad", tmp_path / "ember", kind,
                        kw.get("bias", "none"))
    _assert_same_adapters(tmp_path / "ember", tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        want = theirs(input_ids=IDS).logits
        assert (model.eval()(IDS) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())


def test_trainable_tokens_take_the_adapter_lr_not_embedding_lr(bases, tmp_path):
    """lora.embedding_lr is the lr of the embedding's LoRA (PEFT's LoRA+ loraplus_lr_embedding,
    Unsloth's embedding_learning_rate); trainable_token_indices rows (PEFT's
    trainable_tokens_delta) train at the adapters' lr there. Ember gave the rows embedding_lr:
    one AdamW step now equals PEFT's create_loraplus_optimizer step."""
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"],
                                                               dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
            init_lora_weights=False, trainable_token_indices={"lm_head": [4, 44]}))
        _new_token_rows(pm.base_model.model)
        pm.save_pretrained(tmp_path / "ad")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"],
                                                               dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad", is_trainable=True)
        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=0.05, loraplus_lr_ratio=1.0,
                                        loraplus_lr_embedding=0.4)
        _loss(pm(input_ids=IDS).logits).backward()
        opt.step()
        pm.save_pretrained(tmp_path / "peft")
    model, _ = load_pretrained(bases["plain"], "float32")
    load_adapter(model, tmp_path / "ad")
    _train_saved_modules(model, lora_modules(model), "none")
    opt = make_optimizer(model, OptimConfig(lr=0.05), "cpu", embedding_lr=0.4)
    for g in opt.param_groups:  # as the trainer sets the scheduled lr
        g["lr"] = 0.05 * g.get("lr_ratio", 1.0)
    _loss(model.train()(IDS)).backward()
    opt.step()
    save_adapter(model, tmp_path / "ember")
    _assert_same_adapters(tmp_path / "ember", tmp_path / "peft")


@pytest.mark.parametrize("rows,hidden", [
    (list(range(3, 99, 6)), 256),  # 16 rows x 256 = 4096 values: 8-bit, a block per row
    ([44, 3], 64),  # 128 values (< 4096): bnb's 32-bit states
    (list(range(97, 1, -2)), 96),  # 48 x 96: 8-bit, blocks across rows, indices not sorted
])
def test_trainable_tokens_keep_8bit_states_as_transformers_trainer(tmp_path, rows, hidden):
    """transformers' Trainer (optim="adamw_bnb_8bit") keeps 32-bit bnb states for nn.Embedding
    weights only; PEFT's trainable_tokens_delta is no nn.Embedding, so its rows get 8-bit states
    (>= 4096 values). Ember gave the embedding's trained rows 32-bit states (the table is an
    nn.Embedding): three steps now move the rows as the Trainer's optimizer moves the delta.
    The delta (rows x D, in the indices' order) is what bnb steps: its size picks 8 or 32 bits
    and its values make the 256-value blocks; Ember stepped the whole table (8-bit states for
    2 new tokens, blocks of the table's rows: 4e-4 off the Trainer's rows after 2 steps)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB + 8, hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                     trainable_token_indices=rows))
        pm.save_pretrained(tmp_path / "ad")
        args = transformers.TrainingArguments(tmp_path / "out", optim="adamw_bnb_8bit",
                                              learning_rate=1e-2, weight_decay=0.0,
                                              report_to=[], use_cpu=True)
        theirs = transformers.Trainer(model=pm, args=args).create_optimizer()
    delta = next(p for n, p in pm.named_parameters() if "trainable_tokens_delta" in n)
    model, _ = load_pretrained(tmp_path / "m", "float32")
    load_adapter(model, tmp_path / "ad")
    _train_saved_modules(model, lora_modules(model), "none")
    ours = make_optimizer(model, OptimConfig(name="adamw_8bit", lr=1e-2, weight_decay=0.0),
                          "cpu")
    w = model.embed.weight
    assert torch.equal(w.detach()[rows], delta.detach())
    try:
        for t in range(3):
            g = torch.randn(delta.shape, generator=torch.Generator().manual_seed(t))
            delta.grad = g * 10.0 ** (t - 1)
            w.grad = torch.zeros_like(w)
            w.grad[rows] = delta.grad
            theirs.step()
            ours.step()
            assert torch.allclose(w.detach()[rows], delta.detach(), rtol=0, atol=1e-7), (
                (w.detach()[rows] - delta.detach()).abs().max())
    finally:
        bnb.optim.GlobalOptimManager.get_instance().initialize()  # the Trainer's overrides


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("continue_phi3") / "phi3",
                             transformers.Phi3Config, seed=5, pad_token_id=None, eos_token_id=2)


def _phi3_adapter(base, out, targets) -> torch.Tensor:
    """A PEFT adapter on Phi-3 (random A and B) saved to out; PEFT's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
        pm.save_pretrained(out)
        with torch.no_grad():
            return pm.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("targets", [["qkv_proj", "o_proj"], "all-linear"])
def test_phi3_fused_adapter_continues_with_peft_logits(phi3, tmp_path, targets):
    """A PEFT adapter on Phi-3's fused qkv_proj / gate_up_proj as a run's model.init: the run
    starts from PEFT's logits (resolve_start named the fused modules as [lora] targets, which
    match none of Ember's per-projection modules: the run was refused)."""
    from ember.engine.config import load_config
    from ember.engine.stages import continue_adapters, resolve_start, start_of

    base = phi3
    want = _phi3_adapter(base, tmp_path / "ad", targets)
    cfg = resolve_start(load_config(None, [f'model.name="{base}"', 'device="cpu"',
                                           f'model.init="{tmp_path / "ad"}"',
                                           f'run_dir="{tmp_path / "run"}"']))
    model, _ = load_pretrained(base, "float32")
    continue_adapters(model, cfg, None, start_of(cfg))
    with torch.no_grad():
        assert (model.eval()(IDS) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_phi3_fused_adapter_steps_as_peft(phi3, tmp_path, kind):
    """PEFT's qkv_proj / gate_up_proj have one A each, shared by their parts: a step on the
    continued adapter moves it by the sum of the parts' gradients, and the adapter saved is
    PEFT's (rank r). Ember's parts had their own copies of A, each moved by its own gradient
    (logits 0.85 off PEFT's after one SGD step, saved as a rank-3r adapter)."""
    _phi3_adapter(phi3, tmp_path / "ad", ["qkv_proj", "gate_up_proj", "down_proj"])
    _peft_step(phi3, tmp_path / "ad", tmp_path / "peft", kind)
    model = _ember_step(phi3, tmp_path / "ad", tmp_path / "ember", kind)
    _assert_same_adapters(tmp_path / "ember", tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        want = theirs(input_ids=IDS).logits
        assert (model.eval()(IDS) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())
