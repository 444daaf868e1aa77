"""Added tokens whose flags (lstrip, rstrip, single_word, normalized, special) differ between
tokenizer.json and tokenizer_config.json's ``added_tokens_decoder``: transformers 5 re-adds the
config's, so they win. The oracle is ``AutoTokenizer`` on the same folder."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from ember.models.tokenizer import load_tokenizer

TEXTS = ["Hello <mask> world", "a <sep> b", "a<sep>b", "x  <tag>  y", "HI <Tag>",
         "foo <sep>bar <sep> baz", "wx<tag>yz", "<mask><mask> <mask>"]
NAMES = ("lstrip", "rstrip", "single_word", "normalized")


def _folder(tmp_path, in_json: bool, in_config: bool):
    """tokenizer.json whose added tokens have every flag ``in_json``; the config has them all
    ``in_config`` and makes <sep> special (tokenizer.json has it as plain text)."""
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    flags = dict.fromkeys(NAMES, in_json)
    tok.add_special_tokens([AddedToken("<mask>", special=True, **flags)])
    tok.add_tokens([AddedToken(t, special=False, **flags) for t in ("<sep>", "<tag>")])
    tok.save(str(tmp_path / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): {"content": t, "special": t != "<tag>",
                                         **dict.fromkeys(NAMES, in_config)}
               for t in ("<mask>", "<sep>", "<tag>")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": decoder}))
    return tmp_path


@pytest.mark.parametrize("in_json, in_config", [(False, True), (True, False)])
def test_config_flags_of_added_tokens_win_as_in_transformers(tmp_path, in_json, in_config):
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path, in_json, in_config)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), text


@pytest.mark.parametrize("with_decoder", [False, True])
def test_special_tokens_map_read_as_transformers_reads_it(tmp_path, with_decoder):
    """special_tokens_map.json overrides tokenizer_config.json's special tokens in a legacy folder
    (no ``added_tokens_decoder``) and is ignored in a newer one, as transformers 5 reads it
    (Ember read the config first and the map only for tokens the config lacks)."""
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path, False, False)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if not with_decoder:
        del cfg["added_tokens_decoder"]
    cfg["eos_token"] = "<mask>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": {"content": "<s>"}}))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert (theirs.eos_token, theirs.pad_token) == (("<mask>", None) if with_decoder
                                                    else ("</s>", "<s>"))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_id") or (
            name == "pad_token"), name  # (Ember's pad falls back to eos)


def test_tokenizer_files_that_are_not_json_objects(tmp_path):
    from ember import EmberError

    folder = _folder(tmp_path, False, False)
    (folder / "special_tokens_map.json").write_text('["</s>"]')
    with pytest.raises(EmberError, match=r"special_tokens_map.json: expected a JSON object"):
        load_tokenizer(folder)


# folder kind -> (tokenizer_class, config.json model type, test_tokenizer_pipelines vocabulary)
REBUILT = {
    "qwen2": ("Qwen2Tokenizer", "qwen2", "qwen2"),
    "llama": ("LlamaTokenizer", "llama", "metaspace_first"),
    "as_written": ("PreTrainedTokenizerFast", None, "qwen2"),
    # classes whose pipeline Ember keeps as tokenizer.json has it (SmolLM2's, Gemma's)
    "gpt2": ("GPT2Tokenizer", "llama", "bytelevel"),
    "gemma": ("GemmaTokenizer", "gemma", "gemma"),
}
CHAT = ["<|im_start|>user\nhi<|im_end|>\n", "a<extra_0>b <tool> c", "<extra_1> x<s>y</s>"]


@pytest.mark.parametrize("change", ["rename", "omit", "reflag"])
@pytest.mark.parametrize("kind", list(REBUILT))
def test_config_added_tokens_replace_tokenizer_json_ones_where_transformers_rebuilds(
        tmp_path, kind, change):
    """Where transformers 5 builds a tokenizer class's own pipeline over tokenizer.json's
    vocabulary (Qwen2Tokenizer for model type qwen2, LlamaTokenizer over a SentencePiece BPE,
    GPT2Tokenizer, GemmaTokenizer),
    tokenizer.json's added tokens are dropped and tokenizer_config.json's ``added_tokens_decoder``
    is the list, added in id order (then the named special tokens). A config that renames id 500
    "<extra_0>" to "<tool>" gave "<tool>" id 500 in transformers and 502 in Ember (past the
    embedding of a 501-row model); one that omits "<|im_start|>" splits it into pieces in
    transformers, where Ember kept it whole. A folder read as written (PreTrainedTokenizerFast)
    keeps tokenizer.json's tokens and adds the config's (test above)."""
    transformers = pytest.importorskip("transformers")
    from tests.models.test_tokenizer_pipelines import TEXTS as MORE
    from tests.models.test_tokenizer_pipelines import _trained

    cls, model_type, vocab = REBUILT[kind]
    if vocab == "gemma":  # Gemma's tokenizer.json: spaces replaced, byte fallback, no prefix
        tok = _trained("metaspace_never", normalizers.Replace(" ", "▁"), byte_fallback=True,
                       unk_token="<unk>", fuse_unk=True)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:
        tok = _trained(vocab, byte_fallback=True) if vocab.startswith("meta") else _trained(vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<extra_0>", "<extra_1>")])
    tok.save(str(tmp_path / "tokenizer.json"))
    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                        "normalized": t.normalized, "single_word": t.single_word,
                        "special": t.special}
               for i, t in tok.get_added_tokens_decoder().items()}
    extra_0, im_start = str(tok.token_to_id("<extra_0>")), str(tok.token_to_id("<|im_start|>"))
    if change == "rename":
        decoder[extra_0]["content"] = "<tool>"
    elif change == "omit":
        del decoder[im_start]
    else:
        decoder[im_start] |= {"special": False, "rstrip": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<unk>", "mask_token": "<unk>",  # (none of Qwen2's / Gemma's defaults)
         "added_tokens_decoder": decoder}))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert len(ours) == len(theirs)
    for text in [*CHAT, *MORE[:20]]:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("kind", ["qwen2", "as_written"])
def test_qwen2_tokenizer_resets_the_flags_of_its_special_tokens(tmp_path, kind):
    """transformers 5's Qwen2Tokenizer re-adds every special token it names (bos, eos, unk, pad,
    the extra list) as a plain special token, so their lstrip / rstrip from the config are gone:
    "hi <|im_end|> x" keeps the spaces around an lstrip/rstrip <|im_end|> there (Ember stripped
    them: [454, 4, 92] where transformers has [454, 225, 4, 333]). Tokens it does not name keep
    their flags, and a folder read as written keeps them all."""
    transformers = pytest.importorskip("transformers")
    from tests.models.test_tokenizer_pipelines import _trained

    cls, model_type, vocab = REBUILT[kind]
    tok = _trained(vocab)
    tok.save(str(tmp_path / "tokenizer.json"))
    strip = {"lstrip": True, "rstrip": True}
    decoder = {str(i): {"content": t.content, "normalized": False, "single_word": False,
                        "special": True, **strip}
               for i, t in tok.get_added_tokens_decoder().items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<unk>", "additional_special_tokens": ["<|im_end|>"],
         "added_tokens_decoder": decoder}))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in ["hi <|im_end|> x", "<s> x </s> y", "a  <|im_start|>  b", *CHAT]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
