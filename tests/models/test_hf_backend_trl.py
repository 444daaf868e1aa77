"""ember.models.hf_backend.accelerate driven as TRL's trainers drive a model (TRL itself is not
installed: the few lines of TRL each test runs are re-created here, quoting the TRL 1.16 file and
function). The oracle is the same transformers model without the swap (``_pair``'s twin), fp32,
driven identically."""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.models.hf_backend import accelerate, restore, swapped
from tests.models.test_hf_backend import (
    _check_grads,
    _close,
    _deferred,
    _ids,
    _pair,
    flash_calls,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

__all__ = ["flash_calls"]  # the fixture, imported for the tests below


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def add_fused_lm_head(model) -> None:
    """trl/trainer/utils.py ``add_fused_lm_head`` (what DPOTrainer and SFTTrainer call on the
    causal LM, inside PEFT): ``model.forward`` is replaced on the instance by a wrapper that keeps
    the forward it found (a closure) for ``fused_lm_head=False`` and otherwise runs the backbone
    (``self.base_model``) and the head on the labelled positions only, returning per-token
    log-probabilities (``_ChunkedLogProbFunction`` at temperature 1, no softcap, in one chunk)."""
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                       num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        head = self.get_output_embeddings()
        logits = F.linear(hidden[mask], head.weight, head.bias)
        lp = logits.log_softmax(-1).gather(-1, labels[mask][:, None]).squeeze(1)
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return types.SimpleNamespace(loss=loss, log_probs=log_probs)

    model.forward = types.MethodType(_fused_forward, model)


def _preference_batch():
    """trl/trainer/dpo_trainer.py ``DataCollatorForPreference.torch_call``: [prompt + chosen] rows
    then [prompt + rejected] rows, right-padded; completion_mask 1 on the completion tokens."""
    g = torch.Generator().manual_seed(71)
    prompts, chosen, rejected = ([torch.randint(3, 96, (n,), generator=g).tolist() for n in lens]
                                 for lens in ((4, 6), (5, 3), (2, 6)))
    rows = [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, chosen, strict=True)]
    rows += [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, rejected, strict=True)]
    T = max(len(ids) for ids, _ in rows)
    ids, attn, comp = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    for i, (x, c) in enumerate(rows):
        ids[i, :len(x)], attn[i, :len(x)], comp[i, :len(c)] = torch.tensor(x), 1, torch.tensor(c)
    return ids, attn, comp


def _dpo_loss(p_model, ids, attn, comp, beta: float = 0.1):
    """trl/trainer/dpo_trainer.py ``_compute_loss`` (sigmoid loss, no ld_alpha): per-sequence
    logps of the policy with grad, the reference's from the same PEFT model with the adapter
    disabled (``use_adapter(model, None)``) under no_grad."""
    labels = ids.masked_fill(comp == 0, -100)
    kw = dict(input_ids=ids, attention_mask=attn, use_cache=False)
    logps = p_model(**kw, labels=labels, fused_lm_head=True).log_probs.sum(1)
    with torch.no_grad(), p_model.disable_adapter():
        ref_logps = p_model(**kw, labels=labels, fused_lm_head=True).log_probs.sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean(), logps, ref_logps


def _lora(model):
    torch.manual_seed(0)
    p = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        init_lora_weights="gaussian"))
    with torch.no_grad():  # non-zero B: policy and reference differ
        for name, w in p.named_parameters():
            if "lora_B" in name:
                w.copy_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(
                    len(name))))
    return p


def test_dpo_with_trl_fused_head():
    """DPO as TRL's DPOTrainer runs it on a PEFT model: the model swapped first (accelerate_hf,
    then the trainer), TRL's fused head added on the causal LM inside PEFT, chosen and rejected
    concatenated and right-padded, the reference from the same model with the adapter disabled:
    the per-sequence logps, the DPO loss and the LoRA gradients are the unswapped twin's."""
    ref, model = _pair("qwen3_qknorm", seed=73)
    accelerate(model)
    p_ref, p_model = _lora(ref), _lora(model)
    for p in (p_ref, p_model):
        add_fused_lm_head(p.get_base_model())
    assert swapped(p_model)["base_model.model"] == "loss"  # the swap, under TRL's wrapper
    ids, attn, comp = _preference_batch()
    (la, lpa, rpa), (lb, lpb, rpb) = (_dpo_loss(p, ids, attn, comp) for p in (p_ref, p_model))
    _close("policy logps", lpb, lpa)
    _close("reference logps", rpb, rpa)
    _close("dpo loss", lb, la)
    la.backward()
    lb.backward()
    _check_grads(p_ref, p_model)
    assert any("lora_A" in n and w.grad is not None for n, w in p_model.named_parameters())
    with torch.no_grad():  # fused_lm_head=False: the forward TRL found, the swap (SFT metrics)
        labels = ids.masked_fill(attn == 0, -100)
        _close("sft loss", p_model(ids, attention_mask=attn, labels=labels).loss,
               p_ref(ids, attention_mask=attn, labels=labels).loss)


