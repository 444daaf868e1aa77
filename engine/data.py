"""Datasets: JSONL reading with per-line diagnostics, loss masks, splits, padding-free packing.

Formats (one JSON object per line, or a ``.json`` file holding one array of them, a CSV / TSV
file with a header row, or a Parquet file, any of them gzipped - ``ember.engine.datafiles``;
problems are named ``file:line`` or ``file[index]``; ``format="auto"`` picks the file's format
from its first example):
    {"text": "..."}                                     loss on every token
    {"prompt": "...", "completion": "..."}              loss on the completion (+ EOS)
    {"prompt": [messages], "completion": [messages]}    TRL's conversational prompt-completion:
        one conversation, loss on the completion's assistant turns (the prompt's are context)
    {"instruction": "...", "input": "...", "output": "..."}   Alpaca (optional "system"): a
        prompt/completion pair, the prompt being instruction and input joined by a blank line;
        without a chat template, Stanford Alpaca's "### Instruction: ... ### Response:" prompt
    {"messages": [{"role": "user", "content": "..."}, ...]}   loss on assistant turns; content
        may be OpenAI text parts; assistant "tool_calls", "tool" messages and a line's "tools"
        go to the chat template as transformers passes them
    {"conversations": [{"from": "human", "value": "..."}, ...]}   ShareGPT, read as messages
    {"prompt": "...", "chosen": "...", "rejected": "..."}     a preference pair (objective "dpo",
        "orpo" or "simpo"), or TRL's chat form: message lists, or only "chosen" and "rejected"
        as whole conversations (the shared prompt is their common prefix); see
        ``ember.engine.preference``. A line with both chosen and rejected is a pair whatever else
        it holds (data.format = "messages" reads UltraFeedback's "messages" column instead)
Line parsing and validation is in ``ember.engine.formats``.
Prompt/completion pairs are rendered as a user/assistant chat with the tokenizer's chat template
when it has one (``use_chat_template``), else concatenated as-is (put any separator in the prompt).
An assistant turn's loss covers what the template renders for it up to its first end-of-turn
token (template text after it, a newline or Phi-3's final EOS, is not trained on).
A preference line becomes one ``Example`` of two documents (``parts``): prompt + chosen, then
prompt + rejected, each rendered like a prompt/completion pair; the pair is never split by batching.

Labels are pre-shifted: ``labels[t]`` is the token position ``t`` must predict (``input_ids[t+1]``)
or ``IGNORE`` (-100). The last position of every example is ``IGNORE``, so packed documents never
predict across a boundary.

Tokenizer duck type: ``encode(text, add_special_tokens=False) -> list[int]``, ``decode(ids)``,
``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``chat_template`` (str | None),
``apply_chat_template(messages, add_generation_prompt=False, tokenize=False) -> str`` (also
``tools=`` for lines that give tools).

Batching (``Example`` -> packed ``Batch``, ``PackedBatches``, ``pad_batch``) is in
``ember.engine.packing``; its public names are importable from here too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers

from ember import EmberError
from ember.engine.datafiles import open_data, table_items
from ember.engine.datareport import MAX_PROBLEMS, DataReport
from ember.engine.formats import (  # noqa: F401  (_get_str, _type_name: for other readers)
    ROLES,
    Chat,
    _Bad,
    _get_str,
    _type_name,
    alpaca_prompt,
    detect,
    json_object,
    parse,
    turn_end,
    turn_start,
)
from ember.engine.mixing import check_weights, describe, source_names, split_examples
from ember.engine.packing import (
    IGNORE,
    Batch,
    Example,
    PackedBatches,
    PaddedBatch,
    _one_of,
    collate,
    pad_batch,
)
from ember.models.tokenizer import stop_token_ids

__all__ = [
    "FORMATS",
    "IGNORE",
    "MAX_PROBLEMS",
    "ROLES",
    "Batch",
    "DataConfig",
    "DataReport",
    "Datasets",
    "Example",
    "PackedBatches",
    "PaddedBatch",
    "collate",
    "load_datasets",
    "load_examples",
    "pad_batch",
    "render_prompt",
    "split_examples",
]

FORMATS = ("auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt", "preference")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: tuple[str, ...] = ()  # JSONL file(s)
    # Weights of the train files in every epoch (up/down-sampling; ember.engine.mixing); empty:
    # the files concatenated, each example once per epoch.
    mix: tuple[float, ...] = ()
    # A file, or one per source (val_loss/<name> each), or carve val_fraction out of train
    validation: str | tuple[str, ...] | None = None
    val_fraction: float = 0.0
    test: str | None = None
    format: str = "auto"
    loss_on: str = "completion"  # "completion" (assistant turns) | "all"
    max_seq_len: int = 2048
    truncation: str = "truncate_left"  # over-long: "truncate_left" | "truncate_right" | "drop"
    bad_lines: str = "skip"  # "skip" (count and report) | "error"
    seed: int = 0
    order: str = "shuffle"  # per-epoch order: "shuffle" | "length" (short first) | "file"
    packing: str = "best_fit"  # "best_fit" (length-sorted bins, fewer batches) | "greedy"
    tokens_per_batch: int = 8192
    system_prompt: str | None = None
    use_chat_template: bool | None = None  # None: when the tokenizer has a template
    add_eos: bool = True

    def __post_init__(self) -> None:
        train = (self.train,) if isinstance(self.train, str) else tuple(self.train)
        object.__setattr__(self, "train", train)
        if self.mix:
            object.__setattr__(self, "mix", tuple(self.mix))
            check_weights(self.mix, len(train))
        for key, paths in (("train", train), ("validation", self.validation),
                           ("test", self.test)):
            if any(isinstance(f, str) and not f.strip()
                   for f in ((paths,) if isinstance(paths, str) else paths or ())):
                raise EmberError(f"data.{key} holds an empty file name: give the file's path, "
                                 "or leave it out")
        if isinstance(self.validation, (list, tuple)):
            object.__setattr__(self, "validation", tuple(self.validation))
            if not self.validation:
                raise EmberError("data.validation is an empty list: give files or leave it out")
        _one_of("format", self.format, FORMATS)
        _one_of("loss_on", self.loss_on, ("completion", "all"))
        _one_of("truncation", self.truncation, ("truncate_left", "truncate_right", "drop"))
        _one_of("bad_lines", self.bad_lines, ("skip", "error"))
        _one_of("order", self.order, ("shuffle", "length", "file"))
        _one_of("packing", self.packing, ("best_fit", "greedy"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise EmberError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.validation is not None and self.val_fraction > 0:
            raise EmberError("set either data.validation (a file) or data.val_fraction, not both")
        if self.max_seq_len < 2:
            raise EmberError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.tokens_per_batch < self.max_seq_len:
            raise EmberError(f"data.tokens_per_batch ({self.tokens_per_batch}) must be >= "
                             f"data.max_seq_len ({self.max_seq_len}) so every example fits a batch")


class _Encoder:
    """Turns parsed records into (ids, target mask, prompt_len, reference)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None)
        # Every id that ends a turn (e.g. Llama 3's <|eot_id|> besides <|end_of_text|>).
        self.ends = set(stop_token_ids(tokenizer))
        self.specials = set(getattr(tokenizer, "all_special_ids", None) or ())
        # the tokenizers object whose offsets mask a text tokenized whole (Ember's tokenizer, or
        # a transformers one's backend_tokenizer); None: span by span
        self.backend = next((b for b in (getattr(tokenizer, k, None) for k in (
            "backend", "backend_tokenizer")) if isinstance(b, tokenizers.Tokenizer)), None)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = self.has_template if cfg.use_chat_template is None else cfg.use_chat_template
        if self.chat and not self.has_template:
            raise EmberError("data.use_chat_template is true but the tokenizer has no chat "
                             "template; set data.use_chat_template = false")
        if cfg.system_prompt is not None and not self.chat:
            raise EmberError("data.system_prompt needs a chat template (data.use_chat_template); "
                             "without one, put the instructions in each prompt")

    def _enc(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special)) if text else []

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.cfg.add_eos and self.eos is not None and (not ids or ids[-1] != self.eos):
            ids = ids + [self.eos]
        return ids

    def encode(self, fmt: str, rec):
        """A prompt/completion pair without a chat template is tokenized as one text, as TRL's
        SFT, DPO, KTO and reward trainers do (apart, an SPM tokenizer would start the completion
        with a "▁"); the completion starts where the prompt's own tokens and the whole text's
        diverge (TRL 1.x's ``common_prefix_length``: a token that merges across the boundary, or
        prompt tokens that the completion re-tokenizes, are trained)."""
        all_loss = self.cfg.loss_on == "all"
        if isinstance(rec, Chat):  # TRL's conversational prompt-completion: a conversation
            fmt = "message-array prompt/completion" if fmt == "prompt_completion" else fmt
        if fmt == "text":
            ids = self._with_eos(self._enc(rec, True))
            return ids, [True] * len(ids), 0, None
        if fmt in ("prompt_completion", "alpaca") and not self.chat:
            prompt = alpaca_prompt(rec) if fmt == "alpaca" else rec[0]
            full = prompt + rec[1]
            ids, _ = self._tokens(full, [(0, len(prompt), False),
                                         (len(prompt), len(full), True)], special=True)
            alone = (self.backend.encode(prompt, add_special_tokens=True).ids
                     if self.backend is not None else self._enc(prompt, True))
            start = next((j for j, (a, b) in enumerate(zip(alone, ids, strict=False)) if a != b),
                         min(len(alone), len(ids)))
            mask = [all_loss or j >= start for j in range(len(ids))]
            ids = self._with_eos(ids)
            return ids, mask + [True] * (len(ids) - len(mask)), start, rec[1]
        if fmt in ("prompt_completion", "alpaca"):
            system = rec.system if fmt == "alpaca" else None
            rec = Chat([{"role": "user", "content": rec[0]},
                        {"role": "assistant", "content": rec[1]}])
            if system is not None:  # the line's own system message wins over data.system_prompt
                rec.insert(0, {"role": "system", "content": system})
        elif not self.has_template:
            raise EmberError(f"the {fmt} format needs a tokenizer with a chat template; this one "
                             "has none (use prompt/completion lines of strings instead)")
        return self._chat(with_system_prompt(self.cfg, rec), all_loss)

    def _render(self, messages, gen: bool = False, line: Chat | None = None) -> str:
        """``messages`` rendered with the tools and template variables (``chat_template_kwargs``)
        of ``line``, the Chat they come from (None: ``messages`` itself)."""
        line = messages if line is None else line
        tools = getattr(line, "tools", None)
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=gen,
                                                tokenize=False,
                                                **(getattr(line, "template_kwargs", None) or {}),
                                                **({"tools": tools} if tools else {}))
        except Exception as e:  # jinja raise_exception() and template bugs: a per-line problem
            raise _Bad("chat template", f"the chat template rejected this conversation: "
                                        f"{type(e).__name__}: {e}") from None

    def _spans(self, messages, full: str):
        """(start, end, is_assistant) character spans covering ``full``; None when the template
        does not render the conversation turn by turn. An assistant span is what rendering one
        more message adds after the generation prompt, so templates may inject headers/dates; a
        turn rendered otherwise once later messages follow (Qwen3 drops the think block of
        earlier turns; Mistral v3 writes the system message in the last user turn) starts after
        the message before it and ends after its own (``turn_start``, ``turn_end``)."""
        spans, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            upto = self._render(messages[: i + 1], False, messages)
            eos = getattr(self.tok, "eos_token", None)
            if eos and not full.startswith(upto) and upto.endswith(eos):
                upto = upto[: -len(eos)]  # Phi-3 ends a render with EOS, not each turn
            pre = (self._opening(messages, upto) if i == 0
                   else self._render(messages[:i], True, messages))
            if full.startswith(upto) and upto.startswith(pre):
                start, end = len(pre), len(upto)
            else:  # the turn renders otherwise once later messages follow
                start = len(pre) if full.startswith(pre) else turn_start(
                    full, pos, pre, messages[i - 1].get("content") if i else None)
                end = (None if start is None else len(upto) if full.startswith(upto)
                       else turn_end(full, start, upto, m.get("content")))
            if end is None or not pos <= start <= end:
                return None
            spans += [(pos, start, False), (start, end, True)]
            pos = end
        return spans + [(pos, len(full), False)]

    def _opening(self, messages, upto: str) -> str:
        """What a template renders before a conversation's first message when that message is
        the assistant's (a greeting): the generation prompt of no messages when it leads to
        ``upto`` (transformers refuses to render none), else the text before the answer in a
        render with a marker for its content (a default system prompt comes with the first
        message in SmolLM2's and Qwen's templates)."""
        try:
            pre = self._render([], True, messages)
            if upto.startswith(pre):
                return pre
        except _Bad:
            pass
        marker = "\x00EmberAnswer\x00"
        probe = self._render([{**messages[0], "content": marker}], False, messages)
        cut = probe.find(marker)
        return probe[:cut] if cut > 0 and probe.count(marker) == 1 else probe + "\x00"

    def _tokens(self, full: str, spans, special: bool = False
                ) -> tuple[list[int], list[list[int]]]:
        """(ids, each assistant span's token indices): ``full`` tokenized whole as transformers
        tokenizes a chat (span by span differs: SPM prepends "▁" after a special token, BPE merges
        newlines across a turn's start); a token is a span's when its characters overlap it, as
        in ``return_assistant_tokens_mask``. Without a tokenizers backend: span by span."""
        if self.backend is None:
            ids, turns = [], []
            for s, e, assistant in spans:
                toks = self._enc(full[s:e], special and s == 0)
                if assistant:
                    turns.append(list(range(len(ids), len(ids) + len(toks))))
                ids += toks
            return ids, turns
        enc = self.backend.encode(full, add_special_tokens=special)
        pairs = list(enumerate(zip(enc.offsets, enc.sequence_ids, strict=True)))
        turns = [[j for j, ((a, b), seq) in pairs  # seq None: a BOS the tokenizer adds
                  if seq is not None and ((s < b and a < e) or (a == b and s <= a < e))]
                 for s, e, assistant in spans if assistant]
        return list(enc.ids), turns

    def _stop(self, ids: list[int], toks: list[int]) -> int | None:
        """An assistant turn's end-of-turn token (its index): the first eos / end-of-turn id, else
        the last special token before only whitespace (<|im_end|> when eos is <|endoftext|>)."""
        stop = next((j for j in toks if ids[j] in self.ends), None)
        last = next((j for j in reversed(toks) if ids[j] in self.specials), None)
        if stop is None and last is not None and not self.tok.decode(
                ids[last + 1:toks[-1] + 1], skip_special_tokens=False).strip():
            return last
        return stop

    def _chat(self, messages, all_loss: bool):
        if not isinstance(messages, Chat):
            messages = Chat(messages)
        full = self._render(messages)
        spans = self._spans(messages, full)
        if spans is None and not all_loss:
            raise _Bad("chat template", "the chat template does not render this conversation "
                                        "turn by turn, so assistant tokens cannot be located; "
                                        "use data.loss_on = 'all'")
        if not all_loss and len(spans) == 1:
            raise _Bad("no assistant", "no assistant message: nothing to learn with "
                                       "data.loss_on = 'completion'")
        if not all_loss and all(m.get("weight") == 0 for m in messages
                                if m["role"] == "assistant"):
            raise _Bad("no assistant", "every assistant message has weight 0: nothing to learn")
        spans = spans or [(0, len(full), False)]
        ids, turns = self._tokens(full, spans)
        mask, prompt_len, end, stop = [all_loss] * len(ids), 0, None, None
        weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
        for toks, weight in zip(turns, weights if turns else [], strict=True):
            if not toks:  # (toks: the token indices of one assistant span)
                continue
            prompt_len, end, stop = toks[0], toks[-1] + 1, self._stop(ids, toks)
            for j in toks:
                # Template text after the end-of-turn token (a newline, Phi-3's final EOS) is
                # not the answer; nor is a turn of weight 0.
                mask[j] = all_loss or weight != 0 and (stop is None or j <= stop)
        if self.cfg.add_eos and self.eos is not None and end is not None and stop is None:
            ids.insert(end, self.eos)
            mask.insert(end, True)
        reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        return ids, mask, prompt_len, reference


