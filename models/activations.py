"""MLP activations as transformers computes them (``ACT2FN[config.hidden_act]``, its
``activations.py``), under Ember's names (``ModelConfig.activation``).

Every decoder family transformers builds from a config (Llama, Mistral, Qwen, Phi-3, Gemma 1/2/3,
Phi-1/2...) takes any ``ACT2FN`` name in its MLP, ``down(act(gate(x)) * up(x))``. Two have fused
kernels (``ember.kernels.swiglu``): "silu" (SwiGLU; transformers' "silu", "swish") and
"gelu_tanh" (GeGLU; "gelu_pytorch_tanh" and the same formula written out: "gelu_new",
"gelu_fast", "gelu_accurate", "gelu_python_tanh"; they differ from the fused op by rounding
only). Every other parameter-free ``ACT2FN`` entry is kept under its transformers name and runs
on a plain PyTorch path (``gated``: act(gate) * up in fp32, act recomputed in backward; no
fused LoRA MLP).
"prelu" and "xielu" carry learned parameters in the MLP (``act_fn.weight``...), which Ember's
MLP has no place for: refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ember import EmberError

# the two activations with a fused gated kernel (ember.kernels.swiglu / geglu, lora_mlp)
FUSED = ("silu", "gelu_tanh")


def _laplace(x: torch.Tensor) -> torch.Tensor:
    # transformers' LaplaceActivation defaults: mu = 0.707107, sigma = 0.282095
    return 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0))))


# Ember's name -> the elementwise function, transformers' formulas (activations.py, 5.x)
FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,  # exact (erf); also "gelu_python"
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # nn.LeakyReLU(): slope 0.01
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardswish": F.hardswish,
    "laplace": _laplace,
    "linear": lambda x: x,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}
ACTIVATIONS = tuple(FUNCTIONS)

# transformers' names that are another name (or the written-out formula) of one of Ember's
_ALIASES = {
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_python": "gelu",
}
# the name export writes for each of Ember's (the others: their own)
_HF_NAMES = {"gelu_tanh": "gelu_pytorch_tanh"}
_WITH_PARAMETERS = ("prelu", "xielu")


def from_hf_name(name: object, key: str = "hidden_act", model_type: str | None = None) -> str:
    """Ember's activation for transformers' ``ACT2FN`` name ``name`` (read from ``key`` of a
    ``model_type`` config); EmberError naming the field for a name transformers does not know or
    Ember cannot run."""
    family = f" for {model_type}" if model_type else ""
    if isinstance(name, str) and name in _WITH_PARAMETERS:
        raise EmberError(
            f"config.json: {key} {name!r} is not supported{family}: transformers' {name} "
            "activation has learned parameters in each MLP, which Ember's MLP does not hold"
        )
    if not isinstance(name, str) or name not in supported_hf_names():
        raise EmberError(
            f"config.json: {key} {name!r} is not supported{family} (transformers' ACT2FN names "
            f"Ember computes: {', '.join(sorted(supported_hf_names()))})"
        )
    return _ALIASES.get(name, name)


def supported_hf_names() -> tuple[str, ...]:
    """transformers' activation names that ``from_hf_name`` accepts."""
    return tuple(n for n in (*FUNCTIONS, *_ALIASES) if n not in _HF_NAMES)


def to_hf_name(activation: str, model_type: str = "llama") -> str:
    """The ``ACT2FN`` name export writes for Ember's ``activation`` in ``model_type``'s config:
    Phi's own name of the tanh GELU ("gelu_new", its default); for Gemma v1 the exact GELU as
    "gelu_python", since transformers' GemmaConfig rewrites "gelu" to the tanh GELU."""
    if model_type == "phi" and activation == "gelu_tanh":
        return "gelu_new"
    if model_type == "gemma" and activation == "gelu":
        return "gelu_python"
    return _HF_NAMES.get(activation, activation)


def activation_from_hf(raw: Mapping, model_type: str, key: str, default: str) -> str:
    """Ember's MLP activation of a parsed config.json, read from ``key`` (the field transformers
    5's MLP reads: ``hidden_act``, Gemma 2/3 ``hidden_activation``), else ``default``. Gemma v1
    reads "gelu" as the tanh GELU (transformers' GemmaConfig rewrites the official releases'
    legacy value), and a ``hidden_activation`` beside its ``hidden_act`` must agree with it."""
    act = raw.get(key, default)
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"
    ours = from_hf_name(act, key, model_type)
    other = raw.get("hidden_activation") if model_type == "gemma" else None
    if other is not None and (not isinstance(other, str) or _ALIASES.get(other, other) != ours):
        # transformers 4.40-4.4x computed Gemma's hidden_activation, 5.x computes hidden_act
        raise EmberError(
            f"config.json: hidden_act {act!r} and hidden_activation {other!r} differ; "
            "transformers 5 computes hidden_act and 4.x computed hidden_activation, so make "
            "them agree"
        )
    return ours


def act_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function of Ember's ``activation`` (plain PyTorch, autograd)."""
    return FUNCTIONS[activation]


class _Gated(torch.autograd.Function):
    """act(gate) * up in fp32, output in gate's dtype, saving only gate and up in their own
    dtype (4 bytes/element in bf16, as the fused kernels): backward recomputes act in fp32 and
    its derivative with ``torch.func.vjp`` (traceable by torch.compile, fullgraph). Plain
    autograd through the fp32 formula kept the fp32 copies and act's intermediates: 12-20
    bytes/element."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return (FUNCTIONS[activation](gate.float()) * up.float()).to(gate.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        d = dout.float()
        act, vjp = torch.func.vjp(FUNCTIONS[ctx.activation], gate.float())
        dgate = vjp(d * up.float())[0].to(gate.dtype) if ctx.needs_input_grad[0] else None
        dup = (act * d).to(up.dtype) if ctx.needs_input_grad[1] else None
        return dgate, dup, None


def gated(activation: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """act(gate) * up for an activation without a fused kernel: math in fp32 (as the fused
    kernels do), output in gate's dtype; backward saves gate and up only (``_Gated``)."""
    if activation not in FUNCTIONS:
        raise EmberError(f"unknown activation {activation!r} (one of {', '.join(ACTIVATIONS)})")

    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return _Gated.apply(gate, up, activation)

    return glu
