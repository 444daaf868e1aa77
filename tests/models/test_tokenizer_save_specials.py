"""Special tokens that only transformers' bookkeeping holds (its ``extra_special_tokens`` list, a
slow class's default mask token): they survive ``save_pretrained`` and reach chat templates. The
oracle is ``AutoTokenizer`` on the same folder."""

from __future__ import annotations

import json
import warnings

import pytest

from ember.models.tokenizer import load_tokenizer
from tests.models.test_slow_tokenizer import _case_folder, _folder, trained  # noqa: F401

transformers = pytest.importorskip("transformers")


def _theirs(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("key", ["additional_special_tokens", "extra_special_tokens"])
@pytest.mark.parametrize("fast", [False, True])
def test_save_pretrained_keeps_the_extra_special_tokens(trained, tmp_path, key, fast):  # noqa: F811
    """Ember's saved folder dropped the extra special tokens: transformers read it back without
    them (``extra_special_tokens`` and ``all_special_tokens`` shorter than the original's)."""
    folder = _case_folder(trained, tmp_path, "qwen2")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg[key] = ["<|im_start|>", "<|im_end|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if fast:  # the same folder as transformers converts it, with a tokenizer.json
        _theirs(folder).save_pretrained(str(tmp_path / "fast"))
        folder = tmp_path / "fast"
    want = _theirs(folder)
    load_tokenizer(folder).save_pretrained(tmp_path / "ours")
    got = _theirs(tmp_path / "ours")
    assert [str(t) for t in got.extra_special_tokens] == [str(t) for t in
                                                          want.extra_special_tokens]
    assert got.all_special_tokens == want.all_special_tokens
    assert load_tokenizer(tmp_path / "ours").extra_special_tokens == ["<|im_start|>",
                                                                      "<|im_end|>"]


def test_slow_gemma_default_mask_token_is_a_template_variable(trained, tmp_path):  # noqa: F811
    """GemmaTokenizer's own mask token (the folder does not name it) is in transformers'
    special_tokens_map, so a chat template sees it; Ember rendered it as undefined ("")."""
    folder = _case_folder(trained, tmp_path, "gemma")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}[{{ mask_token }}]{{ messages[0]['content'] }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    chat = [{"role": "user", "content": "hi"}]
    want = _theirs(folder).apply_chat_template(chat, tokenize=False)
    assert "<mask>" in want
    ours = load_tokenizer(folder)
    assert ours.apply_chat_template(chat) == want
    ours.save_pretrained(tmp_path / "ours")
    assert _theirs(tmp_path / "ours").special_tokens_map == _theirs(folder).special_tokens_map


@pytest.mark.parametrize("named", ["eos_token", "additional_special_tokens"])
@pytest.mark.parametrize("fast", [False, True])
def test_named_tokens_added_as_not_special_become_special(trained, tmp_path, fast,  # noqa: F811
                                                          named):
    """transformers 5 re-adds every named, extra and model-specific (``image_token``...) token as
    special after loading: one that added_tokens_decoder has with "special": false becomes
    special, and a model-specific one in the vocabulary is matched whole. Ember left them plain
    (decoded with skip_special_tokens, split by the model)."""
    folder = _case_folder(trained, tmp_path, "qwen2")  # "<tool>": an added token, not special
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if fast:  # tokenizer.json written by transformers, then the config edited
        _theirs(folder).save_pretrained(str(tmp_path / "fast"))
        folder = tmp_path / "fast"
        cfg = {**json.loads((folder / "tokenizer_config.json").read_text()),
               "added_tokens_decoder": cfg["added_tokens_decoder"]}
    cfg.update({named: "<tool>" if named == "eos_token" else ["<|im_start|>", "<tool>"],
                "image_token": "hello"})  # (a Qwen2Tokenizer's extra list too)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    texts = ["a <tool> b", "<tool>hello there", "say hello, hello!", "hellos"]
    ours, theirs = load_tokenizer(folder), _theirs(folder)
    assert theirs.backend_tokenizer.get_added_tokens_decoder()[
        theirs.convert_tokens_to_ids("<tool>")].special  # the case this test is about
    for text in texts:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("in_map", [False, True])
def test_legacy_config_additional_special_tokens_are_special(trained, tmp_path, in_map):  # noqa: F811
    """A legacy folder (added_tokens.json, no added_tokens_decoder): transformers 5 reads
    tokenizer_config.json's additional_special_tokens as its extra list (its added tokens are
    special) and ignores special_tokens_map.json's list then. Ember made the config's plain and
    took the map's."""
    _, _, bpe = trained
    n = bpe.get_vocab_size()
    folder = _folder(tmp_path, "legacy", {"tokenizer_class": "GPT2Tokenizer",
                                          "eos_token": "<|im_end|>",
                                          "additional_special_tokens": ["<|im_start|>"]}, bpe=bpe)
    (folder / "added_tokens.json").write_text(json.dumps(
        {"<|im_start|>": n, "<|im_end|>": n + 1, "extra word": n + 2}))
    if in_map:
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"eos_token": "<|im_end|>", "additional_special_tokens": ["extra word"]}))
    ours, theirs = load_tokenizer(folder), _theirs(folder)
    for text in ["<|im_start|>user extra word<|im_end|>", "a extra word b <|im_start|>"]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.extra_special_tokens == [str(t) for t in theirs.extra_special_tokens]


