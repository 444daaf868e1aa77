"""objective = "cpo" (TRL's CPOTrainer, ``[cpo]``): the pure losses of every loss_type against TRL
1.16's numbers (losses, rewards, gradients), the config (alphapo's shorthand, refusals, ``ember
config``'s section, the note on a knob the loss type does not use). The objective's loss and
metrics on a real batch: test_preference_losses.py; a training run: test_objectives.py."""

from __future__ import annotations

import pytest
import torch

from ember import EmberError
from ember.engine.config import load_config
from ember.engine.config_doc import annotated_toml, unused_settings
from ember.engine.preference_losses import cpo_loss

# TRL 1.16.0 CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py) called directly in float64
# (a SimpleNamespace for self) on CPO_SUMS for "sigmoid" / "hinge" (TRL's concatenated_forward
# sums their log-probs) and on CPO_MEANS for "ipo" / "simpo" (average_log_prob=True); each:
# (loss_type, beta, label_smoothing, alpha, simpo_gamma), the per-pair losses, chosen and rejected
# rewards, and the gradients of losses.mean() w.r.t. the chosen and the rejected log-probs.
# fmt: off
CPO_SUMS = ([-12.4, -30.5, -3.2, -18.0], [-15.1, -22.7, -9.6, -17.3])
CPO_MEANS = ([-0.42, -1.35, -0.08, -2.2], [-0.9, -0.61, -1.7, -2.05])
CPO_TRL = [
    [["sigmoid", 0.1, 0.0, 0.0, 0.5], [0.5672321351223193, 1.1573440662232617, 0.42349651022253426, 0.7287595555486971], [-1.2400000000000002, -3.0500000000000003, -0.32000000000000006, -1.8], [-1.51, -2.27, -0.96, -1.7300000000000002], [-0.010822677375863642, -0.017142002848456347, -0.00863116348484202, -0.012937321441659745], [0.010822677375863642, 0.017142002848456347, 0.00863116348484202, 0.012937321441659745]],  # noqa: E501
    [["sigmoid", 0.5, 0.2, 0.0, 0.5], [0.5005085713638755, 3.140039767260398, 0.6799533331624303, 0.813382155418777], [-6.2, -15.25, -1.6, -9.0], [-7.55, -11.35, -4.8, -8.65], [-0.0007337964751184221, -0.09751996178324032, 0.020104284650404456, -0.04832719736466625], [0.0007337964751184221, 0.09751996178324032, -0.020104284650404456, 0.04832719736466625]],  # noqa: E501
    [["sigmoid", 0.1, 0.0, 0.1, 0.5], [0.2946270088777599, 11.435954408634263, 0.25538630101901505, 0.9184092942412483], [-2.455613464762676, -20.115344422540616, -0.3771277643359572, -5.0496474644129465], [-3.5267307943142523, -8.67940081407284, -1.6116964734231178, -4.640653908428321], [-0.022046006765868664, -0.5278779093634244, -0.00775952262388323, -0.09087274185318053], [0.028879485143912607, 0.24198240688742748, 0.014715786288728742, 0.08472918290181415]],  # noqa: E501
    [["hinge", 0.3, 0.0, 0.0, 0.5], [0.19000000000000028, 3.3400000000000003, 0.0, 1.2099999999999997], [-3.7199999999999998, -9.15, -0.96, -5.3999999999999995], [-4.529999999999999, -6.81, -2.88, -5.19], [-0.075, -0.075, -0.0, -0.075], [0.075, 0.075, 0.0, 0.075]],  # noqa: E501
    [["hinge", 0.3, 0.0, -0.05, 0.5], [0.5923970628151811, 1.6228063868149512, 0.0, 1.0868913573203316], [-2.7723333744319527, -4.694273658808603, -0.8871372662027319, -3.560582041556405], [-3.1799363116167716, -4.071467271993652, -2.2872996491631548, -3.4736906842360735], [-0.04034583281960056, -0.016321579264892444, -0.0, -0.030492724480544908], [0.03525079610479032, 0.02410665910007933, 0.0, 0.03157886644704906]],  # noqa: E501
    [["ipo", 0.5, 0.0, 0.0, 0.5], [0.27040000000000003, 3.027600000000001, 0.38439999999999985, 1.322500000000001], [-0.21, -0.675, -0.04, -1.1], [-0.45, -0.305, -0.85, -1.025], [-0.26, -0.8700000000000001, 0.30999999999999994, -0.5750000000000002], [0.26, 0.8700000000000001, -0.30999999999999994, 0.5750000000000002]],  # noqa: E501
    [["ipo", 0.2, 0.0, 0.25, 0.5], [3.73862169958644, 11.88035155099219, 0.2138541585162738, 7.590981269895241], [-0.08856848828456415, -0.3211516867135785, -0.016161072021404623, -0.5866024142939162], [-0.20185817295349154, -0.13179396967569143, -0.423672335730703, -0.5355677050461143], [-1.0738081259305572, -2.4152330225189025, -0.23589283175288764, -2.387706431883588], [1.210715281187053, 2.0073105115165775, 0.3536747123925747, 2.299825506346374]],  # noqa: E501
    [["simpo", 2.5, 0.1, 0.0, 1.2], [0.6931471805599453, 2.7912716853586628, 0.3412331778784831, 1.6056441994952815], [-1.05, -3.375, -0.2, -5.5], [-2.25, -1.525, -4.25, -5.125], [-0.25, -0.5342390790729454, 0.028324176740037017, -0.4553095187653745], [0.25, 0.5342390790729454, -0.028324176740037017, 0.4553095187653745]],  # noqa: E501
]
# fmt: on