def test_dpo_separate_reference_and_checkpointing():
    """DPO with a separate reference model (both swapped, TRL's head on each, the reference in
    eval under no_grad) and gradient checkpointing on the policy, which TRL's
    ``disable_gradient_checkpointing`` (trl/models/utils.py) turns off around the reference
    forward and back on: the logps, the loss and every policy gradient are the unswapped pair's."""
    pairs = [_pair("llama", seed=s) for s in (89, 90)]  # (policy, reference) x (hf, swapped)
    for hf, ours in pairs:
        accelerate(ours)
        for m in (hf, ours):
            add_fused_lm_head(m)
    ids, attn, comp = _preference_batch()
    labels = ids.masked_fill(comp == 0, -100)
    kw = dict(input_ids=ids, attention_mask=attn, use_cache=False, labels=labels,
              fused_lm_head=True)
    results = []
    for policy, reference in ((pairs[0][0], pairs[1][0]), (pairs[0][1], pairs[1][1])):
        policy.gradient_checkpointing_enable()
        reference.eval()
        logps = policy(**kw).log_probs.sum(1)
        with torch.no_grad():
            policy.gradient_checkpointing_disable()
            ref_logps = reference(**kw).log_probs.sum(1)
            policy.gradient_checkpointing_enable()
        margin = (logps - ref_logps).view(2, -1)
        loss = -F.logsigmoid(0.1 * (margin[0] - margin[1])).mean()
        loss.backward()
        results.append((logps, ref_logps, loss))
    for name, a, b in zip(("policy logps", "reference logps", "loss"), *results, strict=True):
        _close(name, b, a)
    _check_grads(*pairs[0])


def test_trl_wrapper_after_the_swap_restore_and_again():
    """TRL's wrapper keeps calling the swapped forward it found: ``swapped`` reports it,
    ``restore`` switches it to HF's (was: reported nothing, and the fused loss still ran:
    no logits in training mode), and ``accelerate`` again switches it back on, TRL's wrapper
    kept (was: replaced, so ``fused_lm_head=True`` was silently ignored)."""
    ref, model = _pair("llama", seed=75)
    accelerate(model)
    kinds = swapped(model)
    add_fused_lm_head(model)
    add_fused_lm_head(ref)
    assert swapped(model) == kinds
    ids = _ids(2, 9, seed=76)
    assert _deferred(model(ids, labels=ids))  # Ember's fused loss (training mode)
    restore(model)
    assert swapped(model) == {}
    a, b = ref(ids, labels=ids), model(ids, labels=ids)
    assert b.logits is not None and torch.equal(a.loss, b.loss)  # HF's forward, exactly
    accelerate(model)
    assert swapped(model) == kinds
    assert _deferred(model(ids, labels=ids))
    a, b = (m(ids, labels=ids, fused_lm_head=True) for m in (ref, model))
    _close("fused log_probs", b.log_probs, a.log_probs)


def test_swap_after_trl_wrapper_refused():
    """A causal LM whose forward TRL (or accelerate's mixed precision) already replaced on the
    instance: the swap would drop that wrapper (was: dropped, and TRL's ``fused_lm_head=True``
    was silently ignored by HF's forward, then ``.log_probs`` failed in TRL); refused, saying to
    swap first, before anything changed."""
    _, model = _pair("llama", seed=77)
    add_fused_lm_head(model)
    with pytest.raises(EmberError, match="before handing it to the trainer"):
        accelerate(model)
    assert swapped(model) == {}
    accelerate(model, loss=False, attention=False)  # the causal LM's forward is not touched
    assert "" not in swapped(model) and "rms_norm" in swapped(model).values()


