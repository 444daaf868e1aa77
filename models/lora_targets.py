"""LoRA's configuration and target resolution: ``LoRAConfig``, the target names it takes
(short, transformers leaf, "all-linear", patterns) and ``resolve_targets``, which turns them into
the model's module names (``ember.models.lora.apply_lora`` wraps those)."""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass

import torch.nn as nn

from ember import EmberError
from ember.models.hf_phi import EMBER_LEAVES as PHI_LEAVES
from ember.models.hf_starcoder2 import EMBER_LEAVES as STARCODER2_LEAVES
from ember.models.lora_embed import LoRAEmbedding
from ember.models.lora_init import check_init
from ember.models.lora_layer import LoRALinear, _is_linear

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# short and transformers names -> Ember module names (PEFT's "embed_tokens" is Ember's "embed")
SHORT_TARGETS = {**dict(zip(ALL_LINEAR, _LINEAR_LEAVES, strict=True)),
                 "embed_tokens": "embed", "lm_head": "lm_head"}
# transformers' leaf names of the linears "all-linear" selects (Phi-1/2: dense, fc1, fc2)
HF_LINEAR_LEAVES = (*_LINEAR_LEAVES, *PHI_LEAVES, *STARCODER2_LEAVES)
# transformers' names -> ours, per family
_OWN_LEAVES = {"phi": PHI_LEAVES, "starcoder2": STARCODER2_LEAVES}


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
    use_dora: bool = False  # DoRA: a trained magnitude per output row (see ember.models.lora_layer)
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
    own = _OWN_LEAVES.get(getattr(cfg, "model_type", None), {})
    if not getattr(cfg, "gated_mlp", True) and {"up", "down"} <= set(targets) and "gate" in targets:
        # the seven short names (the default) mean every projection; a plain MLP has no gate
        names = {"phi": "Phi-1/2: fc1 -> fc2", "starcoder2": "StarCoder2: c_fc -> c_proj"}
        which = names.get(getattr(cfg, "model_type", None), "up_proj -> down_proj")
        warnings.warn("lora.targets: 'gate' skipped, this model's MLP has no gate projection "
                      f"({which} are 'up' / 'down')", stacklevel=3)
        targets = tuple(t for t in targets if t != "gate")
    for t in targets:
        hit = [n for n in cands if _target_matches(own.get(t, t), n)]
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