def test_extra_tokens_added_as_not_special_stay_plain_outside_qwen2(trained, tmp_path):  # noqa: F811
    """The extra list is not made special by a Llama (or generic) tokenizer: transformers' own
    save of a SentencePiece folder lists the user-defined "<|im_start|>" as extra, not special,
    and keeps it when decoding with skip_special_tokens."""
    _theirs(_case_folder(trained, tmp_path, "llama")).save_pretrained(str(tmp_path / "fast"))
    folder = tmp_path / "fast"
    assert "<|im_start|>" in json.loads((folder / "tokenizer_config.json").read_text())[
        "extra_special_tokens"]
    ours, theirs = load_tokenizer(folder), _theirs(folder)
    ids = theirs.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ours.encode("<|im_start|>user\nhi<|im_end|>") == ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("extra,additional,smap", [
    (["world"], ["hello"], None),  # both lists: the extra one, "hello" not special
    ([], ["hello"], None),  # an empty extra list: the additional one
    (None, ["hello"], None),
    ({"image_token": "world"}, ["hello"], None),  # model-specific tokens beside the list
    ({"image_token": "world"}, None, {"additional_special_tokens": ["there"]}),  # legacy: the
    # map's list is the extra one; beside the map's extra list, the config's dict is kept
    ({"image_token": "world"}, None, {"extra_special_tokens": ["there"]}),
    ([], None, {"additional_special_tokens": ["there"]}),  # an empty extra list hides the map's
])
def test_config_with_both_extra_and_additional_lists_reads_as_transformers(tmp_path, extra,
                                                                           additional, smap):
    """tokenizer_config.json with both ``extra_special_tokens`` and ``additional_special_tokens``:
    transformers 5.23 keeps one list (the extra one if a non-empty list, else the additional one)
    and leaves the other's tokens plain. Ember made both lists special (decoded "hello" away with
    skip_special_tokens) and ignored the additional list beside an empty or dict extra one (and
    a legacy map's extra list dropped the config's model-specific dict)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world there", "hello", "world", "there"] * 5,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                    show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>",
           "extra_special_tokens": extra,
           "chat_template": "{{ image_token }}|{{ messages[0].content }}"}
    if additional is not None:
        cfg["additional_special_tokens"] = additional
    if smap is None:  # a folder saved since transformers 4.34
        cfg["added_tokens_decoder"] = {"0": {"content": "<eos>", "special": True}}
    else:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(smap))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = load_tokenizer(tmp_path), _theirs(tmp_path)
    assert ours.extra_special_tokens == [str(t) for t in theirs.extra_special_tokens]
    text = "hello world there, hello"
    ids = theirs.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip), skip
    chat = [{"role": "user", "content": "hi"}]  # a model-specific token is a template variable
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False)
