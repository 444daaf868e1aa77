"""MLP activations against transformers: every parameter-free ``ACT2FN`` name computes
transformers' function, each family's MLP takes any of them (logits, export, a PEFT adapter), and
what Ember cannot run or write is refused naming the field."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ember import EmberError
from ember.models.activations import ACTIVATIONS, act_fn, from_hf_name, gated, supported_hf_names
from ember.models.hf_config import config_from_hf
from ember.models.hf_config_export import config_to_hf
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.transformer import Transformer
from tests.models.test_interop_hf import BASE, PHI3, _hf_logits, _ids, randomize_

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


@pytest.mark.parametrize("name", supported_hf_names())
def test_each_name_computes_transformers_function(name):
    from transformers.activations import ACT2FN

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 6  # past relu6's clip
    ours, ref = act_fn(from_hf_name(name))(x), ACT2FN[name](x)
    assert (ours - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
    g, u = x[:2048].bfloat16(), x[2048:].bfloat16()
    glu = gated(from_hf_name(name))(g, u)  # math in fp32, bf16 out
    want = ACT2FN[name](g.float()) * u.float()
    assert glu.dtype == torch.bfloat16
    torch.testing.assert_close(glu.float(), want, rtol=2**-8, atol=1e-5)


def _saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for backward of ``fn(*inputs).sum()`` (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return sum(seen.values()) - out.untyped_storage().nbytes() * (
        out.untyped_storage().data_ptr() in seen
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_saves_gate_and_up_only(activation):
    """``gated`` keeps gate and up in their own dtype for backward (4 bytes/element in bf16, as
    the fused kernels) and recomputes act in fp32 there: the same forward bits, gradients equal
    to autograd's through the fp32 formula (was: that autograd, keeping fp32 copies and act's
    intermediates, 12-20 bytes/element). Also under torch.compile(fullgraph) and checkpoint."""
    fn = act_fn(activation)
    gen = torch.Generator().manual_seed(len(activation))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 2 * 37, generator=gen) * 3
        g, u = (t.to(dtype).contiguous().requires_grad_() for t in x.chunk(2, dim=-1))
        g2, u2 = (t.detach().clone().requires_grad_() for t in (g, u))
        want = (fn(g2.float()) * u2.float()).to(dtype)
        got = gated(activation)(g, u)
        assert got.dtype == dtype and torch.equal(got, want)
        dout = torch.randn(got.shape, generator=gen).to(dtype)
        (want * dout).sum().backward()
        (got * dout).sum().backward()
        tol = dict(rtol=1e-6, atol=1e-7)  # fp32 rounding (bf16: one rounding apart at most)
        if dtype == torch.bfloat16:
            tol = dict(rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(g.grad, g2.grad, **tol)
        torch.testing.assert_close(u.grad, u2.grad, **tol)
        assert _saved_bytes(gated(activation), g, u) == g.nbytes + u.nbytes
    runs = [lambda a, b: checkpoint(gated(activation), a, b, use_reentrant=False)]
    if activation in ("gelu", "relu2", "mish", "laplace"):  # (each compile takes a while)
        torch._dynamo.reset()  # one code object per activation: not the recompile limit
        runs.append(torch.compile(gated(activation), fullgraph=True, backend="aot_eager"))
    for run in runs:
        g3, u3 = (t.detach().clone().requires_grad_() for t in (g, u))
        out = run(g3, u3)
        assert torch.equal(out, got)
        (out * dout).sum().backward()
        torch.testing.assert_close(g3.grad, g.grad, rtol=0, atol=0)
        torch.testing.assert_close(u3.grad, u.grad, rtol=0, atol=0)
    for frozen in (0, 1):  # one input needs no gradient (e.g. one projection frozen)
        a, b = (t.detach().clone().requires_grad_(i != frozen) for i, t in enumerate((g, u)))
        (gated(activation)(a, b) * dout).sum().backward()
        live, ref = (b, u.grad) if frozen == 0 else (a, g.grad)
        assert (a.grad is None) == (frozen == 0) and (b.grad is None) == (frozen == 1)
        assert torch.equal(live.grad, ref)


def _save_scaled(tmp_path, name, cls, **kw):
    """A tiny random transformers model with its gate projections scaled up, so the gate's
    values reach where activations differ (gelu vs its tanh approximation)."""
    base = {k: v for k, v in BASE.items() if cls != "PhiConfig" or k != "rms_norm_eps"}
    config = getattr(transformers, cls)(**{**base, **(PHI3 if cls == "Phi3Config" else {}), **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, len(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate" in n or "fc1" in n:
                p.mul_(4)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize(
    "cls,key,act,wrong",
    [
        ("LlamaConfig", "hidden_act", "gelu", "gelu_tanh"),  # exact GELU: was refused
        ("MistralConfig", "hidden_act", "relu2", "relu"),
        ("Qwen2Config", "hidden_act", "quick_gelu", "silu"),
        ("Qwen3Config", "hidden_act", "relu", "silu"),
        ("Phi3Config", "hidden_act", "gelu_10", "silu"),
        ("GemmaConfig", "hidden_act", "gelu_python", "gelu_tanh"),
        ("Gemma2Config", "hidden_activation", "silu", "gelu_tanh"),  # was refused for Gemma
        ("Gemma3TextConfig", "hidden_activation", "mish", "gelu_tanh"),
        ("PhiConfig", "hidden_act", "relu", "gelu_tanh"),  # the plain (ungated) MLP
        ("MixtralConfig", "hidden_act", "gelu", "gelu_tanh"),  # each expert's MLP
    ],
)
def test_family_with_any_activation_matches_transformers(tmp_path, cls, key, act, wrong):
    """Logits equal transformers' on the checkpoint and on Ember's export of it (the same field
    and name back), and the nearest other activation would be caught."""
    folder = _save_scaled(tmp_path, f"{cls}-{act}", cls, **{key: act})
    model, _ = load_pretrained(folder)
    assert model.cfg.activation == from_hf_name(act)
    ids = _ids()
    with torch.no_grad():
        ours, ref = model(ids), _hf_logits(folder, ids)
        assert _close(ours, ref)
        other = Transformer(model.cfg.replace(activation=wrong))
        other.load_state_dict(model.state_dict())
        assert not _close(other(ids), ref)
    save_pretrained(model, tmp_path / "export")
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw[key] == act  # Gemma v1: "gelu_python", as "gelu" there means the tanh GELU
    if cls == "GemmaConfig":
        # transformers 4.40-4.47's Gemma MLP computes hidden_activation (the tanh GELU when it
        # is missing), 4.48+ hidden_act: both written, the same name (was: hidden_act only)
        assert raw["hidden_activation"] == act
    assert read_config(tmp_path / "export") == model.cfg
    assert _close(ours, _hf_logits(tmp_path / "export", ids))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gemma_v1_export_writes_both_activation_fields(activation):
    """transformers 4.40-4.47's GemmaMLP computes ``hidden_activation`` (the tanh GELU when it
    is missing) and 4.48+ ``hidden_act``: an export writes both, with the same name, and reads
    back as the same config (was: hidden_act only, which 4.40-4.47 ran as the tanh GELU)."""
    from transformers import GemmaConfig

    raw = {**GemmaConfig(**BASE).to_dict(), "hidden_act": "gelu_pytorch_tanh"}
    cfg = config_from_hf(raw).replace(activation=activation)
    out = config_to_hf(cfg)
    assert out["hidden_activation"] == out["hidden_act"]
    assert from_hf_name(out["hidden_activation"]) == activation
    assert config_from_hf(out) == cfg


@pytest.mark.parametrize("cls,act", [("LlamaConfig", "gelu"), ("Gemma2Config", "relu2")])
def test_lora_adapters_both_ways_with_peft(tmp_path, cls, act):
    """A PEFT adapter on every projection of an MLP with a plain-PyTorch activation loads with
    PEFT's logits (the fused LoRA MLP is not used for it), and Ember's trained-looking adapter
    loads in PEFT with Ember's logits."""
    peft = pytest.importorskip("peft")
    from ember.models.lora import load_adapter, save_adapter

    key = "hidden_activation" if cls.startswith("Gemma") else "hidden_act"
    folder = _save_scaled(tmp_path, "base", cls, **{key: act})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager"
        ).eval()
        pm = peft.get_peft_model(
            hf,
            peft.LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
            ),
        )
        pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = pm.eval()(ids).logits
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-2)
        ours = model(ids)
    loss = model.train()(ids).float().square().mean()
    loss.backward()  # the unfused path gives the MLP adapters gradients
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "mlp" in n and "lora_A" in n
    )
    save_adapter(model, tmp_path / "ember")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager"
        ).eval()
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        assert _close(pm(ids).logits, ours)


