"""Config fuzz against transformers: random valid tiny configs of every family Ember loads, each
saved by transformers and checked against its eager fp32 model (the oracle).

Per case (a family and a seed; the same pair always draws the same config and weights):
logits at T = 1, 7, 13 (past the sliding windows of 5), KV-cache decode against transformers'
incremental forward, the next-token loss and every weight's gradient, a left- and right-padded
batch (attention_mask, positions counted from each row's first real token), Ember's export
reloaded by transformers (same logits) and its config read back (the fields the original
set, as effective values), then LoRA with random B on every linear layer: its PEFT adapter
loaded by PEFT on transformers' model and its merged export (``ember export --merged``)
reloaded by transformers, both with Ember's logits. About 40% of the folders are rewritten in
the transformers 4.x config.json style (``rope_theta`` / ``rope_scaling`` with either key,
``torch_dtype``; half the Gemma 2 / 3 ones whose layer_types follow a period: none, or
``sliding_window_pattern``). ``--extra gguf,qlora`` adds the checks of ``config_fuzz_extra.py``
(the GGUF export read back, NF4 + LoRA against bitsandbytes' dequantized weights).

Tolerance: 1e-4 relative to the largest magnitude compared (absolute below 1). A logits or
gradient mismatch past it is rechecked against transformers run in fp64: a finding only where
Ember's error is over twice transformers' own fp32 error (large heads and deep stacks round
more in both: a Gemma 3 with head_dim 120 had transformers' k_proj gradient 2.5e-4 off fp64,
Ember's 7.6e-5).

One line per case: ``OK``, ``FAIL`` (with the mismatches), ``REFUSED`` (an EmberError: check
that the message is right and transformers' checkpoints of the family do not set the field) or
``HF_REJECTS`` (transformers itself cannot build or run the config: not a finding). Exit status 1
if any case failed.

    python tools/config_fuzz.py --families llama,gemma3_text --seeds 0:20
    EMBER_KERNELS=triton TRITON_INTERPRET=1 python tools/config_fuzz.py --families qwen3 --seeds 3:4

transformers' dynamic RoPE keeps state between calls (it rescales once a longer input was seen);
each compared forward starts from a fresh table, as a single call of a new model does.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from config_fuzz_draw import _LAYER_KINDS, CLASSES, draw  # (this folder)
from config_fuzz_extra import EXTRAS, gguf_check, lora_saved, qlora_check

from ember import EmberError
from ember.models.hf import from_hf_state_dict
from ember.models.hf_rope import longrope_attention_factor, yarn_mscale
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import merge_lora
from ember.models.transformer import KVCache

ATOL = 1e-4


def _tol(ref: torch.Tensor) -> float:
    """The tolerance of a comparison with transformers' fp32 ``ref``: ATOL relative to its
    largest magnitude (fp32 rounding grows with it), absolute below 1."""
    return ATOL * max(1.0, ref.abs().max().item())


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.1 * noise)


def _to_4x_style_(path: Path, r: random.Random) -> None:
    """config.json as transformers 4.x wrote it."""
    raw = json.loads(path.read_text())
    rp = raw.pop("rope_parameters", None)
    if raw["model_type"] == "olmo3" and isinstance(rp, dict) and "full_attention" in rp:
        # 4.x-style rope_theta / rope_scaling reach OLMo 3's full-attention layers only, the
        # sliding ones keep base 500000: that form exists only for such a sliding table
        if rp["sliding_attention"] == {"rope_type": "default", "rope_theta": 500000.0}:
            rp = rp["full_attention"]
        else:
            raw["rope_parameters"], rp = rp, None
    if isinstance(rp, dict) and "full_attention" in rp:  # Gemma 3
        raw["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        rp = rp["full_attention"]
    if isinstance(rp, dict):
        rp = dict(rp)
        raw["rope_theta"] = rp.pop("rope_theta")
        if "partial_rotary_factor" in rp:
            raw["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
        if rp.get("rope_type") != "default":
            if r.random() < 0.5:
                rp["type"] = rp.pop("rope_type")
            raw["rope_scaling"] = rp
    if "dtype" in raw:
        raw["torch_dtype"] = raw.pop("dtype")
    types, n = raw.get("layer_types"), raw["num_hidden_layers"]
    if raw["model_type"] in ("gemma2", "gemma3_text") and types and r.random() < 0.5:
        # the Hub's Gemma 2 / early Gemma 3 configs: no layer_types, every P-th layer global
        for p in (2, 3, 4, 6) if raw["model_type"] == "gemma3_text" else (2,):
            if types == [
                "sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)
            ]:
                del raw["layer_types"]
                if raw["model_type"] == "gemma3_text":
                    raw["sliding_window_pattern"] = p
                break
    raw["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(raw, indent=2))


def _fresh(hf: torch.nn.Module) -> torch.nn.Module:
    """Reset transformers' dynamic-RoPE state (see the module docstring)."""
    for m in hf.modules():
        if hasattr(m, "original_inv_freq") and hasattr(m, "max_seq_len_cached"):
            m.register_buffer("inv_freq", m.original_inv_freq.clone(), persistent=False)
            m.max_seq_len_cached = m.original_max_seq_len
        for kind in _LAYER_KINDS:  # Gemma 3: a table per layer kind
            if hasattr(m, f"{kind}_original_inv_freq"):
                orig = getattr(m, f"{kind}_original_inv_freq")
                m.register_buffer(f"{kind}_inv_freq", orig.clone(), persistent=False)
                setattr(m, f"{kind}_max_seq_len_cached", m.original_max_seq_len)
    return hf


