"""bench/train.py's workloads and the systems it compares: model shapes, ``Workload``s, the packed
random data every system trains on (``make_data``: the same (position, target) pairs for Ember's
pre-shifted ``Batch`` and HF's unshifted rows), the model-FLOP formulas behind MFU, and builders
for Ember, HF (+PEFT, +bitsandbytes NF4) and HF + Liger. The methodology is in bench/train.py's
docstring.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ember.engine.activation import apply_activation_checkpointing
from ember.engine.data import IGNORE, Batch
from ember.models import LoRAConfig, ModelConfig, RopeScaling, Transformer, apply_lora

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
SYSTEMS = ("ember", "hf", "hf_answers", "hf_ember", "liger")
# hf_answers: HF with the head on labelled tokens only (``_train_measure.hf_answer_loss``); it
# differs from "hf" only where the loss skips tokens (the CPU workload's prompts), so GPU runs
# (loss on every token) leave it out unless --systems names it.
GPU_DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != "hf_answers")


def label(system: str, method: str) -> str:
    hf = {"lora": "HF+PEFT", "qlora": "HF+PEFT+bnb", "full": "HF"}.get(method, "HF")
    return {"ember": "Ember", "hf": hf, "hf_answers": f"{hf}, head on answers only",
            "hf_ember": f"{hf}+Ember kernels",
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


def base_dtype(wl: Workload, device: str, cpu_bf16: bool = False) -> torch.dtype:
    """Full fine-tuning: fp32 master weights. LoRA/QLoRA: the frozen base in bf16 where the
    matmuls run in bf16 (a GPU, or a CPU with bf16 units under ``--cpu-dtype bf16``), for every
    system alike (autocast would round an fp32 base to the same bf16 values at every use)."""
    low = device != "cpu" or cpu_bf16
    return torch.bfloat16 if wl.method != "full" and low else torch.float32


def build_ember(cfg: ModelConfig, wl: Workload, device: str, offload: bool = False,
                cpu_bf16: bool = False):
    from ember.models.nf4 import quantize_model_

    dtype = base_dtype(wl, device, cpu_bf16)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
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


def build_hf(cfg: ModelConfig, wl: Workload, device: str, folder=None, cpu_bf16: bool = False):
    import peft
    import transformers

    dtype = base_dtype(wl, device, cpu_bf16)
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
