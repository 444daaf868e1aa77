"""``attention_dropout`` (Granite 3's published configs carry 0.1; any family may set it): dropout
on the attention probabilities in training forwards, as transformers' attention applies it.

The oracle is transformers' "eager" attention in training mode: with the same seed it draws the
same dropout masks in the same order (one ``F.dropout`` per layer on the (B, H, T, S)
probabilities), so the training-mode logits and gradients must match. Eval forwards never drop,
and the field round-trips through Ember's export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained
from tests.models.test_interop_hf import PHI3, _assert_parity_and_export, _ids, _save

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

GRANITE = dict(attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5,
               logits_scaling=2.0)


def _hf_train(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").train()


@pytest.mark.parametrize("cls,kw", [
    ("GraniteConfig", GRANITE),
    ("MistralConfig", dict(sliding_window=5)),  # the window and the dropout together
    ("Gemma2Config", dict(sliding_window=5)),  # softcap + window + dropout
    ("Phi3Config", PHI3),
])
def test_training_forward_drops_as_transformers_eager(tmp_path, cls, kw):
    folder = _save(tmp_path, cls, cls, attention_dropout=0.25, **kw)
    model, _ = load_pretrained(folder)
    assert model.cfg.attention_dropout == 0.25
    ids = _ids(12)
    hf = _hf_train(folder)
    model.train()
    torch.manual_seed(7)
    ref = hf(ids).logits
    torch.manual_seed(7)
    ours = model(ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    # gradients through the dropped probabilities
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (ours * g).sum().backward()
    ho = hf.model.layers[0].self_attn.o_proj.weight.grad  # (Phi-3 has no separate q_proj)
    assert (model.layers[0].attn.o_proj.weight.grad - ho).abs().max().item() <= 1e-4
    hk = hf.model.embed_tokens.weight.grad  # through every layer's dropped probabilities
    assert (model.embed.weight.grad - hk).abs().max().item() <= 1e-4
    # a different draw gives a different answer: the dropout is really applied
    torch.manual_seed(8)
    assert (model(ids) - ref).abs().max().item() > 1e-2
    # eval forwards never drop: equal to transformers' eval logits, and the export keeps it
    model.eval()
    _assert_parity_and_export(model, folder, ids, tmp_path)
    out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert out["attention_dropout"] == 0.25



@pytest.mark.parametrize("cls,kw", [("GraniteConfig", GRANITE), ("Qwen2Config", {})])
def test_training_forward_with_a_kv_cache_drops_as_transformers(tmp_path, cls, kw):
    """A training-mode forward of new tokens after cached ones (queries T < keys S): the causal
    mask is offset by the cache, as transformers' eager attention builds it (was: a (T, T) mask
    against (T, S) scores, a RuntimeError). Not with a sliding window: transformers' cache then
    keeps fewer keys, so its dropout draws another shape."""
    from ember.models.transformer import KVCache

    folder = _save(tmp_path, cls, cls, attention_dropout=0.25, **kw)
    model, _ = load_pretrained(folder)
    hf = _hf_train(folder)
    model.train()
    ids = _ids(9)
    with torch.no_grad():
        torch.manual_seed(7)
        past = transformers.DynamicCache(config=hf.config)
        hf(ids[:, :5], past_key_values=past, use_cache=True)
        ref = hf(ids[:, 5:], past_key_values=past, use_cache=True).logits
        torch.manual_seed(7)
        cache = KVCache(model.cfg, ids.shape[0], 16, ids.device, torch.float32)
        model(ids[:, :5], cache=cache)
        ours = model(ids[:, 5:], cache=cache)
    assert ours.shape == ref.shape == (ids.shape[0], 4, ref.shape[-1])
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cls,kw", [("GraniteConfig", GRANITE), ("Qwen2Config", {})])
def test_left_padded_training_forward_drops_as_transformers(tmp_path, cls, kw):
    """A training forward of a left-padded batch (``key_mask``, transformers' attention_mask)
    drops the probabilities too (was: the padded path never dropped, silently)."""
    folder = _save(tmp_path, cls, cls, attention_dropout=0.25, **kw)
    model, _ = load_pretrained(folder)
    hf = _hf_train(folder)
    model.train()
    ids = _ids(7)
    mask = torch.ones(ids.shape, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        torch.manual_seed(7)
        ours = model(ids, pos, key_mask=real)
        assert (ours - ref)[real].abs().max().item() <= 1e-4
        torch.manual_seed(8)  # the dropout is really drawn
        assert (model(ids, pos, key_mask=real) - ref)[real].abs().max().item() > 1e-2

def test_packed_documents_drop_without_crossing(tmp_path):
    """A packed batch (cu_seqlens, positions restarting per document) in training: dropout is
    drawn, and a document's logits never depend on another document's tokens (same seed, same
    draws: changing the first document leaves the second one's logits as they were)."""
    folder = _save(tmp_path, "granite", "GraniteConfig", attention_dropout=0.3, **GRANITE)
    model, _ = load_pretrained(folder)
    model.train()
    ids = _ids(10)[:1]
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 1) % model.cfg.vocab_size
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    kw = dict(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6)

    def run(x, seed):
        torch.manual_seed(seed)
        return model(x, pos, **kw)

    a, b = run(ids, 3), run(other, 3)
    assert (a[:, 4:] - b[:, 4:]).abs().max().item() == 0.0
    assert (a[:, :4] - b[:, :4]).abs().max().item() > 1e-3
    assert (run(ids, 4) - a).abs().max().item() > 1e-3  # another draw: really dropped
    model.eval()
    with torch.no_grad():  # eval: the packed run is the documents run alone
        alone = torch.cat([model(ids[:, :4]), model(ids[:, 4:])], 1)
        assert (model(ids, pos, **kw) - alone).abs().max().item() <= 1e-4


def test_attention_dropout_out_of_range_is_refused(tmp_path):
    folder = _save(tmp_path, "granite", "GraniteConfig", **GRANITE)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attention_dropout": 1.0}))
    with pytest.raises(EmberError, match=r"attention_dropout must be in \[0, 1\)"):
        load_pretrained(folder)


def test_run_setting_overrides_the_checkpoints_dropout(tmp_path):
    """model.attention_dropout in a run's config: 0 turns Granite's 0.1 off (the flash kernels
    train: a training forward is then deterministic and equals the eval forward); a value sets
    it; out of range is refused by name. Every path that builds a run's model (engine/stages.py
    load_base) applies it to the model and every block."""
    from ember.engine.config import load_config
    from ember.engine.stages import load_base

    folder = _save(tmp_path, "granite", "GraniteConfig", attention_dropout=0.1, **GRANITE)
    ids = _ids(12)
    off, _ = load_base(load_config(None, [f"model.name={folder}", "model.attention_dropout=0"]),
                       str(folder), "float32", "cpu")
    assert off.cfg.attention_dropout == 0.0
    assert all(layer.attn.cfg is off.cfg for layer in off.layers)
    with torch.no_grad():
        ref = off.eval()(ids)
        torch.manual_seed(1)
        assert (off.train()(ids) - ref).abs().max().item() <= 1e-6
    on, _ = load_base(load_config(None, [f"model.name={folder}", "model.attention_dropout=0.3"]),
                      str(folder), "float32", "cpu")
    assert on.cfg.attention_dropout == 0.3 and on.layers[-1].attn.cfg.attention_dropout == 0.3
    kept, _ = load_base(load_config(None, [f"model.name={folder}"]), str(folder), "float32",
                        "cpu")
    assert kept.cfg.attention_dropout == 0.1
    with pytest.raises(EmberError, match=r"model.attention_dropout must be in \[0, 1\)"):
        load_config(None, ["model.attention_dropout=1.5"])


def test_residual_dropout_with_sandwich_norms_is_refused(tmp_path):
    """Gemma 2/3 and OLMo2 blocks (sandwich norms) have no residual dropout in transformers, and
    Ember's would silently skip one: a config asking for it is refused, saying what to set."""
    folder = _save(tmp_path, "gemma2", "Gemma2Config", attention_dropout=0.25)
    model, _ = load_pretrained(folder)
    assert model.cfg.sandwich_norms
    with pytest.raises(ValueError, match=r"resid_dropout \(0.1\) is not applied with "
                                         r"sandwich_norms.*set resid_dropout=0"):
        model.cfg.replace(resid_dropout=0.1)


def test_disable_dropout_turns_phi_dropout_off_and_keeps_attention_dropout_as_trl(tmp_path):
    """The preference objectives' disable_dropout (``ember.models.dropout``) against TRL 1.16's
    ``disable_dropout_in_model`` (p = 0 on every ``torch.nn.Dropout``) on transformers' Phi:
    its resid_dropout / embed_dropout modules stop drawing, and its attention_dropout (a float
    transformers applies functionally, no module) keeps drawing, the same masks for the same
    seed. The model's config, and so its export, keep the checkpoint's values."""
    from ember.models.dropout import disable_dropout_
    from tests.models.test_interop_hf import BASE, randomize_

    config = transformers.PhiConfig(**{k: v for k, v in BASE.items() if k != "rms_norm_eps"},
                                    resid_pdrop=0.2, embd_pdrop=0.15, attention_dropout=0.25)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, 5)
    hf.save_pretrained(tmp_path / "phi")
    model, _ = load_pretrained(tmp_path / "phi")
    assert disable_dropout_(model) == ["embedding dropout 0.15", "residual dropout 0.2"]
    assert (model.cfg.resid_dropout, model.cfg.embed_dropout) == (0.2, 0.15)
    assert disable_dropout_(model) == []  # nothing left on (attention dropout is no module)
    hf = _hf_train(tmp_path / "phi")
    for m in hf.modules():  # TRL's disable_dropout_in_model, verbatim
        if isinstance(m, torch.nn.Dropout):
            m.p = 0
    model.train()
    ids = _ids(12)
    with torch.no_grad():
        torch.manual_seed(7)
        ref = hf(ids).logits
        torch.manual_seed(7)
        assert (model(ids) - ref).abs().max().item() <= 1e-4
        torch.manual_seed(8)  # attention dropout still drawn, in both
        assert (model(ids) - ref).abs().max().item() > 1e-2
        torch.manual_seed(8)
        assert (hf(ids).logits - ref).abs().max().item() > 1e-2


