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

Code: workloads, data, FLOP formulas and the systems under test are in ``bench/_train_systems.py``;
step timing, the runner and the report in ``bench/_train_measure.py``; this file runs them. Their
public names are importable from here too (``__all__``).
"""

from __future__ import annotations

import contextlib
import sys

import _harness as H
import torch
from _train_measure import (
    Runner,
    _free,
    hf_answer_loss,
    make_step,
    peak_matmul_tflops,
    tables,
    time_steps,
    write_results,
)
from _train_systems import (
    GPU_DEFAULT_SYSTEMS,
    GPU_WORKLOADS,
    LLAMA3,
    SHAPES,
    SMOKE_WORKLOADS,
    SYSTEMS,
    Data,
    Workload,
    apply_liger,
    base_dtype,
    build_ember,
    build_hf,
    hf_config,
    label,
    make_data,
    matmul_params,
    model_flops,
)

from ember.engine.activation import apply_activation_checkpointing, set_mlp_chunks
from ember.models import LoRAConfig, ModelConfig, apply_lora
from ember.models.hf_backend import accelerate, restore

__all__ = [
    "GPU_DEFAULT_SYSTEMS",
    "GPU_WORKLOADS",
    "LLAMA3",
    "SHAPES",
    "SMOKE_WORKLOADS",
    "SYSTEMS",
    "Data",
    "Runner",
    "Workload",
    "apply_liger",
    "base_dtype",
    "build_ember",
    "build_hf",
    "hf_answer_loss",
    "hf_config",
    "label",
    "main",
    "make_data",
    "make_step",
    "matmul_params",
    "model_flops",
    "parse",
    "peak_matmul_tflops",
    "run_cpu",
    "run_liger",
    "run_workload",
    "tables",
    "time_steps",
    "write_results",
]


def _autocast_factory(device: str, dtype_name: str):
    if dtype_name == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


def run_workload(runner: Runner, wl: Workload, systems: list[str], folder=None,
                 cfg: ModelConfig | None = None) -> None:
    args = runner.args
    cfg = cfg or ModelConfig(**SHAPES[wl.shape])
    autocast = _autocast_factory(args.device, args.dtype_name)
    cpu_bf16 = args.device == "cpu" and args.dtype_name == "bf16"
    lora_count = lambda m: sum(p.numel() for n, p in m.named_parameters()
                               if p.requires_grad and "lora" in n)
    if runner.out_of_time():
        for system in systems:
            for L in wl.seqlens:
                runner.measure(system, None, cfg, wl, L, autocast, 0)  # a "skipped" row
        return
    if "ember" in systems:
        model = (build_ember(cfg, wl, args.device, cpu_bf16=cpu_bf16) if folder is None
                 else _ember_real(wl, folder, base_dtype(wl, args.device, cpu_bf16)))
        for L in wl.seqlens:
            runner.measure("ember", model, cfg, wl, L, autocast, lora_count(model))
        if wl.method == "qlora" and args.device == "cuda" and not runner.out_of_time():
            # Long context: block inputs offloaded to host, the MLP 8K tokens at a time.
            apply_activation_checkpointing(model, "every_block", offload=True)
            set_mlp_chunks(model, 8192)
            runner.longest_fit("ember", model, cfg, wl, autocast, (16384, 32768), args.full)
        del model
        _free(args.device)
    hf_systems = [s for s in ("hf", "hf_answers", "hf_ember") if s in systems]
    if hf_systems and runner.out_of_time():
        for system in hf_systems:
            for L in wl.seqlens:
                runner.measure(system, None, cfg, wl, L, autocast, 0)
    elif hf_systems:
        model = build_hf(cfg, wl, args.device, folder, cpu_bf16=cpu_bf16)
        # Each system starts from the same weights (the previous one's timed steps trained them).
        start = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                 if p.requires_grad}
        for system in hf_systems:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
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
def _ember_real(wl: Workload, folder, dtype: torch.dtype):
    from ember.models.loading import load_pretrained

    model, _ = load_pretrained(folder, dtype=dtype)
    apply_lora(model, LoRAConfig(rank=wl.rank, alpha=2.0 * wl.rank))
    return model


def run_cpu(runner: Runner) -> None:
    from ember.models.hub import resolve_model
    from ember.models.loading import read_config

    folder = resolve_model("smollm2-135m-instruct")
    cfg = read_config(folder)
    rows, L = (1, 32) if runner.args.smoke else (4, 128)
    # LoRA r=16 on the real model; prompt/answer halves, loss (and Ember's head) on answers only.
    # HF twice: as is (the head on every token) and with the head on the answers only, the
    # setting the CPU target is defined against.
    wl = Workload("smollm2-135m-lora", "smollm2-135m", "lora", 16, (L,), rows * L, False,
                  prompt_frac=0.5)
    run_workload(runner, wl, ["ember", "hf", "hf_answers", "hf_ember"], folder=folder, cfg=cfg)


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
        default = GPU_DEFAULT_SYSTEMS if name == "systems" else allowed
        setattr(args, name, chosen or list(default))
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
