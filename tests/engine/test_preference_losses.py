"""Preference losses against straightforward float64 implementations of TRL's definitions
(DPOTrainer's loss types and rpo_alpha, ORPOTrainer, CPOTrainer's loss types): the pure losses on
random log-probabilities, the per-document log-probabilities of a packed batch against each
document's full logits alone, every objective's loss and metrics on a real batch against TRL's
padded computation from full logits (one micro-batch or two), ORPO's log(1 - exp) near 0, and
bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.config import load_config
from ember.engine.data import IGNORE, DataConfig, collate, load_examples
from ember.engine.distributed import DistInfo
from ember.engine.losses import doc_logprobs
from ember.engine.objectives import make_objective
from ember.engine.preference_losses import cpo_loss, dpo_loss, log1mexp, orpo_loss, simpo_loss
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora
from tests.engine._tiny import away_from_reference, tiny_config

# --- TRL's definitions, written out plainly (float64) --------------------------------------------

def _logsig(x):
    return -torch.log1p(torch.exp(-x))


def trl_dpo(pc, pr, rc, rr, beta, ls, loss_type, nc=None, nr=None):
    """TRL 1.16 ``DPOTrainer._compute_loss`` (reverse KL) on summed log-probs; ``nc``, ``nr``:
    the answers' token counts (IPO divides the log-ratios by them). TRL 1.16's label smoothing
    enters "robust" (and "aot"); for "sigmoid" with ``ls`` > 0 this is TRL 0.x's conservative DPO
    (1.16's "aot" term on the unsorted margin), which Ember keeps. The rewards are of the sums
    for every loss type."""
    chosen_scores, rejected_scores = pc - rc, pr - rr
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        losses = -_logsig(beta * delta) * (1 - ls) - _logsig(-beta * delta) * ls
    elif loss_type == "robust":
        clean = -(1 - ls) * _logsig(beta * delta)
        flipped = -ls * _logsig(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        ipo_delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_scores, beta * rejected_scores


def trl_orpo(ac, ar, beta):
    log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    return -beta * _logsig(log_odds), beta * ac, beta * ar, log_odds


def trl_simpo(ac, ar, beta, gamma, ls, alpha=0.0):
    if alpha:  # AlphaPO's rewards (TRL's CPOConfig alpha)
        ac, ar = (1 - torch.exp(ac) ** -alpha) / alpha, (1 - torch.exp(ar) ** -alpha) / alpha
    logits = (ac - ar) - gamma / beta
    losses = -_logsig(beta * logits) * (1 - ls) - _logsig(-beta * logits) * ls
    return losses, beta * ac, beta * ar


def _random_pairs(pairs=9, seed=0):
    """TRL's layout: (2P, L) per-token log-probs and mask (chosen rows first), and per row the
    summed log-probability, the per-token mean and the token count."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 20, (2 * pairs,), generator=g)
    mask = torch.arange(20)[None] < n[:, None]
    lp = -torch.rand(2 * pairs, 20, generator=g, dtype=torch.float64) * 2 * mask
    sums = lp.sum(-1)
    return sums, sums / mask.sum(-1), mask.sum(-1).double()


def _split(x, pairs):
    return x[:pairs], x[pairs:]


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1),
                                          ("robust", 0.4),
                                          ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_types_match_trl(loss_type, ls):
    """Loss, rewards and the gradient w.r.t. the policy's summed log-probs, against TRL 1.16's
    formulas in float64. IPO's rewards are of the summed log-probs (TRL logs beta * the summed
    log-ratio for every loss type; they were per-token means)."""
    sums, _, counts = _random_pairs()
    ref_sums, _, _ = _random_pairs(seed=1)
    (rc, rr), (nc, nr) = _split(ref_sums, 9), _split(counts, 9)
    want_pol = sums.clone().requires_grad_()
    want = trl_dpo(want_pol[:9], want_pol[9:], rc, rr, 0.3, ls, loss_type, nc, nr)
    want[0].mean().backward()
    pol = sums.clone().requires_grad_()
    got = dpo_loss(pol[:9], pol[9:], rc, rr, 0.3, ls, loss_type, chosen_tokens=nc,
                   rejected_tokens=nr)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    got.losses.mean().backward()
    torch.testing.assert_close(pol.grad, want_pol.grad, rtol=1e-10, atol=1e-12)
    assert pol.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_label_smoothing_on_hinge_or_ipo_is_refused(loss_type):
    """Label smoothing means something for "sigmoid" (conservative DPO), "robust", "exo_pair" and
    the AOTs only: it is refused elsewhere, in the config and in the pure loss, rather than
    ignored."""
    with pytest.raises(EmberError, match=rf"dpo\.label_smoothing applies to loss_type "
                                         rf"'sigmoid', 'robust', .*not '{loss_type}'"):
        load_config(None, [f'dpo.loss_type="{loss_type}"', "dpo.label_smoothing=0.1"])
    x = torch.zeros(3)
    with pytest.raises(EmberError, match="label_smoothing applies to loss_type 'sigmoid', "):
        dpo_loss(x, x, x, x, 0.1, 0.1, loss_type, chosen_tokens=x + 1, rejected_tokens=x + 1)


