"""Chat templates rendered with the variables transformers gives them: the oracle is
``PreTrainedTokenizerFast.apply_chat_template`` over the same vocabulary and template."""

from __future__ import annotations

import json

import pytest

from ember.models.tokenizer import Tokenizer, tokenizer_from_gguf
from tests.models.test_gguf import tiny_tokenizer_md

transformers = pytest.importorskip("transformers")

# Llama-3 / Mistral style: the template writes bos_token itself; pad_token is tested as defined
SPECIALS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if pad_token is defined %}[pad {{ pad_token }}]{% endif %}"
    "{% if unk_token is not defined %}[no unk]{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("bos, pad, unk", [(None, None, None), ("<|im_start|>", None, None),
                                           (None, "<|endoftext|>", "<|endoftext|>")])
def test_missing_special_tokens_are_undefined_as_in_transformers(bos, pad, unk):
    """A model without a bos (Qwen2.5, whose tokenizer_config has "bos_token": null), pad or unk
    token: the template sees the name undefined, so ``{{ bos_token }}`` renders "" (was "None")
    and ``is defined`` tests agree with transformers."""
    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    ours = Tokenizer(backend, bos_token=bos, eos_token="<|im_end|>", pad_token=pad,
                     unk_token=unk, chat_template=SPECIALS_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|im_end|>", pad_token=pad,
        unk_token=unk, chat_template=SPECIALS_TEMPLATE)
    for gen in (False, True):
        want = theirs.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen) == want
        assert "None" not in want


# Reads content parts, tool calls and a template variable, each of which may arrive as a rich
# object: a dataclass, a pydantic model (the OpenAI SDK's messages), numpy / torch values.
RICH_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}:{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}[{{ p.type }}{% if p.text is defined %} {{ p.text }}{% endif %}]"
    "{% endfor %}{% endif %}{% for c in m.tool_calls or [] %}<call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}>{% endfor %}|{% endfor %}{{ extra | tojson }}"
    "{% if flag %}[flag]{% endif %}")


def test_rich_objects_in_inputs_render_as_in_transformers():
    """Dataclass content parts and pydantic tool calls are read as dicts, numpy scalars as their
    values, arrays and tensors (an image in a content part) become "<TypeName>" placeholders:
    was "<Part>" / "<Call>" rendered in their place, and a ValueError from ``ndarray.item()``."""
    import dataclasses

    import numpy as np
    import torch

    pydantic = pytest.importorskip("pydantic")

    @dataclasses.dataclass
    class Part:
        type: str
        text: str

    class Fn(pydantic.BaseModel):
        name: str
        arguments: dict

    class Call(pydantic.BaseModel):
        type: str = "function"
        function: Fn

    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=RICH_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                  chat_template=RICH_TEMPLATE)
    chat = [{"role": "user", "content": [Part("text", "hi"),
                                         {"type": "image", "image": np.zeros((2, 2))}]},
            {"role": "assistant", "content": "ok",
             "tool_calls": [Call(function=Fn(name="f", arguments={"x": 1}))]},
            {"role": "user", "content": (Part("text", "a"), {"type": "text", "text": "b"})}]
    for kw in (dict(extra=(1, 2.5)), dict(extra=np.float32(0.5), flag=np.bool_(False)),
               dict(extra=torch.tensor([3, 4]), flag=np.bool_(True))):
        want = theirs.apply_chat_template(chat, tokenize=False, **kw)
        assert ours.apply_chat_template(chat, **kw) == want
        assert ours.apply_chat_template(chat, continue_final_message=True, **kw) == (
            theirs.apply_chat_template(chat, tokenize=False, continue_final_message=True, **kw))
    assert "<call f" in want and "<ndarray>" not in want  # placeholders are never read


def test_transformers_only_options_are_refused_not_ignored():
    """transformers' sanitize_control_tokens (a special token written in a message is encoded as
    text), return_tensors, padding... are not template variables: Ember passed them to the
    template and returned ids that differ from transformers' (a message's "<|im_end|>" became the
    eos token); now an option that asks for something is an EmberError."""
    from ember import EmberError

    template = tiny_tokenizer_md()["tokenizer.chat_template"]
    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=template)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                  eos_token="<|im_end|>", chat_template=template)
    chat = [{"role": "user", "content": "he<|im_end|>12"}]
    plain = theirs.apply_chat_template(chat, tokenize=True, return_dict=False)
    sanitized = theirs.apply_chat_template(chat, tokenize=True, return_dict=False,
                                           sanitize_control_tokens=True)
    assert sanitized != plain  # what ignoring the option would silently lose
    assert ours.apply_chat_template(chat, tokenize=True, return_dict=False) == plain
    for kw in (dict(sanitize_control_tokens=True), dict(return_tensors="pt"),
               dict(return_assistant_tokens_mask=True), dict(padding=True),
               dict(max_length=8), dict(return_dict=True)):
        with pytest.raises(EmberError, match=f"{next(iter(kw))} is a transformers option"):
            ours.apply_chat_template(chat, tokenize=True, **kw)
    assert ours.apply_chat_template(chat, sanitize_control_tokens=False, padding=False) == (
        theirs.apply_chat_template(chat, tokenize=False))


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(_seen=1) %}{{ ns._seen }}",
    "{% set ns = namespace({'__class__': 1}) %}x",
    "{% set ns = namespace() %}{% set ns._seen = 1 %}x"])
