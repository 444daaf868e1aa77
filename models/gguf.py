"""GGUF import: read a llama.cpp model file into an ember ``ModelConfig``, state dict and tokenizer.

Architectures (``general.architecture``): ``llama`` (also Mistral, SmolLM2), ``qwen2``, ``qwen3``,
``gemma``, ``gemma2``, ``gemma3`` (text; becomes ``gemma3_text``) and ``phi3``; the Gemma and Phi-3
specifics (norms stored as 1 + w, windows, softcaps, local RoPE base, fused qkv / gate-up, and the
values llama.cpp hard-codes instead of storing) are in ``ember.models.gguf_arch``. Mixture of
experts (Mixtral as ``llama`` with ``expert_count``, ``qwen2moe``, ``qwen3moe``):
``ember.models.gguf_moe``. Refused with an error naming the key or tensor: other architectures,
mmproj (``clip``) and multimodal files, head counts or sizes that differ between layers
(one value repeated per layer, ``block_count`` times, is read as that value), partial rotary
outside phi3, tensor types no dequantizer here or in ``gguf.quants`` knows (Q8_K, I32 ...:
before any tensor is read), ``tokenizer.*`` values of a type llama.cpp refuses. As llama.cpp,
a special token id past the vocabulary is ignored (with a warning) and text that is not UTF-8
is read outside ``tokenizer.*`` (with U+FFFD).
RoPE (linear, Llama 3.1 ``rope_freqs``, YaRN, Phi-3 LongRoPE ``rope_factors_long/short``) is read
in ``ember.models.gguf_rope``.

Format (v2/v3, little-endian): magic ``GGUF``, version, tensor count, metadata count, metadata
key/values, a tensor table (name, dims in ggml order = fastest first, type, offset), then the tensor
data at ``general.alignment`` (32). The header is parsed in ``ember.models.gguf_reader`` with
``struct`` (``gguf.GGUFReader`` builds a numpy view per string and takes seconds on a 49k-token
vocabulary); the ``gguf`` package supplies the type constants and serves as the test oracle.

Transforms applied to get back to Hugging Face / ember layout:
- dequantize every tensor to fp32 (``ember.models.gguf_dequant``: vectorized torch ports of
  ggml's block formats; the rest through ``gguf.quants``), then cast to the requested dtype;
  ``import_gguf`` does it one tensor at a time as the HF folder's shards (1 GB) are written
  (``deferred_state_dict``), so importing an 8B file takes a few GB of memory, not 32 GB;
- undo llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py`` reorders each head's rows from
  HF's rotate-half layout to interleaved pairs for llama-architecture files);
- rename ``blk.N.attn_q`` ... to ``layers.N.attn.q_proj`` ...; a missing ``output`` means tied
  embeddings; ``rope_freqs`` / ``rope_factors_*`` tensors become a ``RopeScaling``;
- Gemma: subtract the 1 llama.cpp added to every norm weight; Phi-3: split ``attn_qkv`` and the
  fused ``ffn_up`` (``ember.models.gguf_arch``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.deferred import Deferred
from ember.models.gguf_arch import (
    ARCHITECTURES,
    EXTRA_BLOCK_NAMES,
    arch_fields,
    arch_tensors,
    check_supported,
)
from ember.models.gguf_dequant import (  # noqa: F401  (dequantize: re-exported, tests use it here)
    dequantize,
    unsupported_reason,
)
from ember.models.gguf_moe import moe_fields, split_expert_name
from ember.models.gguf_reader import (  # noqa: F401  (re-exported: their old home)
    GGUFFile,
    Q,
    TensorInfo,
)
from ember.models.gguf_rope import ROPE_TENSORS, nice_float, rope_fields

# ------------------------------------------------------------------------------------------
# Names, permutation, config

_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    **{f"{g}.{p}": f"{e}.{p}" for g, e in [
        ("attn_q", "attn.q_proj"), ("attn_k", "attn.k_proj"), ("attn_v", "attn.v_proj"),
        ("attn_output", "attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj")] for p in ("weight", "bias")},
    **EXTRA_BLOCK_NAMES,
}
_TOP_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight",
              "output_norm.bias": "norm.bias", "output.bias": "head_bias"}  # phi2's biases


def ember_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``layers.3.attn.q_proj.weight``; None for unknown names."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return split_expert_name(gguf_name)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: per head, rows (2, hd/2) interleaved back to (hd/2, 2)
    halves. Works on weights (rows, cols) and biases (rows,)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute`` (HF -> GGUF), used by tests to write files the way llama.cpp does."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(w.shape)


def _head_dim_from_q(g: GGUFFile, heads: int) -> int | None:
    """The head size the first query projection implies (its rows / heads), for files without
    ``attention.key_length`` (converters before it existed) whose heads are not hidden / heads
    (Mistral Nemo's 128 for 5120 / 32): what transformers reads there (from
    ``rope.dimension_count``) and what the weights hold. None without a separate q tensor."""
    q = g.tensors.get("blk.0.attn_q.weight")
    if q is None or len(q.shape) != 2 or q.shape[0] % heads:
        return None
    return q.shape[0] // heads


# transformers' config class defaults, which its GGUF loader keeps for a file without the key
_HF_RMS_EPS = {"phi3": 1e-5, "olmo2": 1e-5}


def _rms_eps(get, arch: str, model_type: str, path: Path) -> float:
    """``attention.layer_norm_rms_epsilon``; missing (llama.cpp refuses such a file), the
    transformers default of the family, with a warning."""
    eps = get("attention.layer_norm_rms_epsilon")
    if eps is not None or arch in ("phi2", "starcoder2"):  # LayerNorms: eps in arch_fields
        return nice_float(1e-5 if eps is None else eps)
    eps = _HF_RMS_EPS.get(model_type, 1e-6)
    warnings.warn(f"{path}: {arch}.attention.layer_norm_rms_epsilon is missing (llama.cpp "
                  f"refuses such a file); using {eps}, transformers' default for {model_type}",
                  stacklevel=4)
    return eps


# tokenizer keys -> the values llama.cpp (llama-vocab.cpp) accepts; it refuses another GGUF
# type ("invalid gguf type for ...", "key ... has wrong type"); a list: one per element
_KINDS = {"text": str, "an integer": int, "a number": int | float, "a bool": bool}
_TOKENIZER_KEYS = {
    "model": "text", "pre": "text", "tokens": ["text"], "merges": ["text"],
    "token_type": ["an integer"], "scores": ["a number"],
    **{f"{k}_token_id": "an integer" for k in ("bos", "eos", "eot", "eom", "unknown",
                                              "seperator", "padding", "mask")},
    **{f"add_{k}": "a bool" for k in ("bos_token", "eos_token", "space_prefix")},
}


def check_tokenizer_types(md: dict, path: Path) -> None:
    """EmberError naming the first ``tokenizer.*`` key whose value is not what llama.cpp reads
    (ints for the tokens, a string token id ...), before anything indexes with it."""
    def fits(x, kind):  # (a bool is an int to Python, never a number here)
        return isinstance(x, _KINDS[kind]) and (kind == "a bool") == isinstance(x, bool)

    keys = {**{f"tokenizer.ggml.{k}": v for k, v in _TOKENIZER_KEYS.items()},
            "tokenizer.chat_templates": ["text"]}
    for key, kind in ((k, v) for k, v in keys.items() if md.get(k) is not None):
        v, one = md[key], kind[0] if isinstance(kind, list) else kind
        if kind == one and not fits(v, one) or kind != one and not isinstance(v, list):
            said = f"is {v!r} ({type(v).__name__}), not {'a list of ' * (kind != one)}{one}"
        elif kind != one and (bad := [x for x in v if not fits(x, one)]):
            said = f"holds {bad[0]!r} ({type(bad[0]).__name__}) where each value is {one}"
        else:
            continue
        raise EmberError(f"{path}: metadata key {key} {said}; the file is corrupt (llama.cpp "
                         "refuses it too): convert the model again")


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """Rebuild the ModelConfig from ``<arch>.*`` metadata and the tensor table."""
    md, path = g.metadata, g.path
    arch = md.get("general.architecture")
    check_supported(arch, md, g.tensors, path)
    check_tokenizer_types(md, path)
    model_type, _ = ARCHITECTURES[arch]

    def get(key, default=None, required=False):
        v = md.get(f"{arch}.{key}", default)
        if required and v is None:
            raise EmberError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(v, list):  # per-layer values (llama.cpp's arrays): one value for all
            layers = md.get(f"{arch}.block_count")
            if isinstance(layers, int) and len(v) != layers:  # llama.cpp: "wrong array length"
                raise EmberError(f"{path}: {arch}.{key} holds {len(v)} per-layer values for "
                                 f"{layers} layers ({arch}.block_count); the file is corrupt: "
                                 "convert the model again")
            if not v or any(x != v[0] for x in v):
                raise EmberError(f"{path}: {arch}.{key} varies per layer ({v[:8]}); models with "
                                 "per-layer sizes are not supported")
            v = v[0]
        if key != "rope.scaling.type" and v is not None and not isinstance(v, int | float):
            raise EmberError(f"{path}: {arch}.{key} is {v!r}, not a number; the file is "
                             "corrupt: convert the model again")
        return v

    hidden, heads = int(get("embedding_length", required=True)), int(
        get("attention.head_count", required=True))
    if hidden <= 0 or heads <= 0:
        raise EmberError(f"{path}: {arch}.embedding_length {hidden} and "
                         f"{arch}.attention.head_count {heads} must be positive")
    head_dim = int(get("attention.key_length") or _head_dim_from_q(g, heads) or hidden // heads)
    if "token_embd.weight" not in g.tensors:
        raise EmberError(f"{path}: tensor token_embd.weight is missing")
    vocab = g.tensors["token_embd.weight"].shape[0]
    context = int(get("context_length", 4096))
    rope = rope_fields(g, arch, get, head_dim, context)

    n_tokens = len(md.get("tokenizer.ggml.tokens") or ()) or vocab

    def tok_id(key):  # llama.cpp keeps its default for an id outside the vocabulary, and warns
        v = md.get(f"tokenizer.ggml.{key}")
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_tokens):
            return v
        warnings.warn(f"{path}: tokenizer.ggml.{key} = {v!r} is not a token id (the vocabulary "
                      f"has {n_tokens}); ignored, as llama.cpp ignores it", stacklevel=5)
        return None

    from ember.models.tokenizer import gguf_stop_ids

    eos = gguf_stop_ids(md)
    has = g.tensors.__contains__
    fields = dict(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv") or heads), head_dim=head_dim,
        rms_norm_eps=_rms_eps(get, arch, model_type, path),
        **rope, max_position_embeddings=context,
        tie_word_embeddings=not has("output.weight"),
        attention_bias=has("blk.0.attn_q.bias"), attention_out_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_up.bias"), qk_norm=has("blk.0.attn_q_norm.weight"),
        bos_token_id=tok_id("bos_token_id"),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=tok_id("padding_token_id"), torch_dtype="float32",
    )
    if get("expert_count"):  # mixture of experts (ember.models.gguf_moe)
        fields.update(moe_fields(arch, get, path))
    elif arch in ("qwen2moe", "qwen3moe"):
        raise EmberError(f"{path}: {arch}.expert_count is missing")
    try:
        return ModelConfig(**{**fields, **arch_fields(arch, md, get, fields)})
    except EmberError:
        raise
    except ValueError as e:  # ModelConfig's own checks (heads a multiple of kv heads ...)
        raise EmberError(f"{path}: the metadata describes no valid model: {e}") from None


def _ember_names(g: GGUFFile) -> Iterator[tuple[str, str]]:
    """(GGUF name, Ember name) of every weight tensor (RoPE factor tensors are read as config)."""
    unknown = [n for n in g.tensors if ember_name(n) is None and n not in ROPE_TENSORS]
    if unknown:
        raise EmberError(f"{g.path}: unexpected tensors {unknown[:5]} for a "
                         f"{g.metadata['general.architecture']} model; not supported")
    for name, t in g.tensors.items():  # before any work: a type found late wastes minutes
        why = unsupported_reason(t.qtype)
        if why is not None:
            raise EmberError(f"{g.path}: tensor {name!r}: {why}")
    for name in g.tensors:
        key = ember_name(name)
        if key is not None:
            yield name, key


def _converted(g: GGUFFile, cfg: ModelConfig, name: str, key: str,
               w: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(Ember key, tensor) pairs of GGUF tensor ``name`` with values ``w`` (fp32, or meta for
    shapes only): unpermuted, then split / offset per architecture."""
    arch = g.metadata["general.architecture"]
    if ARCHITECTURES[arch][1] and (".attn_q." in name or ".attn_k." in name):
        q = ".attn_q." in name
        heads = cfg.num_heads if q else cfg.num_kv_heads
        if w.shape[0] != heads * cfg.head_dim:  # the permutation works per head
            key = f"{arch}.attention.head_count{'' if q else '_kv'}"
            raise EmberError(f"{g.path}: tensor {name!r} has {w.shape[0]} rows, but {key} "
                             f"{g.metadata.get(key)} and head_dim {cfg.head_dim} imply "
                             f"{heads * cfg.head_dim}; the file is inconsistent: convert the "
                             "model again")
        w = unpermute_qk(w, heads)
    try:
        yield from arch_tensors(arch, name, key, w, cfg)
    except EmberError as e:
        raise EmberError(f"{g.path}: {e}") from None