@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_simpo_and_orpo_match_trl(ls):
    """Losses, rewards and gradients w.r.t. the per-token mean log-probs, float64."""
    _, means, _ = _random_pairs(seed=2)
    for ours, trl in ((lambda a: simpo_loss(a[:9], a[9:], beta=2.5, gamma=1.2,
                                            label_smoothing=ls),
                       lambda a: trl_simpo(a[:9], a[9:], 2.5, 1.2, ls)),
                      (lambda a: orpo_loss(a[:9], a[9:], beta=0.25),
                       lambda a: trl_orpo(a[:9], a[9:], 0.25)[:3])):
        a, b = means.clone().requires_grad_(), means.clone().requires_grad_()
        got, want = ours(a), trl(b)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y.detach(), rtol=1e-10, atol=1e-12)
        got.losses.mean().backward()
        want[0].mean().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


# TRL 1.16.0 CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py, loss_type="simpo") run on
# ALPHAPO_A (per-token mean log-probs, float64); each: (beta, simpo_gamma, label_smoothing, alpha),
# the per-pair losses, the rewards, and the gradients of losses.mean() w.r.t. a_c and a_r
# fmt: off
ALPHAPO_A = ([-0.42, -1.35, -0.08, -2.2], [-0.9, -0.61, -1.7, -2.05])
ALPHAPO_TRL = [
    ((2.5, 1.2, 0.0, 0.0), [0.6931471805599453, 3.0962716853586625, 0.05623317787848317,
    1.7631441994952815], [-1.05, -3.375, -0.2, -5.5], [-2.25, -1.525, -4.25, -5.125],
    [-0.31249999999999994, -0.5967390790729453, -0.03417582325996299, -0.5178095187653745],
    [0.31249999999999994, 0.5967390790729453, 0.03417582325996299, 0.5178095187653745]),
    ((2.5, 1.2, 0.0, 0.25), [0.5909138627744164, 3.594821285332176, 0.02016133933682268,
    1.985617309415125], [-1.1071061035570517, -4.014396083919731, -0.20201340026755776,
    -7.332530178673952], [-2.523227161918644, -1.647424620946143, -5.295904196633787,
    -6.6945963130764286], [-0.3097348870749281, -0.8518426505989414, -0.012726666468179758,
    -0.9345528745929467], [0.3492251100012748, 0.7079700760807296, 0.019081122853130534,
    0.9001561118728735]),
    ((2.0, 0.5, 0.1, -0.3), [0.5882021321071675, 1.6277645435924992, 0.3268283135705797,
    1.009852314993751], [-0.7892343547772263, -2.2201545942768375, -0.15809526828060472,
    -3.2209911033886724], [-1.5774700377543125, -1.114878961752727, -2.6633628079182268,
    -3.062394031271223], [-0.14477696336584964, -0.24436510861970995, -0.009104338992167012,
    -0.14444577845557877], [0.12536059877970557, 0.30510728037126655, 0.005599913281697117,
    0.15109430851073768]),
]
# fmt: on


@pytest.mark.parametrize("case", range(len(ALPHAPO_TRL)))
def test_simpo_alphapo_matches_trl_1_16(case):
    """SimPO with TRL's CPOConfig ``alpha`` (AlphaPO's reward (1 - p^-alpha) / alpha, p the
    per-token mean probability; 0: SimPO): losses, rewards and gradients, TRL's numbers."""
    (beta, gamma, ls, alpha), losses, chosen, rejected, grad_c, grad_r = ALPHAPO_TRL[case]
    c, r = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in ALPHAPO_A)
    out = simpo_loss(c, r, beta, gamma, ls, alpha)
    for got, want in zip(out, (losses, chosen, rejected), strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10,
                                   atol=1e-12)
    out.losses.mean().backward()
    for got, want in ((c.grad, grad_c), (r.grad, grad_r)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10,
                                   atol=1e-12)


