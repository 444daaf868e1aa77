"""Training a mixture-of-experts model through the real trainer: LoRA on attention and experts
(router frozen), QLoRA with NF4 experts, the load-balancing loss (its coefficient, its log row)
and MLP token chunking, which gives the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.activation import apply_activation_checkpointing, set_mlp_chunks
from ember.engine.cli import main as cli
from ember.engine.runtime import build_model
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve
from ember.models import ModelConfig, Transformer
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import lora_modules
from ember.models.moe import MoE, collect_router_stats, load_balancing_loss
from ember.models.nf4 import Linear4bit
from tests.engine._shared_launch import shares_launch
from tests.engine._tiny import quiet, rows_of, tiny_config


def _moe_model(tiny, folder, experts: int = 4, k: int = 2) -> str:
    """A random 2-layer Qwen3-MoE with the tiny fixture's tokenizer, saved to folder."""
    _, tok = load_pretrained(tiny["model"])
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=len(tok), hidden_size=64,
                      intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      qk_norm=True, num_experts=experts, num_experts_per_tok=k,
                      moe_intermediate_size=32, norm_topk_prob=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=256)
    model = Transformer(cfg).init_weights(std=0.05, seed=3)
    save_pretrained(model, folder, tok)
    return str(folder)


@pytest.fixture(scope="module")
def moe_tiny(tiny, tmp_path_factory):
    """The tiny fixture's data with a Qwen3-MoE (4 experts, top 2)."""
    return {**tiny, "model": _moe_model(tiny, tmp_path_factory.mktemp("moe") / "model")}


def _run(moe_tiny, run_dir, *extra):
    cfg = resolve(tiny_config(moe_tiny, run_dir, "eval.metrics=[]", "eval.before=false",
                              "eval.val_loss=false",
                              "checkpoint.save_final=false", *extra))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    return t, [r for r in rows_of(run_dir) if r["kind"] == "train"]


def test_lora_on_attention_and_experts_trains_router_frozen(moe_tiny, tmp_path):
    """The run trains, saves its PEFT adapter (experts as target_parameters), and ``ember export
    --merged`` writes a Qwen3-MoE folder transformers loads with the trained model's logits."""
    run = tmp_path / "run"
    t, rows = _run(moe_tiny, run, "max_steps=8", "optim.lr=2e-2", "checkpoint.save_final=true")
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3]) * 0.9, losses
    assert all(r["router_aux_loss"] > 0 for r in rows)  # logged apart from the loss
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert any(".mlp.experts.3.down_proj.lora_B" in n for n in trainable)
    assert any(".attn.q_proj.lora_A" in n for n in trainable)
    assert all("lora_" in n for n in trainable)  # the routers stay frozen
    base, _ = load_pretrained(moe_tiny["model"])
    assert torch.equal(t.model.layers[1].mlp.gate.weight, base.layers[1].mlp.gate.weight)

    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, base.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = t.model.eval()(ids)
        again, _, _ = load_run_model(run, "cpu")  # the final adapter loaded back
        assert (again.eval()(ids) - want).abs().max() <= 1e-5
    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() <= 1e-4


def test_aux_coefficient(moe_tiny, tiny, tmp_path):
    """model.router_aux_loss_coef: 0 turns the loss off (no log row, other updates), a dense model
    refuses it."""
    # no warmup: step 1 trains (a warmup's first lr is 0), so the aux loss changes step 2
    _, on = _run(moe_tiny, tmp_path / "on", "max_steps=2", "model.router_aux_loss_coef=5.0",
                 "optim.warmup_steps=0")
    _, off = _run(moe_tiny, tmp_path / "off", "max_steps=2", "model.router_aux_loss_coef=0",
                  "optim.warmup_steps=0")
    assert on[0]["loss"] == off[0]["loss"]  # the same weights see the same first batch
    assert on[1]["loss"] != off[1]["loss"]  # the aux gradient changed the first update
    assert "router_aux_loss" in on[0] and "router_aux_loss" not in off[0]
    cfg = resolve(tiny_config(tiny, tmp_path / "dense", "max_steps=1",
                              "model.router_aux_loss_coef=0.01"))
    with pytest.raises(EmberError, match="not a mixture-of-experts"):
        Trainer(cfg, echo=quiet, progress=False).run()


