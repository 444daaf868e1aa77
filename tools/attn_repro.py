"""Minimal GPU repro for the attention kernels: runs each stage with a sync so a fault is pinned
to one launch. Usage: CUDA_LAUNCH_BLOCKING=1 python tools/attn_repro.py [T] [D] [causal]"""

import sys

import torch

from ember.kernels.attention import flash_attention, flash_attention_ref

t = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
d = int(sys.argv[2]) if len(sys.argv) > 2 else 64
causal = (sys.argv[3] == "1") if len(sys.argv) > 3 else False
q = torch.randn(2, t, 8, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(2, t, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(2, t, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
out = flash_attention(q, k, v, causal=causal)
torch.cuda.synchronize()
err = (out.float() - flash_attention_ref(q, k, v, causal=causal).float()).abs().max().item()
print("fwd ok", err, flush=True)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("bwd ok", flush=True)
