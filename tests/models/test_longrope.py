"""Phi-3.5 / Phi-4-mini style RoPE against transformers: LongRoPE (short and long factor tables,
switched on the largest position of a forward) and partial rotary embeddings
(``partial_rotary_factor``), on tiny random Phi-3 models with original_max_position_embeddings 16
and max_position_embeddings 64. Logits (fp32, <= 1e-4), a gradient, export round trips, greedy
generation across the switch, and the errors for what stays refused."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.generate import generate_ids
from ember.models.hf import config_from_hf, config_to_hf
from ember.models.loading import load_pretrained, read_config, save_pretrained
from tests.models.test_interop_hf import randomize_

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB, ORIG, MAX_POS, HEAD_DIM = 96, 16, 64, 16
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
            rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=1, eos_token_id=2)


def _factors(n: int, start: float, step: float) -> list[float]:
    return [round(start + step * i, 3) for i in range(n)]


def _rope(prf: float = 1.0, longrope: bool = True, **kw) -> dict:
    n = int(HEAD_DIM * prf) // 2
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=prf)
    if longrope:  # distinct factors per frequency, long ones well apart from the short ones
        rope.update(rope_type="longrope", short_factor=_factors(n, 1.0, 0.15),
                    long_factor=_factors(n, 1.5, 1.25), **kw)
    return rope


# name -> (partial_rotary_factor, LongRoPE?, extra config kwargs)
CASES = {
    "longrope": (1.0, True, {}),
    "partial": (0.75, False, {}),
    "phi4_mini_like": (0.75, True, dict(tie_word_embeddings=True)),  # both, tied embeddings
}


def _make(tmp_path, name, prf=1.0, longrope=True, cls="Phi3Config", **kw):
    rope_kw = kw.pop("rope_kw", {})
    extra = dict(original_max_position_embeddings=ORIG) if cls == "Phi3Config" else {}
    if cls != "Phi3Config":
        rope_kw.setdefault("original_max_position_embeddings", ORIG)
    config = getattr(transformers, cls)(
        **{**BASE, **extra, **kw}, rope_parameters=_rope(prf, longrope, **rope_kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, len(name))
    model.set_attn_implementation("eager")
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model.eval(), folder


def _hf_load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()


def _ids(T: int, B: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(T))


def _diff(ours, folder_or_model, ids) -> float:
    hf = folder_or_model if isinstance(folder_or_model, torch.nn.Module) else _hf_load(
        folder_or_model)
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_in_both_regimes(tmp_path, case):
    """T = 12 and 16 (largest position + 1 <= original_max: short factors), 17 and 40 (long)."""
    prf, longrope, kw = CASES[case]
    hf, folder = _make(tmp_path, case, prf, longrope, **kw)
    model, _ = load_pretrained(folder)
    assert model.cfg.partial_rotary_factor == prf and model.cfg.rotary_dim == int(HEAD_DIM * prf)
    assert (model.cfg.longrope is not None) == longrope
    for T in (12, ORIG, ORIG + 1, 40):
        assert _diff(model, hf, _ids(T)) <= 1e-4, T


def test_phi4_mini_like_round_trip_through_export(tmp_path):
    hf, folder = _make(tmp_path, "phi4", 0.75, True, tie_word_embeddings=True)
    model, _ = load_pretrained(folder)
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["original_max_position_embeddings"] == ORIG and raw["partial_rotary_factor"] == 0.75
    assert "partial_rotary_factor" not in raw["rope_scaling"]  # 4.x reads the top-level one
    for T in (12, 40):
        ids = _ids(T)
        with torch.no_grad():
            ours = model(ids)
        assert _diff(model, tmp_path / "export", ids) <= 1e-4
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4
    # the transformers 4.x spelling (rope_scaling + top-level fields) reads the same
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    assert config_from_hf(legacy) == model.cfg


def test_legacy_phi3_names_and_explicit_factors(tmp_path):
    """Phi-3-mini-128k's "su" means LongRoPE; explicit attention_factor / factor are read."""
    cfg = config_from_hf(config_to_hf(_cfg(0.75)))
    raw = config_to_hf(cfg)
    raw["rope_scaling"] = {**raw.pop("rope_scaling"), "rope_type": "su"}
    raw.pop("rope_parameters")
    assert config_from_hf(raw) == cfg
    rs = config_from_hf({**raw, "rope_scaling": {**raw["rope_scaling"], "attention_factor": 1.5}})
    assert rs.longrope.attention_factor == 1.5
    no_attn = {k: v for k, v in raw["rope_scaling"].items() if k != "attention_factor"}
    rs = config_from_hf({**raw, "rope_scaling": {**no_attn, "factor": 1.0}})
    assert rs.longrope.attention_factor == 1.0  # factor <= 1: no attention scaling


