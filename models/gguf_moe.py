"""Mixture-of-experts GGUF files (``ember.models.gguf``): Mixtral (``llama`` with
``llama.expert_count``), ``qwen2moe`` and ``qwen3moe``, as llama.cpp's ``convert_hf_to_gguf.py``
writes them and its runtime reads them.

Tensors per layer: ``ffn_gate_inp`` (the router, (E, D)), ``ffn_gate_exps`` / ``ffn_up_exps``
(E, F, D) and ``ffn_down_exps`` (E, D, F), the experts stacked in expert order (split here into
Ember's per-expert MLPs; Mixtral files from before April 2024 hold one ``ffn_gate.E`` /
``ffn_up.E`` / ``ffn_down.E`` tensor per expert instead, which llama.cpp's loader merged and
llama.cpp-derived loaders still merge; read here the same way); Qwen2-MoE's
shared expert ``ffn_{gate,up,down}_shexp`` and its gate
``ffn_gate_inp_shexp`` ((D,) or (1, D)). Metadata: ``expert_count``, ``expert_used_count``,
``expert_feed_forward_length`` (Qwen; Mixtral's experts are ``feed_forward_length`` wide),
``expert_shared_feed_forward_length`` (absent: llama.cpp's fallbacks, experts ``n_ff /
expert_used_count`` wide on qwen2moe / qwen3moe, the shared expert ``n_ff``; a qwen2moe file always
has a shared expert). llama.cpp renormalizes the top-k weights for Mixtral and
Qwen3-MoE and not for Qwen2-MoE unless ``expert_weights_norm`` says otherwise; every layer is
sparse (a layer without ``ffn_gate_inp`` is refused by the shape check). Expert gating functions
other than softmax (``expert_gating_func``) and expert groups are refused.

Export writes the same (per-expert MLPs stacked, the shared expert gate as a vector, router and
shared gate always F32) and refuses what these files cannot say: dense layers among sparse ones,
a qwen2moe without a shared expert, and a top-k renormalization other than llama.cpp's for the
architecture (the converter writes no ``expert_weights_norm`` for them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from ember import EmberError

# GGUF arch -> (model_type with experts, llama.cpp's default top-k renormalization)
MOE_MODEL_TYPES = {"llama": ("mixtral", True), "qwen2moe": ("qwen2_moe", False),
                   "qwen3moe": ("qwen3_moe", True)}
BLOCK_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",  # stacked: split in expert_tensors
    "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}


# Mixtral files converted before April 2024 store each expert's projection alone
# (``blk.N.ffn_gate.E.weight``, llama.cpp's LLM_TENSOR_FFN_GATE_EXP, still loaded there)
_SPLIT_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
_PER_EXPERT = re.compile(r"layers\.\d+\.mlp\.experts\.\d+\.(?:gate|up|down)_proj\.weight")


def split_expert_name(gguf_name: str) -> str | None:
    """``blk.3.ffn_up.5.weight`` -> ``layers.3.mlp.experts.5.up_proj.weight``; None otherwise."""
    m = _SPLIT_EXPERT.fullmatch(gguf_name)
    return None if m is None else f"layers.{m[1]}.mlp.experts.{m[3]}.{m[2]}_proj.weight"


def moe_fields(arch: str, get: Callable, path) -> dict:
    """ModelConfig MoE fields of a file with ``<arch>.expert_count``."""
    if arch not in MOE_MODEL_TYPES:
        raise EmberError(f"{path}: mixture-of-experts GGUF of architecture {arch!r} is not "
                         f"supported (supported: {sorted(MOE_MODEL_TYPES)})")
    gating = get("expert_gating_func")
    if gating not in (None, 1):  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise EmberError(f"{path}: {arch}.expert_gating_func={gating} is not supported (softmax "
                         "routing only)")
    if get("expert_group_count") or get("expert_shared_count", 0) > 1:
        raise EmberError(f"{path}: expert groups / several shared experts are not supported")
    model_type, norm = MOE_MODEL_TYPES[arch]
    ff, used = int(get("feed_forward_length", required=True)), int(get("expert_used_count",
                                                                       required=True))
    if used < 1:
        raise EmberError(f"{path}: {arch}.expert_used_count must be at least 1, got {used}")
    # llama.cpp's widths when a key is absent (Qwen1.5-MoE files converted before the keys
    # existed): experts n_ff / n_expert_used on qwen2moe / qwen3moe (n_ff on llama), the shared
    # expert n_ff
    experts = int(get("expert_feed_forward_length") or (ff if arch == "llama" else ff // used))
    shared = int(get("expert_shared_feed_forward_length") or ff)
    return dict(
        model_type=model_type, num_experts=int(get("expert_count")),
        num_experts_per_tok=used, moe_intermediate_size=experts,
        norm_topk_prob=bool(get("expert_weights_norm", norm)),
        shared_expert_intermediate_size=shared if arch == "qwen2moe" else 0,
    )


def expert_tensors(key: str, w: torch.Tensor, num_experts: int
                   ) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Per-expert (Ember key, tensor) pairs of a stacked expert tensor, the shared expert gate as
    (1, D); None for other tensors."""
    if key.endswith("mlp.shared_expert_gate.weight"):
        return iter([(key, w.reshape(1, -1))])
    if ".mlp.experts." not in key:
        return None
    if w.ndim == 2 and _PER_EXPERT.fullmatch(key):  # an old Mixtral file's per-expert tensor
        return iter([(key, w)])
    if w.ndim != 3 or w.shape[0] != num_experts:
        raise EmberError(f"stacked expert tensor for {key} has shape {tuple(w.shape)}, expected "
                         f"({num_experts}, rows, cols)")
    head, proj = key.rsplit(".experts.", 1)
    return ((f"{head}.experts.{e}.{proj}", w[e]) for e in range(num_experts))