@pytest.mark.parametrize(
    "cls,key,value,needle",
    [
        ("LlamaConfig", "hidden_act", "prelu", "learned parameters"),
        ("Qwen2Config", "hidden_act", "xielu", "learned parameters"),
        ("Gemma2Config", "hidden_activation", "gelu_tanh", "hidden_activation 'gelu_tanh'"),
        ("MistralConfig", "hidden_act", "swiglu", "hidden_act 'swiglu' is not supported"),
        ("LlamaConfig", "hidden_act", None, "hidden_act None is not supported"),
    ],
)
def test_activations_ember_cannot_run_are_refused(tmp_path, cls, key, value, needle):
    folder = _save_scaled(tmp_path, "act", cls)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(EmberError, match=needle):
        load_pretrained(folder)


@pytest.mark.parametrize(
    "model_type,act",
    [("llama", "gelu_tanh"), ("qwen2", "relu"), ("gemma", "silu"), ("phi3", "gelu")],
)
def test_gguf_export_refuses_an_activation_llama_cpp_does_not_run(tmp_path, model_type, act):
    """llama.cpp's llama/qwen2/phi3 graphs hard-code SiLU and its gemma graphs the tanh GELU,
    and a GGUF file has no activation key: save_gguf refuses such a model naming the
    activation llama.cpp would run, and writes nothing."""
    from ember.models.config import ModelConfig
    from ember.models.gguf_export import save_gguf
    from ember.models.tokenizer import tokenizer_from_gguf
    from tests.models.test_gguf import VOCAB, tiny_tokenizer_md

    gemma = model_type == "gemma"
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        activation=act,
        tie_word_embeddings=gemma,
        norm_offset=1.0 if gemma else 0.0,
        embedding_scale=16**0.5 if gemma else None,
    )
    own = "gelu_tanh" if gemma else "silu"
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    with pytest.raises(
        EmberError, match=f"activation: {act!r} would be read as {own!r}.*merged HF folder"
    ):
        save_gguf(Transformer(cfg).init_weights(std=0.1, seed=0), tok, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
    save_gguf(
        Transformer(cfg.replace(activation=own)).init_weights(std=0.1, seed=0),
        tok,
        tmp_path / "m.gguf",
    )
    assert (tmp_path / "m.gguf").exists()