def test_underscore_namespace_attributes_are_refused_as_in_transformers(template):
    """transformers refuses a namespace attribute starting with "_" whether it is set later or
    given to ``namespace(...)``; Ember refused only the first and rendered the second."""
    from ember import EmberError

    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                  chat_template=template)
    with pytest.raises(Exception, match="underscore-prefixed"):
        theirs.apply_chat_template(CHAT, tokenize=False)
    with pytest.raises(EmberError, match="namespace attribute '_"):
        Tokenizer(backend, chat_template=template).apply_chat_template(CHAT)


def test_empty_conversation_is_refused_as_in_transformers():
    """``apply_chat_template([])`` rendered a bare generation prompt; transformers raises
    ValueError "Cannot apply chat template to an empty conversation" (Ember's encoder renders
    none privately for a greeting's opening: tests/engine/test_chat_parity*)."""
    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=SPECIALS_TEMPLATE)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", chat_template=SPECIALS_TEMPLATE)
    for empty in ([], ()):
        with pytest.raises(ValueError, match="empty conversation") as want:
            theirs.apply_chat_template(empty, add_generation_prompt=True, tokenize=False)
        with pytest.raises(ValueError, match="empty conversation") as got:
            ours.apply_chat_template(empty, add_generation_prompt=True)
        assert str(got.value) == str(want.value)


# Prints every special token transformers 5 passes to a template, defined or not
ALL_SPECIALS_TEMPLATE = (
    "bos={{ bos_token }}|eos={{ eos_token }}|unk={{ unk_token }}|pad={{ pad_token }}|"
    "sep={{ sep_token }}|cls={{ cls_token }}|mask={{ mask_token }}|image={{ image_token }}|"
    "boi={{ boi_token }}|eoi={{ eoi_token }}|audio={{ audio_token is defined }}|"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("extra", ["dict", "top-level", "none"])
def test_every_special_token_is_a_template_variable_as_in_transformers(tmp_path, extra):
    """transformers 5 renders a chat template with ``{**special_tokens_map, **kwargs}``: sep,
    cls and mask tokens (a BERT-style or ModernBERT tokenizer), and the model-specific ones
    (Gemma 3's ``extra_special_tokens`` {"image_token": ...}, or a top-level ``image_token``)
    too; Ember passed bos, eos, unk and pad only (the others rendered "")."""
    from transformers import AutoTokenizer

    from ember.models.tokenizer import load_tokenizer

    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    backend.add_special_tokens(["[SEP]", "[CLS]", "[MASK]", "<img>", "<boi>", "<eoi>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
           "eos_token": "<|im_end|>", "sep_token": "[SEP]", "cls_token": "[CLS]",
           "mask_token": {"content": "[MASK]", "lstrip": True, "__type": "AddedToken"},
           "add_bos_token": False, "chat_template": ALL_SPECIALS_TEMPLATE}
    model_specific = {"image_token": "<img>", "boi_token": "<boi>", "eoi_token": "<eoi>"}
    if extra == "dict":
        cfg["extra_special_tokens"] = model_specific
    elif extra == "top-level":
        cfg.update(model_specific)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    want = theirs.apply_chat_template(CHAT, tokenize=False)
    assert "sep=[SEP]|cls=[CLS]|mask=[MASK]" in want  # (the oracle passes them)
    assert ("image=<img>|boi=<boi>|eoi=<eoi>|audio=False" in want) == (extra != "none")
    ours = load_tokenizer(tmp_path)
    assert ours.apply_chat_template(CHAT) == want
    ours.save_pretrained(tmp_path / "saved")  # kept by a save, for both readers
    assert load_tokenizer(tmp_path / "saved").apply_chat_template(CHAT) == want
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").apply_chat_template(
        CHAT, tokenize=False) == want