# ------------------------------------------------------------------------------------------
# Export (ember.models.gguf_export), as convert_hf_to_gguf.py's MixtralModel (LlamaModel) and
# Qwen2MoeModel / Qwen3MoeModel write them

EXPORT_ARCH = {model_type: arch for arch, (model_type, _) in MOE_MODEL_TYPES.items()}
# tensors the converter always writes as F32 and llama-quantize never quantizes: the router, and
# the shared expert gate ((1, D) in HF, a vector to ggml)
F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
_STACKED = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def check_exportable(cfg, arch: str) -> None:
    """EmberError for a mixture-of-experts config a GGUF file of ``arch`` cannot express."""
    dense = [i for i in range(cfg.num_layers) if not cfg.is_sparse(i)]
    if dense:
        raise EmberError(f"save_gguf: this mixture-of-experts model has dense MLP layers {dense} "
                         f"(decoder_sparse_step / mlp_only_layers); llama.cpp's {arch} makes "
                         "every layer sparse. Export an HF folder instead (ember export --merged)")
    if arch == "qwen2moe" and not cfg.shared_expert_intermediate_size:
        raise EmberError("save_gguf: this Qwen2-MoE model has no shared expert "
                         "(shared_expert_intermediate_size=0); llama.cpp's qwen2moe requires one "
                         "(without expert_shared_feed_forward_length it reads one feed_forward_"
                         "length wide). Export an HF folder instead (ember export --merged)")
    if cfg.norm_topk_prob != MOE_MODEL_TYPES[arch][1]:
        raise EmberError(f"save_gguf: this mixture-of-experts model has norm_topk_prob="
                         f"{cfg.norm_topk_prob}, but llama.cpp's {arch} always uses "
                         f"{MOE_MODEL_TYPES[arch][1]} (its converter writes no "
                         "expert_weights_norm for it). Export an HF folder instead "
                         "(ember export --merged)")


def moe_metadata(cfg, arch: str) -> dict:
    """``<arch>.*`` expert keys (without the prefix) as the converter writes them."""
    md = {"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok}
    if arch != "llama":  # Mixtral's experts are feed_forward_length wide
        md["expert_feed_forward_length"] = cfg.moe_intermediate_size
    if arch == "qwen2moe" and cfg.shared_expert_intermediate_size:
        md["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    return md


def stack_expert(parts: dict, key: str, w: torch.Tensor, num_experts: int
                 ) -> tuple[str, torch.Tensor] | None:
    """Collect Ember's per-expert weight ``layers.N.mlp.experts.E.P.weight`` in ``parts``; once
    all ``num_experts`` of ``blk.N.ffn_{gate,up,down}_exps.weight`` are there, return it stacked
    in expert order ((E, rows, cols)), as the converter's torch.stack."""
    bits = key.split(".")
    name = f"blk.{bits[1]}.{_STACKED[bits[5]]}.weight"
    parts.setdefault(name, {})[int(bits[4])] = w
    if len(parts[name]) < num_experts:
        return None
    got = parts.pop(name)
    return name, torch.stack([got[e] for e in range(num_experts)])
