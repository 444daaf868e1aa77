"""DPO's loss types against TRL 1.16.0's own numbers: ``DPOTrainer._compute_loss`` (trl 1.16.0,
trl/trainer/dpo_trainer.py) was run on the fixed per-token log-probabilities below (4 pairs, the
policy's, the reference's and, for WPO, the log-sum of squared probabilities, from the formulas
in ``_token``), its model and reference stand-ins returning them as ``log_probs`` (float64;
float32 where ``fp32``, as TRL's alpha-divergence supports no float64), ``self`` a namespace with
the DPOConfig fields of each case (TRL's names: ``loss_type``, ``beta``, ``label_smoothing``
``ls``, ``f_divergence_type`` ``f``, ``f_alpha_divergence_coef`` ``f_alpha``, ``discopop_tau``
``tau``, ``loss_weights`` ``weights``, ``ld_alpha`` ``ld``, ``use_weighting`` ``wpo``), the
returned loss back-propagated to the per-token log-probs. Kept: the loss, the gradient of each
answer's tokens (one value per answer where every token gets the same; each token's with
``ld``), and the logged ``logps/chosen``, ``logps/rejected``. The tests need no TRL. On a real
model: the DPO objective with LD-DPO / WPO against those definitions on each document's full
logits alone (the reference live and precomputed)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ember import EmberError
from ember.engine import preference_objectives
from ember.engine.config import load_config
from ember.engine.data import IGNORE, DataConfig, collate, load_examples
from ember.engine.distributed import DistInfo
from ember.engine.objectives import make_objective
from ember.engine.preference_losses import dpo_loss, ld_token_weights, wpo_pair_weights
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora
from tests.engine._tiny import WORDS, away_from_reference, tiny_config, write_jsonl

NC, NR = [3, 5, 2, 4], [4, 2, 2, 6]  # answer tokens: the chosen, then the rejected answers
LENGTHS = NC + NR


def _token(kind: str, row: int, k: int) -> float:
    """The k-th answer token's value of row ``row`` (chosen rows 0-3, rejected 4-7)."""
    if kind == "pol":
        return -(0.3 + ((row * 5 + k * 3) % 7) * 0.17)
    if kind == "ref":
        return -(0.35 + ((row * 3 + k * 5 + 2) % 6) * 0.2)
    return -(0.2 + ((row + 2 * k) % 5) * 0.1)  # log sum_v p_v^2 (WPO)


def tokens(kind: str, dtype=torch.float64) -> list[torch.Tensor]:
    return [
        torch.tensor([_token(kind, r, k) for k in range(n)], dtype=dtype)
        for r, n in enumerate(LENGTHS)
    ]


