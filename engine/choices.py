"""Multiple-choice evaluation by log-likelihood (MMLU, ARC, HellaSwag-style benchmarks), the way
EleutherAI's lm-evaluation-harness scores ``multiple_choice`` tasks.

A line holds a question and its candidate answers::

    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "answer": 0}

``question`` (or ``prompt``), ``choices`` (two or more strings) and ``answer`` (the index of the
right choice, or its text), optionally ``target_delimiter`` (lm-eval's task field: the text put
between question and choice). Each choice is scored by the log-probability the model gives its
tokens after the question; the prediction is the highest-scoring choice:

- ``choice_accuracy``: by the summed log-probability (lm-eval's ``acc``);
- ``choice_accuracy_norm``: by the summed log-probability per character of the choice, without
  the delimiter (lm-eval's ``acc_norm``: ``len(choice)``, which favours long answers less);
- ``choice_accuracy_mutual_info`` (``ember eval --metrics choice_accuracy_mutual_info``; twice
  the documents): by the summed log-probability less that of the choice without the question
  (``delimiter + choice`` after BOS, else EOS: lm-eval's ``acc_mutual_info``).

Rendering, as lm-eval's ``HFLM.loglikelihood`` on ``(context, delimiter + choice)`` requests
(checked against lm-eval 0.4.13 itself: ``tools/check_lmeval.py``): the context's trailing
whitespace moves into the continuation, and the continuation's tokens are those of ``context +
continuation`` past the context's own tokens, so a token that spans the boundary is scored as the
model would see it (where the boundary changes the context's own tokens, lm-eval's slice would
cut the wrong tokens: the continuation is tokenized alone). Without a chat template (``--raw``,
base models) the context is the question text (BOS per the tokenizer; an empty question is the
BOS token, else EOS, as lm-eval), the delimiter the line's ``target_delimiter``, by default
``" "`` except where the question ends with whitespace or the choice starts with it (there
lm-eval's default ``" "`` would score a doubled space, and warns). With one (an instruct model,
or a run trained on chats) the question is the user's message and the choice the assistant's
answer, as training renders them (the run's ``data.system_prompt`` included; no delimiter, as
lm-eval's ``--apply_chat_template``), so the generation prompt's trailing "\n" is scored as the
first continuation token, as lm-eval scores it: a constant per question, which can change
``choice_accuracy_norm`` only. BOS is the template's to write (lm-eval's tokenizer may add one
more where the template writes none).

Each question is one packed example whose documents are (context + choice) for every choice, so
a forward pass scores all of them together (the context is computed once per choice). A
question whose context and choice, less the choice's last token (no input: lm-eval's
``max_length`` does not count it), exceed ``data.max_seq_len`` loses context tokens from the
left, after BOS (lm-eval cuts BOS too), and is counted as truncated, or is dropped with
``data.truncation = "drop"``; bad lines are reported like any other data file's
(``data.bad_lines``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import EmberError
from ember.engine.data import (
    IGNORE,
    DataConfig,
    DataReport,
    _Bad,
    _Reader,
    read_lines,
    with_system_prompt,
)
from ember.engine.formats import _type_name, json_problem
from ember.engine.losses import doc_logprobs
from ember.engine.packing import Example, PackedBatches, collate


class _First(Exception):
    """Ends ``is_choice_file``'s read at the first record."""


def first_record(path: str | Path) -> dict | None:
    """The file's first JSON object (the rest is not read); None when it has none."""
    first: list[dict] = []

    class _Peek(_Reader):
        def example(self, lineno, raw):
            line = self.text(lineno, raw)
            if line is not None:
                with contextlib.suppress(ValueError):  # (an integer past the digit limit too)
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        first.append(obj)
                        raise _First
            return None

    with contextlib.suppress(_First):
        read_lines(path, lambda p: _Peek(p, DataConfig(use_chat_template=False), None))
    return first[0] if first else None


def is_choice_file(path: str | Path) -> bool:
    """True when the file's first record has a ``choices`` field (the rest is not read)."""
    return "choices" in (first_record(path) or {})


@dataclass(frozen=True)
class Question:
    answer: int  # index of the right choice
    chars: tuple[int, ...]  # characters of each choice (acc_norm)


