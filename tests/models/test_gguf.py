"""GGUF import: dequantizers bit-equal to gguf.quants, tiny files written like llama.cpp does
(permuted Q/K, mixed quant types) loaded exactly and matching transformers' GGUF loader, the real
SmolLM2-135M file against transformers, and clear errors for bad files."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling, rope_inv_freq
from ember.models.gguf import (
    dequantize,
    import_gguf,
    load_gguf,
    permute_qk,
    unpermute_qk,
)
from ember.models.transformer import Transformer

# ---------------------------------------------------------------------------------------------
# Dequantizers

QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16]  # gguf.quants can quantize these
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]  # dequantize only: random valid blocks


def _random_k_blocks(qt: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with finite fp16 super-block scales at the offsets ggml uses."""
    _, size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    fp16_at = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qt]
    for off in fp16_at:
        raw[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(
            np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qt):
    rows, cols = 7, 96  # 3 blocks per row, an odd row count
    w = np.random.default_rng().standard_normal((rows, cols)).astype(np.float32)
    raw = quants.quantize(w, qt)
    ref = quants.dequantize(raw, qt)
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qt, (rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.equal(ours, torch.from_numpy(ref))
    # and the format round trip is sane (error well below the weights' scale)
    assert np.abs(ref - w).max() < 0.5


@pytest.mark.parametrize("qt", K_QUANTS + [Q.IQ4_NL], ids=lambda q: q.name)
def test_dequantize_k_quants_match_gguf_reference(qt):
    rng = np.random.default_rng()
    block, _ = GGML_QUANT_SIZES[qt]
    rows, per_row = 5, 3
    if qt == Q.IQ4_NL:  # numpy fallback path: d (fp16) + 16 bytes
        raw = rng.integers(0, 256, size=(rows * per_row, 18), dtype=np.uint8)
        raw[:, :2] = (rng.standard_normal(rows * per_row) * 0.01).astype(np.float16).view(
            np.uint8).reshape(-1, 2)
    else:
        raw = _random_k_blocks(qt, rows * per_row, rng)
    ref = quants.dequantize(raw.reshape(rows, -1), qt)
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qt, (rows, block * per_row))
    assert np.isfinite(ref).all()
    assert torch.equal(ours, torch.from_numpy(ref))


@pytest.mark.parametrize("qt", [Q.F32, Q.F16], ids=lambda q: q.name)
def test_dequantize_plain_types(qt):
    w = torch.randn(5, 12)
    raw = w.to(torch.float16 if qt == Q.F16 else torch.float32).view(torch.uint8).reshape(-1)
    assert torch.equal(dequantize(raw.clone(), qt, (5, 12)),
                       w.half().float() if qt == Q.F16 else w)


def test_qk_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    b = torch.randn(3 * 8)
    assert torch.equal(unpermute_qk(permute_qk(b, 3), 3), b)
    # llama.cpp's permute interleaves each head's two rotary halves: row 1 of head 0 is row hd/2
    assert torch.equal(permute_qk(w, 3)[1], w[4])


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written the way llama.cpp's converter writes them

TOK_BYTES = [chr(c) for c in range(33, 127)]  # printable ASCII, identity in GPT-2's byte map


def tiny_tokenizer_md(pre: str = "smollm") -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TOK_BYTES, "Ġ", "Ġt", "he", "12"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "1 2"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    }


VOCAB = len(tiny_tokenizer_md()["tokenizer.ggml.tokens"])  # 101: not a power of 2
# tensor kind -> ggml type in the tiny files: every supported family appears at least once
TINY_TYPES = {"token_embd": Q.F16, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_1,
              "attn_output": Q.Q4_1, "ffn_gate": Q.Q5_0, "ffn_up": Q.BF16, "ffn_down": Q.Q8_0,
              "output": Q.Q8_0}


def _put(md_writer: GGUFWriter, key: str, v) -> None:
    if isinstance(v, bool):
        md_writer.add_bool(key, v)
    elif isinstance(v, int):
        md_writer.add_uint32(key, v)
    elif isinstance(v, float):
        md_writer.add_float32(key, v)
    elif isinstance(v, str):
        md_writer.add_string(key, v)
    else:
        md_writer.add_array(key, v)


