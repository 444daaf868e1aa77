"""GGUF export of SentencePiece-style vocabularies (``tokenizer.ggml.model = "llama"``).

Fixtures: a real SentencePiece BPE model trained at test time (test_spm_tokenizer's), turned into
the HF-style tokenizers Ember loads from Llama 2 (Metaspace), Phi-3 (Prepend normalizer) and Gemma
(no prefix space, ``<start_of_turn>`` control tokens, chat template) folders, the same vocabulary
saved by transformers' own ``LlamaTokenizer`` / ``GemmaTokenizer``, and a BPE trained with the
``tokenizers`` library. Each is exported without a ``tokenizer.model``, so the scores are
derived, and read back by three readers whose ids must equal the original tokenizer's: Ember's
importer, transformers' GGUF tokenizer and ``llama_cpp_spm``, a transcription of llama.cpp's
``llm_tokenizer_spm`` (llama-vocab.cpp) used as the oracle for the runtime the file is for.
SentencePiece itself agrees too. End to end: ``ember export --gguf`` of tiny random Llama-2-style
and Gemma 2 models, re-imported by Ember and transformers (ids and logits)."""

from __future__ import annotations

import heapq
import json

import pytest
import tokenizers
import torch
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from ember import EmberError
from ember.engine.cli import main
from ember.models.gguf import GGUFFile, load_gguf
from ember.models.gguf_tokenizer import PROBE, tokenizer_metadata
from ember.models.gguf_tokenizer_spm import CHECKS
from ember.models.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from ember.models.transformer import Transformer
from tests.models.test_gguf import _offline
from tests.models.test_gguf_export import DIMS, _diff, _logits, _transformers_gguf
from tests.models.test_gguf_families import CASES
from tests.models.test_spm_tokenizer import (
    CORPUS,
    EXTRA,
    _metadata,
    _write,
    sp_model,  # noqa: F401  (module fixture)
)
from tests.models.test_tokenizer import TEXTS

transformers = pytest.importorskip("transformers")

EMBED = 640  # embedding rows: ids 602..639 are a vocabulary gap ([PAD<i>])
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# style -> GGUF architecture written; "tf-*": tokenizer.json written by transformers' classes
ARCH = {"llama": "llama", "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
        "trained": "llama", "tf-llama": "llama", "tf-gemma": "gemma3"}
# text for the llama.cpp oracle: no leading space, no control token (where HF's "first" Metaspace
# and llama.cpp knowingly differ: llama.cpp prefixes a space after every special token)
PLAIN = [t for t in [*TEXTS, *EXTRA, PROBE, *CHECKS] if t and not t[0].isspace() and "<" not in t]


# ---------------------------------------------------------------------------------------------
# llama.cpp's SentencePiece tokenizer, transcribed (llama-vocab.cpp: llm_tokenizer_spm_session,
# the SPM branch of tokenize_impl, tokenizer_st_partition for user-defined tokens)


