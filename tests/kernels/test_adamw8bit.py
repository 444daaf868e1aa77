"""adamw8bit: the reference is bitsandbytes' CPU AdamW8bit byte for byte; Triton == reference.

bitsandbytes (0.50, CPU path) is the oracle here; the optimizer-level parity (param groups, the
32-bit path of small parameters, several lrs) is in tests/engine/test_optim8bit.py.
"""

import pytest
import torch

import ember.kernels.adamw8bit as k
from ember.kernels.adamw8bit import (
    BLOCKSIZE,
    adamw8bit_step,
    dequantize_blockwise_ref,
    dynamic_map,
    quantize_blockwise_ref,
)
from tests.numerics import assert_close_to_ref

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def _moments(n: int, seed: int) -> torch.Tensor:
    """Values over many decades (like Adam's v), with an all-zero block and a huge block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 3, (n,), generator=g)
    x[BLOCKSIZE:2 * BLOCKSIZE] = 0.0
    x[3 * BLOCKSIZE:3 * BLOCKSIZE + 40] *= 1e12
    return x


def test_maps_match_bitsandbytes():
    assert torch.equal(dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), F.create_dynamic_map(signed=False))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_bitsandbytes(signed):
    x = _moments(BLOCKSIZE * 9 + 77, seed=int(signed))
    if not signed:
        x = x.abs()
    code = F.create_dynamic_map(signed=signed)
    q_bnb, am_bnb = torch.ops.bitsandbytes.quantize_blockwise(x, code, BLOCKSIZE)
    q, am = quantize_blockwise_ref(x, signed)
    assert torch.equal(am, am_bnb) and torch.equal(q, q_bnb)
    deq = torch.ops.bitsandbytes.dequantize_blockwise(q_bnb, am_bnb, code, BLOCKSIZE,
                                                      torch.float32)
    assert torch.equal(dequantize_blockwise_ref(q, am, signed), deq)


def _nearest(x: torch.Tensor, signed: bool):
    """Round to the nearest map entry: the obvious rule, which is not bnb's."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // BLOCKSIZE)
    blocks = torch.nn.functional.pad(flat, (0, nb * BLOCKSIZE - n)).view(nb, BLOCKSIZE)
    am = blocks.abs().amax(1)
    s = blocks / am.clamp_min(1e-38)[:, None]
    q = (s[..., None] - dynamic_map(signed)).abs().argmin(-1).to(torch.uint8)
    return q.reshape(-1)[:n].view(x.shape), am


