"""Every kernel's autograd.Function is once-differentiable. A second-order gradient (a gradient
penalty, ``create_graph=True``) must fail loudly, not come back as a constant that a later
backward silently drops (or, on the chunked cross-entropy path, crash inside ``mm(out=...)``)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import (
    NF4Weight,
    apply_rope,
    flash_attention,
    geglu,
    linear_cross_entropy,
    lora_linear,
    lora_mlp,
    nf4_linear,
    rms_norm,
    swiglu,
)


def _rg(*shape):
    return torch.randn(*shape, requires_grad=True)


def _cases():
    x = _rg(3, 16)
    nf4 = NF4Weight.quantize(torch.randn(8, 16), 64)
    w3 = [torch.randn(12, 16), torch.randn(12, 16), torch.randn(16, 12)]
    a3 = [torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 12)]
    b3 = [torch.randn(12, 2), torch.randn(12, 2), torch.randn(16, 2)]
    q, k = _rg(1, 4, 2, 16), _rg(1, 4, 1, 16)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    labels = torch.randint(0, 11, (3,))
    head = torch.randn(11, 16)
    return {
        "rms_norm": (lambda impl: rms_norm(x, torch.randn(16), impl=impl), x),
        "rope": (lambda impl: apply_rope(q, k, cos, sin, impl=impl)[0], q),
        "swiglu": (lambda impl: swiglu(x, torch.randn(3, 16), impl=impl), x),
        "geglu": (lambda impl: geglu(x, torch.randn(3, 16), impl=impl), x),
        "attention": (lambda impl: flash_attention(q, k, k.detach(), impl=impl), q),
        "cross_entropy": (lambda impl: linear_cross_entropy(x, head, labels, impl=impl), x),
        "nf4_linear": (lambda impl: nf4_linear(x, nf4, impl=impl), x),
        "lora_linear": (lambda impl: lora_linear(x, torch.randn(8, 16), torch.randn(2, 16),
                                                 torch.randn(8, 2), 2.0, impl=impl), x),
        "lora_mlp": (lambda impl: lora_mlp(x, w3, a3, b3, 2.0, impl=impl), x),
    }


# Every op on its Triton path, and the chunked PyTorch cross-entropy (the CPU default).
@pytest.mark.parametrize("op,impl", [(op, "triton") for op in _cases()] + [("cross_entropy", None)])
def test_second_order_gradient_is_refused(op, impl):
    fn, x = _cases()[op]
    out = fn(impl)
    (g,) = torch.autograd.grad(out.float().pow(2).sum(), x, create_graph=True)
    assert g.requires_grad, "the first-order gradient must carry a graph that refuses"
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (out.float().sum() + g.pow(2).sum()).backward()