def test_log1mexp_is_accurate_and_finite_near_zero():
    x = -torch.logspace(-6, 1.9, 400).double()  # -1e-6 .. -80, fp32 values
    want = torch.log(-torch.expm1(x))  # (TRL's log1p(-exp(x)) in fp32 is off by 5% at -1e-6)
    torch.testing.assert_close(log1mexp(x.float()).double(), want, rtol=2e-6, atol=1e-12)
    # A log-probability of (almost) 0 (a chosen answer already certain): finite loss and grads.
    a = torch.tensor([0.0, -1e-9, -1e-5, -3.0], requires_grad=True)
    r = torch.tensor([-0.5, -1e-7, -1e-6, 0.0], requires_grad=True)
    out = orpo_loss(a, r, beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(a.grad).all() and torch.isfinite(r.grad).all()
    # Where float64 TRL is accurate, the same value.
    torch.testing.assert_close(out.losses[2:3].double(),
                               trl_orpo(a[2:3].double().detach(), r[2:3].double().detach(),
                                        0.1)[0], rtol=1e-4, atol=0)


# --- on a real model ----------------------------------------------------------------------------

def _alone(model, examples):
    """Per document, each scored alone with full logits: (sum of log p(label), answer tokens),
    chosen documents first, then rejected (TRL's concatenated order)."""
    rows = {0: [], 1: []}
    for e in examples:
        start = 0
        for k, n in enumerate(e.parts):
            ids = torch.tensor([e.input_ids[start:start + n]])
            labels = torch.tensor(e.labels[start:start + n])
            logp = torch.log_softmax(model(ids)[0].double(), -1)  # (n, V)
            keep = labels != IGNORE
            rows[k].append((logp[keep].gather(1, labels[keep, None]).sum(), int(keep.sum())))
            start += n
    sums = torch.stack([s for k in (0, 1) for s, _ in rows[k]])
    counts = torch.tensor([c for k in (0, 1) for _, c in rows[k]], dtype=torch.float64)
    return sums, counts


@pytest.fixture(scope="module")
def pref_batch(tiny, prefs):
    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(prefs, DataConfig(), tok)
    return model, examples[:5]


def test_doc_logprobs_equal_each_document_alone(pref_batch):
    model, examples = pref_batch
    assert len({n for e in examples for n in e.parts}) > 2  # documents of different lengths
    with torch.no_grad():
        lp = doc_logprobs(model, collate(examples))
        sums, counts = _alone(model, examples)
    order = torch.tensor([j for i in range(5) for j in (i, i + 5)])  # packed: c0 r0 c1 r1 ...
    torch.testing.assert_close(lp.counts.double(), counts[order])
    torch.testing.assert_close(lp.sums.double(), sums[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.means.double(), (sums / counts)[order], rtol=1e-5, atol=1e-5)


CASES = {
    "dpo_sigmoid_rpo": ('objective="dpo"', "dpo.beta=0.5", "dpo.label_smoothing=0.1",
                        "dpo.sft_weight=0.7"),
    "dpo_robust": ('objective="dpo"', 'dpo.loss_type="robust"', "dpo.label_smoothing=0.2"),
    "dpo_hinge": ('objective="dpo"', 'dpo.loss_type="hinge"', "dpo.beta=2.0"),
    "dpo_ipo": ('objective="dpo"', 'dpo.loss_type="ipo"', "dpo.beta=0.5"),
    # TRL 1.16's other loss types (their pure losses against TRL's numbers:
    # test_dpo_loss_types.py), here the objective's wiring: weights, "sft", f-divergence, tau
    "dpo_mpo": ('objective="dpo"', 'dpo.loss_type=["sigmoid", "bco_pair", "sft"]',
                "dpo.loss_weights=[0.8, 0.2, 0.5]"),
    "dpo_ipo_discopop_js": ('objective="dpo"', 'dpo.loss_type=["ipo", "discopop"]',
                            "dpo.loss_weights=[0.3, 1.0]", "dpo.discopop_tau=0.2",
                            'dpo.f_divergence_type="js_divergence"', "dpo.beta=0.5"),
    "orpo": ('objective="orpo"', "orpo.beta=0.3"),
    "simpo": ('objective="simpo"', "simpo.beta=2.5", "simpo.gamma=0.4",
              "simpo.label_smoothing=0.1", "simpo.sft_weight=0.6"),
    "simpo_alphapo": ('objective="simpo"', "simpo.beta=2.5", "simpo.gamma=0.4", "simpo.alpha=0.25"),
    # TRL's CPOTrainer: summed log-probs for sigmoid / hinge, per-token means for ipo / simpo
    "cpo": ('objective="cpo"', "cpo.beta=0.2", "cpo.label_smoothing=0.1", "cpo.cpo_alpha=0.7"),
    "cpo_hinge_alphapo": ('objective="cpo"', 'cpo.loss_type="hinge"', "cpo.beta=0.05",
                          "cpo.alpha=0.02"),
    "cpo_ipo": ('objective="cpo"', 'cpo.loss_type="ipo"', "cpo.beta=0.5"),
    "cpo_simpo": ('objective="cpo"', 'cpo.loss_type="simpo"', "cpo.beta=2.5",
                  "cpo.simpo_gamma=0.4"),
}


def trl_orpo_nll(model, examples):
    """TRL 1.16 ``ORPOTrainer.concatenated_forward``'s ``chosen_nll_loss``
    (trl/experimental/orpo/orpo_trainer.py: "orpo chosen nll loss is computed over the full
    prompt and response"): labels are the chosen rows' input_ids (padding -100), shifted, one
    token-mean cross-entropy over the rows of the batch."""
    rows = [e.input_ids[:e.parts[0]] for e in examples]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    # each row alone (right padding: the real tokens never see it), zero logits after it
    logits = torch.stack([F.pad(model(torch.tensor([r]))[0], (0, 0, 0, T - len(r)))
                          for r in rows]).double()
    labels = torch.where(mask == 1, ids, -100)
    logits, labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    return torch.nn.CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), labels.view(-1))


