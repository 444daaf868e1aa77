"""ember.models.hf_backend.accelerate fed the inputs HF users feed a causal LM beyond ``input_ids``
and a 2-D mask: ``inputs_embeds``, explicit ``position_ids`` not starting at 0, a custom 4-D mask,
``logits_to_keep``, and ``generate`` with beams, several returned sequences and a static cache.
The oracle is the same transformers model without the swap (``_pair``'s twin), fp32."""

from __future__ import annotations

import pytest
import torch

from ember.models import hf_backend_forwards
from ember.models.hf_backend import accelerate
from ember.models.hf_backend_io import kept_shift_labels
from tests.models.test_hf_backend import _close, _ids, _loss_and_grads_match, _pair, flash_calls

transformers = pytest.importorskip("transformers")

__all__ = ["flash_calls"]  # the fixture, imported for the tests below


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def counting(calls: list, fn):
    def wrapper(*args, **kw):
        calls.append(fn.__name__)
        return fn(*args, **kw)

    return wrapper


def test_inputs_embeds(flash_calls):
    """``inputs_embeds`` instead of ids (the plan reads its batch and length), padded rows."""
    ref, model = _pair("qwen3_qknorm", seed=51)
    accelerate(model)
    ids = _ids(2, 11, seed=31)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    emb = ref.model.embed_tokens(ids).detach()
    labels = ids.masked_fill(mask == 0, -100)
    _loss_and_grads_match(ref, model, None, inputs_embeds=emb, attention_mask=mask,
                          labels=labels)
    assert flash_calls == ["varlen"] * 2
    with torch.no_grad():
        a, b = model.eval()(inputs_embeds=emb), ref.eval()(inputs_embeds=emb)
    _close("logits", a.logits, b.logits)


def test_position_ids_offset(flash_calls):
    """position_ids given, starting at 5 (a continuation without a cache): one document per row,
    dense attention, RoPE at those positions, as HF."""
    ref, model = _pair("llama_tied_llama3", seed=53)
    accelerate(model)
    ids = _ids(2, 11, seed=32)
    pos = torch.arange(5, 16).expand(2, -1)
    _loss_and_grads_match(ref, model, ids, position_ids=pos, labels=ids, use_cache=False)
    assert flash_calls == ["dense"] * 2
    with torch.no_grad():
        _close("logits", model.eval()(ids, position_ids=pos).logits,
               ref.eval()(ids, position_ids=pos).logits)


def test_custom_4d_mask(flash_calls):
    """A 4-D boolean mask (two blocks attending only within themselves) is HF's to apply."""
    ref, model = _pair("mistral_window", seed=55)
    accelerate(model)
    ids = _ids(2, 11, seed=33)
    mask = torch.tril(torch.ones(11, 11, dtype=torch.bool))
    mask[5:, :5] = False
    mask = mask[None, None].expand(2, 1, 11, 11)
    _loss_and_grads_match(ref, model, ids, attention_mask=mask, labels=ids)
    assert flash_calls == []


def test_logits_to_keep():
    ref, model = _pair("llama", seed=57)
    accelerate(model)
    ids = _ids(2, 10, seed=34)
    with torch.no_grad():
        for keep in (3, torch.tensor([0, 4, 7])):
            a, b = model.eval()(ids, logits_to_keep=keep), ref.eval()(ids, logits_to_keep=keep)
            assert a.logits.shape == b.logits.shape
            _close(f"logits (keep {keep})", a.logits, b.logits)


@pytest.mark.parametrize("keep", [4, torch.tensor([1, 5, 6, 9])])
def test_logits_to_keep_with_labels(keep, monkeypatch):
    """``logits_to_keep`` with labels: HF computes the logits of the kept positions and its loss
    on them, one label per kept position, shifted among them; the fused loss does the same
    (was: it ignored logits_to_keep, a loss over every position where HF scores the kept ones
    only, refused one label per kept position, and accepted one per token where HF raises)."""
    ref, model = _pair("qwen3_qknorm", seed=63)
    accelerate(model)
    ids = _ids(2, 10, seed=37)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the kept positions read the row's real tokens only
    kept = _ids(2, 4, seed=38)
    kept[0, 1] = -100
    for shifted in (False, True):  # labels, or shift_labels (HF then reads labels only as a flag)
        kw = dict(attention_mask=mask, logits_to_keep=keep, labels=ids if shifted else kept)
        if shifted:
            kw["shift_labels"] = kept
        calls = []
        monkeypatch.setattr(hf_backend_forwards, "kept_shift_labels",
                            counting(calls, kept_shift_labels))
        _loss_and_grads_match(ref, model, ids, **kw)
        assert len(calls) == 1  # once per forward (was: twice, before and after the model)
        with torch.no_grad():
            a, b = ref.eval()(ids, **kw), model.eval()(ids, **kw)
        _close("loss (eval)", b.loss, a.loss)
        _close("logits (eval)", b.logits, a.logits)
        ref.train(), model.train()
    with pytest.raises(ValueError, match="batch_size"):
        ref(ids, labels=ids, logits_to_keep=keep)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 10\) but logits_to_keep keeps "
                                         r"\(2, 4\) positions"):
        model(ids, labels=ids, logits_to_keep=4)


