"""WPO's alignment term (``answer_token_logprobs(..., log_sum_sq=True)``, TRL's ``use_weighting``
``log_sum_sq_probs``) comes from the same head output as the log-probs: TRL's fused head computes
both from one logits tile. With a LoRA on the head and its dropout on, a second head pass would
draw another dropout mask (was: ``model.logits`` ran again on the answer hidden states)."""

from __future__ import annotations

import pytest
import torch

from ember.engine.data import collate
from ember.engine.losses import _hidden, answer_positions, answer_token_logprobs
from ember.models import LoRAConfig, Transformer, apply_lora
from tests.engine._tiny import CFG, make_examples


def _oracle(model, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's per-token log p(label) and log sum_v p_v^2 (``chunked_logprob``: ``log(sum exp(2z))
    - 2 log(sum exp(z))``) of one head output, float64, the head's dropout drawn after
    ``manual_seed(seed)`` as in the call under test."""
    torch.manual_seed(seed)
    idx = answer_positions(batch.labels)
    h = _hidden(model, batch).index_select(0, idx)
    x, w = model.head_operands(h)  # the one dropout draw of the head's LoRA
    z = x.double() @ w.double().T  # (N, V)
    labels = batch.labels.reshape(-1).index_select(0, idx)
    logp = torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    lss = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return logp, lss


@pytest.mark.parametrize("chunk", [3, 256])
def test_wpo_alignment_term_uses_the_log_probs_head_output(chunk):
    """Head LoRA with dropout 0.5, training mode: the alignment term and the log-probs of one
    call equal TRL's definitions on one head output (one dropout mask), in chunks of 3 tokens
    (a non-divisor) and in one."""
    torch.manual_seed(0)
    model = Transformer(CFG).init_weights(seed=0)
    apply_lora(
        model, LoRAConfig(rank=4, alpha=8, dropout=0.5, targets=("lm_head",), init="gaussian")
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)  # the adapter moves the logits: its dropout shows
    model.train()
    batch = collate(make_examples(4, seed=3))
    want_lp, want_lss = _oracle(model, batch, seed=11)
    torch.manual_seed(11)
    tok = answer_token_logprobs(model, batch, log_sum_sq=True, chunk=chunk)
    torch.testing.assert_close(tok.logps.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.log_sum_sq.double(), want_lss, rtol=1e-5, atol=1e-5)
    assert tok.log_sum_sq.requires_grad is False
    tok.logps.sum().backward()  # the log-probs stay differentiable
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)