def _rounding(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, tol: float) -> str:
    """The empty string where Ember's fp32 ``ours`` is as close to transformers' fp64 ``exact``
    as its fp32 ``ref`` is (within 2x, plus a tenth of ``tol``: flash-attention's rule), else a
    note of both errors. transformers' own fp32 rounding grows with the head size and the depth:
    a mismatch with it is a finding only where Ember is the one off."""
    ours_err = (ours.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    if ours_err <= 2 * ref_err + 0.1 * tol:
        return ""
    return f" (vs transformers fp64: ours {ours_err:.3g}, transformers fp32 {ref_err:.3g})"


def _hf_load(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def _grads(hf: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """transformers' gradients under Ember's names."""
    grads = {
        n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hf.named_parameters()
    }
    if cfg.tie_word_embeddings:
        grads.pop("lm_head.weight", None)
    return from_hf_state_dict(grads, cfg)


def _compare(model, hf, V: int, g: torch.Generator, probs: list[str]) -> None:
    for T in (1, 7, 13):
        ids = torch.randint(0, V, (2, T), generator=g)
        with torch.no_grad():
            ref, ours = _fresh(hf)(ids).logits, model(ids)
            d = (ours - ref).abs().max().item()
        if not d <= _tol(ref):
            with torch.no_grad():
                exact = _fresh(copy.deepcopy(hf).double())(ids).logits
            if note := _rounding(ours, ref, exact, _tol(ref)):
                probs.append(f"logits T={T}: {d:.3g}{note}")
    ids = torch.randint(0, V, (2, 13), generator=g)
    cache = KVCache(model.cfg, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        ours = [model(ids[:, :4], cache=cache)]
        out = _fresh(hf)(ids[:, :4], use_cache=True)
        theirs, pkv = [out.logits], out.past_key_values
        for t in range(4, 13):
            ours.append(model(ids[:, t : t + 1], cache=cache))
            out = hf(ids[:, t : t + 1], past_key_values=pkv, use_cache=True)
            theirs.append(out.logits)
            pkv = out.past_key_values
    d = (torch.cat(ours, 1) - torch.cat(theirs, 1)).abs().max().item()
    if not d <= _tol(torch.cat(theirs, 1)):
        probs.append(f"KV-cache decode: {d:.3g}")
    ids = torch.randint(0, V, (2, 11), generator=g)
    hf.zero_grad()
    model.zero_grad()
    lh, le = _loss(_fresh(hf)(ids).logits, ids), _loss(model(ids), ids)
    lh.backward()
    le.backward()
    if not abs(lh.item() - le.item()) <= _tol(lh):
        probs.append(f"loss {le.item():.6g} vs {lh.item():.6g}")
    theirs = _grads(hf, model.cfg)
    exact = None
    for n, p in model.named_parameters():
        ours = p.grad if p.grad is not None else torch.zeros_like(p)
        d = (ours - theirs[n]).abs().max().item()
        if d <= _tol(theirs[n]):
            continue
        if exact is None:  # transformers' gradients in fp64, once
            h64 = copy.deepcopy(hf).double()
            h64.zero_grad()
            _loss(_fresh(h64)(ids).logits, ids).backward()
            exact = _grads(h64, model.cfg)
        if note := _rounding(ours, theirs[n], exact[n], _tol(theirs[n])):
            probs.append(f"grad {n}: {d:.3g}{note}")
    ids = torch.randint(0, V, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, position_ids=pos, key_mask=mask.bool())
        theirs = _fresh(hf)(ids, attention_mask=mask, position_ids=pos).logits
    d = (ours - theirs)[mask.bool()].abs().max().item()
    if not d <= _tol(theirs[mask.bool()]):
        probs.append(f"padded batch: {d:.3g}")


def _lora_exports(model, hf, folder: Path, ids: torch.Tensor, seed: int, probs: list[str]) -> None:
    """LoRA (random B) on every linear layer: the PEFT adapter Ember writes, loaded by PEFT on
    transformers' model, gives Ember's logits; so does the merged export (``ember export
    --merged``) reloaded by transformers."""
    import peft

    adapter = folder.with_name(folder.name + "-adapter")
    ours, saved = lora_saved(model, ids, seed, adapter)
    if saved:
        with torch.no_grad():
            theirs = _fresh(peft.PeftModel.from_pretrained(hf, adapter).eval())(ids).logits
        d = (ours - theirs).abs().max().item()
        if not d <= _tol(theirs):
            probs.append(f"LoRA adapter in PEFT: {d:.3g}")
    merge_lora(model)
    save_pretrained(model, folder.with_name(folder.name + "-merged"))
    with torch.no_grad():
        theirs = _fresh(_hf_load(folder.with_name(folder.name + "-merged")))(ids).logits
        d = (ours - theirs).abs().max().item()
    if not d <= _tol(theirs):
        probs.append(f"merged export in transformers: {d:.3g}")


_ALIASES = {  # transformers' names of one function (ember.models.activations)
    "swish": "silu",
    "gelu_new": "gelu_pytorch_tanh",
    "gelu_fast": "gelu_pytorch_tanh",
    "gelu_accurate": "gelu_pytorch_tanh",
    "gelu_python_tanh": "gelu_pytorch_tanh",
    "gelu_python": "gelu",
}


def _effective(c: dict, fam: str, windowed: bool) -> dict:
    """A config dict without the differences that change nothing (aliases, ignored fields)."""
    c = {
        k: v
        for k, v in c.items()
        if k
        not in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
    }
    for key in ("hidden_act", "hidden_activation"):
        if c.get(key) in _ALIASES:
            c[key] = _ALIASES[c[key]]
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        rp = c["rope_parameters"] = dict(rp)
        nested = [k for k in _LAYER_KINDS if isinstance(rp.get(k), dict)]
        for k in nested:
            rp[k] = dict(rp[k])
        for d in [rp[k] for k in nested] or [rp]:
            d.pop("type", None)  # read only where rope_type is unset (standardized by now)
            if d.get("rope_type") == "default":
                # the default RoPE reads rope_theta (phi/phi3: and the factor) only; Gemma 3 keeps
                # a legacy {"type": "linear", "factor": 8} there, unread
                keep = ("rope_type", "rope_theta") + (
                    ("partial_rotary_factor",) if fam in ("phi", "phi3") else ()
                )
                for key in [key for key in d if key not in keep]:
                    d.pop(key)
            if fam == "gemma3_text":
                d.pop("partial_rotary_factor", None)  # never applied (or refused: hf_gemma)
            if d.get("rope_type") == "longrope":  # the derived values when left out
                orig = d.get("original_max_position_embeddings") or c.get(
                    "original_max_position_embeddings", c["max_position_embeddings"]
                )
                d.setdefault("factor", c["max_position_embeddings"] / orig)
                d.setdefault("attention_factor", longrope_attention_factor(d["factor"], orig))
            if d.get("rope_type") == "yarn":  # transformers' _compute_yarn_parameters defaults
                d.update(beta_fast=d.get("beta_fast") or 32.0, beta_slow=d.get("beta_slow") or 1.0)
                d.setdefault("truncate", True)
                if fam in ("gemma3_text", "olmo3"):  # read beside the per-type dicts: true
                    d["truncate"] = True
                ms, ms_all = d.pop("mscale", None), d.pop("mscale_all_dim", None)
                if d.get("attention_factor") is None:
                    d["attention_factor"] = (
                        yarn_mscale(d["factor"], ms) / yarn_mscale(d["factor"], ms_all)
                        if ms and ms_all
                        else yarn_mscale(d["factor"])
                    )
    if fam == "phi3" and (rp or {}).get("rope_type") != "longrope":
        c.pop("original_max_position_embeddings", None)
    if not windowed or not c.get("use_sliding_window", True):
        for k in ("sliding_window", "use_sliding_window", "max_window_layers"):
            c.pop(k, None)
    if fam not in ("phi3", "phi"):
        c.pop("partial_rotary_factor", None)  # ignored there (or refused with scaled RoPE)
    if c.get("partial_rotary_factor") == 1.0:
        c.pop("partial_rotary_factor")  # the default
    if c.get("head_dim") == c["hidden_size"] // c["num_attention_heads"]:
        c.pop("head_dim")  # the default (PhiConfig has no such field: written when it differs)
    for k in ("head_dim", "router_jitter_noise", "partial_rotary_factor"):
        if c.get(k) is None:
            c.pop(k, None)
    if fam in ("gemma2", "gemma3_text"):
        c.pop("hidden_act", None)  # Gemma 2/3 compute hidden_activation
    if fam == "gemma":
        c.pop("hidden_activation", None)  # 4.x's field: transformers 5 computes hidden_act
    if fam == "gemma3_text":
        c.pop("attn_logit_softcapping", None)  # read and never applied by transformers' Gemma 3
        if "full_attention" not in (c.get("layer_types") or ["full_attention"]):
            full = rp["full_attention"]  # a table transformers never builds
            rp["full_attention"] = {"rope_type": "default", "rope_theta": full["rope_theta"]}
        if "sliding_attention" not in (c.get("layer_types") or ["sliding_attention"]):
            local = rp["sliding_attention"]  # nor this one (Ember drops its unused scaling)
            rp["sliding_attention"] = {"rope_type": "default", "rope_theta": local["rope_theta"]}
    if fam == "olmo3":  # a table no layer uses is written as the other one
        used = set(c["layer_types"])
        if len(used) == 1:
            (kind,) = used
            rp[_LAYER_KINDS[kind == "sliding_attention"]] = rp[kind]
    if c.get("layer_types") is not None:
        c.pop("max_window_layers", None)  # transformers ignores it when layer_types is given
    # only builds no_rope_layers (which to_dict holds) when that is unset
    c.pop("no_rope_layer_interval", None)
    c.pop("output_router_logits", None)  # Ember's exports write false: see README (MoE)
    c.pop("sliding_window_pattern", None)  # 4.x's: only builds layer_types (compared)
    return c


def _covers(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_covers(v, b.get(k)) for k, v in a.items())
    return a == b


def run_case(
    fam: str, seed: int, tmp: Path, extras: tuple[str, ...] = ()
) -> tuple[str, dict, list[str]]:
    r = random.Random(f"{fam}-{seed}")
    kw = draw(fam, r)
    try:
        config = getattr(transformers, CLASSES[fam])(**kw)
        hf = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", experts_implementation="eager"
        ).float()
    except Exception as e:  # noqa: BLE001 - any failure of transformers' own is reported
        return "HF_REJECTS", kw, [repr(e)[:200]]
    _randomize_(hf, seed)
    if kw.get("dtype") in ("bfloat16", "float16") and r.random() < 0.5:
        hf = hf.to(getattr(torch, kw["dtype"]))  # stored in the config's dtype
    folder = tmp / f"{fam}-{seed}"
    hf.save_pretrained(folder)
    if r.random() < 0.4:
        _to_4x_style_(folder / "config.json", r)
    try:
        hf = _hf_load(folder)
        hf(torch.zeros(1, 13, dtype=torch.long))
    except Exception as e:  # noqa: BLE001
        return "HF_REJECTS", kw, [repr(e)[:200]]
    try:
        model, _ = load_pretrained(folder, dtype=torch.float32)
    except EmberError as e:
        return "REFUSED", kw, [str(e).split("config.json: ")[-1][:300]]
    probs: list[str] = []
    notes: list[str] = []  # what passed with a remark (an export refused...)
    try:
        _compare(model, hf, kw["vocab_size"], torch.Generator().manual_seed(seed), probs)
        export = tmp / f"{fam}-{seed}-export"
        save_pretrained(model, export)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, kw["vocab_size"], (2, 13), generator=g)
        with torch.no_grad():
            ref = _fresh(hf)(ids).logits
            d = (_fresh(_hf_load(export))(ids).logits - ref).abs().max()
        if not d.item() <= _tol(ref):
            probs.append(f"export's logits in transformers: {d.item():.3g}")
        if "gguf" in extras:
            gguf_check(
                model,
                lambda x: _fresh(hf)(x).logits,
                ids,
                tmp / f"{fam}-{seed}.gguf",
                _tol,
                probs,
                notes,
            )
        _lora_exports(model, hf, export, ids, seed, probs)
        windowed = model.cfg.sliding_window is not None
        c1, c2 = (
            _effective(transformers.AutoConfig.from_pretrained(f).to_dict(), fam, windowed)
            for f in (folder, export)
        )
        diff = {k: (c1.get(k), c2.get(k)) for k in c1 if not _covers(c1[k], c2.get(k))}
        if diff:
            probs.append(f"config read back differs: {diff}")
        if "qlora" in extras:
            qlora_check(folder, _fresh(_hf_load(folder)), ids, seed, _tol, probs, notes)
    except Exception:  # noqa: BLE001 - a traceback is a finding
        probs.append("CRASH " + traceback.format_exc()[-1500:])
    return ("FAIL" if probs else "OK"), kw, probs + notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--families", default=",".join(CLASSES), help="comma-separated model_types (default: all)"
    )
    ap.add_argument("--seeds", default="0:5", help="a range start:stop (default 0:5)")
    ap.add_argument(
        "--extra",
        default="",
        help=f"comma-separated checks of config_fuzz_extra.py to add per case: {', '.join(EXTRAS)}",
    )
    args = ap.parse_args(argv)
    extras = tuple(x for x in args.extra.split(",") if x)
    if set(extras) - set(EXTRAS):
        ap.error(f"unknown --extra {sorted(set(extras) - set(EXTRAS))}; choose from {EXTRAS}")
    fams = args.families.split(",")
    unknown = [f for f in fams if f not in CLASSES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(CLASSES)}")
    start, stop = (int(x) for x in args.seeds.split(":"))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fam in fams:
            for seed in range(start, stop):
                status, kw, notes = run_case(fam, seed, Path(tmp), extras)
                failed += status == "FAIL"
                print(f"{fam} {seed} {status} {json.dumps(kw)}")
                for note in notes:
                    print(f"    {note}")
                sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
