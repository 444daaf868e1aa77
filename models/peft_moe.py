"""LoRA on mixture-of-experts experts in PEFT 0.21's format, for ``ember.models.peft_adapter``.

transformers 5 holds a sparse layer's experts as two 3-D parameters of ``mlp.experts``:
``gate_up_proj`` (E, 2F, D) (gate rows first) and ``down_proj`` (E, D, F). PEFT adapts them with
``target_parameters`` (``lora.ParamWrapper``): one ``lora_A`` (r * E, in) whose rows
``e * r : (e + 1) * r`` are expert e's A, and one ``lora_B`` (out, r * E) whose column
``j * E + e`` is column j of expert e's B (PEFT reshapes it to (out, r, E)). Two parameters of one
module nest: ``gate_up_proj``'s wrapper is inside (``experts.base_layer.lora_A``), ``down_proj``'s
outside (``experts.lora_A``); alone, either is ``experts.lora_A``.

Ember adapts each expert's ``gate_proj`` and ``up_proj`` separately (two A matrices); PEFT's
``gate_up_proj`` has one A per expert. The export is exact at rank 2r: ``A = [A_gate; A_up]``,
``B = [[B_gate, 0], [0, B_up]]``, alpha chosen so that PEFT's scale equals Ember's
(``rank_pattern`` / ``alpha_pattern`` on the parameter's name). A layer is exported only when
every expert's gate and up (or neither) and every expert's down (or none) carry adapters of one
rank and alpha, without dropout or DoRA (PEFT's ParamWrapper has neither); anything else is
refused. Such an adapter loads back as PEFT reads it: each expert's gate and up then carry the
rank-2r adapter, with the same outputs (``test_expert_lora_exports_to_peft_target_parameters``).

Routers (``mlp.gate``, a 2-D ``weight`` used as ``x W^T``) are target parameters too
(``...mlp.gate.weight``, as PEFT's all-linear makes them on Mixtral): plain LoRA math, loaded
and saved as such; PEFT looks up their rank and alpha by the parameter's name.
"""

from __future__ import annotations

import math
import re

import torch

from ember import EmberError
from ember.models.lora_layer import configured_dropout

EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)")
ROUTER = re.compile(r"layers\.(\d+)\.mlp\.gate")
_SHARED_GATE = re.compile(r"layers\.\d+\.mlp\.shared_expert_gate")


# PEFT 0.21 on transformers 5 rewrites these families' adapter configs as if written for v4: any
# target_modules entry named like an expert projection becomes an expert target_parameter (see
# peft.utils.transformers_weight_conversion); Qwen2-MoE is not rewritten.
_REWRITTEN = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w2", "w3")}


def check_dense_mlps(names, cfg) -> None:
    """Refuse LoRA on a dense MLP of a family whose names PEFT retargets to the experts."""
    leaves = _REWRITTEN.get(getattr(cfg, "model_type", None), ())
    hit = sorted(n for n in names if n.split(".")[-1] in leaves + ("gate_proj", "up_proj",
                                                                    "down_proj")
                 and ".mlp." in n and not EXPERT.fullmatch(n)) if leaves else []
    if hit:
        raise EmberError(f"PEFT export: LoRA on the dense MLP {hit[:3]} of a {cfg.model_type} "
                         "model cannot be written for PEFT 0.21 on transformers 5, which turns "
                         "every gate_proj/up_proj/down_proj target into the experts' parameters; "
                         "drop those targets or merge the adapter (ember export --merged)")


def expert_modules(mods: dict) -> dict:
    """The LoRA modules of ``mods`` (Ember name -> module) that sit on experts."""
    return {n: m for n, m in mods.items() if EXPERT.fullmatch(n)}


def router_modules(mods: dict, cfg) -> dict:
    """The LoRA modules of ``mods`` on a mixture-of-experts model's routers (``mlp.gate``)."""
    if not getattr(cfg, "num_experts", 0):
        return {}
    return {n: m for n, m in mods.items() if ROUTER.fullmatch(n)}


