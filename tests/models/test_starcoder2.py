"""StarCoder2 (``ember.models.hf_starcoder2``) against transformers and PEFT on tiny random configs
(every weight randomized, sequences longer than the window): logits (fp32, <= 1e-4), exact
state-dict and config.json round trips, the merged export reloaded by transformers, PEFT adapters
both ways, NF4 loading, a LoRA run through ``ember train``, and refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.models import Transformer
from ember.models.hf import config_from_hf, from_hf_state_dict, to_hf_state_dict
from ember.models.loading import load_pretrained, read_config, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB, WINDOW, T = 96, 5, 19
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CASES = {  # transformers' defaults: biases, tied head, gelu_pytorch_tanh, no window
    "default": {},
    "window_untied_no_bias": dict(
        sliding_window=WINDOW,
        use_bias=False,
        tie_word_embeddings=False,
        norm_epsilon=1e-3,
        hidden_act="gelu",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
    ),
}


def _save(tmp_path, case: str, **over):
    config = transformers.Starcoder2Config(**{**BASE, **CASES[case], **over})
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "norm" in n
                else 0.1 * torch.randn(p.shape, generator=g)
            )
    folder = tmp_path / case
    model.save_pretrained(folder)
    return folder


def _hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager"
        ).eval()


def _ids(B: int = 2, n: int = T):
    return torch.randint(3, VOCAB, (B, n), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_and_round_trips(tmp_path, case):
    folder = _save(tmp_path, case)
    model, _ = load_pretrained(folder)
    cfg = model.cfg
    assert cfg.norm == "layernorm" and not cfg.gated_mlp and not cfg.parallel_block
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        ref = _hf(folder)(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    sd = load_file(folder / "model.safetensors")
    back = to_hf_state_dict(from_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == cfg
    with torch.no_grad():
        assert (ours - _hf(tmp_path / "export")(ids).logits).abs().max().item() <= 1e-4
    want, got = (transformers.AutoConfig.from_pretrained(f) for f in (folder, tmp_path / "export"))
    for name in (
        "use_bias",
        "sliding_window",
        "norm_epsilon",
        "tie_word_embeddings",
        "hidden_act",
        "num_key_value_heads",
        "rope_parameters",
    ):
        assert getattr(got, name) == getattr(want, name), name


def test_the_parity_check_catches_a_missing_piece(tmp_path):
    """The window and each LayerNorm / MLP bias change these logits by far more than 1e-4."""
    folder = _save(tmp_path, "window_untied_no_bias", use_bias=True)
    ids = _ids()
    with torch.no_grad():
        ref = _hf(folder)(ids).logits
    model, _ = load_pretrained(folder)
    sd = model.state_dict()
    for change in (dict(), dict(sliding_window=None)):
        other = Transformer(model.cfg.replace(**change))
        other.load_state_dict(sd)
        with torch.no_grad():
            err = (other(ids) - ref).abs().max().item()
        assert (err <= 1e-4) == (not change), (change, err)
    for key in ("layers.1.mlp_norm.bias", "layers.0.mlp.down_proj.bias", "norm.bias"):
        other = Transformer(model.cfg)
        other.load_state_dict({**sd, key: torch.zeros_like(sd[key])})
        with torch.no_grad():
            assert (other(ids) - ref).abs().max().item() > 1e-2, key


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapters_both_ways(tmp_path, case):
    """PEFT's adapter (its names c_fc / c_proj) in Ember, and Ember's in PEFT: the same logits."""
    peft = pytest.importorskip("peft")
    from ember.models.lora import load_adapter, save_adapter

    folder = _save(tmp_path, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            _hf(folder),
            peft.LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
            ),
        ).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = pm(ids).logits
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "peft")
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} >= {
        "up_proj",
        "down_proj",
        "o_proj",
    }
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-2)
        ours = model(ids)
    save_adapter(model, tmp_path / "ember")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_hf(folder), tmp_path / "ember").eval()
    with torch.no_grad():
        assert (pm(ids).logits - ours).abs().max().item() <= 1e-4


def test_nf4_quantize_while_loading(tmp_path):
    from ember.models import quantize_model_

    folder = _save(tmp_path, "window_untied_no_bias")
    dense, _ = load_pretrained(folder)
    quantize_model_(dense)
    nf4, _ = load_pretrained(folder, quantize="nf4")
    with torch.no_grad():
        assert (dense(_ids()) - nf4(_ids())).abs().max().item() <= 1e-5


def test_lora_training_through_ember_train(tmp_path):
    """``ember train`` runs LoRA steps (targets by transformers' names c_fc / c_proj too) and the
    loss falls; the merged export loads in transformers with Ember's logits."""
    from ember.engine.cli import main
    from ember.engine.state import load_run_model
    from ember.models import ModelConfig
    from tests.engine._tiny import make_tiny_model, tiny_rows, write_jsonl

    _, tok = load_pretrained(make_tiny_model(tmp_path / "llama"))
    cfg = ModelConfig(
        model_type="starcoder2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=128,
        norm="layernorm",
        gated_mlp=False,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        sliding_window=6,
        activation="gelu_tanh",
        tie_word_embeddings=True,
    )
    base, run = tmp_path / "sc2", tmp_path / "run"
    save_pretrained(Transformer(cfg).init_weights(std=0.05, seed=0), base, tok)
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(24, seed=1))
    (tmp_path / "r.toml").write_text(
        "\n".join(
            [
                f'run_dir = "{run}"',
                "max_steps = 8",
                'device = "cpu"',
                "plot = false",
                f'[model]\nname = "{base}"',
                '[lora]\nrank = 4\nalpha = 8\ntargets = ["q", "k", "v", "o", "c_fc", "c_proj"]',
                "[optim]\nlr = 1e-2",
                "[eval]\nmetrics = []\nbefore = true",
                f'[data]\ntrain = ["{train}"]\nvalidation = "{train}"\nmax_seq_len = 64\n'
                "tokens_per_batch = 128",
            ]
        )
    )
    assert main(["train", str(tmp_path / "r.toml")]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert len(val) == 2 and val[1] < val[0] - 0.05, val
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    model, _, _ = load_run_model(run, "cpu")
    assert any("mlp.up_proj.lora_A" in n for n, _ in model.named_parameters())
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 11, 40, 8, 3, 19]])
    with torch.no_grad():
        ours = model(ids)
        assert (ours - _hf(tmp_path / "merged")(ids).logits).abs().max().item() <= 1e-4


