"""bench/train.py's building blocks (the script itself runs in tests/test_bench_smoke.py): every
system trains on the same (position, target) pairs, the FLOP formulas, and one loss computed the
Ember way, the HF way (head on every token, or on the answers only) and the HF + Ember-kernels
way on identical weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling _harness
    try:
        spec = importlib.util.spec_from_file_location("bench_train", BENCH / "train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("bench_train", None)


def test_same_targets_for_every_system(bench):
    data = bench.make_data(3, 40, 100, seed=4, prompt_frac=0.3)
    hf = data.hf
    # HF shifts its labels inside the loss; Ember's are pre-shifted. Same pairs either way.
    shifted = torch.nn.functional.pad(hf["labels"][:, 1:], (0, 1), value=-100).reshape(1, -1)
    assert torch.equal(shifted, data.ember.labels)
    assert data.ember.num_loss_tokens == int((shifted != -100).sum()) > 0
    # Documents: cu_seqlens starts exactly where position_ids restart (and at every row start).
    starts = (hf["position_ids"].reshape(-1) == 0).nonzero().squeeze(1)
    assert torch.equal(data.ember.cu_seqlens[:-1].long(), starts)
    assert data.ember.cu_seqlens[-1] == data.tokens == 120
    lens = data.ember.cu_seqlens.diff()
    assert data.sum_len_sq == int((lens.long() ** 2).sum()) and lens.min() >= 2
    assert torch.equal(data.ember.input_ids, hf["input_ids"].reshape(1, -1))


def test_flop_formulas(bench):
    cfg = bench.ModelConfig(**bench.SHAPES["llama-3.1-8b"])
    n = bench.matmul_params(cfg)
    # Every parameter but the input embedding and the norm weights is a matmul weight.
    norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
    assert n == cfg.num_params() - cfg.vocab_size * cfg.hidden_size - norms == 7_504_658_432
    data = bench.make_data(1, 64, 10, seed=0)
    full = bench.Workload("f", "llama-3.1-8b", "full", 0, (64,), 64, False)
    lora = bench.Workload("l", "llama-3.1-8b", "lora", 16, (64,), 64, False)
    attn = 6 * 32 * 32 * 128 * data.sum_len_sq
    assert bench.model_flops(cfg, full, data, 0) == 6 * n * 64 + attn
    assert bench.model_flops(cfg, lora, data, 1000) == (4 * n + 6000) * 64 + attn


def test_one_loss_four_ways(bench):
    transformers = pytest.importorskip("transformers")
    from ember.engine.losses import sft_loss
    from ember.models.hf import config_to_hf, to_hf_state_dict

    cfg = bench.ModelConfig(**bench.SHAPES["tiny"])
    wl = bench.Workload("t", "tiny", "full", 0, (24,), 48, False)
    torch.manual_seed(0)
    ember = bench.build_ember(cfg, wl, "cpu")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg)))
    hf.load_state_dict(to_hf_state_dict(ember.state_dict(), cfg), strict=False)
    hf.tie_weights()
    data = bench.make_data(2, 24, cfg.vocab_size, seed=1, prompt_frac=0.25)
    want = sft_loss(ember, data.ember, data.ember.num_loss_tokens)
    got = hf(**data.hf).loss
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)
    # HF with the head on the answer tokens only: the same loss, and the same gradients.
    answers = bench.hf_answer_loss(hf, data.hf)
    assert torch.allclose(answers, want, rtol=1e-5, atol=0), (answers, want)
    g_all = torch.autograd.grad(got, hf.model.layers[0].mlp.up_proj.weight)[0]
    g_ans = torch.autograd.grad(answers, hf.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(g_ans, g_all, rtol=1e-4, atol=1e-7)
    bench.accelerate(hf)
    assert torch.allclose(hf(**data.hf).loss, want, rtol=1e-5, atol=0)


def test_base_dtype_rule(bench):
    """The frozen base is bf16 wherever the matmuls run in bf16, for every system alike; full
    fine-tuning keeps fp32 master weights."""
    wl = {m: bench.Workload(m, "tiny", m, 8, (32,), 64, False) for m in ("lora", "qlora", "full")}
    assert bench.base_dtype(wl["lora"], "cuda") == torch.bfloat16
    assert bench.base_dtype(wl["qlora"], "cpu", cpu_bf16=True) == torch.bfloat16
    assert bench.base_dtype(wl["lora"], "cpu") == torch.float32
    assert bench.base_dtype(wl["full"], "cuda") == torch.float32
