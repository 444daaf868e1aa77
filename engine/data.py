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
Line parsing and validation is in ``ember.engine.formats``; encoding a parsed line into tokens and
its loss mask in ``ember.engine.encoder``.
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

from ember import EmberError
from ember.engine import hfdatasets
from ember.engine.datafiles import open_data, table_items
from ember.engine.datareport import MAX_PROBLEMS, DataReport
from ember.engine.encoder import _Encoder, with_system_prompt  # noqa: F401  (for readers)
from ember.engine.formats import (  # noqa: F401  (_get_str, _type_name: for other readers)
    ROLES,
    Chat,
    _Bad,
    _get_str,
    _type_name,
    detect,
    json_object,
    parse,
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
    # JSONL file(s) (or JSON / CSV / Parquet; a Hugging Face datasets folder: its train split,
    # "folder:split" another; validation / test likewise: ember.engine.hfdatasets)
    train: tuple[str, ...] = ()
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
    # Over-long examples: "truncate_right" keeps the first max_seq_len tokens (TRL's
    # truncation_mode "keep_start", its SFT / DPO / KTO default: a line whose answer is cut away
    # entirely is dropped and counted); "truncate_left" keeps the end, and a BOS the tokenizer
    # prepends (~ TRL's deprecated "keep_end"; a preference pair loses the same prompt tokens
    # in both halves); "drop" drops them (TRL's reward trainer)
    truncation: str = "truncate_left"
    bad_lines: str = "skip"  # "skip" (count and report) | "error"
    seed: int = 0
    order: str = "shuffle"  # per-epoch order: "shuffle" | "length" (short first) | "file"
    # Batches are padding-free packs of whole documents (positions restart per document):
    # "best_fit" bins as TRL's packing_strategy "bfd" with max_length = tokens_per_batch, the
    # documents being cut at max_seq_len first (data.truncation); "greedy" fills in order. TRL's
    # "wrapped" (documents split across rows) and "bfd_split" are not offered.
    packing: str = "best_fit"
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
        whole = "Ember does not offer it (it packs whole documents): use "
        for key, trl, ours in (("truncation", "keep_start", 'in Ember it is "truncate_right"'),
                               ("truncation", "keep_end", 'in Ember it is "truncate_left"'),
                               ("packing", "bfd", 'in Ember it is "best_fit"'),
                               ("packing", "bfd_split", whole + '"best_fit"'),
                               ("packing", "wrapped", whole + '"best_fit" or "greedy"')):
            if getattr(self, key) == trl:
                raise EmberError(f"data.{key} = {trl!r} is TRL's name; {ours}")
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


def render_prompt(tokenizer, cfg: DataConfig, prompt: str, system: str | None = None,
                  template_kwargs: dict | None = None) -> list[int]:
    """Token ids for generating a completion of ``prompt`` exactly as training rendered it.
    ``system`` replaces ``data.system_prompt``; ``template_kwargs`` are variables for the chat
    template (as ``apply_chat_template(**kwargs)``; chat templates only)."""
    enc = _Encoder(cfg, tokenizer)
    if not enc.chat:
        if system is not None:
            raise EmberError("a system prompt needs a chat template; this model or run renders "
                             "prompts as plain text: put the instructions in the prompt")
        if template_kwargs:
            raise EmberError("template variables need a chat template; this model or run "
                             "renders prompts as plain text (leave them out)")
        # "" too: its BOS where the tokenizer adds one, as transformers encodes it
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    msgs = Chat([{"role": "user", "content": prompt}], template_kwargs=template_kwargs)
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return render_chat(tokenizer, cfg, msgs)


def render_chat(tokenizer, cfg: DataConfig, messages: Sequence[dict]) -> list[int]:
    """Token ids for generating the next assistant turn of a conversation (``role``/``content``
    dicts, oldest first) rendered as training rendered conversations: ``data.system_prompt``
    goes first unless the conversation starts with its own system message. A :class:`Chat`'s
    ``template_kwargs`` go to the template as variables."""
    enc = _Encoder(cfg, tokenizer)
    if not enc.chat:
        raise EmberError("a conversation needs a chat template; this model or run renders "
                         "prompts as plain text (use ember generate)")
    try:
        return enc.text_ids(enc._render(with_system_prompt(cfg, messages), True))
    except _Bad as e:
        raise EmberError(e.why) from None


def _cut_prompt(prompt: list[int], cut: int, bos: int | None) -> list[int]:
    """``prompt`` less the ``cut`` tokens truncate_left took from the training context's prompt
    (after the BOS it keeps), so that a generation prompt is cut as the context was."""
    if cut <= 0:
        return prompt
    keep = int(bos is not None and prompt[:1] == [bos])
    return prompt[:keep] + prompt[keep + cut:]


def _labels(ids: list[int], mask: list[bool]) -> list[int]:
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _fit(ids, mask, prompt_len, cfg: DataConfig, bos, cut: int = 0):
    """Apply the over-long policy; None when the example must be dropped. ``cut``: the tokens
    "truncate_left" takes at least from after the BOS (a pair's shared prompt cut alike)."""
    n, m = len(ids), cfg.max_seq_len
    if cfg.truncation == "drop":
        return None
    if cfg.truncation == "truncate_right":
        return ids[:m], mask[:m], min(prompt_len, m)
    keep_bos = bos is not None and ids[0] == bos
    cut = max(cut, n - m)
    ids2, mask2 = ids[:keep_bos] + ids[keep_bos + cut:], mask[:keep_bos] + mask[keep_bos + cut:]
    return ids2, mask2, max(keep_bos, prompt_len - cut)


class _Reader:
    """One file's state: its format (fixed by the first recognizable line) and its report."""

    def __init__(self, path: Path, cfg: DataConfig, tokenizer, pairs: str = "dpo"):
        self.path, self.cfg, self.report = path, cfg, DataReport(str(path))
        self.pairs = pairs  # preference pairs' tokenization rule (preference.encode_pair)
        self.enc = _Encoder(cfg, tokenizer)
        # the BOS that truncate_left keeps: one the tokenizer itself puts first, or one a chat
        # template writes once (Llama 3.1's {{ bos_token }}); not SmolLM2's bos_token
        # <|im_start|>, which its tokenizer never prepends and which opens every turn
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = bos if bos is not None and self.enc._enc("a", True)[:1] == [bos] else None
        self._written_bos = bos if self.bos is None else None
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
                from ember.engine.preference import answer_generation_prompt, encode_pair

                docs = encode_pair(self.enc, rec, self.pairs)
                gen = answer_generation_prompt(  # (its chosen half's)
                    self.enc, rec.prompt, rec.chosen, rec.tools, rec.template_kwargs, docs[0])
            else:
                # gen: the prompt generation metrics feed, where the template renders it
                # otherwise than the training context (Example.generation_prompt)
                doc, gen = self.enc.encode_with_prompt(self.fmt, rec)
                docs = [doc]
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        fitted, cuts, rep = [], self._pair_cuts(docs), self.report
        truncated = rep.truncated  # counts lines: a pair's two cut halves are one
        for d, cut in zip(docs, cuts, strict=True):
            fitted.append(self._fit(lineno, *d[:3], cut=cut))
            if fitted[-1] is None:  # a pair with a dropped half is dropped whole
                rep.truncated = truncated
                return None
        rep.truncated = truncated + (rep.truncated > truncated)
        key = hashlib.blake2b(line.strip().encode(), digest_size=16).hexdigest()
        if gen is not None:  # the tokens truncation took from the training context's prompt
            gen = _cut_prompt(gen, docs[0][2] - fitted[0][2], self._bos(docs[0][0]))
        if len(fitted) == 1:
            (ids, labels, prompt_len, first), = fitted
            return Example(ids, labels, where, prompt_len, docs[0][3], key, first_label=first,
                           generation_prompt=gen)
        # A pair: the chosen document first; generation metrics use its prompt and completion.
        return Example([t for f in fitted for t in f[0]], [t for f in fitted for t in f[1]], where,
                       fitted[0][2], rec.reference, key, parts=tuple(len(f[0]) for f in fitted),
                       generation_prompt=gen)

    def _bos(self, ids) -> int | None:
        """The BOS that opens ``ids`` and that truncate_left keeps there, or None."""
        bos = self.bos if self.bos is not None else self._written_bos
        if bos is None or ids[:1] != [bos] or (self.bos is None and bos in ids[1:]):
            return None
        return bos

    def _pair_cuts(self, docs) -> list[int]:
        """Tokens that "truncate_left" cuts at least from each document of a pair: the same
        prompt tokens from both, as many as the longer needs, so both answers keep one prompt
        (TRL's deprecated ``keep_end`` cuts each sequence alone); an answer longer than the
        limit with no prompt left also loses its beginning (its own cut, in ``_fit``)."""
        m = self.cfg.max_seq_len
        if len(docs) < 2 or self.cfg.truncation != "truncate_left" or all(
                len(d[0]) <= m for d in docs):
            return [0] * len(docs)
        keep_bos = all(self._bos(d[0]) is not None for d in docs)
        prompt = min(d[2] for d in docs) - keep_bos  # the shared prompt's tokens after BOS
        return [min(max(len(d[0]) for d in docs) - m, max(prompt, 0))] * len(docs)

    def _fit(self, lineno: int, ids, mask, prompt_len, cut: int = 0):
        """(ids, labels, prompt_len, first_label) of one document after the over-long policy, or
        None; ``cut``: the pair's shared left cut (``_pair_cuts``)."""
        cfg, rep, where = self.cfg, self.report, self.where(lineno)
        if len(ids) > cfg.max_seq_len or cut:
            n, fitted = len(ids), _fit(ids, mask, prompt_len, cfg, self._bos(ids), cut)
            what = (f"{where}: {n} tokens > max_seq_len {cfg.max_seq_len}" if n > cfg.max_seq_len
                    else f"{where}: {n} tokens, the same {cut} prompt tokens cut as from the "
                         "pair's other half")
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
    if not hfdatasets.exists(str(path)):
        raise EmberError(f"{path}: dataset file not found")
    reader, examples = make_reader(path), []
    reader.report.files = hfdatasets.hub_files(path)
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


def load_examples(path: str | Path, cfg: DataConfig, tokenizer, make_reader=None, *,
                  pairs: str = "dpo") -> tuple[list[Example], DataReport]:
    """Read one JSONL file. Bad lines are skipped and reported, or raise (``cfg.bad_lines``).
    ``make_reader(path)``: another line reader (``engine/kto.py``'s); ``pairs``: how preference
    pairs are tokenized ("dpo" or "cpo": ``ember.engine.preference.encode_pair``)."""
    reader, examples = read_lines(path, make_reader or (lambda p: _Reader(p, cfg, tokenizer,
                                                                          pairs)))
    rep = reader.report
    rep.format = reader.fmt or cfg.format
    rep.examples = len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(e.num_loss_tokens for e in examples)
    rep.tool_calls_dropped = reader.enc.tool_calls_dropped
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


@hfdatasets.one_walk()  # each datasets folder walked once for all its splits
def load_datasets(cfg: DataConfig, tokenizer, load_file=load_examples) -> Datasets:
    """Every split of ``cfg``; ``load_file(path, cfg, tokenizer) -> (examples, report)`` reads
    one file (``engine/kto.py`` passes its own reader)."""
    if not cfg.train:
        raise EmberError("data.train is empty: give one or more JSONL files")
    cfg = hfdatasets.named_splits(cfg)  # a datasets folder: the split named like the setting
    if len(cfg.train) > 1:  # a file listed twice: refused (was: silently seen twice an epoch,
        source_names(list(cfg.train), "data.train")  # unless data.mix / val_fraction refused it)
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
        try:
            train, val = split_examples(train, cfg.val_fraction, cfg.seed)
        except EmberError as e:  # the lines skipped were reported after it: the count puzzled
            raise EmberError("\n".join([str(e), *(r.summary() for r in reports
                                                   if r.bad_lines or r.dropped_too_long)])
                             ) from None
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

