"""LoRA on the token embedding and on the output head, as PEFT computes them.

Embedding (PEFT's ``lora.Embedding``): ``out = E[x] + scale * A^T[x] B^T`` with
``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (D, r); PEFT's init is A zero, B standard
normal, and PEFT never applies its dropout to an embedding. The lookup of A keeps the base's
``padding_idx`` (transformers': ``pad_token_id``), so the pad token's column of A trains only
through a tied head, as in PEFT. A model's embedding scale (Gemma's
sqrt(D)) multiplies the sum, as PEFT scales the adapter output by the embedding's scale.
DoRA (PEFT's ``DoraEmbeddingLayer``): a magnitude ``m`` per hidden dim, ``out = g * (E[x] +
scale * A^T[x] B^T)`` with ``g = m / ||E + scale * (B A)^T||`` (norms over the vocabulary, a
constant for autograd); merged, ``E' = g * (E + scale * (B A)^T)``. Not on a tied head.

Head (PEFT's ``lora.Linear`` on ``lm_head``): ``logits = h W^T + scale * (dropout(h) A^T) B^T``,
A (r, D), B (V, r). Ember's head is not a module call: the fused cross-entropy takes ``(h, W)``.
``head_operands`` gives it one exact matmul on concatenated operands,
``[h, scale * dropout(h) A^T] (N, D + r)`` times ``[W, B]^T``: PEFT's sum without ever forming
``W + scale * B A`` (which in bf16 would round small updates away), dropout exact, and the only
(V, D)-sized temporary is the concatenated weight that autograd keeps for backward as it keeps W.
Gradients reach A through the small (N, r) product and B through the fused op's weight gradient.
Cost: that weight gradient is the whole (V, D + r) one, of which only B's r columns are kept, so
the head's backward costs what training the full head costs (the W + scale * B A route costs the
same: dB = dW' A^T needs the (V, D) dW'); a kernel option for a column range of dW would save it.

Tied models (one matrix for embedding and head). ``ties_head=True`` is PEFT's
``ensure_weight_tying``: one adapter on the embedding, and the head multiplies by the adapted
embedding, i.e. a head LoRA with ``A_head = B_emb^T``, ``B_head = A_emb^T`` (PEFT's
``tied_adapter``); dropout applies to h on that branch. ``ties_head=False`` is PEFT without
``ensure_weight_tying``, embedding targeted alone: the head keeps the base embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.models.lora_init import lora_scale


class LoRAEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, *, use_rslora: bool = False,
                 dropout: float = 0.0, ties_head: bool = False, padding_idx: int | None = None,
                 use_dora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        V, D = base.weight.shape
        # transformers builds embed_tokens with padding_idx = pad_token_id, and PEFT's lookup of
        # A passes it on: the pad token's column of A gets no gradient from the embedding
        self.padding_idx = padding_idx if (isinstance(padding_idx, int)
                                           and not isinstance(padding_idx, bool)
                                           and 0 <= padding_idx < V) else None
        device = base.weight.device
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(rank, self.alpha, use_rslora)
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, V, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(D, rank, device=device, dtype=dtype))
        # used only on the tied head's branch (PEFT's Embedding has no dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.ties_head = ties_head
        self.use_dora = use_dora
        self.lora_magnitude = None
        if use_dora:  # one per hidden dim (PEFT's DoraEmbeddingLayer); reset_lora sets it
            self.lora_magnitude = nn.Parameter(torch.empty(D, device=device, dtype=dtype))
        self.reset_lora()

    @property
    def weight(self) -> torch.Tensor:
        """The base (V, D) embeddings (the frozen matrix; ``merged_weight`` has the update)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def reset_lora(self, init: str | None = None) -> None:
        """PEFT's embedding init (A zero, B normal): the wrapped model computes the base's."""
        with torch.no_grad():
            self.lora_embedding_A.zero_()
            nn.init.normal_(self.lora_embedding_B)
            if self.lora_magnitude is not None:
                self.lora_magnitude.copy_(self.weight_norm())

    def adapter_params(self) -> dict[str, nn.Parameter]:
        names = ("lora_embedding_A", "lora_embedding_B") + ("lora_magnitude",) * self.use_dora
        return {k: getattr(self, k) for k in names}

    def weight_norm(self) -> torch.Tensor:
        """DoRA's norm: ``||E + scale * (B A)^T||`` per hidden dim, over the vocabulary (D,), fp32,
        outside autograd (PEFT's DoraEmbeddingLayer, fan_in_fan_out). Expanded, so that no
        (V, D) matrix is formed (PEFT forms two per forward; 2.6x the time on 32000 x 1024):
        ``||E_d||^2 + 2 s B_d (A E)_d + s^2 B_d (A A^T) B_d^T``, E read in row blocks. Within
        ~1e-5 (relative) of PEFT's fp32 norm, which is its own error over V terms: this one is
        several times nearer the fp64 norm (tests/models/test_dora.py)."""
        with torch.no_grad():
            w = self.base.weight
            A, B = self.lora_embedding_A.detach().float(), self.lora_embedding_B.detach().float()
            sq = torch.zeros(w.shape[1], device=w.device)  # (D,)
            ae = torch.zeros(A.shape[0], w.shape[1], device=w.device)  # (r, D)
            rows = max(1, 2**22 // w.shape[1])  # 16 MB of fp32 rows at a time
            for i in range(0, w.shape[0], rows):
                e = w[i:i + rows].float()
                sq += e.square().sum(0)
                ae += A[:, i:i + rows] @ e
            s = self.scale
            n2 = sq + 2 * s * (B * ae.t()).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1)
            return n2.clamp_min(0).sqrt()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.base(ids)  # (B, T, D)
        if self.scale == 0.0:  # adapters off (losses.adapters_disabled)
            return x
        # PEFT looks A up with the base's padding_idx: the pad row of A gets no gradient
        pad = self.padding_idx if self.padding_idx is not None else getattr(
            self.base, "padding_idx", None)
        after_a = F.embedding(ids, self.lora_embedding_A.t(), pad)  # (B, T, r)
        y = x + (after_a @ self.lora_embedding_B.t()) * self.scale
        if self.use_dora:  # each hidden dim rescaled: m / ||E + dE|| (a constant for autograd)
            y = y * (self.lora_magnitude / self.weight_norm())
        return y.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * (B A)^T`` (V, D) in fp32, detached."""
        A, B = self.lora_embedding_A.detach().float(), self.lora_embedding_B.detach().float()
        return self.scale * (B @ A).t()

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """E + scale * (B A)^T in ``dtype`` (default: the base's), as PEFT's ``Embedding.merge``
        rounds it: the fp32 update is cast to ``dtype`` first, then added (bf16 / fp16: one
        rounding more than a linear layer's merge, which adds the fp32 update)."""
        w = self.base.weight
        dtype = dtype or w.dtype
        if self.use_dora:
            # PEFT's DoraEmbeddingVariant.merge: (m / ||E + dE||) * (E + dE), all in fp32 (its dE
            # stays fp32 there), rounded once
            merged = w.detach().float() + self.delta_weight()
            g = self.lora_magnitude.detach().float() / torch.linalg.norm(merged, dim=0)
            return (g * merged).to(dtype)
        return (w.detach().float() + self.delta_weight().to(dtype).float()).to(dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"
                + (", ties_head" if self.ties_head else "") + (", dora" if self.use_dora else ""))


def head_lora(lm_head: nn.Module | None, embed: nn.Module):
    """``(W, A (r, D), B (V, r), scale, dropout)`` of the LoRA on a model's output head, or None:
    an adapted ``lm_head`` (a ``LoRALinear``: ``base``, ``lora_A``...), or a tied head through an
    embedding adapter with ``ties_head``."""
    if lm_head is not None and hasattr(lm_head, "lora_A"):
        nf4 = getattr(lm_head.base, "quant_weight", None)  # a 4-bit head (quantize_model_)
        w = lm_head.base.weight if nf4 is None else nf4.dequantize(embed.weight.dtype)
        return (w, lm_head.lora_A, lm_head.lora_B, lm_head.scale, lm_head.dropout)
    if lm_head is None and isinstance(embed, LoRAEmbedding) and embed.ties_head:
        return (embed.weight, embed.lora_embedding_B.t(), embed.lora_embedding_A.t(),
                embed.scale, embed.dropout)
    return None


def head_operands(hidden: torch.Tensor, lora, training: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, W')`` with ``x W'^T = h W^T + scale * (dropout(h) A^T) B^T`` for ``lora`` from
    ``head_lora``; x in ``hidden``'s dtype, W' in the base weight's."""
    w, A, B, scale, dropout = lora
    if scale == 0.0:
        return hidden, w
    lx = dropout(hidden) if dropout is not None and training else hidden
    a = F.linear(lx, A.to(hidden.dtype)) * scale  # (..., r)
    return torch.cat([hidden, a.to(hidden.dtype)], -1), torch.cat([w, B.to(w.dtype)], -1)


def adapted_head_weight(lora) -> torch.Tensor:
    """``W + scale * B A`` (V, D) in W's dtype, differentiable (for readers of the dense head)."""
    w, A, B, scale, _ = lora
    return (w.float() + scale * (B.float() @ A.float())).to(w.dtype)
