"""End-to-end training throughput: Ember vs Hugging Face transformers + PEFT (+ bitsandbytes),
HF + Liger-Kernel and HF + Ember's kernels (``ember.models.hf_backend.accelerate``).

    python bench/train.py                 # GPU, --quick (the default), ~5 minutes on an H100
    python bench/train.py --full          # more timed steps + a real probe at the longest length
    python bench/train.py --cpu           # CPU: SmolLM2-135M LoRA, Ember vs HF+PEFT (manual)
    python bench/train.py --smoke         # CPU, seconds: the CPU row and tiny GPU-path shapes

Workloads (random weights of the real shapes, nothing downloaded): ``qlora8b`` QLoRA r=32 on the
Llama-3.1-8B shape (NF4 base), ``lora8b`` LoRA r=16 on Llama-3.1-8B (bf16 base), ``full1b`` full
fine-tuning of the Llama-3.2-1B shape (fp32 master weights). Each at sequence lengths 2K and 8K,
packed: every row of L tokens holds several documents (lengths 1/8..1/2 of L, fixed seed) and no
system may attend across documents (Ember: ``cu_seqlens``; HF: ``position_ids`` restarting per
document, which transformers turns into a block-diagonal mask). Loss on every token (labels never
cross a document). A step is forward + loss + backward + AdamW on ``TOKENS[workload]`` tokens
(the micro-batch, sized so that the HF baselines fit an 80 GB GPU too), bf16 autocast for all
systems, LoRA alpha = 2r on q,k,v,o,gate,up,down, adapters in fp32. Gradient checkpointing per
block on the 8B workloads for every system (Ember: ``ember.engine.activation``; HF:
``gradient_checkpointing_enable``), none on ``full1b``. HF runs use SDPA and ``use_cache=False``;
QLoRA in HF is bitsandbytes NF4 with double quantization (bf16 compute) on the same linears as
Ember (not ``prepare_model_for_kbit_training``, which would upcast norms/embeddings to fp32: the
same bf16 settings for both). Unsloth cannot be installed offline: it is not measured.

Columns: tokens/s over the timed steps (after warm-up, which absorbs compilation and autotuning);
``vs HF`` = tokens/s / the HF(+PEFT/+bnb) row's; peak memory = ``torch.cuda.max_memory_allocated``
over the timed steps (weights, optimizer and activations); MFU = model FLOPs per step / step time
/ the measured peak bf16 matmul rate (median time of an 8192^3 bf16 ``torch.mm``). Model FLOPs:

    full FT:    6 * N * tokens                      + attention
    LoRA/QLoRA: (4 * N + 6 * N_lora) * tokens       + attention
    attention:  6 * layers * heads * head_dim * sum over documents of len^2   (causal, fwd + bwd)

N = parameters of every matmul (all linear layers and the output head; the embedding lookup is
not a matmul). LoRA: forward 2N, backward only dX through the frozen weights 2N, adapters 6
N_lora. Recomputation (checkpointing) and NF4 dequantization are not counted (MFU, not HFU).

Longest sequence for QLoRA 8B (micro-batch 1, one document): peak memory is measured at two
lengths and fitted linearly (memory is linear in T with flash attention and the fused loss),
giving the length at which the GPU is full; ``--full`` then verifies that length with a real
step (minutes at 100K+ tokens: attention is quadratic). Ember uses checkpointing with offload of
block inputs to CPU (``offload=True``); HF+PEFT+bnb its standard checkpointing.

Results: JSONL rows appended to ``bench/results/<date>_<gpu>.jsonl`` (op "train") and the tables
in ``bench/results/<date>_<gpu>_train.md``; the tables are printed last.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import _harness as H
import torch

from ember.engine.activation import apply_activation_checkpointing
from ember.engine.data import IGNORE, Batch
from ember.engine.losses import sft_loss
from ember.models import LoRAConfig, ModelConfig, RopeScaling, Transformer, apply_lora
from ember.models.hf_backend import accelerate, restore

LLAMA3 = dict(rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256)
SHAPES = {  # name -> ember ModelConfig kwargs
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, max_position_embeddings=131072, **LLAMA3,
                         rope_scaling=RopeScaling(factor=8.0)),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
                         **LLAMA3, rope_scaling=RopeScaling(factor=32.0)),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                 num_kv_heads=2, vocab_size=512, rms_norm_eps=1e-5),
}


@dataclass(frozen=True)
class Workload:
    name: str
    shape: str
    method: str  # "lora" | "qlora" | "full"
    rank: int
    seqlens: tuple[int, ...]
    tokens: int  # per optimizer step (one micro-batch)
    checkpointing: bool
    prompt_frac: float = 0.0  # leading share of each document without loss


GPU_WORKLOADS = {
    "qlora8b": Workload("qlora8b", "llama-3.1-8b", "qlora", 32, (2048, 8192), 16384, True),
    "lora8b": Workload("lora8b", "llama-3.1-8b", "lora", 16, (2048, 8192), 16384, True),
    "full1b": Workload("full1b", "llama-3.2-1b", "full", 0, (2048, 8192), 8192, False),
}
SMOKE_WORKLOADS = {  # the GPU code paths in miniature, on CPU
    "qlora-tiny": Workload("qlora-tiny", "tiny", "qlora", 8, (32,), 64, True),
    "full-tiny": Workload("full-tiny", "tiny", "full", 0, (32,), 64, False),
}
SYSTEMS = ("ember", "hf", "hf_ember", "liger")


def label(system: str, method: str) -> str:
    hf = {"lora": "HF+PEFT", "qlora": "HF+PEFT+bnb", "full": "HF"}.get(method, "HF")
    return {"ember": "Ember", "hf": hf, "hf_ember": f"{hf}+Ember kernels",
            "liger": f"{hf}+Liger"}[system]


# ------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    ember: Batch  # (1, R*L) packed, pre-shifted labels
    hf: dict  # (R, L) rows, position_ids restarting per document, HF's unshifted labels
    tokens: int
    sum_len_sq: int


def make_data(rows: int, seqlen: int, vocab: int, seed: int, prompt_frac: float = 0.0,
              one_doc: bool = False) -> Data:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seqlen), generator=g)
    docs = []  # per row, document lengths
    for _ in range(rows):
        lens, left = [], seqlen
        while left > 0:
            n = seqlen if one_doc else rng.randint(max(2, seqlen // 8), max(2, seqlen // 2))
            n = left if left - n < 2 else n
            lens.append(n)
            left -= n
        docs.append(lens)
    pos = torch.zeros(rows, seqlen, dtype=torch.long)
    hf_labels = ids.clone()
    pre = torch.full((rows, seqlen), IGNORE, dtype=torch.long)
    for r, lens in enumerate(docs):
        a = 0
        for n in lens:
            pos[r, a:a + n] = torch.arange(n)
            p = int(prompt_frac * n)
            hf_labels[r, a:a + max(p, 1)] = IGNORE  # the first token has no context
            pre[r, a + max(p, 1) - 1:a + n - 1] = ids[r, a + max(p, 1):a + n]
            a += n
    lens = [n for row in docs for n in row]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = Batch(ids.reshape(1, -1), pre.reshape(1, -1), pos.reshape(1, -1), cu, max(lens),
                  int((pre != IGNORE).sum()), len(lens))
    hf = dict(input_ids=ids, position_ids=pos, labels=hf_labels, use_cache=False)
    return Data(batch, hf, rows * seqlen, sum(n * n for n in lens))


# ---------------------------------------------------------------------------------------- models
def matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * d
    return cfg.num_layers * (per_layer + 3 * d * cfg.intermediate_size) + cfg.vocab_size * d


def model_flops(cfg: ModelConfig, wl: Workload, data: Data, n_lora: int) -> float:
    n = matmul_params(cfg)
    dense = 6 * n if wl.method == "full" else 4 * n + 6 * n_lora
    attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * data.sum_len_sq
    return dense * data.tokens + attn


@torch.no_grad()
def _init_(model: torch.nn.Module, std: float = 0.02) -> None:
    """Random init on the parameters' device (a CPU generator would take minutes at 8B)."""
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name else p.normal_(0.0, std)


