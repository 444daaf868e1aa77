"""Sequential stages (``model.init``): a stage starts exactly where the previous one ended
(its first loss and its "before" validation loss are the previous run's final ones), a
continued LoRA adapter keeps its shape, DPO after SFT uses the SFT model as its reference, and
unusable or mismatched starts are clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ember import EmberError
from ember.engine.cli import main as cli
from ember.engine.config import to_toml
from ember.engine.data import PackedBatches, load_datasets
from ember.engine.losses import sft_loss
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve, train
from ember.models.lora import lora_state_dict
from tests.engine._tiny import WORDS, make_tiny_model, quiet, rows_of, tiny_config, write_jsonl

FAST = ("eval.metrics=[]", "optim.warmup_steps=0", 'optim.schedule="constant"')


def _stage(tiny, run, *extra):
    t = Trainer(tiny_config(tiny, run, *FAST, *extra), echo=quiet, progress=False)
    res = t.run()
    return t, res


def _first_loss(run) -> float:
    return next(r["loss"] for r in rows_of(run) if r["kind"] == "train")


@pytest.fixture(scope="module")
def sft_lora(tiny, tmp_path_factory):
    """Stage 1: LoRA SFT on q/v only, rank 4, trained far enough that B is far from 0."""
    run = tmp_path_factory.mktemp("stages") / "sft"
    _stage(
        tiny,
        run,
        "max_steps=6",
        "optim.lr=1e-2",
        'lora.targets=["q", "v"]',
        f'data.train=["{tiny["small"]}"]',
    )
    return run


def test_lora_stage_continues_exactly(tiny, sft_lora, tmp_path):
    stage1 = [r for r in rows_of(sft_lora) if r["kind"] == "eval"][-1]
    run = tmp_path / "s2"
    t, res = _stage(tiny, run, "max_steps=2", f'model.init="{sft_lora}"', "lora.dropout=0.1")
    # rank / alpha / targets come from the adapter; a changed training setting (dropout) applies.
    lora = t.cfg.lora
    assert (lora.rank, lora.alpha, lora.targets, lora.dropout) == (
        4,
        8.0,
        ("q_proj", "v_proj"),
        0.1,
    )
    assert "rank = 4" in (run / "config.toml").read_text()  # the resolved config records it
    assert res.before["val_loss"] == stage1["val_loss"]
    # Step 1's loss is the stage-1 model's loss on stage 2's first batch (dropout off there).
    model, tok, _ = load_run_model(sft_lora, "cpu")
    examples = load_datasets(t.cfg.data, tok).train
    batch = next(iter(PackedBatches.from_config(examples, t.cfg.data)))
    with torch.no_grad():
        ref = float(sft_loss(model.eval(), batch, batch.num_loss_tokens))
    # Through `ember train CONFIG.toml`, with [model] init in the file.
    run_b = tmp_path / "s2b"
    toml = tmp_path / "stage2.toml"
    toml.write_text(
        # A full dump writes every [lora] key: they must agree with the adapter's.
        to_toml(tiny_config(tiny, run_b, *FAST, "max_steps=1", "plot=false",
                            'lora.targets=["q_proj", "v_proj"]')).replace(
            "[model]\n", f"[model]\ninit = {json.dumps(str(sft_lora))}\n"
        )
    )
    assert cli(["train", str(toml)]) == 0
    assert _first_loss(run_b) == pytest.approx(ref, rel=1e-6)
    # The continued adapter moved on from stage 1's, on the same modules, for the same base.
    a = lora_state_dict(load_run_model(sft_lora, "cpu")[0])
    b = lora_state_dict(load_run_model(run, "cpu")[0])
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny["model"]


@pytest.mark.parametrize(
    "first,second", [("full", "full"), ("lora", "full"), ("full", "lora"), ("prompt", "prompt")]
)
def test_stages_across_methods_start_from_the_previous_result(tiny, tmp_path, first, second):
    extra = {
        "full": ('method="full"', "optim.lr=1e-3"),
        "lora": ("optim.lr=1e-2",),
        "prompt": ('method="prompt"', "prompt_tuning.num_virtual_tokens=3"),
    }
    small = f'data.train=["{tiny["small"]}"]'
    _, r1 = _stage(tiny, tmp_path / "a", "max_steps=3", small, *extra[first])
    _, r2 = _stage(
        tiny, tmp_path / "b", "max_steps=1", small, *extra[second], f'model.init="{tmp_path / "a"}"'
    )
    exact = first == second
    assert r2.before["val_loss"] == pytest.approx(r1.after["val_loss"], rel=0 if exact else 1e-5)
    assert r1.after["val_loss"] != pytest.approx(r1.before["val_loss"], rel=1e-3)  # it trained
    # The result loads back on the right base (full -> lora: stage 1's model, not model.name).
    model, _, _ = load_run_model(tmp_path / "b", "cpu")
    assert model is not None


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rows = []
    for i in range(6):
        w = WORDS[i]
        rows.append({"prompt": f"say {w} blue ->", "chosen": f" {w}", "rejected": " moon"})
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "p.jsonl", rows)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_after_sft_uses_the_sft_model_as_reference(tiny, sft_lora, prefs, tmp_path, method):
    init = sft_lora
    if method == "full":
        init = tmp_path / "sft_full"
        _stage(
            tiny,
            init,
            "max_steps=3",
            'method="full"',
            "optim.lr=1e-3",
            f'data.train=["{tiny["small"]}"]',
        )
    dpo = (
        'objective="dpo"',
        f'data.train=["{prefs}"]',
        f'data.validation="{prefs}"',
        'data.test=""',
        "max_steps=3",
        f'method="{method}"',
        f'model.init="{init}"',
    )
    t, res = _stage(tiny, tmp_path / "dpo", *[d for d in dpo if d != 'data.test=""'])
    # Policy == reference at the start: every reward is 0 and the loss is log 2. With the base
    # model as the reference (adapters off) the SFT stage's rewards would not be 0.
    assert res.before["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert res.before["val_chosen_reward"] == pytest.approx(0.0, abs=1e-6)
    assert _first_loss(tmp_path / "dpo") == pytest.approx(math.log(2), abs=1e-6)
    assert res.after["val_reward_margin"] > 0
    if method == "lora":  # the reference stays the loaded adapter while training moves on
        start = lora_state_dict(load_run_model(sft_lora, "cpu")[0])
        ref = {f"{n}.{k}": v for n, d in t.objective.ref_adapters.items() for k, v in d.items()}
        assert ref.keys() == start.keys()
        assert all(torch.equal(v, start[k]) for k, v in ref.items())
        now = lora_state_dict(t.model)
        assert any(not torch.equal(now[k], start[k]) for k in start)


def test_start_errors(tiny, sft_lora, tmp_path):
    def cfg(*extra):
        return resolve(tiny_config(tiny, tmp_path / "x", *extra))

    with pytest.raises(EmberError, match=r"lora.rank = 8 conflicts .*\(rank 4\)"):
        cfg(f'model.init="{sft_lora}"', "lora.rank=8")
    # A value equal to the default is still a choice the adapter contradicts (not dropped).
    with pytest.raises(EmberError, match=r"lora.rank = 16 conflicts .*\(rank 4\)"):
        cfg(f'model.init="{sft_lora}"', "lora.rank=16")
    with pytest.raises(EmberError, match=r"lora.alpha = 32.0 conflicts"):
        cfg(f'model.init="{sft_lora}"', "lora.alpha=32")
    with pytest.raises(EmberError, match="lora.targets .* conflicts"):
        cfg(f'model.init="{sft_lora}"', 'lora.targets=["q", "k"]')
    assert cfg(f'model.init="{sft_lora}"', 'lora.targets=["v", "q"]').lora.rank == 4
    with pytest.raises(EmberError, match="does not exist"):
        cfg(f'model.init="{tmp_path / "nope"}"')
    with pytest.raises(EmberError, match="is a model folder: set model.name"):
        cfg(f'model.init="{tiny["model"]}"')
    with pytest.raises(EmberError, match=r"is a folder inside the run .*: give the run directory"):
        cfg(f'model.init="{sft_lora / "final"}"')
    with pytest.raises(EmberError, match="is this run's own run_dir: .* another run_dir"):
        resolve(tiny_config(tiny, sft_lora, f'model.init="{sft_lora}"'))
    with pytest.raises(EmberError, match="holds a LoRA adapter, which a method = 'prompt'"):
        cfg(f'model.init="{sft_lora}"', 'method="prompt"')
    # Another base model: named by the run, or by the adapter's config.
    other = str(make_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(EmberError, match="was trained on the base model .* set model.name"):
        cfg(f'model.init="{sft_lora}"', f'model.name="{other}"')
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_lora / "final" / "adapter", adapter)
    with pytest.raises(EmberError, match="was trained on the base model"):
        cfg(f'model.init="{adapter}"', f'model.name="{other}"')
    # No recorded base: the shapes decide.
    c = json.loads((adapter / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(c))
    from safetensors.torch import load_file, save_file

    w = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in w.items()},
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(EmberError, match="model.init .* do not fit this model"):
        train(cfg(f'model.init="{adapter}"', "max_steps=1"), echo=quiet, progress=False)
    unfinished = tmp_path / "unfinished"
    _stage(tiny, unfinished, "max_steps=2", "checkpoint.every_steps=1",
           "checkpoint.save_final=false", "eval.val_loss=false")
    # (was: "finish it with ember train --resume", which writes no final/ either)
    with pytest.raises(EmberError, match=r"has no final/adapter: it ran with checkpoint.save_final "
                                         r"= false; export its weights with `ember export .* "
                                         r"--adapter DIR`"):
        cfg(f'model.init="{unfinished}"')
    # A checkpoint folder holds a config.toml too (was: taken for an unfinished run, with advice
    # that fails on it: `ember train CKPT --resume`, `ember export CKPT`)
    ckpt = unfinished / "checkpoints" / "step_00000001"
    assert (ckpt / "config.toml").is_file()
    with pytest.raises(EmberError, match=r"is a training checkpoint, not a run directory: give the "
                                         rf"run directory '{unfinished}'"):
        cfg(f'model.init="{ckpt}"')
    from ember.engine.cli import main

    assert main(["export", str(unfinished), "--adapter", str(tmp_path / "exported")]) == 0
    assert cfg(f'model.init="{tmp_path / "exported"}"').lora.rank == 4  # the advice works


def test_continued_adapter_notes_the_lora_settings_it_ignores(tiny, sft_lora, tmp_path):
    """A continued adapter keeps its own rank, alpha, targets, rsLoRA, DoRA and weights: the
    [lora] keys that set them (lora.init = "gaussian": a draw never made, the weights are
    loaded) are noted as ignored, as ember train notes every setting a run does not use (was:
    silently dropped); training settings (dropout) are not. A new adapter on the same base uses
    them all."""
    from ember.engine.config_doc import unused_settings

    lora = ('lora.init="gaussian"', 'lora.targets=["q", "v"]', "lora.dropout=0.1")
    cfg = tiny_config(tiny, tmp_path / "x", f'model.init="{sft_lora}"', *lora)
    assert unused_settings(cfg) == [
        "lora.alpha, lora.init, lora.rank, lora.targets ignored: the LoRA adapter continued from "
        "model.init keeps its own shape and weights (they apply to a new adapter)"]
    assert unused_settings(tiny_config(tiny, tmp_path / "y", *lora)) == []
    assert (resolve(cfg).lora.rank, resolve(cfg).lora.dropout) == (4, 0.1)


def test_a_finished_stage_loads_without_the_adapter_it_started_from(tiny, sft_lora, tmp_path):
    """A LoRA stage continued from an adapter holds the whole adapter in final/adapter, on
    model.name: deleting the earlier adapter (model.init) afterwards loses nothing (was: export
    --merged, eval and generate failed with "the run's model.init ... not found: set model.init
    there to the model's absolute path"). Oracle: transformers + PEFT on final/adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    earlier = tmp_path / "earlier"
    shutil.copytree(sft_lora / "final" / "adapter", earlier)
    run = tmp_path / "s2"
    _stage(tiny, run, "max_steps=1", f'model.init="{earlier}"')
    shutil.rmtree(earlier)
    assert cli(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    model, _, _ = load_run_model(run, "cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "final" / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        want = peft(ids).logits
        torch.testing.assert_close(model.eval()(ids), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-5)


def test_resumed_dpo_stage_keeps_the_stage1_reference(tiny, sft_lora, prefs, tmp_path):
    """The reference is the adapter as loaded from model.init, not the checkpoint's: a DPO stage
    stopped and resumed logs what an uninterrupted one does."""
    extra = (
        'objective="dpo"',
        f'data.train=["{prefs}"]',
        f'data.validation="{prefs}"',
        "max_steps=4",
        "checkpoint.every_steps=2",
        "eval.every_steps=2",
        f'model.init="{sft_lora}"',
        *FAST,
    )
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=2)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)


def test_adapters_swapped_is_the_snapshot_without_dropout():
    from ember.engine.stages import adapter_snapshot, adapters_swapped
    from ember.models.lora import lora_modules
    from tests.engine._tiny import CFG, make_model

    model = make_model("lora")
    for m in lora_modules(model).values():
        m.dropout = torch.nn.Dropout(0.5)
        torch.nn.init.normal_(m.lora_B)
    snap = adapter_snapshot(model)
    ids = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        want = model.eval()(ids)
    model.train()
    before = lora_state_dict(model)
    for m in lora_modules(model).values():  # training moves the adapter on
        torch.nn.init.normal_(m.lora_A)
    moved = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with torch.no_grad(), adapters_swapped(model, snap) as ref:
        assert torch.equal(ref(ids), want) and torch.equal(ref(ids), want)
        assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items())
    assert all(torch.equal(v, moved[k]) for k, v in lora_state_dict(model).items())
    assert all(m.dropout is not None for m in lora_modules(model).values())


