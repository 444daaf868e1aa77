"""Ember's multiple-choice scores (engine/choices.py) against lm-evaluation-harness itself: the
same questions as a local ``multiple_choice`` task run by ``lm_eval.simple_evaluate`` on
``HFLM`` (raw and ``apply_chat_template``), per-choice log-likelihoods (with and without the
question) and acc / acc_norm / acc_mutual_info, on a tiny random Llama whose tokenizer adds BOS
(built here, nothing downloaded); and the rolling document perplexity (engine/rolling.py)
against ``HFLM.loglikelihood_rolling`` and lm-eval's word_perplexity / byte_perplexity /
bits_per_byte aggregations, in windows of 512, 16 and 5.

lm_eval is not an Ember dependency: install it in a private venv, e.g.
    python -m venv --system-site-packages /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install lm_eval
    PYTHONPATH=. /tmp/lmeval-venv/bin/python tools/check_lmeval.py
Prints one line per choice (lm-eval, Ember, difference) and exits 1 when a log-likelihood
differs by more than 1e-5 (relative) or a metric differs. The tests (tests/engine/test_choices.py,
test_rolling.py) re-derive lm-eval's rules on transformers, without lm_eval.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ember.engine.choices import choice_metrics, load_choices, score_choices
from ember.engine.data import DataConfig
from ember.models import ModelConfig, Transformer
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.tokenizer import Tokenizer, _set_bos_eos
from tests.engine.test_formats import CHATML, chat_backend

# Rows whose rendering Ember claims is lm-eval's: a row without target_delimiter takes " " by
# default, and needs no whitespace at the question's end or the choice's start for that.
ROWS = [
    {"question": "Hello world ->", "choices": ["Paris", "Bonjour le monde", "France"], "answer": 0},
    {"question": "What is the capital of France?", "choices": ["Paris", "Hello é"], "answer": 1},
    {
        "question": "Translate Hello world:\n",
        "choices": ["Bonjour", " le monde"],
        "answer": 0,
        "target_delimiter": " ",
    },
    {
        "question": "Weather in Paris?",
        "choices": ["\nParis", "get_weather"],
        "answer": 1,
        "target_delimiter": "",
    },
    {
        "question": "Weather in Paris ",
        "choices": ["Paris", "France"],
        "answer": 1,
        "target_delimiter": "\n",
    },
    {"question": "", "choices": ["Paris", "Hello world"], "answer": 0, "target_delimiter": " "},
]


def tiny_bos_model(folder: Path) -> Path:
    backend = chat_backend()
    _set_bos_eos(backend, "<s>", None)
    tok = Tokenizer(
        backend,
        bos_token="<s>",
        add_bos_token=True,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML,
    )
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    save_pretrained(Transformer(cfg).init_weights(std=0.3, seed=0), folder, tok)
    return folder


def ember_scores(folder: Path, path: Path, chat: bool, system: str | None):
    model, tok = load_pretrained(folder, "float32", "cpu")
    cfg = DataConfig(use_chat_template=chat, system_prompt=system, max_seq_len=512)
    examples, questions, _ = load_choices(path, cfg, tok, mutual_info=True)
    scores = score_choices(model, examples, 4096, "cpu")
    return [s.tolist() for s in scores], choice_metrics(scores, questions)


def lmeval_scores(folder: Path, rows: list[dict], chat: bool, system: str | None):
    """Per row, lm-eval's per-choice log-likelihoods and its acc / acc_norm, one task per
    target_delimiter (a task's setting in lm-eval)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d = Path(tempfile.mkdtemp())
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("target_delimiter", " "), []).append(i)
    names = {}
    for n, (delim, idx) in enumerate(groups.items()):
        data = d / f"t{n}.jsonl"
        data.write_text(
            "".join(
                json.dumps({k: rows[i][k] for k in ("question", "choices", "answer")}) + "\n"
                for i in idx
            )
        )
        (d / f"t{n}.yaml").write_text(
            f"task: ember_mc_{n}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
            f"doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: answer\n"
            f"target_delimiter: {json.dumps(delim)}\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_mutual_info\n"
        )
        names[f"ember_mc_{n}"] = idx
    # chat: BOS is the template's to write in Ember (as transformers' apply_chat_template
    # tokenizes, and training saw); lm-eval's tokenizer would add one before CHATML's text
    lm = HFLM(
        pretrained=str(folder),
        device="cpu",
        dtype="float32",
        batch_size=1,
        max_length=512,
        add_bos_token=False if chat else None,
    )
    out = simple_evaluate(
        model=lm,
        tasks=list(names),
        task_manager=TaskManager(include_path=str(d)),
        log_samples=True,
        apply_chat_template=chat,
        system_instruction=system,
        num_fewshot=0,
    )
    lls: list = [None] * len(rows)
    sums = dict.fromkeys(("acc", "acc_norm", "acc_mutual_info"), 0.0)
    for name, idx in names.items():
        for s in out["samples"][name]:
            lls[idx[s["doc_id"]]] = [r[0][0] for r in s["resps"]]  # conditional, unconditional
            for k in sums:
                sums[k] += s[k]
    ours = ("choice_accuracy", "choice_accuracy_norm", "choice_accuracy_mutual_info")
    return lls, {o: sums[k] / len(rows) for o, k in zip(ours, sums, strict=True)}


