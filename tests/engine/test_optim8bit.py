"""AdamW8bit (optim.name="adamw_8bit"): bitsandbytes' AdamW8bit step for step, 2 bytes of state
per parameter, a state_dict round trip, and training / resuming through the real trainer."""

import copy

import pytest
import torch

from ember import EmberError
from ember.engine.config import OptimConfig
from ember.engine.optim8bit import AdamW8bit
from ember.engine.trainer import train
from tests.engine._shared_launch import shares_launch
from tests.engine._tiny import checkpoint_weights, quiet, rows_of, tiny_config


def _params(seed: int = 0) -> list[torch.Tensor]:
    """A 131-column matrix (numel not a multiple of 256), a small vector (< 4096: fp32 states),
    a bf16 matrix, and one more fp32 matrix."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(40, 131, generator=g), torch.randn(100, generator=g),
            torch.randn(64, 80, generator=g).bfloat16(), torch.randn(96, 64, generator=g)]


def _groups(ps, lr_ratio=True):
    return [{"params": ps[:2], "weight_decay": 0.1} | ({"lr_ratio": 0.5} if lr_ratio else {}),
            {"params": ps[2:], "weight_decay": 0.0}]


def _grad(p: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + step)
    x = torch.randn(p.shape, generator=g).reshape(-1) * 10.0 ** (step % 3 - 1)
    if x.numel() > 1024:
        x[:256] = 0.0  # a block without gradient
        x[512:530] *= 1e6  # a block dominated by a few huge gradients
    return x.view(p.shape).to(p.dtype)


def _run(opt, ps, steps, first: int = 1):
    for t in range(first, first + steps):
        for i, g in enumerate(opt.param_groups):  # a schedule: the lr changes every step
            g["lr"] = 1e-2 / t * g.get("lr_ratio", 1.0) * (1 + i)
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt.step()


def test_matches_bitsandbytes_step_for_step():
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = _params(), _params()
    ours = [torch.nn.Parameter(p) for p in ours]
    theirs = [torch.nn.Parameter(p) for p in theirs]
    a = AdamW8bit(_groups(ours), lr=1e-3, impl="ref")
    b = bnb.optim.AdamW8bit(_groups(theirs), lr=1e-3)
    for t in range(1, 5):
        _run(a, ours, 1, first=t)
        _run(b, theirs, 1, first=t)
        for p, q in zip(ours, theirs, strict=True):
            assert p.dtype == q.dtype and torch.equal(p, q)
            sa, sb = a.state[p], b.state[q]
            assert (sa["state1"].dtype == torch.uint8) == (p.numel() >= 4096)
            for key in ("state1", "state2", "absmax1", "absmax2"):
                assert (key in sa) == (key in sb)
                if key in sa:
                    assert torch.equal(sa[key], sb[key]), key
    assert a.param_groups[0]["lr_ratio"] == 0.5  # extra group keys are kept


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def test_state_is_about_two_bytes_per_parameter(one_thread):
    w = torch.nn.Parameter(torch.randn(16, 1024))
    for opt, lo, hi in ((AdamW8bit([w]), 2.0, 2.05), (torch.optim.AdamW([w]), 8.0, 8.0)):
        w.grad = torch.randn_like(w)
        opt.step()
        per_param = _state_bytes(opt) / w.numel()
        assert lo <= per_param <= hi, (type(opt).__name__, per_param)
    assert AdamW8bit([w]).state_bytes() == 0  # lazily created


def test_state_dict_round_trip_resumes_exactly():
    ps = [torch.nn.Parameter(p) for p in _params(1)]
    opt = AdamW8bit(_groups(ps))
    _run(opt, ps, 3)
    saved = copy.deepcopy(opt.state_dict())
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = AdamW8bit(_groups(ps2))
    opt2.load_state_dict(saved)
    s = opt2.state[ps2[2]]  # bf16 parameter: its scales stay fp32 (torch would cast them)
    assert s["absmax1"].dtype == torch.float32 and s["state1"].dtype == torch.uint8
    assert opt2.state[ps2[1]]["state1"].dtype == torch.float32
    _run(opt, ps, 2, first=4)
    _run(opt2, ps2, 2, first=4)
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2, strict=True))
    saved["state"][0]["shards"] = torch.tensor(2)  # as if written by 2 FSDP processes
    with pytest.raises(EmberError, match="resume with the number of processes"):
        AdamW8bit(_groups(ps2)).load_state_dict(saved)


def test_config_names_the_optimizer():
    assert OptimConfig().name == "adamw"
    assert OptimConfig(name="adamw_8bit").name == "adamw_8bit"
    with pytest.raises(EmberError, match="optim.name must be one of 'adamw', 'adamw_8bit'"):
        OptimConfig(name="adam8")


FULL = ('method="full"', "optim.lr=3e-3", "optim.warmup_steps=1", "eval.metrics=[]",
        "eval.val_loss=false", "checkpoint.save_final=false")


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in rows_of(run_dir) if r["kind"] == "train"]


def test_trains_like_fp32_adamw(tiny, tmp_path, one_thread):
    """A tiny full fine-tune: the 8-bit run's loss falls like torch AdamW's, every step within 1%
    of it (measured: 3e-4 over 12 steps; the fp32 curve falls by a third)."""
    steps = ("max_steps=12",)
    train(tiny_config(tiny, tmp_path / "fp32", *FULL, *steps), echo=quiet, progress=False)
    train(tiny_config(tiny, tmp_path / "q8", *FULL, *steps, 'optim.name="adamw_8bit"'),
          echo=quiet, progress=False)
    ref, q8 = _losses(tmp_path / "fp32"), _losses(tmp_path / "q8")
    assert len(q8) == 12 and ref[0] == q8[0]
    assert sum(q8[-3:]) / 3 < 0.75 * sum(q8[:3]) / 3, q8
    assert max(abs(a - b) / a for a, b in zip(ref, q8, strict=True)) < 0.01, (ref, q8)
    assert ref != q8  # the 8-bit optimizer was used


def _stop_resume_equals_uninterrupted(tiny, tmp_path, extra, stop: int) -> None:
    """Run ``a`` straight through; run ``b`` stopped after ``stop`` steps and resumed: the same
    rows and final weights, exactly."""
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    assert train(cfg_b, echo=quiet, progress=False, stop_after=stop).steps == stop
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    wa = checkpoint_weights(tmp_path / "a", tmp_path)
    wb = checkpoint_weights(tmp_path / "b", tmp_path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_resume_equals_uninterrupted_run(tiny, tmp_path, one_thread):
    extra = (*FULL, 'optim.name="adamw_8bit"', "optim.weight_decay=0.1", "max_steps=8",
             "checkpoint.every_steps=4")
    _stop_resume_equals_uninterrupted(tiny, tmp_path, extra, 4)


def _fsdp_plan(tiny, folder) -> list[dict]:
    return [{"name": "fsdp", "call": "tests.engine._optim8bit_fsdp:main",
             "args": [str(folder / "result.pt")]}]


@pytest.mark.slow  # its two processes in the shared torchrun launch
@shares_launch(_fsdp_plan)
def test_fsdp2_sharded_states_checkpoint_and_resume(launched):
    """Two gloo processes (tests/engine/_optim8bit_fsdp.py): states are DTensors laid out like
    the shards; weights whose shards hold whole 256-blocks are updated bit for bit as unsharded
    (blocks are counted per shard: another split only moves block edges, here within 1e-3 after
    4 steps); DCP save at step 2 + resume == uninterrupted, bit for bit."""
    out = launched[0] / "result.pt"
    res = torch.load(out)
    assert res["kinds"]["layers.0.weight"] == ["absmax1:DTensor", "absmax2:DTensor",
                                                "shards:Tensor", "state1:DTensor",
                                                "state2:DTensor", "step:Tensor"]
    assert res["kinds"]["layers.0.bias"] == ["state1:DTensor", "state2:DTensor", "step:Tensor"]
    for n, p in res["a"].items():
        assert torch.equal(p, res["b"][n]), n  # resumed == uninterrupted
    for n in ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"):
        assert torch.equal(res["a"][n], res["ref"][n]), n  # same blocks: same numbers
    torch.testing.assert_close(res["a"]["odd"], res["ref"]["odd"], rtol=0, atol=1e-3)


def test_non_contiguous_parameter_matches_bitsandbytes():
    """A transposed parameter (strides not row-major): its states were created with its strides
    and the kernel refused them (ValueError from every step); bnb blocks its values row-major."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(130, 64)
    ours, theirs = torch.nn.Parameter(w.t()), torch.nn.Parameter(w.t().clone())
    a = AdamW8bit([ours], lr=1e-3, betas=(0.8, 0.95), eps=1e-6, impl="ref")
    b = bnb.optim.AdamW8bit([theirs], lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    for t in range(1, 4):
        g = _grad(ours, t, 0)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
        assert torch.equal(ours, theirs)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(a.state[ours][key], b.state[theirs][key]), key


def test_state_of_other_parameters_is_refused_clearly():
    """Resuming with other trainable parameters (LoRA rank or targets changed): a zip() error,
    or a shape error deep inside the first step (torch's AdamW: a RuntimeError there too)."""
    ps = [torch.nn.Parameter(torch.randn(70, 90)), torch.nn.Parameter(torch.randn(50))]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    for other, needle in (([ps[0]], "holds 2 parameters, the model trains 1"),
                          ([torch.nn.Parameter(torch.randn(70, 91)), ps[1]],
                           r"6300 values for parameter 0, the model's has shape \(70, 91\)"),
                          ([ps[0], torch.nn.Parameter(torch.randn(51))],
                           r"50 values for parameter 1")):
        with pytest.raises(EmberError, match=needle):
            AdamW8bit(other).load_state_dict(saved)


def test_embedding_tables_keep_fp32_states_as_transformers_trainer(tmp_path):
    """transformers' Trainer with optim="adamw_bnb_8bit" keeps 32-bit bnb states for every
    nn.Embedding (GlobalOptimManager override; 8-bit embedding states are unstable): Ember's
    make_optimizer gave the (> 4096-value) embedding 8-bit states. Three steps with the same
    gradients move every parameter as the Trainer's optimizer moves it."""
    import warnings

    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from ember.engine.runtime import make_optimizer
    from ember.models.loading import load_hf_folder

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "m")
        args = transformers.TrainingArguments(tmp_path / "out", optim="adamw_bnb_8bit",
                                              learning_rate=1e-2, weight_decay=0.0,
                                              report_to=[], use_cpu=True)
        theirs = transformers.Trainer(model=hf, args=args).create_optimizer()
    model = load_hf_folder(tmp_path / "m", torch.float32, "cpu")
    ours = make_optimizer(model, OptimConfig(name="adamw_8bit", lr=1e-2), "cpu")
    pairs = [(model.embed.weight, hf.model.embed_tokens.weight),  # 9600 values
             (model.lm_head.weight, hf.lm_head.weight),  # nn.Linear: 8-bit in both
             (model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight)]
    try:
        for t in range(1, 4):
            for i, (p, q) in enumerate(pairs):
                p.grad = _grad(p, t, i)
                q.grad = p.grad.clone()
            ours.step()
            theirs.step()
            for p, q in pairs:
                assert torch.allclose(p, q, rtol=0, atol=1e-7), (p - q).abs().max()
    finally:
        bnb.optim.GlobalOptimManager.get_instance().initialize()  # the Trainer's overrides