def _spm_session(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    syms = list(text)  # UTF-8 characters; merged symbols grow, swallowed ones become ""
    prev, nxt = list(range(-1, len(syms) - 1)), [*range(1, len(syms)), -1]
    queue: list = []
    rev_merge: dict[str, tuple[int, int]] = {}

    def try_add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        piece = syms[left] + syms[right]
        if piece not in ids:
            return
        # priority_queue: best score first, then the leftmost pair
        heapq.heappush(queue, (-scores[ids[piece]], left, right, len(piece)))
        rev_merge[piece] = (left, right)

    for i in range(1, len(syms)):
        try_add_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left], syms[right] = syms[left] + syms[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add_bigram(prev[left], left)
        try_add_bigram(left, nxt[left])
    out: list[int] = []

    def resegment(piece: str) -> None:
        if piece in ids:
            out.append(ids[piece])
        elif piece in rev_merge:
            a, b = rev_merge[piece]
            resegment(syms[a])
            resegment(syms[b])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8"))

    i = 0 if syms else -1
    while i != -1:
        resegment(syms[i])
        i = nxt[i]
    return out


def llama_cpp_spm(md: dict, text: str, add_special: bool = False, parse_special: bool = False
                  ) -> list[int]:
    """The ids llama.cpp's ``llama_tokenize`` gives for ``text``: user-defined tokens are matched
    whole in the raw text, control and unknown ones only with ``parse_special``."""
    tokens, types, scores = (md[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    ids = {t: i for i, t in enumerate(tokens)}
    fragments: list[str | int] = [text]
    whole = [i for i, ty in enumerate(types) if ty in ((4, 3, 2) if parse_special else (4,))]
    for i in sorted(whole, key=lambda i: -len(tokens[i])):  # longest first
        split: list[str | int] = []
        for f in fragments:
            if isinstance(f, int):
                split.append(f)
                continue
            parts = f.split(tokens[i])
            for k, p in enumerate(parts):
                split += ([i] if k else []) + ([p] if p else [])
        fragments = split
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    add_bos = add_special and md.get("tokenizer.ggml.add_bos_token", True)
    out = [md["tokenizer.ggml.bos_token_id"]] if add_bos else []
    prev_special = True
    for f in fragments:
        if isinstance(f, int):
            out.append(f)
            prev_special = True
        else:
            raw = (" " if prefix and prev_special else "") + f
            out += _spm_session(raw.replace(" ", "\u2581"), ids, scores)
            prev_special = False
    return out


# ---------------------------------------------------------------------------------------------
# fixtures: HF-style tokenizers as Ember loads them from a model folder


def _trained_bpe() -> Tokenizer:
    """A BPE trained by the tokenizers library: byte fallback, Metaspace, 256 byte pieces."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True,
                                              fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_tokens([AddedToken("<|im_start|>", normalized=False)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                     add_bos_token=True)


def _transformers_written(sp, cls: str, folder) -> Tokenizer:
    """The tokenizer transformers' ``cls`` builds from the SentencePiece vocabulary (merges as its
    converter derives them), saved by transformers and loaded by Ember."""
    from transformers.tokenization_utils_base import generate_merges

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {p: sp.get_score(i) for p, i in vocab.items()}
    kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tok = getattr(transformers, cls)(vocab=vocab, merges=generate_merges(vocab, scores), **kw,
                                     **({"mask_token": "<unk>"} if cls == "GemmaTokenizer" else {}))
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(folder)
    return load_tokenizer(folder)


def _gemma_md(sp) -> dict:
    md = _metadata(sp, "gemma2", **{"tokenizer.ggml.add_space_prefix": False,
                                    "tokenizer.chat_template": GEMMA_TEMPLATE})
    md["tokenizer.ggml.tokens"] += ["<start_of_turn>", "<end_of_turn>"]
    md["tokenizer.ggml.scores"] += [0.0, 0.0]
    md["tokenizer.ggml.token_type"] += [3, 3]
    return md


@pytest.fixture(scope="module")
def styles(sp_model, tmp_path_factory) -> dict[str, Tokenizer]:  # noqa: F811
    """style -> the tokenizer an HF folder of that style loads as (saved and loaded back)."""
    out = {"trained": _trained_bpe()}
    for style in ("llama", "phi3", "gemma2"):  # one Gemma tokenizer, written as each Gemma arch
        md = _gemma_md(sp_model) if style == "gemma2" else _metadata(sp_model, style)
        folder = tmp_path_factory.mktemp(style)
        tokenizer_from_gguf(md).save_pretrained(folder)
        out[style] = load_tokenizer(folder)
    out["gemma"] = out["gemma3"] = out["gemma2"]
    for style, cls in (("tf-llama", "LlamaTokenizer"), ("tf-gemma", "GemmaTokenizer")):
        out[style] = _transformers_written(sp_model, cls, tmp_path_factory.mktemp(style))
    assert out["phi3"].backend.normalizer is not None and out["llama"].backend.normalizer is None
    return out


def _export(tok: Tokenizer, style: str, path) -> dict:
    md = {"general.architecture": ARCH[style], **tokenizer_metadata(tok, EMBED, ARCH[style])}
    _write(path, md)
    with GGUFFile(path) as g:
        return g.metadata


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(ARCH))
def test_every_reader_gives_the_original_ids(styles, style, sp_model, tmp_path):  # noqa: F811
    tok = styles[style]
    md = _export(tok, style, tmp_path / "t.gguf")
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in md
    gemma = ARCH[style].startswith("gemma")
    assert md["tokenizer.ggml.add_space_prefix"] == (not gemma)
    n = len(md["tokenizer.ggml.tokens"])
    assert n == EMBED and md["tokenizer.ggml.tokens"][-1] == f"[PAD{EMBED - 1}]"
    assert md["tokenizer.ggml.token_type"][-1] == 5
    if style in ("llama", "phi3") or style.startswith("gemma"):  # the converter's tokens, types
        ref = _gemma_md(sp_model) if gemma else _metadata(sp_model, style)
        k = len(ref["tokenizer.ggml.tokens"])
        for key in ("tokens", "token_type"):
            assert md[f"tokenizer.ggml.{key}"][:k] == ref[f"tokenizer.ggml.{key}"], key
    texts = [*TEXTS, *EXTRA, PROBE]
    ember = tokenizer_from_gguf(md)
    theirs = None
    if style != "gemma":  # transformers reads no Gemma (1) GGUF file, tokenizer included
        with _offline():
            theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in texts:
        want = tok.encode(text, add_special_tokens=True)
        assert ember.encode(text, add_special_tokens=True) == want, (style, text)
        # transformers ignores add_space_prefix (and prepends no second U+2581 to " x")
        if theirs is not None and (gemma or not text[:1].isspace()):
            assert theirs(text)["input_ids"] == want, (style, text)
    for text in PLAIN:
        assert llama_cpp_spm(md, text) == tok.encode(text), (style, text)
        if style == "llama":
            assert sp_model.encode(text) == tok.encode(text), text
    if style == "phi3":  # a prefix space after every added token, like llama.cpp's
        text = "<|im_start|>user\nhi there<|im_start|>x"
        assert llama_cpp_spm(md, text) == tok.encode(text)
    if tok.chat_template is not None:
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi there!"}],
                                       add_generation_prompt=True)
        assert ember.apply_chat_template([{"role": "user", "content": "Hi there!"}],
                                         add_generation_prompt=True) == chat
        ids = tok.encode(chat)
        assert ember.encode(chat) == ids == llama_cpp_spm(md, chat, parse_special=True)
        if theirs is not None:
            assert theirs(chat, add_special_tokens=False)["input_ids"] == ids
        assert ids[1] == tok.token_to_id("<start_of_turn>") == 600
        assert md["tokenizer.ggml.token_type"][600:602] == [3, 3]


@pytest.mark.parametrize("bad", ["zeros", "shuffled"])
def test_the_oracles_see_wrong_scores(styles, bad, tmp_path):
    """With the scores llama.cpp's converter writes without a tokenizer.model (-1000 everywhere)
    or with scores that do not follow the merges, llama.cpp's tokenization differs from the
    original (Ember's reading of the file too for shuffled scores; on ties it ranks merges by
    length, then file order, which happens to fit this vocabulary)."""
    tok = styles["llama"]
    md = _export(tok, "llama", tmp_path / "t.gguf")
    scores = md["tokenizer.ggml.scores"]
    g = torch.Generator().manual_seed(0)
    md["tokenizer.ggml.scores"] = ([-1000.0] * len(scores) if bad == "zeros" else
                                   [scores[i] for i in torch.randperm(len(scores), generator=g)])
    assert any(llama_cpp_spm(md, t) != tok.encode(t) for t in PLAIN)
    if bad == "shuffled":
        assert any(tokenizer_from_gguf(md).encode(t) != tok.encode(t) for t in PLAIN)


def _tiny_bpe(merges: list[tuple[str, str]], pre=None, norm=None) -> Tokenizer:
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), *"▁theqa"]
    pieces += [a + b for a, b in merges if a + b not in pieces]
    backend = tokenizers.Tokenizer(models.BPE(
        vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
        byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre or pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.normalizer = norm
    return Tokenizer(backend, unk_token="<unk>")


def test_refusals():
    # "the" only from "th" + "e", but "h" + "e" comes first: llama.cpp would still merge
    # "t" + "he", which this merge list never does
    with pytest.raises(EmberError, match=r"tokenizes 'the quick.* \(token 1: 'the' instead of 't'"):
        tokenizer_metadata(_tiny_bpe([("h", "e"), ("t", "h"), ("th", "e")]), 300)
    ok = _tiny_bpe([("h", "e"), ("t", "h"), ("th", "e"), ("t", "he")])
    assert tokenizer_metadata(ok, 300)["tokenizer.ggml.model"] == "llama"
    # Gemma readers rank by file position: pieces must come in merge order
    swapped = _tiny_bpe([("▁", "t"), ("h", "e")])
    spec = json.loads(swapped.backend.to_str())
    vocab = spec["model"]["vocab"]
    vocab["▁t"], vocab["he"] = vocab["he"], vocab["▁t"]
    swapped = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>")
    assert tokenizer_metadata(swapped, 300, "llama")
    with pytest.raises(EmberError, match="in id order"):
        tokenizer_metadata(swapped, 300, "gemma2")
    with pytest.raises(EmberError, match="prepends a space .* Gemma GGUF readers"):
        tokenizer_metadata(ok, 300, "gemma3")
    with pytest.raises(EmberError, match="changes more than spaces"):
        tokenizer_metadata(_tiny_bpe([], norm=normalizers.Lowercase()), 300)
    with pytest.raises(EmberError, match="turns 'a b' into"):
        tokenizer_metadata(_tiny_bpe([], pre=pre_tokenizers.Whitespace()), 300)
    spec = json.loads(ok.backend.to_str())
    del spec["model"]["vocab"]["<0x41>"]
    with pytest.raises(EmberError, match="no <0x41> piece"):
        tokenizer_metadata(Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec))), 300)
    unigram = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    with pytest.raises(EmberError, match="Unigram tokenizer"):
        tokenizer_metadata(Tokenizer(unigram), 300)
    with pytest.raises(EmberError, match="embedding only 200 rows"):
        tokenizer_metadata(ok, 200)


# ---------------------------------------------------------------------------------------------
# ember export --gguf of HF folders with such tokenizers


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_export_cli_end_to_end(styles, case, tmp_path):
    cls, kw = ("LlamaConfig", dict(num_hidden_layers=2)) if case == "llama" else CASES[case][1:]
    cfg = getattr(transformers, cls)(**{**DIMS, "vocab_size": EMBED, "pad_token_id": 2}, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(len(case))
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15))
    folder, out = tmp_path / "hf", tmp_path / "out" / "m.gguf"
    hf.save_pretrained(folder)
    tok = styles[case]
    tok.save_pretrained(folder)
    assert main(["export", str(folder), "--gguf", str(out), "--gguf-type", "f32"]) == 0

    cfg_back, sd, ember_tok = load_gguf(out)
    back = Transformer(cfg_back).eval()
    back.load_state_dict(sd)
    with _offline():
        theirs_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    theirs = _transformers_gguf(out, "gemma2" if case == "gemma2" else "llama", hf)
    for text in ["The quick brown fox, 3 + 4 = 7 🦙", PROBE]:
        want = tok.encode(text, add_special_tokens=True)
        assert ember_tok.encode(text, add_special_tokens=True) == want
        assert theirs_tok(text)["input_ids"] == want
        assert llama_cpp_spm(GGUFFile(out).metadata, text, add_special=True) == want
        ids = torch.tensor([want])
        ref = _logits(hf, ids)
        diffs = {"Ember": _diff(_logits(back, ids), ref), "transformers": _diff(
            _logits(theirs, ids), ref)}
        print(f"{case} {len(want)} tokens: max |logit diff| "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        assert all(v <= 1e-4 for v in diffs.values()), diffs
