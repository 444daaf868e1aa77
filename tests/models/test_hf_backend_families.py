"""ember.models.hf_backend.accelerate on Gemma 1/2/3 (text) and Phi-3.

The oracle is the same transformers model without the swap, with eager attention (fp32 on CPU,
the shared numerics rule; helpers from test_hf_backend). The configs make every family feature
bite at T = 20: sliding windows shorter than the sequence on some layers, Gemma 2's attention and
final softcaps below the logits' range, Gemma 3's local RoPE base != its global one, Phi-3's
partial rotary (0.75) and LongRoPE past ``original_max_position_embeddings`` (long factors), and
``test_dropped_feature_is_caught`` shows the parity checks fail when the swap drops one of them.
A counting fixture records what reached each Ember kernel (per attention call: mode, window,
softcap, scale), so each swapped piece is shown to have run with the layer's own settings.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from ember import EmberError
from ember.models import hf_backend, hf_backend_forwards, hf_backend_loss
from ember.models.hf_backend import accelerate, restore, swapped
from tests.models.test_hf_backend import (
    VOCAB,
    _check_grads,
    _close,
    _curve_batches,
    _curves_match,
    _deferred,
    _ids,
    _loss_and_grads_match,
    _pair,
    _peft_parity,
    _triton_parity,
)

transformers = pytest.importorskip("transformers")

T, ORIG, LAYERS = 20, 16, 2
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(hidden_size=48, head_dim=16, **TOKENS)
LOCAL_GLOBAL = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def _longrope(prf: float) -> dict:
    n = int(16 * prf) // 2  # head_dim 16
    return dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=prf,
                short_factor=[1.0 + 0.15 * i for i in range(n)],
                long_factor=[1.5 + 1.25 * i for i in range(n)])


CASES = {
    "gemma": ("GemmaConfig", GEMMA),
    # layer_types default: [sliding, full]; softcaps small enough to bite on these logits
    "gemma2": ("Gemma2Config", dict(GEMMA, sliding_window=5, query_pre_attn_scalar=20,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, sliding_window=5, query_pre_attn_scalar=20,
                                        final_logit_softcapping=1.5,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters=LOCAL_GLOBAL)),
    "phi3_partial": ("Phi3Config", dict(hidden_size=64, sliding_window=7, **TOKENS,
                                        rope_parameters=dict(rope_type="default",
                                                             rope_theta=10000.0,
                                                             partial_rotary_factor=0.75))),
    "phi3_longrope": ("Phi3Config", dict(hidden_size=64, tie_word_embeddings=True, **TOKENS,
                                         original_max_position_embeddings=ORIG,
                                         rope_parameters=_longrope(1.0))),
}
# What each attention layer must hand flash_attention: (window, softcap, softmax scale).
EXPECTED = {
    "gemma": [(None, None, 16**-0.5)] * LAYERS,
    "gemma2": [(5, 2.0, 20**-0.5), (None, 2.0, 20**-0.5)],
    "gemma3": [(5, None, 20**-0.5), (None, None, 20**-0.5)],
    "phi3_partial": [(7, None, 16**-0.5)] * LAYERS,
    "phi3_longrope": [(None, None, 16**-0.5)] * LAYERS,
}
NORMS = {"gemma": 2 * LAYERS + 1, "gemma2": 4 * LAYERS + 1, "gemma3": 6 * LAYERS + 1,
         "phi3_partial": 2 * LAYERS + 1, "phi3_longrope": 2 * LAYERS + 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def _fam(case: str, seed: int = 0, **over):
    return _pair(case, seed=seed, attn="eager", cases=CASES, **over)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls reaching each Ember kernel behind the swap; ``calls["attn"]`` lists
    (mode, window, softcap, scale) per flash_attention call. Patch before ``accelerate``."""
    seen = collections.defaultdict(list)

    def counting(name, fn, record=lambda a, kw: None):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            seen[name].append(record(args, kw))
            return fn(*args, **kw)

        return wrapper

    attn = (lambda a, kw: ("varlen" if kw.get("cu_seqlens") is not None else "dense",
                           kw.get("window"), kw.get("softcap"), kw.get("softmax_scale")))
    monkeypatch.setattr(hf_backend_forwards, "flash_attention",
                        counting("attn", hf_backend_forwards.flash_attention, attn))
    for mod, name in ((hf_backend_forwards, "rms_norm"), (hf_backend_forwards, "apply_rope"),
                      (hf_backend_loss, "linear_cross_entropy")):
        monkeypatch.setattr(mod, name, counting(name, getattr(mod, name)))
    for key, fn in list(hf_backend._ACTIVATIONS.items()):
        monkeypatch.setitem(hf_backend._ACTIVATIONS, key, counting(fn.__name__, fn))
    return seen