def is_all_linear(targets) -> bool:
    """Whether an adapter config's ``target_modules`` asks for "all-linear" (the string, any
    case, or a list naming it)."""
    return (targets.lower() == "all-linear" if isinstance(targets, str)
            else bool(targets) and "all-linear" in targets)


def is_linear_router(name: str, config: dict, cfg) -> bool:
    """Whether Ember module ``name`` is a router or a shared expert's gate that an ``all-linear``
    adapter targets: PEFT's all-linear takes Qwen2-MoE's ``shared_expert_gate`` (an nn.Linear),
    and on transformers 4 routers were nn.Linear too (PEFT 0.21 still applies such an adapter's
    router weights)."""
    return is_all_linear(config.get("target_modules")) and (
        bool(router_modules({name: None}, cfg)) or bool(_SHARED_GATE.fullmatch(name)))


def router_tensors(routers: dict) -> tuple[dict, list, dict, dict]:
    """(PEFT tensors, target_parameters, rank_pattern, alpha_pattern) of router adapters. A
    transformers 5 router is no ``nn.Linear`` but computes ``x W^T``: PEFT adapts its ``weight``
    as a target parameter (as its all-linear does on Mixtral), the same math as Ember's LoRA on
    it; patterns are keyed by the parameter's name."""
    tensors, targets, ranks, alphas = {}, [], {}, {}
    for n, m in routers.items():
        if m.use_dora or configured_dropout(m):
            raise EmberError(f"PEFT export: LoRA on the router {n} with DoRA or dropout: PEFT's "
                             "LoRA on parameters has neither; turn them off or drop the routers "
                             "from lora.targets")
        hf = f"model.layers.{ROUTER.fullmatch(n)[1]}.mlp.gate"
        tensors[f"base_model.model.{hf}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = m.lora_B.detach()
        targets.append(f"{hf}.weight")
        ranks[re.escape(f"{hf}.weight")], alphas[re.escape(f"{hf}.weight")] = m.rank, m.alpha
    return tensors, targets, ranks, alphas


def _check(group: dict, num_experts: int, what: str) -> tuple[int, float, bool]:
    if len(group) != num_experts:
        raise EmberError(f"PEFT export: {what} has LoRA on {len(group)} of its {num_experts} "
                         "experts; PEFT adapts all experts of a layer or none (target the "
                         "experts of whole layers, e.g. lora.targets=['gate','up','down'])")
    kinds = {(m.rank, m.alpha, m.use_rslora) for m in group.values()}
    if len(kinds) != 1 or any(m.use_dora or configured_dropout(m) for m in group.values()):
        raise EmberError(f"PEFT export: {what}'s experts need one rank and alpha, no DoRA and no "
                         "dropout (PEFT's LoRA on expert parameters has neither)")
    return kinds.pop()


def _stack(As: list, Bs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r * E, in) A and (out, r * E) B from per-expert (r, in) / (out, r) pairs."""
    A = torch.cat(As)
    B = torch.stack(Bs, dim=-1).reshape(Bs[0].shape[0], -1)  # column j * E + e
    return A, B


def expert_tensors(mods: dict, num_experts: int) -> tuple[dict, list, dict, dict]:
    """(PEFT tensors, target_parameters, rank_pattern, alpha_pattern) of the expert adapters in
    ``mods``; the patterns are keyed by the parameter's full name (regex-escaped)."""
    layers: dict[int, dict] = {}
    for n, m in expert_modules(mods).items():
        i, e, proj = EXPERT.fullmatch(n).groups()
        layers.setdefault(int(i), {}).setdefault(proj, {})[int(e)] = m
    tensors, targets, ranks, alphas = {}, [], {}, {}
    for i, projs in sorted(layers.items()):
        prefix = f"model.layers.{i}.mlp.experts"
        if ("gate_proj" in projs) != ("up_proj" in projs):
            raise EmberError(f"PEFT export: layer {i}'s experts have LoRA on "
                             f"{sorted(projs)} only; PEFT's fused gate_up_proj needs gate and up "
                             "both adapted or neither")
        both = "gate_proj" in projs and "down_proj" in projs
        if "gate_proj" in projs:
            r, a, rs = _check({**{(0, e): m for e, m in projs["gate_proj"].items()},
                               **{(1, e): m for e, m in projs["up_proj"].items()}},
                              2 * num_experts, f"layer {i} (gate and up)")
            As, Bs = [], []
            for e in range(num_experts):
                g, u = projs["gate_proj"][e], projs["up_proj"][e]
                As.append(torch.cat([g.lora_A.detach(), u.lora_A.detach()]))
                Bs.append(torch.block_diag(g.lora_B.detach(), u.lora_B.detach()))
            A, B = _stack(As, Bs)
            key = f"{prefix}{'.base_layer' if both else ''}"
            tensors[f"base_model.model.{key}.lora_A.weight"] = A
            tensors[f"base_model.model.{key}.lora_B.weight"] = B
            name = f"{prefix}.gate_up_proj"
            targets.append(name)
            # the same scale at rank 2r: alpha / r == a' / 2r (rsLoRA: / sqrt)
            ranks[re.escape(name)] = 2 * r
            alphas[re.escape(name)] = a * (math.sqrt(2) if rs else 2)
        if "down_proj" in projs:
            r, a, _ = _check(projs["down_proj"], num_experts, f"layer {i} (down)")
            ms = [projs["down_proj"][e] for e in range(num_experts)]
            A, B = _stack([m.lora_A.detach() for m in ms], [m.lora_B.detach() for m in ms])
            tensors[f"base_model.model.{prefix}.lora_A.weight"] = A
            tensors[f"base_model.model.{prefix}.lora_B.weight"] = B
            name = f"{prefix}.down_proj"
            targets.append(name)
            ranks[re.escape(name)], alphas[re.escape(name)] = r, a
    return tensors, targets, ranks, alphas


_PARAM_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)?)"
                        r"\.(lora_A|lora_B)(?:\.default)?\.weight")