def _bnb_steps(p0, grads, lr, wd):
    p = torch.nn.Parameter(p0.clone())
    opt = bnb.optim.AdamW8bit([p], lr=lr, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    s = opt.state[p]
    return p.data, s["state1"], s["state2"], s["absmax1"], s["absmax2"]


def _our_steps(p0, grads, lr, wd, impl="ref"):
    p = p0.clone()
    nb = -(-p.numel() // BLOCKSIZE)
    s1, s2 = torch.zeros_like(p, dtype=torch.uint8), torch.zeros_like(p, dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    for t, g in enumerate(grads, 1):
        adamw8bit_step(p, g.clone(), s1, s2, a1, a2, step=t, lr=lr, weight_decay=wd, impl=impl)
    return p, s1, s2, a1, a2


def _grads(shape, steps, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        x = torch.randn(shape, generator=g).reshape(-1) * 10.0 ** (t % 3 - 1)
        x[:BLOCKSIZE] = 0.0  # a block that never sees a gradient
        x[2 * BLOCKSIZE:2 * BLOCKSIZE + 30] *= 1e6  # a block dominated by a few huge values
        out.append(x.view(shape).to(dtype))
    return out


@pytest.mark.parametrize("shape,dtype,lr,wd", [((40, 131), torch.float32, 1e-3, 0.1),
                                               ((4096 + 77,), torch.float32, 3e-2, 0.0),
                                               ((64, 80), torch.bfloat16, 1e-2, 0.01)])
def test_ref_is_bitsandbytes_bit_for_bit(shape, dtype, lr, wd):
    """Params, state bytes and scales equal bnb's after every one of several steps."""
    torch.manual_seed(0)
    p0 = torch.randn(shape).to(dtype)
    grads = _grads(shape, 5, seed=1, dtype=dtype)
    for steps in (1, 5):
        ours, theirs = _our_steps(p0, grads[:steps], lr, wd), _bnb_steps(p0, grads[:steps], lr, wd)
        names = ("p", "state1", "state2", "absmax1", "absmax2")
        for name, a, b in zip(names, ours, theirs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, steps)


def test_parity_fails_with_nearest_rounding(monkeypatch):
    """The bit-for-bit check has teeth: rounding to the nearest code (not bnb's lookup table)
    changes state bytes within one step."""
    p0 = torch.randn(4096 + 77)
    grads = _grads(p0.shape, 1, seed=2)
    monkeypatch.setattr(k, "quantize_blockwise_ref", _nearest)
    ours, theirs = _our_steps(p0, grads, 1e-3, 0.0), _bnb_steps(p0, grads, 1e-3, 0.0)
    assert not torch.equal(ours[2], theirs[2])


# triton 3.6's interpreter (the GPU machine's version) rounds tl.fma twice; 3.9's and GPUs fuse it
try:
    import triton

    _FMA_ROUNDS_TWICE = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
except ImportError:
    _FMA_ROUNDS_TWICE = False


@pytest.mark.parametrize("shape,dtype", [((3, 300), torch.float32), ((7, 93), torch.bfloat16)])
def test_triton_matches_ref(shape, dtype):
    """Triton (interpreter on CPU) against the reference: state bytes and scales identical;
    params by the numerics rule (torch's CPU sqrt, MKL's, is not always correctly rounded: the
    kernel's is, so a parameter may differ in its last bit)."""
    torch.manual_seed(3)
    p0 = torch.randn(shape)
    grads = _grads(shape, 2, seed=4)
    tri = _our_steps(p0.to(dtype), [g.to(dtype) for g in grads], 1e-2, 0.1, impl="triton")
    ref = _our_steps(p0.to(dtype), [g.to(dtype) for g in grads], 1e-2, 0.1, impl="ref")
    ref32 = _our_steps(p0, [g.to(dtype).float() for g in grads], 1e-2, 0.1, impl="ref")
    assert_close_to_ref("p", tri[0], ref[0], ref32[0])
    assert tri[0].dtype == dtype
    names = ("state1", "state2", "absmax1", "absmax2")
    if _FMA_ROUNDS_TWICE:  # triton < 3.7's interpreter: an absmax may be 1 ulp off, and a state
        for name, a, b in zip(names, tri[1:], ref[1:], strict=True):  # byte 1 code from it
            if name.startswith("absmax"):
                torch.testing.assert_close(a, b, rtol=2.5e-7, atol=0.0, msg=name)
            else:
                assert (a.int() - b.int()).abs().max() <= 1, name
        return
    for name, a, b in zip(names, tri[1:], ref[1:], strict=True):
        assert torch.equal(a, b), name


def test_errors_say_what_to_do():
    p = torch.randn(300)
    s = torch.zeros(300, dtype=torch.uint8)
    with pytest.raises(ValueError, match="absmax1 must be fp32"):
        adamw8bit_step(p, p.clone(), s, s.clone(), torch.zeros(1), torch.zeros(2), step=1,
                       lr=1e-3)
    with pytest.raises(ValueError, match="state2 must be uint8"):
        adamw8bit_step(p, p.clone(), s, s.float(), torch.zeros(2), torch.zeros(2), step=1,
                       lr=1e-3)
    with pytest.raises(ValueError, match="step >= 1"):
        adamw8bit_step(p, p.clone(), s, s.clone(), torch.zeros(2), torch.zeros(2), step=0,
                       lr=1e-3)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_zeros_in_a_block_of_subnormal_moments_match_bitsandbytes(impl):
    """A moment block whose absmax is subnormal (a state decayed for ~800 steps without gradient)
    has 1 / absmax = inf, so its exact zeros scale to NaN: bnb gives them code 0; we crashed
    with an out-of-range table index (reference) or read past the table (Triton)."""
    x = torch.zeros(2 * BLOCKSIZE + 5)
    x[:3] = torch.tensor([2e-39, -3e-41, 1e-41])
    x[BLOCKSIZE + 7] = -1e-40
    code = F.create_dynamic_map(signed=True)
    q_bnb, am_bnb = torch.ops.bitsandbytes.quantize_blockwise(x, code, BLOCKSIZE)
    q, am = quantize_blockwise_ref(x, True)
    assert torch.equal(am, am_bnb) and torch.equal(q, q_bnb)
    # The whole step, from such a state, against bnb's AdamW8bit.
    p0, n = torch.randn(4096), 4096
    g = torch.zeros(n)
    s1 = torch.full((n,), 127, dtype=torch.uint8)  # code 127 is 0.0
    s1[::7] = 255
    s2 = torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.full((n // BLOCKSIZE,), 2e-39), torch.zeros(n // BLOCKSIZE)
    pb = torch.nn.Parameter(p0.clone())
    opt = bnb.optim.AdamW8bit([pb], lr=1e-3)
    pb.grad = g.clone()
    opt.step()  # creates the state; then put ours in and step again
    st = opt.state[pb]
    for name, t in (("state1", s1), ("state2", s2), ("absmax1", a1), ("absmax2", a2)):
        st[name].copy_(t)
    pb.data.copy_(p0)
    opt.step()
    p = p0.clone()
    adamw8bit_step(p, g, s1, s2, a1, a2, step=2, lr=1e-3, weight_decay=1e-2, impl=impl)
    for a, b in ((p, pb.data), (s1, st["state1"]), (a1, st["absmax1"]), (s2, st["state2"])):
        assert torch.equal(a, b)


def _nan_grad(n: int) -> torch.Tensor:
    """A gradient with one NaN in block 0, a block of NaNs (block 2) and a NaN next to an inf."""
    g = torch.randn(n)
    g[5] = float("nan")
    g[2 * BLOCKSIZE:3 * BLOCKSIZE] = float("nan")
    g[3 * BLOCKSIZE + 1], g[3 * BLOCKSIZE + 9] = float("nan"), float("inf")
    return g


def test_quantize_skips_nan_as_bitsandbytes():
    """bnb's CPU quantizer takes a block's absmax with fmax, which drops NaN (an all-NaN block
    stores 0), and gives a NaN code 0; the reference's amax propagated NaN, so one NaN made its
    block's absmax NaN and every other code of the block 0."""
    x = _nan_grad(5 * BLOCKSIZE + 7)
    for signed in (True, False):
        xx = x if signed else x.abs()
        code = F.create_dynamic_map(signed=signed)
        q_bnb, am_bnb = torch.ops.bitsandbytes.quantize_blockwise(xx, code, BLOCKSIZE)
        q, am = quantize_blockwise_ref(xx, signed)
        assert torch.equal(am, am_bnb) and torch.equal(q, q_bnb)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_nan_gradient_matches_bitsandbytes(impl):
    """A NaN gradient (a user calling the step directly; Ember's trainer skips such a step) turns
    only its own parameters to NaN, as bnb's AdamW8bit: the reference turned the NaN's whole
    block of 256 parameters to NaN at the next step (its state scale was NaN)."""
    n = 4096 + 77
    torch.manual_seed(7)
    p0, grads = torch.randn(n), [_nan_grad(n), torch.randn(n)]
    ours, theirs = _our_steps(p0, grads, 1e-3, 0.01, impl=impl), _bnb_steps(p0, grads, 1e-3, 0.01)
    for name, a, b in zip(("state1", "state2", "absmax1", "absmax2"), ours[1:], theirs[1:],
                          strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(ours[0].isnan(), theirs[0].isnan())
    assert int(ours[0][:2 * BLOCKSIZE].isnan().sum()) == 1  # (an inf scale: its block is NaN)
    fin = ~theirs[0].isnan()
    if impl == "ref":
        assert torch.equal(ours[0][fin], theirs[0][fin])
    else:  # the kernel's sqrt is correctly rounded, torch's CPU one not always (see top)
        assert_close_to_ref("p", ours[0][fin], theirs[0][fin], theirs[0][fin])
