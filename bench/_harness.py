"""Shared benchmark harness for every ``bench/<op>.py``.

A bench script is a plain file run as ``python bench/<op>.py [flags]``; it imports this module as
``import _harness as H`` (the script's folder is on ``sys.path``). Minimal bench::

    import _harness as H
    import torch
    from ember.kernels.rms_norm import rms_norm, rms_norm_ref

    cref = H.compiled(rms_norm_ref)                      # torch.compile(rms_norm_ref), lazily
    liger = H.try_import("liger_kernel.ops.rms_norm")    # None when not installed

    def run_shape(bench, args, t, d):
        dtype = H.bench_dtype(args)                      # bf16 on GPU, fp32 in --smoke
        x = torch.randn(t, d, device=args.device, dtype=dtype, requires_grad=True)
        w = torch.randn(d, device=args.device, dtype=dtype, requires_grad=True)
        e = x.element_size()
        bench.case(
            shape=f"T={t} D={d}",
            providers={
                "ref": lambda: rms_norm_ref(x, w),
                "ref_compiled": lambda: cref(x, w),
                "triton": lambda: rms_norm(x, w, impl="triton"),
                "liger": liger and args.device == "cuda"
                and (lambda: liger.LigerRMSNormFunction.apply(x, w, 1e-6)),
            },
            grad_inputs=(x, w),                          # leaves to differentiate; () = fwd only
            bytes={"fwd": 2 * t * d * e, "bwd": 3 * t * d * e, "fwd+bwd": 5 * t * d * e},
            flops=None,                                  # optional {mode: flops} -> TFLOP/s column
        )

    def main() -> None:
        args = H.parse_args("RMSNorm fwd/bwd")          # argparse.Namespace with the flags below
        bench = H.Bench("rms_norm", args)
        for t, d in H.pick(args, full=[(8192, 4096)], quick=[(8192, 4096)], smoke=[(33, 64)]):
            run_shape(bench, args, t, d)
        bench.finish()                                   # markdown table (+ JSONL rows on GPU)

    if __name__ == "__main__":
        main()

Providers: a dict ``name -> zero-argument callable`` returning a tensor or a tuple of tensors
(``None``/``False`` values are skipped: that is how an unavailable peer is written). Names:
``ref`` (eager reference), ``ref_compiled`` (``torch.compile`` of the reference: the honest
baseline), ``triton`` (ours; ``triton_<variant>``: one of our variants forced); any other name
is a peer (``liger``, ``sdpa_flash``, ``bnb`` ...).
The table shows each row's speed ratio vs ``ref_compiled`` and vs the first peer present (``>1``:
this row is faster). Build the providers in a function called once per shape (lambdas in a loop
body trip ruff's B023), as above.

Modes (``--modes``, default all that apply):

- ``fwd``: the callable, with autograd recording (a training forward).
- ``bwd``: the forward runs once outside the timer; the timer covers
  ``torch.autograd.grad(outputs, grad_inputs, grad_outputs, retain_graph=True, allow_unused=True)``
  with fixed random upstream gradients for every output that requires grad (so leaves that only a
  peer uses, e.g. inputs in the peer's own layout, may share the ``grad_inputs`` list).
- ``fwd+bwd``: both, inside the timer.

Metrics per row: median ms and p20/p80 from ``triton.testing.do_bench(quantiles=(0.5, 0.2,
0.8))``; peak memory (``torch.cuda.max_memory_allocated`` over one call after
``reset_peak_memory_stats``; absolute, so it includes the inputs and, for ``bwd``, the saved
forward); GB/s from the ``bytes`` the bench gives for that mode (the least the op must move: every
read and every write counted once) and ``%copy`` = that GB/s over a device-to-device copy bandwidth
measured once per process (1 GiB ``copy_``, read + write bytes); TFLOP/s when ``flops`` is given.

Results: each row is appended as JSON to ``bench/results/<YYYY-MM-DD>_<gpu-slug>.jsonl`` with GPU
name, torch/triton versions, git SHA (``+dirty`` when the tree has changes), date, op, shape, dtype,
provider, mode, ms, p20, p80, gbps, pct_copy, tflops, peak_mem_mb, error and ``extra`` (a dict the
bench may pass to ``case``). ``finish()`` prints the markdown table last, and writes it to
``$EMBER_BENCH_MD_DIR/<op>.md`` when that variable is set (``bench/run_all.sh`` collects them).

Flags (from ``parse_args``; add your own with ``H.parser(...)`` then ``H.parse_args(parser=p)``):

- ``--smoke``: CPU, tiny shapes, ``ref``/``triton`` and other CPU providers only (``ref_compiled``
  and CUDA-only peers are skipped), timed with ``time.perf_counter`` over 2 calls; no JSONL unless
  ``--jsonl``. Without ``TRITON_INTERPRET=1`` it re-executes itself with it set, so the Triton
  kernels run in the interpreter. ``tests/test_bench_smoke.py`` runs every bench this way.
- ``--quick``: the bench's short shape list (``bench/run_all.sh`` uses it: all benches together must
  fit in ~9 minutes on an H100).
- ``--modes fwd,bwd``, ``--providers triton,liger``: filters. ``--jsonl``/``--no-jsonl``: force.
- ``--warmup``/``--rep``: do_bench budgets in ms (defaults 25/100).

Lower-level pieces for benches that are not a single op (training step, generation):
``bench.measure(fn, grad_to_none=())`` -> ``Timing(ms, p20, p80, peak_mem_mb)``, and
``bench.add_row(shape=..., provider=..., mode=..., timing=..., bytes=None, flops=None,
extra=None)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
CORE = ("ref", "ref_compiled", "triton")
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------------------- CLI
def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a couple of calls")
    p.add_argument("--quick", action="store_true", help="short shape list (bench/run_all.sh)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--providers", default="", help="comma list; empty = all available")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup budget, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement budget, ms")
    p.add_argument("--profile", default="", metavar="PROVIDERS",
                   help="comma list of providers whose fwd+bwd runs once more under "
                        "torch.profiler after timing: top kernels by device time are printed")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--jsonl", dest="jsonl", action="store_true", default=None,
                   help="append JSONL rows (default: on GPU runs, off in --smoke)")
    g.add_argument("--no-jsonl", dest="jsonl", action="store_false")
    return p


def parse_args(description: str = "", argv: Sequence[str] | None = None, *,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the standard flags; adds ``args.device`` ("cuda" or "cpu")."""
    p = parser if parser is not None else _make_parser(description)
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks interpreter or compiler when a kernel is decorated, i.e. when the kernel
        # module is imported, which a bench has done by now: restart with the variable set.
        if argv is None:
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        p.error("--smoke runs Triton on CPU: set TRITON_INTERPRET=1 before importing triton")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    args.providers = [s for s in args.providers.split(",") if s]
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on CPU")
    args.device = "cpu" if args.smoke else "cuda"
    if args.jsonl is None:
        args.jsonl = not args.smoke
    return args