def render_prompt(tokenizer, cfg: DataConfig, prompt: str, system: str | None = None
                  ) -> list[int]:
    """Token ids for generating a completion of ``prompt`` exactly as training rendered it.
    ``system`` replaces ``data.system_prompt`` (chat templates only)."""
    enc = _Encoder(cfg, tokenizer)
    if not enc.chat:
        if system is not None:
            raise EmberError("a system prompt needs a chat template; this model or run renders "
                             "prompts as plain text: put the instructions in the prompt")
        return enc._enc(prompt, True)
    msgs = [{"role": "user", "content": prompt}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return render_chat(tokenizer, cfg, msgs)


def with_system_prompt(cfg: DataConfig, messages: Sequence[dict]) -> Chat:
    """``messages`` with ``data.system_prompt`` first, unless they start with their own system
    (or developer) message, or no system prompt is set; a :class:`Chat`'s tools are kept."""
    msgs = Chat(messages, getattr(messages, "tools", None),
                getattr(messages, "template_kwargs", None))
    if cfg.system_prompt is not None and (not msgs or msgs[0]["role"] not in ("system",
                                                                            "developer")):
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    return msgs


def render_chat(tokenizer, cfg: DataConfig, messages: Sequence[dict]) -> list[int]:
    """Token ids for generating the next assistant turn of a conversation (``role``/``content``
    dicts, oldest first) rendered as training rendered conversations: ``data.system_prompt``
    goes first unless the conversation starts with its own system message."""
    enc = _Encoder(cfg, tokenizer)
    if not enc.chat:
        raise EmberError("a conversation needs a chat template; this model or run renders "
                         "prompts as plain text (use ember generate)")
    try:
        return enc._enc(enc._render(with_system_prompt(cfg, messages), True))
    except _Bad as e:
        raise EmberError(e.why) from None


def _labels(ids: list[int], mask: list[bool]) -> list[int]:
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _fit(ids, mask, prompt_len, cfg: DataConfig, bos):
    """Apply the over-long policy; None when the example must be dropped."""
    n, m = len(ids), cfg.max_seq_len
    if cfg.truncation == "drop":
        return None
    if cfg.truncation == "truncate_right":
        return ids[:m], mask[:m], min(prompt_len, m)
    keep_bos = bos is not None and ids[0] == bos
    cut = n - m
    ids2, mask2 = ids[:keep_bos] + ids[keep_bos + cut:], mask[:keep_bos] + mask[keep_bos + cut:]
    return ids2, mask2, max(keep_bos, prompt_len - cut)


class _Reader:
    """One file's state: its format (fixed by the first recognizable line) and its report."""

    def __init__(self, path: Path, cfg: DataConfig, tokenizer):
        self.path, self.cfg, self.report = path, cfg, DataReport(str(path))
        self.enc = _Encoder(cfg, tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.fmt = None if cfg.format == "auto" else cfg.format
        self.array = False  # a .json file holding an array: items are named path[index]

    def where(self, lineno: int) -> str:
        return f"{self.path}[{lineno}]" if self.array else f"{self.path}:{lineno}"

    def bad(self, lineno: int, kind: str, why: str) -> None:
        where = self.where(lineno)
        if self.cfg.bad_lines == "error":
            raise EmberError(f"{where}: {why}\n(fix the {'item' if self.array else 'line'}, or "
                             "set data.bad_lines = \"skip\" to skip bad lines and count them)")
        self.report.bad_lines += 1
        self.report.note(kind, f"{where}: {why}")

    def record(self, line: str):
        obj = json_object(line)
        if self.fmt is None:
            self.fmt = detect(obj)
            if self.fmt is None:
                raise _Bad("missing field", "no 'text', 'prompt'/'completion', 'instruction'/"
                                            "'output', 'messages', 'conversations' or "
                                            f"'chosen'/'rejected' field (keys present: "
                                            f"{sorted(obj)})")
        return parse(obj, self.fmt)

    def text(self, lineno: int, raw: bytes) -> str | None:
        """The line as text; None (counted) for a blank line or one that is not UTF-8."""
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 and not self.array else "utf-8")
        except UnicodeDecodeError as e:
            self.bad(lineno, "not UTF-8", f"not valid UTF-8 ({e.reason} at byte {e.start})")
            return None
        if not line.strip():
            self.report.blank_lines += 1
            return None
        return line

    def example(self, lineno: int, raw: bytes) -> Example | None:
        where = self.where(lineno)
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            rec = self.record(line)  # fixes self.fmt on the first line
            if self.fmt == "preference":
                from ember.engine.preference import encode_pair

                docs = encode_pair(self.enc, rec)
            else:
                docs = [self.enc.encode(self.fmt, rec)]
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        fitted = []
        for d in docs:
            fitted.append(self._fit(lineno, *d[:3]))
            if fitted[-1] is None:  # a pair with a dropped half is dropped whole
                return None
        key = hashlib.blake2b(line.strip().encode(), digest_size=16).hexdigest()
        if len(fitted) == 1:
            (ids, labels, prompt_len, first), = fitted
            return Example(ids, labels, where, prompt_len, docs[0][3], key, first_label=first)
        # A pair: the chosen document first; generation metrics use its prompt and completion.
        return Example([t for f in fitted for t in f[0]], [t for f in fitted for t in f[1]], where,
                       fitted[0][2], rec.reference, key, parts=tuple(len(f[0]) for f in fitted))

    def _fit(self, lineno: int, ids, mask, prompt_len):
        """(ids, labels, prompt_len, first_label) of one document after the over-long policy, or
        None."""
        cfg, rep, where = self.cfg, self.report, self.where(lineno)
        if len(ids) > cfg.max_seq_len:
            n, fitted = len(ids), _fit(ids, mask, prompt_len, cfg, self.bos)
            what = f"{where}: {n} tokens > max_seq_len {cfg.max_seq_len}"
            if fitted is None or not any(fitted[1][1:]):
                rep.dropped_too_long += 1
                rep.note("too long", f"{what} (dropped" + (
                    ")" if fitted is None else ": no loss tokens left after truncation)"))
                return None
            ids, mask, prompt_len = fitted
            rep.truncated += 1
            rep.note("too long", f"{what} ({cfg.truncation.replace('_', ' ')})")
        labels = _labels(ids, mask)
        if all(t == IGNORE for t in labels):
            self.bad(lineno, "no loss tokens", "nothing to learn from (a single token)")
            return None
        return ids, labels, prompt_len, ids[0] if mask[0] else IGNORE


def read_lines(path: str | Path, make_reader) -> tuple[_Reader, list[Example]]:
    """(reader, examples) of one JSONL file, or of a JSON-array / CSV / TSV / Parquet file, any
    of them gzipped (``ember.engine.datafiles``; items named ``path[index]``): ``make_reader(path)``
    turns each line into an example or reports it (its ``report`` counts the lines)."""
    path = Path(path)
    if not path.exists():
        raise EmberError(f"{path}: dataset file not found")
    if path.is_dir():
        raise EmberError(f"{path}: is a directory; give the JSONL file")
    reader, examples = make_reader(path), []
    with open_data(path) as f:
        items = table_items(path, f)
        if items is not None:
            reader.array = True
        for lineno, raw in enumerate(f, 1) if items is None else enumerate(items):
            reader.report.lines += 1
            ex = reader.example(lineno, raw)  # an Example, a list of them (KTO), or None
            if ex is not None:
                examples.extend(ex if isinstance(ex, list) else [ex])
    return reader, examples


def load_examples(path: str | Path, cfg: DataConfig, tokenizer, make_reader=None
                  ) -> tuple[list[Example], DataReport]:
    """Read one JSONL file. Bad lines are skipped and reported, or raise (``cfg.bad_lines``).
    ``make_reader(path)``: another line reader (``engine/kto.py``'s)."""
    reader, examples = read_lines(path, make_reader or (lambda p: _Reader(p, cfg, tokenizer)))
    rep = reader.report
    rep.format = reader.fmt or cfg.format
    rep.examples = len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(e.num_loss_tokens for e in examples)
    if rep.lines == rep.blank_lines:
        raise EmberError(f"{path}: the file is empty; expected one JSON object per line (or a "
                         ".json array of them)")
    if not examples:
        hint = ("\n(JSON Lines hold one whole object per line: write each with json.dumps(obj), "
                "not indented; or give a .json file holding one array of objects)"
                if rep.kinds["invalid JSON"] else "")
        raise EmberError(f"{path}: no usable examples: all {rep.lines - rep.blank_lines} lines "
                         "are bad or too long\n" + "\n".join(f"  {p}" for p in rep.problems)
                         + hint)
    return examples, rep


@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]
    test: list[Example] | None
    reports: list[DataReport]
    val_sources: dict[str, list[Example]] = field(default_factory=dict)  # name -> examples
    mixing: str = ""  # data.mix: each source's share of an epoch

    def summary(self) -> str:
        head = (f"train {len(self.train)}, validation {len(self.validation)}"
                + ("" if self.test is None else f", test {len(self.test)}") + " examples")
        return "\n".join([head] + [r.summary() for r in self.reports]
                         + ([self.mixing] if self.mixing else []))


