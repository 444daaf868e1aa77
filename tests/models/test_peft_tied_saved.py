"""PEFT's modules_to_save on a model with tied embeddings, without ensure_weight_tying (SmolLM2,
Gemma, Qwen2.5-0.5B style, e.g. after adding tokens): PEFT trains a separate copy of each listed
module, which unties head and embedding (the module not listed keeps the base's matrix). Ember
unties the model's head the same way: PEFT's logits on load, PEFT loads what save_adapter writes
with Ember's logits, and the merged model exports untied with transformers' logits (it was
refused)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import load_adapter, merge_lora, save_adapter
from tests.models.test_interop_peft import VOCAB, _peft_adapter, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("tied_saved") / "tied",
                             transformers.LlamaConfig, seed=5, tie_word_embeddings=True)


def _train_copies(model) -> None:
    """PEFT starts each copy as the base's matrix: give the copies (different) new values."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))


def _close(a, b) -> bool:
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def _peft_loads_it_and_merged_exports_untied(model, tok, tied, tmp_path, ids, ours, ref):
    """PEFT loads the adapter Ember saved in ``tmp_path / "ember"`` with Ember's logits
    ``ours``; the merged model exports untied and transformers gives the PEFT oracle's ``ref``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        assert _close(theirs(input_ids=ids).logits, ours)
    merge_lora(model)
    save_pretrained(model, tmp_path / "merged", tok)
    assert not json.loads((tmp_path / "merged" / "config.json").read_text())[
        "tie_word_embeddings"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        assert _close(merged(input_ids=ids).logits, ref)


def _loads_peft_adapter(tied, tmp_path, **kw):
    """PEFT's adapter (``_peft_adapter`` with ``kw``) on the tied model, saved to tmp_path /
    "peft", loaded by Ember with PEFT's logits: (model, tokenizer, ids, Ember's logits, PEFT's)."""
    torch.manual_seed(0)
    ids, ref = _peft_adapter(tied, tmp_path / "peft", **kw)
    model, tok = load_pretrained(tied)
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        ours = model.eval()(ids)
    assert _close(ours, ref)
    return model, tok, ids, ours, ref


@pytest.mark.parametrize("mts", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_modules_to_save_untie_a_tied_model_as_peft(tied, tmp_path, mts):
    model, tok, ids, ours, ref = _loads_peft_adapter(tied, tmp_path, target_modules=["q_proj"],
                                                     modules_to_save=mts,
                                                     edit_base=_train_copies)
    # save_adapter: PEFT loads it with Ember's logits, the same modules saved
    save_adapter(model, tmp_path / "ember")
    cfg = json.loads((tmp_path / "ember" / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == sorted(mts) and not cfg["ensure_weight_tying"]
    _peft_loads_it_and_merged_exports_untied(model, tok, tied, tmp_path, ids, ours, ref)
    assert ids.max() < VOCAB


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "embed_tokens", "lm_head"]])
def test_lora_on_a_tied_head_without_weight_tying_unties(tied, tmp_path, targets):
    """PEFT without ensure_weight_tying puts the head's own adapter on the shared matrix (and
    the embedding's, if any, on the embedding alone): Ember unties the head to hold both (was
    refused), with PEFT's logits, saved back as PEFT's and exported untied."""
    model, tok, ids, ours, ref = _loads_peft_adapter(tied, tmp_path, target_modules=targets)
    save_adapter(model, tmp_path / "ember")
    _peft_loads_it_and_merged_exports_untied(model, tok, tied, tmp_path, ids, ours, ref)


def _corrupt(src, dst, how: str) -> None:
    """A copy of the PEFT adapter in ``src`` that fails late in load_adapter: a LoRA B of the
    wrong shape, or a key that matches no module of the model."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    sd = load_file(f)
    if how == "shape":
        k = next(k for k in sorted(sd) if "q_proj.lora_B" in k)
        sd[k] = torch.randn(sd[k].shape[0] + 1, sd[k].shape[1])
    else:
        sd["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.randn(4, 32)
    save_file(sd, f)


@pytest.mark.parametrize("how", ["shape", "key"])
@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                dict(target_modules=["q_proj", "lm_head"]),
                                dict(target_modules=["q_proj"], trainable_token_indices={
                                    "lm_head": [3, 7]})])
def test_failed_load_leaves_a_tied_model_as_it_was(tied, tmp_path, kw, how):
    """An adapter that unties a tied model's head (modules_to_save, LoRA or trainable tokens on
    lm_head) and then fails (a wrong shape, an unknown key) left the model untied, with a copy
    of the embedding as its head: the load is now all or nothing. The model keeps transformers'
    base logits and then loads the good adapter with PEFT's logits."""
    from ember import EmberError

    torch.manual_seed(0)
    ids, ref = _peft_adapter(tied, tmp_path / "peft", edit_base=_train_copies, **kw)
    _corrupt(tmp_path / "peft", tmp_path / "bad", how)
    base = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval()
    model, _ = load_pretrained(tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EmberError):
        load_adapter(model, tmp_path / "bad")
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not [n for n, _ in model.named_modules() if "lora" in type(_).__name__.lower()]
    with torch.no_grad():
        assert _close(model.eval()(ids), base(input_ids=ids).logits)
        load_adapter(model, tmp_path / "peft")
        assert _close(model.eval()(ids), ref)


def test_failed_load_onto_wrapped_modules_writes_nothing(tied, tmp_path):
    """A model whose q_proj already holds a rank-8 adapter refuses PEFT's rank-4 one; the check
    ran after the trained embedding (modules_to_save) had been written over the model's."""
    from ember import EmberError
    from ember.models.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    ids, _ = _peft_adapter(tied, tmp_path / "peft", target_modules=["q_proj"],
                           modules_to_save=["embed_tokens"], edit_base=_train_copies)
    base = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval()
    model, _ = load_pretrained(tied)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=("q",)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EmberError, match="already has a rank-8 adapter"):
        load_adapter(model, tmp_path / "peft")
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():  # B = 0: still the base model's logits
        assert _close(model.eval()(ids), base(input_ids=ids).logits)