# name: (TRL's arguments, loss, logps/chosen, logps/rejected, gradients)
# fmt: off
TRL_1_16 = {
    'sigmoid': (
        {'loss_type': ['sigmoid'], 'beta': 0.5},
        0.6743774584019124, -2.7074999999999996, -2.835,
        [-0.0656223984348675, -0.06531060309897502, -0.06779974259679387, -0.04386493446942833,
        0.0656223984348675, 0.06531060309897502, 0.06779974259679387, 0.04386493446942833]),
    'sigmoid_norm': (
        {'loss_type': ['sigmoid_norm'], 'beta': 0.5},
        0.7172308389587427, -2.7074999999999996, -2.835,
        [-0.021432126695710846, -0.013752037538260996, -0.03257732593539213, -0.014293600974989744,
        0.016074095021783134, 0.03438009384565249, 0.03257732593539213, 0.009529067316659829]),
    'exo_pair': (
        {'loss_type': ['exo_pair'], 'beta': 0.5, 'ls': 0.001},
        2.6717268717595344, -2.7074999999999996, -2.835,
        [-0.21841459815087788, -0.21820642347937885, -0.2195584559391539, -0.17913805618705506,
        0.21841459815087788, 0.21820642347937885, 0.2195584559391539, 0.17913805618705506]),
    'nca_pair': (
        {'loss_type': ['nca_pair'], 'beta': 0.5},
        1.4372923006706333, -2.7074999999999996, -2.835,
        [-0.04930300611814771, -0.007409793816275843, -0.05042865816661826, 0.005169313770255736,
        0.02675024169178009, 0.04049630013004064, 0.027440909354705233, 0.03444195433170887]),
    'bco_pair': (
        {'loss_type': ['bco_pair'], 'beta': 0.5},
        1.4105451566711706, -2.7074999999999996, -2.835,
        [-0.07453533741209847, -0.04660652921085056, -0.07528577211107884, -0.038220457486496176,
        0.05350048338356018, 0.08099260026008127, 0.05488181870941047, 0.06888390866341774]),
    'sppo_hard': (
        {'loss_type': ['sppo_hard'], 'beta': 0.5},
        3.5703750000000003, -2.7074999999999996, -2.835,
        [-0.8900000000000001, 0.019999999999999796, -0.9149999999999999, 0.3200000000000003,
        0.2100000000000002, 1.1099999999999999, 0.255, 0.7050000000000001]),
    'aot': (
        {'loss_type': ['aot'], 'beta': 0.5, 'ls': 0.1},
        0.6740135274772072, -2.7074999999999996, -2.835,
        [-0.046098828328280474, -0.05281060309897502, -0.05529974259679388, -0.03796466258790152,
        0.046098828328280474, 0.05281060309897502, 0.05529974259679388, 0.03796466258790152]),
    'aot_unpaired': (
        {'loss_type': ['aot_unpaired'], 'beta': 0.5},
        0.666880246460389, -2.7074999999999996, -2.835,
        [-0.06702332752897434, -0.05273684588946137, -0.06640117167171952, -0.05596151130320933,
        0.06640117167171952, 0.05596151130320933, 0.06702332752897434, 0.05273684588946137]),
    'apo_zero': (
        {'loss_type': ['apo_zero'], 'beta': 0.5},
        0.9858138144739874, -2.7074999999999996, -2.835,
        [-0.030091205227015538, -0.02922918069019563, -0.02994219225218847, -0.026534030522679684,
        0.030602069605363387, 0.02851418988496673, 0.030785706510589688, 0.03092396568141712]),
    'apo_down': (
        {'loss_type': ['apo_down'], 'beta': 0.5},
        1.0158991647590812, -2.7074999999999996, -2.835,
        [-0.001080799797095959, -0.001957623391564623, -0.0010831095750733592,
        -0.0019378441386907093, 0.031172005024111497, 0.031186804081760253, 0.03102530182726183,
        0.028471874661370394]),
    'discopop': (
        {'loss_type': ['discopop'], 'beta': 0.5},
        0.7280872881038175, -2.7074999999999996, -2.835,
        [0.020429990034926862, 0.03259188960337807, -0.03886531956007695, -0.06757876997473128,
        -0.020429990034926862, -0.03259188960337807, 0.03886531956007695, 0.06757876997473128]),
    'discopop_tau': (
        {'loss_type': ['discopop'], 'beta': 0.5, 'tau': 0.3},
        0.8103371968642481, -2.7074999999999996, -2.835,
        [-0.05934028618434212, -0.05956046317763749, -0.05805725305395912, -0.06030971400768963,
        0.05934028618434212, 0.05956046317763749, 0.05805725305395912, 0.06030971400768963]),
    'sigmoid_forward_kl': (
        {'loss_type': ['sigmoid'], 'beta': 0.5, 'f': 'forward_kl'},
        0.7398226833873641, -2.7074999999999996, -2.835,
        [-0.14977684054184215, -0.02241245315497651, -0.16680492160269114, -0.010706717474904518,
        0.12262690545046316, 0.018720454485002456, 0.11872679288753929, 0.03663013806185215]),
    'hinge_js': (
        {'loss_type': ['hinge'], 'beta': 2.0, 'f': 'js_divergence'},
        1.0345025684035136, -2.7074999999999996, -2.835,
        [-0.34284005696912695, -0.13057499695787553, -0.34817746491191703, -0.081232531290348,
        0.3205337031674085, 0.11396822528660813, 0.310053216171545, 0.1994560605758151]),
    'ipo_alpha': (
        {'loss_type': ['ipo'], 'beta': 0.5, 'f': 'alpha_divergence', 'f_alpha': 0.3, 'fp32': True},
        1.3087425231933594, -2.7074999809265137, -2.8350000381469727,
        [-0.33577632904052734, -0.060960762202739716, -0.5678443312644958, -0.03234456107020378,
        0.21893244981765747, 0.13435980677604675, 0.4475763738155365, 0.051007919013500214]),
    'robust_forward_kl': (
        {'loss_type': ['robust'], 'beta': 0.5, 'ls': 0.2, 'f': 'forward_kl'},
        0.7666972943142921, -2.7074999999999996, -2.835,
        [-0.24067151827093392, -0.03713973156992569, -0.26235986911369874, -0.018789219237025014,
        0.1970451733983829, 0.03102171144016972, 0.1867399687190134, 0.06428223181753212]),
    'exo_js': (
        {'loss_type': ['exo_pair'], 'beta': 0.5, 'ls': 0.01, 'f': 'js_divergence'},
        1.6258410194757924, -2.7074999999999996, -2.835,
        [-0.09977402544392289, -0.03767535855620763, -0.10211176366210609, -0.022333544478869347,
        0.09328238403116282, 0.03288373618015722, 0.0909308726812465, 0.05483715365865145]),
    'discopop_alpha': (
        {'loss_type': ['discopop'], 'beta': 0.5, 'f': 'alpha_divergence', 'f_alpha': 1.5, 'fp32':
        True},
        0.6815184354782104, -2.7074999809265137, -2.8350000381469727,
        [0.03821035102009773, -0.05424384027719498, -0.002485070377588272, -0.10001688450574875,
        -0.04222896695137024, 0.05935221165418625, 0.0029455660842359066, 0.05407321825623512]),
    'sigmoid_norm_alpha1': (
        {'loss_type': ['sigmoid_norm'], 'beta': 0.5, 'f': 'alpha_divergence', 'f_alpha': 1.0},
        0.7172308389587427, -2.7074999999999996, -2.835,
        [-0.021432126695710846, -0.013752037538260996, -0.03257732593539213, -0.014293600974989744,
        0.016074095021783134, 0.03438009384565249, 0.03257732593539213, 0.009529067316659829]),
    'mpo': (
        {'loss_type': ['sigmoid', 'bco_pair', 'sft'], 'beta': 0.5, 'weights': [0.8, 0.2, 1.0]},
        1.5951824266271928, -2.7074999999999996, -2.835,
        [-0.1388335576588851, -0.13299835974992155, -0.1407255199282223, -0.11416461050141333,
        0.06319801542460604, 0.06844700253119627, 0.0652161578193172, 0.048868729308226215]),
    'mix': (
        {'loss_type': ['apo_zero', 'nca_pair', 'ipo'], 'beta': 0.5, 'weights': [0.5, 1.0, 0.25]},
        2.243394944018738, -2.7074999999999996, -2.835,
        [-0.11080694206498881, -0.05707438416137366, -0.1385247542927125, -0.02867061815775077,
        0.07689502649446178, 0.142378395072524, 0.11595876261000007, 0.06361921495019521]),
    'ld_sigmoid': (
        {'loss_type': ['sigmoid'], 'beta': 0.5, 'ld': 0.5},
        0.6690189424745614, -2.44625, -2.57375,
        [[-0.05875449352942854, -0.05875449352942854, -0.05875449352942854], [-0.06655678829841485,
        -0.06655678829841485, -0.03327839414920743, -0.03327839414920743, -0.03327839414920743],
        [-0.06779974259679387, -0.06779974259679387], [-0.04911662649103705, -0.04911662649103705,
        -0.04911662649103705, -0.04911662649103705], [0.05875449352942854, 0.05875449352942854,
        0.05875449352942854, 0.02937724676471427], [0.06655678829841485, 0.06655678829841485],
        [0.06779974259679387, 0.06779974259679387], [0.04911662649103705, 0.04911662649103705,
        0.04911662649103705, 0.04911662649103705, 0.024558313245518524, 0.024558313245518524]]),
    'ld_ipo': (
        {'loss_type': ['ipo', 'sft'], 'beta': 0.5, 'ld': 0.0, 'weights': [1.0, 0.3]},
        1.4400923730158728, -2.185, -2.3125,
        [[-0.1705952380952381, -0.1705952380952381, -0.1705952380952381], [-0.16482857142857144,
        -0.16482857142857144, -0.02142857142857143, -0.02142857142857143, -0.02142857142857143],
        [-0.3139285714285714, -0.3139285714285714], [-0.11872023809523807, -0.11872023809523807,
        -0.11872023809523807, -0.11872023809523807], [0.111875, 0.111875, 0.111875, 0.0], [0.3585,
        0.3585], [0.2925, 0.2925], [0.0648611111111111, 0.0648611111111111, 0.0648611111111111,
        0.0648611111111111, 0.0, 0.0]]),
    'wpo_sigmoid': (
        {'loss_type': ['sigmoid'], 'beta': 0.5, 'wpo': True},
        0.29592333261001685, -2.7074999999999996, -2.835,
        [-0.02654700876782269, -0.03302135251979037, -0.023489614761541537, -0.02415396563237523,
        0.02654700876782269, 0.03302135251979037, 0.023489614761541537, 0.02415396563237523]),
}
# fmt: on


