"""Training parity with transformers: the gradient of every weight w.r.t. a next-token loss, in
fp32, on tiny random checkpoints (the logits alone do not see what only a backward does)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from ember.models.hf import to_hf_state_dict
from ember.models.loading import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

from tests.models.test_interop_hf import VOCAB, _save  # noqa: E402


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager").eval()


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


def _max_grad_diffs(folder, ids) -> dict[str, float]:
    """{HF weight name: max |grad_ember - grad_hf|} for every weight."""
    hf = _hf_model(folder)
    _loss(hf(ids).logits, ids).backward()
    model, _ = load_pretrained(folder)
    _loss(model(ids), ids).backward()
    ours = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.cfg)
    theirs = dict(hf.named_parameters())
    assert set(ours) <= set(theirs)
    return {k: (g - theirs[k].grad).abs().max().item() for k, g in ours.items()}


@pytest.mark.parametrize("cls,kw", [
    ("LlamaConfig", dict(pad_token_id=5)),
    ("GemmaConfig", dict(pad_token_id=0, head_dim=8)),  # tied: the head's share of row 0 stays
    ("Qwen2Config", dict(pad_token_id=VOCAB - 1)),
], ids=["llama", "gemma_tied", "qwen2_last_row"])
def test_the_pad_rows_gradient_is_transformers(tmp_path, cls, kw, one_thread):
    """transformers' embeddings have padding_idx = pad_token_id, so the pad token's lookups add
    nothing to its row's gradient; Ember's embedding used to train that row (an input pad or an
    eos that doubles as pad moved it where a transformers fine-tune leaves it)."""
    folder = _save(tmp_path, cls, cls, **kw)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 3] = kw["pad_token_id"]
    ids[1, -3:] = kw["pad_token_id"]
    diffs = _max_grad_diffs(folder, ids)
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}


def test_a_lora_on_the_embedding_leaves_the_pad_row_as_peft_does(tmp_path, one_thread):
    """PEFT's LoRA embedding looks its A up with the base's padding_idx too: the pad token's
    lookups add nothing to A's pad row (Ember's adapter trained it)."""
    peft = pytest.importorskip("peft")
    from ember.models.lora import load_adapter

    folder = _save(tmp_path, "base", pad_token_id=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_hf_model(folder), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
            init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.mul_(0.2)
        pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 4] = 5
    _loss(pm(ids).logits, ids).backward()
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "adapter")
    _loss(model(ids), ids).backward()
    theirs = {n.split(".")[-2]: p.grad for n, p in pm.named_parameters()
              if "embed_tokens.lora" in n}
    assert theirs["lora_embedding_A"][:, 5].abs().max() == 0
    for name in ("lora_embedding_A", "lora_embedding_B"):
        ours = getattr(model.embed, name).grad
        assert (ours - theirs[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("cls", ["LlamaConfig", "PhiConfig"])
def test_a_negative_pad_id_leaves_the_row_pytorch_counts_from_the_end(tmp_path, cls, one_thread):
    """pad_token_id -1 (the first Llama conversions): transformers builds the embedding with
    padding_idx=-1, which nn.Embedding reads as the last row (V - 1), so that token's lookups add
    nothing to its row's gradient. Ember read -1 as no pad token and trained the row (its grad
    differed by 0.19 from transformers' zero); its export wrote pad_token_id null, training it."""
    folder = _save(tmp_path, cls, cls)
    path = folder / "config.json"
    raw = {**json.loads(path.read_text()), "pad_token_id": -1}
    if cls == "PhiConfig":  # Phi's is layer_norm_eps
        del raw["rms_norm_eps"]
    path.write_text(json.dumps(raw))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[:, 4] = VOCAB - 1
    diffs = _max_grad_diffs(folder, ids)
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}
    model, _ = load_pretrained(folder)
    assert model.cfg.pad_token_id is None  # no pad token for classifiers and generation
    save_pretrained(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pad_token_id"] == -1
