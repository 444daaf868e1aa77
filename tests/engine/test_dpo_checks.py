"""One rule for DPO's settings (``preference_losses.check_dpo``), from the config (``[dpo]``: the
messages name TOML keys) and from a direct ``dpo_loss`` call (the messages name its arguments):
each bad setting is refused both ways (was: ``DPOConfig.__post_init__`` and ``_check_dpo`` held
two copies that differed, ``dpo_loss`` took "robust" without label smoothing, i.e. plain sigmoid
DPO, and conservative "sigmoid" next to another smoothed loss type, silently)."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.config import load_config
from ember.engine.preference_losses import dpo_loss

X = torch.zeros(3)

# (the [dpo] keys, dpo_loss's arguments, the config's message, the direct call's message)
CASES = [
    (
        ["dpo.loss_type=[]"],
        dict(loss_type=()),
        r"dpo\.loss_type must name at least one loss type",
        r"dpo loss_type must name at least one loss type",
    ),
    (["dpo.beta=0"], dict(beta=0.0), r"dpo\.beta must be > 0, got 0", r"dpo beta must be > 0"),
    (
        ["dpo.label_smoothing=0.5"],
        dict(label_smoothing=0.5),
        r"dpo\.label_smoothing must be in \[0, 0\.5\)",
        r"dpo label_smoothing must be in \[0, 0\.5\)",
    ),
    (
        ['dpo.loss_type="simpo"'],
        dict(loss_type="simpo"),
        r"dpo\.loss_type must be one of .*'sft' \(or a list",
        r"dpo loss_type must be one of 'sigmoid', .*'discopop'.*got 'simpo'",
    ),
    (
        ['dpo.loss_type="robust"'],
        dict(loss_type="robust"),
        r'dpo\.loss_type = "robust" needs dpo\.label_smoothing in \(0, 0\.5\)',
        r'dpo loss_type = "robust" needs dpo label_smoothing in \(0, 0\.5\)',
    ),
    (
        ['dpo.loss_type="exo_pair"'],
        dict(loss_type="exo_pair"),
        r'dpo\.loss_type = "exo_pair" needs dpo\.label_smoothing in \(0, 0\.5\)',
        r'dpo loss_type = "exo_pair" needs dpo label_smoothing in \(0, 0\.5\)',
    ),
    (
        ['dpo.loss_type="nca_pair"', "dpo.label_smoothing=0.1"],
        dict(loss_type="nca_pair", label_smoothing=0.1),
        r"dpo\.label_smoothing applies to loss_type 'sigmoid', .*not 'nca_pair': drop it",
        r"dpo label_smoothing applies to loss_type 'sigmoid', .*not 'nca_pair': drop it",
    ),
    (
        ['dpo.loss_type=["sigmoid", "exo_pair"]', "dpo.label_smoothing=0.01"],
        dict(loss_type=("sigmoid", "exo_pair"), label_smoothing=0.01),
        r"dpo\.label_smoothing with loss_type \"sigmoid\" .*conservative DPO",
        r"dpo label_smoothing with loss_type \"sigmoid\" .*conservative DPO",
    ),
    (
        ['dpo.f_divergence_type="chi2"'],
        dict(f_divergence="chi2"),
        r"dpo\.f_divergence_type must be one of",
        r"dpo f_divergence must be one of",
    ),
    (
        ['dpo.loss_type="bco_pair"', 'dpo.f_divergence_type="forward_kl"'],
        dict(loss_type="bco_pair", f_divergence="forward_kl"),
        r"dpo\.f_divergence_type = 'forward_kl' applies to .*not 'bco_pair'.*use "
        r"dpo\.f_divergence_type = \"reverse_kl\"",
        r"dpo f_divergence = 'forward_kl' applies to .*not 'bco_pair'.*use dpo f_divergence = ",
    ),
    (
        ["dpo.f_alpha_divergence_coef=inf"],
        dict(f_alpha=float("inf")),
        r"dpo\.f_alpha_divergence_coef must be .*finite",
        r"dpo f_alpha must be finite",
    ),
    (
        ["dpo.discopop_tau=0"],
        dict(discopop_tau=0.0),
        r"dpo\.discopop_tau must be > 0",
        r"dpo discopop_tau must be > 0",
    ),
    (
        ['dpo.loss_type=["sigmoid", "ipo"]', "dpo.loss_weights=[1.0]"],
        dict(loss_type=("sigmoid", "ipo"), loss_weights=(1.0,)),
        r"dpo\.loss_weights must have one weight per dpo\.loss_type entry: 1 weights for 2",
        r"dpo loss_weights must have one weight per dpo loss_type entry: 1 weights for 2",
    ),
    (
        ['dpo.loss_type=["sigmoid", "ipo"]', "dpo.loss_weights=[1.0, -0.5]"],
        dict(loss_type=("sigmoid", "ipo"), loss_weights=(1.0, -0.5)),
        r"dpo\.loss_weights must be finite and >= 0",
        r"dpo loss_weights must be finite and >= 0",
    ),
]


@pytest.mark.parametrize("sets,kwargs,toml,arg", CASES)
def test_one_dpo_rule_with_toml_keys_and_argument_names(sets, kwargs, toml, arg):
    with pytest.raises(EmberError, match=toml):
        load_config(None, ['objective="dpo"', *sets])
    kw = {"beta": 0.1, "chosen_tokens": X + 1, "rejected_tokens": X + 1, **kwargs}
    with pytest.raises(EmberError, match=arg):
        dpo_loss(X, X, X, X, **kw)