def _padding_free_batch():
    """trl/trainer/sft_trainer.py ``DataCollatorForLanguageModeling.torch_call`` with
    ``padding_free=True`` and ``pad_to_multiple_of=8``: the examples flattened into one row, no
    attention mask, position_ids restarting per example (0 on the padding), labels -100 on each
    example's first token, the padding and (``completion_only_loss``) the prompts; and the
    ``cu_seq_lens_*`` / ``max_length_*`` / ``seq_idx`` keys it adds."""
    g = torch.Generator().manual_seed(79)
    lens, prompts = (5, 7, 3), (2, 3, 1)
    ids = torch.cat([torch.randint(3, 96, (n,), generator=g) for n in lens] + [
        torch.zeros(1, dtype=torch.long)])[None]  # 15 tokens + 1 of padding
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(1, dtype=torch.long)])[None]
    labels = ids.clone()
    start = 0
    for n, p in zip(lens, prompts, strict=True):
        labels[0, start:start + p] = -100  # completion_mask 0 on the prompt
        start += n
    labels[0, start:] = -100
    labels[pos == 0] = -100
    starts = (pos[0] == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([pos.size(1)])]).to(torch.int32)
    longest = int(cu.diff().max())
    seq_idx = torch.repeat_interleave(torch.arange(cu.numel() - 1, dtype=torch.int32), cu.diff())
    return dict(input_ids=ids, position_ids=pos, labels=labels, cu_seq_lens_q=cu,
                cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                seq_idx=seq_idx[None])


def test_sft_padding_free_completion_only(flash_calls):
    """SFT as TRL's SFTTrainer.compute_loss runs it: the padding-free collator's batch through
    TRL's fused head (``use_cache=False``), loss = -sum(log_probs) / num_items_in_batch: the
    loss and every gradient are the unswapped twin's (each example attends to itself only)."""
    ref, model = _pair("llama", seed=81)
    accelerate(model)
    for m in (ref, model):
        add_fused_lm_head(m)
    batch = _padding_free_batch()
    losses = []
    for m in (ref, model):
        out = m(**batch, use_cache=False, fused_lm_head=True)
        losses.append(-out.log_probs.sum() / torch.tensor(9))  # num_items_in_batch: 9 tokens
        losses[-1].backward()
    _close("loss", losses[1], losses[0])
    _check_grads(ref, model)
    assert flash_calls == ["varlen"] * 2  # one document per restart
    whole = {k: v for k, v in batch.items() if k in ("input_ids", "labels")}
    with torch.no_grad():  # the same row without position_ids: one causal document, as HF
        _close("loss (unpacked)", model(**whole, use_cache=False).loss,
               ref(**whole, use_cache=False).loss)


