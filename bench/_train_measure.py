"""bench/train.py's measurement and report: one training step per system (forward, loss,
backward, AdamW), timing with warm-up and peak memory, the peak bf16 matmul rate behind MFU, the
``Runner`` that turns a (system, workload, length) into a JSONL row (or a skipped/OOM row) and
probes the longest QLoRA sequence, and the markdown tables and result files.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time

import _harness as H
import torch
from _train_systems import Data, Workload, label, make_data, model_flops

from ember.engine.losses import sft_loss


# ---------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def hf_answer_loss(model, batch: dict) -> torch.Tensor:
    """HF (+PEFT) with the output head on the labelled positions only, as a careful HF user would
    write it: the decoder's last hidden states, then ``lm_head`` and cross-entropy on the tokens
    whose (shifted) label is not -100. The same loss as ``model(**batch).loss`` (mean over the
    labelled tokens, logits upcast to fp32 as transformers' ``ForCausalLMLoss``), without the
    head's matmuls for prompt tokens."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def make_step(system: str, model, data: Data, autocast, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if params and params[0].is_cuda else {}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **fused)
    dev = params[0].device
    ember_batch = data.ember.to(dev)
    hf_batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in data.hf.items()}

    def step() -> torch.Tensor:
        with autocast():
            if system == "ember":
                loss = sft_loss(model, ember_batch, ember_batch.num_loss_tokens)
            elif system == "hf_answers":
                loss = hf_answer_loss(model, hf_batch)
            else:
                loss = model(**hf_batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, warmup: int, steps: int, device: str):
    """(wall seconds per step, CPU seconds per step, peak GiB or None, losses). CPU time is the
    process's (all threads): on a shared machine it tracks the work done where wall time also
    counts the waiting."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    losses = [step() for _ in range(steps)]
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    dc = (time.process_time() - c0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return dt, dc, peak, [float(x) for x in losses]


def peak_matmul_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(functools.partial(torch.mm, a, b), warmup=50, rep=300,
                                 return_mode="median")
    del a, b
    return 2 * 8192**3 / ms / 1e9


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------ runs
class Runner:
    def __init__(self, args, peak_tflops: float | None):
        self.args, self.peak = args, peak_tflops
        self.rows: list[dict] = []
        self.longest: list[dict] = []
        self.deadline = time.monotonic() + args.time_budget

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, **row) -> dict:
        row = {**H.env_info(), "op": "train", "smoke": bool(self.args.smoke), **row}
        self.rows.append(row)
        if row.get("tokens_per_s"):
            print(f"[train] {row['workload']} L={row['seqlen']} {row['system']}: "
                  f"{row['tokens_per_s']:,.0f} tok/s, peak {row.get('peak_gib')} GiB, "
                  f"loss {row.get('losses')}", file=sys.stderr, flush=True)
        elif row.get("note"):
            print(f"[train] {row['workload']} L={row['seqlen']} {row['system']}: {row['note']}",
                  file=sys.stderr, flush=True)
        return row

    def measure(self, system: str, model, cfg, wl: Workload, seqlen: int, autocast, n_lora):
        base = dict(workload=wl.name, shape=wl.shape, method=wl.method, rank=wl.rank,
                    seqlen=seqlen, system=system, tokens=wl.tokens,
                    checkpointing=wl.checkpointing, dtype=self.args.dtype_name)
        if self.out_of_time():
            return self.add(**base, note="skipped: --time-budget spent")
        data = make_data(max(1, wl.tokens // seqlen), seqlen, cfg.vocab_size, seed=seqlen,
                         prompt_frac=wl.prompt_frac)
        lr = 1e-5 if wl.method == "full" else 1e-4
        step = make_step(system, model, data, autocast, lr)
        try:
            dt, dc, peak, losses = time_steps(step, self.args.warmup_steps,
                                              self.args.train_steps, self.args.device)
        except Exception as e:  # noqa: BLE001 - one system failing must not end the bench
            note = "OOM" if _oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
            del step
            _free(self.args.device)
            return self.add(**base, note=note)
        del step
        _free(self.args.device)
        flops = model_flops(cfg, wl, data, n_lora)
        return self.add(**base, tokens_per_s=data.tokens / dt, step_s=dt, peak_gib=peak,
                        tokens_per_cpu_s=data.tokens / dc if self.args.device == "cpu" else None,
                        mfu=flops / dt / (self.peak * 1e12) if self.peak else None,
                        model_tflop_per_step=flops / 1e12, losses=losses, n_lora=n_lora)

    def longest_fit(self, system: str, model, cfg, wl, autocast, lengths, verify: bool):
        """Peak memory at two lengths -> the length that fills the GPU (linear fit)."""
        peaks = {}
        for t in lengths:
            data = make_data(1, t, cfg.vocab_size, seed=t, one_doc=True)
            step = make_step(system, model, data, autocast, 1e-4)
            try:
                step()
                _sync("cuda")
                torch.cuda.reset_peak_memory_stats()
                step()
                _sync("cuda")
                peaks[t] = torch.cuda.max_memory_allocated()
            except Exception as e:  # noqa: BLE001
                peaks[t] = None
                note = "OOM" if _oom(e) else f"{type(e).__name__}: {str(e)[:80]}"
                print(f"[train] longest probe {system} T={t}: {note}", file=sys.stderr)
            del step
            _free("cuda")
        (t1, p1), (t2, p2) = sorted(peaks.items())
        row = dict(workload=wl.name, system=system, probes={t: p and p / 2**30
                                                            for t, p in peaks.items()})
        if p1 is None or p2 is None or p2 <= p1:
            row["note"] = "probe failed"
            self.longest.append(row)
            return
        cap = torch.cuda.get_device_properties(0).total_memory - 2**30  # 1 GiB for the context
        per_token = (p2 - p1) / (t2 - t1)
        t_max = int((cap - (p1 - per_token * t1)) / per_token)
        row.update(fit_tokens=t_max, bytes_per_token=per_token, verified=None)
        if verify:
            t = int(0.97 * t_max) // 256 * 256
            data = make_data(1, t, cfg.vocab_size, seed=1, one_doc=True)
            step = make_step(system, model, data, autocast, 1e-4)
            try:
                step()
                row["verified"] = t
            except Exception as e:  # noqa: BLE001
                row["verified"] = f"failed at {t}: {'OOM' if _oom(e) else type(e).__name__}"
            del step
            _free("cuda")
        self.longest.append(row)


# ---------------------------------------------------------------------------------------- output
def _f(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def tables(runner: Runner) -> str:
    info = H.env_info()
    versions = {m: getattr(H.try_import(m), "__version__", "-") for m in
                ("transformers", "peft", "bitsandbytes", "liger_kernel")}
    if versions["liger_kernel"] == "-" and H.try_import("liger_kernel") is not None:
        versions["liger_kernel"] = "installed"
    head = (f"### train: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f", git {info['git_sha']}, {time.strftime('%Y-%m-%d')}"
            + (f", peak bf16 matmul {runner.peak:.0f} TFLOP/s" if runner.peak else
               f", {runner.args.dtype_name}, {torch.get_num_threads()} threads"))
    lines = [head, "",
             "| workload | seq | system | tokens/s | vs HF | peak GiB | MFU | loss | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    hf = {(r["workload"], r["seqlen"]): r for r in runner.rows if r["system"] == "hf"}
    for r in runner.rows:
        ref_row = hf.get((r["workload"], r["seqlen"]), {})
        tps, ref = r.get("tokens_per_s"), ref_row.get("tokens_per_s")
        note = r.get("note") or ""
        cps, ref_cps = r.get("tokens_per_cpu_s"), ref_row.get("tokens_per_cpu_s")
        if cps:  # CPU runs: per CPU-second too (robust to other load on the machine)
            note = (f"{cps:,.0f} tok/CPU-s" + (f" ({cps / ref_cps:.2f}x HF)" if ref_cps else "")
                    + (f"; {note}" if note else ""))
        name = label(r["system"], r.get("method"))
        lines.append(
            f"| {r['workload']} | {r['seqlen']} | {name} | {_f(tps, ',.0f')} | "
            f"{_f(tps / ref if tps and ref else None, '.2f')} | {_f(r.get('peak_gib'), '.1f')} | "
            f"{_f(r['mfu'] * 100 if r.get('mfu') else None, '.1f')}{'%' if r.get('mfu') else ''}"
            f" | {_f(r['losses'][-1] if r.get('losses') else None, '.3f')} | {note} |")
    lines.append("| - | - | Unsloth | - | - | - | - | - | not measured: not installable offline |")
    if runner.longest:
        lines += ["", "| longest QLoRA 8B sequence | fits (linear fit of peak memory) | "
                  "bytes/token | probes (GiB) | verified |", "|---|---:|---:|---|---|"]
        for r in runner.longest:
            probes = ", ".join(f"{t}: {_f(g, '.1f', 'OOM')}" for t, g in r["probes"].items())
            lines.append(f"| {label(r['system'], 'qlora')} | {_f(r.get('fit_tokens'), ',d')} | "
                         f"{_f(r.get('bytes_per_token'), ',.0f')} | {probes} | "
                         f"{r.get('verified') or r.get('note') or 'no (--full verifies)'} |")
    return "\n".join(lines)


def write_results(runner: Runner, table: str) -> None:
    path = H.results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in runner.rows + [{**H.env_info(), "op": "train_longest", **x}
                                for x in runner.longest]:
            f.write(json.dumps(r, default=str) + "\n")
    (path.parent / f"{path.stem}_train.md").write_text(table + "\n")
    md_dir = os.environ.get("EMBER_BENCH_MD_DIR")
    if md_dir:
        os.makedirs(md_dir, exist_ok=True)
        with open(os.path.join(md_dir, "train.md"), "w") as f:
            f.write(table + "\n")
    print(f"{len(runner.rows)} rows appended to {path}", file=sys.stderr)

