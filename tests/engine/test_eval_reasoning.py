"""Generation metrics of reasoning models: the answer after the think block is scored, of the
generation (lm-eval 0.4.13's ``think_end_token``: its ``postprocess_generated_text`` gives the
values asserted here for a closed block; an open one is no answer, vLLM's deepseek_r1 / qwen3
reasoning parsers' content) and of the reference (DeepSeek-R1's template trains
``content.split('</think>')[-1]``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember import EmberError
from ember.engine import evaluation
from ember.engine.config_sections import EvalConfig
from ember.engine.data import DataConfig, load_examples
from ember.engine.reasoning import answer_text, generated_answer, resolve_think_end
from ember.engine.trainer_eval import EvalMixin
from ember.models.config import ModelConfig
from ember.models.tokenizer import Tokenizer
from ember.models.transformer import Transformer
from tests.engine.test_chat_parity_reasoning import A1, Q1, R1_DISTILL, SPECIALS

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tokenizer(
    special_think: bool | None, template: str | None = R1_DISTILL, more: tuple[str, ...] = ()
) -> Tokenizer:
    """A byte-level BPE with the R1 / Qwen3 control tokens and the special tokens ``more``;
    ``special_think``: <think> and </think> are special tokens (skipped by decoding), False:
    added as plain ones (as Qwen3's and R1-Distill's tokenizer.json have them), None: none."""
    specials = [s for s in SPECIALS if special_think or "think>" not in s]
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.decoder = decoders.ByteLevel()
    b.train_from_iterator(
        [json.dumps([Q1, A1])] * 3,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials + list(more),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if special_think is False:
        b.add_tokens(["<think>", "</think>"])
    return Tokenizer(b, bos_token=BOS, eos_token=EOS, chat_template=template)


@pytest.mark.parametrize("special_think", [False, True])
def test_the_answer_after_the_last_think_end_is_scored(special_think):
    tok = _tokenizer(special_think)
    enc = tok.backend.encode
    r1_prompt = enc(f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n").ids  # R1 opens the block
    plain = enc(f"{BOS}<|im_start|>assistant\n").ids  # Qwen3: the model opens it
    closed = enc("<|im_start|>assistant\n<think>\n\n</think>\n\n").ids  # enable_thinking false
    cases = [
        (r1_prompt, "It is Paris.\n</think>\n\nParis.", "Paris."),
        (r1_prompt, "a</think>b</think>\n c", "c"),  # the last marker, as lm-eval
        (r1_prompt, "It is Par", None),  # out of tokens while reasoning: no answer (vLLM)
        (plain, "<think>\nhm\n</think>\n\nParis.", "Paris."),
        (plain, "<think>\nhm", None),
        (plain, "Paris.", "Paris."),  # no block opened: all answer
        (closed, "Paris.", "Paris."),
    ]
    for prompt, text, want in cases:
        ids = enc(text).ids
        assert generated_answer(tok, prompt, ids, "</think>") == want, text
    # a marker of several tokens, special ones among them (gpt-oss's
    # <|channel|>final<|message|>), which decoding skips: found by its tokens
    marker = "<|im_start|>final<|im_end|>"
    said = enc(f"hm<|im_start|>final<|im_end|> Paris.{EOS}").ids
    assert tok.decode(said) == "hmfinal Paris."
    assert generated_answer(tok, plain, said, marker) == "Paris."
    assert generated_answer(tok, plain, enc("hm").ids, marker) == "hm"  # no "/": lm-eval's


def test_gpt_oss_final_channel_is_the_answer():
    """gpt-oss writes its reasoning in the analysis channel and its answer in the final one;
    "auto" finds the final channel's marker in its template."""
    from tests.engine.real_chat_templates import GPT_OSS

    more = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>")
    tok = _tokenizer(None, GPT_OSS, more)
    end = resolve_think_end("auto", tok)
    assert end == "<|channel|>final<|message|>"
    prompt = tok.encode(tok.apply_chat_template([Q1], add_generation_prompt=True))
    head = "<|channel|>analysis<|message|>It is Paris.<|end|><|start|>assistant"
    said = tok.encode(f"{head}<|channel|>final<|message|>Paris.<|return|>")
    assert generated_answer(tok, prompt, said, end) == "Paris."
    assert generated_answer(tok, prompt, tok.encode(head[:40]), end) is None  # still thinking
    assert generated_answer(tok, prompt, tok.encode("Paris."), end) == "Paris."


