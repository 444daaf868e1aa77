"""NEFTune: transformers' hook is the oracle for the noise (Gemma's scaled embedding module and
Granite's multiplier included; PEFT's prompt tuning for virtual tokens); through the trainer,
training losses change and evaluation does not."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.neftune import add_model_neftune, add_neftune
from ember.engine.trainer import train
from tests.engine._tiny import quiet, rows_of, tiny_config


def test_same_noise_as_transformers():
    from transformers.integrations.neftune import neftune_post_forward_hook

    ids = torch.randint(0, 50, (2, 37))
    ours, theirs = torch.nn.Embedding(50, 24), torch.nn.Embedding(50, 24)
    theirs.load_state_dict(ours.state_dict())
    handle = add_neftune(ours, 5.0)
    theirs.neftune_noise_alpha = 5.0
    theirs.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(3)
    a = ours(ids)
    torch.manual_seed(3)
    b = theirs(ids)
    assert torch.equal(a, b)
    clean = ours.weight[ids]
    bound = 5.0 / (37 * 24) ** 0.5
    assert 0.9 * bound < (a - clean).abs().max() <= bound
    ours.eval()
    assert torch.equal(ours(ids), clean)  # no noise outside training
    ours.train()
    handle.remove()
    assert torch.equal(ours(ids), clean)


def _first_layer_input(model, layers, ids, seed):
    """What the first decoder layer receives (the embeddings after any scale), noisy (train
    mode, RNG seeded) and clean (eval mode)."""
    got = []
    h = layers[0].register_forward_pre_hook(
        lambda _m, a, k: got.append((a[0] if a else k["hidden_states"]).detach().clone()),
        with_kwargs=True)
    model.train()
    torch.manual_seed(seed)
    model(ids)
    model.eval()
    with torch.no_grad():
        model(ids)
    h.remove()
    return got


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
@pytest.mark.parametrize("cls,kw", [
    ("GemmaConfig", dict(head_dim=8)),  # sqrt(hidden) inside transformers' embedding module
    ("GraniteConfig", dict(embedding_multiplier=3.0)),  # multiplier after the module
    ("LlamaConfig", {}),
])
def test_model_noise_is_transformers_where_the_embeddings_are_scaled(tmp_path, cls, kw):
    """transformers' Gemma embedding module scales by sqrt(hidden) itself, so its NEFTune noise
    lands after the scale; Ember's used to be added before it (sqrt(hidden) times too large)."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.neftune import activate_neftune

    from ember.models.loading import load_pretrained
    from tests.models.test_interop_hf import _save

    folder = _save(tmp_path, cls, cls, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    activate_neftune(hf, 5.0)
    ours, _ = load_pretrained(folder)
    add_model_neftune(ours, 5.0)
    ids = torch.randint(0, 50, (1, 19))
    noisy_hf, clean_hf = _first_layer_input(hf, hf.model.layers, ids, 7)
    noisy, clean = _first_layer_input(ours, ours.layers, ids, 7)
    torch.testing.assert_close(clean, clean_hf, rtol=0, atol=0)
    torch.testing.assert_close(noisy, noisy_hf, rtol=1e-6, atol=1e-6)
    bound = 5.0 / (19 * 48) ** 0.5 * (3.0 if cls == "GraniteConfig" else 1.0)
    assert 0.9 * bound < (noisy - clean).abs().max() <= bound * (1 + 1e-5)


def test_prompt_tuning_noise_skips_the_virtual_tokens(tiny):
    """PEFT's prompt tuning embeds the input ids with the model's embedding module (the hooked
    one, (B, T, D)) and prepends the virtual tokens after it: no noise on them, and T counts
    the real tokens only."""
    from ember.models.loading import load_pretrained
    from ember.models.prompt_tuning import apply_prompt_tuning

    model, _ = load_pretrained(tiny["model"], "float32")
    apply_prompt_tuning(model, 4)
    add_model_neftune(model, 5.0)
    V = model.embed.first_virtual_id
    ids = torch.cat([torch.arange(V, V + 4), torch.randint(0, 50, (29,))])[None]  # (1, 33)
    model.embed.train()
    noisy = model.embed(ids)
    clean = model.embed.eval()(ids)
    noise = (noisy - clean).abs()
    assert torch.equal(noise[0, :4], torch.zeros_like(noise[0, :4]))  # the virtual tokens
    bound = 5.0 / (29 * clean.shape[-1]) ** 0.5  # T = the 29 real tokens
    assert 0.9 * bound < noise.max() <= bound


def test_training_is_noisy_and_evaluation_is_not(tiny, tmp_path):
    def run(name, *extra):
        cfg = tiny_config(tiny, tmp_path / name, "max_steps=2", "eval.metrics=[]",
                          "eval.every_steps=1", "lora.dropout=0.0", "optim.warmup_steps=0",
                          *extra)  # no warmup: step 1 trains (a warmup's first lr is 0)
        train(cfg, echo=quiet, progress=False)
        rows = rows_of(tmp_path / name)
        return ([r["loss"] for r in rows if r["kind"] == "train"],
                [r["val_loss"] for r in rows if r["kind"] == "eval"])

    (train0, val0), (train5, val5) = run("off"), run("on", "neftune_noise_alpha=5.0")
    assert val5[0] == val0[0]  # the base model before training: evaluation sees no noise
    assert train5[0] != train0[0]  # the first step's batch went through noisy embeddings
    assert all(abs(a - b) < 0.05 for a, b in zip(train5, train0, strict=True))


@pytest.mark.parametrize("extra, match", [
    (("neftune_noise_alpha=-1",), "must be >= 0"),
    (("neftune_noise_alpha=5", 'objective="simpo"'), "applies to instruction tuning"),
])
def test_config_errors(tiny, tmp_path, extra, match):
    with pytest.raises(EmberError, match=match):
        tiny_config(tiny, tmp_path / "x", *extra)
