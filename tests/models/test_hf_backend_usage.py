"""ember.models.hf_backend.accelerate driven the ways transformers users drive a model: output
formats, dtype changes after the swap, ``transformers.Trainer``. The oracle is the same model
without the swap (``_pair``'s twin), fp32 unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.models.hf_backend import accelerate, restore, swapped
from tests.models.test_hf_backend import (
    _check_grads,
    _close,
    _deferred,
    _ids,
    _loss_and_grads_match,
    _pair,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.mark.parametrize("use_cache", [False, True])
def test_return_dict_false_keeps_hf_tuple_layout(use_cache):
    """``return_dict=False`` in training mode: HF's tuple is (loss, logits[, cache]) with real
    logits; a tuple cannot defer them, so the fused loss builds them in the forward (was: the
    slot held None, a TypeError in a loop that adds a loss on them), under the forward's grad
    mode: a loss on them backpropagates as through HF's. (``config.return_dict = False``:
    transformers 5's own causal LM forward fails, reading a tuple's ``last_hidden_state``.)"""
    ref, model = _pair("llama", seed=41)
    accelerate(model)
    ids = _ids(2, 9, seed=21)
    kw = dict(labels=ids, return_dict=False, use_cache=use_cache)
    a, b = ref(ids, **kw), model(ids, **kw)
    assert isinstance(b, tuple) and len(b) == len(a) == 2 + use_cache
    _close("loss", b[0], a[0])
    _close("logits", b[1], a[1])
    assert [type(x) for x in b[2:]] == [type(x) for x in a[2:]]
    (a[0] + a[1].logsumexp(-1).mean()).backward()
    (b[0] + b[1].logsumexp(-1).mean()).backward()
    _check_grads(ref, model)
    with torch.no_grad():  # eval mode: the logits are there, as HF's
        a, b = ref.eval()(ids, **kw), model.eval()(ids, **kw)
    assert isinstance(b, tuple) and len(b) == len(a)
    _close("logits (eval)", b[1], a[1])


@pytest.mark.parametrize("case", ["llama", "qwen3_qknorm"])
def test_float64_after_swap(case):
    """``.to(torch.float64)`` (or ``.double()``, e.g. for gradcheck) after the swap: Ember's
    kernels take fp32/fp16/bf16 only, so those modules run HF's code (was: ValueError "rms_norm:
    x has dtype torch.float64" from inside the first norm)."""
    ref, model = _pair(case, seed=43)
    accelerate(model)
    ref, model = ref.double(), model.to(torch.float64)
    assert set(swapped(model).values()) >= {"rms_norm", "attention", "loss"}
    ids = _ids(2, 9, seed=22)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    _loss_and_grads_match(ref, model, ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        a, b = model.eval()(ids), ref.eval()(ids)
    assert a.logits.dtype == torch.float64
    _close("logits", a.logits, b.logits)


@pytest.mark.parametrize("key,shape", [("labels", (2, 7)), ("labels", (1, 10)),
                                       ("labels", (2, 12)), ("shift_labels", (2, 9))])
def test_labels_not_one_per_token_raise(key, shape):
    """Labels that are not one per input token: HF's loss raises (a batch-size mismatch), and
    so does the swap, naming the shapes (was: fewer labels gave a loss over the wrong
    positions, silently; more gave an IndexError from index_select)."""
    ref, model = _pair("llama", seed=45)
    accelerate(model)
    ids = _ids(2, 10, seed=23)
    kw = {"labels": ids, key: _ids(*shape, seed=24)}
    with pytest.raises(ValueError, match="batch_size"):
        ref(ids, **kw)
    with pytest.raises(ValueError, match=rf"{key} has shape \({shape[0]}, {shape[1]}\) but the "
                                         r"input has \(2, 10\) tokens"):
        model(ids, **kw)
    flat = ids.reshape(-1)  # HF flattens: one label per token in another shape is accepted
    _close("loss (flat labels)", model(ids, labels=flat).loss, ref(ids, labels=flat).loss)


def test_restore_under_mixed_precision_wrapper():
    """accelerate's ``prepare`` with bf16 mixed precision (what ``Trainer(bf16=True)`` does)
    wraps the swapped causal LM forward in autocast; ``swapped`` still reports it, ``restore``
    makes the wrapper call HF's forward (was: the fused loss stayed, unreported), and
    ``accelerate`` again switches it back on inside the wrapper (its autocast kept)."""
    accelerate_lib = pytest.importorskip("accelerate")
    ref, model = _pair("llama", seed=47)
    accelerate(model)
    kinds = swapped(model)
    acc = accelerate_lib.Accelerator(cpu=True, mixed_precision="bf16")
    ref, model = acc.prepare_model(ref), acc.prepare_model(model)
    assert hasattr(model.forward.__func__, "__wrapped__")  # the wrapper, around the swap
    assert swapped(model) == kinds
    ids = _ids(2, 9, seed=25)
    assert _deferred(model(ids, labels=ids))  # Ember's fused loss (training mode)
    restore(model)
    assert swapped(model) == {}
    a, b = ref(ids, labels=ids), model(ids, labels=ids)
    assert b.logits is not None and b.logits.dtype == a.logits.dtype == torch.float32
    assert torch.equal(a.loss, b.loss)  # the same HF code under the same autocast
    accelerate(model)
    assert swapped(model) == kinds
    assert hasattr(model.forward.__func__, "__wrapped__")  # still accelerate's wrapper
    out = model(ids, labels=ids)
    assert _deferred(out)
    assert abs(out.loss.item() - a.loss.item()) < 2e-2 * a.loss.item()  # bf16 autocast both
    # read after the wrapper's fp32 conversion: float32 as HF's, the bf16 head's values
    assert out.logits.dtype == torch.float32
    assert (out.logits - a.logits).abs().max() < 5e-2 * a.logits.abs().max()
    with pytest.raises(EmberError, match="wrapped by accelerate's mixed precision"):
        accelerate(model, loss=False)  # another forward than the wrapper calls
    assert swapped(model) == kinds  # refused before anything changed


def test_swap_after_mixed_precision_wrapper_refused():
    """A model that accelerate's ``prepare`` already wrapped in bf16 autocast, then swapped: the
    swap would replace the wrapper's forward, dropping its autocast (was: dropped silently, an
    fp32 run); refused, saying to swap first. Unwrapped (``keep_fp32_wrapper=False``: the class's
    forward bound on the instance), it swaps."""
    accelerate_lib = pytest.importorskip("accelerate")
    ref, model = _pair("llama", seed=87)
    acc = accelerate_lib.Accelerator(cpu=True, mixed_precision="bf16")
    model = acc.prepare_model(model)
    with pytest.raises(EmberError, match="swap.* would drop that wrapper"):
        accelerate(model)
    assert swapped(model) == {}
    model = acc.unwrap_model(model, keep_fp32_wrapper=False)
    accelerate(model)
    assert swapped(model)[""] == "loss"
    ids = _ids(2, 9, seed=27)
    out = model(ids, labels=ids)
    assert _deferred(out)
    _close("loss (fp32 again)", out.loss, ref(ids, labels=ids).loss)


@pytest.mark.parametrize("case", ["llama", "llama_tied_llama3"])
def test_resize_token_embeddings_after_swap(case):
    """``resize_token_embeddings`` (new tokens added to the tokenizer) after the swap: the fused
    loss reads the new head (a new module) every call, so the new tokens' labels and logits are
    the resized twin's; tied heads stay tied (``tie_weights``)."""
    ref, model = _pair(case, seed=91)
    accelerate(model)
    for m in (ref, model):
        m.resize_token_embeddings(110, mean_resizing=False)
        m.tie_weights()
        with torch.no_grad():  # the same new rows in both
            g = torch.Generator().manual_seed(92)
            m.get_output_embeddings().weight[96:] = 0.5 * torch.randn(14, 48, generator=g)
            m.get_input_embeddings().weight[96:] = 0.5 * torch.randn(14, 48, generator=g)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == ("tied" in case)
    ids = _ids(2, 9, seed=28)
    ids[:, 3:6] = torch.tensor([100, 105, 109])
    _loss_and_grads_match(ref, model, ids, labels=ids)
    with torch.no_grad():
        a, b = ref.eval()(ids), model.eval()(ids)
    assert b.logits.shape == (2, 9, 110)
    _close("logits", b.logits, a.logits)


def test_prepare_model_for_kbit_training_then_swap_then_lora():
    """PEFT's QLoRA recipe on an fp32 model: ``prepare_model_for_kbit_training`` (on a model
    not quantized it enables no checkpointing: its kbit steps, input embeddings requiring grad and
    reentrant gradient checkpointing, are called here), the swap, then LoRA: the loss and the
    LoRA gradients are the unswapped twin's (the plan replayed by the checkpointed layers)."""
    peft = pytest.importorskip("peft")
    pair = _pair("qwen3_qknorm", seed=93)
    ids = _ids(2, 11, seed=29)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    models = []
    for i, m in enumerate(pair):
        m = peft.prepare_model_for_kbit_training(m)
        m.enable_input_require_grads()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if i:
            accelerate(m)
        torch.manual_seed(0)
        models.append(peft.get_peft_model(m, peft.LoraConfig(
            r=4, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0,
            init_lora_weights="gaussian")))
    assert pair[1].is_gradient_checkpointing and swapped(models[1])["base_model.model"] == "loss"
    _loss_and_grads_match(*models, ids, attention_mask=mask,
                          labels=ids.masked_fill(mask == 0, -100))
    assert any("lora_A" in n and p.grad is not None for n, p in models[1].named_parameters())


def _trainer_run(model, tmp_path, collate, rows) -> tuple:
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        gradient_checkpointing=True, optim="sgd", learning_rate=0.5, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses, trainer.predict(rows[:3])  # eval loop, logits returned


def test_trainer_journey(tmp_path):
    """transformers.Trainer on a swapped model: gradient accumulation (num_items_in_batch),
    gradient checkpointing, right padding, predict (eval loss and logits) and save_model give what
    the unswapped twin gives; the saved folder is plain transformers (SGD, so that rounding-level
    gradient differences stay rounding-level in the weights)."""
    ref, model = _pair("qwen3_qknorm", seed=49, num_hidden_layers=1)
    accelerate(model)
    g = torch.Generator().manual_seed(26)
    rows = [{"input_ids": torch.randint(3, 96, (12 - i % 4,), generator=g).tolist()}
            for i in range(8)]

    def collate(batch):
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    (_, la, pa), (trainer, lb, pb) = (_trainer_run(m, tmp_path / n, collate, rows)
                                      for m, n in ((ref, "ref"), (model, "ember")))
    assert len(la) == 2 and la == pytest.approx(lb, rel=1e-5)
    assert pa.metrics["test_loss"] == pytest.approx(pb.metrics["test_loss"], rel=1e-5)
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        _close(name, q, p)
    labelled = pa.label_ids != -100  # predictions at padding positions are not HF's (documented)
    _close("predicted logits", torch.from_numpy(pb.predictions[labelled]),
           torch.from_numpy(pa.predictions[labelled]))
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert swapped(loaded) == {} and type(loaded) is type(ref)
    for k, v in ref.state_dict().items():
        _close(f"saved {k}", loaded.state_dict()[k], v)


@pytest.mark.parametrize("inputs", ["dense", "padding", "packed"])
def test_compile_fullgraph_training_forward(inputs):
    """``torch.compile(model, fullgraph=True)`` of a training forward with labels: transformers'
    own model compiles in one graph (checked alike, also with padding and packed rows), and so
    does the swap (was: an error at the labelled rows' ``nonzero``, a data-dependent shape, then
    at the lazy output class's ``__getattribute__``; with a padding mask or packed position_ids
    at the attention plan's host syncs: under compile each layer takes Ember's attention where
    HF's mask is None, else HF's). Loss, gradients and the deferred logits are the twin's; an
    optimizer step leaves the graph as it was (no recompile) and still makes a late read of the
    logits raise."""
    dynamo = pytest.importorskip("torch._dynamo")
    ref, model = _pair("llama", seed=51)
    accelerate(model)
    ids = _ids(2, 9, seed=52)
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    kw = dict(labels=labels)
    if inputs == "padding":
        kw["attention_mask"] = (torch.arange(9) < torch.tensor([[9], [6]])).long()
        kw["labels"] = labels.masked_fill(kw["attention_mask"] == 0, -100)
    elif inputs == "packed":
        kw["position_ids"] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4]).expand(2, 9)
    dynamo.reset()
    b = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's graph capture alone
    out_ref, out = ref(ids, **kw), b(ids, **kw)
    assert _deferred(out)
    _close("loss", out.loss, out_ref.loss)
    keep = (kw["labels"] != -100).unsqueeze(-1)  # HF's outputs at padding are not (documented)
    _close("logits", out.logits * keep, out_ref.logits * keep)
    out_ref.loss.backward()
    out.loss.backward()
    _check_grads(ref, model)
    if inputs != "dense":
        return
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    late = b(ids, **kw)
    opt.step()
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    with pytest.raises(EmberError, match="before the optimizer step"):
        _ = late.logits
    assert b(ids, **kw).logits.shape == (2, 9, ref.config.vocab_size)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs
