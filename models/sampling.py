"""transformers' logits warpers and repetition penalty as ``generate_ids`` applies them:
``warp_logits`` (temperature, top-h, top-k, top-p, min-p, typical, epsilon, eta, in
transformers' ``_get_logits_processor`` order, each computed as transformers computes it so
ties at a cut keep the same tokens), ``penalize_repetition`` and ``sample_next`` (one token
per row)."""

from __future__ import annotations

import torch


def warp_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    *,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
    top_h: float = 0.0,
) -> torch.Tensor:
    """Logits (B, V) divided by ``temperature`` (> 0), with the tokens outside the top-h set,
    the top-k, the top-p nucleus, the min-p cut, the ``typical_p`` mass of locally typical
    tokens and the epsilon / eta cuts set to -inf, in that order: transformers' Temperature,
    TopH, TopK, TopP, MinP, Typical, Epsilon and Eta logits warpers, computed as they compute
    them (so ties at a cut keep the same tokens). ``top_h`` in (0, 1] (0: off, transformers'
    None): of the 100 most likely tokens, the most likely ones whose entropy terms -p log p
    (p renormalized over those 100) sum to <= ``top_h`` times those 100's entropy; the best
    always stays."""
    logits = logits.float() / temperature
    if top_h > 0:
        # TopHLogitsWarper's own computation (its 100-token cap, torch's Categorical): a token
        # of p = 0 in the 100 (-inf, or underflowed) makes the sum NaN, dropping it and the rest
        top, idx = torch.topk(logits, min(100, logits.shape[-1]), dim=-1, sorted=True)
        dist = torch.distributions.Categorical(logits=top)
        probs = dist.probs
        keep = torch.cumsum(-probs * torch.log(probs), dim=-1) <= (dist.entropy() * top_h)[:, None]
        keep[:, 0] = True
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep)
        logits = logits.masked_fill(~kept, float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # transformers' computation, so that ties at the cut keep the same tokens: from the
        # least likely up, drop tokens while their mass is <= 1 - top_p; the best always stays
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        drop = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0:  # drop tokens less likely than min_p times the best one (which always stays)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if typical_p < 1.0:  # keep the tokens whose surprise is closest to the entropy
        normalized = torch.nn.functional.log_softmax(logits, dim=-1)
        ent = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
        shifted, order = torch.sort(torch.abs((-normalized) - ent), descending=False)
        mass = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (mass < typical_p).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
        drop = shifted > shifted.gather(1, last.view(-1, 1))
        drop[..., :1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    for eta, cut in ((False, epsilon_cutoff), (True, eta_cutoff)):
        if not 0 < cut < 1:
            continue
        probs = logits.softmax(dim=-1)
        if eta:  # eta = min(epsilon, sqrt(epsilon) * exp(-entropy))
            eps = torch.tensor(cut, device=logits.device)
            entropy = torch.distributions.Categorical(logits=logits).entropy()
            cut = torch.min(eps, torch.sqrt(eps) * torch.exp(-entropy))[..., None]
        best = torch.topk(logits, 1)[0][..., -1, None]  # the best token always stays
        logits = logits.masked_fill((probs < cut) & (logits < best), float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits (B, V) of the tokens marked in ``seen``
    (B, V) divided by ``penalty`` where positive, multiplied where negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
    *,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
    top_h: float = 0.0,
    renormalize_logits: bool = False,
) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted by the warpers (``warp_logits``).
    ``renormalize_logits``: log-softmax last, as transformers' LogitNormalization (it can only
    move ties and last bits)."""
    if temperature == 0:
        return (logits.log_softmax(dim=-1) if renormalize_logits else logits).argmax(dim=-1)
    logits = warp_logits(
        logits,
        temperature,
        top_p,
        top_k,
        min_p,
        typical_p=typical_p,
        epsilon_cutoff=epsilon_cutoff,
        eta_cutoff=eta_cutoff,
        top_h=top_h,
    )
    if renormalize_logits:
        logits = logits.log_softmax(dim=-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
