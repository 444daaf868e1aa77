"""One decoder-only transformer for the Llama family (Llama 2/3, Mistral, Qwen2/3, Phi-3,
Gemma 1/2/3, SmolLM2), configured by ``ModelConfig``. Kernels are called through ``ember.kernels``
only.

Shapes: B batch, T tokens, D hidden, H query heads, K kv heads, hd head_dim, V vocab.
Packed batches: B == 1 and ``cu_seqlens`` marks document boundaries (attention never crosses them;
``position_ids`` restart per document).

LoRA (``ember.models.lora``) wraps projections in place. When q, k and v (or gate, up and down) all
carry adapters and no dropout is drawn, the block calls the fused ``ember.kernels.lora_qkv`` /
``lora_mlp`` once instead of the modules one by one (same math, fewer saved activations);
``Transformer.set_fused_lora(False)`` turns that off. Module hooks on the wrapped projections do
not run on the fused path. Phi-3 (transformers' fused ``qkv_proj`` / ``gate_up_proj``): PEFT's
LoRA dropout draws one mask for q, k and v and one for gate and up (``shared_lora_input``), so
its q/k/v keep the fused call with that one dropped input.

RoPE: ``cfg.rotary_dim`` leading dims of each head are rotated, the rest pass through (partial
rotary, Phi-4-mini). LongRoPE (Phi-3.5 / Phi-4-mini) has two frequency tables; as in transformers,
one forward uses the long one for every token iff its largest position id + 1 exceeds
``original_max_position_embeddings`` (a packed batch: the longest document, since positions
restart per document), decided on device without a host sync. ``hidden_states(long_rope=...)``
overrides that choice; ``ember.models.generate`` uses it to rebuild the KV cache at the switch the
way transformers' Phi-3 does.

Mixture of experts (Mixtral, Qwen2/3-MoE): a sparse layer's ``mlp`` is ``ember.models.moe.MoE``,
whose experts are this file's ``MLP``.

Phi-1/1.5/2 (``cfg.parallel_block``): one LayerNorm (``cfg.norm == "layernorm"``, with bias) feeds
both branches, ``x + drop(attn(n(x))) + drop(mlp(n(x)))``; the MLP is plain (``gated_mlp`` False:
``down_proj(act(up_proj(x)))``, transformers' fc1 / fc2; the fused LoRA MLP kernel is gated-only, so
it runs module by module) and the head has a bias (``head_bias``, transformers' lm_head.bias).

Gemma 2/3: each layer is local (``sliding_window``, RoPE base ``rope_local_theta``) or global per
``cfg.layer_types``; ``sandwich_norms`` adds RMSNorms on the attention and MLP outputs before
they join the residual.

Llama variants: SmolLM3's ``nope_layers`` skip RoPE; Granite scales the embeddings
(``embedding_scale``), each branch before the residual add (``residual_multiplier``), the
softmax (``attention_multiplier``) and divides the logits by ``logits_scaling`` (in
``head_operands``, so the fused loss and generation see it); OLMo2 has sandwich norms without
pre-norms (``pre_norms=False``) and q/k norms over the whole projection (``qk_norm_full``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.kernels import apply_rope, flash_attention, geglu, lora_mlp, lora_qkv, rms_norm, swiglu
from ember.models.activations import FUSED, act_fn, gated
from ember.models.config import (
    ModelConfig,
    rope_attention_factor,
    rope_dynamic_inv_freq,
    rope_inv_freq,
)
from ember.models.lora import LoRALinear
from ember.models.lora_embed import adapted_head_weight, head_lora, head_operands
from ember.models.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The family's norm over the last dim: RMSNorm (with Gemma's offset) or a LayerNorm with
    weight and bias (Phi), both with eps ``cfg.rms_norm_eps``."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)


class KVCache:
    """Preallocated keys/values for generation: per layer (B, max_len, K, hd); the first
    ``length`` positions are filled. Each layer's buffers are allocated at its first write, in
    the dtype of the keys it receives (the compute dtype, which under autocast or FSDP mixed
    precision differs from the stored weights'); ``dtype`` is only the default for ``k``/``v``
    views of layers never written."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        self.shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t0, t1 = self.length, self.length + k.shape[1]
        if t1 > self.max_len:
            raise ValueError(f"KV cache full: {t1} tokens > max_len {self.max_len}")
        if self.k[layer] is None:
            shape = (k.shape[0], *self.shape[1:])
            self.k[layer] = torch.zeros(shape, device=k.device, dtype=k.dtype)
            self.v[layer] = torch.zeros(shape, device=v.device, dtype=v.dtype)
        self.k[layer][:, t0:t1] = k
        self.v[layer][:, t0:t1] = v
        return self.k[layer][:, :t1], self.v[layer][:, :t1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished generations leave the batch)."""
        self.k = [t if t is None else t.index_select(0, rows) for t in self.k]
        self.v = [t if t is None else t.index_select(0, rows) for t in self.v]


def _fusable(mods, shared_dropout: bool = False) -> bool:
    """LoRA on every projection of a fused block and no dropout drawn in this call: PEFT draws one
    dropout mask per projection, which one shared LoRA input cannot reproduce (``shared_dropout``:
    the caller drew the one mask PEFT shares, Phi-3's q/k/v). DoRA's rowwise rescale is not in
    the fused kernels: DoRA modules run one by one."""
    return all(isinstance(m, LoRALinear) and not m.use_dora
               and (shared_dropout or m.dropout is None or not m.training) for m in mods)


def shared_lora_input(cfg: ModelConfig, mods, x: torch.Tensor) -> torch.Tensor | None:
    """Phi-3's checkpoints fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: PEFT's
    LoRA on a fused projection drops out its input once, one mask for every part (Ember keeps
    the parts apart, ``ember.models.lora_fused``). In a training forward with LoRA dropout on
    such a group, that one ``dropout(x)``, drawn where PEFT draws it; None otherwise (each
    module draws its own mask, as PEFT's per-projection LoRA does)."""
    if cfg.model_type != "phi3":
        return None
    drops = [m.dropout for m in mods if isinstance(m, LoRALinear) and m.training
             and m.dropout is not None and m.scale != 0.0]
    if not drops or len({d.p for d in drops}) != 1:
        return None
    return drops[0](x)


def _lora_args(mods):
    """(weights, As, Bs, scales, biases) of LoRALinear modules, for the fused kernels."""
    return ([m.base.quant_weight if hasattr(m.base, "quant_weight") else m.base.weight
             for m in mods],
            [m.lora_A for m in mods], [m.lora_B for m in mods], [m.scale for m in mods],
            [m.base.bias for m in mods])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.layer = cfg, layer
        self.window = cfg.window(layer)
        # With LoRA on q, k and v, one fused call reads x once and keeps one copy of it for
        # backward (ember.kernels.lora_qkv); False runs the three projections one by one.
        self.fuse_lora = True
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.attention_out_bias)
        self.rope = layer not in cfg.nope_layers
        if cfg.qk_norm:
            # OLMo2 (qk_norm_full): over (H*hd) and (K*hd), before the head split
            full = cfg.qk_norm_full
            self.q_norm = make_norm(cfg, cfg.num_heads * hd if full else hd)
            self.k_norm = make_norm(cfg, cfg.num_kv_heads * hd if full else hd)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache=None, key_mask=None):
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        lora_x = shared_lora_input(cfg, qkv, x)  # Phi-3: one mask for q, k and v
        if self.fuse_lora and (_fusable(qkv) or lora_x is not None and _fusable(qkv, True)):
            q, k, v = lora_qkv(x, *_lora_args(qkv), lora_x=lora_x)
        elif lora_x is not None:
            q, k, v = (proj(x, lora_x) if isinstance(proj, LoRALinear) else proj(x)
                       for proj in qkv)
        else:
            q, k, v = (proj(x) for proj in qkv)
        if cfg.qk_norm and cfg.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)  # (B, T, K, hd)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm and not cfg.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, S, K, hd), S = cached + T
        kw = dict(causal=True, softmax_scale=cfg.softmax_scale, window=self.window,
                  softcap=cfg.attn_softcap)
        if key_mask is not None:
            drop = cfg.attention_dropout if self.training else 0.0
            out = _masked_attention(q, k, v, key_mask, cfg, self.window, drop)
        elif cfg.attention_dropout and self.training:
            out = _dropout_attention(q, k, v, cfg, self.window, cu_seqlens)
        elif cu_seqlens is not None:
            out = flash_attention(q[0], k[0], v[0], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  **kw)[None]
        else:
            out = flash_attention(q, k, v, **kw)
        return self.o_proj(out.reshape(B, T, cfg.num_heads * cfg.head_dim))