class _ChoiceReader(_Reader):
    def __init__(self, path: Path, cfg: DataConfig, tokenizer, mutual_info: bool = False):
        super().__init__(path, cfg, tokenizer)
        self.questions: list[Question] = []
        self.mutual_info = mutual_info

    def parse(self, line: str) -> tuple[str, list[str], int, str | None]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Bad("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:
            raise _Bad("invalid JSON", f"invalid JSON: {json_problem(e)}") from None
        if not isinstance(obj, dict):
            raise _Bad("wrong type", f"expected a JSON object, got {_type_name(obj)}")
        missing = [k for k in ("choices", "answer") if k not in obj]
        q = obj.get("question", obj.get("prompt"))
        if q is None:
            missing.insert(0, "question")
        if missing:
            raise _Bad("missing field", f"a multiple-choice line needs 'question' (or 'prompt'), "
                                        f"'choices' and 'answer'; missing {missing}")
        choices, answer = obj["choices"], obj["answer"]
        if not isinstance(q, str):
            raise _Bad("wrong type", f"'question' must be a string, got {_type_name(q)}")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise _Bad("wrong type", "'choices' must be a list of two or more non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise _Bad("wrong type", "'answer' must be the index of the right choice or its text, "
                                     f"got {_type_name(answer)}")
        if isinstance(answer, str):
            if answer not in choices:
                raise _Bad("unknown answer", f"answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if not 0 <= answer < len(choices):
            raise _Bad("unknown answer", f"answer index {answer} is out of range for "
                                         f"{len(choices)} choices")
        delimiter = obj.get("target_delimiter")
        if delimiter is not None and not isinstance(delimiter, str):
            raise _Bad("wrong type", "'target_delimiter' must be a string (lm-eval's, put "
                                     f"between question and choice), got {_type_name(delimiter)}")
        return q, choices, answer, delimiter

    def context(self, question: str) -> tuple[str, str, bool]:
        """(the text every choice of ``question`` continues, the whitespace it ended with,
        whether it takes BOS). The text is the chat template's user turn and generation prompt,
        or (raw) the question; its trailing whitespace (a template's "\n" after "assistant")
        moves into each continuation, as lm-eval's ``_encode_pair`` moves it."""
        if self.enc.chat:
            msgs = with_system_prompt(self.cfg, [{"role": "user", "content": question}])
            text, special = self.enc._render(msgs, True), False
        else:
            text, special = question, True
        context = text.rstrip()
        return context, text[len(context):], special

    def sep(self, question: str, choice: str, delimiter: str | None) -> str:
        """The text between question and choice: none after a chat template (lm-eval's chat
        path), else the line's target_delimiter, by default " " (see the module docstring)."""
        if self.enc.chat:
            return ""
        if delimiter is not None:
            return delimiter
        return "" if (not question or question[-1].isspace() or choice[0].isspace()) else " "

    def pair(self, context: str, special: bool, cont: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of one (context, continuation) request."""
        enc = self.enc
        if not context:  # lm-eval: an empty context is the BOS token (else EOS)
            ids, bos = enc._enc(cont), getattr(enc.tok, "bos_token_id", None)
            prefix = bos if bos is not None else enc.eos
            if prefix is None or ids[:1] == [prefix]:
                return ids[:1], ids[1:]
            return [prefix], ids
        ctx = enc._enc(context, special)
        whole = enc._enc(context + cont, special)
        if whole[:len(ctx)] != ctx:  # the boundary token changed the context's own tokens
            return ctx, enc._enc(cont)
        return ctx, whole[len(ctx):]

    def fit(self, ctx: list[int], cont: list[int]) -> list[int] | None:
        """The context cut from the left so that it and the continuation but its last token
        (which predicts nothing) fit ``max_seq_len``, lm-eval's ``max_length`` (None: cannot)."""
        room = self.cfg.max_seq_len + 1 - len(cont)
        if len(ctx) <= room:
            return ctx
        keep_bos = int(self._bos(ctx) is not None)  # ember.engine.data._Reader._bos
        if self.cfg.truncation == "drop" or room < keep_bos + 1:
            return None
        return ctx[:keep_bos] + ctx[len(ctx) - room + keep_bos:]

    def example(self, lineno: int, raw: bytes) -> Example | None:
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            question, choices, answer, delimiter = self.parse(line)
            context, moved, special = self.context(question)
            seps = [self.sep(question, c, delimiter) for c in choices]
            pairs = [self.pair(context, special, moved + sep + c)
                     for sep, c in zip(seps, choices, strict=True)]
            if self.mutual_info:  # lm-eval's ("", delimiter + choice) requests
                pairs += [self.pair("", True, sep + c) for sep, c in zip(seps, choices,
                                                                         strict=True)]
            if any(not cont for _, cont in pairs):
                raise _Bad("empty choice", "a choice has no tokens")
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        ids, labels, parts, cut = [], [], [], False
        for ctx, cont in pairs:
            fitted = self.fit(ctx, cont)
            if fitted is None:
                self.report.dropped_too_long += 1
                self.report.note("too long", f"{self.where(lineno)}: a choice needs more than "
                                             f"max_seq_len {self.cfg.max_seq_len} tokens "
                                             "(dropped)")
                return None
            cut = cut or len(fitted) < len(ctx)
            # the continuation's last token is no input (lm-eval's [:-1]); labels pre-shifted:
            # position t predicts the token after it, the continuation's are scored
            doc = fitted + cont[:-1]
            lab = [IGNORE] * (len(fitted) - 1) + cont
            ids += doc
            labels += lab
            parts.append(len(doc))
        if cut:
            self.report.truncated += 1
            self.report.note("too long", f"{self.where(lineno)}: context cut to fit max_seq_len "
                                         f"{self.cfg.max_seq_len}")
        self.questions.append(Question(answer, tuple(len(c) for c in choices)))
        key = hashlib.blake2b(line.strip().encode(), digest_size=16).hexdigest()
        return Example(ids, labels, self.where(lineno), 0, choices[answer], key, tuple(parts))


def load_choices(path: str | Path, cfg: DataConfig, tokenizer, mutual_info: bool = False
                 ) -> tuple[list[Example], list[Question], DataReport]:
    """(one packed example per question, its answer and choice lengths, the report).
    ``mutual_info``: each example also scores every choice without the question, after BOS
    (else EOS), for ``choice_accuracy_mutual_info``."""
    reader, examples = read_lines(path, lambda p: _ChoiceReader(p, cfg, tokenizer, mutual_info))
    rep = reader.report
    rep.format, rep.examples = "multiple choice", len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(e.num_loss_tokens for e in examples)
    if not examples:
        raise EmberError(f"{path}: no usable questions out of {rep.lines - rep.blank_lines} "
                         "lines\n" + "\n".join(f"  {p}" for p in rep.problems))
    return examples, reader.questions, rep


@torch.no_grad()
def score_choices(model, examples: list[Example], tokens_per_batch: int, device,
                  autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Per question, the summed log-probability of each choice ((k,) fp32, on the CPU)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(examples)
    try:
        batches = PackedBatches(examples, max(tokens_per_batch, max(map(len, examples))),
                                order="file", packing="greedy").plan(0)
        for idx in batches:
            with autocast():
                sums = doc_logprobs(model, collate([examples[i] for i in idx]).to(device)).sums
            sums, at = sums.float().cpu(), 0
            for i in idx:
                k = len(examples[i].parts)
                out[i], at = sums[at:at + k], at + k
    finally:
        model.train(was_training)
    return out


def choice_metrics(scores: list[torch.Tensor], questions: list[Question]) -> dict[str, float]:
    """``choice_accuracy`` and ``choice_accuracy_norm`` (see the module docstring)."""
    if len(scores) != len(questions):
        raise EmberError(f"{len(scores)} scored questions for {len(questions)} answers")
    # each choice also scored without the question (mutual_info), when asked for
    mutual_info = all(len(s) == 2 * len(q.chars) for s, q in zip(scores, questions, strict=True))
    acc = norm = mutual = 0
    for s, q in zip(scores, questions, strict=True):
        k = len(q.chars)
        acc += int(s[:k].argmax()) == q.answer
        norm += int((s[:k] / torch.tensor(q.chars, dtype=s.dtype)).argmax()) == q.answer
        if mutual_info:
            mutual += int((s[:k] - s[k:]).argmax()) == q.answer
    n = len(questions)
    out = {"choice_accuracy": acc / n, "choice_accuracy_norm": norm / n}
    if mutual_info:
        out["choice_accuracy_mutual_info"] = mutual / n
    return out