def _trl_step(cfg, policy, reference, examples):
    """TRL's loss and metrics of one batch of these pairs, from each document's full logits."""
    P = len(examples)
    sums, counts = _alone(policy, examples)
    means = sums / counts
    nll = -sums[:P].sum() / counts[:P].sum()  # cross-entropy over the chosen answers' tokens
    if cfg.objective == "orpo":  # TRL's ORPO: over the chosen prompt and answer
        nll = trl_orpo_nll(policy, examples)
    if cfg.objective == "dpo":
        c = cfg.dpo
        ref_sums, _ = _alone(reference, examples)
        if c.loss_type in ("sigmoid", "robust", "hinge", "ipo"):
            losses, ch, rj = trl_dpo(sums[:P], sums[P:], ref_sums[:P], ref_sums[P:], c.beta,
                                     c.label_smoothing, c.loss_type, counts[:P], counts[P:])
        else:  # the pure loss, pinned to TRL 1.16's numbers in test_dpo_loss_types.py
            losses, ch, rj = dpo_loss(
                sums[:P], sums[P:], ref_sums[:P], ref_sums[P:], c.beta, c.label_smoothing,
                c.loss_types, counts[:P], counts[P:], loss_weights=c.pair_weights,
                f_divergence=c.f_divergence_type, discopop_tau=c.discopop_tau)
        weight = c.nll_weight
    elif cfg.objective == "orpo":
        losses, ch, rj, _ = trl_orpo(means[:P], means[P:], cfg.orpo.beta)
        weight = 1.0
    elif cfg.objective == "cpo":  # the pure loss, pinned to TRL 1.16's numbers in test_cpo.py
        c = cfg.cpo
        x = means if c.loss_type in ("ipo", "simpo") else sums  # TRL's average_log_prob
        losses, ch, rj = cpo_loss(x[:P], x[P:], c.beta, c.loss_type, c.label_smoothing,
                                  c.simpo_gamma, c.alpha)
        weight = c.cpo_alpha
    else:
        c = cfg.simpo
        losses, ch, rj = trl_simpo(means[:P], means[P:], c.beta, c.gamma, c.label_smoothing,
                                   c.alpha)
        weight = c.sft_weight
    # TRL's logps/*: what its loss takes (DPO sums; ORPO, SimPO average; CPO by loss type)
    logps = sums if cfg.objective == "dpo" else x if cfg.objective == "cpo" else means
    return losses.mean() + weight * nll, {
        "chosen_logps": float(logps[:P].mean()), "rejected_logps": float(logps[P:].mean()),
        "reward_accuracy": float((ch > rj).double().mean()),
        "reward_margin": float((ch - rj).mean()), "chosen_reward": float(ch.mean()),
        "rejected_reward": float(rj.mean()), "nll_loss": float(nll)}


