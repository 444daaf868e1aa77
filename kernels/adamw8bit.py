"""One AdamW step with blockwise 8-bit states, byte-compatible with bitsandbytes 0.50
(``bnb.optim.AdamW8bit``; its CPU kernel ``_optimizer_update_8bit_blockwise_cpu`` is the oracle).

State of a parameter with n elements (flattened row-major, blocks of B = 256 values, the last one
partial): ``state1`` / ``state2`` uint8 (n,) codes of m and v, ``absmax1`` / ``absmax2`` fp32
(ceil(n/B),) per-block scales. m uses bnb's signed dynamic map (``dynamic_map(True)``), v the
unsigned one (``dynamic_map(False)``); both are 256 sorted fp32 values in [-1, 1].

One step t (>= 1), every operation in fp32 (rounded once each, in this order, which is what
torch's CPU kernels do for bnb's ``mul_/add_/addcmul_/addcdiv_`` calls; fma = one rounding):
  m = qmap1[state1] * absmax1[b]                    v = qmap2[state2] * absmax2[b]
  m = fma(g, 1 - beta1, m * beta1)                  v = fma((1 - beta2) * g, g, v * beta2)
  c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)          (Python doubles, then fp32 scalars)
  denom = sqrt(v) / c2 + eps                        (IEEE division; sqrt: see below)
  p = p * (1 - lr * wd)                             (decoupled weight decay, skipped when wd = 0)
  p = p + ((-lr / c1) * m) / denom                  then rounded to p's dtype (RNE)
Requantization of the *new* m and v (the update above used them unquantized), per block b:
  absmax_b = max |x| over the block, NaN left out (bnb's fmax); a block of zeros (or of NaNs)
  stores absmax 0 and codes 0; a NaN value takes code 0;
  s = clamp(x * (1 / absmax_b), -1, 1); code = lut[int(((s + 1) * 0.5) * 65535 + 0.5)]
  with lut[i] = #{map midpoints 0.5 * (map[k] + map[k+1]) < -1 + 2i / 65535}: bnb's CPU rule
  (a 65536-entry table, not quite nearest: a value within 1/65535 of a midpoint may take the
  farther code). bnb's CUDA kernel searches the map directly, so state bytes bnb writes on a GPU
  can differ from ours by one code at such ties; the dequantized states then differ by one code
  step, the parameter update by the matching few ulps.

Contract: p fp32/fp16/bf16, contiguous (any shape); grad same shape, fp32/fp16/bf16, contiguous;
states contiguous; absmax may be longer than ceil(n/B) (a sharded parameter pads its shard's
absmax to a common length): the extra entries are neither read nor written. Everything is updated
in place. The Triton kernel does a block in one pass: read p, g, 2 state bytes and 2 scales, write
p, 2 bytes and 2 scales (~2 x 4 + 2 x 2 + 4 bytes per fp32 parameter). Launches disable FMA
contraction (the fmas above are explicit) and use correctly rounded sqrt and division, so the
kernel's m, v, codes and scales equal the reference's bit for bit. The parameter may differ in its
last bit: torch's CPU sqrt (MKL) is within 1 ulp but not always correctly rounded, and it is what
both the reference and bnb's CPU path use (the reference equals bnb bit for bit on CPU).
Limits: the Triton kernel takes < 2^31 values per tensor; percentile clipping, max_unorm and paged
states (bnb options AdamW8bit leaves off) are not implemented.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton

BLOCKSIZE = 256
_LUT_SIZE = 65536


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (``create_dynamic_map(signed, 7, 8)``): 256 sorted fp32.
    Per exponent i = 0..6, the midpoints of 2^i (signed) or 2^(i+1) (unsigned) equal steps of
    [0.1, 1] scaled by 10^(i-6), mirrored for signed; plus 0 and 1 (signed: one more 0 pad)."""
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()  # fp32 products, as bnb
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bnb's CPU quantization table for a sorted 256-entry map: (65536,) uint8."""
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid, grid, side="left").to(torch.uint8)


@functools.cache
def _build_tables() -> tuple[torch.Tensor, ...]:
    q1, q2 = dynamic_map(True), dynamic_map(False)
    return q1, q2, quantize_lut(q1), quantize_lut(q2)


# Dynamo ignores functools.cache and traces a cached function's body, where building a map (a
# float tensor's tolist()) is unsupported: double-quantizing NF4 failed under fullgraph. So the
# tables are built outside the graph, once (not at import: ~0.2 s), and enter it as constants.
@torch.compiler.assume_constant_result
def _cpu_tables() -> tuple[torch.Tensor, ...]:
    return _build_tables()