def _cfg(prf: float):
    raw = {**BASE, "model_type": "phi3", "original_max_position_embeddings": ORIG,
           "rope_parameters": _rope(prf)}
    return config_from_hf(raw)


def test_phi3_reads_the_top_level_original_context(tmp_path):
    """transformers' Phi-3 overrides the rope dict's original_max_position_embeddings with the
    top-level field, 4096 by default: Ember does too (checked against transformers' own table)."""
    hf, folder = _make(tmp_path, "orig", 1.0, True)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("original_max_position_embeddings")
    path.write_text(json.dumps(raw))
    model, _ = load_pretrained(folder)
    assert model.cfg.longrope.original_max_position_embeddings == 4096
    assert _diff(model, folder, _ids(40)) <= 1e-4  # both use the short table at 40 now


def test_llama_family_longrope_matches_transformers(tmp_path):
    """transformers computes LongRoPE for Llama/Qwen/Mistral/Ministral too (full rotary only;
    Ministral's was refused although its rotary embedding is Mistral's)."""
    for cls in ("LlamaConfig", "Qwen2Config", "Qwen3Config", "MistralConfig", "MinistralConfig"):
        kw = dict(pad_token_id=None, eos_token_id=2, head_dim=HEAD_DIM)
        hf, folder = _make(tmp_path, cls, 1.0, True, cls=cls, **kw)
        model, _ = load_pretrained(folder)
        assert model.cfg.longrope.original_max_position_embeddings == ORIG
        for T in (12, 40):
            assert _diff(model, hf, _ids(T)) <= 1e-4, (cls, T)
        save_pretrained(model, tmp_path / f"{cls}_export")
        assert _diff(model, tmp_path / f"{cls}_export", _ids(40)) <= 1e-4


def _logits(cfg, state, ids, **kw):
    from ember.models.transformer import Transformer
    m = Transformer(cfg)
    m.load_state_dict(state)
    with torch.no_grad():
        return m(ids, **kw)


def test_changing_any_factor_moves_the_logits(tmp_path):
    """Each of short_factor, long_factor, attention_factor and partial_rotary_factor is used, and
    in the right regime: the long factors only move logits past original_max."""
    _, folder = _make(tmp_path, "phi4", 0.75, True)
    model, _ = load_pretrained(folder)
    cfg, state = model.cfg, model.state_dict()
    rs = cfg.longrope
    short, long = _ids(12), _ids(40)
    base = {T: _logits(cfg, state, ids) for T, ids in ((12, short), (40, long))}

    def moved(ids, T, **change):
        c = cfg.replace(rope_scaling=dataclasses.replace(rs, **change))
        return (_logits(c, state, ids) - base[T]).abs().max().item()

    bump = [x * 1.1 for x in rs.short_factor]
    assert moved(short, 12, short_factor=bump) > 1e-3 and moved(long, 40, short_factor=bump) == 0
    bump = [x * 1.1 for x in rs.long_factor]
    assert moved(long, 40, long_factor=bump) > 1e-3 and moved(short, 12, long_factor=bump) == 0
    assert moved(short, 12, attention_factor=1.0) > 1e-3
    # the same table on every dim instead of the first 12 of 16
    full = cfg.replace(partial_rotary_factor=1.0, rope_scaling=None)
    part = cfg.replace(rope_scaling=None)
    assert (_logits(full, state, short) - _logits(part, state, short)).abs().max().item() > 1e-3
    # the switch is made per forward: forcing the table moves the logits
    assert (_logits(cfg, state, short, long_rope=True) - base[12]).abs().max() > 1e-3