def write_tiny_gguf(path: Path, arch: str = "llama", *, tied: bool = False, hidden: int = 96,
                    heads: int = 3, kv_heads: int = 1, rope_freqs: torch.Tensor | None = None,
                    metadata: dict | None = None, drop: tuple[str, ...] = ()):
    """Write a random 2-layer model as llama.cpp would (HF weights, Q/K permuted for llama,
    quantized per TINY_TYPES). Returns the fp32 ember state dict the file must load to: each HF
    weight quantized and dequantized by gguf.quants (row quantization commutes with the row
    permutation, so no permutation code is involved in the expectation)."""
    hd, inter, layers = hidden // heads, 160, 2
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    w = GGUFWriter(str(path), arch)
    md = {
        f"{arch}.block_count": layers, f"{arch}.context_length": 256,
        f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": inter,
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.dimension_count": hd, **tiny_tokenizer_md(), **(metadata or {}),
    }
    for k, v in md.items():
        if k != "general.architecture":
            _put(w, k, v)
    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, ember_key: str, t: torch.Tensor, n_head: int | None = None):
        kind = gguf_name.split(".")[-2]
        qt = TINY_TYPES.get(kind, Q.F32) if t.dim() == 2 else Q.F32
        arr = t.numpy().astype(np.float32)
        permuted = permute_qk(t, n_head).numpy() if (n_head and arch == "llama") else arr
        if gguf_name not in drop:
            if qt == Q.F32:
                w.add_tensor(gguf_name, permuted)
            elif qt == Q.F16:
                w.add_tensor(gguf_name, permuted.astype(np.float16))
            else:
                w.add_tensor(gguf_name, quants.quantize(permuted, qt), raw_dtype=qt)
        ref = arr if qt == Q.F32 else (arr.astype(np.float16).astype(np.float32) if qt == Q.F16
                                       else quants.dequantize(quants.quantize(arr, qt), qt))
        expected[ember_key] = torch.from_numpy(np.ascontiguousarray(ref))

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=gen) * scale

    add("token_embd.weight", "embed.weight", rnd(VOCAB, hidden, scale=1.0))
    for i in range(layers):
        p, e = f"blk.{i}.", f"layers.{i}."
        add(p + "attn_norm.weight", e + "attn_norm.weight", 1 + rnd(hidden))
        add(p + "attn_q.weight", e + "attn.q_proj.weight", rnd(heads * hd, hidden), heads)
        add(p + "attn_k.weight", e + "attn.k_proj.weight", rnd(kv_heads * hd, hidden), kv_heads)
        add(p + "attn_v.weight", e + "attn.v_proj.weight", rnd(kv_heads * hd, hidden))
        if arch == "qwen2":
            add(p + "attn_q.bias", e + "attn.q_proj.bias", rnd(heads * hd))
            add(p + "attn_k.bias", e + "attn.k_proj.bias", rnd(kv_heads * hd))
            add(p + "attn_v.bias", e + "attn.v_proj.bias", rnd(kv_heads * hd))
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", e + "attn.q_norm.weight", 1 + rnd(hd))
            add(p + "attn_k_norm.weight", e + "attn.k_norm.weight", 1 + rnd(hd))
        add(p + "attn_output.weight", e + "attn.o_proj.weight", rnd(hidden, heads * hd))
        add(p + "ffn_norm.weight", e + "mlp_norm.weight", 1 + rnd(hidden))
        add(p + "ffn_gate.weight", e + "mlp.gate_proj.weight", rnd(inter, hidden))
        add(p + "ffn_up.weight", e + "mlp.up_proj.weight", rnd(inter, hidden))
        add(p + "ffn_down.weight", e + "mlp.down_proj.weight", rnd(hidden, inter))
    add("output_norm.weight", "norm.weight", 1 + rnd(hidden))
    if not tied:
        add("output.weight", "lm_head.weight", rnd(VOCAB, hidden))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