@pytest.mark.parametrize(
    "case", range(len(CPO_TRL)), ids=lambda i: "-".join(map(str, CPO_TRL[i][0][:4]))
)
def test_cpo_loss_types_match_trl_1_16(case):
    (loss_type, beta, ls, alpha, gamma), losses, chosen, rejected, grad_c, grad_r = CPO_TRL[case]
    x = CPO_MEANS if loss_type in ("ipo", "simpo") else CPO_SUMS
    c, r = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in x)
    out = cpo_loss(c, r, beta, loss_type, ls, gamma, alpha)
    for got, want in zip(out, (losses, chosen, rejected), strict=True):
        torch.testing.assert_close(
            got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12
        )
    out.losses.mean().backward()
    for got, want in ((c.grad, grad_c), (r.grad, grad_r)):
        torch.testing.assert_close(
            got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12
        )


def test_cpo_config_defaults_and_alphapo_shorthand():
    cfg = load_config(None, ['objective="cpo"']).cpo  # TRL's CPOConfig defaults
    assert (
        cfg.beta,
        cfg.loss_type,
        cfg.label_smoothing,
        cfg.cpo_alpha,
        cfg.simpo_gamma,
        cfg.alpha,
    ) == (0.1, "sigmoid", 0.0, 1.0, 0.5, 0.0)
    # TRL's CPOConfig.__post_init__: "alphapo" is "simpo" with cpo_alpha = 0
    a = load_config(None, ['objective="cpo"', 'cpo.loss_type="alphapo"', "cpo.alpha=0.25"]).cpo
    assert (a.loss_type, a.cpo_alpha, a.alpha) == ("simpo", 0.0, 0.25)


@pytest.mark.parametrize(
    "sets,match",
    [
        (
            ['cpo.loss_type="kto"'],
            r"cpo\.loss_type must be one of 'sigmoid', 'hinge', 'ipo', "
            r"'simpo', 'alphapo', got 'kto'",
        ),
        (["cpo.beta=0"], r"cpo\.beta must be > 0"),
        (["cpo.cpo_alpha=-1"], r"cpo\.cpo_alpha must be >= 0"),
        (["cpo.simpo_gamma=-0.5"], r"cpo\.simpo_gamma must be >= 0"),
        (["cpo.label_smoothing=0.5"], r"cpo\.label_smoothing must be in \[0, 0\.5\)"),
        (
            ['cpo.loss_type="hinge"', "cpo.label_smoothing=0.1"],
            r"cpo\.label_smoothing applies to loss_type \"sigmoid\" and \"simpo\", not 'hinge'",
        ),
        (
            ['cpo.loss_type="alphapo"', "cpo.cpo_alpha=0.5"],
            r"\"alphapo\" is \"simpo\" with "
            r"cpo_alpha = 0",
        ),
        (["cpo.gamma=0.5"], r"unknown config key 'cpo\.gamma'"),
    ],
)
def test_bad_cpo_configs(sets, match):
    with pytest.raises(EmberError, match=match):
        load_config(None, ['objective="cpo"', *sets])


def test_ember_config_shows_the_cpo_section_and_notes_unused_knobs():
    cfg = load_config(None, ['objective="cpo"', 'cpo.loss_type="ipo"', "cpo.beta=0.5"])
    text = annotated_toml(cfg)
    section = text.split("[cpo]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [ln.split(" = ")[0] for ln in section] == [
        "beta",
        "loss_type",
        "label_smoothing",
        "cpo_alpha",
        "simpo_gamma",
        "alpha",
        "disable_dropout",
    ]
    assert section[1].startswith('loss_type = "ipo"  # "sigmoid" (CPO)')
    assert unused_settings(cfg) == []
    lines = unused_settings(load_config(None, ['objective="cpo"', "cpo.simpo_gamma=1.0"]))
    assert lines == ['cpo.simpo_gamma ignored: it applies to cpo.loss_type "simpo"']
    lines = unused_settings(load_config(None, ['objective="simpo"', "cpo.beta=0.5"]))
    assert lines == [
        'cpo.beta ignored: it applies to objective = "cpo", this run\'s objective is "simpo"'
    ]