def _ember_args(kw: dict) -> dict:
    """dpo_loss's arguments for TRL's (without "sft": the objective's NLL term)."""
    types = kw["loss_type"]
    weights = kw.get("weights") or [1.0] * len(types)
    keep = [i for i, t in enumerate(types) if t != "sft"]
    return {
        "beta": kw.get("beta", 0.1),
        "label_smoothing": kw.get("ls", 0.0),
        "loss_type": tuple(types[i] for i in keep),
        "loss_weights": tuple(weights[i] for i in keep),
        "f_divergence": kw.get("f", "reverse_kl"),
        "f_alpha": kw.get("f_alpha", 0.5),
        "discopop_tau": kw.get("tau", 0.05),
    }


def _sft_weight(kw: dict) -> float:
    weights = kw.get("weights") or [1.0] * len(kw["loss_type"])
    return sum(w for t, w in zip(kw["loss_type"], weights, strict=True) if t == "sft")


PLAIN = [k for k, v in TRL_1_16.items() if v[0].get("ld") is None and not v[0].get("wpo")]


@pytest.mark.parametrize("case", PLAIN)
def test_dpo_loss_types_match_trl_1_16(case):
    """Each loss type (and f-divergence, several with weights, "sft" as the NLL term) on summed
    log-probs: TRL's loss and its gradient w.r.t. every answer's log-prob."""
    kw, loss, _, _, grads = TRL_1_16[case]
    dtype = torch.float32 if kw.get("fp32") else torch.float64
    sums = torch.stack([t.sum() for t in tokens("pol", dtype)]).requires_grad_()
    ref = torch.stack([t.sum() for t in tokens("ref", dtype)])
    counts = torch.tensor(LENGTHS, dtype=dtype)
    out = dpo_loss(
        sums[:4],
        sums[4:],
        ref[:4],
        ref[4:],
        chosen_tokens=counts[:4],
        rejected_tokens=counts[4:],
        **_ember_args(kw),
    )
    got = out.losses.mean() - _sft_weight(kw) * sums[:4].sum() / counts[:4].sum()
    tol = {"rtol": 1e-10, "atol": 1e-12}
    if dtype == torch.float32:
        tol = {"rtol": 2e-6, "atol": 1e-6}
    elif "exo_pair" in kw["loss_type"]:  # TRL takes log(eps), log(1 - eps) of a float32 tensor
        tol = {"rtol": 1e-7, "atol": 1e-9}
    torch.testing.assert_close(got.double(), torch.tensor(loss, dtype=torch.float64), **tol)
    got.backward()
    torch.testing.assert_close(sums.grad.double(), torch.tensor(grads, dtype=torch.float64), **tol)
    torch.testing.assert_close(out.chosen, kw["beta"] * (sums[:4] - ref[:4]).detach())