def load_datasets(cfg: DataConfig, tokenizer, load_file=load_examples) -> Datasets:
    """Every split of ``cfg``; ``load_file(path, cfg, tokenizer) -> (examples, report)`` reads
    one file (``engine/kto.py`` passes its own reader)."""
    if not cfg.train:
        raise EmberError("data.train is empty: give one or more JSONL files")
    reports = []

    def load(path):
        ex, rep = load_file(path, cfg, tokenizer)
        reports.append(rep)
        return ex

    train = []
    for group, path in enumerate(cfg.train):
        for e in load(path):
            e.group = group  # the source, for data.mix and per-source validation
            train.append(e)
    val_sources = {}
    if cfg.validation is not None:
        files = [cfg.validation] if isinstance(cfg.validation, str) else list(cfg.validation)
        loaded = [load(f) for f in files]
        val = [e for examples in loaded for e in examples]
        if len(files) > 1:
            val_sources = dict(zip(source_names(files, "data.validation"), loaded, strict=True))
    else:
        train, val = split_examples(train, cfg.val_fraction, cfg.seed)
        if val and len(cfg.train) > 1:
            names = source_names(list(cfg.train), "data.train")
            val_sources = {n: ex for g, n in enumerate(names)
                           if (ex := [e for e in val if e.group == g])}
    mixing = ""
    if cfg.mix:
        sizes = [sum(1 for e in train if e.group == g) for g in range(len(cfg.train))]
        mixing = describe(sizes, cfg.mix, source_names(list(cfg.train), "data.train"))
    test = None if cfg.test is None else load(cfg.test)
    return Datasets(train, val, test, reports, val_sources, mixing)

