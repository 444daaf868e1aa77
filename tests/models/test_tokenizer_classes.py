"""What the tokenizer classes transformers 5 builds over a tokenizer.json (``ember.models.
tokenizer_classes``) do beyond the pipeline: the BOS / EOS their ``__init__`` adds whatever the
file's post-processor and the config say (CodeLlamaTokenizer always BOS, GPTNeoXTokenizer
nothing), their default special tokens for a config that names none (Qwen2Tokenizer's
``<|endoftext|>``; left out where the vocabulary lacks it), and which class a model type gets. The
oracle is ``AutoTokenizer`` on the same folder (a small BPE trained at test time)."""

from __future__ import annotations

import json
import warnings
from functools import cache

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, trainers
from tokenizers import normalizers as norms
from tokenizers import pre_tokenizers as pre
from tokenizers import processors as post

from ember.models.tokenizer import load_tokenizer
from tests.models.test_tokenizer_pipelines import CORPUS, _trained

TEXTS = ["Hello world", " a", "x", "", "hi<|endoftext|> there</s>", "<s>x</s>"]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@cache
def _vocab(name: str) -> str:
    """A trained tokenizer.json, once per vocabulary kind (training is most of the cost)."""
    if name == "gemma":  # GemmaTokenizer's own pipeline (its vocabulary lacks <mask>)
        tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
        tok.normalizer = norms.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        tok.train_from_iterator(
            CORPUS,
            trainers.BpeTrainer(
                vocab_size=500,
                special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                show_progress=False,
            ),
        )
        return tok.to_str()
    bpe = {"byte_fallback": True} if name.startswith("metaspace") else {}
    return _trained(name, **bpe).to_str()


def _folder(
    tmp_path,
    name: str,
    cfg: dict,
    model_type: str | None = None,
    processor: str | None = None,
    extra: tuple[str, ...] = (),
):
    tok = Tokenizer.from_str(_vocab(name))
    tok.add_special_tokens(list(extra))
    if processor == "none":
        tok.post_processor = None
    elif processor in ("<s>", "</s>"):
        single = f"{processor} $A" if processor == "<s>" else f"$A {processor}"
        tok.post_processor = post.TemplateProcessing(
            single=single,
            pair=f"{single} $B:1",
            special_tokens=[(processor, tok.token_to_id(processor))],
        )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with warnings.catch_warnings():  # tokens the vocabulary lacks: said elsewhere
        warnings.simplefilter("ignore")
        ours = load_tokenizer(tmp_path)
    return ours, transformers.AutoTokenizer.from_pretrained(tmp_path)


def _assert_like(ours, theirs):
    """Ember's tokenizer is transformers', except for the class's default special tokens the
    vocabulary lacks: transformers adds them past the vocabulary (ids the model cannot embed),
    Ember leaves them out (no such token: None), and texts holding one differ."""
    new = {t for t, i in theirs.get_vocab().items() if i >= len(ours)}
    assert len(ours) == len(theirs) - len(new)
    texts = [t for t in TEXTS if not any(n in t for n in new)]
    for special in (False, True):
        got = ours.encode_batch(texts, add_special_tokens=special)
        assert got == [theirs.encode(t, add_special_tokens=special) for t in texts], special
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):  # (Ember's pad id falls
        want = None if getattr(theirs, name) in new else getattr(theirs, name)  # back to eos's)
        assert getattr(ours, name) == want, name
        want_id = None if want is None else getattr(theirs, name + "_id")
        assert getattr(ours, name + "_id") == want_id or name == "pad_token"
    if not new:
        ids = theirs.encode(TEXTS[4], add_special_tokens=True)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), skip


@pytest.mark.parametrize("processor", ["none", "<s>", "</s>"])
@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False, "add_eos_token": True}])
@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("CodeLlamaTokenizer", "metaspace_first"),
        ("LlamaTokenizer", "metaspace_first"),
        ("GPTNeoXTokenizer", "bytelevel"),
        ("Qwen2Tokenizer", "qwen2"),
    ],
)
def test_bos_eos_added_as_the_class_adds_them(cls, name, flags, processor, tmp_path):
    """CodeLlamaTokenizer passes its ``add_bos_token=True`` default to the backend, which then
    rebuilds the post-processor as BOS + text (transformers drops the config's add_bos_token /
    add_eos_token beside a tokenizer.json); GPTNeoXTokenizer rebuilds it with neither. Ember kept
    tokenizer.json's post-processor: no BOS for CodeLlama without one (Ember [233, 189],
    transformers [0, 233, 189]) and BOS / EOS for GPT-NeoX where the file adds them. The other
    classes keep the file's."""
    ours, theirs = _folder(
        tmp_path, name, {"tokenizer_class": cls, **SPECIALS, **flags}, processor=processor
    )
    _assert_like(ours, theirs)
    ids = theirs.encode("x", add_special_tokens=True)
    assert (ours.add_bos_token, ours.add_eos_token) == (
        ids[0] == theirs.bos_token_id,
        ids[-1] == theirs.eos_token_id,
    )