def test_sft_alone_is_trl_1_16s_nll():
    """TRL 1.16's loss_type ["sft"] alone, read off its numbers above (its loss is linear in
    loss_weights: "mpo" less 0.8 "sigmoid" and 0.2 "bco_pair"), is the chosen answers' mean NLL
    per token, the term the DPO objective adds (checked on a real batch below)."""
    parts = {k: TRL_1_16[k] for k in ("mpo", "sigmoid", "bco_pair")}
    loss = parts["mpo"][1] - 0.8 * parts["sigmoid"][1] - 0.2 * parts["bco_pair"][1]
    grads = [
        m - 0.8 * a - 0.2 * b
        for m, a, b in zip(parts["mpo"][4], parts["sigmoid"][4], parts["bco_pair"][4], strict=True)
    ]
    sums = torch.stack([t.sum() for t in tokens("pol")]).requires_grad_()
    counts = torch.tensor(LENGTHS, dtype=torch.float64)
    nll = -sums[:4].sum() / counts[:4].sum()
    assert float(nll.detach()) == pytest.approx(loss, rel=1e-12)
    nll.backward()
    assert sums.grad.tolist() == pytest.approx(grads, abs=1e-12)


PACKED = [0, 4, 1, 5, 2, 6, 3, 7]  # Ember's batch order: chosen 0, rejected 0, chosen 1, ...