def test_refusals(tmp_path):
    raw = json.loads((_save(tmp_path, "default") / "config.json").read_text())
    for change, needle in (
        (dict(use_bias="yes"), "use_bias must be true or false"),
        (dict(sliding_window=0), "sliding_window must be an integer"),
        (dict(residual_dropout=1.5), "residual_dropout must be in"),
        (dict(mlp_bias=True), r"\['mlp_bias'\] are not supported"),
        (dict(architectures=["LlamaForCausalLM"]), "not supported for"),
    ):
        with pytest.raises(EmberError, match=needle):
            config_from_hf({**raw, **change})
    cfg = config_from_hf(raw)
    for change, needle in (
        (dict(parallel_block=True), "parallel_block"),
        (dict(mlp_bias=False), "mlp_bias"),
        (dict(qk_norm=True), "q_norm"),
    ):
        with pytest.raises(EmberError, match=needle):  # naming the field, for starcoder2
            save_pretrained(Transformer(cfg.replace(**change)), tmp_path / "x")
    from ember.models.hf_backend import accelerate

    with pytest.raises(EmberError, match="Starcoder2ForCausalLM is not a supported model"):
        accelerate(_hf(tmp_path / "default"))


def test_the_released_checkpoints_config_keys_load_as_transformers_reads_them(tmp_path):
    """starcoder2-3b/7b/15b's config.json carry mlp_type / norm_type / rms_norm_eps, which
    Starcoder2Config never writes and transformers ignores (it reads norm_epsilon)."""
    folder = _save(tmp_path, "default", norm_epsilon=1e-3)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(
        json.dumps({**raw, "mlp_type": "default", "norm_type": "layer_norm", "rms_norm_eps": 1e-5})
    )
    model, _ = load_pretrained(folder)
    assert model.cfg.rms_norm_eps == 1e-3
    with torch.no_grad():
        assert (model(_ids()) - _hf(folder)(_ids()).logits).abs().max().item() <= 1e-4
    for key, value in (("mlp_type", "moe"), ("norm_type", "rms_norm")):
        with pytest.raises(EmberError, match=f"{key} '{value}' is not supported.*released"):
            config_from_hf({**raw, key: value})