@pytest.mark.parametrize("extra", [(), ("<|endoftext|>", "<|padding|>")])
@pytest.mark.parametrize(
    "cfg", [{}, {"eos_token": "</s>"}, {"unk_token": None, "eos_token": None, "pad_token": None}]
)
@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("Qwen2Tokenizer", "qwen2"),
        ("GPTNeoXTokenizer", "bytelevel"),
        ("GPT2Tokenizer", "bytelevel"),
        ("CodeLlamaTokenizer", "metaspace_first"),
        ("LlamaTokenizer", "metaspace_first"),
        ("GemmaTokenizer", "gemma"),
    ],
)
def test_class_default_special_tokens(cls, name, cfg, extra, tmp_path):
    """A config that names no eos / unk / pad (/ bos) gets the class's own: Qwen2Tokenizer's
    <|endoftext|> for unk, eos and pad (GPT-2's and GPT-NeoX's for bos too, Llama's <s>, </s>,
    <unk>, CodeLlama's infilling tokens) where the vocabulary has it (Ember had no eos, unk or
    pad); where it lacks it transformers adds it (Qwen2: 501 tokens, eos = pad = 500) and Ember
    leaves it out (``_assert_like``); a null in the config is no token."""
    ours, theirs = _folder(tmp_path, name, {"tokenizer_class": cls, **cfg}, extra=extra)
    _assert_like(ours, theirs)


@pytest.mark.parametrize(
    ("model_type", "cls", "name"),
    [
        ("gpt_neox", "GPTNeoXTokenizer", "bytelevel"),  # registered: the class
        ("olmo", "GPTNeoXTokenizer", "bytelevel"),
        ("stablelm", "GPTNeoXTokenizer", "bytelevel"),  # registered generic: as written
        ("qwen3", None, "qwen2"),  # no class named: the registered one
        ("qwen2_vl", "Qwen2Tokenizer", "qwen2"),
        ("qwen3_next", "PreTrainedTokenizerFast", "qwen2"),
        ("deepseek_v2", "LlamaTokenizerFast", "metaspace_first"),  # not registered: the folder's
        ("granitemoe", "GPT2Tokenizer", "bytelevel"),
        ("llama", "LlamaTokenizerFast", "bytelevel"),  # DeepSeek's: as written, no <s> / </s>
    ],
)
def test_model_types_get_the_class_transformers_resolves(model_type, cls, name, tmp_path):
    """transformers 5 resolves the class from config.json's model type and the folder's
    ``tokenizer_class`` for every model type (its tokenizer registry), not only the ones Ember
    loads models of: GPT-NeoX's class drops the BOS tokenizer.json adds (Ember kept it), a qwen3
    folder naming no class is Qwen2Tokenizer (Ember: as written, no eos), a model type it does
    not register builds the folder's class (Llama's <s> / </s> defaults)."""
    cfg = {"tokenizer_class": cls} if cls else {}
    ours, theirs = _folder(tmp_path, name, cfg, model_type=model_type, processor="<s>")
    _assert_like(ours, theirs)


def test_a_class_default_the_vocabulary_lacks_never_gets_an_id_past_it(tmp_path):
    """Qwen2Tokenizer's <|endoftext|> beside a 500-token vocabulary without it: transformers makes
    it id 500 and the eos (a tiny model's 500-row embedding then fails on it: training crashed
    with 'index out of range'); Ember keeps the vocabulary and has no eos."""
    ours, theirs = _folder(tmp_path, "qwen2", {"tokenizer_class": "Qwen2Tokenizer"})
    assert theirs.eos_token_id == len(ours) == 500
    assert ours.eos_token_id is None and len(ours) == 500
    ids = ours.encode_batch(TEXTS, add_special_tokens=True)
    assert max(max(row, default=0) for row in ids) < 500
