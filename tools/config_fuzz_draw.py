"""The random configs of ``tools/config_fuzz.py``: ``CLASSES`` (the families, by their
transformers config class) and ``draw``, the keyword arguments of one random valid tiny config of
a family (RoPE variants, sliding windows and layer types, MoE, biases, norms, activations...).
Imported by config_fuzz.py, run as a script from this folder.
"""

from __future__ import annotations

import random

from ember.models.activations import supported_hf_names

CLASSES = dict(
    llama="LlamaConfig", mistral="MistralConfig", ministral="MinistralConfig",
    qwen2="Qwen2Config", qwen3="Qwen3Config", phi3="Phi3Config", gemma="GemmaConfig",
    gemma2="Gemma2Config", gemma3_text="Gemma3TextConfig", phi="PhiConfig",
    smollm3="SmolLM3Config", granite="GraniteConfig", olmo2="Olmo2Config", olmo3="Olmo3Config",
    mixtral="MixtralConfig", qwen2_moe="Qwen2MoeConfig", qwen3_moe="Qwen3MoeConfig",
    starcoder2="Starcoder2Config",
)  # fmt: skip
WINDOW = 5
_LAYER_KINDS = ("sliding_attention", "full_attention")


def _activation(r: random.Random) -> str:
    """An ACT2FN name Ember runs: half the draws the released models' ones, half any."""
    if r.random() < 0.5:
        return r.choice(["silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu", "gelu_fast"])
    return r.choice(supported_hf_names())


def _scaling(r: random.Random, kind: str, rp: dict) -> None:
    """The parameters of a linear / dynamic / llama3 / yarn RoPE, into ``rp``."""
    if kind in ("linear", "dynamic"):
        rp["factor"] = r.choice([2.0, 4.0])
    elif kind == "llama3":
        low, high = r.choice([(1.0, 4.0), (2.0, 8.0), (0.5, 1.5)])
        rp.update(
            factor=r.choice([8.0, 2.0, 32.0]),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=r.choice([4, 8, 16]),
        )
    elif kind == "yarn":
        rp["factor"] = r.choice([2.0, 4.0])
        if r.random() < 0.5:
            rp["original_max_position_embeddings"] = r.choice([4, 8])
        if r.random() < 0.5:
            rp.update(beta_fast=16.0, beta_slow=2.0)
        if r.random() < 0.3:
            rp["attention_factor"] = 1.3
        elif r.random() < 0.3:  # DeepSeek-style: attention_factor from the ratio of two mscales
            rp.update(mscale=r.choice([0.707, 1.0]), mscale_all_dim=r.choice([0.707, 1.0, 0.0]))
        if r.random() < 0.25:
            rp["truncate"] = False  # gpt-oss


def _rope(r: random.Random, fam: str, kw: dict, head_dim: int) -> dict:
    kinds = ["default", "default", "linear", "dynamic", "llama3", "yarn", "longrope"]
    if fam == "phi3":  # Phi3Config accepts no other (yarn is read as longrope), and checks
        # LongRoPE's factors against hidden_size / heads where its model uses head_dim
        plain = kw.get("head_dim", head_dim) == kw["hidden_size"] // kw["num_attention_heads"]
        kinds = ["default", "longrope"] if plain else ["default"]
    kind = r.choice(kinds)
    rp = {"rope_type": kind, "rope_theta": r.choice([10000.0, 500000.0, 1e6, 123.0])}
    _scaling(r, kind, rp)
    if kind == "longrope":
        n = int(head_dim * kw.get("partial_rotary_factor", 0.5 if fam == "phi" else 1.0)) // 2
        rp.update(
            short_factor=[1.0 + 0.1 * i for i in range(n)],
            long_factor=[1.5 + 0.2 * i for i in range(n)],
            original_max_position_embeddings=r.choice([4, 8]),
        )
        kw["max_position_embeddings"] = r.choice([16, 64])
        if r.random() < 0.3:
            rp["factor"] = r.choice([1.0, 3.0, 32.0])  # else max_pos / original
        if r.random() < 0.3:
            rp["attention_factor"] = r.choice([1.0, 1.19])
    if fam == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": r.choice([10000.0, 10000.0, 1e6, 77.0])}
        if r.random() < 0.3:  # a scaled local RoPE too (transformers builds a table per kind)
            local["rope_type"] = r.choice(["linear", "llama3", "yarn"])
            _scaling(r, local["rope_type"], local)
        return {"full_attention": rp, "sliding_attention": local}
    if fam == "olmo3":  # per layer type too; Ember refuses dynamic / longrope there
        if kind in ("dynamic", "longrope"):
            rp = {"rope_type": "default", "rope_theta": rp["rope_theta"]}
        local = {"rope_type": "default", "rope_theta": r.choice([500000.0, 77.0])}
        return {"full_attention": rp, "sliding_attention": local}
    return rp