def test_dpo_start_up_note_says_granite_attention_dropout_stays(tmp_path):
    """A Granite-style attention_dropout under objective dpo: disable_dropout (default) turns
    the LoRA dropout off and says that attention dropout stays on, as TRL leaves transformers'
    on, naming the setting that turns it off; model.attention_dropout = 0 then leaves nothing."""
    from ember.engine.config import load_config
    from ember.engine.objectives import disable_run_dropout
    from ember.engine.stages import load_base
    from ember.models.lora import apply_lora

    def build(sets):
        cfg = load_config(None, sets)
        model, _ = load_base(cfg, str(folder), "float32", "cpu")
        return cfg, apply_lora(model, cfg.lora)

    folder = _save(tmp_path, "granite", "GraniteConfig", attention_dropout=0.1, **GRANITE)
    sets = [f"model.name={folder}", 'objective="dpo"', "lora.dropout=0.05", 'device="cpu"']
    cfg, model = build(sets)
    note = disable_run_dropout(cfg, model)
    assert note == ("dpo.disable_dropout (TRL's default): off for this run: LoRA dropout 0.05 "
                    "(set dpo.disable_dropout = false to keep it); attention dropout 0.1 stays "
                    "on, as TRL leaves transformers' attention_dropout on "
                    "(model.attention_dropout = 0 turns it off)")
    ids = _ids(12)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(ids)
        torch.manual_seed(2)
        assert (model(ids) - a).abs().max().item() > 1e-3  # attention dropout still drawn
    sets += ["model.attention_dropout=0"]
    cfg, model = build(sets)
    assert disable_run_dropout(cfg, model).startswith(
        "dpo.disable_dropout (TRL's default): off for this run: LoRA dropout 0.05")
    with torch.no_grad():
        a = model.train()(ids)
        assert torch.equal(model(ids), a)