def test_references_lose_their_think_block_and_auto_finds_the_marker():
    assert answer_text(A1["content"], "</think>") == "Paris."
    assert answer_text("Paris.", "</think>") == "Paris."
    no_template = _tokenizer(False, template=None)
    assert resolve_think_end("auto", _tokenizer(False)) == "</think>"  # the template
    assert resolve_think_end("auto", no_template) == "</think>"  # the vocabulary
    bare = Tokenizer(Backend(models.BPE()), eos_token=None)
    assert resolve_think_end("auto", bare) is None
    assert resolve_think_end("auto", bare, ["<think>x</think>y"]) == "</think>"  # the data
    assert resolve_think_end("", _tokenizer(False)) is None
    assert resolve_think_end("◁/think▷", bare) == "◁/think▷"
    with pytest.raises(EmberError, match="eval.think_end"):
        EvalConfig(think_end=" ")
    with pytest.raises(EmberError, match="eval.think_end"):
        EvalConfig(think_end=False)


def test_generation_eval_of_an_r1_template_scores_the_answers(tmp_path, monkeypatch):
    """An R1-Distill line ``<think>\\nIt is Paris.\\n</think>\\n\\nParis.``: its reference was the
    whole content and the prediction the whole generation, reasoning included, so exact_match
    and json_match scored 0 for a model that answers right. The generation is scripted (the
    string logic is the subject; ``generate_ids``' greedy output is tested elsewhere)."""
    tok = _tokenizer(False)
    q2, q3 = ({"role": "user", "content": c} for c in ("As JSON?", "Of Italy?"))
    lines = [
        {"messages": [Q1, A1]},
        {
            "messages": [
                q2,
                {"role": "assistant", "content": '<think>\nJSON.\n</think>\n\n{"city": "Paris"}'},
            ]
        },
        {"messages": [q3, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nRome."}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples, _ = load_examples(path, DataConfig(train=str(path)), tok)
    assert tok.decode(examples[0].prompt_ids, skip_special_tokens=False).endswith("<think>\n")
    said = [
        "It is Paris.\n</think>\n\nParis.",
        'JSON.\n</think>\n\n{"city":  "Paris"}',
        "It is Rome, or",
    ]  # the last never closes its block: no answer
    by_prompt = {
        tuple(e.prompt_ids): tok.backend.encode(s).ids + [tok.eos_token_id]
        for e, s in zip(examples, said, strict=True)
    }
    calls = []

    def scripted(model, prompts, **kw):
        calls.append(kw["should_stop"])
        return [by_prompt[tuple(p)] for p in prompts]

    monkeypatch.setattr(evaluation, "generate_ids", scripted)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=256,
    )
    model = Transformer(cfg)
    res = evaluation.generation_eval(model, tok, examples, ["exact_match"], show=3)
    assert res.scores == {"exact_match": 2 / 3}
    assert calls == [None]  # no early stop: a later </think> starts the answer over
    assert [s[1] for s in res.samples] == said  # the whole generation is kept for show
    assert res.answers == ["Paris.", '{"city":  "Paris"}', ""] and res.unclosed == 1
    note = EvalMixin._gen_note(SimpleNamespace(last_gen=("test", 3, 0.0, res.unclosed)))
    assert "1 still in their think block at eval.max_new_tokens" in note
    shown = []
    EvalMixin._echo_samples(
        SimpleNamespace(last_samples=res.samples, last_answers=res.answers, echo=shown.append)
    )
    assert "output: 'It is Paris.\\n</think>\\n\\nParis.'\n  scored: 'Paris.'" in shown[0]
    assert [s[2] for s in res.samples] == ["Paris.", '{"city": "Paris"}', "Rome."]
    js = evaluation.generation_eval(model, tok, examples[1:2], ["json_match"])
    assert js.scores == {"json_match": 1.0}
    whole = evaluation.generation_eval(model, tok, examples, ["exact_match"], think_end="")
    assert whole.scores == {"exact_match": 0.0} and whole.answers == []
    # the json_match reference check looks at the answer, not the think block
    evaluation.generation_examples(model, examples[1:2], 8, metric_names=["json_match"])
    with pytest.raises(EmberError, match="JSON"):
        evaluation.generation_examples(
            model, examples[1:2], 8, metric_names=["json_match"], think_end=""
        )