_LORA_A = re.compile(r"base_model\.model\.(.+)\.lora_A(?:\.default)?\.weight")
_PARAMS = ("gate_up_proj", "down_proj")  # registration order: the first targeted is innermost


def _pattern(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key rule
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _block_diagonal(Bs: torch.Tensor, half: int) -> bool:
    """Whether every expert's fused gate_up ``B`` (rows: gate then up; columns: rank, (2F, r, E))
    is block diagonal, gate's rows on the first r/2 columns and up's on the others: the
    adapter ``save_adapter`` writes for separate gate and up adapters of rank r/2. Such an
    adapter loads back as those two (the same update; continued, it trains as it did in
    Ember). An all-zero B (a fresh PEFT adapter) stays one rank-r adapter shared by both, as
    PEFT trains it."""
    r = Bs.shape[1]
    if r % 2 or not Bs.any():
        return False
    return not (Bs[:half, r // 2:].any() or Bs[half:, :r // 2].any())


def split_expert_adapter(tensors: dict, config: dict, cfg) -> tuple[dict, dict]:
    """A PEFT adapter with ``target_parameters`` on the experts -> the same adapter with one
    LoRA pair per expert projection (keys ``...mlp.experts.E.gate_proj.lora_A.weight``), ranks
    and alphas in ``rank_pattern`` / ``alpha_pattern``: exact (expert e's gate and up share
    PEFT's A and split its B rows; a block-diagonal B, as ``save_adapter`` writes, splits into
    gate's and up's own halves of A and B at half the rank)."""
    targets = list(config.get("target_parameters") or [])
    num_experts = getattr(cfg, "num_experts", 0)
    out, found = {}, {}
    for k, v in tensors.items():
        m = _PARAM_KEY.fullmatch(k)
        if m:
            found[(int(m[1]), bool(m[2]), m[3])] = v
        else:
            out[k] = v
    plain = list(out)  # the keys not split below: the only ones other targets can name
    ranks, alphas = {}, {}  # the split experts' own entries, ahead of the config's (first wins)
    if found and not num_experts:
        raise EmberError(f"the adapter targets parameters {targets[:3]} (LoRA on mixture-of-"
                         "experts experts) but the model has no experts")
    # a block-diagonal gate_up adapter splits at half the rank, with the same scale
    half_alpha = math.sqrt(2) if config.get("use_rslora") else 2
    for i in sorted({i for i, _, _ in found}):
        prefix = f"model.layers.{i}.mlp.experts"
        escaped = re.escape(prefix)  # + rf"\.{e}\.{proj}" is re.escape of the expert's name
        params = [p for p in _PARAMS
                  if any(f"{prefix}.{p}" == t or f"{prefix}.{p}".endswith("." + t)
                         for t in targets)]
        if not params:
            raise EmberError(f"adapter: LoRA weights on layer {i}'s experts but target_parameters "
                             f"{targets!r} name none of {_PARAMS}")
        for p in params:
            inner = len(params) == 2 and p == params[0]
            A, B = found.get((i, inner, "lora_A")), found.get((i, inner, "lora_B"))
            if A is None or B is None or A.shape[0] % num_experts:
                raise EmberError(f"adapter: {prefix}.{p}: lora_A / lora_B missing or not "
                                 f"stacked over {num_experts} experts")
            name = f"{prefix}.{p}"
            r = A.shape[0] // num_experts
            if r != _pattern(config.get("rank_pattern"), name, config["r"]):
                raise EmberError(f"adapter: {name}: rank {r} from lora_A disagrees with "
                                 "adapter_config r / rank_pattern")
            alpha = _pattern(config.get("alpha_pattern"), name, config["lora_alpha"])
            Bs = B.reshape(B.shape[0], r, num_experts)  # column j * E + e
            half = B.shape[0] // 2
            split = p == "gate_up_proj" and _block_diagonal(Bs, half)
            # the two rank-r/2 adapters save_adapter fused: exactly them again
            re_, alpha_ = (r // 2, alpha / half_alpha) if split else (r, alpha)
            for e in range(num_experts):
                Ae, Be = A[e * r:(e + 1) * r], Bs[:, :, e]
                if split:
                    parts = {"gate_proj": (Ae[:re_], Be[:half, :re_]),
                             "up_proj": (Ae[re_:], Be[half:, re_:])}
                elif p == "gate_up_proj":
                    parts = {"gate_proj": (Ae, Be[:half]), "up_proj": (Ae, Be[half:])}
                else:
                    parts = {"down_proj": (Ae, Be)}
                for proj, (a, b) in parts.items():
                    hf = f"{prefix}.{e}.{proj}"
                    out[f"base_model.model.{hf}.lora_A.weight"] = a.contiguous()
                    out[f"base_model.model.{hf}.lora_B.weight"] = b.contiguous()
                    key = rf"{escaped}\.{e}\.{proj}"
                    ranks[key], alphas[key] = re_, alpha_
    # Other targeted parameters (a router's "gate.weight", a dense model's "q_proj.weight": LoRA
    # on a 2-D weight, as on a linear module): PEFT looks their rank and alpha up by the
    # parameter's name, not the module's. (Not the split experts' keys: their ranks are A's.)
    for key in plain:
        m = _LORA_A.fullmatch(key)
        param = f"{m[1]}.weight" if m else None
        if param and any(param == t or param.endswith("." + t) for t in targets):
            ranks[re.escape(m[1])] = _pattern(config.get("rank_pattern"), param, config["r"])
            alphas[re.escape(m[1])] = _pattern(config.get("alpha_pattern"), param,
                                               config["lora_alpha"])
    # PEFT's lookup takes the first pattern that matches: a config pattern meant for another module
    # (Qwen2-MoE's shared_expert.gate_proj: "gate_proj") must not reach the split experts
    ranks.update({k: v for k, v in (config.get("rank_pattern") or {}).items() if k not in ranks})
    alphas.update({k: v for k, v in (config.get("alpha_pattern") or {}).items()
                   if k not in alphas})
    config = {**config, "target_parameters": None, "rank_pattern": ranks, "alpha_pattern": alphas}
    return out, config