def test_qlora_quantizes_experts_not_routers(moe_tiny, tmp_path):
    t, rows = _run(moe_tiny, tmp_path / "q", "max_steps=3", "optim.lr=2e-2",
                   'model.quantize="nf4"', "lora.targets=['up','down','q']",
                   "optim.warmup_steps=0")  # step 1 trains too
    mods = dict(t.model.named_modules())
    assert isinstance(mods["layers.0.mlp.experts.2.up_proj.base"], Linear4bit)
    assert isinstance(mods["layers.0.mlp.gate"], torch.nn.Linear)
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["loss"] < rows[0]["loss"]


def test_mlp_chunks_and_checkpointing_give_the_same_loss_and_gradients(moe_tiny):
    """activations.mlp_chunk_tokens runs an MoE branch in token chunks: the load-balancing sums
    add up to the one-pass loss, and the gradients agree; so do checkpointed blocks."""
    model, _ = load_pretrained(moe_tiny["model"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 23), generator=gen)

    def grads():
        model.zero_grad()
        with collect_router_stats(model) as stats:
            out = model(ids).square().mean()
        aux = load_balancing_loss(stats, model.cfg.num_experts)
        (out + aux).backward()
        return aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}

    aux, ref = grads()
    set_mlp_chunks(model, 5)
    aux_c, got = grads()
    assert abs(aux - aux_c) <= 1e-6
    assert set(got) == set(ref) and all((got[n] - ref[n]).abs().max() <= 1e-6 for n in ref)
    # activation checkpointing recomputes the routing in backward: the same gradients
    set_mlp_chunks(model, 0)
    apply_activation_checkpointing(model, "every_block")
    aux_k, got = grads()
    assert abs(aux - aux_k) <= 1e-6
    assert set(got) == set(ref) and all((got[n] - ref[n]).abs().max() <= 1e-6 for n in ref)
    assert any(isinstance(m, MoE) for m in model.modules())


_FSDP_EXTRA = ('method="full"', "optim.lr=3e-3", "eval.metrics=[]", "eval.before=false",
               "eval.val_loss=false", "checkpoint.save_final=false", "max_steps=3",
               "data.tokens_per_batch=40", "data.max_seq_len=40")


def _fsdp_plan(tiny, folder) -> list[dict]:
    from ember.engine.config import to_toml

    moe_tiny = {**tiny, "model": _moe_model(tiny, folder / "model", experts=16, k=1)}
    cfg = folder / "two.toml"
    cfg.write_text(to_toml(tiny_config(moe_tiny, folder / "two", "eval.metrics=[]",
                                       "eval.before=false", "eval.val_loss=false", *_FSDP_EXTRA)))
    return [{"name": "two", "args": [str(cfg)]}]


@pytest.mark.slow
@shares_launch(_fsdp_plan)  # the two-process run
def test_fsdp_two_processes_match_one(tiny, launched):
    """Full fine-tuning under torchrun (FSDP2 per block) of 16 experts, top 1, on small batches:
    experts idle on one rank and busy on the other still reduce together, and 2 processes log
    what 1 process with grad_accum 2 logs (losses and the load-balancing loss)."""
    from tests.engine.test_distributed import _same_rows

    tmp_path, _ = launched
    moe_tiny = {**tiny, "model": str(tmp_path / "model")}
    _run(moe_tiny, tmp_path / "one", *_FSDP_EXTRA, "grad_accum=2")
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert [r for r in one if r["kind"] == "train"][0]["router_aux_loss"] > 0
    _same_rows([r for r in two if r["kind"] == "train"], [r for r in one if r["kind"] == "train"])


