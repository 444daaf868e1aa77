"""A template's ``{% generation %}`` blocks decide the assistant tokens, as in transformers'
``return_assistant_tokens_mask`` (TRL's assistant-only loss): Ember's own rule (the turn's text
up to its end-of-turn token) is for templates without blocks. Blocks that leave the end-of-turn
token out (NeMo's Llama 3.1 template) or take a header or a newline in are trained as marked."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

_OTHER = ("{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
TEMPLATES = {
    # NeMo's Llama 3.1 template marks the content, not <|eot_id|>
    "content only": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- generation %}"
        "{{- m['content'] | trim }}{%- endgeneration %}{{- '<|eot_id|>' }}{% else %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
        " + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "with newline": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}"
        "{% endgeneration %}" + _OTHER),
    "with header": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}" + _OTHER),
}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."}]


@pytest.fixture(scope="module")
def backend():
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([json.dumps(CHAT)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _pair(backend, name: str):
    """transformers' and Ember's tokenizer on ``backend`` with template ``name``."""
    template = TEMPLATES[name]
    eot = "<|eot_id|>" if name == "content only" else "<|im_end|>"
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot,
                                              bos_token="<|begin_of_text|>",
                                              chat_template=template)
    ours = Tokenizer(backend, eos_token=eot, bos_token="<|begin_of_text|>",
                     chat_template=template)
    return hf, ours


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_blocks_are_the_assistant_mask(tmp_path, backend, name):
    hf, ours = _pair(backend, name)
    for messages in (CHAT, CHAT[1:3]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"messages": messages}) + "\n")
        (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
        assert ex.input_ids == list(out["input_ids"])  # no EOS inserted after a marked turn
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]  # labels are pre-shifted
        assert mask == list(out["assistant_masks"])
        assert sum(mask) > 0


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_evaluation_prompt_is_the_generation_prompt(tmp_path, backend, name):
    """Generation metrics prompt with the tokens before the last answer: transformers'
    generation prompt for the messages before it, also when a block takes the header in (the
    prompt ended before '<|im_start|>assistant\\n', so the model was asked to write it)."""
    hf, ours = _pair(backend, name)
    for messages in (CHAT, CHAT[1:3]):
        want = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"messages": messages}) + "\n")
        (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
        assert ex.input_ids[:ex.prompt_len] == list(want)
        assert ex.reference == messages[-1]["content"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_preference_answers_start_after_the_generation_prompt(tmp_path, backend, name):
    """A DPO pair's answer is the render less transformers' generation prompt for the prompt
    messages, as TRL's DPO splits it, whatever the blocks mark (a block that took the header in
    made '<|im_start|>assistant\\n' part of both answers)."""
    hf, ours = _pair(backend, name)
    prompt, chosen = CHAT[:-1], CHAT[-1]
    rejected = {"role": "assistant", "content": "Paris."}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}))
    (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
    opening = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    n = ex.parts[0]
    for answer, labels in ((chosen, ex.labels[:n]), (rejected, ex.labels[n:])):
        full = hf.apply_chat_template([*prompt, answer], tokenize=False)
        assert full.startswith(opening)
        got = ours.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
        assert got == full[len(opening):]