@pytest.mark.parametrize("case", CASES)
def test_objective_matches_trl_on_a_batch(tiny, pref_batch, tmp_path, case):
    base, examples = pref_batch
    cfg = tiny_config(tiny, tmp_path, *CASES[case])
    obj = make_objective(cfg, DistInfo())
    model, _ = load_pretrained(tiny["model"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.manual_seed(0)
    away_from_reference(model)
    obj.check_model(model, None)
    with torch.no_grad():
        want, metrics = _trl_step(cfg, model, base, examples)
    # One micro-batch of the 5 pairs, then the same step as two micro-batches (3 + 2 pairs).
    for micro in ([collate(examples)], [collate(examples[:3]), collate(examples[3:])]):
        obj.begin_step(micro, lambda xs: xs)
        total = sum(obj.loss(model, b, 5) for b in micro)
        torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-5)
        got = obj.step_metrics(lambda xs: xs)
        for k, v in metrics.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, got[k], v)
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_orpo_nll_covers_the_chosen_prompt_as_trl(tiny, pref_batch, tmp_path):
    """ORPO's NLL term is TRL 1.16's ``chosen_nll_loss``: the token-mean cross-entropy of the
    chosen documents whole, prompt tokens included (was: the chosen answers' tokens only, as CPO
    takes them), in the loss, its gradient and the ``nll_loss`` metric, for a step split into
    micro-batches too."""
    base, examples = pref_batch
    assert all(e.labels[1] == IGNORE for e in examples)  # prompts of several tokens
    cfg = tiny_config(tiny, tmp_path, 'objective="orpo"', "orpo.beta=0.3")
    obj = make_objective(cfg, DistInfo())
    model, _ = load_pretrained(tiny["model"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.manual_seed(1)
    away_from_reference(model)
    obj.check_model(model, None)
    B = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    sums, counts = _alone(model, examples)  # TRL's loss = nll - mean(beta * log s(log odds))
    P, means = len(examples), sums / counts
    nll = trl_orpo_nll(model, examples)
    want = trl_orpo(means[:P], means[P:], 0.3)[0].mean() + nll
    want_grads = torch.autograd.grad(want, B)
    micro = [collate(examples[:2]), collate(examples[2:])]
    obj.begin_step(micro, lambda xs: xs)
    got = sum(obj.loss(model, b, P) for b in micro)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    metrics = obj.step_metrics(lambda xs: xs)
    assert metrics["nll_loss"] == pytest.approx(float(nll.detach()), rel=1e-5)
    for g, w in zip(torch.autograd.grad(got, B), want_grads, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sets,match", [
    (['dpo.loss_type="robust"'], r"dpo\.loss_type = \"robust\" needs dpo\.label_smoothing"),
    (['dpo.loss_type="kto"'], r"dpo\.loss_type must be one of .*'ipo', .*got 'kto'"),
    (["dpo.beta=-0.1"], r"dpo\.beta must be > 0"),
    (["dpo.sft_weight=-1"], r"dpo\.sft_weight must be >= 0"),
    (["orpo.beta=0"], r"orpo\.beta must be > 0"),
    (["simpo.beta=-2"], r"simpo\.beta must be > 0"),
    (["simpo.gamma=-0.5"], r"simpo\.gamma must be >= 0"),
    (["simpo.label_smoothing=0.5"], r"simpo\.label_smoothing must be in \[0, 0\.5\)"),
    (["orpo.lambda_=0.1"], r"unknown config key 'orpo\.lambda_'; valid keys in \[orpo\]: beta"),
    (["simpo.gamma_beta_ratio=0.5"], r"unknown config key 'simpo\.gamma_beta_ratio'"),
    (['objective="ppo"'], r"objective must be one of .*'simpo', 'cpo', 'kto', got 'ppo'"),
])
def test_bad_preference_configs(sets, match):
    with pytest.raises(EmberError, match=match):
        load_config(None, sets)


def test_reference_free_objectives_allow_prompt_tuning():
    for objective in ("orpo", "simpo", "cpo"):
        assert load_config(None, [f'objective="{objective}"', 'method="prompt"']).method == "prompt"
    assert math.isclose(load_config(None, ['objective="simpo"']).simpo.beta, 2.0)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "cpo"])
def test_pair_objectives_refuse_loss_on_all(tiny, prefs, tmp_path, objective):
    """TRL's preference trainers score the completion only. data.loss_on = "all" used to put the
    prompt's tokens into every document's log-probability (a silently different IPO / ORPO /
    SimPO mean, NLL term and rewards); it is refused, as KTO refuses it."""
    _, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(prefs, DataConfig(loss_on="all"), tok)
    e = examples[0]
    assert e.labels[0] != IGNORE  # the prompt's tokens would carry labels
    cfg = tiny_config(tiny, tmp_path, f'objective="{objective}"', 'data.loss_on="all"')
    with pytest.raises(EmberError, match=rf'objective = "{objective}" scores the answers only.*'
                                         r'data\.loss_on = "completion"'):
        make_objective(cfg, DistInfo())
