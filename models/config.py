"""ModelConfig: one frozen dataclass describes every supported decoder family.

Families differ by fields (qkv bias, q/k norm, sliding window, norm offset, activation, tied
embeddings, RoPE scaling), never by subclasses.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch

from ember import EmberError
from ember.models.activations import ACTIVATIONS


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("llama3"), linear position interpolation, YaRN
    ("yarn": frequencies ramped between interpolation and extrapolation by ``beta_fast`` /
    ``beta_slow``, cos/sin multiplied by ``attention_factor``) or LongRoPE ("longrope", Phi-3.5 /
    Phi-4-mini: frequency ``i`` divided by ``short_factor[i]``, or by ``long_factor[i]`` in a
    forward whose largest position is >= ``original_max_position_embeddings``; cos/sin multiplied
    by ``attention_factor``) or dynamic NTK ("dynamic": a forward whose largest position is >=
    ``max_position_embeddings`` raises the RoPE base to fit it, ``rope_dynamic_inv_freq``), as
    transformers computes them."""

    kind: str = "llama3"  # "llama3" | "linear" | "yarn" | "longrope" | "dynamic"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0  # yarn only, like the three below
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # yarn and longrope
    short_factor: tuple[float, ...] = ()  # longrope only: one per rotary frequency
    long_factor: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("short_factor", "long_factor"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.kind == "longrope" and (
                not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise ValueError("longrope needs short_factor and long_factor of the same, non-zero "
                             f"length; got {len(self.short_factor)} and {len(self.long_factor)}")


LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model_type: str = "llama"  # the HF model_type written back on export
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # RoPE rotates the first int(head_dim * this) dims of each head, the rest pass through (Phi-4)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    attention_out_bias: bool = False  # o_proj bias (Llama's attention_bias=True sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # keys visible to each query, incl. itself (Mistral)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w); Gemma uses 1.0
    # "silu" (SwiGLU) | "gelu_tanh" (GeGLU), both fused, or another of transformers' ACT2FN
    # (ember.models.activations: "gelu", "relu", "relu2", ... on a plain PyTorch path)
    activation: str = "silu"
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embedding_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    # Per-layer attention kind, "sliding_attention" (window ``sliding_window``, RoPE base
    # ``rope_local_theta``) or "full_attention" (Gemma 2/3); None: every layer is sliding iff
    # sliding_window is set.
    layer_types: tuple[str, ...] | None = None
    sandwich_norms: bool = False  # Gemma 2/3: RMSNorm on the attention and MLP outputs too
    query_pre_attn_scalar: float | None = None  # softmax scale is this ** -0.5; None: head_dim
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3)
    # their scaling (Gemma 3's rope_parameters["sliding_attention"]): "linear", "llama3" or
    # "yarn" (a table fixed per model; the sequence-dependent kinds are the global layers' only)
    rope_local_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # the checkpoint's dtype as transformers' dtype="auto" reads it: config.json's, else stored
    torch_dtype: str = "float32"
    # A sequence classifier (HF *ForSequenceClassification): the class names in index order. The
    # model then has a ``score`` head (ember.models.heads) and no LM head. One name: a one-output
    # head (a reward model, or regression when problem_type = "regression").
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None  # HF's, for a one-output head: None or "regression"
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; ember.models.moe): 0 experts is a dense
    # model. A sparse layer routes each token to ``num_experts_per_tok`` of ``num_experts`` MLPs of
    # width ``moe_intermediate_size``, weighted by the softmax over all experts' router logits,
    # restricted to the chosen ones and renormalized to sum 1 iff ``norm_topk_prob`` (Mixtral:
    # always, which is the softmax over the chosen logits). Layer i is sparse iff
    # ``(i + 1) % decoder_sparse_step == 0`` and i is not in ``mlp_only_layers`` (Qwen2/3-MoE);
    # other layers have the dense MLP of width ``intermediate_size``. Qwen2-MoE adds a shared
    # expert of width ``shared_expert_intermediate_size`` scaled by sigmoid(shared_expert_gate(x)).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001  # HF's default weight of the load-balancing loss
    # Llama variants (ember.models.hf_llama_variants). SmolLM3: layers that skip RoPE (NoPE).
    nope_layers: tuple[int, ...] = ()
    # Granite: each branch's output times this before the residual add; the softmax scale itself
    # (None: query_pre_attn_scalar's rule); logits divided by logits_scaling.
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # OLMo2: no RMSNorm before attention / MLP (its sandwich norms only), and q_norm / k_norm
    # over the whole projection width (H*hd, K*hd) instead of per head.
    pre_norms: bool = True
    qk_norm_full: bool = False
    # Phi-1/1.5/2 (GPT-J style blocks): "layernorm" norms (weight and bias, eps ``rms_norm_eps``)
    # instead of RMSNorm, also for q/k norms; a parallel block ``x + attn(n(x)) + mlp(n(x))`` with
    # one norm; a plain MLP ``down(act(up(x)))`` (no gate_proj); a bias on the output head.
    norm: str = "rms"  # "rms" | "layernorm"
    parallel_block: bool = False
    gated_mlp: bool = True
    lm_head_bias: bool = False
    # Dropout in training forwards (transformers' resid_pdrop on the attention and MLP outputs,
    # embd_pdrop on the embeddings, attention_dropout on the attention probabilities); eval
    # forwards and generation never drop.
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    extra: dict = field(default_factory=dict)  # HF fields kept verbatim for export (not used)

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got "
                             f"{self.activation!r}")
        if self.norm not in ("rms", "layernorm"):
            raise ValueError(f"norm must be 'rms' or 'layernorm', got {self.norm!r}")
        if self.norm == "rms" and not 0 < self.rms_norm_eps < math.inf:
            # the kernels' and the reference's rule (rms_norm refuses it at the first forward)
            raise ValueError(f"rms_norm_eps must be > 0 and finite, got {self.rms_norm_eps!r}: "
                             "set it in the model's config (1e-5 or 1e-6 are usual)")
        for name in ("resid_dropout", "embed_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.parallel_block and self.sandwich_norms:
            raise ValueError("parallel_block and sandwich_norms cannot be combined")
        if self.sandwich_norms and self.resid_dropout:
            # no transformers family has both (Gemma 2/3, OLMo2 drop nothing there): the blocks
            # would ignore it
            raise ValueError(f"resid_dropout ({self.resid_dropout}) is not applied with "
                             "sandwich_norms (Gemma 2/3, OLMo2 blocks have no residual dropout): "
                             "set resid_dropout=0")
        if not self.gated_mlp and self.num_experts:
            raise ValueError("mixture-of-experts layers have gated experts (gated_mlp=True)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    "hidden_size must be divisible by num_heads when head_dim is unset")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        # an odd head_dim is fine when only an even part of it rotates (transformers' Phi/Phi-3
        # partial rotary: head_dim 5, factor 0.4); the full-width RoPE needs it even
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor ({self.partial_rotary_factor}) must be in (0, 1] and "
                f"give an even rotary dim int(head_dim * factor) >= 2; got {self.rotary_dim} "
                f"(head_dim {self.head_dim})")
        if self.rope_scaling is not None and self.rope_scaling.kind == "dynamic" and (
                self.rotary_dim < 4):
            raise ValueError(f"dynamic NTK RoPE needs a rotary dim >= 4, got {self.rotary_dim}")
        local = self.rope_local_scaling
        if local is not None and (self.rope_local_theta is None
                                  or local.kind not in ("linear", "llama3", "yarn")):
            raise ValueError(
                f"rope_local_scaling {local.kind!r} (sliding layers' RoPE) needs "
                "rope_local_theta and one of the kinds linear, llama3, yarn; the sequence-"
                "dependent dynamic and longrope scale the global layers only")
        if self.longrope is not None and len(self.longrope.short_factor) != self.rotary_dim // 2:
            raise ValueError(
                f"longrope short_factor/long_factor must have rotary_dim / 2 = "
                f"{self.rotary_dim // 2} entries, got {len(self.longrope.short_factor)}")
        if self.labels is not None:
            labels = tuple(self.labels)
            object.__setattr__(self, "labels", labels)
            if not labels or len(set(labels)) != len(labels) or not all(
                    isinstance(x, str) and x for x in labels):
                raise ValueError(f"labels must be distinct non-empty names, got {list(labels)}")
        if self.problem_type not in (None, "regression") or (
                self.problem_type and (self.labels is None or len(self.labels) != 1)):
            raise ValueError(f"problem_type {self.problem_type!r}: only a one-output head (one "
                             "label) may be \"regression\"")
        self._check_moe()
        object.__setattr__(self, "nope_layers", tuple(sorted(set(self.nope_layers))))
        if not all(0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"nope_layers must be layer indices < {self.num_layers}, got "
                             f"{self.nope_layers}")
        if not (math.isfinite(self.logits_scaling) and self.logits_scaling != 0):
            raise ValueError(f"logits_scaling must be finite and non-zero, got "
                             f"{self.logits_scaling}")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.num_layers or not set(types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the "
                                 f"{self.num_layers} layers, got {self.layer_types!r}")
            object.__setattr__(self, "layer_types", types)

    def _check_sizes(self) -> None:
        # Before any arithmetic on them: a zero or negative size would otherwise surface as a
        # ZeroDivisionError here or a shape error deep inside the model.
        sizes = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"]
        for name in ("head_dim", "sliding_window"):  # None: derived / no window
            if getattr(self, name) is not None:
                sizes.append(name)
        if not self.num_experts:  # a MoE config may leave the dense width unused
            sizes.append("intermediate_size")
        for name in sizes:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise EmberError(f"ModelConfig.{name} must be a positive integer, got {v!r}: "
                                 "check the model's config.json (or the value you passed)")
        f = self.intermediate_size
        if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
            raise EmberError(f"ModelConfig.intermediate_size must be an integer >= 0, got "
                             f"{self.intermediate_size!r}")

    def _check_moe(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.num_experts == 0:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}]"
                             f", got {self.num_experts_per_tok}")
        if self.moe_intermediate_size is None:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if not 0 <= self.router_aux_loss_coef:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    @property
    def moe(self) -> bool:
        """Whether some layer is a mixture of experts."""
        return any(self.is_sparse(i) for i in range(self.num_layers))

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts (transformers' Qwen2/3-MoE rule)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def longrope(self) -> RopeScaling | None:
        """The LongRoPE scaling, or None when RoPE does not depend on the sequence length."""
        rs = self.rope_scaling
        return rs if rs is not None and rs.kind == "longrope" else None

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` is a local layer (sliding window, local RoPE base)."""
        if self.layer_types is None:
            return self.sliding_window is not None
        return self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """Keys visible to each query of ``layer`` (incl. itself), None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def softmax_scale(self) -> float | None:
        """Attention softmax scale; None means the kernels' default 1/sqrt(head_dim)."""
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        s = self.query_pre_attn_scalar
        return None if s is None else s**-0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def padding_idx(self) -> int | None:
        """The embedding row transformers builds ``nn.Embedding`` with as ``padding_idx`` (its
        lookups add nothing to the row's gradient): ``pad_token_id``, or a config.json's negative
        one (early Llama conversions: -1; kept in ``extra``, since it names no token), which
        PyTorch counts from the end (-1: the last row). None when the id is out of range."""
        pad = self.pad_token_id
        if pad is None:
            pad = self.extra.get("pad_token_id")
            if isinstance(pad, int) and not isinstance(pad, bool) and -self.vocab_size <= pad < 0:
                return pad + self.vocab_size
            return None
        return pad if 0 <= pad < self.vocab_size else None

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied; a classifier's score head)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hd, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        attn = d * hd * (hq + 2 * hkv) + hq * hd * d
        ln = 2 if self.norm == "layernorm" else 1  # a LayerNorm has a bias too
        norms = (2 if self.sandwich_norms else 0) + (
            (1 if self.parallel_block else 2) if self.pre_norms else 0)
        qk = (hq + hkv if self.qk_norm_full else 2) * hd if self.qk_norm else 0
        per_layer = attn + ln * (norms * d + qk)
        if self.attention_bias:
            per_layer += hd * (hq + 2 * hkv)
        if self.attention_out_bias:
            per_layer += d
        layers = self.num_layers * per_layer
        for i in range(self.num_layers):
            if not self.is_sparse(i):
                layers += (3 if self.gated_mlp else 2) * d * f
                if self.mlp_bias:
                    layers += (2 if self.gated_mlp else 1) * f + d
                continue
            layers += self.num_experts * (3 * d * self.moe_intermediate_size + d)  # + router
            if self.shared_expert_intermediate_size:
                layers += 3 * d * self.shared_expert_intermediate_size + d
        final = ln * d
        if self.labels:  # a classifier: the score head instead of an LM head
            return v * d + len(self.labels) * d + layers + final
        head = (0 if self.tie_word_embeddings else v * d) + (v if self.lm_head_bias else 0)
        return v * d + head + layers + final


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) in fp32, with the config's scaling applied (LongRoPE:
    the short factors, or with ``long`` the long ones); with ``local``, those of base
    ``rope_local_theta`` scaled by ``rope_local_scaling`` (Gemma 3's sliding layers)."""
    hd = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    # fp32 exactly as transformers computes it, so logits match bit for bit where possible.
    exponent = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    rs = cfg.rope_local_scaling if local else cfg.rope_scaling
    if rs is not None and rs.kind == "longrope":
        ext = torch.tensor(rs.long_factor if long else rs.short_factor, dtype=torch.float32)
        return 1.0 / (ext * theta**exponent)
    inv = 1.0 / (theta**exponent)
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    if rs.kind == "dynamic":  # the table up to max_position_embeddings; see rope_dynamic_inv_freq
        return inv
    if rs.kind == "yarn":
        return _yarn_inv_freq(hd, theta, rs)
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, smoothed, scaled)


def rope_dynamic_inv_freq(cfg: ModelConfig, seq_len: torch.Tensor, inv_freq: torch.Tensor
                          ) -> torch.Tensor:
    """Dynamic NTK (transformers' ``_compute_dynamic_ntk_parameters``): for a forward whose
    largest position id + 1 (``seq_len``, a 0-dim integer tensor: no host sync) exceeds
    ``max_position_embeddings`` L, the base becomes ``theta * (factor * seq_len / L - (factor -
    1)) ** (d / (d - 2))``, computed in fp32 as transformers does; up to L, ``inv_freq`` (the
    unscaled table). One table per forward, so a packed batch uses its longest document's, as
    transformers' packed forward (position_ids restarting per document) does. transformers
    keeps the largest table it has grown to until a forward shorter than L; this is the table a
    fresh model (or a growing sequence: generation) uses."""
    rs, L, d = cfg.rope_scaling, cfg.max_position_embeddings, cfg.rotary_dim
    seq = torch.maximum(seq_len, torch.tensor(L, dtype=seq_len.dtype, device=seq_len.device))
    base = cfg.rope_theta * ((rs.factor * seq / L) - (rs.factor - 1)) ** (d / (d - 2))
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=seq.device).float() / d
    return torch.where(seq_len > L, 1.0 / (base**exponent), inv_freq)


def rope_attention_factor(cfg: ModelConfig, local: bool = False) -> float:
    """The factor cos and sin are multiplied by (YaRN's and LongRoPE's attention scaling; 1
    otherwise); with ``local``, the sliding layers' (``rope_local_scaling``)."""
    rs = cfg.rope_local_scaling if local else cfg.rope_scaling
    return rs.attention_factor if rs is not None and rs.kind in ("yarn", "longrope") else 1.0


def _yarn_inv_freq(hd: int, base: float, rs: RopeScaling) -> torch.Tensor:
    """YaRN (arXiv 2309.00071) in transformers' operation order: dimensions that rotate more than
    ``beta_fast`` times over the original context keep their frequency, those under ``beta_slow``
    are divided by ``factor``, with a linear ramp in between."""

    def dim_of(rotations: float) -> float:
        ctx = rs.original_max_position_embeddings
        return hd * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(rs.beta_fast), dim_of(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, hd, 2).float() / hd)
    return (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