def iter_state_dict(g: GGUFFile, cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(ember name, tensor) pairs, dequantized, unpermuted, cast to ``dtype``, one at a time."""
    for name, key in _ember_names(g):
        for k, t in _converted(g, cfg, name, key, g.tensor(name)):
            yield k, t.to(dtype)


class _LastTensor:
    """The converted outputs of the GGUF tensor dequantized last: the parts a fused or stacked
    tensor splits into are written one after another, so each is dequantized once."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig) -> None:
        self.g, self.cfg, self.name, self.parts = g, cfg, None, {}

    def get(self, name: str, key: str, part: str) -> torch.Tensor:
        if name != self.name:
            self.name, self.parts = None, {}  # free the last one first
            self.parts = dict(_converted(self.g, self.cfg, name, key, self.g.tensor(name)))
            self.name = name
        return self.parts[part]


def deferred_state_dict(g: GGUFFile, cfg: ModelConfig,
                        dtype: torch.dtype = torch.float32) -> dict[str, Deferred]:
    """The state dict of ``iter_state_dict`` with each tensor deferred (``ember.models.deferred``):
    shapes now, values dequantized from the open file when written, one GGUF tensor in memory
    at a time."""
    last, sd = _LastTensor(g, cfg), {}
    for name, key in _ember_names(g):
        meta = torch.empty(g.tensors[name].shape, device="meta")
        for part, t in _converted(g, cfg, name, key, meta):
            sd[part] = Deferred(t.shape, dtype, partial(last.get, name, key, part))
    return sd


def _check_shapes(sd: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    from ember.models.hf import expected_shapes

    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    if missing:
        raise EmberError(f"{path}: tensors missing for {missing[:5]} (have {len(sd)} of "
                         f"{len(want)})")
    extra = sorted(set(sd) - set(want))
    if extra:  # llama.cpp refuses such a file too ("wrong number of tensors")
        raise EmberError(f"{path}: tensors for {extra[:5]} ({len(extra)} in all) that the "
                         f"metadata does not describe ({cfg.num_layers} blocks, block_count); "
                         "the file is inconsistent: convert the model again")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise EmberError(f"{path}: tensor for {k} has shape {tuple(sd[k].shape)}, the "
                             f"metadata implies {tuple(shape)}")


def _config_and_tokenizer(g: GGUFFile, path, dtype: torch.dtype):
    from ember.models.tokenizer import tokenizer_from_gguf

    cfg = config_from_gguf(g)
    vocab = g.metadata.get("tokenizer.ggml.model")
    if vocab in (None, "none", "no_vocab"):
        warnings.warn(f"{g.path} has no vocabulary (tokenizer.ggml.model {vocab!r}): "
                      "returning tokenizer=None (token ids in and out only)", stacklevel=3)
        tok = None
    else:
        tok = tokenizer_from_gguf(g.metadata, source=str(g.path))
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise EmberError(f"{path}: tokenizer has {tok.vocab_size} tokens but the embedding only "
                         f"{cfg.vocab_size} rows")
    return cfg.replace(torch_dtype=str(dtype).removeprefix("torch.")), tok


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """Read a GGUF file -> ``(ModelConfig, ember state dict, Tokenizer)``. Weights are dequantized
    to fp32 and cast to ``dtype``. A file written without a vocabulary (``tokenizer.ggml.model``
    absent, "none" or "no_vocab", llama.cpp's LLAMA_VOCAB_TYPE_NONE) gives tokenizer None, with a
    warning, as an HF folder without tokenizer files does."""
    with GGUFFile(path) as g:
        cfg, tok = _config_and_tokenizer(g, path, dtype)
        sd = dict(iter_state_dict(g, cfg, dtype))
        _check_shapes(sd, cfg, g.path)
    return cfg, sd, tok


def import_gguf(gguf_path: str | Path, out_dir: str | Path,
                dtype: torch.dtype = torch.float32, max_shard_size: int | str = "1GB") -> Path:
    """Convert a GGUF file to a Hugging Face folder (config.json, safetensors, tokenizer files,
    generation_config.json) that both ember and transformers load, as ``load_gguf`` reads it.
    Streamed: each tensor is dequantized as its shard is written, so the import needs about two
    shards of memory (``max_shard_size``; the shard and its serialized bytes), not the whole model
    in ``dtype`` (measured on SmolLM2-135M: peak RSS 684 MiB with 100 MB shards, 1062 MiB before,
    324 MiB of it the interpreter and libraries)."""
    from ember.models.loading import save_state_dict

    with GGUFFile(gguf_path) as g:
        cfg, tok = _config_and_tokenizer(g, gguf_path, dtype)
        sd = deferred_state_dict(g, cfg, dtype)
        _check_shapes(sd, cfg, g.path)
        return save_state_dict(sd, cfg, out_dir, tok, max_shard_size=max_shard_size)
