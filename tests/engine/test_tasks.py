"""The built-in support-tickets task: deterministic, disjoint splits, and every label decidable
from the ticket text (one urgency cue of the labelled priority, an alias of the labelled product,
a phrasing of the labelled category)."""

from __future__ import annotations

import json

import pytest

from ember import EmberError
from ember.engine.tasks import (
    ISSUES,
    PRIORITY_CUES,
    PRODUCTS,
    PROMPT,
    generate_splits,
    write_splits,
)


def _ticket(prompt: str) -> str:
    head, tail = PROMPT.split("{ticket}")
    assert prompt.startswith(head) and prompt.endswith(tail)
    return prompt[len(head):len(prompt) - len(tail)]


def test_splits_are_deterministic_and_disjoint():
    sizes = {"train": 300, "validation": 20, "test": 50}
    a, b = generate_splits("support-tickets", sizes, seed=3), generate_splits(
        "support-tickets", sizes, seed=3)
    assert a == b and {k: len(v) for k, v in a.items()} == sizes
    assert generate_splits("support-tickets", sizes, seed=4) != a
    prompts = [r["prompt"] for rows in a.values() for r in rows]
    assert len(set(prompts)) == len(prompts)  # no ticket in two splits (or twice in one)


def test_every_label_follows_from_the_ticket():
    rows = generate_splits("support-tickets", {"train": 400})["train"]
    seen = {"category": set(), "priority": set(), "product": set()}
    for r in rows:
        ticket = _ticket(r["prompt"])
        assert r["completion"].startswith(" ")
        label = json.loads(r["completion"])
        assert set(label) == {"category", "priority", "product"}
        for k, v in label.items():
            seen[k].add(v)
        cues = {p for p, phrases in PRIORITY_CUES.items() for c in phrases if c in ticket}
        assert cues == {label["priority"]}, ticket
        products = {p for p, names in PRODUCTS.items()
                    for n in names if n.lower() in ticket.lower()}
        assert label["product"] in products, ticket
    assert seen["category"] == set(ISSUES) and seen["priority"] == set(PRIORITY_CUES)
    assert seen["product"] == set(PRODUCTS)  # every class occurs in 400 examples


def test_write_splits_and_errors(tmp_path):
    paths = write_splits("support-tickets", tmp_path, {"train": 5, "validation": 0, "test": 2})
    assert sorted(paths) == ["test", "train"]
    lines = paths["train"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all("prompt" in json.loads(x) for x in lines)
    mtime = paths["train"].stat().st_mtime_ns
    write_splits("support-tickets", tmp_path, {"train": 5, "validation": 0, "test": 2})
    assert paths["train"].stat().st_mtime_ns == mtime  # same content: not rewritten
    with pytest.raises(EmberError, match="unknown task"):
        generate_splits("nope", {"train": 1})
    with pytest.raises(EmberError, match="task.test must be >= 0"):
        generate_splits("support-tickets", {"test": -1})


def test_unknown_task_name_is_a_config_error():
    from ember.engine.config import load_config

    with pytest.raises(EmberError, match=r"task.name = 'support-ticket' is not a built-in task; "
                                         r"use one of 'support-tickets'"):
        load_config(None, ['model.name="x"', 'task.name="support-ticket"'])
    assert load_config(None, ['model.name="x"', 'task.name="support-tickets"']).task.train == 2000