def test_packed_batch_picks_the_table_by_its_longest_document(tmp_path):
    """Positions restart per document, so max(position_ids) + 1 is the longest document's length:
    every document of a packed forward uses the table transformers would give that forward."""
    _, folder = _make(tmp_path, "packed", 0.75, True)
    model, _ = load_pretrained(folder)
    a, b = _ids(24, 1), _ids(10, 1)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(24), torch.arange(10)])[None]
    cu = torch.tensor([0, 24, 34], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, pos, cu_seqlens=cu, max_seqlen=24)
        assert (packed[:, :24] - model(a)).abs().max() <= 1e-5
        assert (packed[:, 24:] - model(b, long_rope=True)).abs().max() <= 1e-5
        assert (packed[:, 24:] - model(b)).abs().max() > 1e-3  # alone, b is short


def test_gradients_match_transformers(tmp_path):
    """d loss / d weights through the (interpreted Triton) partial-rotary RoPE, long regime."""
    hf, folder = _make(tmp_path, "grad", 0.75, True, tie_word_embeddings=True)
    model, _ = load_pretrained(folder)
    ids = _ids(24)
    model(ids).float().logsumexp(-1).mean().backward()
    hf(ids).logits.logsumexp(-1).mean().backward()
    ours = model.layers[0].attn.q_proj.weight.grad
    theirs = hf.model.layers[0].self_attn.qkv_proj.weight.grad[: ours.shape[0]]
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert (model.embed.weight.grad - hf.model.embed_tokens.weight.grad).abs().max() <= 1e-5


def _hf_generate(hf, prompt, n):
    hf.generation_config.eos_token_id = None  # like generate_ids without eos_token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt_len", [10, ORIG, 20])
def test_greedy_generation_matches_transformers_across_the_switch(tmp_path, prompt_len):
    """Prompt 10 or 16: the switch to the long table happens while generating (transformers' Phi-3
    then recomputes its whole cache; so does Ember); prompt 20: long from the prefill. Drafts
    (right and wrong) that straddle the switch give the same tokens."""
    hf, folder = _make(tmp_path, "gen", 0.75, True)
    model, _ = load_pretrained(folder)
    model.eval()
    prompt = _ids(prompt_len, 1)[0].tolist()
    n = 40 - prompt_len
    ref = _hf_generate(hf, prompt, n)
    assert generate_ids(model, [prompt], max_new_tokens=n) == [ref]
    wrong = [(t + 1) % VOCAB for t in ref]
    got = generate_ids(model, [prompt, prompt[3:]], max_new_tokens=n,
                       drafts=[ref[:12] + wrong[12:], wrong[:3] + ref[3:]])
    assert got[0] == ref
    assert got[1] == _hf_generate(hf, prompt[3:], n)


def test_generation_without_the_cache_rebuild_would_differ(tmp_path):
    """The rebuild at the switch is what makes the two agree: keeping the short-table keys
    (transformers' Llama behaviour) changes the logits after the switch."""
    _, folder = _make(tmp_path, "gen", 0.75, True)
    model, _ = load_pretrained(folder)
    ids = _ids(24, 1)
    from ember.models.transformer import KVCache
    cache = KVCache(model.cfg, 1, 24, ids.device, torch.float32)
    with torch.no_grad():
        model.hidden_states(ids[:, :ORIG], cache=cache)  # short-table keys
        mixed = model.logits(model.hidden_states(ids[:, ORIG:], cache=cache))
        full = model(ids)[:, ORIG:]
    assert (mixed - full).abs().max() > 1e-3


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda r: r["rope_parameters"].update(short_factor=[1.0] * 5),
         "short_factor must have rotary_dim / 2 = 6 entries"),
        (lambda r: r["rope_parameters"].update(long_factor=[1.0] * 8),
         "long_factor must have rotary_dim / 2 = 6 entries"),
        (lambda r: r["rope_parameters"].update(long_factor="2.0"), "long_factor must be a list"),
        (lambda r: r["rope_parameters"].pop("short_factor"), "short_factor must be a list"),
        (lambda r: r["rope_parameters"].update(short_factor=[0.0] * 6), "positive"),
        (lambda r: r.update(original_max_position_embeddings=0), "original_max_position"),
        (lambda r: r["rope_parameters"].update(partial_rotary_factor=0.7),  # 11: odd
         "partial_rotary_factor"),
        (lambda r: r["rope_parameters"].update(partial_rotary_factor=1.5), "partial_rotary_factor"),
    ],
)
def test_malformed_longrope_is_refused_by_key(change, needle):
    raw = config_to_hf(_cfg(0.75))
    raw.pop("rope_scaling")
    change(raw)
    with pytest.raises(EmberError, match=needle):
        config_from_hf(raw)