@pytest.mark.parametrize("case", ["ld_sigmoid", "ld_ipo", "wpo_sigmoid"])
def test_ld_dpo_and_wpo_match_trl_1_16(case):
    """LD-DPO's weighted sums (policy and reference) and WPO's pair weights on per-token
    log-probs in Ember's packed order: TRL's loss, its gradient w.r.t. every answer token's
    log-prob, and its logps/* (LD's weighted sums)."""
    kw, loss, chosen_logps, rejected_logps, grads = TRL_1_16[case]
    pol, ref, lss = (torch.cat([tokens(k)[i] for i in PACKED]) for k in ("pol", "ref", "lss"))
    pol.requires_grad_()
    counts = torch.tensor([LENGTHS[i] for i in PACKED])
    doc = torch.repeat_interleave(torch.arange(8), counts)
    w = None if kw.get("ld") is None else ld_token_weights(doc, counts, kw["ld"], torch.float64)
    p = torch.zeros(8, dtype=torch.float64).index_add(0, doc, pol if w is None else pol * w)
    r = torch.zeros(8, dtype=torch.float64).index_add(0, doc, ref if w is None else ref * w)
    pw = wpo_pair_weights(pol, lss, doc, 8) if kw.get("wpo") else None
    n = counts.double()
    out = dpo_loss(
        p[0::2],
        p[1::2],
        r[0::2],
        r[1::2],
        chosen_tokens=n[0::2],
        rejected_tokens=n[1::2],
        pair_weights=pw,
        **_ember_args(kw),
    )
    nll = -torch.zeros(8, dtype=torch.float64).index_add(0, doc, pol)[0::2].sum() / n[0::2].sum()
    got = out.losses.mean() + _sft_weight(kw) * nll  # the NLL of the plain log-probs, as TRL
    torch.testing.assert_close(got, torch.tensor(loss, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    got.backward()
    want = (
        grads
        if kw.get("ld") is not None
        else [[g] * n for g, n in zip(grads, LENGTHS, strict=True)]
    )
    want = torch.tensor([x for i in PACKED for x in want[i]], dtype=torch.float64)
    torch.testing.assert_close(pol.grad, want, rtol=1e-10, atol=1e-12)
    assert float(p[0::2].detach().mean()) == pytest.approx(chosen_logps, rel=1e-12)
    assert float(p[1::2].detach().mean()) == pytest.approx(rejected_logps, rel=1e-12)


def test_ld_weights_count_the_shared_length_fully():
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 5, 2, 2]))
    w = ld_token_weights(doc, torch.tensor([3, 5, 2, 2]), 0.25)
    assert w.tolist() == [1, 1, 1] + [1, 1, 1, 0.25, 0.25] + [1, 1] + [1, 1]
    with pytest.raises(EmberError, match=r"dpo ld_alpha must be in \[0, 1\], got 1\.5"):
        ld_token_weights(doc, torch.tensor([3, 5, 2, 2]), 1.5)


