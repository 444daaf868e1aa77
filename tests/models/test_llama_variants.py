"""SmolLM3, Granite, OLMo2 and OLMo3 (``ember.models.hf_llama_variants``) against transformers and
PEFT on tiny random configs (every weight randomized, sequences longer than the windows): logits
(fp32, <= 1e-4), exact state-dict and config.json round trips (transformers reads the export back
to the same family fields), a LoRA step's loss and gradients against transformers + PEFT through
the fused loss, PEFT adapters both ways, greedy KV-cache generation against ``generate``, packed ==
per document, fused LoRA == unfused, MLP chunks and activation checkpointing == plain, NF4
loading, and refusals."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ember import EmberError
from ember.engine.activation import apply_activation_checkpointing, set_mlp_chunks
from ember.engine.losses import sft_loss
from ember.models import Transformer
from ember.models.generate import generate_ids
from ember.models.hf import config_from_hf, from_hf_state_dict, to_hf_state_dict
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.peft_keys import hf_module_name
from tests.models.lora_util import lora_with_random_b

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB, WINDOW, T = 96, 5, 19
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.05,
               logits_scaling=4.0)
CASES = {  # name -> (config class, kwargs)
    # NoPE every 2nd layer, which are the sliding ones (transformers' default layer_types)
    "smollm3": ("SmolLM3Config", dict(use_sliding_window=True, sliding_window=WINDOW,
                                      no_rope_layer_interval=2)),
    "smollm3_mqa_untied_bias": (
        "SmolLM3Config",
        dict(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
             mlp_bias=True, no_rope_layers=[0, 1, 1, 0], use_sliding_window=True,
             sliding_window=WINDOW, rope_parameters={"rope_type": "default", "rope_theta": 50.0},
             layer_types=["full_attention", "sliding_attention", "full_attention",
                          "sliding_attention"]),
    ),
    "granite": ("GraniteConfig", GRANITE),
    "granite_tied_mha_bias": (
        "GraniteConfig",
        dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
             embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.3,
             logits_scaling=0.5),
    ),
    "olmo2": ("Olmo2Config", {}),
    "olmo2_mqa_tied_bias": ("Olmo2Config", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                attention_bias=True)),
    # OLMo3: every 4th layer full (transformers' default layer_types); then its own layer types,
    # YaRN on the full-attention layers and another base on the sliding ones
    "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW)),
    "olmo3_rope_per_type_tied_bias": ("Olmo3Config", dict(
        sliding_window=WINDOW, tie_word_embeddings=True, attention_bias=True,
        layer_types=["full_attention", "sliding_attention"] * 2, rope_parameters={
            "full_attention": dict(rope_type="yarn", factor=2.0, rope_theta=1000.0,
                                   original_max_position_embeddings=32),
            "sliding_attention": dict(rope_type="default", rope_theta=50.0)})),
}
FAMILY = ["smollm3", "granite", "olmo2", "olmo3"]  # one case per family for the slower tests
# family-specific fields transformers must read back the same from Ember's export
HF_FIELDS = {"SmolLM3Config": ("no_rope_layers", "layer_types", "use_sliding_window",
                               "sliding_window", "mlp_bias"),
             "GraniteConfig": (*GRANITE, "mlp_bias"), "Olmo2Config": (),
             "Olmo3Config": ("layer_types", "sliding_window")}
COMMON = ("attention_bias", "tie_word_embeddings", "num_key_value_heads", "rms_norm_eps",
          "rope_parameters")


def _save(tmp_path, case: str, **over):
    cls, kw = CASES[case]
    config = getattr(transformers, cls)(**{**BASE, **kw, **over})
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in n
                    else 0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path / case
    model.save_pretrained(folder)
    return folder


def _hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()


def _hf_logits(folder, ids):
    with torch.no_grad():
        return _hf(folder)(ids).logits


def _ids(B: int = 2, n: int = T, seed: int = 0):
    return torch.randint(3, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_and_round_trips(tmp_path, case):
    folder = _save(tmp_path, case)
    model, _ = load_pretrained(folder)
    cfg = model.cfg
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(folder, ids)).abs().max().item() <= 1e-4
    sd = load_file(folder / "model.safetensors")
    back = to_hf_state_dict(from_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == cfg
    with torch.no_grad():
        assert (ours - _hf_logits(tmp_path / "export", ids)).abs().max().item() <= 1e-4
    cls = CASES[case][0]
    want, got = (transformers.AutoConfig.from_pretrained(f) for f in (folder, tmp_path / "export"))
    for name in (*HF_FIELDS[cls], *COMMON):
        assert _within(getattr(want, name), getattr(got, name)), name


def _within(want, got) -> bool:
    """got has want's values (an exported YaRN dict also spells out the defaults it implies)."""
    if isinstance(want, dict) and isinstance(got, dict):
        return all(k in got and _within(v, got[k]) for k, v in want.items())
    return want == got