def _dropout_attention(q, k, v, cfg: ModelConfig, window: int | None, cu_seqlens=None):
    """Causal attention with dropout on the probabilities (``cfg.attention_dropout``, training
    forwards only), as transformers' attention applies it: q (B, T, H, hd), k/v (B, S, K, hd),
    S >= T (S > T: a KV cache's earlier keys first, the queries are the last T positions);
    packed documents (B = 1, ``cu_seqlens``, S = T) never attend to each other. Ember's flash
    kernels have no dropout, so this runs with an explicit (T, S) mask: PyTorch's SDPA on CUDA
    (its memory-efficient kernel draws the dropout), else the eager math transformers' "eager"
    attention does (same dropout draws for the same seed)."""
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(T, device=q.device)[:, None] + (S - T)  # the queries' key positions
    j = torch.arange(S, device=q.device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:].to(q.device), j[0], right=True)
        keep &= doc[None, :] == doc[:, None]
    p_drop = cfg.attention_dropout
    scale = cfg.head_dim ** -0.5 if cfg.softmax_scale is None else cfg.softmax_scale
    rep = cfg.num_heads // cfg.num_kv_heads
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    if q.is_cuda and cfg.attn_softcap is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, dropout_p=p_drop,
                                             scale=scale)
        return out.transpose(1, 2)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if cfg.attn_softcap is not None:
        s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
    s = s.masked_fill(~keep, float("-inf"))
    p = F.dropout(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), p_drop, True)
    return (p @ vt).transpose(1, 2)