def _attn(mode: str, case: str) -> list[tuple]:
    return [(mode, *e) for e in EXPECTED[case]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_parity(case, calls):
    ref, model = _fam(case, seed=len(case))
    accelerate(model)
    ids = _ids(2, T, seed=1)
    labels = ids.clone()
    labels[0, :4] = -100
    out_ref, out = ref(ids, labels=labels), model(ids, labels=labels)
    assert _deferred(out)
    _close("loss", out.loss, out_ref.loss)
    out_ref.loss.backward()
    out.loss.backward()
    _check_grads(ref, model)
    act = "swiglu" if case.startswith("phi3") else "geglu"
    assert calls["attn"] == _attn("dense", case)
    assert len(calls["apply_rope"]) == len(calls[act]) == LAYERS
    assert len(calls["rms_norm"]) == NORMS[case]
    assert len(calls["linear_cross_entropy"]) == 1
    kinds = list(swapped(model).values())
    assert set(kinds) == {"rms_norm", f"mlp:{act}", "attention", "attention_plan", "loss"}
    assert kinds.count("rms_norm") == NORMS[case]
    with torch.no_grad():  # eval: HF's logits path, and the fused loss's own (softcapped) logits
        want = ref.eval()(ids, labels=labels)
        _close("logits", model.eval()(ids).logits, want.logits)
        got = model(ids, labels=labels)
        _close("logits (loss path)", got.logits, want.logits)
        _close("loss (eval)", got.loss, want.loss)
        restore(model)
        assert swapped(model) == {}
        assert torch.equal(model(ids).logits, ref(ids).logits)


# feature -> (case, kernel in hf_backend_forwards / _loss, keyword the broken swap sets to None)
DROPS = {
    "attention softcap": ("gemma2", "flash_attention", "softcap"),
    "gemma2 window": ("gemma2", "flash_attention", "window"),
    "gemma3 window": ("gemma3", "flash_attention", "window"),
    "phi3 window": ("phi3_partial", "flash_attention", "window"),
    "final softcap": ("gemma2", "linear_cross_entropy", "softcap"),
}


@pytest.mark.parametrize("feature", sorted(DROPS))
def test_dropped_feature_is_caught(feature, monkeypatch):
    """A swap that loses the feature fails the parity check above: the configs make it bite."""
    case, kernel, kw_name = DROPS[feature]
    mod = hf_backend_loss if kernel == "linear_cross_entropy" else hf_backend_forwards
    real = getattr(mod, kernel)
    monkeypatch.setattr(mod, kernel, lambda *a, **kw: real(*a, **{**kw, kw_name: None}))
    ref, model = _fam(case, seed=len(case))
    accelerate(model)
    ids = _ids(2, T, seed=1)
    with torch.no_grad(), pytest.raises(AssertionError):
        _close("loss", model(ids, labels=ids).loss, ref(ids, labels=ids).loss)


@pytest.mark.parametrize("change", ["local rope base", "partial rotary", "longrope"])
def test_rope_variants_bite(change):
    """Gemma 3's local table, Phi-3's partial rotary and LongRoPE's long factors each change
    HF's own logits here, so the parity above checks that the swap uses what HF hands it."""
    case, over = {
        "local rope base": ("gemma3", dict(rope_parameters={
            k: dict(v, rope_theta=10000.0) for k, v in LOCAL_GLOBAL.items()})),
        "partial rotary": ("phi3_partial", dict(rope_parameters=dict(
            rope_type="default", rope_theta=10000.0))),
        "longrope": ("phi3_longrope", dict(rope_parameters=dict(_longrope(1.0), long_factor=[
            1.0 + 0.15 * i for i in range(8)]))),  # long == short factors
    }[change]
    a, _ = _fam(case, seed=5)
    b, _ = _fam(case, seed=5, **over)
    ids = _ids(2, T, seed=2)
    with torch.no_grad():
        assert (a.eval()(ids).logits - b.eval()(ids).logits).abs().max() > 1e-2


def test_gemma2_padding_varlen(calls):
    """2-D mask with right and left padding: varlen with each layer's window and the softcap."""
    ref, model = _fam("gemma2", seed=5)
    accelerate(model)
    ids = _ids(3, T, seed=2)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, 14:] = 0
    mask[2, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 6] = -100  # predicted from a padding position (see test_hf_backend)
    kw = dict(attention_mask=mask, labels=labels)
    _loss_and_grads_match(ref, model, ids, **kw)
    assert calls["attn"] == _attn("varlen", "gemma2")
    with torch.no_grad():
        real = mask.bool()
        a, b = model.eval()(ids, attention_mask=mask).logits, ref.eval()(ids, attention_mask=mask)
        _close("logits (real tokens)", a[real], b.logits[real])