DOCS = [
    "Hello world",
    "Paris is the capital of France. " * 9 + "Bonjour le monde é",
    "  What is the capital of France?\n\nParis.  ",
]


def check_rolling(folder: Path, work: Path, window: int) -> int:
    """Per-document log-likelihoods and the three metrics against lm-eval's
    loglikelihood_rolling (add_bos_token=False: see engine/rolling.py) in ``window``-token
    windows."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM

    from ember.engine.rolling import load_documents, rolling_metrics

    path = work / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    model, tok = load_pretrained(folder, "float32", "cpu")
    examples, words, nbytes, _ = load_documents(path, DataConfig(max_seq_len=window), tok)
    got = [float(s.double().sum()) for s in score_choices(model, examples, 4096, "cpu")]
    got_m = rolling_metrics(got, words, nbytes)
    lm = HFLM(
        pretrained=str(folder),
        device="cpu",
        dtype="float32",
        batch_size=1,
        max_length=window,
        add_bos_token=False,
    )
    want = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", d, (d,), 0) for d in DOCS], disable_tqdm=True
    )
    w = [(ll, Task.count_words(d)) for ll, d in zip(want, DOCS, strict=True)]
    b = [(ll, Task.count_bytes(d)) for ll, d in zip(want, DOCS, strict=True)]
    want_m = {
        "word_perplexity": weighted_perplexity(w),
        "byte_perplexity": weighted_perplexity(b),
        "bits_per_byte": bits_per_byte(b),
    }
    print(f"--- rolling, window {window}")
    bad = 0
    for d, gg, ww in zip(DOCS, got, want, strict=True):
        off = abs(gg - ww) > 1e-5 * max(1.0, abs(ww))
        bad += off
        print(f"{ww:14.6f} {gg:14.6f} {gg - ww:+.1e}{' DIFF' if off else ''} {d[:30]!r}")
    for k, v in want_m.items():
        off = abs(got_m[k] - v) > 1e-5 * abs(v)
        bad += off
        print(f"{k}: lm-eval {v:.7g} ember {got_m[k]:.7g}{' DIFF' if off else ''}")
    return bad


def main() -> int:
    work = Path(tempfile.mkdtemp())
    folder = tiny_bos_model(work / "model")
    path = work / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad = 0
    for chat, system in ((False, None), (True, None), (True, "You are terse.")):
        rows = ROWS if not chat else [r for r in ROWS if r["question"]]  # (a chat needs one)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        got, got_m = ember_scores(folder, path, chat, system)
        want, want_m = lmeval_scores(folder, rows, chat, system)
        print(f"--- chat={chat} system={system!r}")
        for r, g, w in zip(rows, got, want, strict=True):
            for c, gg, ww in zip(r["choices"] * 2, g, w, strict=True):
                off = abs(gg - ww) > 1e-5 * max(1.0, abs(ww))
                bad += off
                print(
                    f"{ww:14.7f} {gg:14.7f} {gg - ww:+.1e}{' DIFF' if off else ''} "
                    f"{r['question']!r} {c!r}"
                )
        print("lm-eval", want_m, "ember", got_m)
        bad += want_m != got_m
    for window in (512, 16, 5):
        bad += check_rolling(folder, work, window)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