@pytest.mark.parametrize("cls", ["LlamaConfig", "Qwen2Config"])
def test_partial_rotary_of_other_families_default_rope_is_ignored_as_transformers_does(
        tmp_path, cls):
    """transformers' Llama / Qwen2 default RoPE rotates the whole head whatever
    partial_rotary_factor says; Ember refused the config, now computes what transformers does."""
    kw = dict(pad_token_id=None, eos_token_id=2, head_dim=HEAD_DIM)
    hf, folder = _make(tmp_path, cls, 0.5, False, cls=cls, **kw)
    with pytest.warns(UserWarning, match="partial_rotary_factor=0.5 is ignored"):
        model, _ = load_pretrained(folder)
    assert model.cfg.partial_rotary_factor == 1.0
    assert _diff(model, hf, _ids(12)) <= 1e-4
    save_pretrained(model, tmp_path / "export")
    assert _diff(model, tmp_path / "export", _ids(12)) <= 1e-4


def test_families_without_partial_rotary_or_longrope_are_refused():
    """With a scaled RoPE type transformers sizes the frequencies by the factor and fails."""
    raw = {**BASE, "model_type": "llama", "partial_rotary_factor": 0.5,
           "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
            k: v for k, v in raw.items() if k != "model_type"}))(_ids(4))
    with pytest.raises(EmberError, match="partial_rotary_factor=0.5 is not supported for "
                                         "model_type 'llama' with rope type 'linear'"):
        config_from_hf(raw)
    qwen = {**BASE, "model_type": "qwen2", "rope_parameters": _rope(0.5)}
    with pytest.raises(EmberError, match="model_type 'qwen2' with rope type 'longrope'"):
        config_from_hf(qwen)
    cfg = _cfg(0.75)
    with pytest.raises(EmberError, match="partial_rotary_factor"):
        config_to_hf(cfg.replace(model_type="llama"))


def test_lora_gradients_match_peft(tmp_path):
    """LoRA training forward (o/down adapters, long regime, partial rotary): Ember's A and B
    gradients equal PEFT's on the same adapter."""
    peft = pytest.importorskip("peft")
    from ember.models.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    hf, folder = _make(tmp_path, "lora", 0.75, True, tie_word_embeddings=True)
    model, _ = load_pretrained(folder)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("o", "down")))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_hf_load(folder), tmp_path / "adapter",
                                            is_trainable=True)
    ids = _ids(24)
    model.train()(ids).float().logsumexp(-1).mean().backward()
    pm.train()(ids).logits.logsumexp(-1).mean().backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert len(theirs) == 2 * len(lora_modules(model)) == 8
    for name, m in lora_modules(model).items():
        layer, proj = name.split(".")[1], name.split(".")[-1]
        part = "self_attn" if proj == "o_proj" else "mlp"
        key = f"base_model.model.model.layers.{layer}.{part}.{proj}.lora_%s.default.weight"
        for ours, ab in ((m.lora_A.grad, "A"), (m.lora_B.grad, "B")):
            ref = theirs[key % ab]
            assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_llama_longrope_generation_keeps_short_keys_like_transformers(tmp_path):
    """transformers' Llama does not rebuild its cache at the switch (only Phi-3 does): the keys
    cached before it stay under the short table, and Ember's tokens match that."""
    hf, folder = _make(tmp_path, "llama_gen", 1.0, True, cls="LlamaConfig", pad_token_id=None,
                       eos_token_id=2, head_dim=HEAD_DIM)
    model, _ = load_pretrained(folder)
    prompt = _ids(10, 1)[0].tolist()
    ref = _hf_generate(hf, prompt, 30)
    assert generate_ids(model.eval(), [prompt], max_new_tokens=30) == [ref]