def test_family_fields_as_read(tmp_path):
    cfg = read_config(_save(tmp_path, "smollm3"))
    assert cfg.nope_layers == (1, 3) and cfg.rope_theta == 2e6 and cfg.tie_word_embeddings
    assert [cfg.window(i) for i in range(4)] == [None, WINDOW, None, WINDOW]
    cfg = read_config(_save(tmp_path, "smollm3_mqa_untied_bias"))
    assert cfg.nope_layers == (0, 3) and cfg.mlp_bias and cfg.attention_out_bias
    cfg = read_config(_save(tmp_path, "granite"))
    assert (cfg.embedding_scale, cfg.residual_multiplier, cfg.softmax_scale,
            cfg.logits_scaling) == (3.0, 0.4, 0.05, 4.0)
    cfg = read_config(_save(tmp_path, "olmo2"))
    assert cfg.sandwich_norms and not cfg.pre_norms and cfg.qk_norm and cfg.qk_norm_full
    cfg = read_config(_save(tmp_path, "olmo3"))
    assert [cfg.window(i) for i in range(4)] == [WINDOW] * 3 + [None]
    assert cfg.rope_theta == 5e5 and cfg.rope_local_theta is None and cfg.qk_norm_full
    cfg = read_config(_save(tmp_path, "olmo3_rope_per_type_tied_bias"))
    assert (cfg.rope_theta, cfg.rope_scaling.kind, cfg.rope_local_theta) == (1e3, "yarn", 50.0)
    assert [cfg.window(i) for i in range(4)] == [None, WINDOW] * 2 and cfg.attention_out_bias
    assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())


@pytest.mark.parametrize("case", FAMILY)
def test_the_parity_check_catches_a_missing_piece(tmp_path, case):
    """Each family field changes these logits by far more than the parity tolerance."""
    folder = _save(tmp_path, case)
    ids = _ids()
    ref = _hf_logits(folder, ids)

    def err(**change) -> float:
        model, _ = load_pretrained(folder)
        sd = model.state_dict()
        model = Transformer(model.cfg.replace(**change))
        model.load_state_dict(sd)
        with torch.no_grad():
            return (model(ids) - ref).abs().max().item()

    assert err() <= 1e-4
    if case == "smollm3":
        assert err(nope_layers=()) > 1e-2
        assert err(sliding_window=None) > 1e-2
    elif case == "granite":
        for name, plain in dict(embedding_scale=None, residual_multiplier=1.0,
                                attention_multiplier=None, logits_scaling=1.0).items():
            assert err(**{name: plain}) > 1e-2, name
    else:
        model, _ = load_pretrained(folder)
        for block in model.layers:
            block.attn.q_norm.weight.data.fill_(1.0)
        with torch.no_grad():
            assert (model(ids) - ref).abs().max().item() > 1e-2
        model, _ = load_pretrained(folder)
        for block in model.layers:
            block.sandwich = False
        with torch.no_grad():
            assert (model(ids) - ref).abs().max().item() > 1e-2
        if case == "olmo3":
            assert err(sliding_window=None) > 1e-2
            assert err(rope_local_theta=5e4) > 1e-2  # the sliding layers' own RoPE table is used


def _packed(model, docs):
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()],
                      dtype=torch.int32)
    return model(ids, pos, cu_seqlens=cu, max_seqlen=max(len(d) for d in docs))[0]


