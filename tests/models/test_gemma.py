"""Gemma 2 and Gemma 3 (text): logits parity with transformers on tiny random configs (every norm
weight randomized, sequences longer than the sliding window), exact state-dict and config round
trips, packed == per document, fused LoRA == unfused, KV-cache generation == full-forward greedy,
LoRA training through ``ember train`` and refusals (other multimodal families, bitsandbytes,
accelerate). The multimodal Gemma 3: ``test_gemma3_multimodal.py``."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ember import EmberError
from ember.engine.losses import sft_loss
from ember.models import Transformer
from ember.models.hf import config_from_hf, from_hf_state_dict, to_hf_state_dict
from ember.models.loading import load_pretrained, read_config, save_pretrained
from tests.models.lora_util import lora_with_random_b
from tests.models.test_interop_hf import assert_greedy_equals_transformers

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB, WINDOW, T = 96, 5, 19
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=WINDOW,
            query_pre_attn_scalar=12)
CASES = {  # name -> (config class, kwargs, edit of the saved config.json)
    # softcaps small enough to bite on these logits; alternating windows by default
    "gemma2": ("Gemma2Config", dict(attn_logit_softcapping=1.5, final_logit_softcapping=2.0), {}),
    "gemma2_mqa_untied_bias": (
        "Gemma2Config",
        dict(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
             layer_types=["full_attention", "sliding_attention", "sliding_attention",
                          "full_attention"]),
        {},
    ),
    "gemma3": ("Gemma3TextConfig",
               dict(sliding_window_pattern=3, rope_local_base_freq=100.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0}), {}),
    # a config.json as the Hub's gemma-3 text checkpoints have it (transformers 4.x names)
    "gemma3_legacy": (
        "Gemma3TextConfig",
        {},
        {"rope_parameters": None, "layer_types": None, "sliding_window_pattern": 2,
         "rope_theta": 5000.0, "rope_local_base_freq": 50.0,
         "rope_scaling": {"rope_type": "linear", "factor": 4.0},
         "cache_implementation": "hybrid"},
    ),
}


def _save(tmp_path, case: str):
    cls, kw, edit = CASES[case]
    config = getattr(transformers, cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for n, p in model.named_parameters():  # Gemma norms are (1 + w): w around 0
            p.copy_((0.3 if "norm" in n else 0.1) * torch.randn(p.shape, generator=g))
    folder = tmp_path / case
    model.save_pretrained(folder)
    if edit:
        path = folder / "config.json"
        raw = {**json.loads(path.read_text()), **edit}
        path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return folder


def _hf_logits(folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(ids).logits


def _ids(B: int = 2, n: int = T, seed: int = 0):
    return torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_and_round_trips(tmp_path, case):
    folder = _save(tmp_path, case)
    model, _ = load_pretrained(folder)
    cfg = model.cfg
    assert cfg.sandwich_norms and cfg.norm_offset == 1.0 and cfg.query_pre_attn_scalar == 12
    assert cfg.qk_norm == case.startswith("gemma3")
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
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


def test_gemma3_rope_and_window_fields(tmp_path):
    cfg = read_config(_save(tmp_path, "gemma3_legacy"))
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling.factor) == (5000, 50, 4)
    cfg = read_config(_save(tmp_path, "gemma3"))
    assert [cfg.window(i) for i in range(4)] == [WINDOW, WINDOW, None, WINDOW]
    assert cfg.attn_softcap is None and cfg.final_softcap is None


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_the_parity_check_catches_a_missing_piece(tmp_path, case):
    """Each Gemma 2/3 feature changes these logits by far more than the parity tolerance."""
    folder = _save(tmp_path, case)
    ids = _ids()
    ref = _hf_logits(folder, ids)

    def err(cfg_change=None, edit=None) -> float:
        model, _ = load_pretrained(folder)
        if cfg_change:
            sd = model.state_dict()
            model = type(model)(model.cfg.replace(**cfg_change))
            model.load_state_dict(sd, strict=False)
        if edit:
            edit(model)
        with torch.no_grad():
            return (model(ids) - ref).abs().max().item()

    def no_post_norm(model):
        model.layers[1].sandwich = False

    def no_window(model):
        for block in model.layers:
            block.attn.window = None

    assert err() <= 1e-4
    assert err(edit=no_post_norm) > 1e-2
    assert err(edit=no_window) > 1e-2
    assert err(dict(query_pre_attn_scalar=None)) > 1e-2
    if case == "gemma2":
        assert err(dict(attn_softcap=None)) > 1e-2
        assert err(dict(final_softcap=None)) > 1e-2
    else:
        assert err(dict(rope_local_theta=None)) > 1e-2


def _packed(model, docs):
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()],
                      dtype=torch.int32)
    return model(ids, pos, cu_seqlens=cu, max_seqlen=max(len(d) for d in docs))[0]


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_packed_equals_per_document_and_fused_lora(tmp_path, case):
    model, _ = load_pretrained(_save(tmp_path, case))
    docs = [_ids(1, 13, seed=1)[0], _ids(1, 9, seed=2)[0]]
    with torch.no_grad():
        alone = torch.cat([model(d[None])[0] for d in docs])
        assert (_packed(model, docs) - alone).abs().max().item() <= 1e-5
        # the training loss (fused linear cross-entropy) applies the final softcap too
        labels = torch.cat(docs).roll(-1).masked_fill(torch.arange(22) % 3 == 0, -100)
        ids = torch.cat(docs)[None]
        cu = torch.tensor([0, 13, 22], dtype=torch.int32)
        pos = torch.cat([torch.arange(13), torch.arange(9)])[None]
        batch = SimpleNamespace(input_ids=ids, position_ids=pos, cu_seqlens=cu, max_seqlen=13,
                                labels=labels[None])
        keep = labels != -100
        want = F.cross_entropy(alone[keep], labels[keep], reduction="sum") / 7
        assert (sft_loss(model, batch, 7) - want).abs().item() <= 1e-5
    lora_with_random_b(model)
    grads = []
    for fused in (True, False):
        model.set_fused_lora(fused).zero_grad()
        out = _packed(model, docs)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for n, p in model.named_parameters()
                                     if p.requires_grad]))
    (o1, g1), (o2, g2) = grads
    assert (o1 - o2).abs().max().item() <= 1e-5
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_generation_matches_transformers_generate(tmp_path, case):
    """Left-padded batch, KV cache, 12 tokens past the window: the tokens of transformers'
    greedy ``generate`` on each prompt alone (its sliding-window cache layers included)."""
    assert_greedy_equals_transformers(_save(tmp_path, case),
                                      [_ids(1, n, seed=n)[0].tolist() for n in (7, 3, 11)])


def test_refusals(tmp_path):
    raw = json.loads((_save(tmp_path, "gemma2") / "config.json").read_text())
    # the multimodal gemma3 loads (tests/models/test_gemma3_multimodal.py); other families not
    multimodal = {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
                  "text_config": {**raw, "model_type": "gemma2"}}
    with pytest.raises(EmberError, match="'paligemma' is a multimodal model.*only"):
        config_from_hf(multimodal)
    with pytest.raises(EmberError, match="sliding_window_size"):
        config_from_hf({**raw, "sliding_window_size": WINDOW + 1})
    g3 = json.loads((_save(tmp_path, "gemma3_legacy") / "config.json").read_text())
    # linear / llama3 / yarn on sliding layers load (tests/models/test_gemma3_local_rope.py)
    with pytest.raises(EmberError, match="sliding_attention.*'dynamic'"):
        config_from_hf({**g3, "rope_parameters": {"sliding_attention": {
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10.0}}})
    # exact GELU in transformers (was refused; tests/models/test_activations.py)
    assert config_from_hf({**raw, "hidden_activation": "gelu"}).activation == "gelu"
    # transformers' Gemma 2/3 read hidden_activation only
    assert config_from_hf({**raw, "hidden_act": "silu"}) == config_from_hf(raw)
    with pytest.raises(EmberError, match="use_bidirectional_attention"):
        config_from_hf({**raw, "use_bidirectional_attention": True})
    cfg = config_from_hf(raw)
    for change in (dict(model_type="gemma"), dict(model_type="llama", activation="silu",
                                                  norm_offset=0.0, embedding_scale=None)):
        with pytest.raises(EmberError, match="sandwich_norms"):
            save_pretrained(Transformer(cfg.replace(**change)), tmp_path / "x")


def test_export_refuses_what_transformers_gemma_would_drop(tmp_path):
    """An attention softcap on Gemma 3 (transformers reads attn_logit_softcapping and never
    applies it) or a window on Gemma 1 (no such field) used to be written without a word, so
    transformers computed another model from the export."""
    g3 = config_from_hf(json.loads((_save(tmp_path, "gemma3") / "config.json").read_text()))
    with pytest.raises(EmberError, match="gemma3_text.*attn_softcap=3.0"):
        save_pretrained(Transformer(g3.replace(attn_softcap=3.0)), tmp_path / "g3")
    g1 = g3.replace(model_type="gemma", sandwich_norms=False, qk_norm=False, layer_types=None,
                    query_pre_attn_scalar=None, final_softcap=None, rope_local_theta=None,
                    rope_scaling=None)
    save_pretrained(Transformer(g1.replace(sliding_window=None)), tmp_path / "g1")
    with pytest.raises(EmberError, match="'gemma'.*sliding_window=5"):
        save_pretrained(Transformer(g1), tmp_path / "g1_window")


def test_accelerate_hf_takes_a_gemma2_checkpoint(tmp_path):
    """A Gemma 2 checkpoint as transformers loads it takes Ember's kernels (ember.models.
    hf_backend; its parity tests are in tests/models/test_hf_backend_families.py): same loss
    and softcapped eval logits."""
    from ember.models.hf_backend import accelerate, swapped

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(_save(tmp_path, "gemma2")).eval()
    ids = _ids()
    with torch.no_grad():
        want = hf(ids, labels=ids)
        accelerate(hf)
        got = hf(ids, labels=ids)
    assert "loss" in swapped(hf).values()
    for name in ("loss", "logits"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_triton_kernels_match_the_reference(tmp_path, monkeypatch, case):
    """The packed LoRA training step through the Triton kernels (the interpreter on CPU: flash
    attention with softmax scale, per-layer window and softcap, fused lora_qkv / lora_mlp, (1 + w)
    RMSNorm incl. Gemma 3's q/k norms, RoPE with two tables) equals the PyTorch reference path,
    outputs and LoRA gradients."""
    from ember.kernels._dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_pretrained(_save(tmp_path, case), device=device)
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


def test_lora_training_through_ember_train(tmp_path):
    """A tiny Gemma 2 (softcaps, alternating windows shorter than the examples) trains with LoRA
    through ``ember train``; the merged export loads in transformers with Ember's logits."""
    from ember.engine.cli import main
    from ember.engine.state import load_run_model
    from ember.models import ModelConfig
    from tests.engine._tiny import cli_train_tiny, make_tiny_model

    _, tok = load_pretrained(make_tiny_model(tmp_path / "llama"))
    cfg = ModelConfig(
        model_type="gemma2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
        norm_offset=1.0, activation="gelu_tanh", embedding_scale=32**0.5, sandwich_norms=True,
        layer_types=("sliding_attention", "full_attention"), sliding_window=6,
        query_pre_attn_scalar=16, attn_softcap=50.0, final_softcap=30.0,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=128)
    save_pretrained(Transformer(cfg).init_weights(std=0.05, seed=0), tmp_path / "gemma2", tok)
    run = cli_train_tiny(tmp_path, tmp_path / "gemma2")
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    model, _, _ = load_run_model(run, "cpu")
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 11, 40, 8, 3, 19]])
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(tmp_path / "merged", ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gguf_gemma_file_without_its_norms_names_them(tmp_path, arch):
    """gemma2/gemma3 GGUF files load (tests/models/test_gguf_families.py); one written with a
    Llama tensor layout (no post-attention / post-MLP norms) is refused naming what is missing,
    not loaded with the norms silently left at their init."""
    from ember.models import load_gguf
    from tests.models.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "m.gguf", arch=arch)
    with pytest.raises(EmberError, match="tensors missing.*post"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_peft_adapters_both_ways(tmp_path, case):
    """A PEFT adapter on every projection loads with PEFT's logits, and Ember's saved adapter
    loads in PEFT with Ember's logits."""
    peft = pytest.importorskip("peft")
    from ember.models.lora import load_adapter, save_adapter

    folder = _save(tmp_path, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = pm.eval()(ids).logits
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
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        assert (pm(ids).logits - ours).abs().max().item() <= 1e-4


def test_nf4_quantize_while_loading(tmp_path):
    """quantize='nf4' keeps the Gemma 3 post-norms, local RoPE table and windows: the same
    logits as quantizing the dense model in memory."""
    from ember.models import quantize_model_

    folder = _save(tmp_path, "gemma3")
    dense, _ = load_pretrained(folder)
    quantize_model_(dense)
    nf4, _ = load_pretrained(folder, quantize="nf4")
    assert torch.equal(nf4.inv_freq_local, dense.inv_freq_local)
    ids = _ids()
    with torch.no_grad():
        assert (dense(ids) - nf4(ids)).abs().max().item() <= 1e-5


def _grad_and_export_parity(tmp_path, folder, model) -> None:
    """Logits, every weight's gradient of a next-token loss, and the export, vs transformers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
    ids = _ids()
    ours, ref = model(ids), hf(ids, labels=ids)
    assert (ours - ref.logits).abs().max().item() <= 1e-4
    F.cross_entropy(ours[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    ref.loss.backward()
    grads = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.cfg)
    theirs = dict(hf.named_parameters())
    diffs = {k: (g - theirs[k].grad).abs().max().item() for k, g in grads.items()}
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    with torch.no_grad():
        assert (ours - _hf_logits(tmp_path / "export", ids)).abs().max().item() <= 1e-4


def test_gemma3_legacy_type_key_is_ignored_as_transformers_5_does(tmp_path):
    """rope_scaling {"type": "linear", "factor": 4} without rope_parameters: transformers 5.24
    merges it into its {"rope_type": "default"} and computes the default RoPE (4.x scaled).
    Ember refused the config; now it computes what transformers does, with a warning."""
    folder = _save(tmp_path, "gemma3_legacy")
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "rope_scaling": {"type": "linear", "factor": 4.0}}))
    with pytest.warns(UserWarning, match="legacy key 'type', which transformers 5 ignores"):
        model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling is None and model.cfg.rope_theta == 5000
    _grad_and_export_parity(tmp_path, folder, model)
    # where rope_parameters leave the full-attention type unset, transformers reads "type"
    rp = {"full_attention": {"type": "linear", "factor": 4.0}}
    assert config_from_hf({**raw, "rope_parameters": rp}).rope_scaling.factor == 4.0


def test_gemma3_partial_rotary_with_a_scaled_rope_and_no_full_attention_layer(tmp_path):
    """partial_rotary_factor with a dynamic RoPE: transformers sizes the full-attention table by
    it and fails on a full-attention layer (refused, saying so), but builds no such table when
    every layer slides, and runs; Ember refused both."""
    folder = _save(tmp_path, "gemma3_legacy")
    path = folder / "config.json"
    raw = {**json.loads(path.read_text()), "partial_rotary_factor": 0.5,
           "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(EmberError, match="partial_rotary_factor=0.5 .* full-attention layers"):
        with pytest.warns(UserWarning, match="partial_rotary_factor=0.5 is ignored"):
            config_from_hf(raw)
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_text(json.dumps(raw))
        transformers.AutoModelForCausalLM.from_pretrained(folder)(_ids())
    path.write_text(json.dumps({**raw, "layer_types": ["sliding_attention"] * 4}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_pretrained(folder)
    assert set(model.cfg.layer_types) == {"sliding_attention"}
    _grad_and_export_parity(tmp_path, folder, model)


def test_gemma3_unused_longrope_sized_by_partial_rotary_is_dropped(tmp_path):
    """LongRoPE factor lists sized by partial_rotary_factor (4 = 16 x 0.5 / 2) with every layer
    sliding: transformers checks the lists against the partial width and never builds the table;
    Ember refused the config (it checked them against the whole head, 8). Now the unused scaling
    is dropped, with a warning, and logits, gradients and export match transformers."""
    folder = _save(tmp_path, "gemma3_legacy")
    path = folder / "config.json"
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6],
            "long_factor": [2.0, 3.0, 4.0, 5.0], "original_max_position_embeddings": 8}
    path.write_text(json.dumps({**json.loads(path.read_text()), "partial_rotary_factor": 0.5,
                                "rope_scaling": rope, "layer_types": ["sliding_attention"] * 4}))
    with pytest.warns(UserWarning, match="LongRoPE with partial_rotary_factor=0.5 is unused"):
        model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling is None and model.cfg.rope_theta == 5000
    _grad_and_export_parity(tmp_path, folder, model)
    with pytest.raises(EmberError, match="partial_rotary_factor=0.5 .* full-attention layers"):
        config_from_hf({**json.loads(path.read_text()), "layer_types": None})