def test_phi4_mini_published_config_fields_load(tmp_path):
    """Phi-4-mini-instruct's config.json (transformers 4.x spelling: rope_scaling with type
    "longrope", top-level partial_rotary_factor) also carries its custom code's full_attn_mod,
    interpolate_factor, lm_head_bias and mlp_bias at values that change nothing; transformers'
    Phi-3 ignores them, so it loads (logits equal transformers'), other values are refused."""
    hf, folder = _make(tmp_path, "phi4_published", 0.75, True, tie_word_embeddings=True)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw.update(partial_rotary_factor=0.75, rope_theta=rope["rope_theta"],
               rope_scaling={"long_factor": rope["long_factor"],
                             "short_factor": rope["short_factor"], "type": "longrope"},
               full_attn_mod=1, interpolate_factor=1, lm_head_bias=False, mlp_bias=False)
    path.write_text(json.dumps(raw))
    model, _ = load_pretrained(folder)
    assert model.cfg.rotary_dim == 12
    assert model.cfg.longrope.original_max_position_embeddings == ORIG
    for T in (12, 40):
        assert _diff(model, hf, _ids(T)) <= 1e-4, T
    for key, value in (("mlp_bias", True), ("lm_head_bias", True), ("interpolate_factor", 2)):
        with pytest.raises(EmberError, match=f"{key}={value!r} is not supported"):
            config_from_hf({**raw, key: value})


def test_export_rope_scaling_is_what_transformers_4_phi3_accepts(tmp_path):
    """transformers 4.x's Phi3Config (4.57 included) refuses a rope_scaling that is not exactly
    {type, short_factor, long_factor} and derives factor / attention_factor from the top-level
    context lengths: the export writes that, transformers 5 reads the folder with the same logits
    and Ember reads it back to the same config; an attention_factor those lengths do not give
    keeps the full dict (4.x cannot express it)."""
    hf, folder = _make(tmp_path, "phi35", 1.0, True)
    model, _ = load_pretrained(folder)
    save_pretrained(model, tmp_path / "export")
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert set(raw["rope_scaling"]) == {"type", "short_factor", "long_factor"}
    assert raw["rope_scaling"]["type"] == "longrope"
    assert raw["original_max_position_embeddings"] == ORIG
    assert read_config(tmp_path / "export") == model.cfg
    assert config_from_hf({k: v for k, v in raw.items() if k != "rope_parameters"}) == model.cfg
    for T in (12, 40):
        assert _diff(model, tmp_path / "export", _ids(T)) <= 1e-4
    rs = dataclasses.replace(model.cfg.longrope, attention_factor=1.5)
    odd = config_to_hf(model.cfg.replace(rope_scaling=rs))
    assert odd["rope_scaling"]["attention_factor"] == 1.5
    assert config_from_hf(odd).longrope.attention_factor == 1.5


@pytest.mark.parametrize("cls", ["GemmaConfig", "Gemma2Config", "Gemma3TextConfig", "Olmo2Config",
                                 "GraniteConfig", "SmolLM3Config"])
def test_longrope_of_the_other_families_matches_transformers(tmp_path, cls):
    """transformers 5 computes LongRoPE in every family's rotary embedding (Gemma 3: on its
    full-attention layers); these were refused ('LongRoPE is not supported for model_type').
    Logits on both tables, the export, and greedy generation across the switch."""
    rope = _rope(1.0, True, original_max_position_embeddings=ORIG)
    kw = dict(head_dim=HEAD_DIM, rope_parameters=rope)
    if cls == "Gemma3TextConfig":  # per layer type: the sliding layers keep the default RoPE
        kw.update(sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": rope, "sliding_attention": dict(
                      rope_type="default", rope_theta=100.0)})
    elif cls == "Gemma2Config":
        kw.update(sliding_window=6)
    elif cls == "SmolLM3Config":
        kw.update(no_rope_layer_interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(
            **BASE, **kw))
    randomize_(hf, 3)
    hf.save_pretrained(tmp_path / "hf")
    hf = _hf_load(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert model.cfg.longrope.original_max_position_embeddings == ORIG
    for T in (12, 40):
        assert _diff(model, hf, _ids(T)) <= 1e-4, T
    save_pretrained(model, tmp_path / "export")
    assert _diff(model, tmp_path / "export", _ids(40)) <= 1e-4
    prompt = _ids(10, 1)[0].tolist()
    assert generate_ids(model, [prompt], max_new_tokens=12) == [_hf_generate(hf, prompt, 12)]