_make_parser = parser


def pick(args: argparse.Namespace, *, full: Sequence, quick: Sequence | None = None,
         smoke: Sequence) -> list:
    """The shape list for this run: smoke, quick (falls back to full) or full."""
    if args.smoke:
        return list(smoke)
    if args.quick and quick is not None:
        return list(quick)
    return list(full)


def bench_dtype(args: argparse.Namespace, gpu: torch.dtype = torch.bfloat16) -> torch.dtype:
    """bf16 (or ``gpu``) on GPU; fp32 in --smoke, because the interpreter's bf16 math is wrong."""
    return torch.float32 if args.smoke else gpu


def try_import(name: str) -> Any | None:
    """A peer module, or None when it (or its own dependencies) cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken optional peer must not stop the bench
        return None


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, created at the first call (importing inductor alone costs seconds,
    which a ``--smoke`` run that skips ``ref_compiled`` should not pay), once per function."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return _compile(fn)(*args, **kwargs)

    return run


@functools.cache
def _compile(fn: Callable) -> Callable:
    return torch.compile(fn)


# ------------------------------------------------------------------------------------- metadata
@functools.cache
def env_info() -> dict[str, Any]:
    import triton

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    else:
        gpu = platform.processor() or "cpu"
    sha = os.environ.get("EMBER_GIT_SHA", "unknown")  # for copies of the tree without .git
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=BENCH_DIR, capture_output=True, text=True, timeout=10).stdout
        if dirty.strip():
            sha += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "git_sha": sha,
            "cuda": torch.version.cuda, "interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def results_path() -> Path:
    """bench/results/<YYYY-MM-DD>_<gpu-slug>.jsonl for today and this GPU."""
    return RESULTS_DIR / f"{_dt.date.today().isoformat()}_{gpu_slug(env_info()['gpu'])}.jsonl"


@functools.cache
def copy_bandwidth_gbps() -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write bytes), measured once per process."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(functools.partial(dst.copy_, src), warmup=25, rep=200,
                                 return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / ms / 1e6


# ------------------------------------------------------------------------------------- measuring
@dataclass
class Timing:
    ms: float
    p20: float
    p80: float
    peak_mem_mb: float | None


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _grad_pairs(outs: tuple[torch.Tensor, ...], upstream: list[torch.Tensor | None]):
    pairs = [(o, g) for o, g in zip(outs, upstream, strict=True) if g is not None]
    return [o for o, _ in pairs], [g for _, g in pairs]


class Bench:
    """Collects rows for one bench script; see the module docstring."""

    def __init__(self, op: str, args: argparse.Namespace):
        self.op = op
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.smoke = bool(args.smoke)
        self._written = 0

    # -- timing ----------------------------------------------------------------------------------
    def measure(self, fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
        if self.smoke or not torch.cuda.is_available():
            fn()  # warm-up (and first-call compilation)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            return Timing(times[len(times) // 2], times[0], times[-1], None)
        import triton.testing

        ms, p20, p80 = triton.testing.do_bench(
            fn, warmup=self.args.warmup, rep=self.args.rep, quantiles=list(QUANTILES),
            grad_to_none=list(grad_to_none) or None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return Timing(ms, p20, p80, peak)

    # -- rows ------------------------------------------------------------------------------------
    def add_row(self, *, shape: str, provider: str, mode: str, timing: Timing | None,
                bytes: int | None = None, flops: float | None = None, dtype: Any = None,
                extra: dict | None = None, error: str | None = None, op: str | None = None) -> dict:
        copy = copy_bandwidth_gbps() if not self.smoke else None
        row: dict[str, Any] = {
            **env_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "op": op or self.op, "shape": shape,
            "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "provider": provider, "mode": mode, "ms": None, "p20": None, "p80": None,
            "gbps": None, "pct_copy": None, "tflops": None, "peak_mem_mb": None,
            "copy_gbps": copy, "smoke": self.smoke, "error": error, "extra": extra or {},
        }
        if timing is not None:
            row.update(ms=timing.ms, p20=timing.p20, p80=timing.p80, peak_mem_mb=timing.peak_mem_mb)
            if bytes:
                row["gbps"] = bytes / timing.ms / 1e6
                if copy:
                    row["pct_copy"] = 100 * row["gbps"] / copy
            if flops:
                row["tflops"] = flops / timing.ms / 1e9
        self.rows.append(row)
        return row

    def case(self, *, shape: str, providers: dict[str, Callable[[], Any] | None],
             grad_inputs: Sequence[torch.Tensor] = (), bytes: dict[str, int] | None = None,
             flops: dict[str, float] | None = None, extra: dict | None = None,
             op: str | None = None, dtype: torch.dtype | None = None) -> None:
        """Time every provider in every applicable mode for one shape. ``dtype`` (for the rows)
        defaults to the first grad input's; ``op`` overrides the Bench's op name for these rows."""
        bytes, flops = bytes or {}, flops or {}
        grad_inputs = tuple(grad_inputs)
        modes = [m for m in self.args.modes if m == "fwd" or grad_inputs]
        if dtype is None and grad_inputs:
            dtype = grad_inputs[0].dtype
        for name, fn in providers.items():
            if not fn or (self.args.providers and name not in self.args.providers):
                continue
            # Per provider: a peer may return its outputs in its own layout.
            upstream: list[torch.Tensor | None] | None = None
            if self.smoke and name == "ref_compiled":
                continue  # inductor compile costs tens of seconds on CPU; the smoke is for rot
            for mode in modes:
                try:
                    if mode != "fwd" and upstream is None:
                        outs = _as_tuple(fn())
                        upstream = [torch.randn_like(o) if o.requires_grad else None for o in outs]
                        del outs
                    timing = self._run_mode(fn, mode, grad_inputs, upstream)
                    err = None
                except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
                    timing, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"[{op or self.op}] {shape} {name} {mode}: {err}", file=sys.stderr)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                self.add_row(shape=shape, provider=name, mode=mode, timing=timing,
                             bytes=bytes.get(mode), flops=flops.get(mode), dtype=dtype,
                             extra=extra, error=err, op=op)
            if name in self.args.profile.split(",") and (upstream is not None or not grad_inputs):
                self._profile(f"{op or self.op} {shape} {name}", fn, grad_inputs, upstream)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.flush()

    def _profile(self, label: str, fn, grad_inputs, upstream, top: int = 15) -> None:
        """One fwd (+bwd) of ``fn`` under torch.profiler; prints the ops / kernels that took
        the most device time (CPU time on CPU), so a slow pass can be pinned on its kernel."""
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

        def once():
            outs = _as_tuple(fn())
            if grad_inputs:
                outs, ups = _grad_pairs(outs, upstream)
                torch.autograd.grad(outs, grad_inputs, ups, allow_unused=True)

        once()  # compiled / autotuned before the profiled call
        with profile(activities=acts) as prof:
            once()
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"== profile: {label} (fwd{'+bwd' if grad_inputs else ''}, top {top} by {key})")
        print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))

    def _run_mode(self, fn, mode, grad_inputs, upstream) -> Timing:
        if mode == "fwd":
            return self.measure(fn)
        if mode == "bwd":
            outs, ups = _grad_pairs(_as_tuple(fn()), upstream)
            run = lambda: torch.autograd.grad(outs, grad_inputs, ups, retain_graph=True,
                                              allow_unused=True)
            t = self.measure(run)
            del outs
            return t

        def run():
            outs, ups = _grad_pairs(_as_tuple(fn()), upstream)
            return torch.autograd.grad(outs, grad_inputs, ups, allow_unused=True)

        return self.measure(run)

    # -- output ----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Append the rows not yet written to the JSONL file (if enabled) and rewrite
        ``$EMBER_BENCH_MD_DIR/<op>.md``; ``case`` calls it, so a bench killed by a time limit
        keeps what it measured."""
        new = self.rows[self._written:]
        if self.args.jsonl and new:
            path = results_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for row in new:
                    f.write(json.dumps(row) + "\n")
        self._written = len(self.rows)
        md_dir = os.environ.get("EMBER_BENCH_MD_DIR")
        if md_dir and self.rows:
            Path(md_dir).mkdir(parents=True, exist_ok=True)
            (Path(md_dir) / f"{self.op}.md").write_text(markdown_table(self.rows, self.op) + "\n")

    def finish(self) -> str:
        """Flush, print the markdown table (last), return it."""
        self.flush()
        if self.args.jsonl and self.rows:
            print(f"{len(self.rows)} rows appended to {results_path()}", file=sys.stderr)
        table = markdown_table(self.rows, title=self.op)
        print(table)
        return table


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """Rows grouped by (op, shape, mode); ratios are t(baseline)/t(row), >1: the row is faster."""
    info = rows[0] if rows else env_info()
    copy = info.get("copy_gbps")
    head = (f"### {title}: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
            f"git {info['git_sha']}" + (f", copy {copy:.0f} GB/s" if copy else ""))
    lines = [head, "",
             "| op | shape | dtype | mode | provider | ms | p20-p80 | GB/s | %copy | TFLOP/s "
             "| peak MB | vs ref_compiled | vs peer |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["mode"]), []).append(r)
    for (op, shape, mode), rs in groups.items():
        by = {r["provider"]: r["ms"] for r in rs if r["ms"]}
        peer = next((p for p in by if p not in CORE and not p.startswith("triton_")), None)
        for r in rs:
            if r["error"]:
                lines.append(f"| {op} | {shape} | {r['dtype']} | {mode} | {r['provider']} | "
                             f"error: {r['error'][:60]} | | | | | | | |")
                continue
            vs_c = by.get("ref_compiled")
            vs_p = by.get(peer) if peer and peer != r["provider"] else None
            lines.append(
                f"| {op} | {shape} | {r['dtype']} | {mode} | {r['provider']} | {r['ms']:.4f} | "
                f"{r['p20']:.4f}-{r['p80']:.4f} | {_fmt(r['gbps'], '.0f')} | "
                f"{_fmt(r['pct_copy'], '.0f')} | {_fmt(r['tflops'], '.1f')} | "
                f"{_fmt(r['peak_mem_mb'], '.0f')} | "
                f"{_fmt(vs_c / r['ms'] if vs_c else None, '.2f')} | "
                f"{_fmt(vs_p / r['ms'] if vs_p else None, '.2f')}"
                + (f" ({peer})" if vs_p else "") + " |")
    return "\n".join(lines)