def test_gemma2_padding_inside_rows(calls):
    """Padding inside a row: HF's sliding window counts the padding positions, so the windowed
    layer runs HF's attention with HF's mask; the full-attention layer stays on varlen."""
    ref, model = _fam("gemma2", seed=9)
    accelerate(model)
    ids = _ids(2, T, seed=4)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, 6:9] = 0
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 9] = -100  # predicted from a padding position
    kw = dict(attention_mask=mask, labels=labels)
    _loss_and_grads_match(ref, model, ids, **kw)
    assert calls["attn"] == _attn("varlen", "gemma2")[1:]


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3_partial"])
def test_triton_path(case, monkeypatch):
    """The Triton kernels (interpreter on CPU): (1 + w) norms incl. Gemma 3's q/k norms, window
    + softcap attention, both RoPE tables, the softcapped fused loss, Phi-3's fused qkv /
    gate_up views and partial rotary."""
    _triton_parity(monkeypatch, *_fam(case, seed=21))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gemma2_packed_varlen(checkpointing, calls):
    """Packed documents (position_ids restart): varlen with windows and softcap; under gradient
    checkpointing the recomputed layers replay the same plan."""
    ref, model = _fam("gemma2", seed=7)
    if checkpointing:
        for m in (ref, model):
            m.gradient_checkpointing_enable()
            m.train()
    accelerate(model)
    ids = _ids(1, T, seed=3)
    pos = torch.tensor([[*range(8), *range(3), *range(9)]])
    kw = dict(position_ids=pos, labels=ids, use_cache=False)
    out_ref, out = ref(ids, **kw), model(ids, **kw)
    _close("loss", out.loss, out_ref.loss)
    with torch.no_grad():  # packing must matter here, or the parity would not test it
        dense = ref(ids, labels=ids, position_ids=torch.arange(T)[None], use_cache=False).loss
    assert abs(dense.item() - out_ref.loss.item()) > 1e-3
    out_ref.loss.backward()
    out.loss.backward()
    _check_grads(ref, model)
    layers = _attn("varlen", "gemma2")
    # the backward recomputes the checkpointed layers, last one first
    assert calls["attn"] == (layers + layers[::-1] if checkpointing else layers)


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3_partial"])
def test_hf_attention_fallback(case, calls):
    """Where HF's attention runs (rope-only swap; decoding with a KV cache) it gets the layer's
    softcap and window too: same loss, same greedy generation."""
    ref, model = _fam(case, seed=17)
    accelerate(model, attention=False)
    ids = _ids(2, T, seed=8)
    with torch.no_grad():
        _close("loss", model(ids, labels=ids).loss, ref(ids, labels=ids).loss)
    assert calls["attn"] == [] and len(calls["apply_rope"]) == LAYERS
    accelerate(model)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded prompt
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        a, b = model.eval().generate(ids, **kw), ref.eval().generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for i, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
        _close(f"logits of new token {i}", x, y)
    assert calls["attn"][:LAYERS] == _attn("varlen", case)


@pytest.mark.parametrize("case,targets", [
    ("phi3_partial", ["qkv_proj", "o_proj", "gate_up_proj"]),
    ("gemma2", ["q_proj", "v_proj", "gate_proj", "up_proj"]),
])
def test_peft_lora(case, targets, calls):
    """LoRA on the fused Phi-3 projections and on Gemma 2: the swap calls the projections as
    modules, so PEFT's layers apply; same loss and gradients (LoRA and the rest)."""
    ref, model = _fam(case, seed=13)
    _peft_parity(ref, model, targets, _ids(2, T, seed=6))
    assert len(calls["attn"]) == LAYERS


@pytest.mark.parametrize("case", ["gemma2", "phi3_partial"])
def test_training_curves_match(case):
    """30 AdamW steps, as test_hf_backend.test_training_curves_match (Gemma 2 on packed rows,
    Phi-3 on padded ones). The final softcap is raised to 5 so that the loss can halve."""
    over = dict(final_logit_softcapping=5.0) if case == "gemma2" else {}
    ref, model = _fam(case, seed=19, **over)
    accelerate(model)
    _curves_match(ref, model, _curve_batches(packed=case == "gemma2"))


def test_multimodal_gemma3_refused():
    from tests.models.test_gemma3_multimodal import TEXT, VISION

    config = transformers.Gemma3Config(
        text_config=dict(TEXT, vocab_size=VOCAB), vision_config=VISION, mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with pytest.raises(EmberError, match="Gemma3ForConditionalGeneration is not a supported "
                                         "model.*Gemma3ForCausalLM, Phi3ForCausalLM.*text "
                                         "model alone"):
        accelerate(model)
    assert swapped(model) == {}
