"""Prompt tuning through ``ember train`` (``method = "prompt"``): only the virtual tokens train,
packed documents each get them, the run saves a PEFT adapter, reloads, exports and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from ember import EmberError
from ember.engine.cli import main as cli
from ember.engine.config_doc import unused_settings
from ember.engine.data import DataConfig, collate, load_examples
from ember.engine.evaluation import validation_loss
from ember.engine.losses import IGNORE, sequence_logprobs, sft_loss, sft_loss_tokens
from ember.engine.objectives import SFT
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, resolve, train
from ember.models.loading import load_pretrained
from ember.models.prompt_tuning import apply_prompt_tuning, num_virtual_tokens, save_prompt_adapter
from tests.engine._tiny import moved_without_base, quiet, rows_of, tiny_config, write_jsonl

PROMPT = ('method="prompt"', "prompt_tuning.num_virtual_tokens=4")


def test_prompt_tuning_trains_only_the_prompt(tiny, tmp_path, capsys):
    run, small = tmp_path / "run", tiny["small"]  # one batch, seen at every step
    cfg = resolve(tiny_config(tiny, run, *PROMPT, "max_steps=12", f'data.train=["{small}"]'))
    assert cfg.optim.lr == 3e-2
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    assert "exact_match" in res.before and "exact_match" in res.after
    assert res.after["val_loss"] < res.before["val_loss"] - 0.3, (res.before, res.after)
    assert [n for n, p in t.model.named_parameters() if p.requires_grad] == ["embed.prompt"]
    base, _ = load_pretrained(tiny["model"], "float32")
    params = dict(t.model.named_parameters())
    for n, p in base.named_parameters():  # the base is bit-identical
        assert torch.equal(params[n.replace("embed.", "embed.base.")], p), n
    losses = [r["loss"] for r in rows_of(run) if r["kind"] == "train"]
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses

    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    model, _, _ = load_run_model(run, "cpu")
    ids = torch.tensor([[*range(4), *range(300, 304), 5, 6]])  # with the virtual ids
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), t.model.eval()(ids))
    assert cli(["export", str(run), "--adapter", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # moved to a machine without the base: the adapter exports all the same, byte for byte
    moved = moved_without_base(run, tiny["model"], tmp_path / "moved")
    assert cli(["export", str(moved), "--adapter", str(tmp_path / "there")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "there" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert cli(["export", str(run), "--merged", str(tmp_path / "m")]) == 2
    assert "not weights to merge" in capsys.readouterr().err
    assert cli(["generate", tiny["model"], "--adapter", str(tmp_path / "out"), "--prompt",
                "say red ->", "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_prompt_tuning_resumes_exactly(tiny, tmp_path):
    extra = (*PROMPT, "max_steps=4", "checkpoint.every_steps=2", "eval.metrics=[]",
             "eval.before=false")
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=2)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)


def test_packed_documents_score_as_alone(tiny):
    model, tok = load_pretrained(tiny["model"], "float32")
    torch.manual_seed(0)
    apply_prompt_tuning(model, 3, "random")
    a, b = load_examples(tiny["train"], DataConfig(), tok)[0][:2]
    with torch.no_grad():
        both = sequence_logprobs(model, collate([a, b]))
        alone = torch.cat([sequence_logprobs(model, collate([e])) for e in (a, b)])
        torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)
        n = a.num_loss_tokens + b.num_loss_tokens
        torch.testing.assert_close(sft_loss(model, collate([a, b]), n), -both.sum() / n)


def test_prompt_config_errors(tiny, tmp_path):
    with pytest.raises(EmberError, match="set method = \"lora\""):
        tiny_config(tiny, tmp_path / "a", *PROMPT, 'model.quantize="nf4"')
    with pytest.raises(EmberError, match="prompt tuning freezes"):
        tiny_config(tiny, tmp_path / "b", *PROMPT, 'freeze=["embed.*"]')
    with pytest.raises(EmberError, match="prompt_tuning.init must be"):
        tiny_config(tiny, tmp_path / "c", *PROMPT, 'prompt_tuning.init="zeros"')
    with pytest.raises(EmberError, match="unknown config key 'prompt_tuning.rank'"):
        tiny_config(tiny, tmp_path / "d", *PROMPT, "prompt_tuning.rank=3")


def test_continued_peft_prompt_keeps_its_length(tiny, tmp_path):
    """A prompt written by PEFT, continued with model.init: the stage keeps PEFT's
    num_virtual_tokens (the resolved config says so, not the default 20), and a config that
    sets another number is an error naming the key."""
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    peft.get_peft_model(hf, pcfg).save_pretrained(tmp_path / "peft_prompt")
    n = peft.PeftConfig.from_pretrained(tmp_path / "peft_prompt").num_virtual_tokens
    init = f'model.init="{tmp_path / "peft_prompt"}"'
    cfg = resolve(tiny_config(tiny, tmp_path / "a", 'method="prompt"', init))
    assert cfg.prompt_tuning.num_virtual_tokens == n == 5
    with pytest.raises(EmberError, match="prompt_tuning.num_virtual_tokens = 7 conflicts"):
        resolve(tiny_config(tiny, tmp_path / "b", *PROMPT[:1], init,
                            "prompt_tuning.num_virtual_tokens=7"))
    same = resolve(tiny_config(tiny, tmp_path / "c", *PROMPT[:1], init,
                               "prompt_tuning.num_virtual_tokens=5"))
    assert same.prompt_tuning.num_virtual_tokens == 5
    # the prompt's init (and length) are the adapter's: given ones are noted as ignored
    given = tiny_config(tiny, tmp_path / "c", *PROMPT[:1], init, 'prompt_tuning.init="text"',
                        "prompt_tuning.num_virtual_tokens=5", 'prompt_tuning.init_text="say"')
    assert [ln for ln in unused_settings(given) if ln.startswith("prompt")] == [
        "prompt_tuning.init, prompt_tuning.init_text, prompt_tuning.num_virtual_tokens ignored: "
        "the prompt continued from model.init keeps its own length and weights (they apply to a "
        "new prompt)"]


def test_text_loss_and_gradient_match_peft(tiny, tmp_path):
    """PEFT puts -100 for the virtual tokens in front of the labels, so on text lines (labels =
    input_ids) the last virtual token is trained to predict token 0; prompt/completion lines
    leave token 0 unlabelled. Ember's packed loss, its token count and the prompt's gradient
    equal PEFT's summed over the documents run alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(tiny["model"], "float32")
    torch.manual_seed(0)
    apply_prompt_tuning(model, 3, "random")
    save_prompt_adapter(model, tmp_path / "pt")
    cfg = DataConfig(max_seq_len=64)
    text = load_examples(write_jsonl(tmp_path / "t.jsonl", [
        {"text": "say red cat blue"}, {"text": "green dog ran"}]), cfg, tok)[0]
    pc = load_examples(write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "say red cat ->", "completion": " red cat"}]), cfg, tok)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "pt"))
    pm.prompt_encoder["default"].embedding.weight.requires_grad_(True)
    docs = [(e.input_ids, e.input_ids) for e in text]  # a causal-LM collator: labels = ids
    docs += [(e.input_ids, [IGNORE, *e.labels[:-1]]) for e in pc]  # token 0 is prompt
    n_peft = sum(sum(t != IGNORE for t in lab) for _, lab in docs)
    total = 0.0
    for ids, lab in docs:  # HF's mean loss times its terms: the summed loss
        out = pm(input_ids=torch.tensor([ids]), labels=torch.tensor([lab]))
        total = total + out.loss * sum(t != IGNORE for t in lab)
    (total / n_peft).backward()

    batch = collate([text[0], pc[0], text[1]])
    n = sft_loss_tokens(batch, num_virtual_tokens(model) > 0)
    obj = SFT()
    obj.check_model(model, tok)
    assert n == obj.weight(batch) == n_peft == batch.num_loss_tokens + 2
    loss = sft_loss(model, batch, n)
    loss.backward()
    torch.testing.assert_close(loss, total.detach() / n_peft, rtol=1e-5, atol=1e-5)
    grad = pm.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(model.embed.prompt.grad, grad, rtol=1e-4, atol=1e-6)
    val, tokens = validation_loss(model, [*text, *pc], 512, "cpu")
    assert tokens == n_peft and abs(val - float(loss)) < 1e-5