def test_distillation_teacher_in_inference_mode():
    """A distillation loop (as TRL's GKD / a plain KD loop): the teacher swapped, eval, its
    logits under inference_mode; the student swapped, training mode, no labels (its logits
    divided by the temperature), a forward KL; the loss and the student's gradients are the
    unswapped pair's. (With labels, see test_distillation_logits_with_labels_in_training.)
    a loop that needs the student's logits calls it without labels."""
    s_ref, s_model = _pair("qwen3_qknorm", seed=83)
    t_ref, t_model = _pair("qwen3_qknorm", seed=84, num_hidden_layers=3)
    accelerate(s_model)
    accelerate(t_model)
    ids = _ids(2, 11, seed=85)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    keep = mask.bool()
    temperature = 2.0
    losses = []
    for student, teacher in ((s_ref, t_ref), (s_model, t_model)):
        with torch.inference_mode():
            t_logits = teacher.eval()(ids, attention_mask=mask).logits
        s_logits = student(ids, attention_mask=mask).logits
        kl = F.kl_div((s_logits[keep] / temperature).log_softmax(-1),
                      (t_logits[keep].clone() / temperature).log_softmax(-1),
                      log_target=True, reduction="batchmean") * temperature ** 2
        kl.backward()
        losses.append(kl)
    _close("kd loss", losses[1], losses[0])
    _check_grads(s_ref, s_model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_head_left_padding(attn, flash_calls):
    """TRL's fused head calls the inner model without the labels, so the swap cannot see that a
    row's first real token is labelled, predicted from the last padding position before it: a
    fully masked query row, HF's eager attention's mean of the values there (SDPA and varlen: 0).
    With eager attention and left padding the inner model called directly runs HF's attention
    (was: varlen, a log-prob off by ~0.5 at those tokens); through the causal LM, which sees the
    labels, and with SDPA, varlen as before."""
    ref, model = _pair("llama", seed=95, attn=attn)
    accelerate(model)
    for m in (ref, model):
        add_fused_lm_head(m)
    ids = _ids(2, 10, seed=96)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    a, b = (m(**kw, fused_lm_head=True).log_probs for m in (ref, model))
    _close("log_probs", b, a)
    a.sum().backward()
    b.sum().backward()
    _check_grads(ref, model)
    assert flash_calls == ([] if attn == "eager" else ["varlen"] * 2)
    flash_calls.clear()
    _close("loss (causal LM)", model(**kw).loss, ref(**kw).loss)  # labels seen: HF's rule
    with torch.no_grad():  # the causal LM without labels: no padding output is read
        model.eval()(ids, attention_mask=mask)
    assert flash_calls == (["varlen"] * 2 if attn == "eager" else ["varlen"] * 4)


@pytest.mark.parametrize("case", ["qwen3_qknorm", "gemma2"])
def test_distillation_logits_with_labels_in_training(case):
    """A KD loop that passes labels in training mode and reads ``out.logits`` too (transformers
    returns both): ``kd(out.logits, teacher) + out.loss`` gives the unswapped pair's loss and
    gradients. The fused loss computes the logits only when they are read (was: None, a
    TypeError in the loop), also through accelerate's fp32 output conversion (Trainer with
    bf16/fp16 rebuilds the output), and as HF's to_tuple(), ``out["logits"]`` and
    ``out.get("logits")`` (was: the LazyLogits object itself)."""
    from tests.models.test_hf_backend import CASES
    from tests.models.test_hf_backend_families import CASES as FAMILY_CASES

    convert_to_fp32 = pytest.importorskip("accelerate.utils").convert_to_fp32
    cases = {**CASES, **FAMILY_CASES}
    s_ref, s_model = _pair(case, seed=87, cases=cases, attn="eager" if "gemma" in case else "sdpa")
    accelerate(s_model)
    ids = _ids(2, 11, seed=88)
    labels = ids.clone()
    labels[:, :3] = -100
    t_logits = torch.randn(2, 11, s_ref.config.vocab_size, generator=torch.Generator()
                           .manual_seed(89))
    losses, reads = [], [lambda o: o.logits, lambda o: o["logits"], lambda o: o.to_tuple()[1],
                         lambda o: o.get("logits"), lambda o: convert_to_fp32(o).logits]
    for student in (s_ref, s_model):
        student.train()
        out = student(ids, labels=labels)
        assert {"loss", "logits"} <= set(out.keys())
        assert _deferred(out) == (student is s_model)  # the fused loss, logits not built yet
        kl = F.kl_div(out.logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                      reduction="batchmean")
        (kl + out.loss).backward()
        losses.append((kl, out.loss))
        if student is s_model:
            for read in reads:  # every way to read them: the same values
                out = student(ids, labels=labels)
                _close("logits", read(out), read(s_ref(ids, labels=labels)))
    _close("kd", losses[1][0], losses[0][0])
    _close("loss", losses[1][1], losses[0][1])
    _check_grads(s_ref, s_model)


def _optimizer(kind: str, params):
    if kind.startswith("bnb"):
        return pytest.importorskip("bitsandbytes").optim.AdamW8bit(params, min_8bit_size=0)
    if kind == "ember8bit":
        from ember.engine.optim8bit import AdamW8bit

        return AdamW8bit(params, min_8bit_size=0)
    name, _, mode = kind.partition("_")
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return opt(params, lr=0.5, **({mode: True} if mode else {}))


@pytest.mark.parametrize("kind", ["sgd", "sgd_fused", "sgd_foreach", "adam_fused", "adamw_fused",
                                  "adamw_foreach", "bnb8bit", "ember8bit"])
def test_deferred_logits_read_after_optimizer_step_raise(kind):
    """The deferred logits come from the head's weight when read; read after an optimizer step
    changed it, they would not be the forward's (HF's are): a clear error, not other values.
    Read before the step, they are the forward's. torch's fused optimizers and bitsandbytes'
    8-bit AdamW update the head without bumping its version counter (was: those logits were
    silently the new head's: max |diff| 20.6 on logits of max 2.6 after one fused AdamW
    step at lr 0.5)."""
    ref, model = _pair("llama", seed=91)
    accelerate(model)
    ids = _ids(2, 9, seed=92)
    opt = _optimizer(kind, model.parameters())
    early = model(ids, labels=ids)
    _close("logits", early.logits, ref(ids, labels=ids).logits)
    late = model(ids, labels=ids)
    late.loss.backward()
    opt.step()
    with pytest.raises(EmberError, match="read out.logits before the optimizer step"):
        _ = late.logits


def test_compiled_optimizer_step_with_a_swapped_model():
    """``torch.compile(opt.step)`` (PyTorch's compiled-optimizer recipe) while a swapped model is
    alive: the step pre-hook runs as is (was, with the hook traced: dynamo called the model from
    the hook's weak reference, a ValueError from inside transformers), and a late read of the
    deferred logits raises after the compiled step too (a fused step, run outside the graph by
    torch, bumps no version itself)."""
    _, model = _pair("llama", seed=97)
    accelerate(model)
    ids = _ids(2, 9, seed=98)
    # fused only: torch 2.13 then fails to compile a foreach AdamW step in the same process
    # ("Expected scalars to be on CPU, got meta"; a bare nn.Linear does it, no swap involved)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    step = torch.compile(opt.step, backend="eager")
    late = model(ids, labels=ids)
    late.loss.backward()
    step()
    with pytest.raises(EmberError, match="read out.logits before the optimizer step"):
        _ = late.logits


def test_deferred_logits_of_a_copied_model_after_fused_step_raise():
    """A deep copy of a swapped model (TRL's ``create_reference_model``, an EMA copy) carries the
    swapped forwards; its optimizer steps are watched too (was: only the model given to
    ``accelerate`` was, so the copy's logits read after a fused AdamW step were the new
    head's)."""
    _, model = _pair("llama", seed=95)
    copied = copy.deepcopy(accelerate(model))
    ids = _ids(2, 9, seed=96)
    opt = torch.optim.AdamW(copied.parameters(), lr=0.5, fused=True)
    late = copied(ids, labels=ids)
    assert _deferred(late)
    late.loss.backward()
    opt.step()
    with pytest.raises(EmberError, match="read out.logits before the optimizer step"):
        _ = late.logits


def test_swapped_model_collected_during_an_optimizer_step():
    """The last watched model freed by the garbage collector while torch iterates its global
    step hooks (the collector runs at any allocation): the step goes on (was: the collector's
    weakref callback removed Ember's hook from that dict, "OrderedDict mutated during
    iteration")."""
    import gc

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ember.models import hf_backend_loss

    gc.collect()
    while hf_backend_loss._STEP_HOOK:  # Ember's hook registered after the collecting one
        hf_backend_loss._STEP_HOOK.pop().remove()
    handle = register_optimizer_step_pre_hook(lambda *args: gc.collect() and None)
    try:
        _, model = _pair("llama", seed=99)
        accelerate(model)
        model.__dict__["_cycle"] = model  # only the collector frees it
        del model
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        torch.optim.SGD([p], lr=0.1).step()
    finally:
        handle.remove()


def test_deferred_logits_after_step_that_leaves_the_head():
    """An optimizer step that does not update the head (it holds other parameters, or the head
    is frozen: no grad, as under LoRA with ``model.parameters()`` handed to the optimizer) leaves
    the deferred logits the forward's; ``restore`` stops watching the optimizer steps."""
    from ember.models import hf_backend_loss

    ids = _ids(2, 9, seed=94)
    for frozen in (True, False):
        ref, model = _pair("llama", seed=93)
        accelerate(model)
        model.lm_head.weight.requires_grad_(not frozen)
        # frozen: the head is in the optimizer without a gradient; else: not in it
        opt = torch.optim.AdamW(model.parameters() if frozen else model.model.parameters(),
                                lr=0.5, fused=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        _close("logits", out.logits, ref(ids, labels=ids).logits)
    assert id(model) in hf_backend_loss._WATCHED
    restore(model)
    assert id(model) not in hf_backend_loss._WATCHED