@pytest.mark.parametrize("case", FAMILY)
def test_packed_fused_lora_chunked_mlp_and_checkpointing(tmp_path, case):
    """Packed == per document, and the fused loss (Granite's logits_scaling included) equals the
    cross-entropy of the logits; the fused LoRA blocks, MLP chunks and activation checkpointing
    give the same outputs and LoRA gradients as the plain modules."""
    model, _ = load_pretrained(_save(tmp_path, case))
    docs = [_ids(1, 13, seed=1)[0], _ids(1, 9, seed=2)[0]]
    with torch.no_grad():
        alone = torch.cat([model(d[None])[0] for d in docs])
        assert (_packed(model, docs) - alone).abs().max().item() <= 1e-5
        labels = torch.cat(docs).roll(-1).masked_fill(torch.arange(22) % 3 == 0, -100)
        batch = SimpleNamespace(
            input_ids=torch.cat(docs)[None], cu_seqlens=torch.tensor([0, 13, 22],
                                                                      dtype=torch.int32),
            position_ids=torch.cat([torch.arange(13), torch.arange(9)])[None], max_seqlen=13,
            labels=labels[None])
        keep = labels != -100
        want = F.cross_entropy(alone[keep], labels[keep], reduction="sum") / 7
        assert (sft_loss(model, batch, 7) - want).abs().item() <= 1e-5
    lora_with_random_b(model)
    results = []
    for fused, chunk, ckpt in ((True, 0, "none"), (False, 0, "none"), (True, 5, "every_block")):
        model.set_fused_lora(fused).zero_grad()
        set_mlp_chunks(model, chunk)
        apply_activation_checkpointing(model, ckpt)
        out = _packed(model, docs)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()
                                       if p.requires_grad]))
    (o1, g1), *rest = results
    for o2, g2 in rest:
        assert (o1 - o2).abs().max().item() <= 1e-5
        assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(g1, g2, strict=True))


def _peft_model(folder, **kw):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_hf(folder), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw))


@pytest.mark.parametrize("case", FAMILY)
def test_lora_step_loss_and_gradients_match_peft(tmp_path, case):
    """One LoRA training step: transformers + PEFT's loss (labels shifted, mean) and every
    adapter gradient equal Ember's through ``sft_loss`` (the fused linear cross-entropy)."""
    from ember.models.lora import load_adapter, lora_modules

    folder = _save(tmp_path, case)
    pm = _peft_model(folder)
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids(1, T, seed=7)
    pm.train()
    ref = pm(ids, labels=ids).loss
    ref.backward()
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "peft")
    model.train()
    labels = F.pad(ids[0, 1:], (0, 1), value=-100)[None]
    batch = SimpleNamespace(input_ids=ids, position_ids=torch.arange(T)[None],
                            cu_seqlens=torch.tensor([0, T], dtype=torch.int32), max_seqlen=T,
                            labels=labels)
    loss = sft_loss(model, batch, T - 1)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    theirs = dict(pm.named_parameters())
    mods = lora_modules(model)
    assert len(mods) == 7 * 4
    for name, m in mods.items():
        for ab in ("lora_A", "lora_B"):
            hf = theirs[f"base_model.model.{hf_module_name(name)}.{ab}.default.weight"].grad
            g = getattr(m, ab).grad
            assert (g - hf).abs().max().item() <= 1e-5 * max(1.0, hf.abs().max().item()), name


@pytest.mark.parametrize("case", FAMILY)
def test_peft_adapters_both_ways(tmp_path, case):
    peft = pytest.importorskip("peft")
    from ember.models.lora import load_adapter, save_adapter

    folder = _save(tmp_path, case)
    pm = _peft_model(folder).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = pm(ids).logits
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "peft")
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