def test_a_moe_classifier_trains_without_the_aux_loss_as_transformers(tiny, tmp_path):
    """transformers' MoE ``*ForSequenceClassification`` never adds the load-balancing loss (not
    even with ``output_router_logits``); an Ember classifier run adds it only when
    ``model.router_aux_loss_coef`` is set (was: the checkpoint's coefficient, silently)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForSequenceClassification

    from tests.engine._tiny import write_jsonl
    from tests.engine.test_classification import animal_rows, cls_config

    _, tok = load_pretrained(tiny["model"])
    hf_cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, max_position_embeddings=256,
                            output_router_logits=True, router_aux_loss_coef=0.5, num_labels=2,
                            id2label={0: "none", 1: "animal"}, label2id={"none": 0, "animal": 1},
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    hf = Qwen3MoeForSequenceClassification(hf_cfg).eval()
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1])
    out = hf(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits, labels)
    assert abs(out.loss.item() - ce.item()) <= 1e-6  # the oracle: no aux term
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    task = {"model": str(folder), **{s: write_jsonl(tmp_path / f"{s}.jsonl", animal_rows(16, i))
                                      for i, s in enumerate(("train", "val", "test"))}}
    extra = ("max_steps=1", "eval.before=false", "eval.val_loss=false", "eval.metrics=[]",
             "checkpoint.save_final=false")
    t = Trainer(resolve(cls_config(task, tmp_path / "run", *extra)), echo=quiet, progress=False)
    t.run()
    assert t.aux_coef == 0.0
    rows = [r for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert rows and all("router_aux_loss" not in r for r in rows)
    on = cls_config(task, tmp_path / "on", *extra, "model.router_aux_loss_coef=0.5")
    t = Trainer(resolve(on), echo=quiet, progress=False)
    t.run()
    assert [r for r in rows_of(tmp_path / "on") if r["kind"] == "train"][0]["router_aux_loss"] > 0


def test_aux_loss_under_gradient_accumulation_is_the_mean_over_micro_batches(moe_tiny, tmp_path,
                                                                             monkeypatch):
    """A step's load-balancing term is the unweighted mean of its micro-batches' aux losses, as
    TRL 1.16 averages it (trl/trainer/sft_trainer.py ``compute_loss``: ``loss + coef * aux /
    current_gradient_accumulation_steps``; its DPO and KTO divide the whole loss by them). Ember
    weighted each micro-batch by its share of the step's tokens (gradient norm 7.7210 here, TRL
    7.7304). The oracle: transformers' Trainer (Qwen3-MoE with ``output_router_logits``), which
    adds ``coef * aux`` to each micro-batch's loss whole, run with ``coef / 3`` for grad_accum 3
    (TRL's rule; the plain Trainer's own sum is 3x that). Same micro-batches of different sizes:
    the step's gradient norm, logged loss and weights are TRL's."""
    from transformers import AutoModelForCausalLM

    from tests.engine.test_hf_trainer_parity import IGNORE, _ember_run, _hf_trainer

    coef = 5.0
    cfg, steps, rows, _ = _ember_run(moe_tiny, tmp_path / "run", monkeypatch, 'method="full"',
                                     "grad_accum=3", "max_steps=1", "optim.lr=1e-3",
                                     "optim.warmup_steps=0", "optim.max_grad_norm=0",
                                     "optim.eps=1e-3",  # (no Adam sign noise on tiny gradients)
                                     f"model.router_aux_loss_coef={coef}")
    assert len(steps[0]) == 3
    sizes = [int((b["attention_mask"]).sum()) for b in steps[0]]
    assert len(set(sizes)) > 1, sizes  # micro-batches of different token counts
    assert all(int((b["labels"] != IGNORE).sum()) for b in steps[0])
    model = AutoModelForCausalLM.from_pretrained(moe_tiny["model"], dtype=torch.float32,
                                                 output_router_logits=True,
                                                 router_aux_loss_coef=coef / 3)
    hf = _hf_trainer(model, cfg, steps, tmp_path / "hf", logging_steps=1)
    (theirs,) = [h for h in hf.state.log_history if "loss" in h]
    assert rows[0]["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    # the Trainer logs the aux term inside its loss; Ember logs it (the mean) apart
    assert rows[0]["loss"] + coef * rows[0]["router_aux_loss"] == pytest.approx(theirs["loss"],
                                                                                rel=1e-5)
    # Ember's result read by transformers (its 3-D expert stacks too); atol: far below the
    # step's update (lr 1e-3), above float noise
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model",
                                                dtype=torch.float32).state_dict()
    for name, p in hf.model.state_dict().items():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=1e-5, msg=name)


def test_a_lora_run_on_experts_continues_as_a_stage(moe_tiny, tmp_path):
    """model.init on a LoRA run with adapters on the experts: its adapter holds PEFT's
    rank_pattern (the fused gate_up_proj at rank 2r); the stage was refused as an adapter
    with per-module ranks."""
    run = tmp_path / "one"
    one, _ = _run(moe_tiny, run, "max_steps=1", "optim.warmup_steps=0",
                  "checkpoint.save_final=true")
    cfg = resolve(tiny_config(moe_tiny, tmp_path / "two", f'model.init="{run}"'))
    assert (cfg.lora.rank, cfg.lora.alpha) == (4, 8.0)
    # the stage starts from the trained adapters exactly, each expert's gate and up at rank r
    mine, theirs = lora_modules(one.model), lora_modules(build_model(cfg, "cpu")[0])
    assert sorted(mine) == sorted(theirs)
    for n, m in mine.items():
        assert theirs[n].rank == m.rank and torch.equal(theirs[n].lora_B, m.lora_B), n
