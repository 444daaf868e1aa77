"""The optional checks of ``tools/config_fuzz.py --extra gguf,qlora`` (imported by it, run as a
script from this folder), each against transformers:

- ``gguf``: Ember's f32 GGUF export of the case (a tiny byte-level BPE vocabulary), read back by
  Ember, gives transformers' logits; a refusal is a clear EmberError that names what to export
  instead (llama.cpp has no key for other activations, a scaled sliding-layer RoPE...).
- ``qlora``: the folder loaded with ``quantize="nf4"`` gives the logits of transformers' fp32
  model whose linear weights are bitsandbytes' NF4 round trip of them (its CPU Linear4bit
  fails on many of the fuzzer's odd widths: "N must be divisible by block_n"); then LoRA with
  random B on every linear layer, its PEFT adapter loaded by PEFT on that model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ember import EmberError

EXTRAS = ("gguf", "qlora")
# three specials, printable ASCII but "~" (identity in GPT-2's byte map) and one merge: 97
_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(chr(c) for c in range(33, 126)), "he"]


def _tokenizer():
    from ember.models.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": _TOKENS,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(_TOKENS) - 3),
        "tokenizer.ggml.merges": ["h e"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    })  # fmt: skip


def gguf_check(
    model, hf_logits, ids: torch.Tensor, path: Path, tol, probs: list[str], notes: list[str]
) -> None:
    """``model`` (Ember, no LoRA) to a GGUF file, loaded back: ``hf_logits(ids)`` are
    transformers' logits of ``ids``; ``tol(ref)`` the tolerance of a comparison with ``ref``."""
    from ember.models.gguf_export import save_gguf
    from ember.models.loading import load_pretrained

    if model.cfg.vocab_size < len(_TOKENS):
        notes.append("gguf: skipped (vocabulary smaller than the test tokenizer's)")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            save_gguf(model, _tokenizer(), path, dtype="f32")
        except EmberError as e:
            msg = str(e)
            if "merged" not in msg and "has no GGUF export" not in msg:  # what to do instead
                probs.append(f"gguf refusal without a way out: {msg[:300]}")
            else:
                notes.append(f"gguf refused: {msg[:200]}")
            return
    # the converter's documented losses: llama.cpp's llama drops the window (both warn)
    window = any("past the window" in str(w.message) for w in caught)
    if window:
        ids = ids[:, : model.cfg.sliding_window]
    back, _ = load_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_logits(ids)
        d = (back(ids) - ref).abs().max().item()
    if not d <= tol(ref):
        probs.append(f"gguf export read back: {d:.3g}" + (" (T within the window)" * window))


def _nf4_round_trip_(hf: torch.nn.Module, skip: tuple[str, ...]) -> None:
    """Every ``nn.Linear`` weight of transformers' model (but the heads) replaced by
    bitsandbytes' NF4 quantize / dequantize of it (double quant, blocksize 64: QLoRA's)."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name, m in hf.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in skip:
                # flattened: bitsandbytes 0.50's CPU quantize_4bit / dequantize_4bit of a 2-D
                # weight whose rows are 48, 80, 96, 112... wide is off by ~4x NF4's error
                w = m.weight.data.reshape(-1)
                q, state = bnbf.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=True
                )
                m.weight.copy_(bnbf.dequantize_4bit(q, state).reshape(m.weight.shape))


def lora_saved(model, ids: torch.Tensor, seed: int, adapter: Path) -> tuple[torch.Tensor, bool]:
    """LoRA (r 4, random B from ``seed``) on every linear layer of ``model``: its logits on ``ids``,
    and whether its PEFT adapter was written to ``adapter`` (not for a dense MLP of a Qwen3-MoE:
    PEFT 0.21 would retarget it, README)."""
    from ember.models.lora import LoRAConfig, apply_lora
    from ember.models.peft_adapter import save_adapter

    g = torch.Generator().manual_seed(seed)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        ours = model(ids)
    try:
        save_adapter(model, adapter)
    except EmberError:
        return ours, False
    return ours, True


def qlora_check(
    folder: Path, hf, ids: torch.Tensor, seed: int, tol, probs: list[str], notes: list[str]
) -> None:
    """Ember's NF4 model of the folder vs transformers' ``hf`` (fp32) with bitsandbytes'
    dequantized NF4 weights, then LoRA with random B on both (PEFT on transformers')."""
    import copy

    import peft

    from ember.models.loading import load_pretrained
    from ember.models.nf4 import HEADS

    if any("expert" in n for n, _ in hf.named_parameters()):
        # Ember quantizes each expert's gate / up / down; transformers 5 holds them fused in
        # 3-D parameters (blocks of 64 fall elsewhere) that bitsandbytes leaves dense
        notes.append("qlora: MoE not compared (no per-expert NF4 oracle)")
        return
    try:
        model, _ = load_pretrained(folder, dtype=torch.float32, quantize="nf4")
    except EmberError as e:
        notes.append(f"qlora refused: {str(e)[:200]}")
        return
    hf = copy.deepcopy(hf)
    _nf4_round_trip_(hf, tuple(HEADS))
    with torch.no_grad():
        ref = hf(ids).logits
        d = (model(ids) - ref).abs().max().item()
    if not d <= tol(ref):
        probs.append(f"nf4 logits vs transformers with bnb's dequantized NF4: {d:.3g}")
    adapter = folder.with_name(folder.name + "-qlora-adapter")
    ours, saved = lora_saved(model, ids, seed, adapter)
    if not saved:
        return
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(ids).logits
    d = (ours - theirs).abs().max().item()
    if not d <= tol(theirs):
        probs.append(f"QLoRA adapter in PEFT (dequantized NF4): {d:.3g}")