ARCH_CASES = {  # name -> (arch, write_tiny_gguf kwargs)
    "llama": ("llama", {}),
    "llama_tied_mha": ("llama", dict(tied=True, heads=4, kv_heads=4, hidden=128)),
    "qwen2": ("qwen2", dict(heads=3, kv_heads=3)),
    # head_dim 128: transformers' GGUF loader ignores qwen3.attention.key_length and assumes it
    "qwen3": ("qwen3", dict(tied=True, hidden=256, heads=2, kv_heads=1,
                            metadata={"qwen3.attention.key_length": 128})),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_tiny_gguf_loads_exactly_and_matches_transformers(case, tmp_path):
    arch, kw = ARCH_CASES[case]
    path = tmp_path / f"{case}.gguf"
    expected = write_tiny_gguf(path, arch, **kw)
    cfg, sd, tok = load_gguf(path)
    assert cfg.model_type == arch and cfg.vocab_size == VOCAB
    assert cfg.tie_word_embeddings == kw.get("tied", False)
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    assert set(sd) == set(expected)
    for k in expected:
        assert torch.equal(sd[k], expected[k]), k
    model = Transformer(cfg)
    model.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ours = model(ids)

    hf = transformers_gguf_model(tmp_path, path.name)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def transformers_gguf_model(folder: Path, filename: str):
    transformers = pytest.importorskip("transformers")
    with _offline():
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32).eval()