@pytest.mark.parametrize("kw", [dict(num_beams=2, num_return_sequences=2),
                                dict(cache_implementation="static")])
def test_generate_beams_and_static_cache(kw):
    """Left-padded prompts, a window that bites: the same tokens as unswapped."""
    ref, model = _pair("mistral_window", seed=59)
    accelerate(model)
    ids = _ids(2, 9, seed=35)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
    with torch.no_grad():
        assert torch.equal(model.eval().generate(ids, **gen), ref.eval().generate(ids, **gen))


@pytest.mark.parametrize("use_cache", [False, None])
def test_data_collator_with_flattening(use_cache, flash_calls):
    """transformers' DataCollatorWithFlattening (with its flash-attention kwargs, which SDPA does
    not read): packed rows are found from position_ids (varlen) when no KV cache exists. With the
    config's use_cache, HF makes a cache and then does not detect packing (causal over the whole
    row); the swap does what HF does in both cases."""
    ref, model = _pair("llama", seed=61)
    accelerate(model)
    feats = [{"input_ids": _ids(1, n, seed=36 + n)[0].tolist()} for n in (4, 6, 3)]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    batch = {k: torch.as_tensor(v) if k in ("input_ids", "labels", "position_ids") else v
             for k, v in batch.items()}
    ids = batch.pop("input_ids")
    _loss_and_grads_match(ref, model, ids, use_cache=use_cache, **batch)
    assert flash_calls == ["varlen" if use_cache is False else "dense"] * 2


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_kv_cache_decoding_by_either_name(name, flash_calls):
    """A prefill then decoding steps with a cache the caller passes: transformers 5.24 calls it
    ``cache`` (its layers pass it so; ``past_key_values`` still accepted, renamed with a warning),
    older ones ``past_key_values``. The swapped layers must update it and attend to it, as HF."""
    import inspect

    if name not in inspect.signature(type(_pair("llama")[0]).forward).parameters and (
            name == "cache"):
        pytest.skip("this transformers has no cache= keyword")
    ref, model = _pair("qwen3_qknorm", seed=61)
    accelerate(model)
    ids = _ids(2, 11, seed=36)
    caches = {m: transformers.DynamicCache() for m in (ref, model)}
    with torch.no_grad():
        for lo, hi in ((0, 7), (7, 8), (8, 11)):  # prefill, one token, then three at once
            a, b = (m.eval()(ids[:, lo:hi], **{name: caches[m]}, use_cache=True)
                    for m in (model, ref))
            _close(f"logits [{lo}:{hi}]", a.logits, b.logits)
    assert caches[model].get_seq_length() == caches[ref].get_seq_length() == 11
    assert flash_calls == ["dense"] * 2  # the prefill; the later steps read the cache: HF's


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_every_loss_entry_point(attn):
    """Left padding through every way a user or TRL hands labels to a causal LM: labels -100 on
    the padding, labels on it too (the first real token predicted from a fully masked row),
    ``num_items_in_batch``, ``shift_labels`` (transformers 5; read over padding),
    ``logits_to_keep`` with one label per kept position, and the backbone called directly:
    loss and gradients, or hidden states, equal the unswapped model's."""
    ref, model = _pair("llama", seed=65, attn=attn)
    accelerate(model)
    ids = _ids(3, 10, seed=39)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :6] = 0
    masked = ids.masked_fill(mask == 0, -100)
    shift = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].contiguous()
    for kw in (dict(labels=masked), dict(labels=ids), dict(labels=masked, shift_labels=shift),
               dict(labels=masked, num_items_in_batch=torch.tensor(11)),
               dict(labels=masked[:, -4:].contiguous(), logits_to_keep=4)):
        ref.zero_grad(), model.zero_grad()
        _loss_and_grads_match(ref, model, ids, attention_mask=mask, **kw)
    with torch.no_grad():
        a, b = (m.model(ids, attention_mask=mask).last_hidden_state for m in (model, ref))
    _close("backbone hidden states", a, b)