def test_aot_sorts_within_the_batch():
    """AOT pairs the k-th smallest policy margin with the k-th smallest reference margin: the
    pairs' order does not change the loss, and with one pair it is the sigmoid loss."""
    pol, ref = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    perm = torch.randperm(6)
    for t in ("aot", "aot_unpaired"):
        a = dpo_loss(pol[0], pol[1], ref[0], ref[1], 0.3, 0.1, t).losses.sum()
        b = dpo_loss(
            pol[0, perm], pol[1, perm], ref[0, perm], ref[1, perm], 0.3, 0.1, t
        ).losses.sum()
        torch.testing.assert_close(a, b)
        one = dpo_loss(pol[0, :1], pol[1, :1], ref[0, :1], ref[1, :1], 0.3, 0.1, t).losses
        torch.testing.assert_close(
            one,
            dpo_loss(pol[0, :1], pol[1, :1], ref[0, :1], ref[1, :1], 0.3, 0.1, "sigmoid").losses,
        )


@pytest.mark.parametrize(
    "sets,match",
    [
        (['dpo.loss_type="exo_pair"'], r'"exo_pair" needs dpo\.label_smoothing in \(0, 0\.5\)'),
        (
            ['dpo.loss_type="bco_pair"', 'dpo.f_divergence_type="forward_kl"'],
            r"f_divergence_type = 'forward_kl' applies to loss_type .*not 'bco_pair'.*TRL refuses",
        ),
        (['dpo.f_divergence_type="chi2"'], r"dpo\.f_divergence_type must be one of"),
        (
            ['dpo.loss_type=["sigmoid", "sft"]', "dpo.loss_weights=[1.0]"],
            r"dpo\.loss_weights must have one weight per dpo\.loss_type entry: 1 weights for 2",
        ),
        (
            ['dpo.loss_type=["sigmoid", "sft"]', "dpo.loss_weights=[1.0, -0.5]"],
            r"dpo\.loss_weights must be finite and >= 0",
        ),
        (
            ['dpo.loss_type=["sigmoid", "sft"]', "dpo.sft_weight=0.5"],
            r"dpo\.sft_weight and loss_type \"sft\" are the same NLL term",
        ),
        (
            ['dpo.loss_type=["sigmoid", "exo_pair"]', "dpo.label_smoothing=0.01"],
            r"conservative DPO \(TRL 0\.x\), where TRL 1\.x's ignores it",
        ),
        (
            ['dpo.loss_type="nca_pair"', "dpo.label_smoothing=0.1"],
            r"dpo\.label_smoothing applies to loss_type 'sigmoid', .*not 'nca_pair': drop it",
        ),
        (["dpo.loss_type=[]"], r"dpo\.loss_type must name at least one loss type"),
        (['dpo.loss_type="simpo"'], r"dpo\.loss_type must be one of .*'sft' \(or a list"),
        (["dpo.discopop_tau=0"], r"dpo\.discopop_tau must be > 0"),
        (["dpo.ld_alpha=-0.1"], r"dpo\.ld_alpha must be in \[0, 1\]"),
        (
            ['dpo.loss_type="aot"', "dpo.use_weighting=true"],
            r"use_weighting with loss_type \"aot\" / \"aot_unpaired\".*TRL refuses it too",
        ),
        (
            ['dpo.loss_type=["sigmoid", "sft"]', "dpo.use_weighting=true"],
            r"use_weighting with an NLL term .*TRL 1\.16 fails on it",
        ),
        (["dpo.sft_weight=1", "dpo.use_weighting=true"], r"use_weighting with an NLL term"),
    ],
)
def test_bad_dpo_loss_configs(sets, match):
    with pytest.raises(EmberError, match=match):
        load_config(None, ['objective="dpo"', *sets])