@contextmanager
def _offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _llama3_factors(head_dim: int, theta: float, rs: RopeScaling) -> torch.Tensor:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1 (1 / scaling per freq)."""
    base = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                       num_heads=1, num_kv_heads=1, rope_theta=theta)
    out = []
    for f in rope_inv_freq(base).tolist():
        wavelen = 2 * math.pi / f
        lo = rs.original_max_position_embeddings / rs.low_freq_factor
        hi = rs.original_max_position_embeddings / rs.high_freq_factor
        if wavelen < hi:
            out.append(1.0)
        elif wavelen > lo:
            out.append(rs.factor)
        else:
            s = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append(1 / ((1 - s) / rs.factor + s))
    return torch.tensor(out)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    rs = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)
    theta = 500000.0
    factors = _llama3_factors(64, theta, rs)
    assert factors.min() == 1.0 and factors.max() == 8.0  # all three regimes are exercised
    write_tiny_gguf(tmp_path / "l3.gguf", hidden=128, heads=2, kv_heads=1, rope_freqs=factors,
                    metadata={"llama.rope.freq_base": theta,
                              "llama.rope.scaling.original_context_length": 64})
    cfg, sd, _ = load_gguf(tmp_path / "l3.gguf")
    assert cfg.rope_scaling == rs and cfg.rope_theta == theta
    assert "rope_freqs.weight" not in sd
    # the frequencies ember computes are the file's, divided by its factors
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    torch.testing.assert_close(rope_inv_freq(cfg), plain / factors, rtol=1e-5, atol=0)


def test_linear_rope_scaling_from_metadata(tmp_path):
    write_tiny_gguf(tmp_path / "lin.gguf", metadata={"llama.rope.scaling.type": "linear",
                                                     "llama.rope.scaling.factor": 4.0})
    cfg, _, _ = load_gguf(tmp_path / "lin.gguf")
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    write_tiny_gguf(tmp_path / "yarn.gguf", metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(EmberError, match="YaRN rope scaling without a positive llama.rope"):
        load_gguf(tmp_path / "yarn.gguf")
    write_tiny_gguf(tmp_path / "ntk.gguf", metadata={"llama.rope.scaling.type": "ntk"})
    with pytest.raises(EmberError, match="rope scaling type 'ntk'.*original Hugging Face"):
        load_gguf(tmp_path / "ntk.gguf")


def test_k_quant_mix_like_q4_k_m_matches_transformers(tmp_path):
    """A file mixing types per tensor the way llama.cpp's Q4_K_M does (Q6_K embeddings, Q4_K /
    Q5_K / Q6_K / Q8_0 / Q3_K matrices varying by layer, F32 norms, no output.weight: tied) loads
    to exactly the weights transformers' GGUF loader dequantizes, and to its logits."""
    rng = np.random.default_rng()
    hidden, heads, kv_heads, inter = 256, 4, 2, 256
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in {"llama.block_count": 2, "llama.context_length": 512,
                 "llama.embedding_length": hidden, "llama.feed_forward_length": inter,
                 "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
                 "llama.attention.layer_norm_rms_epsilon": 1e-6, **tiny_tokenizer_md()}.items():
        _put(w, k, v)

    def add(name, rows, cols, qt):
        if qt == Q.Q8_0:
            w.add_tensor(name, quants.quantize(rng.standard_normal((rows, cols)).astype(
                np.float32) * 0.05, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, _random_k_blocks(qt, rows * cols // 256, rng).reshape(rows, -1),
                         raw_dtype=qt)

    add("token_embd.weight", VOCAB, hidden, Q.Q6_K)
    for i, (qa, qb) in enumerate([(Q.Q4_K, Q.Q6_K), (Q.Q5_K, Q.Q8_0)]):
        p = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(p + norm + ".weight", 1 + 0.1 * rng.standard_normal(hidden, np.float32))
        add(p + "attn_q.weight", hidden, hidden, qa)
        add(p + "attn_k.weight", kv_heads * hidden // heads, hidden, Q.Q3_K)
        add(p + "attn_v.weight", kv_heads * hidden // heads, hidden, qb)
        add(p + "attn_output.weight", hidden, hidden, qa)
        add(p + "ffn_gate.weight", inter, hidden, qa)
        add(p + "ffn_up.weight", inter, hidden, qa)
        add(p + "ffn_down.weight", hidden, inter, qb)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg, sd, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    hf = transformers_gguf_model(tmp_path, "m.gguf")
    hf_sd = hf.state_dict()
    for k, v in sd.items():
        hk = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(
            k, "model." + k.replace(".attn.", ".self_attn.").replace("attn_norm", "input_layernorm")
            .replace("mlp_norm", "post_attention_layernorm"))
        assert torch.equal(v, hf_sd[hk]), k
    model = Transformer(cfg)
    model.load_state_dict(sd)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file (imported once per session, see smollm2_dir)

_SMOL: dict = {}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The built-in model imported through ember.models.hub into a session-private cache."""
    if "dir" not in _SMOL:
        from ember.models.hub import builtin_gguf_path, resolve_model

        try:
            builtin_gguf_path("smollm2-135m-instruct")
        except EmberError as e:
            pytest.skip(str(e))
        cache = tmp_path_factory.mktemp("ember_cache")
        old = os.environ.get("EMBER_CACHE")
        os.environ["EMBER_CACHE"] = str(cache)
        try:
            _SMOL["dir"] = resolve_model("smollm2-135m-instruct")
            _SMOL["cache"] = cache
        finally:
            if old is None:
                os.environ.pop("EMBER_CACHE")
            else:
                os.environ["EMBER_CACHE"] = old
    return _SMOL["dir"]


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model fp32, tokenizer) loaded from the imported folder."""
    if "model" not in _SMOL:
        from ember.models.loading import load_pretrained

        _SMOL["model"] = load_pretrained(smollm2_dir, dtype=torch.float32)
    return _SMOL["model"]


def test_hub_cache_is_reused(smollm2_dir):
    from ember.models.hub import resolve_model

    os.environ["EMBER_CACHE"] = str(_SMOL["cache"])
    try:
        t0 = time.perf_counter()
        assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_dir
        assert resolve_model("SmolLM2") == smollm2_dir
        assert time.perf_counter() - t0 < 10  # a hash of the file, no second import
    finally:
        os.environ.pop("EMBER_CACHE")
    assert resolve_model(smollm2_dir) == smollm2_dir  # folders pass through
    names = sorted(p.name for p in smollm2_dir.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors",
                            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])


def test_smollm2_matches_transformers_gguf_loading(smollm2_dir, smollm2):
    from ember.models.hub import builtin_gguf_path

    model, tok = smollm2
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    gguf_path = builtin_gguf_path("smollm2")
    hf = transformers_gguf_model(gguf_path.parent, gguf_path.name)
    # weights: exactly what transformers dequantizes (its own torch dequantizers)
    hf_sd = hf.state_dict()
    for k, v in model.state_dict().items():
        hk = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(
            k, "model." + k.replace(".attn.", ".self_attn.").replace("attn_norm", "input_layernorm")
            .replace("mlp_norm", "post_attention_layernorm"))
        assert torch.equal(v, hf_sd[hk]), k
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| {diff:.3g} (logits up to {ref.abs().max():.3g})"


def test_import_gguf_cli_api(tmp_path):
    """import_gguf writes a folder ember reloads to the same weights (tiny file, fast)."""
    src = tmp_path / "m.gguf"
    expected = write_tiny_gguf(src)
    out = import_gguf(src, tmp_path / "out")
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(out)
    sd = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
