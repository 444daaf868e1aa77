"""Which tokens Ember lists as special (``all_special_tokens`` / ``all_special_ids``) and what
uses that list, against transformers 5's ``AutoTokenizer`` on the same folder (a small BPE trained
at test time): the named tokens, then the extra ones, not every added token flagged special."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers
from tokenizers import Tokenizer

from ember.models.tokenizer import load_tokenizer
from tests.models.test_tokenizer_classes import _vocab

BASE = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CONFIGS = [
    {},
    {"additional_special_tokens": ["<|im_start|>"]},
    {"extra_special_tokens": {"image_token": "<|im_end|>"}, "sep_token": "</s>"},
    {"pad_token": "<|im_end|>", "mask_token": "<unk>", "cls_token": "<|im_start|>"},
    {"eos_token": "<|im_end|>", "image_token": "<|im_start|>"},
]


def _load(tmp_path, name: str, cfg: dict):
    Tokenizer.from_str(_vocab(name)).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():  # tokens the vocabulary lacks: said elsewhere
        warnings.simplefilter("ignore")
        ours = load_tokenizer(tmp_path)
    return ours, transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("PreTrainedTokenizerFast", "qwen2"),
        ("Qwen2Tokenizer", "qwen2"),
        ("GPT2Tokenizer", "bytelevel"),
        ("LlamaTokenizer", "metaspace_first"),
    ],
)
def test_all_special_tokens_are_transformers_named_and_extra_ones(cls, name, cfg, tmp_path):
    """The vocabulary adds <s>, </s>, <unk>, <|im_start|>, <|im_end|> as special; transformers
    lists only those the config names (bos/eos/unk, then sep, pad, cls, mask, model-specific,
    extra), in that order: [0, 1, 2] for a config naming bos/eos/unk (Ember: [0, 1, 2, 3, 4]).
    Decoding skips all five either way. A class default the vocabulary lacks (Qwen2's
    <|endoftext|>, id 500 in transformers) is left out by Ember."""
    ours, theirs = _load(tmp_path, name, {"tokenizer_class": cls, **BASE, **cfg})
    new = {t for t, i in theirs.get_vocab().items() if i >= len(ours)}
    assert ours.all_special_tokens == [t for t in theirs.all_special_tokens if t not in new]
    assert ours.all_special_ids == [
        theirs.convert_tokens_to_ids(t) for t in ours.all_special_tokens
    ]
    ids = theirs.encode("<s>a<|im_start|>b<|im_end|>c</s>", add_special_tokens=False)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_an_unnamed_special_token_still_ends_a_turn(tmp_path):
    """The data encoder ends an assistant turn at the last special token before only whitespace
    (ChatML's <|im_end|> when eos is another token). It took that from ``all_special_ids``, which
    (as in transformers 5) no longer lists an added special token the config does not name: it now
    reads the added tokens' special flag, so Ember's tokenizer and transformers' (whose
    ``all_special_ids`` always lacked <|im_end|>) train the same tokens, <|im_end|> included."""
    from ember.engine.data import IGNORE, DataConfig, load_examples

    ours, theirs = _load(
        tmp_path,
        "qwen2",
        {"tokenizer_class": "PreTrainedTokenizerFast", **BASE, "chat_template": CHATML},
    )
    assert theirs.convert_tokens_to_ids("<|im_end|>") not in ours.all_special_ids
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"prompt": "Capital of France?", "completion": "Paris."}) + "\n")
    cfg = DataConfig(max_seq_len=128, tokens_per_batch=128)
    targets = []
    for tok in (ours, theirs):
        (ex,), _ = load_examples(rows, cfg, tok)
        targets.append([t for t in ex.labels if t != IGNORE])
    assert targets[0] == targets[1]
    assert theirs.decode(targets[0]).endswith("Paris.<|im_end|>")