def draw(fam: str, r: random.Random) -> dict:
    """Keyword arguments of a random transformers config of family ``fam``."""
    hidden = r.choice([32, 40, 48, 56, 64])
    heads = r.choice([h for h in (2, 4, 8) if hidden % h == 0 and hidden // h % 2 == 0])
    layers = r.choice([2, 3, 4])
    kw = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=r.choice([1, heads, max(1, heads // 2)]),
        num_hidden_layers=layers,
        vocab_size=r.choice([97, 128, 257, 1001, 49153]),
        intermediate_size=r.choice([37, 64, 100]),
        max_position_embeddings=r.choice([8, 10, 64, 4096]),
        tie_word_embeddings=r.random() < 0.5,
        rms_norm_eps=r.choice([1e-6, 1e-5, 0.1]),
    )
    if fam != "phi" and (
        r.random() < 0.6
        or fam in ("qwen3", "gemma", "gemma2", "gemma3_text", "ministral", "mixtral")
    ):
        kw["head_dim"] = r.choice([8, 16, 24, 40, 80, 96, 120, hidden // heads])
    if fam == "phi" and r.random() < 0.4:
        # odd widths too: only int(head_dim * partial_rotary_factor) must be even. (Phi3Config
        # checks LongRoPE's factors against hidden_size / heads whatever head_dim says.)
        kw["head_dim"] = r.choice([5, 9, 10, 12, 20])
    hd = kw.get("head_dim", hidden // heads)
    V = kw["vocab_size"]
    c = r.random()
    if c < 0.2:
        kw.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    elif c < 0.4:
        kw.update(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=V - 1)
    elif c < 0.5:
        kw.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif c < 0.6:
        kw.update(bos_token_id=V + 3, eos_token_id=V + 7)  # out of the vocabulary
    elif c < 0.65:
        kw.update(pad_token_id=-1)
    if fam in ("smollm3", "phi3") and "pad_token_id" not in kw:  # class defaults past V
        kw["pad_token_id"] = r.choice([None, V - 2])
    even = [p for p in (0.25, 0.4, 0.5, 0.75) if int(hd * p) % 2 == 0 and int(hd * p) >= 2]
    if fam in ("phi3", "phi") and even and r.random() < 0.5:
        kw["partial_rotary_factor"] = r.choice(even)
    if fam == "phi" and int(hd * 0.5) % 2 and even:
        kw["partial_rotary_factor"] = r.choice(even)  # not the default 0.5: an odd rotary dim
    kw["rope_parameters"] = _rope(r, fam, kw, hd)
    rp = kw["rope_parameters"]
    if (
        fam not in ("phi3", "phi")
        and r.random() < 0.15
        and (rp.get("full_attention", rp)["rope_type"] == "default")
    ):
        # ignored by the other families' default RoPE (their scaled ones fail in transformers)
        kw["partial_rotary_factor"] = 0.5
    kinds = [r.choice(_LAYER_KINDS) for _ in range(layers)]
    if fam in (
        "llama",
        "granite",
        "smollm3",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo2",
        "olmo3",
        "qwen3_moe",
    ):
        kw["attention_bias"] = r.random() < 0.5
    if fam in ("llama", "granite", "smollm3"):
        kw["mlp_bias"] = r.random() < 0.5
    if fam in ("mistral", "phi3", "mixtral") and r.random() < 0.7:
        kw["sliding_window"] = WINDOW
    if fam == "ministral":
        kw.update(sliding_window=WINDOW, layer_types=kinds)
    if fam in ("qwen2", "qwen3") and r.random() < 0.6:
        kw.update(
            use_sliding_window=True, sliding_window=WINDOW, max_window_layers=r.choice([0, 1, 2])
        )
        if r.random() < 0.4:
            kw["layer_types"] = kinds
    if fam in ("gemma2", "gemma3_text"):
        kw.update(
            sliding_window=WINDOW,
            query_pre_attn_scalar=r.choice([hd, 24, 100]),
            final_logit_softcapping=r.choice([None, 3.0, 30.0]),
        )
        if r.random() < 0.5:
            kw["layer_types"] = kinds
        if fam == "gemma2":
            kw["attn_logit_softcapping"] = r.choice([None, 2.0, 50.0])
    if fam == "starcoder2":  # LayerNorms (their eps), biases on every projection or none
        kw.update(norm_epsilon=kw.pop("rms_norm_eps"), use_bias=r.random() < 0.7)
        if r.random() < 0.5:
            kw["sliding_window"] = WINDOW
    if fam == "olmo3":
        kw["sliding_window"] = WINDOW
        if r.random() < 0.6:
            kw["layer_types"] = kinds
    if fam == "smollm3":
        kw["no_rope_layers"] = [r.choice([0, 1]) for _ in range(layers)]
        if r.random() < 0.5:
            kw.update(use_sliding_window=True, sliding_window=WINDOW)
    if fam == "granite":
        kw.update(
            embedding_multiplier=r.choice([1.0, 12.0]),
            residual_multiplier=r.choice([1.0, 0.22]),
            attention_multiplier=r.choice([1.0, 0.0078125, 0.3]),
            logits_scaling=r.choice([1.0, 8.0]),
        )
    if fam == "phi":
        kw.update(
            # transformers sizes the q/k LayerNorms hidden_size / heads: no other head_dim
            qk_layernorm=r.random() < (0.1 if "head_dim" in kw else 0.5),
            hidden_act="gelu_new",
            layer_norm_eps=kw.pop("rms_norm_eps"),
        )
    if fam == "mixtral":
        kw.update(num_local_experts=r.choice([2, 3, 4]), num_experts_per_tok=r.choice([1, 2]))
    if fam in ("qwen2_moe", "qwen3_moe"):
        kw.update(
            num_experts=r.choice([2, 3, 5]),
            num_experts_per_tok=r.choice([1, 2]),
            moe_intermediate_size=r.choice([24, 33]),
            norm_topk_prob=r.random() < 0.5,
            decoder_sparse_step=r.choice([1, 2]),
            mlp_only_layers=r.choice([[], [0], [1], [0, 2]]),
        )
        if fam == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = r.choice([0, 20, 48])
    if r.random() < 0.35:
        key = "hidden_activation" if fam in ("gemma2", "gemma3_text") else "hidden_act"
        kw[key] = _activation(r)
        if fam == "gemma" and r.random() < 0.3:  # 4.x's field: must agree (or be None)
            kw["hidden_activation"] = r.choice([None, kw[key]])
    if fam == "gemma3_text" and r.random() < 0.3:
        kw["attn_logit_softcapping"] = r.choice([2.0, 50.0])
    if fam == "gemma3_text" and r.random() < 0.15:
        # no full-attention layer: transformers never builds that table, so a partial factor
        # with a scaled RoPE (which fails on a full-attention layer) runs; LongRoPE's lists are
        # checked against the partial width
        kw["layer_types"] = ["sliding_attention"] * layers
        full = kw["rope_parameters"]["full_attention"]
        full["partial_rotary_factor"] = 0.5
        if full["rope_type"] == "longrope":
            n = int(hd * 0.5) // 2
            full.update(short_factor=full["short_factor"][:n], long_factor=full["long_factor"][:n])
    if fam == "smollm3" and r.random() < 0.3:  # the every-nth-layer form (SmolLM3-3B: 4)
        kw.pop("no_rope_layers")
        kw["no_rope_layer_interval"] = r.choice([2, 3])
    if fam == "smollm3" and kw.get("use_sliding_window") and r.random() < 0.5:
        kw["layer_types"] = kinds
    if fam == "mixtral" and r.random() < 0.3:  # the load-balancing loss (not in the logits)
        kw.update(output_router_logits=True, router_aux_loss_coef=r.choice([0.001, 0.02]))
    if fam in ("qwen2", "qwen3") and "use_sliding_window" not in kw and r.random() < 0.2:
        kw["layer_types"] = ["full_attention"] * layers  # the field without a window
    if r.random() < 0.2:
        kw["attention_dropout"] = 0.1  # eval forwards: no effect
    if r.random() < 0.2:
        kw["dtype"] = r.choice(["bfloat16", "float16", "float32"])
    return kw