def build_ember(cfg: ModelConfig, wl: Workload, device: str, offload: bool = False):
    from ember.models.nf4 import quantize_model_

    base_dtype = torch.float32 if wl.method == "full" or device == "cpu" else torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(prev)
    _init_(model)
    if wl.method == "qlora":
        quantize_model_(model)
    if wl.method != "full":
        apply_lora(model, LoRAConfig(rank=wl.rank, alpha=2.0 * wl.rank))
    if wl.checkpointing:
        apply_activation_checkpointing(model, "every_block", offload=offload and device == "cuda")
    return model


def hf_config(cfg: ModelConfig):
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None:
        rope.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, use_cache=False)


def _to_bnb_4bit_(model: torch.nn.Module) -> None:
    """Swap every decoder linear for a bitsandbytes NF4 Linear4bit (double quant, bf16 compute),
    one at a time so the dense weights are freed as we go."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
        w = lin.weight.data
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4").to(w.device)
        setattr(model.get_submodule(parent), leaf, q)
        del lin, w
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT then picks its bnb LoRA layer


def build_hf(cfg: ModelConfig, wl: Workload, device: str, folder=None):
    import peft
    import transformers

    dtype = torch.float32 if wl.method == "full" or device == "cpu" else torch.bfloat16
    if folder is not None:  # the real model (CPU comparison)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa").to(device)
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                hf_config(cfg), dtype=dtype, attn_implementation="sdpa")
        _init_(model)
    if wl.method == "qlora":
        _to_bnb_4bit_(model)
    if wl.method != "full":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=wl.rank, lora_alpha=2 * wl.rank, lora_dropout=0.0, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    if wl.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def apply_liger(model) -> None:
    import liger_kernel.transformers as lk

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fn = getattr(lk, "_apply_liger_kernel_to_instance", None)
    # Liger patches transformers' llama module globals too (rope, classes): the HF rows must
    # therefore all run before this (they do: liger runs last).
    fn(model=base) if fn is not None else lk.apply_liger_kernel_to_llama(model=base)


# ---------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


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


def _autocast_factory(device: str, dtype_name: str):
    if dtype_name == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


def run_workload(runner: Runner, wl: Workload, systems: list[str], folder=None,
                 cfg: ModelConfig | None = None) -> None:
    args = runner.args
    cfg = cfg or ModelConfig(**SHAPES[wl.shape])
    autocast = _autocast_factory(args.device, args.dtype_name)
    lora_count = lambda m: sum(p.numel() for n, p in m.named_parameters()
                               if p.requires_grad and "lora" in n)
    if runner.out_of_time():
        for system in systems:
            for L in wl.seqlens:
                runner.measure(system, None, cfg, wl, L, autocast, 0)  # a "skipped" row
        return
    if "ember" in systems:
        model = build_ember(cfg, wl, args.device) if folder is None else _ember_real(wl, folder)
        for L in wl.seqlens:
            runner.measure("ember", model, cfg, wl, L, autocast, lora_count(model))
        if wl.method == "qlora" and args.device == "cuda" and not runner.out_of_time():
            apply_activation_checkpointing(model, "every_block", offload=True)
            runner.longest_fit("ember", model, cfg, wl, autocast, (16384, 32768), args.full)
        del model
        _free(args.device)
    hf_systems = [s for s in ("hf", "hf_ember") if s in systems]
    if hf_systems and runner.out_of_time():
        for system in hf_systems:
            for L in wl.seqlens:
                runner.measure(system, None, cfg, wl, L, autocast, 0)
    elif hf_systems:
        model = build_hf(cfg, wl, args.device, folder)
        for system in hf_systems:
            if system == "hf_ember":
                accelerate(model)
            for L in wl.seqlens:
                runner.measure(system, model, cfg, wl, L, autocast, lora_count(model))
            restore(model)
        if wl.method == "qlora" and args.device == "cuda" and not runner.out_of_time():
            runner.longest_fit("hf", model, cfg, wl, autocast, (8192, 16384), False)
        del model
        _free(args.device)


def run_liger(runner: Runner, workloads: list[Workload]) -> None:
    if H.try_import("liger_kernel.transformers") is None:
        for wl in workloads:
            runner.add(workload=wl.name, method=wl.method, seqlen="-", system="liger",
                       note="skipped: liger_kernel not importable")
        return
    args = runner.args
    for wl in workloads:
        if runner.out_of_time():
            runner.add(workload=wl.name, method=wl.method, seqlen="-", system="liger",
                       note="skipped: --time-budget spent")
            continue
        cfg = ModelConfig(**SHAPES[wl.shape])
        model = build_hf(cfg, wl, args.device)
        apply_liger(model)
        n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora" in n)
        for L in wl.seqlens:
            runner.measure("liger", model, cfg, wl, L, _autocast_factory(args.device, "bf16"),
                           n_lora)
        del model
        _free(args.device)


# --------------------------------------------------------------------------------- CPU: SmolLM2
def _ember_real(wl: Workload, folder):
    from ember.models.loading import load_pretrained

    model, _ = load_pretrained(folder, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=wl.rank, alpha=2.0 * wl.rank))
    return model


def run_cpu(runner: Runner) -> None:
    from ember.models.hub import resolve_model
    from ember.models.loading import read_config

    folder = resolve_model("smollm2-135m-instruct")
    cfg = read_config(folder)
    rows, L = (1, 32) if runner.args.smoke else (4, 128)
    # LoRA r=16 on the real model; prompt/answer halves, loss (and Ember's head) on answers only.
    wl = Workload("smollm2-135m-lora", "smollm2-135m", "lora", 16, (L,), rows * L, False,
                  prompt_frac=0.5)
    run_workload(runner, wl, ["ember", "hf", "hf_ember"], folder=folder, cfg=cfg)


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


def parse():
    p = H.parser(__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="SmolLM2-135M LoRA on CPU, full timing")
    p.add_argument("--full", action="store_true", help="more timed steps; verify longest length")
    p.add_argument("--workloads", default="", help=f"comma list of {','.join(GPU_WORKLOADS)}")
    p.add_argument("--systems", default="", help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new run starts (the rest are listed as skipped); "
                   "default 300 on GPU, none on CPU")
    p.add_argument("--cpu-dtype", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    if "--cpu" in sys.argv[1:]:
        args = p.parse_args()
        args.device, args.jsonl = "cpu", True if args.jsonl is None else args.jsonl
    else:
        args = H.parse_args(parser=p)
    cpu = args.device == "cpu"
    if args.time_budget is None:
        args.time_budget = float("inf") if cpu else 300.0
    args.warmup_steps = args.warmup_steps or (1 if args.smoke or not args.full else 2)
    args.train_steps = args.train_steps or (1 if args.smoke else 5 if args.full or cpu else 2)
    if cpu:
        from ember.engine.trainer import cpu_has_bf16

        want = args.cpu_dtype if args.cpu_dtype != "auto" else (
            "bf16" if cpu_has_bf16() and not args.smoke else "fp32")
        args.dtype_name = want
        if args.threads:
            torch.set_num_threads(args.threads)
    else:
        args.dtype_name = "bf16"
    for name, allowed in (("workloads", GPU_WORKLOADS), ("systems", SYSTEMS)):
        chosen = [s for s in getattr(args, name).split(",") if s]
        bad = [s for s in chosen if s not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen or list(allowed))
    return args


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    runner = Runner(args, peak_matmul_tflops() if args.device == "cuda" else None)
    if args.device == "cpu":
        run_cpu(runner)
        if args.smoke:  # the GPU code paths in miniature
            for wl in SMOKE_WORKLOADS.values():
                run_workload(runner, wl, ["ember", "hf", "hf_ember"])
    else:
        workloads = [GPU_WORKLOADS[w] for w in args.workloads]
        for wl in workloads:
            run_workload(runner, wl, [s for s in args.systems if s != "liger"])
        if "liger" in args.systems:
            run_liger(runner, workloads)
    table = tables(runner)
    if args.jsonl:
        write_results(runner, table)
    print(table)


if __name__ == "__main__":
    main()
