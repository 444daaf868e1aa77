"""Fixtures shared by the engine tests."""

from __future__ import annotations

import random

import pytest

from tests.engine._shared_launch import MAKERS, plan_key, run_shared
from tests.engine._tiny import WORDS, make_tiny_model, tiny_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random HF model folder and its JSONL splits (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    return {"model": str(model),
            "train": write_jsonl(root / "train.jsonl", tiny_rows(48, seed=1)),
            "small": write_jsonl(root / "small.jsonl", tiny_rows(8, seed=1)),
            "val": write_jsonl(root / "val.jsonl", tiny_rows(8, seed=2)),
            "test": write_jsonl(root / "test.jsonl", tiny_rows(8, seed=3))}


@pytest.fixture(scope="session")
def prefs(tmp_path_factory):
    """Preference pairs: the chosen answer repeats the prompt's first word, the rejected one
    another word."""
    rng = random.Random(5)
    rows = []
    for _ in range(12):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        wrong = rng.choice([w for w in WORDS if w != words[0]])
        rows.append({"prompt": "say " + " ".join(words) + " ->", "chosen": " " + words[0],
                     "rejected": " " + wrong})
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


@pytest.fixture(scope="session")
def shared_launch(tiny, tmp_path_factory, request):
    """The two-process runs of every selected ``@shares_launch`` test, in one torchrun launch
    (tests/engine/_shared_launch.py)."""
    keys = []
    for item in request.session.items:
        fn = getattr(item, "function", None)
        key = fn is not None and plan_key(fn.__module__, fn.__name__)
        if key in MAKERS and key not in keys:
            keys.append(key)
    return run_shared(tiny, tmp_path_factory.mktemp("shared_launch"), keys)


@pytest.fixture
def launched(shared_launch, request):
    """This test's (folder, {run name: its output}) from the shared torchrun launch."""
    fn = request.node.function
    return shared_launch[plan_key(fn.__module__, fn.__name__)]