def test_mpo_config_splits_the_nll_term():
    c = load_config(
        None,
        [
            'objective="dpo"',
            'dpo.loss_type=["sigmoid", "bco_pair", "sft"]',
            "dpo.loss_weights=[0.8, 0.2, 1]",
        ],
    ).dpo
    assert (c.loss_types, c.pair_weights, c.nll_weight) == (
        ("sigmoid", "bco_pair"),
        (0.8, 0.2),
        1.0,
    )
    one = load_config(None, ['dpo.loss_type=["ipo"]']).dpo
    assert one.loss_type == "ipo" and one.nll_weight == 0.0  # one name stays a string


def test_unused_dpo_knobs_are_reported():
    from ember.engine.config_doc import unused_settings

    cfg = load_config(
        None, ['objective="dpo"', "dpo.f_alpha_divergence_coef=0.3", "dpo.discopop_tau=0.2"]
    )
    assert unused_settings(cfg) == [
        "dpo.f_alpha_divergence_coef ignored: it applies to dpo.f_divergence_type = "
        '"alpha_divergence"',
        'dpo.discopop_tau ignored: it applies to dpo.loss_type "discopop"',
    ]
    cfg = load_config(
        None,
        [
            'objective="dpo"',
            'dpo.f_divergence_type="alpha_divergence"',
            "dpo.f_alpha_divergence_coef=0.3",
            'dpo.loss_type="discopop"',
            "dpo.discopop_tau=0.2",
        ],
    )
    assert unused_settings(cfg) == []


# --- on a real model ----------------------------------------------------------------------------


def _tokens_alone(model, examples):
    """Per document in batch order (chosen 0, rejected 0, chosen 1, ...), from its full logits
    alone (float64): each answer token's log p(label) and log sum_v p_v^2."""
    lps, lss = [], []
    for e in examples:
        start = 0
        for n in e.parts:
            ids = torch.tensor([e.input_ids[start : start + n]])
            labels = torch.tensor(e.labels[start : start + n])
            logp = torch.log_softmax(model(ids)[0].double(), -1)  # (n, V)
            keep = labels != IGNORE
            lps.append(logp[keep].gather(1, labels[keep, None]).squeeze(1))
            lss.append(torch.logsumexp(2 * logp[keep], -1))
            start += n
    return lps, lss