@pytest.mark.parametrize("case", FAMILY)
def test_greedy_generation_matches_transformers_generate(tmp_path, case):
    """KV-cache greedy decoding of a left-padded batch, past SmolLM3's window: the tokens of
    transformers' ``generate`` on each prompt alone."""
    folder = _save(tmp_path, case)
    model, _ = load_pretrained(folder)
    hf = _hf(folder)
    prompts = [_ids(1, 9, seed=3)[0].tolist(), _ids(1, 4, seed=4)[0].tolist()]
    out = generate_ids(model, prompts, max_new_tokens=10)
    for prompt, new in zip(prompts, out, strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert new == want.tolist()


@pytest.mark.parametrize("case", FAMILY)
def test_nf4_quantize_while_loading(tmp_path, case):
    from ember.models import quantize_model_

    folder = _save(tmp_path, case)
    dense, _ = load_pretrained(folder)
    quantize_model_(dense)
    nf4, _ = load_pretrained(folder, quantize="nf4")
    ids = _ids()
    with torch.no_grad():
        assert (dense(ids) - nf4(ids)).abs().max().item() <= 1e-5


def test_refusals(tmp_path):
    smol = json.loads((_save(tmp_path, "smollm3") / "config.json").read_text())
    # sliding layers that transformers' flash attention would not window
    with pytest.raises(EmberError, match="use_sliding_window is false"):
        config_from_hf({**smol, "use_sliding_window": False})
    with pytest.raises(EmberError, match="sliding_window is null"):
        config_from_hf({**smol, "sliding_window": None})
    with pytest.raises(EmberError, match="no_rope_layers must list"):
        config_from_hf({**smol, "no_rope_layers": [1, 0]})
    with pytest.raises(EmberError, match="no_rope_layer_interval must be >= 1"):
        config_from_hf({**smol, "no_rope_layers": None, "no_rope_layer_interval": 0})
    granite = json.loads((_save(tmp_path, "granite") / "config.json").read_text())
    with pytest.raises(EmberError, match="logits_scaling non-zero"):
        config_from_hf({**granite, "logits_scaling": 0})
    with pytest.raises(EmberError, match="no GraniteForSequenceClassification"):
        config_from_hf({**granite, "architectures": ["GraniteForSequenceClassification"]})
    with pytest.raises(EmberError, match="no GraniteForSequenceClassification"):
        save_pretrained(Transformer(config_from_hf(granite).replace(labels=("a", "b"))),
                        tmp_path / "g")
    from ember.models.prompt_tuning import apply_prompt_tuning

    with pytest.raises(EmberError, match="prompt tuning on Granite"):
        apply_prompt_tuning(Transformer(config_from_hf(granite)), 4)
    olmo = json.loads((_save(tmp_path, "olmo2") / "config.json").read_text())
    with pytest.raises(EmberError, match=r"\['mlp_bias'\] are not supported"):
        config_from_hf({**olmo, "mlp_bias": True})  # transformers' OLMo2 MLP has no bias
    o3 = json.loads((_save(tmp_path, "olmo3") / "config.json").read_text())
    for change, needle in ((dict(rope_parameters={"rope_type": "default", "rope_theta": 9.0}),
                            "must map 'full_attention'"),
                           (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                            "'dynamic' is not supported"),
                           (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'rope_type'"),
                           (dict(sliding_window=None), "sliding_window is null"),
                           (dict(layer_types=["full_attention"]), "layer_types must list")):
        with pytest.raises(EmberError, match=needle):
            config_from_hf({**o3, **change})
    with pytest.raises(EmberError, match="'olmo3' has no GGUF export"):
        from ember.models.gguf_export import gguf_arch

        gguf_arch(config_from_hf(o3))
    # another family's config with these fields has no config.json form
    cfg = config_from_hf(smol)
    for change, needle in ((dict(model_type="llama", sliding_window=None), "nope_layers"),
                           (dict(model_type="granite", nope_layers=()), "sliding_window"),
                           (dict(model_type="olmo2"), "pre_norms")):
        with pytest.raises(EmberError, match=needle):
            save_pretrained(Transformer(cfg.replace(**change)), tmp_path / "x")


def test_lora_training_through_ember_train(tmp_path):
    """``ember train`` runs LoRA steps on a tiny SmolLM3 (NoPE and sliding layers), Granite
    (multipliers) and OLMo2 (post-norms only) and the loss falls; the merged export loads in
    transformers with Ember's logits."""
    from ember.engine.cli import main
    from ember.engine.state import load_run_model
    from ember.models import ModelConfig
    from tests.engine._tiny import make_tiny_model, tiny_rows, write_jsonl

    _, tok = load_pretrained(make_tiny_model(tmp_path / "llama"))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, max_position_embeddings=128)
    families = {
        "smollm3": dict(nope_layers=(1,), sliding_window=6,
                        layer_types=("full_attention", "sliding_attention"),
                        tie_word_embeddings=True),
        "granite": dict(embedding_scale=4.0, residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=2.0),
        "olmo2": dict(sandwich_norms=True, pre_norms=False, qk_norm=True, qk_norm_full=True),
        "olmo3": dict(sandwich_norms=True, pre_norms=False, qk_norm=True, qk_norm_full=True,
                      sliding_window=6, layer_types=("sliding_attention", "full_attention"),
                      rope_theta=5e5, rope_local_theta=1e4),
    }
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(24, seed=1))
    for mt, kw in families.items():
        base = tmp_path / mt
        cfg = ModelConfig(model_type=mt, **common, **kw)
        save_pretrained(Transformer(cfg).init_weights(std=0.05, seed=0), base, tok)
        run = tmp_path / f"run_{mt}"
        (tmp_path / f"{mt}.toml").write_text("\n".join([
            f'run_dir = "{run}"', "max_steps = 8", 'device = "cpu"', "plot = false",
            f'[model]\nname = "{base}"', "[lora]\nrank = 4\nalpha = 8", "[optim]\nlr = 1e-2",
            "[eval]\nmetrics = []\nbefore = true",
            f'[data]\ntrain = ["{train}"]\nvalidation = "{train}"\nmax_seq_len = 64\n'
            "tokens_per_batch = 128"]))
        assert main(["train", str(tmp_path / f"{mt}.toml")]) == 0
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in rows if r["kind"] == "eval"]
        assert len([r for r in rows if r["kind"] == "train"]) == 8
        assert len(val) == 2 and val[1] < val[0] - 0.05, (mt, val)  # the same rows, before/after
        assert main(["export", str(run), "--merged", str(tmp_path / f"merged_{mt}")]) == 0
        model, _, _ = load_run_model(run, "cpu")
        ids = torch.tensor([[5, 9, 17, 33, 2, 70, 11, 40, 8, 3, 19]])
        with torch.no_grad():
            ours = model(ids)
        assert (ours - _hf_logits(tmp_path / f"merged_{mt}", ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["smollm3", "granite_tied_mha_bias", "olmo2_mqa_tied_bias",
                                  "olmo3_rope_per_type_tied_bias"])
def test_accelerate_hf(tmp_path, case, monkeypatch):
    """``accelerate_hf`` on the transformers model: the same loss, gradients and eval logits as
    the model without the swap, on a right-padded batch (varlen attention) too; SmolLM3's NoPE
    layers skip Ember's RoPE, Granite's softmax scale is its attention_multiplier."""
    import copy

    from ember.models import hf_backend, hf_backend_forwards

    seen = {"rope": 0, "scale": []}
    rope, attn = hf_backend_forwards.apply_rope, hf_backend_forwards.flash_attention
    monkeypatch.setattr(hf_backend_forwards, "apply_rope",
                        lambda *a, **k: seen.__setitem__("rope", seen["rope"] + 1) or rope(*a, **k))
    monkeypatch.setattr(hf_backend_forwards, "flash_attention", lambda *a, **k: seen[
        "scale"].append((k["softmax_scale"], k["window"])) or attn(*a, **k))
    ref = _hf(_save(tmp_path, case)).train()
    model = hf_backend.accelerate(copy.deepcopy(ref))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for kw in (dict(), dict(attention_mask=mask)):
        ref.zero_grad()
        model.zero_grad()
        want, got = ref(ids, labels=labels, **kw), model(ids, labels=labels, **kw)
        assert (got.loss - want.loss).abs().item() <= 1e-5
        want.loss.backward()
        got.loss.backward()
        mine = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            # 2e-5 of the largest entry: fp32 rounding of other kernels' summation orders
            # (attention, RMSNorm) through 4 layers reaches ~1.5e-5 on OLMo2's q_norm, whose
            # gradients are ~1e-4 (seen when the SwiGLU reference moved to torch's silu)
            assert (mine[n].grad - p.grad).abs().max() <= 2e-5 * p.grad.abs().max(), n
    with torch.no_grad():
        want = ref.eval()(ids, labels=labels)
        got = model.eval()(ids, labels=labels)
        assert (got.logits - want.logits).abs().max() <= 1e-5 * want.logits.abs().max()
    cfg = ref.config
    if case == "smollm3":
        assert seen["rope"] == 2 * 3  # 2 of 4 layers rotate, in 3 forwards
        assert {w for _, w in seen["scale"]} == {None, WINDOW}
    if case.startswith("granite"):
        assert {s for s, _ in seen["scale"]} == {cfg.attention_multiplier}
    if case.startswith("olmo3"):
        assert {w for _, w in seen["scale"]} == {None, WINDOW}
    hf_backend.restore(model)


def test_accelerate_hf_refuses_a_smollm3_window_transformers_applies_two_ways():
    from ember.models.hf_backend import accelerate

    config = transformers.SmolLM3Config(**BASE, use_sliding_window=False, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"] * 2)
    with pytest.raises(EmberError, match="use_sliding_window=false"):
        accelerate(transformers.AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("mt", ["smollm3", "olmo2", "olmo3"])
def test_sequence_classifier_exports_to_transformers(tmp_path, mt):
    """An Ember SmolLM3 / OLMo2 classifier (score head) loads as transformers'
    ``*ForSequenceClassification`` with the same class logits on a right-padded batch."""
    from ember.models import ModelConfig
    from ember.models.heads import classify
    from tests.models.test_heads import BASE as HEADS_BASE
    from tests.models.test_heads import DOCS, LABELS, _ember_logits, _padded

    kw = dict(nope_layers=(1,)) if mt == "smollm3" else dict(
        sandwich_norms=True, pre_norms=False, qk_norm=True, qk_norm_full=True)
    if mt == "olmo3":
        kw.update(sliding_window=3, layer_types=("sliding_attention", "full_attention"))
    cfg = ModelConfig(**HEADS_BASE, hidden_size=48, model_type=mt, labels=LABELS, **kw)
    model = Transformer(cfg).init_weights(std=0.1, seed=0).eval()
    save_pretrained(model, tmp_path)
    assert read_config(tmp_path) == cfg
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model) - ref).abs().max() < 1e-5
        assert (classify(model, ids) - ref).abs().max() < 1e-5
    assert (ref[0] - ref[1]).abs().max() > 1e-3 and len(ref) == len(DOCS)


@pytest.mark.parametrize("case", ["smollm3", "olmo2"])
def test_triton_kernels_match_the_reference(tmp_path, monkeypatch, case):
    """The packed LoRA training step through the Triton kernels (the interpreter on CPU: flash
    attention with SmolLM3's windows, RoPE skipped on NoPE layers, RMSNorm over OLMo2's full q/k
    width, fused lora_qkv / lora_mlp) equals the PyTorch reference path, outputs and LoRA
    gradients. Granite adds only a softmax scale (Gemma's test covers it) and PyTorch ops."""
    from ember.kernels._dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # two layers (SmolLM3: one RoPE, one NoPE + sliding): the interpreter is slow
    model, _ = load_pretrained(_save(tmp_path, case, num_hidden_layers=2), device=device)
    lora_with_random_b(model)
    docs = [_ids(1, 11, seed=5)[0].to(device), _ids(1, 7, seed=6)[0].to(device)]
    results = []
    for impl in ("ref", "triton"):
        monkeypatch.setenv("EMBER_KERNELS", impl)
        model.zero_grad()
        out = _packed(model, docs)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()
                                       if p.requires_grad]))
    (o1, g1), (o2, g2) = results
    assert (o1 - o2).abs().max().item() <= 1e-4
    assert all((a - b).abs().max().item() <= 1e-4 for a, b in zip(g1, g2, strict=True))