@functools.cache
def _tables(device: torch.device):
    """(signed map, unsigned map, their lookup tables) on device."""
    return tuple(t.to(device) for t in _cpu_tables())


# ----------------------------------------------------------------------------------- reference
def dequantize_blockwise_ref(codes: torch.Tensor, absmax: torch.Tensor, signed: bool
                             ) -> torch.Tensor:
    """fp32 values of uint8 codes (n,) with per-block scales: map[code] * absmax[block]."""
    n = codes.numel()
    qmap = _tables(codes.device)[0 if signed else 1]
    scale = absmax[: -(-n // BLOCKSIZE)].repeat_interleave(BLOCKSIZE)[:n]
    return (qmap[codes.reshape(-1).long()] * scale).view(codes.shape)


def quantize_blockwise_ref(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, fp32 absmax (ceil(n/256),)) by bnb's CPU rule (see top)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // BLOCKSIZE)
    blocks = torch.nn.functional.pad(flat, (0, nb * BLOCKSIZE - n)).view(nb, BLOCKSIZE)
    # NaN does not count (bnb takes the max with C's fmax): one NaN leaves its block's scale,
    # and so its other 255 values, finite; a block of NaNs stores 0.
    a = blocks.abs()
    am = torch.where(a.isnan(), torch.zeros_like(a), a).amax(1)
    inv = torch.where(am > 0, 1.0 / am, torch.zeros_like(am))
    s = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    lut = _tables(x.device)[2 if signed else 3]
    # A NaN value, or a zero in a block of subnormal absmax (1 / absmax = inf), scales to NaN:
    # bnb's C code gives it code 0 (its index conversion), never an out-of-range table read.
    q = lut[((s + 1.0) * 0.5 * 65535.0 + 0.5).nan_to_num(0.0).to(torch.int32)]
    q = torch.where(am[:, None] > 0, q, torch.zeros_like(q))
    return q.reshape(-1)[:n].view(x.shape), am


def adam_moments_(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta1: float, beta2: float,
                  step: int) -> tuple[float, float]:
    """Adam's moment update in place, in bnb's operation order (m = beta1 m + (1 - beta1) g,
    v = beta2 v + (1 - beta2) g^2), fp32; returns the bias corrections (1 - beta1^t,
    sqrt(1 - beta2^t)). Shared with the 32-bit update of ``ember.engine.optim8bit``."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def adamw8bit_step_ref(p: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor,
                       state2: torch.Tensor, absmax1: torch.Tensor, absmax2: torch.Tensor, *,
                       step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                       eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """The spec of ``adamw8bit_step`` (p, grad of one shape, fp32/fp16/bf16; uint8 states; fp32
    absmax), in PyTorch; bnb's CPU result bit for bit."""
    nb = -(-p.numel() // BLOCKSIZE)
    m = dequantize_blockwise_ref(state1, absmax1, True).view(p.shape)
    v = dequantize_blockwise_ref(state2, absmax2, False).view(p.shape)
    pf = p.float()
    c1, c2 = adam_moments_(m, v, grad.float(), beta1, beta2, step)
    denom = (v.sqrt() / c2).add_(eps)
    if weight_decay > 0.0:
        pf.mul_(1.0 - lr * weight_decay)
    pf.addcdiv_(m, denom, value=-lr / c1)
    p.copy_(pf)
    q1, a1 = quantize_blockwise_ref(m, True)
    q2, a2 = quantize_blockwise_ref(v, False)
    state1.copy_(q1.view(state1.shape))
    state2.copy_(q2.view(state2.shape))
    absmax1[:nb] = a1
    absmax2[:nb] = a2


# -------------------------------------------------------------------------------------- triton
@triton.jit
def _load_f32(X, idx, mask, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # bf16 read as raw 16 bits: exact in the interpreter as on the GPU
        bits = tl.load(X + idx, mask=mask, other=0).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _requantize(x, LUT):
    """(codes, absmax) of the fp32 tile x (ROWS, BLOCK): one block per row, bnb's CPU rule."""
    a = tl.abs(x)
    am = tl.max(tl.where(a == a, a, 0.0), axis=1)  # NaN does not count, as in the reference
    inv = tl.math.div_rn(tl.full(am.shape, 1.0, tl.float32), tl.where(am > 0, am, 1.0))
    s = tl.where(am[:, None] > 0, x * inv[:, None], 0.0)  # a block of zeros: codes 0
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    t = ((s + 1.0) * 0.5) * 65535.0 + 0.5
    t = tl.where(t == t, t, 0.0)  # NaN (a zero in a block of subnormal absmax): code 0, as bnb
    q = tl.load(LUT + t.to(tl.int32))
    return tl.where(am[:, None] > 0, q, 0).to(tl.uint8), am


@triton.jit
def _adamw8bit_kernel(P, G, S1, S2, ABSMAX1, ABSMAX2, QMAP1, QMAP2, LUT1, LUT2, N,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay,
                      neg_step, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      P_BF16: tl.constexpr, G_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) blocks of this program
    idx = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK)
    mask = idx < N
    bmask = blk * BLOCK < N
    p = _load_f32(P, idx, mask, P_BF16)
    g = _load_f32(G, idx, mask, G_BF16)
    c1 = tl.load(S1 + idx, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(S2 + idx, mask=mask, other=0).to(tl.int32)
    a1 = tl.load(ABSMAX1 + blk, mask=bmask, other=0.0)
    a2 = tl.load(ABSMAX2 + blk, mask=bmask, other=0.0)
    m = tl.load(QMAP1 + c1) * a1[:, None]
    v = tl.load(QMAP2 + c2) * a2[:, None]
    m = tl.fma(g, one_minus_beta1, m * beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    m = tl.where(mask, m, 0.0)  # padding must not reach the block's absmax
    v = tl.where(mask, v, 0.0)
    denom = tl.math.div_rn(tl.sqrt_rn(v), correction2) + eps
    p = p * decay
    p = p + tl.math.div_rn(neg_step * m, denom)
    if P_BF16:  # round to nearest even by hand: exact in the interpreter as on the GPU
        bits = p.to(tl.uint32, bitcast=True)
        tl.store(P + idx, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16), mask=mask)
    else:
        tl.store(P + idx, p.to(P.dtype.element_ty), mask=mask)
    q1, am1 = _requantize(m, LUT1)
    q2, am2 = _requantize(v, LUT2)
    tl.store(S1 + idx, q1, mask=mask)
    tl.store(S2 + idx, q2, mask=mask)
    tl.store(ABSMAX1 + blk, am1, mask=bmask)
    tl.store(ABSMAX2 + blk, am2, mask=bmask)


def _spec(pt: str, gt: str, rows: int):
    sig = {"P": pt, "G": gt, "S1": "*u8", "S2": "*u8", "ABSMAX1": "*fp32", "ABSMAX2": "*fp32",
           "QMAP1": "*fp32", "QMAP2": "*fp32", "LUT1": "*u8", "LUT2": "*u8", "N": "i32"}
    sig |= {k: "fp32" for k in ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                "correction2", "eps", "decay", "neg_step")}
    sig |= {k: "constexpr" for k in ("BLOCK", "ROWS", "P_BF16", "G_BF16")}
    return (_adamw8bit_kernel, sig, {"BLOCK": BLOCKSIZE, "ROWS": rows, "P_BF16": pt == "*u16",
                                     "G_BF16": gt == "*u16"},
            {"num_warps": 4, "enable_fp_fusion": False})


COMPILE_SPECS = [_spec("*fp32", "*fp32", 4), _spec("*u16", "*u16", 4), _spec("*fp16", "*fp16", 1)]


def _rows(device: torch.device) -> int:
    return 4 if device.type == "cuda" else 2  # 1024 values per GPU program; interpreter: small


def _adamw8bit_step(p, grad, state1, state2, absmax1, absmax2, step, lr, beta1, beta2, eps,
                    weight_decay) -> None:
    n = p.numel()
    if n == 0:
        return
    qmap1, qmap2, lut1, lut2 = _tables(p.device)
    p_bf16, g_bf16 = p.dtype == torch.bfloat16, grad.dtype == torch.bfloat16
    pk = p.view(torch.uint16) if p_bf16 else p
    gk = grad.view(torch.uint16) if g_bf16 else grad
    rows = _rows(p.device)
    c1 = 1.0 - beta1**step
    decay = 1.0 - lr * weight_decay if weight_decay > 0.0 else 1.0
    grid = (triton.cdiv(triton.cdiv(n, BLOCKSIZE), rows),)
    _adamw8bit_kernel[grid](
        pk, gk, state1, state2, absmax1, absmax2, qmap1, qmap2, lut1, lut2, n,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), eps, decay,
        -lr / c1, BLOCK=BLOCKSIZE, ROWS=rows, P_BF16=p_bf16, G_BF16=g_bf16, num_warps=4,
        enable_fp_fusion=False)


def _number(op: str, name: str, value) -> float | int:
    """A hyperparameter as a Python number: torch.optim keeps ``step`` (and may keep ``lr``) as a
    0-d tensor, which the launcher passed to the kernel as a pointer and the reference used in
    fp32 arithmetic where bitsandbytes uses Python floats (one host read)."""
    given = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{op}: {name} must be a number (or a one-element real tensor), got "
                             f"a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif not isinstance(value, (bool, int, float)):
        try:  # NumPy scalars and the like
            value = float(value)
        except (TypeError, ValueError):
            value = True  # refused below
    if isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be a number, got {given!r}")
    return int(value) if name == "step" and float(value).is_integer() else value


def adamw8bit_step(p: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor,
                   state2: torch.Tensor, absmax1: torch.Tensor, absmax2: torch.Tensor, *,
                   step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, impl: str | None = None) -> None:
    """One in-place AdamW step of p and its 8-bit state (bitsandbytes' ``AdamW8bit``).

    p and grad: one shape, fp32/fp16/bf16, contiguous; state1/state2: uint8 with p's numel;
    absmax1/absmax2: fp32 (>= ceil(n/256),). Everything is updated in place; returns None. See
    the module docstring."""
    op = "adamw8bit_step"
    check_tensors(op, p=p, grad=grad, state1=state1, state2=state2, absmax1=absmax1,
                  absmax2=absmax2)
    check_dtype(op, "p", p)
    check_dtype(op, "grad", grad)
    step, lr, beta1, beta2, eps, weight_decay = (
        _number(op, name, value) for name, value in (
            ("step", step), ("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
            ("weight_decay", weight_decay)))
    n, nb = p.numel(), -(-p.numel() // BLOCKSIZE)
    if grad.shape != p.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != p shape {tuple(p.shape)}")
    for name, s in (("state1", state1), ("state2", state2)):
        if s.dtype != torch.uint8 or s.numel() != n:
            raise ValueError(f"{op}: {name} must be uint8 with {n} elements (one per value of "
                             f"p), got {s.dtype} with {s.numel()}")
    for name, a in (("absmax1", absmax1), ("absmax2", absmax2)):
        if a.dtype != torch.float32 or a.dim() != 1 or a.numel() < nb:
            raise ValueError(f"{op}: {name} must be fp32 (>= {nb},) (one scale per "
                             f"{BLOCKSIZE} values), got {a.dtype} {tuple(a.shape)}")
    ts = (p, grad, state1, state2, absmax1, absmax2)
    if any(t.device != p.device for t in ts) or not all(t.is_contiguous() for t in ts):
        raise ValueError(f"{op}: p, grad, states and absmax must be contiguous and on one device")
    if not step >= 1 or not lr >= 0 or not eps > 0 or not weight_decay >= 0:
        raise ValueError(f"{op}: need step >= 1, lr >= 0, eps > 0, weight_decay >= 0; got "
                         f"step={step} lr={lr} eps={eps} weight_decay={weight_decay}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"{op}: betas must be in [0, 1), got ({beta1}, {beta2})")
    if torch.is_grad_enabled() and p.requires_grad:  # the reference failed deep in p.copy_
        raise ValueError(f"{op}: p requires grad and grad mode is on; call the step under "
                         "torch.no_grad(), as torch.optim optimizers do")
    if use_triton(p, impl, op):
        if n >= 2**31 - BLOCKSIZE:
            raise ValueError(f"{op}: the Triton kernel takes < 2^31 values per tensor, got {n}; "
                             "use impl='ref'")
        with _dispatch.device_guard(p):
            _adamw8bit_step(p, grad, state1, state2, absmax1, absmax2, step, lr, beta1, beta2,
                            eps, weight_decay)
        # Written through raw pointers: tell autograd, as torch's in-place ops do, so a graph
        # that saved p (a retained one) fails loudly in backward instead of reading the new p.
        torch.autograd.graph.increment_version([p, state1, state2, absmax1, absmax2])
    else:
        adamw8bit_step_ref(p, grad, state1, state2, absmax1, absmax2, step=step, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
