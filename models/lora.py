"""LoRA adapters for ``Transformer``: wrap, train, save/load in PEFT's format, merge.

A wrapped projection computes ``y = x W^T + b + scale * (dropout(x) A^T) B^T`` through
``ember.kernels.lora_linear`` (the one call site the fused / NF4 kernels plug into), with
``A`` (r, in), ``B`` (out, r) and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

DoRA (``use_dora``, PEFT's ``DoraLinearLayer``) adds a trainable magnitude ``m`` (out,), set to the
row norms ``||W + scale * B A||`` (over the input dim) when the module is made, and computes
``y = x W^T + b + (g - 1) x_l W^T + g * scale * (x_l A^T) B^T`` with ``g = m / ||W + scale * B A||``
per output row; the norm is a constant for autograd (the DoRA paper, section 4.3, as PEFT).
Without dropout (x_l = x) that is ``g * (x W^T + scale * (x A^T) B^T) + b``; merged,
``W' = g * (W + scale * B A)``. DoRA modules never take the fused q/k/v and MLP kernels.

State-dict layout. ``apply_lora`` replaces e.g. ``layers.0.attn.q_proj`` (an ``nn.Linear``, or an
NF4 ``Linear4bit`` exposing ``quant_weight`` / ``bias`` / ``in_features`` / ``out_features``) by a
``LoRALinear`` whose children are the original module as ``base`` and two parameters, so keys are::

    layers.0.attn.q_proj.base.weight   (frozen base weight, still reachable)
    layers.0.attn.q_proj.base.bias     (when the projection has one)
    layers.0.attn.q_proj.lora_A        (r, in)
    layers.0.attn.q_proj.lora_B        (out, r)
    layers.0.attn.q_proj.lora_magnitude   (out,), DoRA only

``base_state_dict(model)`` gives the un-wrapped keys (``layers.0.attn.q_proj.weight``) for code
that writes base checkpoints; ``merge_lora`` folds the adapters in and restores plain modules.

The token embedding (``embed``, PEFT's ``embed_tokens``) takes a ``LoRAEmbedding`` and the output
head (``lm_head``) a ``LoRALinear`` whose update reaches the fused loss through
``Transformer.head_operands``; on a tied model one embedding adapter serves both (PEFT's
``ensure_weight_tying``): ``ember.models.lora_embed``.

PEFT interop: ``save_adapter`` / ``load_adapter`` in ``ember.models.peft_adapter`` (re-exported
here).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember import EmberError
from ember.kernels import lora_linear
from ember.models.hf_phi import EMBER_LEAVES as PHI_LEAVES
from ember.models.lora_embed import LoRAEmbedding
from ember.models.lora_init import (
    _NITER,
    base_changing_init,
    changes_base,
    check_init,
    lora_scale,
    rng_state,
    set_rng_state,
    skip_lowrank_draw,
)
from ember.models.peft_files import untie_head

# QPiSSA's source: (the Ember weight keys wanted) -> their (key, full-precision tensor)
DenseWeights = Callable[[Collection[str]], Iterable[tuple[str, torch.Tensor]]]

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# short and transformers names -> Ember module names (PEFT's "embed_tokens" is Ember's "embed")
SHORT_TARGETS = {**dict(zip(ALL_LINEAR, _LINEAR_LEAVES, strict=True)),
                 "embed_tokens": "embed", "lm_head": "lm_head"}
# transformers' leaf names of the linears "all-linear" selects (Phi-1/2: dense, fc1, fc2)
HF_LINEAR_LEAVES = (*_LINEAR_LEAVES, *PHI_LEAVES)


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """``targets``: short names (q k v o gate up down), module leaf names (``q_proj``),
    ``"all-linear"`` (never the head, as in PEFT), on Phi-1/2 also transformers' ``dense`` /
    ``fc1`` / ``fc2`` (Ember's o_proj / up_proj / down_proj), ``embed_tokens`` / ``lm_head`` (see
    ``ember.models.lora_embed``), or glob / regex patterns on full module names
    (``layers.1[0-9].mlp.*``). ``embedding_lr``: the learning rate of the embedding's and head's
    adapters (Unsloth's ``embedding_learning_rate``; None: ``optim.lr``); the rows of a continued
    adapter's ``trainable_token_indices`` train at ``optim.lr``, as PEFT's LoRA+ trains them."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    # "kaiming" (PEFT's default) | "gaussian": A's draw, B zero | "pissa" | "pissa_niter_K" |
    # "olora": A, B from the base weight's SVD / QR, the base becomes the residual (exported as a
    # rank-2r plain LoRA on the original base); an embed_tokens adapter: A zero, B normal always
    init: str = "kaiming"
    use_dora: bool = False  # DoRA: a trained magnitude per output row (see the module docstring)
    embedding_lr: float | None = None

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise EmberError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise EmberError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise EmberError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise EmberError(f"lora.use_dora must be true or false, got {self.use_dora!r}")
        check_init(self.init)
        if self.embedding_lr is not None and (isinstance(self.embedding_lr, bool)
                                              or not self.embedding_lr > 0):
            raise EmberError(f"lora.embedding_lr must be > 0 (or left out), got "
                             f"{self.embedding_lr!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise EmberError(f"lora.targets must be a non-empty list of names, "
                             f"got {self.targets!r}")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or hasattr(m, "quant_weight")


def _features(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    out_f, in_f = base.quant_weight.shape
    return int(in_f), int(out_f)


def _base_weight(base: nn.Module):
    return base.quant_weight if hasattr(base, "quant_weight") else base.weight


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """A projection's weight in fp32, detached. An NF4 base is dequantized in the dtype it was
    quantized from, then widened: bitsandbytes' ``dequantize_4bit``, which PEFT's merge and DoRA
    norm on a 4-bit base add the adapter to (a bf16 base: the bf16-rounded weight the 4-bit
    forward computes with, not the unrounded fp32 product)."""
    w = _base_weight(base)
    return w.detach().float() if isinstance(w, torch.Tensor) else w.dequantize().float()


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False,
                 dtype: torch.dtype = torch.float32, dense_weight: torch.Tensor | None = None):
        """``dense_weight``: the full-precision weight an NF4 ``base`` was quantized from, for
        PiSSA on it (QPiSSA: ``apply_lora(..., dense_weights=...)``)."""
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or an NF4 Linear4bit, got {type(base)}")
        in_f, out_f = _features(base)
        device = _base_weight(base).device
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(rank, self.alpha, use_rslora)
        # Adapters train in fp32 even over a bf16/NF4 base (PEFT's autocast_adapter_dtype).
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.use_dora = use_dora
        self.lora_magnitude = None
        if use_dora:  # fp32 like A and B; reset_lora sets it to the row norms
            self.lora_magnitude = nn.Parameter(torch.empty(out_f, device=device, dtype=dtype))
        self.reset_lora(init, dense_weight)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def reset_lora(self, init: str = "kaiming", dense_weight: torch.Tensor | None = None) -> None:
        """A random, B zero (and a DoRA magnitude ``||W||``): the wrapped model computes exactly
        what the base did. PiSSA / OLoRA (``ember.models.lora_init``): A and B from the base
        weight, which becomes the residual ``W - scale * B A`` (a weight on the meta device is
        left as it is: its real values are loaded later). ``dense_weight``: the full-precision
        weight an NF4 base was quantized from (QPiSSA)."""
        with torch.no_grad():
            if changes_base(init):
                self._init_from_base(init, dense_weight)
            elif init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            if not changes_base(init):
                self.lora_B.zero_()
            if self.lora_magnitude is not None:
                self.lora_magnitude.copy_(self.weight_norm())

    def _init_from_base(self, init: str, dense: torch.Tensor | None) -> None:
        if hasattr(self.base, "quant_weight"):
            self._init_from_nf4_base(init, dense)
            return
        w = self.base.weight
        if w.device.type == "meta":
            return
        A, B, residual = base_changing_init(w, self.rank, self.scale, init)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.base.weight = nn.Parameter(residual, requires_grad=False)

    def _init_from_nf4_base(self, init: str, dense: torch.Tensor | None) -> None:
        """OLoRA as PEFT's ``olora_init`` on a bitsandbytes 4-bit layer: QR of the dequantized
        weight (in its own dtype, then fp32); A, B stay fp32 (PEFT casts adapters only to a
        float base's dtype) and the fp32 residual is quantized again with the weight's
        blocksize and double quant (``Params4bit`` of the fp32 residual: its quant state's
        dtype becomes float32). PiSSA (QPiSSA, PEFT's documented recipe: PiSSA on the dense
        model, the residual saved and loaded in 4 bit): the decomposition of the weight the
        NF4 one was quantized from, in its dtype, the residual quantized in that dtype."""
        q = self.base.quant_weight
        if q is None or q.device.type == "meta":
            return
        if init != "olora" and dense is None:
            # PEFT's pissa_init refuses a 4-bit base too
            raise EmberError(f"lora.init {init!r} on a 4-bit (NF4) base needs the "
                             "full-precision weights it was quantized from (QPiSSA): pass "
                             "apply_lora(..., dense_weights=lambda keys: iter_dense_weights("
                             "model folder, keys)) (ember train does), or use lora.init = "
                             "'olora' (PEFT's 4-bit OLoRA) or 'kaiming'")
        if q.state.quant_type != "nf4":
            raise EmberError(f"lora.init {init!r}: the base is bitsandbytes "
                             f"{q.state.quant_type.upper()}, and Ember quantizes to NF4 only; "
                             "use lora.init = 'kaiming'")
        if init == "olora":
            w = q.dequantize().float()
        else:
            if tuple(dense.shape) != tuple(q.shape):
                raise EmberError(f"lora.init {init!r}: a full-precision weight of shape "
                                 f"{tuple(dense.shape)} for an NF4 weight of shape "
                                 f"{tuple(q.shape)}: not the model it was quantized from")
            w = dense.detach().to(q.device, q.dtype)
        A, B, residual = base_changing_init(w, self.rank, self.scale, init)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.base.set_weight(residual, blocksize=q.blocksize, double_quant=q.state.nested)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trained tensors by attribute name: lora_A, lora_B (and lora_magnitude)."""
        names = ("lora_A", "lora_B") + (("lora_magnitude",) if self.use_dora else ())
        return {k: getattr(self, k) for k in names}

    def weight_norm(self) -> torch.Tensor:
        """``||W + scale * B A||`` per output row (out,), fp32, outside autograd (DoRA's norm)."""
        with torch.no_grad():
            return torch.linalg.norm(self._adapted_weight(), dim=1)

    def forward(self, x: torch.Tensor, lora_x: torch.Tensor | None = None) -> torch.Tensor:
        """``lora_x``: the adapter's input already dropped out by the caller (Phi-3's q/k/v and
        gate/up share one mask, as PEFT's LoRA on the fused projection draws); None: this
        module draws its own (in training, with dropout)."""
        # scale 0 (adapters off) draws no mask, as PEFT's disable_adapter runs the base alone
        if lora_x is None and self.dropout is not None and self.training and self.scale != 0.0:
            lora_x = self.dropout(x)
        w, A, B, bias = _base_weight(self.base), self.lora_A, self.lora_B, self.base.bias
        # scale 0 is "adapters off" (losses.adapters_disabled): the base, as PEFT's
        # disable_adapter, for DoRA too
        if not self.use_dora or self.scale == 0.0:
            return lora_linear(x, w, A, B, self.scale, bias, lora_x=lora_x)
        g = (self.lora_magnitude / self.weight_norm()).to(x.dtype)  # (out,), grad to m only
        if lora_x is None:
            y = g * lora_linear(x, w, A, B, self.scale, None)
            return y if bias is None else y + bias.to(x.dtype)
        # Dropout (PEFT): the base sees x; the rescaled base and the update see dropout(x).
        # scale 0 makes lora_linear the base matmul alone (NF4 stays on its kernels).
        upd = F.linear(F.linear(lora_x, A.to(x.dtype)), B.to(x.dtype))
        return (lora_linear(x, w, A, B, 0.0, bias)
                + (g - 1) * lora_linear(lora_x, w, A, B, 0.0, None) + (g * self.scale) * upd)

    def _adapted_weight(self) -> torch.Tensor:
        """W + scale * B @ A in fp32, detached (an NF4 base dequantized)."""
        update = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return dense_base_weight(self.base) + self.scale * update

    def merged_weight(self, dtype: torch.dtype | None = None, *,
                      round_update: bool = False) -> torch.Tensor:
        """W + scale * B @ A (DoRA: rescaled rowwise to ``m``), computed in fp32, returned in
        ``dtype`` (default: the base's). ``round_update``: the fp32 update is rounded to ``dtype``
        before it is added, as PEFT's merge of ``target_parameters`` (MoE experts) rounds it."""
        w = _base_weight(self.base)
        dtype = dtype or (w.dtype if isinstance(w, torch.Tensor) else torch.float32)
        if round_update and not self.use_dora:
            update = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
            return (dense_base_weight(self.base) + update.to(dtype).float()).to(dtype)
        merged = self._adapted_weight()
        if self.use_dora:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude.detach().float() / norm)[:, None] * merged
        return merged.to(dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, "
                f"dropout={self.dropout.p if self.dropout is not None else 0.0}"
                + (", dora" if self.use_dora else ""))


# --- target resolution ---------------------------------------------------------------------------

def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear projections and the token embedding (wrapped ones by their wrapper's name), never a
    wrapper's ``.base``."""
    return {n: m for n, m in model.named_modules()
            if n and (_is_linear(m) or isinstance(m, (LoRALinear, LoRAEmbedding, nn.Embedding)))
            and not n.endswith(".base")}


def tied_lm(model: nn.Module) -> bool:
    """A language model whose output head is its embedding (a classifier has no LM head)."""
    return getattr(model, "lm_head", 1) is None and getattr(model, "score", None) is None


def _target_matches(target: str, name: str) -> bool:
    if target == "all-linear":
        return name.split(".")[-1] in _LINEAR_LEAVES
    leaf = SHORT_TARGETS.get(target, target)
    if name == leaf or name.endswith("." + leaf):
        return True
    if fnmatch.fnmatchcase(name, target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full module names selected by ``targets``; errors name the patterns that match nothing."""
    cands = _candidates(model)
    if getattr(model, "score", None) is not None:
        # A classifier's head trains whole with the adapters (PEFT's SEQ_CLS modules_to_save,
        # which PEFT never also targets): patterns pass over it, naming it is an error.
        if "score" in targets:
            raise EmberError("lora.targets: the classifier head 'score' trains whole with the "
                             "adapters (PEFT's modules_to_save) and takes no LoRA; drop it")
        cands.pop("score", None)
    chosen, unmatched = set(), []
    cfg = getattr(model, "cfg", None)
    phi = getattr(cfg, "model_type", None) == "phi"
    if not getattr(cfg, "gated_mlp", True) and {"up", "down"} <= set(targets) and "gate" in targets:
        # the seven short names (the default) mean every projection; a plain MLP has no gate
        warnings.warn("lora.targets: 'gate' skipped, this model's MLP has no gate projection "
                      "(Phi-1/2: fc1 -> fc2 are 'up' / 'down')", stacklevel=3)
        targets = tuple(t for t in targets if t != "gate")
    for t in targets:
        hit = [n for n in cands if _target_matches(PHI_LEAVES.get(t, t) if phi else t, n)]
        if t == "lm_head" and not hit and tied_lm(model) and "embed" in cands:
            hit = ["embed"]  # tied: one adapter on the embedding serves the head too
        if not hit:
            unmatched.append(t)
        chosen.update(hit)
    if unmatched:
        some = ", ".join(sorted(cands)[:8])
        raise EmberError(f"LoRA targets {unmatched} match no linear module; use short names "
                         f"{list(SHORT_TARGETS)}, 'all-linear', or patterns on names like {some}")
    odd = sorted(n for n in chosen if n != "embed" and isinstance(cands[n], nn.Embedding))
    if odd:
        raise EmberError(f"LoRA targets select embeddings {odd}; only the token embedding "
                         "(embed_tokens) takes LoRA")
    return sorted(chosen, key=_natural_key)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


EMBED_HEAD = ("embed", "lm_head")  # Ember's names of the modules of ember.models.lora_embed


def check_embed_head(names, *, use_dora: bool, where: str = "lora",
                     hint: str = "drop them from the targets or turn DoRA off",
                     tied: bool = False) -> None:
    """DoRA on the output head, or on the embedding of a tied model whose head it adapts too
    (``tied``: PEFT's ensure_weight_tying), is refused (PEFT's DoRA there is not in Ember);
    DoRA on the embedding alone is ``LoRAEmbedding``'s."""
    hit = [n for n in names if n == "lm_head" or (n == "embed" and tied)]
    if hit and use_dora:
        raise EmberError(f"{where}: DoRA (use_dora) on {hit} (lm_head, or embed_tokens tied to "
                         f"the head) is not supported; {hint}")


def apply_lora(model: nn.Module, cfg: LoRAConfig, *,
               dense_weights: DenseWeights | None = None
               ) -> nn.Module:
    """Freeze every parameter and wrap the targeted projections in ``LoRALinear`` (the token
    embedding in a ``LoRAEmbedding``; on a tied model it adapts the head too).

    ``dense_weights(keys)``: ``(key, tensor)`` of the full-precision weights ``keys`` an NF4
    model was quantized from (``lambda keys: ember.models.loading.iter_dense_weights(folder,
    keys)``), which PiSSA on an NF4 base (QPiSSA) decomposes; read once, one tensor at a time
    (the whole dense model is never held). ``pissa_niter_K`` draws as on a dense base: module
    by module in the model's order. All or nothing: when it raises (a refusal at a late module,
    a PiSSA failure, an interrupt), the model is as it was (modules, weights, requires_grad)."""
    if lora_modules(model):
        raise EmberError("the model already has LoRA adapters; merge_lora() it first or start "
                         "from a fresh base model")
    names = resolve_targets(model, cfg.targets)
    check_embed_head(names, use_dora=cfg.use_dora, where="lora.targets", tied=tied_lm(model))
    if changes_base(cfg.init):
        check_base_changing(model, cfg.init, names)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    wrapped: list[tuple[str, nn.Module, dict]] = []
    try:
        _apply_lora(model, cfg, names, dense_weights, wrapped)
    except BaseException:
        # a half-wrapped model (its first modules' bases replaced by PiSSA's residual) cannot be
        # retried ("already has LoRA adapters") nor used as the base it was
        for name, base, state in reversed(wrapped):
            base.__dict__.clear()
            base.__dict__.update(state)
            _set_module(model, name, base)
        for p, grad in grads:
            p.requires_grad_(grad)
        raise
    return model


def _module_state(m: nn.Module) -> dict:
    """``m``'s attributes with its own parameter / buffer / submodule tables copied: what
    PiSSA's residual (a new weight Parameter, an NF4 weight set anew) replaces, to put back."""
    return {**m.__dict__, **{k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers",
                                                               "_modules")}}


def _apply_lora(model: nn.Module, cfg: LoRAConfig, names: list[str],
                dense_weights: DenseWeights | None,
                wrapped: list[tuple[str, nn.Module, dict]]) -> None:
    """``apply_lora``'s wrapping; each module replaced is appended to ``wrapped`` (its name,
    the base module and the base's state before) first."""
    for p in model.parameters():
        p.requires_grad_(False)
    pad = getattr(getattr(model, "cfg", None), "padding_idx", None)  # transformers' padding_idx

    def wrap(name: str, dense: torch.Tensor | None = None) -> None:
        base = model.get_submodule(name)
        wrapped.append((name, base, _module_state(base)))
        if name == "embed":
            mod = LoRAEmbedding(base, cfg.rank, cfg.alpha, use_rslora=cfg.use_rslora,
                                dropout=cfg.dropout, ties_head=tied_lm(model), padding_idx=pad,
                                use_dora=cfg.use_dora)
        else:
            mod = LoRALinear(base, cfg.rank, cfg.alpha, dropout=cfg.dropout,
                             use_rslora=cfg.use_rslora, init=cfg.init, use_dora=cfg.use_dora,
                             dense_weight=dense)
        _set_module(model, name, mod)

    qpissa = {f"{n}.weight": n for n in names if cfg.init.startswith("pissa")
              and _loaded_nf4(model.get_submodule(n))}
    # pissa_niter_K draws from the global RNG: the other modules are wrapped in module order (as
    # PEFT and the dense path draw) and the RNG is advanced past each QPiSSA module's draw, whose
    # RNG state is kept for when its dense weight comes in (the checkpoint's order)
    draws = {}
    for name in names:
        if f"{name}.weight" not in qpissa:
            wrap(name)
        elif dense_weights is not None and _NITER.fullmatch(cfg.init):
            q = model.get_submodule(name).quant_weight
            draws[name] = rng_state(q.device)
            skip_lowrank_draw(tuple(q.shape), cfg.rank, q.device)
    if qpissa and dense_weights is not None:
        cuda = {d for n in qpissa.values()
                if (d := model.get_submodule(n).quant_weight.device).type == "cuda"}
        # each module's draw replayed from its kept state; the RNG then left past them all
        with torch.random.fork_rng(devices=sorted(cuda, key=str)):
            # each tensor freed before the next is read; only the decomposed modules' are read
            for key, t in dense_weights(frozenset(qpissa)):
                if key in qpissa:
                    name = qpissa.pop(key)
                    if name in draws:
                        set_rng_state(model.get_submodule(name).quant_weight.device,
                                      draws[name])
                    wrap(name, t)
        if qpissa:
            raise EmberError(f"lora.init {cfg.init!r}: the full-precision weights have no "
                             f"{sorted(qpissa)[:3]}: not the model the NF4 one was quantized "
                             "from")
    for name in qpissa.values():  # no dense weights: LoRALinear refuses, saying what to do
        wrap(name)
    if changes_base(cfg.init):
        # The starting adapters, for the export as a plain LoRA on the original base
        # (ember.models.lora_init), kept in host memory; a model attribute named peft_* travels
        # to an FSDP export.
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)

        model.peft_base_init = {n: (host(m.lora_A), host(m.lora_B))
                                for n, m in lora_modules(model).items()
                                if isinstance(m, LoRALinear)}


def _loaded_nf4(m: nn.Module) -> bool:
    q = getattr(m, "quant_weight", None)
    return q is not None and q.device.type != "meta"


def check_base_changing(model: nn.Module, init: str, names: list[str]) -> None:
    """EmberError for the models and targets a PiSSA / OLoRA init is not built for."""
    from ember.models.peft_moe import EXPERT, ROUTER

    cfg = getattr(model, "cfg", None)
    why = None
    if getattr(cfg, "model_type", None) == "phi3":
        why = ("on Phi-3: PEFT decomposes the fused qkv_proj / gate_up_proj, Ember's projections "
               "are separate, so the starting adapters would differ from PEFT's")
    elif getattr(cfg, "num_experts", 0) and any(EXPERT.fullmatch(n) or ROUTER.fullmatch(n)
                                                for n in names):
        why = ("on the experts and routers: their adapters are PEFT's target_parameters, "
               "decomposed per fused expert tensor there; target the attention only")
    if why is not None:
        raise EmberError(f"lora.init {init!r} is not supported {why} (or use lora.init = "
                         "'kaiming')")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in m.adapter_params().values()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, ember names (``layers.0.attn.q_proj.lora_A``)."""
    return {f"{n}.{k}": p.detach() for n, m in lora_modules(model).items()
            for k, p in m.adapter_params().items()}


def base_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters and with un-wrapped names
    (``layers.0.attn.q_proj.base.weight`` -> ``layers.0.attn.q_proj.weight``); ``keep_vars``:
    the parameters themselves (``state_dict(keep_vars=True)``)."""
    wrapped = tuple(f"{n}." for n in lora_modules(model))
    out = {}
    for k, v in model.state_dict(keep_vars=keep_vars).items():
        pre = next((w for w in wrapped if k.startswith(w)), None)
        if pre is None:
            out[k] = v
        elif k.startswith(pre + "base."):
            out[pre + k[len(pre) + 5:]] = v
    return out


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold ``scale * B @ A`` (DoRA: and the magnitude) into each base weight and put plain
    modules back; biases are unchanged.

    An ``nn.Linear`` base keeps its dtype (unless ``dtype``); an NF4 base is dequantized into a new
    ``nn.Linear`` in ``dtype`` (default fp32). The result has the original state-dict names (plus
    ``lm_head`` on a tied model whose embedding alone was adapted: it is untied).
    """
    mods = lora_modules(model)
    model.__dict__.pop("peft_base_init", None)  # merged: the residual + B A is W + dW
    embed = mods.get("embed")
    if isinstance(embed, LoRAEmbedding) and not embed.ties_head and tied_lm(model):
        # The adapter changes the embedding of a tied model but not its head (PEFT without
        # ensure_weight_tying): the head becomes its own copy of the base matrix, and the model
        # exports untied with the adapted model's logits (PEFT's merge adds the update to the
        # one shared matrix, which changes the head too).
        untie_head(model)
    for name, m in mods.items():
        base = m.base
        if isinstance(m, LoRAEmbedding):
            merged = m.merged_weight(dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)
            _set_module(model, name, base)
            continue
        # a MoE expert's adapter is PEFT's target_parameters (ParamWrapper), whose merge rounds
        # the update to the weight's dtype first
        merged = m.merged_weight(dtype, round_update=".experts." in f".{name}.")
        if isinstance(base, nn.Linear) and merged.dtype == base.weight.dtype:
            with torch.no_grad():
                base.weight.copy_(merged)
            new = base
        else:
            bias = base.bias
            new = nn.Linear(m.in_features, m.out_features, bias=bias is not None,
                            device=merged.device, dtype=merged.dtype)
            with torch.no_grad():
                new.weight.copy_(merged)
                if bias is not None:
                    new.bias.copy_(bias.detach().to(merged.dtype))
            new.requires_grad_(False)
        _set_module(model, name, new)
    return model


# PEFT adapter folders live in ember.models.peft_adapter (imported last: it builds on the above).
from ember.models.peft_adapter import (  # noqa: E402, F401
    HEAD_KEY,
    HEAD_MODULES,
    _read_adapter,
    _write_adapter,
    ember_module_name,
    hf_module_name,
    load_adapter,
    save_adapter,
)
