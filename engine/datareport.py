"""The report of one data file: its counts (examples, tokens, blank, bad, truncated and dropped
lines) and the first problems verbatim (``ember.engine.data`` fills it in)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_PROBLEMS = 5  # problems quoted verbatim in a report; the rest are counted by kind


@dataclass
class DataReport:
    path: str
    format: str = "?"
    lines: int = 0
    examples: int = 0
    blank_lines: int = 0
    bad_lines: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    tool_calls_dropped: int = 0  # conversations whose tool calls the chat template does not render
    kinds: Counter = field(default_factory=Counter)  # problem kind -> count
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, "path:line: why"
    files: list[str] = field(default_factory=list)  # a Hub-style folder's split: the files read

    def note(self, kind: str, message: str) -> None:
        self.kinds[kind] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def summary(self) -> str:
        s = (f"{self.path}: {self.examples} examples ({self.format}), {self.tokens} tokens, "
             f"{self.loss_tokens} with loss")
        extra = [f"{n} {what}" for n, what in ((self.bad_lines, "bad lines skipped"),
                                               (self.truncated, "truncated"),
                                               (self.dropped_too_long, "dropped (too long)"))
                 if n]
        if self.files:  # which files a folder's split was inferred to hold
            shown = ", ".join(self.files[:4]) + (", ..." if len(self.files) > 4 else "")
            s += f"\n  read from {len(self.files)} file{'s' * (len(self.files) > 1)}: {shown}"
        if self.tool_calls_dropped:
            s += (f"\n  note: {self.tool_calls_dropped} conversations hold tool calls that the "
                  "chat template does not render (it writes only an assistant message's "
                  "content), so their call turns train only the end of turn, as TRL trains them; "
                  "to train the calls, write them into the content or use a template that "
                  "renders tool_calls")
        if extra:
            s += "; " + ", ".join(extra)
            s += "".join(f"\n  {p}" for p in self.problems)
            more = sum(self.kinds.values()) - len(self.problems)
            if more > 0:
                kinds = ", ".join(f"{k}: {n}" for k, n in self.kinds.items())
                s += f"\n  ... and {more} more ({kinds})"
        return s
