"""NEFTune: transformers' hook is the oracle for the noise; through the trainer, training losses
change and evaluation does not."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.neftune import add_neftune
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
