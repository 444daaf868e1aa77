"""Activation memory per checkpointing policy on a Llama-3-8B-shaped model.

    python tools/memory_table.py                       # GPU if there is one, else CPU counting
    python tools/memory_table.py --device cpu --measure-tokens 64
    python tools/memory_table.py --device cuda --tokens 8192
    python tools/memory_table.py --device cpu --tokens 344064 --mlp-chunk 8192   # long context

Widths are Llama-3-8B's (hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, 32 layers, bf16);
the vocabulary is cut to 1024 because, with the fused linear cross-entropy, the embedding and
head activations do not depend on the policy. "Activations" = what the forward keeps for
backward, model weights and gradients excluded.

GPU (measured): the 32-layer model runs forward + backward per policy at ``--tokens``;
``torch.cuda.memory_allocated`` after the forward gives the resident activations and
``max_memory_allocated`` during backward the peak (gradients are preallocated, so they are in
the baseline). A policy that does not fit reports OOM.

CPU (counted, no GPU): a 3-layer model with full widths runs one forward at ``--measure-tokens``
with blocks 0 and 2 checkpointed and block 1 not, under ``torch.autograd.graph.saved_tensors_hooks``
that record every saved tensor's storage (unique storages, parameters excluded); forward hooks on
the blocks attribute each storage to the block that saved it first. Block 1 gives the bytes of a
plain block, block 2 those of a checkpointed one (block 0 also takes the RoPE tables all blocks
share, which go to the constant part). Then ``total(L) = C + n_plain * plain + n_ckpt * ckpt``,
scaled linearly from ``--measure-tokens`` to ``--tokens`` (everything saved is O(tokens):
attention is flash-style and keeps q, k, v, out and the LSE). By default the kernels run as
Triton under the CPU interpreter (``EMBER_KERNELS=triton``, ``TRITON_INTERPRET=1``), so what is
counted is exactly what the GPU kernels save; ``--kernels ref`` counts the PyTorch references,
which keep fp32 intermediates (about 2.6x more per plain block). Peak in backward (CPU) =
resident + one plain block (a checkpointed block's activations are re-created one block at a
time); for "none" the backward's transient gradients are not counted.

MLP chunks (``--mlp-chunk C``, ``activations.mlp_chunk_tokens``; the last row): a block then
keeps neither the MLP's inputs nor its gate/up outputs, and re-creates them ``C`` tokens at a
time. Counted by running block 1 a second time with chunks on: its saved bytes give the block
without its MLP internals; the difference, per token, times ``C`` is what one chunk re-creates.
Peak in backward = resident + (block without MLP internals + one chunk's MLP).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

GIB = 2**30
POLICIES = (("none", "none", 2, False), ("every_k (k=4)", "every_k", 4, False),
            ("every_k (k=2)", "every_k", 2, False), ("every_block", "every_block", 2, False),
            ("every_block + offload", "every_block", 2, True))
CHUNKED = ("every_block + offload + MLP in chunks of {c} tokens", "every_block", 2, True)


def llama3_8b(**changes):
    from ember.models import ModelConfig

    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5)
    return replace(cfg, **changes)


class SavedBytes:
    """Bytes of the unique storages saved for backward (parameters excluded)."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def count_cpu(tokens: int, mlp_chunk: int = 0) -> dict:
    import torch

    from ember.engine.activation import apply_activation_checkpointing, set_mlp_chunks
    from ember.models import Transformer

    cfg = llama3_8b(num_layers=3, vocab_size=1024)
    model = Transformer(cfg).to(torch.bfloat16).init_weights(seed=0).train()
    assert apply_activation_checkpointing(model, "every_k", k=2) == [0, 2]
    counter = SavedBytes(model.parameters())
    start, per_block = {}, {}
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: start.__setitem__(i, counter.total))
        block.register_forward_hook(
            lambda m, a, o, i=i: per_block.__setitem__(i, counter.total - start[i]))
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        model.hidden_states(ids)
    plain, ckpt = per_block[1], per_block[2]
    x = tokens * cfg.hidden_size * 2
    if ckpt != x:
        raise RuntimeError(f"a checkpointed block kept {ckpt} bytes, expected its input ({x})")
    out = {"C": counter.total - plain - 2 * ckpt, "plain": plain, "ckpt": ckpt, "x": x}
    if mlp_chunk:
        # Block 1 again, its MLP in chunks smaller than the measured tokens (so chunking is on).
        set_mlp_chunks(model, max(1, tokens // 4))
        counter.seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model.hidden_states(ids)
        out["plain_chunked"] = per_block[1]
        out["mlp_per_token"] = (plain - per_block[1]) / tokens
    return out


def _policies(mlp_chunk: int) -> tuple:
    return POLICIES + (((CHUNKED[0].format(c=mlp_chunk), *CHUNKED[1:]),) if mlp_chunk else ())


def table_cpu(m: dict, layers: int, tokens: int, scale: float, mlp_chunk: int = 0) -> list[dict]:
    from ember.engine.activation import checkpointed_layers

    rows = []
    for i, (name, policy, k, offload) in enumerate(_policies(mlp_chunk)):
        n_ckpt = len(checkpointed_layers(layers, policy, k))
        kept = m["ckpt"] - (m["x"] if offload else 0)
        resident = (m["C"] + (layers - n_ckpt) * m["plain"] + n_ckpt * kept) * scale
        redo = m["plain"] * scale  # what backward re-creates for one checkpointed block
        if i >= len(POLICIES):  # MLP in chunks: the block without MLP internals + one chunk
            redo = m["plain_chunked"] * scale + m["mlp_per_token"] * min(mlp_chunk, tokens)
        peak = resident + (redo if n_ckpt else 0)
        rows.append({"policy": name, "checkpointed": n_ckpt, "resident": resident,
                     "host": n_ckpt * m["x"] * scale if offload else 0, "peak": peak})
    return rows


def _gpu_step(model, ids) -> tuple[int, int]:
    """(activations resident after the forward, peak during backward) above the start."""
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # in the baseline: only activations are measured
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    h = model.hidden_states(ids)
    torch.cuda.synchronize()
    # Offloaded inputs are freed once their copy-out finished; the allocator books that on its
    # next allocation.
    torch.empty(1, device="cuda")
    resident = torch.cuda.memory_allocated() - base - h.numel() * h.element_size()
    h.float().square().mean().backward()
    torch.cuda.synchronize()
    return resident, torch.cuda.max_memory_allocated() - base


def measure_gpu(layers: int, tokens: int, mlp_chunk: int = 0) -> list[dict]:
    import torch

    from ember.engine.activation import apply_activation_checkpointing, offloader_of, set_mlp_chunks
    from ember.models import Transformer

    cfg = llama3_8b(num_layers=layers, vocab_size=1024)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).init_weights(seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    rows = []
    for i, (name, policy, k, offload) in enumerate(_policies(mlp_chunk)):
        n_ckpt = len(apply_activation_checkpointing(model, policy, k=k, offload=offload))
        set_mlp_chunks(model, mlp_chunk if i >= len(POLICIES) else 0)
        row = {"policy": name, "checkpointed": n_ckpt, "resident": None, "host": 0, "peak": None}
        try:
            row["resident"], row["peak"] = _gpu_step(model, ids)
        except torch.cuda.OutOfMemoryError:
            pass  # reported as OOM; the step's tensors die with the exception
        off = offloader_of(model)
        row["host"] = off.stats["offloaded_bytes"] if off is not None else 0
        rows.append(row)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return rows


def _gib(v) -> str:
    return "OOM" if v is None else f"{v / GIB:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    ap.add_argument("--measure-tokens", type=int, default=64,
                    help="CPU: tokens actually run (bytes scale linearly to --tokens)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mlp-chunk", type=int, default=0,
                    help="add a row with the MLP in chunks of this many tokens (0: no row)")
    ap.add_argument("--kernels", default="triton", choices=("triton", "ref"),
                    help="CPU: count what the Triton kernels save (interpreter) or the refs")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda" or (a.device == "auto" and os.path.exists("/dev/nvidia0"))
    if not cuda:
        # Must be decided before triton is imported (it is, by ember).
        os.environ["EMBER_KERNELS"] = a.kernels
        if a.kernels == "triton":
            os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available")
    torch.manual_seed(0)
    head = f"Llama-3-8B shape, {a.layers} layers, {a.tokens} tokens per micro-batch, bf16"
    if cuda:
        rows = measure_gpu(a.layers, a.tokens, a.mlp_chunk)
        print(f"{head}; measured on {torch.cuda.get_device_name()} (memory_allocated after "
              "forward, max_memory_allocated in backward, above weights + gradients)\n")
    else:
        run = min(a.tokens, a.measure_tokens)
        m = count_cpu(run, a.mlp_chunk)
        scale = a.tokens / run
        rows = table_cpu(m, a.layers, a.tokens, scale, a.mlp_chunk)
        print(f"{head}; counted saved-tensor bytes ({a.kernels} kernels on CPU) at {run} tokens, "
              f"scaled x{scale:g}: per block plain {m['plain'] * scale / GIB:.3f} GiB, "
              f"checkpointed {m['ckpt'] * scale / GIB:.3f} GiB (its bf16 input); other "
              f"{m['C'] * scale / GIB:.3f} GiB\n")
    none = rows[0]["resident"]
    print("| policy | checkpointed blocks | resident activations (GiB) | pinned host (GiB) | "
          "peak in backward (GiB) | resident vs none |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if None in (none, r["resident"]) else f"{100 * r['resident'] / none:.1f}%"
        print(f"| {r['policy']} | {r['checkpointed']} | {_gib(r['resident'])} | "
              f"{_gib(r['host'])} | {_gib(r['peak'])} | {ratio} |")


if __name__ == "__main__":
    main()