@pytest.mark.parametrize(
    "sets",
    [
        ("dpo.ld_alpha=0.3", "dpo.sft_weight=0.5"),
        ("dpo.use_weighting=true", 'dpo.loss_type="ipo"'),
        ("dpo.ld_alpha=0", "dpo.use_weighting=true", 'dpo.loss_type=["sigmoid", "apo_zero"]'),
        ('dpo.loss_type="sft"',),  # the NLL term alone: no pair loss (TRL 1.16 takes it)
        ('dpo.loss_type=["sft"]', "dpo.loss_weights=[0.5]", "dpo.ld_alpha=0.5"),
    ],
)
def test_ld_dpo_and_wpo_objective_on_a_batch(tiny, tmp_path, sets):
    """The DPO objective with ld_alpha / use_weighting on a real batch (one micro-batch, and
    the same step as two; the reference live, then precomputed) against TRL's definitions on
    each document's full logits alone: LD's weights from the pair's shared answer length,
    WPO's from the policy's per-token log p and log sum p^2, the NLL of the plain log-probs."""
    base, tok = load_pretrained(tiny["model"], "float32")
    rows = [  # answers of different lengths: LD-DPO weighs the longer one's excess
        {
            "prompt": f"say {' '.join(WORDS[i : i + 3])} ->",
            "chosen": " " + " ".join(WORDS[:nc]),
            "rejected": " " + " ".join(WORDS[-nr:]),
        }
        for i, (nc, nr) in enumerate([(1, 4), (3, 1), (2, 2), (5, 2), (1, 3)])
    ]
    examples = load_examples(write_jsonl(tmp_path / "pairs.jsonl", rows), DataConfig(), tok)[0]
    cfg = tiny_config(tiny, tmp_path, 'objective="dpo"', "dpo.beta=0.5", *sets)
    c = cfg.dpo
    model, _ = load_pretrained(tiny["model"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.manual_seed(0)
    away_from_reference(model)  # a policy away from its reference (the base model)
    obj = make_objective(cfg, DistInfo())
    obj.check_model(model, None)
    with torch.no_grad():
        pol, lss = _tokens_alone(model, examples)
        ref, _ = _tokens_alone(base, examples)
    counts = torch.tensor([len(x) for x in pol])
    assert (counts[0::2] != counts[1::2]).sum() >= 3
    n = counts.double()
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)
    alpha = 1.0 if c.ld_alpha is None else c.ld_alpha

    def ld(rows):  # LD-DPO's sums, written out
        return torch.stack(
            [x[:m].sum() + alpha * x[m:].sum() for x, m in zip(rows, shared, strict=True)]
        )

    ps, rs = ld(pol), ld(ref)
    pw = None
    if c.use_weighting:
        w = torch.stack([torch.exp((x - q).mean()) for x, q in zip(pol, lss, strict=True)])
        pw = w[0::2] * w[1::2]
    pairs = 0.0  # loss_type "sft" alone: TRL's loss is its sft term only
    if c.loss_types:
        pairs = dpo_loss(
            ps[0::2],
            ps[1::2],
            rs[0::2],
            rs[1::2],
            c.beta,
            c.label_smoothing,
            c.loss_types,
            n[0::2],
            n[1::2],
            loss_weights=c.pair_weights,
            pair_weights=pw,
        ).losses.mean()
    nll = -torch.stack([x.sum() for x in pol[0::2]]).sum() / n[0::2].sum()
    want = pairs + c.nll_weight * nll
    for pre in (False, True):
        if pre:  # the reference's values precomputed onto the examples (LD's weighted sums)
            for e in examples:
                e.ref_logps = None
            preference_objectives.attach_ref_logps(
                examples,
                lambda b: obj.ref_logprobs(model, b),
                model,
                128,
                "cpu",
                nullcontext,
                DistInfo(),
            )
            assert [x for e in examples for x in e.ref_logps] == pytest.approx(
                rs.tolist(), abs=2e-5
            )
        for micro in ([collate(examples)], [collate(examples[:3]), collate(examples[3:])]):
            assert (micro[0].ref_sums is not None) == pre
            obj.begin_step(micro, lambda xs: xs)
            total = sum(obj.loss(model, b, 5) for b in micro)
            torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-5)
            got = obj.step_metrics(lambda xs: xs)
            assert got["chosen_logps"] == pytest.approx(float(ps[0::2].mean()), rel=1e-5)
            assert got["nll_loss"] == pytest.approx(float(nll), rel=1e-5)
            margin = c.beta * ((ps[0::2] - rs[0::2]) - (ps[1::2] - rs[1::2]))
            assert got["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-4)