def _masked_attention(q, k, v, key_mask, cfg: ModelConfig, window: int | None,
                      dropout: float = 0.0):
    """Attention with a per-key padding mask (left-padded batched generation). q (B, T, H, hd),
    k/v (B, S, K, hd), key_mask (B, S) bool, True = real token. Masked slots can sit between
    real ones (prompt tuning's virtual tokens come before the padding; rejected draft tokens
    leave holes), so a sliding window counts real tokens (positions), not slots. ``dropout``:
    on the probabilities (a training forward's ``attention_dropout``), as transformers' eager
    attention drops them."""
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(T, device=q.device)[:, None] + (S - T)
    j = torch.arange(S, device=q.device)[None, :]
    keep = (j <= i)[None] & key_mask[:, None, :]  # (B, T, S)
    if window is not None:
        pos = key_mask.cumsum(-1)  # (B, S): real tokens up to and including each slot
        keep &= (pos[:, S - T:, None] - pos[:, None, :]) < window
    rep = cfg.num_heads // cfg.num_kv_heads
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, T, hd)
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    s = qf @ kf.transpose(-1, -2)
    s = s / cfg.head_dim ** 0.5 if cfg.softmax_scale is None else s * cfg.softmax_scale
    if cfg.attn_softcap is not None:
        s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
    # Rows with no visible key give 0 (a softmax over only -inf is NaN); a NaN in q or k stays
    # NaN (was nan_to_num: a diverged weight gave finite logits), as in flash_attention.
    empty = ~keep.any(-1)[:, None, :, None]  # (B, 1, T, 1)
    s = s.masked_fill(~keep[:, None], float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    if dropout:
        p = F.dropout(p, dropout, True)
    return (p @ vf).transpose(1, 2).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        d, f = cfg.hidden_size, width or cfg.intermediate_size
        if not cfg.gated_mlp:
            raise ValueError("MLP is the gated MLP; a config with gated_mlp=False uses PlainMLP")
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        # fused kernels for SiLU / tanh GELU; other activations: plain PyTorch (activations.py)
        self.act = {"silu": swiglu, "gelu_tanh": geglu}.get(cfg.activation) or gated(
            cfg.activation)
        self.activation, self.cfg = cfg.activation, cfg
        # With LoRA on gate, up and down: one fused call (ember.kernels.lora_mlp) that keeps the
        # gate/up outputs but not act(gate, up); False (or an activation lora_mlp lacks) runs
        # the modules one by one.
        self.fuse_lora = True

    def forward(self, x):
        mods = (self.gate_proj, self.up_proj, self.down_proj)
        lora_x = shared_lora_input(self.cfg, mods[:2], x)  # Phi-3: one mask for gate and up
        if self.fuse_lora and self.activation in FUSED and _fusable(mods):
            return lora_mlp(x, *_lora_args(mods), activation=self.activation)
        if lora_x is not None:
            gate, up = (m(x, lora_x) if isinstance(m, LoRALinear) else m(x) for m in mods[:2])
            return self.down_proj(self.act(gate, up))
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class PlainMLP(nn.Module):
    """``down_proj(act(up_proj(x)))`` without a gate (Phi-1/1.5/2: transformers' fc1 / fc2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.activation, self.act = cfg.activation, act_fn(cfg.activation)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.hidden_size

        def pre_norm() -> nn.Module:  # OLMo2 (pre_norms=False): none, and no weights for one
            return make_norm(cfg, d) if cfg.pre_norms else nn.Identity()

        self.attn_norm = pre_norm()
        self.attn = Attention(cfg, layer)
        self.parallel = cfg.parallel_block  # one norm feeds attention and MLP (Phi)
        if not self.parallel:
            self.mlp_norm = pre_norm()
        # A sparse layer's MLP is a mixture of experts (ember.models.moe), each expert an MLP
        if cfg.is_sparse(layer):
            self.mlp = MoE(cfg, lambda f: MLP(cfg, f))
        else:
            self.mlp = MLP(cfg) if cfg.gated_mlp else PlainMLP(cfg)
        if cfg.sandwich_norms:
            self.attn_post_norm = make_norm(cfg, d)
            self.mlp_post_norm = make_norm(cfg, d)
        self.sandwich = cfg.sandwich_norms
        self.residual_multiplier = cfg.residual_multiplier  # Granite
        self.resid_dropout = cfg.resid_dropout

    def _drop(self, t):
        return F.dropout(t, self.resid_dropout, True) if self.resid_dropout and self.training else t

    def _scale(self, t):
        return t if self.residual_multiplier == 1.0 else t * self.residual_multiplier

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache=None, key_mask=None):
        a = self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, cache, key_mask)
        if self.parallel:  # x + attn(n(x)) + mlp(n(x)), in transformers' Phi order
            return self._scale(self._drop(a)) + self.mlp_branch(x) + x
        x = x + self._scale(self.attn_post_norm(a) if self.sandwich else self._drop(a))
        return x + self.mlp_branch(x)

    def mlp_branch(self, x):
        """The MLP side of the residual, token by token independent (engine/activation.py can
        run it in token chunks: ``activations.mlp_chunk_tokens``; an MoE layer's load-balancing
        statistics are sums over tokens, so chunks add up to the same loss). A parallel block
        takes the block input and applies the shared norm again (cheaper than keeping it)."""
        m = self.mlp((self.attn_norm if self.parallel else self.mlp_norm)(x))
        return self._scale(self.mlp_post_norm(m) if self.sandwich else self._drop(m))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # transformers builds every family's embedding with padding_idx=pad_token_id: looking up
        # the pad token adds nothing to that row's gradient (a tied head still does)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.padding_idx)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.embed_dropout = cfg.embed_dropout  # Phi's; 0 once off (ember.models.dropout)
        # A classifier (cfg.labels) has no LM head, as in HF's *ForSequenceClassification: its
        # ``score`` maps a document's last hidden state to class logits (ember.models.heads).
        self.lm_head = None if cfg.tie_word_embeddings or cfg.labels else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.score = None if not cfg.labels else nn.Linear(
            cfg.hidden_size, len(cfg.labels), bias=False)
        # The head's bias (Phi's lm_head.bias, kept when the weight is tied to the embedding)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if (
            cfg.lm_head_bias and not cfg.labels) else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.rope_local_theta is not None:  # sliding layers' RoPE (Gemma 3)
            self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True),
                                 persistent=False)
        if cfg.longrope is not None:  # inv_freq holds the short factors' table
            self.register_buffer("inv_freq_long", rope_inv_freq(cfg, long=True),
                                 persistent=False)

    def reset_rope_(self, device) -> None:
        """Rebuild the RoPE tables (non-persistent fp32 buffers) on device, e.g. after loading
        weights into a model built on the meta device."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)
        if self.cfg.rope_local_theta is not None:
            self.inv_freq_local = rope_inv_freq(self.cfg, local=True).to(device)
        if self.cfg.longrope is not None:
            self.inv_freq_long = rope_inv_freq(self.cfg, long=True).to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            # model.to(bf16) would round the RoPE table to 3 significant digits (angles off by
            # radians at long positions); keep the exact fp32 values on the new device.
            self.reset_rope_(self.inv_freq.device)
        return self

    def set_fused_lora(self, enabled: bool) -> Transformer:
        """Use the fused LoRA blocks (q/k/v, MLP) where every projection has an adapter (the
        default), or the per-projection modules (same math; for comparisons and debugging)."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse_lora = enabled
        return self

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) matrix that maps final hidden states to logits (tied: the embedding), with
        a LoRA on the head folded in (``W + scale * B A``; ``head_operands`` avoids forming it)."""
        if self.lm_head is None and not self.cfg.tie_word_embeddings:
            raise ValueError("this model is a sequence classifier (cfg.labels) without an LM "
                             "head: use ember.models.heads.classify for its class logits")
        lora = head_lora(self.lm_head, self.embed)
        if lora is not None:
            return adapted_head_weight(lora)
        if self.lm_head is None:
            return self.embed.weight
        nf4 = getattr(self.lm_head, "quant_weight", None)  # a 4-bit head (quantize_model_(skip=()))
        return self.lm_head.weight if nf4 is None else nf4.dequantize(self.embed.weight.dtype)

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The (V,) bias added to the logits (``cfg.lm_head_bias``), or None."""
        return self.head_bias

    def head_operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, W)`` with logits ``= x W^T`` (before the final softcap): ``(hidden,
        output_weight)``, or with a LoRA on the head the concatenated operands of
        ``ember.models.lora_embed.head_operands`` (exact, LoRA dropout included)."""
        if self.cfg.logits_scaling != 1.0:  # Granite: x W^T / s, as (x / s) W^T
            hidden = hidden / self.cfg.logits_scaling
        lora = head_lora(self.lm_head, self.embed)
        if lora is None:
            return hidden, self.output_weight
        return head_operands(hidden, lora, self.training)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Transformer:
        """Random init (benchmarks and tests use real shapes with random weights)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0 - self.cfg.norm_offset)
                elif name.endswith(".bias") or name == "head_bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def rope(self, position_ids: torch.Tensor, local: bool = False,
             long_rope: bool | torch.Tensor | None = None):
        """cos, sin (B, T, rotary_dim/2) fp32 for integer positions (B, T); ``local``: the
        sliding layers' table (``rope_local_theta``, ``rope_local_scaling``). LongRoPE: the long
        table iff ``long_rope`` (a bool, or a (B,) bool tensor: per row), or (None) iff
        max(position_ids) + 1 > original_max_position_embeddings, as transformers decides it
        once per forward."""
        inv_freq = self.inv_freq_local if local else self.inv_freq
        lr = None if local else self.cfg.longrope
        if lr is not None and long_rope is None and position_ids.numel():
            # a 0-dim device tensor, not a bool: no host sync per forward
            long_rope = position_ids.max() + 1 > lr.original_max_position_embeddings
            inv_freq = torch.where(long_rope, self.inv_freq_long, inv_freq)
        elif lr is not None and isinstance(long_rope, torch.Tensor):
            long_rope = long_rope.to(inv_freq.device)[:, None, None]  # (B, 1, 1)
            inv_freq = torch.where(long_rope, self.inv_freq_long, inv_freq)  # (B, 1, rd/2)
        elif lr is not None and long_rope:
            inv_freq = self.inv_freq_long
        rs = self.cfg.rope_scaling
        if not local and rs is not None and rs.kind == "dynamic" and position_ids.numel():
            inv_freq = rope_dynamic_inv_freq(self.cfg, position_ids.max() + 1, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, rotary_dim/2)
        scale = rope_attention_factor(self.cfg, local)
        if scale != 1.0:  # YaRN scales cos/sin, so q.k by scale^2
            return freqs.cos() * scale, freqs.sin() * scale
        return freqs.cos(), freqs.sin()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                      cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                      long_rope: bool | torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, D), the input to the output head. ``long_rope``:
        LongRoPE's table for this forward (None: from the positions, see ``rope``)."""
        B, T = input_ids.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"packed batches (cu_seqlens) must have batch size 1, got {B}")
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device)
            position_ids = position_ids[None].expand(B, T)
        cfg = self.cfg
        rope = self.rope(position_ids, long_rope=long_rope)
        local = rope if cfg.rope_local_theta is None else self.rope(position_ids, local=True)
        x = self.embed(input_ids)  # (B, T, D)
        if self.embed_dropout and self.training:
            x = F.dropout(x, self.embed_dropout, True)
        if cfg.embedding_scale is not None:
            scaled = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
            virtual = getattr(self.embed, "virtual_mask", None)  # prompt tuning: rows unscaled
            x = scaled if virtual is None else torch.where(virtual(input_ids)[..., None], x, scaled)
        for i, block in enumerate(self.layers):
            cos, sin = local if cfg.is_sliding(i) else rope
            x = block(x, cos, sin, cu_seqlens, max_seqlen, cache, key_mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x, w = self.head_operands(hidden)
        b = self.output_bias
        out = F.linear(x, w, None if b is None else b.to(w.dtype))  # (B, T, V)
        if self.cfg.final_softcap is not None:
            c = self.cfg.final_softcap
            out = c * torch.tanh(out / c)
        return out

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        """Logits (B, T, V)."""
        return self.logits(self.hidden_states(input_ids, position_ids, **kw))
