"""Continuing a PEFT adapter (``model.init``, made here by peft) under torchrun (FSDP2, 2 CPU
processes): what one process with twice the grad_accum does (test_continue_peft checks that one
process trains as PEFT does), or a clear refusal where FSDP cannot follow. The launch helpers are
test_distributed's."""

from __future__ import annotations

import contextlib
import io
import json
import random
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember.engine.cli import main
from tests.engine import _tiny as w
from tests.engine._shared_launch import shares_launch
from tests.engine._tiny import rows_of, write_jsonl
from tests.engine.test_distributed import _same_rows, sets, torchrun_train, write_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def make_adapter(tiny, folder, **kw):
    """A PEFT LoRA adapter (r=4, alpha=8, random B) on the tiny model, saved in ``folder``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"],
                                                               dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, **kw))
        pm.save_pretrained(folder)
    return folder


def test_an_embedding_adapter_loads_onto_a_meta_build(tiny, tmp_path):
    """PEFT saves the base embedding with an adapter on embed_tokens; loading it compares that
    copy with the model's own. A torchrun rank above 0 builds the model on "meta" (rank 0
    broadcasts the weights later), where the comparison crashed ("Cannot copy out of meta
    tensor"), so continuing such an adapter under torchrun failed on rank 1."""
    from ember.models.loading import load_pretrained
    from ember.models.peft_adapter import load_adapter

    make_adapter(tiny, tmp_path / "ad", target_modules=["q_proj", "embed_tokens"])
    real = load_adapter(load_pretrained(tiny["model"], "float32")[0], tmp_path / "ad")
    meta = load_adapter(load_pretrained(tiny["model"], "float32", "meta")[0], tmp_path / "ad")
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()}


def test_trainable_tokens_of_a_continued_adapter_are_refused_under_torchrun(tiny, tmp_path):
    """A PEFT adapter with trainable_token_indices (made by peft) continued under torchrun:
    one process trains those rows alone (a gradient hook, test_continue_peft), but fully_shard
    swaps the embedding for a DTensor Parameter without the hook, so two processes trained every
    row of the embedding (a silent wrong answer): refused on every rank, saying what to do."""
    make_adapter(tiny, tmp_path / "ad", target_modules=["q_proj"], trainable_token_indices=[5, 9])
    cfg = write_config(tiny, tmp_path / "two", f'model.init="{tmp_path / "ad"}"',
                       "lora.targets=['q']", "max_steps=1", "eval.every_steps=0",
                       "eval.before=false",
                       "eval.metrics=[]", "checkpoint.every_steps=0")
    out = torchrun_train(str(cfg), status=1)
    assert "trainable_token_indices" in out and "without torchrun" in out, out[-3000:]


def _dpo_cfg(folder) -> tuple[str, ...]:
    return ('objective="dpo"', "dpo.beta=0.5", "optim.lr=1e-2", "optim.warmup_steps=0",
            f'model.init="{folder / "ad"}"', "lora.targets=['q_proj']", "max_steps=2",
            f'data.train=["{folder / "prefs.jsonl"}"]',
            f'data.validation="{folder / "prefs.jsonl"}"',
            "data.tokens_per_batch=80", "eval.every_steps=1", "eval.metrics=[]",
            "checkpoint.every_steps=0", "dist.reshard_after_forward=false")


def _dpo_plan(tiny, folder) -> list[dict]:
    make_adapter(tiny, folder / "ad", target_modules=["q_proj"], init_lora_weights=False)
    write_jsonl(folder / "prefs.jsonl", w.word_prefs(random.Random(5), 8))
    return [{"name": "two", "args": [str(write_config(tiny, folder / "two", *_dpo_cfg(folder)))]}]


@shares_launch(_dpo_plan)  # the two-process run
def test_dpo_on_a_continued_adapter_matches_one_process(tiny, launched):
    """DPO continuing a PEFT adapter (made by peft): the reference is the adapter as loaded,
    swapped into the trained model for its forwards (stages.adapters_swapped). Under FSDP the
    swap must write the shards: with dist.reshard_after_forward = false a forward leaves the
    blocks gathered, and swapping back crashed (a DTensor copied into a plain tensor). The run
    logs and exports what one process does."""
    tmp_path, _ = launched
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(write_config(tiny, tmp_path / "one", *_dpo_cfg(tmp_path))),
                     *sets("grad_accum=2")]) == 0
    one = rows_of(tmp_path / "one")
    assert [r["step"] for r in one if r["kind"] == "eval"] == [0, 1, 2]
    _same_rows(rows_of(tmp_path / "two"), one)
    name = "final/adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def _save_cfg(folder) -> tuple[str, ...]:
    return (f'model.init="{folder / "ad"}"', "lora.targets=['q_proj', 'v_proj']",
            "optim.lr=1e-2", "optim.warmup_steps=0", "max_steps=2", "eval.every_steps=0",
            "eval.before=false", "eval.metrics=[]", "checkpoint.every_steps=0")


def _save_plan(tiny, folder) -> list[dict]:
    make_adapter(tiny, folder / "ad", target_modules=["q_proj", "v_proj"],
                 modules_to_save=["lm_head"], init_lora_weights=False)
    return [{"name": "two", "args": [str(write_config(tiny, folder / "two", *_save_cfg(folder)))]}]


@shares_launch(_save_plan)  # the two-process run
def test_continued_adapter_with_modules_to_save_exports_as_one_process(tiny, launched):
    """A PEFT adapter (made by peft) with modules_to_save = ["lm_head"], continued under
    torchrun: the export of two processes (a model rebuilt from the gathered weights) wrote no
    lm_head and no modules_to_save (the trained head silently lost); now the adapter files and
    configs are one process's, and PEFT loads the trained head."""
    tmp_path, _ = launched
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(write_config(tiny, tmp_path / "one", *_save_cfg(tmp_path))),
                     *sets("grad_accum=2")]) == 0
    _same_rows(rows_of(tmp_path / "two"), rows_of(tmp_path / "one"))
    ad = [tmp_path / run / "final" / "adapter" for run in ("one", "two")]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in ad)
    assert "base_model.model.lm_head.weight" in a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    # the base it was trained on (rank 0's fingerprint, taken before sharding)
    assert (ad[1].parent / "base.json").read_text() == (ad[0].parent / "base.json").read_text()
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in ad]
    assert configs[1]["modules_to_save"] == configs[0]["modules_to_save"] == ["lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"],
                                                               dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, ad[1])
    head = theirs.base_model.model.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(head, a["base_model.model.lm_head.weight"], rtol=0, atol=1e-5)
