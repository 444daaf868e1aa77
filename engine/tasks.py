"""Built-in demo tasks: realistic business datasets Ember generates deterministically, so the
quickstart runs on a fresh machine with nothing to download.

``support-tickets``: a customer writes a support ticket for one of a software company's products;
the model must answer with a fixed JSON record::

    {"category": "billing", "priority": "high", "product": "Payroll"}

- ``category`` (billing | bug | account | feature_request | how_to) follows from what the customer
  describes, in many phrasings;
- ``priority`` (high | medium | low) from what the customer says about urgency ("our whole team
  is blocked", "please have a look this week", "no rush");
- ``product`` is the canonical name of the product the ticket mentions, often by an alias
  ("the iPhone app" -> "Mobile App").

Each split is drawn from its own seeded stream and no ticket text appears in two splits. The
generator is pure Python (``random.Random``), so the files are identical on every machine.

``python -m ember.engine.tasks support-tickets OUT_DIR`` writes train/validation/test JSONL files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from ember import EmberError

PROMPT = "Ticket:\n{ticket}\nJSON:"

PRODUCTS = {
    "Payroll": ["Payroll", "the payroll module", "the payroll system", "the Payroll product"],
    "Invoicing": ["Invoicing", "the invoicing tool", "the invoice editor", "the Invoicing app"],
    "Time Tracker": ["Time Tracker", "the time tracker", "the timesheet page", "the timer"],
    "Mobile App": ["the Mobile App", "the iPhone app", "the Android app", "your app on my phone"],
    "Analytics": ["Analytics", "the analytics dashboard", "the reports section", "the dashboard"],
    "API": ["the API", "your REST API", "the API endpoint", "the webhook service"],
    "Inventory": ["Inventory", "the inventory module", "the stock page", "the warehouse view"],
    "CRM": ["the CRM", "the contacts module", "the sales pipeline", "our CRM"],
}

# What the customer describes; {p} is the product alias.
ISSUES = {
    "billing": [
        "I was charged twice for {p} this month.",
        "The invoice for {p} shows the wrong amount.",
        "You billed us for 12 seats of {p} but we only have 8 users.",
        "The refund for {p} that support promised never arrived.",
        "Our card was declined when renewing {p}, but the card is fine.",
        "Why did the price of {p} go up without any notice?",
        "We were charged for {p} after we downgraded our plan.",
        "I need a copy of last month's receipt for {p} with our VAT number on it.",
    ],
    "bug": [
        "{p} crashes every time I click Export.",
        "{p} keeps loading forever and never shows anything.",
        "I get an error 500 when I save changes in {p}.",
        "Since the last update the totals in {p} are wrong.",
        "{p} stopped syncing with our accounting software yesterday.",
        "Buttons in {p} do nothing when I click them.",
        "{p} shows a blank white screen after login.",
        "Dates in {p} are shifted by one day for all our records.",
    ],
    "account": [
        "I can't log in to {p}, it says my password is wrong.",
        "The password reset email for {p} never arrives.",
        "Please add a new admin user to our account in {p}.",
        "Two-factor codes are rejected when I sign in to {p}.",
        "How can I change my email address in {p}?",
        "My account in {p} got locked after a few login attempts.",
        "Please remove a former employee's access to {p}.",
        "I need to transfer ownership of our workspace in {p} to a colleague.",
    ],
    "feature_request": [
        "It would be great if {p} had a dark mode.",
        "Could you add an export to Excel in {p}?",
        "We'd love an integration between {p} and Slack.",
        "Please add bulk editing to {p}.",
        "Is it possible to add custom fields to {p}? We really need them.",
        "It would help a lot if {p} supported multiple currencies.",
        "Could {p} send a weekly summary email?",
        "We would like keyboard shortcuts in {p}.",
    ],
    "how_to": [
        "How do I export all my data from {p}?",
        "Where can I find the notification settings in {p}?",
        "Is there a guide for setting up {p} for a new team?",
        "How do I connect {p} to our Google account?",
        "What is the best way to import old records into {p}?",
        "How can I schedule a recurring report in {p}?",
        "Can you explain how user roles work in {p}?",
        "How do I undo a change I made in {p}?",
    ],
}

PRIORITY_CUES = {
    "high": [
        "This is urgent, please help ASAP!",
        "Our whole team is blocked right now.",
        "We are losing money every hour this is not fixed.",
        "URGENT: we have a deadline today.",
        "Please treat this as top priority.",
        "Nobody in the company can work until this is solved.",
    ],
    "low": [
        "No rush at all.",
        "Whenever you get a chance.",
        "Just wondering, no hurry.",
        "Take your time, it's a minor thing.",
        "Low priority for us.",
        "It can wait until next month.",
    ],
    "medium": [
        "Please have a look this week.",
        "It's annoying but we can work around it.",
        "A fix in the next few days would be good.",
        "We'd like this sorted out soon.",
        "It affects a few of our users.",
        "Normal priority.",
    ],
}

GREETINGS = ["Hi,", "Hello,", "Hello team,", "Hey there,", "Good morning,", "Dear support,", "",
             "Hi support,"]
CONTEXT = ["", "", "We're on the Business plan.", "Account ID {n}.", "I already tried clearing "
           "the browser cache.", "This started on Monday.", "We have about {n2} users.",
           "I'm using Chrome on Windows.", "Ticket reference #{n}."]
SIGNOFFS = ["", "Thanks,\n{name}", "Best regards,\n{name}", "Cheers, {name}", "- {name}",
            "Thank you!", "Regards,\n{name} ({company})"]
NAMES = ["Maria", "Tom", "Priya", "Jonas", "Aiko", "Carlos", "Fatima", "Lena", "Omar", "Grace",
         "Wei", "Noah", "Sofia", "Ravi", "Emma", "Kwame"]
COMPANIES = ["Acme Corp", "Blue Harbor", "Northwind", "Lumen Labs", "Pinecrest", "Orbit Foods",
             "Delta Legal", "Sunrise Dental"]


def _ticket(rng: random.Random) -> tuple[str, dict]:
    product = rng.choice(sorted(PRODUCTS))
    category = rng.choice(sorted(ISSUES))
    priority = rng.choice(["high", "medium", "low"])
    issue = rng.choice(ISSUES[category]).format(p=rng.choice(PRODUCTS[product]))
    issue = issue[0].upper() + issue[1:]
    cue = rng.choice(PRIORITY_CUES[priority])
    fill = dict(n=rng.randint(10000, 99999), n2=rng.choice([5, 12, 40, 150, 800]),
                name=rng.choice(NAMES), company=rng.choice(COMPANIES))
    context = rng.choice(CONTEXT).format(**fill)
    body = [issue, context]
    rng.shuffle(body)  # context before or after the issue
    # The urgency cue goes first or last, as customers do.
    body = [cue, *body] if rng.random() < 0.5 else [*body, cue]
    lines = [rng.choice(GREETINGS), " ".join(s for s in body if s),
             rng.choice(SIGNOFFS).format(**fill)]
    text = "\n".join(s for s in lines if s)
    return text, {"category": category, "priority": priority, "product": product}


def support_tickets(n: int, seed: int) -> list[dict]:
    """``n`` prompt/completion records; the completion is the compact JSON answer."""
    rng = random.Random(f"support-tickets:{seed}")
    out = []
    for _ in range(n):
        text, record = _ticket(rng)
        out.append({"prompt": PROMPT.format(ticket=text),
                    "completion": " " + json.dumps(record)})
    return out


TASKS: dict[str, Callable[[int, int], list[dict]]] = {"support-tickets": support_tickets}
SPLITS = ("train", "validation", "test")


def task_names() -> list[str]:
    return sorted(TASKS)


def generate_splits(name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Records per split, each split from its own seed; a prompt already used by an earlier split
    is skipped, so validation and test never repeat a training ticket."""
    if name not in TASKS:
        raise EmberError(f"unknown task {name!r}; built-in tasks: {', '.join(task_names())}")
    make, seen, out = TASKS[name], set(), {}
    for i, split in enumerate(SPLITS):
        n = sizes.get(split, 0)
        if n < 0:
            raise EmberError(f"task.{split} must be >= 0, got {n}")
        rows: list[dict] = []
        batch = 0
        while len(rows) < n:
            if batch > 20:
                raise EmberError(f"task {name!r} cannot produce {n} distinct {split} examples")
            for r in make(2 * n, seed * 1000 + i * 100 + batch):
                if r["prompt"] not in seen and len(rows) < n:
                    seen.add(r["prompt"])
                    rows.append(r)
            batch += 1
        out[split] = rows
    return out


def write_splits(name: str, out_dir: str | Path, sizes: dict[str, int], seed: int = 0
                 ) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for the non-empty splits; returns their paths. Files with the same
    content are left untouched, so re-running a quickstart does not rewrite its data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_splits(name, sizes, seed).items():
        if not rows:
            continue
        path = out_dir / f"{split}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ember.engine.tasks",
                                 description="Write a built-in task's JSONL splits.")
    ap.add_argument("task", choices=task_names())
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--validation", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sizes = {"train": a.train, "validation": a.validation, "test": a.test}
    for split, path in write_splits(a.task, a.out_dir, sizes, a.seed).items():
        print(f"{split}: {sizes[split]} examples -> {path}")


if __name__ == "__main__":
    main()
