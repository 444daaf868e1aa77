"""Encoding one parsed record into (ids, target mask, prompt_len, reference): plain text,
prompt/completion pairs tokenized as one text (TRL's ``common_prefix_length`` for where the
completion starts), and chat-template conversations with their assistant tokens located by
character offsets. ``cfg`` is ``ember.engine.data.DataConfig`` (read: ``add_eos``, ``loss_on``,
``use_chat_template``, ``system_prompt``). Split out of ``ember.engine.data``, which re-exports
``with_system_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import tokenizers

from ember import EmberError
from ember.engine.formats import (
    Chat,
    _Bad,
    alpaca_prompt,
    shared_opening,
    turn_end,
    turn_start,
    turn_tail_end,
)
from ember.models.tokenizer import Tokenizer, stop_token_ids
from ember.models.tokenizer_specials import special_added_ids

if TYPE_CHECKING:
    from ember.engine.data import DataConfig

class _Encoder:
    """Turns parsed records into (ids, target mask, prompt_len, reference)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.eos = getattr(tokenizer, "eos_token_id", None)
        # Every id that ends a turn (e.g. Llama 3's <|eot_id|> besides <|end_of_text|>).
        self.ends = set(stop_token_ids(tokenizer))
        # the tokenizers object whose offsets mask a text tokenized whole (Ember's tokenizer, or
        # a transformers one's backend_tokenizer); None: span by span
        self.backend = next((b for b in (getattr(tokenizer, k, None) for k in (
            "backend", "backend_tokenizer")) if isinstance(b, tokenizers.Tokenizer)), None)
        # every added token flagged special (an unnamed <|im_end|> too), whichever tokenizer:
        # all_special_ids lists only the named and extra ones (transformers 5's and Ember's)
        self.specials = (special_added_ids(self.backend) if self.backend is not None
                         else set(getattr(tokenizer, "all_special_ids", None) or ()))
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # whether a template of Ember's tokenizer marks {% generation %} blocks (else: no need
        # to render each conversation again to find them)
        self.marks = isinstance(tokenizer, Tokenizer) and any(
            "endgeneration" in (t or "") for t in (tokenizer.chat_template,
                                                   *tokenizer.chat_templates.values()))
        self.chat = self.has_template if cfg.use_chat_template is None else cfg.use_chat_template
        # CodeLlama's fill token (<FILL_ME>), Ember's tokenizer's or a transformers one's
        fill = getattr(tokenizer, "fill_token", None)
        self.fill: str | None = str(fill) if fill else None
        # conversations whose tool calls the template leaves out of its render (counted for the
        # data report: such a call turn trains only its end of turn)
        self.tool_calls_dropped = 0
        # (the Chat, how many of its messages, the text) of the last generation prompt rendered
        self._last_prompt: tuple[Chat | None, int, str] = (None, 0, "")
        if self.chat and not self.has_template:
            raise EmberError("data.use_chat_template is true but the tokenizer has no chat "
                             "template; set data.use_chat_template = false")
        if cfg.system_prompt is not None and not self.chat:
            raise EmberError("data.system_prompt needs a chat template (data.use_chat_template); "
                             "without one, put the instructions in each prompt")

    def _enc(self, text: str, special: bool = False) -> list[int]:
        """The ids of ``text``, a piece whose tokens a mask or a boundary follows: a fill token
        in it is a bad line (``_no_fill``). A whole text encoded as one is ``text_ids``."""
        self._no_fill(text)
        return self._raw(text, special)

    def _raw(self, text: str, special: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special)) if text else []

    def text_ids(self, text: str, special: bool = False) -> list[int]:
        """The ids of a whole text as transformers' ``tokenizer(text)`` gives them: with the
        tokenizer's fill token (CodeLlama's <FILL_ME>) once, the infilling prompt; more than
        once, a bad line (transformers fails on such a text with "too many values to
        unpack", Ember's tokenizer with an error that names no line)."""
        fill = self.fill
        n = text.count(fill) if fill else 0
        if n > 1:
            raise _Bad("fill token", f"the text holds {fill} {n} times; CodeLlama's tokenizer "
                                     "reads a text with it as an infilling prompt, which has "
                                     "exactly one (the hole between the code before and after "
                                     f"it): write {fill} once, or not at all")
        try:
            return self._raw(text, special)
        except (EmberError, ValueError) as e:  # a tokenizer without infilling tokens (Ember's
            if not n:  # or a transformers one: its ValueError names no line)
                raise
            raise _Bad("fill token", f"{type(e).__name__}: {e}" if not isinstance(
                e, EmberError) else str(e)) from None

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
        if fmt == "text":  # (a text holding CodeLlama's fill token is an infilling prompt)
            ids = self._text_line(rec)
            return ids, [True] * len(ids), 0, None
        if fmt in ("prompt_completion", "alpaca") and not self.chat:
            prompt = alpaca_prompt(rec) if fmt == "alpaca" else rec[0]
            full = prompt + rec[1]
            self._no_fill(full)
            ids, _ = self._tokens(full, [(0, len(prompt), False),
                                         (len(prompt), len(full), True)], special=True)
            alone = (self.backend.encode(prompt, add_special_tokens=True).ids
                     if self.backend is not None else self._enc(prompt, True))
            start = next((j for j, (a, b) in enumerate(zip(alone, ids, strict=False)) if a != b),
                         min(len(alone), len(ids)))
            mask = [all_loss or j >= start for j in range(len(ids))]
            ids = self._with_eos(ids)
            return ids, mask + [True] * (len(ids) - len(mask)), start, rec[1]
        return self._chat(self.conversation(fmt, rec), all_loss)

    def _text_line(self, text: str) -> list[int]:
        """A text line's ids with the eos ``data.add_eos`` adds. With the fill token, TRL's SFT
        recipe: its ``add_eos`` appends the eos *string* to the text (unless the text ends with
        it) and the tokenizer encodes the whole, so the eos lands in the infilling prompt's
        suffix, before ``▁<MID>``, not after it."""
        eos = getattr(self.tok, "eos_token", None)
        if self.fill and self.fill in text and self.cfg.add_eos and self.eos is not None and eos:
            return self.text_ids(text if text.endswith(eos) else text + eos, True)
        return self._with_eos(self.text_ids(text, True))

    def _no_fill(self, text: str) -> None:
        """Refuses a text (a record's rendered text, or a piece of it) that holds the
        tokenizer's fill token (CodeLlama's <FILL_ME>): transformers' tokenizer encodes such a
        text as an infilling prompt, prefix / suffix / middle reordered, which a loss mask or a
        prompt / answer boundary over the text's characters cannot follow. The rendered text:
        ``data.system_prompt``, tools and template variables put it there too, and a record's
        key the template never renders does not."""
        if self.fill and self.fill in text:
            raise _Bad("fill token", f"the line's text holds {self.fill}, which CodeLlama's "
                                     "tokenizer turns into an infilling prompt (prefix, suffix, "
                                     "middle reordered) that the loss mask cannot follow; write "
                                     "the infilling tokens yourself, or use the text format")

    def encode_with_prompt(self, fmt: str, rec) -> tuple[tuple, list[int] | None]:
        """``encode``'s document and, for a chat with a final answer, its
        ``generation_prompt`` (None: the training context's ids are the prompt)."""
        if fmt == "text" or fmt in ("prompt_completion", "alpaca") and not (
                self.chat or isinstance(rec, Chat)):
            return self.encode(fmt, rec), None
        if isinstance(rec, Chat) and fmt == "prompt_completion":
            fmt = "message-array prompt/completion"  # (as encode names it)
        messages = self.conversation(fmt, rec)
        doc = self._chat(messages, self.cfg.loss_on == "all")
        gen = None if not doc[2] or doc[3] is None else self.generation_prompt(
            messages, doc[0][:doc[2]])
        return doc, gen

    def conversation(self, fmt: str, rec) -> Chat:
        """The messages a chat-rendered record (``encode``'s chat cases) is rendered from: a
        prompt/completion or Alpaca pair as a user/assistant chat, ``data.system_prompt`` first
        unless the line has its own system message."""
        if fmt in ("prompt_completion", "alpaca") and not isinstance(rec, Chat):
            system = rec.system if fmt == "alpaca" else None
            rec = Chat([{"role": "user", "content": rec[0]},
                        {"role": "assistant", "content": rec[1]}])
            if system is not None:  # the line's own system message wins over data.system_prompt
                rec.insert(0, {"role": "system", "content": system})
        elif not self.has_template:
            raise EmberError(f"the {fmt} format needs a tokenizer with a chat template; this one "
                             "has none (use prompt/completion lines of strings instead)")
        return with_system_prompt(self.cfg, rec)

    def generation_prompt(self, messages: Chat, context: list[int]) -> list[int] | None:
        """The ids of ``messages`` up to their last answer rendered with the generation prompt,
        as transformers' ``apply_chat_template(..., add_generation_prompt=True)`` gives them (the
        prompt vLLM, lm-eval's chat mode and ``ember generate`` feed), where they differ from
        ``context``, the training render up to that answer; None where they are the same, or
        where the conversation does not end with an answer. They differ where a template renders
        a turn otherwise once it is the last: Mistral Nemo writes the system message in the
        last user turn only when that turn ends the conversation, Granite writes its
        ``controls`` in the generation prompt only, DeepSeek-R1's distills open it with
        ``<think>\n``."""
        if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
            return None
        line, n, text = self._last_prompt
        if line is not messages or n != len(messages) - 1:  # (``_spans`` rendered it: reused)
            try:
                text = self._render(messages[:-1], True, messages)
            except _Bad:  # a template that refuses the prompt alone: the training context
                return None
        ids = self._enc(text)
        return None if ids == list(context) else ids

    def _render(self, messages, gen: bool = False, line: Chat | None = None,
                blocks: list | None = None) -> str:
        """``messages`` rendered with the tools and template variables (``chat_template_kwargs``)
        of ``line``, the Chat they come from (None: ``messages`` itself); ``blocks`` (a list)
        receives the template's ``{% generation %}`` spans (Ember's tokenizer only)."""
        line = messages if line is None else line
        tools = getattr(line, "tools", None)
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=gen,
                                                tokenize=False,
                                                **(getattr(line, "template_kwargs", None) or {}),
                                                **({"tools": tools} if tools is not None else {}),
                                                **({"generation_spans": blocks}
                                                   if blocks is not None else {}),
                                                # _opening: no messages (refused in public)
                                                **({"_empty_ok": True} if not messages and
                                                   isinstance(self.tok, Tokenizer) else {}))
        except Exception as e:  # jinja raise_exception() and template bugs: a per-line problem
            raise _Bad("chat template", f"the chat template rejected this conversation: "
                                        f"{type(e).__name__}: {e}") from None
        if gen and blocks is None:  # the last generation prompt, which generation_prompt reuses
            self._last_prompt = (line, len(messages), text)
        return text

    def _drops_tool_calls(self, messages: Chat, full: str) -> bool:
        """Whether ``full``, the render of ``messages``, leaves out their assistant messages'
        tool calls: templates that render only ``content`` (Phi-3.5/4, OLMo 2, Granite 3.3,
        SmolLM2) give the same text without them. TRL trains such a line as rendered (the call
        turn: its end of turn alone), and so does Ember; the data report counts them."""
        if not any(m.get("tool_calls") for m in messages if m.get("role") == "assistant"):
            return False
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        try:
            return self._render(bare, line=messages) == full
        except _Bad:  # a template that needs the calls (it renders them)
            return False

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
            # Phi-3 ends a render with EOS, not each turn (gpt-oss its last answer with
            # <|return|>, the others with <|end|>); Mistral's </s> ends every turn
            bare = upto[: -len(eos)] if eos and not full.startswith(upto) and upto.endswith(
                eos) else None
            if bare is not None and full.startswith(bare):
                upto, bare = bare, None
            pre = (self._opening(messages, upto) if i == 0
                   else self._render(messages[:i], True, messages))
            if i and not upto.startswith(pre):  # a prompt that opens more than turns render
                pre = shared_opening(pre, upto, self._render(messages[:i], False, messages))
                # the turn's own header may go on past where the two part (Granite's prompt
                # writes its controls, assistant {"length": ...}<|end_of_role|>, where the turn
                # writes assistant<|end_of_role|>): the answer starts after the header
                head = self._header(messages, i)
                pre = head if head is not None and upto.startswith(head) and len(head) > len(
                    pre) else pre
            if full.startswith(upto) and upto.startswith(pre):
                start, end = len(pre), len(upto)
            else:  # the turn renders otherwise once later messages follow
                start = len(pre) if full.startswith(pre) else turn_start(
                    full, pos, pre, messages[i - 1].get("content") if i else None)
                if start is None and i:
                    # the prompt opens more than the turn shows once later messages follow
                    # (Qwen3.5 and Nemotron 3 prompt <think>\n; an earlier answer drops its
                    # think block): the turn starts where the two part
                    cut = shared_opening(pre, full, self._render(messages[:i], False, messages))
                    start = len(cut) if cut != pre and full.startswith(cut) else None
                end = (None if start is None else len(upto) if full.startswith(upto)
                       else turn_end(full, start, upto, m.get("content")))
                if end is None and start is not None and upto.startswith(pre):
                    end = turn_tail_end(full, start, upto[len(pre):])
                if end is None and start is not None and bare is not None:
                    # the EOS ends the render after all (gpt-oss's <|return|> after an analysis
                    # that later messages drop)
                    end = turn_end(full, start, bare, m.get("content"))
                    if end is None and bare.startswith(pre):
                        end = turn_tail_end(full, start, bare[len(pre):])
            if end is None or not pos <= start <= end:
                return None
            spans += [(pos, start, False), (start, end, True)]
            pos = end
        return spans + [(pos, len(full), False)]

    def _generation(self, messages, full: str):
        """The spans of ``full`` (as ``_spans``) that the template marks ``{% generation %}``,
        which transformers' ``return_assistant_tokens_mask`` (and TRL's assistant-only loss)
        train, whatever they leave out or take in (the end-of-turn token, a header); None when
        the template marks none or the tokenizer is not Ember's."""
        if not self.marks:
            return None
        found: list[tuple[int, int]] = []
        if self._render(messages, blocks=found) != full or not found:
            return None
        spans, pos = [], 0
        for s, e in sorted(found):
            if s >= pos:  # (a block inside another is the other's)
                spans += [(pos, s, False), (s, e, True)]
                pos = e
        return spans + [(pos, len(full), False)]

    def _prompt_end(self, messages, full: str, ids: list[int], block_start: int) -> int:
        """Where the last assistant turn's answer starts in ``ids``: after the generation prompt,
        where evaluation's prompt ends and DPO / KTO answers start (TRL's split), found turn by
        turn as without
        blocks: a block that takes the turn's header in starts before it. ``block_start`` (the
        last block's first token) when the turns cannot be found."""
        spans = self._spans(messages, full)
        if spans is None:
            return block_start
        same, turns = self._tokens(full, spans)
        last = next((t for t in reversed(turns) if t), None)
        return last[0] if same == ids and last is not None else block_start

    def _header(self, messages, i: int) -> str | None:
        """What the template writes before message ``i``'s content, from a render with a marker
        as that content; None when the marker does not come out once."""
        marker = "\x00EmberAnswer\x00"
        if not isinstance(messages[i].get("content"), str):
            return None
        try:
            probe = self._render([*messages[:i], {**messages[i], "content": marker}], False,
                                 messages)
        except _Bad:  # (a template that reads the content, e.g. for a think block)
            return None
        return probe[:probe.find(marker)] if probe.count(marker) == 1 else None

    def _opening(self, messages, upto: str) -> str:
        """What a template renders before a conversation's first message when that message is
        the assistant's (a greeting): the generation prompt of no messages when it leads to
        ``upto`` (transformers refuses to render none) and the turn's own header is not longer,
        else the text before the answer in a render with a marker for its content (a default
        system prompt comes with the first message in SmolLM2's and Qwen's templates)."""
        try:
            pre = self._render([], True, messages)
            if upto.startswith(pre):
                # a template that writes its prompt only after a message (OLMo 2's, in its
                # loop) prompts none here: the answer starts after the turn's own header
                head = self._header(messages, 0)
                return head if head is not None and upto.startswith(head) and len(head) > len(
                    pre) else pre
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

    def _after_content(self, full: str, toks: list[int], span: tuple[int, int], content
                       ) -> list[int]:
        """The tokens of ``toks`` (an assistant span's) from the end of the message's ``content``
        on, where its end-of-turn token is looked for, when the content itself writes one (a
        message about chat formats: "Write <|im_end|> after the text." must be trained whole, as
        transformers' assistant mask trains it); ``toks`` otherwise."""
        if self.backend is None or not isinstance(content, str) or not any(
                t and t in content for t in map(self.backend.id_to_token, self.ends)):
            return toks
        at = full.find(content, *span)
        if at < 0:
            return toks
        offsets = self.backend.encode(full, add_special_tokens=False).offsets
        # none when the template writes nothing after the content (no end-of-turn to find)
        return [j for j in toks if offsets[j][0] >= at + len(content)]

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
        self._no_fill(full)
        drops_calls = self._drops_tool_calls(messages, full)
        marked = self._generation(messages, full)
        spans = self._spans(messages, full) if marked is None else marked
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
        if marked is not None and len(weights) != len(turns):  # blocks are not one per turn
            if 0 in weights:
                raise _Bad("chat template", "an assistant message has weight 0, but the chat "
                                            "template's {% generation %} blocks are not one per "
                                            "assistant message; drop the weights")
            weights = [1] * len(turns)
        contents = [m.get("content") for m in messages if m["role"] == "assistant"]
        answer_spans = [(s, e) for s, e, assistant in spans if assistant]
        for k, (toks, weight) in enumerate(zip(turns, weights if turns else [], strict=True)):
            if not toks:  # (toks: the token indices of one assistant span)
                continue
            # a marked block is trained whole, as transformers' assistant mask has it
            prompt_len, end = toks[0], toks[-1] + 1
            stop = None if marked is not None else self._stop(ids, self._after_content(
                full, toks, answer_spans[k], contents[k]))
            for j in toks:
                # Template text after the end-of-turn token (a newline, Phi-3's final EOS) is
                # not the answer; nor is a turn of weight 0.
                mask[j] = all_loss or weight != 0 and (stop is None or j <= stop)
        if marked is not None and prompt_len:  # evaluation's prompt: the generation prompt
            prompt_len = self._prompt_end(messages, full, ids, prompt_len)
        if (self.cfg.add_eos and self.eos is not None and end is not None and stop is None
                and marked is None):
            ids.insert(end, self.eos)
            mask.insert(end, True)
        reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        self.tool_calls_dropped += drops_calls  # (a line refused above is not counted)
        return ids, mask, prompt_len, reference


def with_system_prompt(cfg: DataConfig, messages: Sequence[dict]) -> Chat:
    """``messages`` with ``data.system_prompt`` first, unless they start with their own system
    (or developer) message, or no system prompt is set; a :class:`Chat`'s tools are kept."""
    msgs = Chat(messages, getattr(messages, "tools", None),
                getattr(messages, "template_kwargs", None))
    if cfg.system_prompt is not None and (not msgs or msgs[0]["role"] not in ("system",
                                                                            "developer")):
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    return msgs