def test_adapters_swapped_restores_the_other_trained_parameters_too():
    """A continued adapter with modules_to_save trains a whole embedding beside A and B: the
    DPO / KTO reference (the starting adapter) must have the starting embedding too."""
    from ember.engine.stages import adapter_snapshot, adapters_swapped
    from tests.engine._tiny import CFG, make_model

    model = make_model("lora").eval()
    model.embed.weight.requires_grad_(True)  # as _train_saved_modules sets it
    snap = adapter_snapshot(model)
    ids = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        want = model(ids)
        model.embed.weight.add_(0.5)  # training moves it on
    moved = model.embed.weight.detach().clone()
    with torch.no_grad(), adapters_swapped(model, snap) as ref:
        assert torch.equal(ref(ids), want)
    assert torch.equal(model.embed.weight, moved)


def test_continued_mica_adapter_trains_a_only_as_peft(tiny, tmp_path):
    """PEFT's MiCA (init_lora_weights = "mica") freezes lora_B, the base weight's minor
    singular vectors, and trains A alone; a MiCA adapter continued with model.init trained B
    too (another adapter than PEFT's training gives)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights="mica", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n for n in trainable)  # PEFT: A only
    with torch.no_grad():  # a trained A (MiCA starts at A = 0)
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "mica")
    run = tmp_path / "s2"
    t, _ = _stage(tiny, run, "max_steps=2", "optim.lr=1e-2", f'model.init="{tmp_path / "mica"}"')
    ours = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert ours and all(n.endswith("lora_A") for n in ours), sorted(ours)
    from safetensors.torch import load_file

    before = load_file(tmp_path / "mica" / "adapter_model.safetensors")
    after = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        if "lora_B" in k:
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    # The exported adapter is still MiCA: PEFT continuing it keeps B frozen too (it said plain
    # LoRA, whose B PEFT trains)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    again = peft.PeftModel.from_pretrained(hf2, run / "final" / "adapter", is_trainable=True)
    theirs = {n for n, p in again.named_parameters() if p.requires_grad}
    assert theirs and all("lora_A" in n for n in theirs), sorted(theirs)


def _trained_besides_lora(names) -> set[str]:
    """'<layer>.<module>.bias' / 'embed' of the trainable names that are not A / B (PEFT's or
    Ember's names)."""
    import re

    out = set()
    for n in names:
        if "lora_" in n:
            continue
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)\.", n)
        out.add(f"{m[1]}.{m[2]}.bias" if m and n.endswith("bias") else
                "embed" if "embed" in n else "lm_head" if "lm_head" in n else n)
    return out