@pytest.mark.slow  # three tiny training runs: ~18 s on a loaded 2-core machine
def test_rows_trained_states_resume_exactly(tiny, tmp_path, one_thread):
    """A continued PEFT adapter's trainable_token_indices: the 8-bit optimizer keeps states for
    those rows alone (PEFT's trainable_tokens_delta, as bnb steps it); they are checkpointed and
    a stopped run resumes to the uninterrupted run's losses and weights."""
    import warnings

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
        peft.get_peft_model(hf, peft.LoraConfig(
            r=4, target_modules=["q_proj"], trainable_token_indices=[40, 5, 7])
        ).save_pretrained(tmp_path / "ad")
    extra = (f'model.init="{tmp_path / "ad"}"', 'optim.name="adamw_8bit"',
             "optim.weight_decay=0.1", "optim.warmup_steps=0", "max_steps=2",
             "checkpoint.every_steps=1", "eval.before=false", "eval.metrics=[]",
             "eval.val_loss=false")
    _stop_resume_equals_uninterrupted(tiny, tmp_path, extra, 1)


def test_rows_trained_state_dict_round_trip():
    """The rows' states (rows x D, not the table's shape) survive a state_dict round trip; a
    state for other rows is refused."""
    def table():
        w = torch.nn.Parameter(torch.randn(50, 96, generator=torch.Generator().manual_seed(0)))
        w.ember_trained_rows = torch.arange(49, 1, -1)
        return w

    def grad(t):
        g = torch.zeros(50, 96)
        g[2:] = torch.randn(48, 96, generator=torch.Generator().manual_seed(t))
        return g

    a, b = table(), table()
    oa, ob = AdamW8bit([a], lr=1e-2), AdamW8bit([b], lr=1e-2)
    for t in range(2):
        a.grad, b.grad = grad(t), grad(t)
        oa.step()
        ob.step()
    saved = copy.deepcopy(oa.state_dict())
    assert saved["state"][0]["state1"].shape == (48, 96)
    oa = AdamW8bit([a], lr=1e-2)
    oa.load_state_dict(saved)
    for t in range(2, 4):
        a.grad, b.grad = grad(t), grad(t)
        oa.step()
        ob.step()
    assert torch.equal(a, b) and torch.equal(a[:2], table()[:2])  # untrained rows unchanged
    other = table()
    other.ember_trained_rows = torch.tensor([1, 2])
    with pytest.raises(EmberError, match="4608 values"):
        AdamW8bit([other]).load_state_dict(saved)