@pytest.mark.parametrize("bias, saved", [("none", True), ("lora_only", False), ("all", False),
                                         ("none", "untied")])
def test_continued_adapter_trains_what_peft_trains(tiny, tmp_path, bias, saved):
    """A continued PEFT adapter trains what PeftModel.from_pretrained(is_trainable=True) does:
    its modules_to_save (here the tied embedding) and, with bias = "all" / "lora_only", the
    biases; Ember froze them all and trained A and B alone."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ember.models import ModelConfig, Transformer
    from ember.models.loading import load_pretrained, save_pretrained

    base, tok = load_pretrained(tiny["model"], "float32")
    folder = tmp_path / "qwen"  # q/k/v biases
    cfg = ModelConfig(**{**base.cfg.__dict__, "model_type": "qwen2", "attention_bias": True})
    save_pretrained(Transformer(cfg).init_weights(std=0.05, seed=1), folder, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias=bias,
                           task_type="CAUSAL_LM",
                           **({"modules_to_save": ["lm_head"],
                               "ensure_weight_tying": saved is True} if saved else {}))
    peft.get_peft_model(hf, lcfg).save_pretrained(tmp_path / "ad")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf2, tmp_path / "ad", is_trainable=True)
    want = _trained_besides_lora(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert want  # the case
    run = tmp_path / "r"
    t, _ = _stage(tiny, run, "max_steps=1", f'model.name="{folder}"',
                  f'model.init="{tmp_path / "ad"}"')
    ours = _trained_besides_lora(n for n, p in t.model.named_parameters() if p.requires_grad)
    assert ours == want
    # and the final adapter holds them: PEFT's logits are the trained model's
    hf3 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    final = peft.PeftModel.from_pretrained(hf3, run / "final" / "adapter").eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (final(input_ids=ids).logits - t.model.eval()(ids)).abs().max() < 1e-4


def test_adapter_stage_keeps_the_earlier_context_extension(tiny, tmp_path):
    """A LoRA run with model.rope_scaling: the next stage starts from its adapter on the base
    with that scaling (transformers + PEFT's model), though its config does not repeat it (was:
    the unscaled base, silently not the earlier result); another scaling is an error."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from ember.engine.stages import load_start

    ext = ('model.rope_scaling="linear"', "model.rope_factor=2.0")
    _stage(tiny, tmp_path / "a", "max_steps=2", "optim.lr=3e-2", "eval.val_loss=false", *ext)
    cfg = resolve(tiny_config(tiny, tmp_path / "b", *FAST, f'model.init="{tmp_path / "a"}"'))
    assert (cfg.model.rope_scaling, cfg.model.rope_factor) == ("linear", 2.0)
    model, _, _ = load_start(cfg, "float32", "cpu")
    hf_cfg = AutoConfig.from_pretrained(tiny["model"])
    hf_cfg.rope_parameters = {**hf_cfg.rope_parameters, "rope_type": "linear", "factor": 2.0}
    hf = AutoModelForCausalLM.from_pretrained(tiny["model"], config=hf_cfg, dtype=torch.float32)
    ref = PeftModel.from_pretrained(hf, str(tmp_path / "a" / "final" / "adapter")).eval()
    ids = torch.tensor([[5, 17, 33, 40, 2, 9, 100, 61, 7, 12, 90, 44]])
    with torch.no_grad():
        want, got = ref(ids).logits, model.eval()(ids)
    torch.testing.assert_close(getattr(got, "logits", got), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(EmberError, match=r"model.rope_scaling = 'yarn', rope_factor = 2 "
                                         r"conflicts .* rope_scaling = 'linear'"):
        resolve(tiny_config(tiny, tmp_path / "c", f'model.init="{tmp_path / "a"}"',
                            'model.rope_scaling="yarn"', "model.rope_factor=2.0"))


def test_continued_adapter_takes_the_configs_embedding_lr(tiny, tmp_path):
    """lora.embedding_lr is a training setting, not the adapter's shape: a continued adapter
    trains its embedding adapter at it (was: dropped, so at optim.lr). AdamW's first step moves
    each weight by about lr: ~1e-2 for the q adapter, ~1e-9 for the embedding's."""
    targets = 'lora.targets=["q", "embed_tokens"]'
    _stage(tiny, tmp_path / "a", "max_steps=2", "optim.lr=1e-2", "eval.val_loss=false", targets)
    _stage(tiny, tmp_path / "b", "max_steps=1", "optim.lr=1e-2", "eval.val_loss=false",
           "lora.embedding_lr=1e-9", "optim.weight_decay=0", f'model.init="{tmp_path / "a"}"')
    a = lora_state_dict(load_run_model(tmp_path / "a", "cpu")[0])
    b = lora_state_dict(load_run_model(tmp_path / "b", "cpu")[0])
    moved = {k: float((b[k] - a[k]).abs().max()) for k in a}
    emb = [k for k in a if "embed" in k]
    assert emb and all(moved[k] < 1e-7 for k in emb), moved
    assert max(moved[k] for k in a if k not in emb) > 1e-3, moved


def test_continued_adapter_without_lora_alpha_takes_peft_default(tiny, sft_lora, tmp_path):
    """An adapter_config.json without lora_alpha (older or hand-written): PEFT's LoraConfig and
    load_adapter take 8; continuing it as model.init was refused ("r and lora_alpha must be
    numbers")."""
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_lora / "final" / "adapter", adapter)
    c = json.loads((adapter / "adapter_config.json").read_text())
    del c["lora_alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(c))
    cfg = resolve(tiny_config(tiny, tmp_path / "x", f'model.init="{adapter}"'))
    assert (cfg.lora.rank, cfg.lora.alpha) == (4, 8.0)
