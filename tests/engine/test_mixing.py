"""Multi-task mixing (``data.mix``) and per-source validation: exact per-epoch shares, full
coverage of a downsampled file, determinism, exact resume (in the batch stream and through the
trainer), ``val_loss/<name>`` rows that match each file's own validation loss, and bad weights
as clear errors."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from ember import EmberError
from ember.engine.data import DataConfig, PackedBatches, load_datasets
from ember.engine.evaluation import validation_loss
from ember.engine.mixing import quotas, source_names
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, train
from tests.engine._tiny import make_examples, quiet, rows_of, tiny_config, tiny_rows, write_jsonl


def _sources(sizes):
    examples = []
    for g, n in enumerate(sizes):
        for e in make_examples(n, seed=g):
            e.group = g
            examples.append(e)
    return examples


def _per_group(batches: PackedBatches, epoch: int) -> Counter:
    return Counter(batches.examples[i].group for b in batches.plan(epoch) for i in b)


@pytest.mark.parametrize("sizes,mix", [((30, 10), (0.25, 0.75)), ((23, 17, 9), (0.7, 0.2, 0.1))])
def test_each_epoch_has_the_weighted_shares(sizes, mix):
    examples = _sources(sizes)
    batches = PackedBatches(examples, 40, seed=3, mix=mix)
    n = sum(sizes)
    seen = Counter()
    for epoch in range(4):
        per = _per_group(batches, epoch)
        assert sum(per.values()) == n  # an epoch is as long as all the files together
        for g, w in enumerate(mix):
            assert abs(per[g] / n - w / sum(mix)) <= 1 / n, (epoch, per)
        assert [per[g] for g in range(len(sizes))] == quotas(list(sizes), mix)
        seen.update(i for b in batches.plan(epoch) for i in b)
    # Each source is a stream of shuffled passes: its examples are seen equally often, +-1.
    for g in range(len(sizes)):
        counts = [seen[i] for i, e in enumerate(examples) if e.group == g]
        assert max(counts) - min(counts) <= 1, (g, counts)


def test_downsampled_file_shows_every_example_before_repeating():
    examples = _sources((30, 10))
    batches = PackedBatches(examples, 40, seed=0, mix=(0.25, 0.75))  # 10 of 30 per epoch
    first = [i for e in range(3) for b in batches.plan(e) for i in b if examples[i].group == 0]
    assert sorted(first) == list(range(30))



@pytest.mark.parametrize("sizes,mix", [((3, 5), (0.5, 0.5)), ((13, 17), (0.37, 0.63)),
                                       ((2, 9), (0.2, 0.8)), ((1, 1000), (1.0, 1.0))])
def test_every_epoch_shows_each_example_equally_often(sizes, mix):
    """Within each epoch (not only summed over epochs): an upsampled file's examples are seen
    floor(q/n) or ceil(q/n) times, a downsampled file's at most once; over the epochs a
    downsampled file shows all of its examples before repeating one."""
    examples = _sources(sizes)
    for seed in range(3):
        batches = PackedBatches(examples, 40, seed=seed, mix=mix)
        for epoch in range(6):
            seen = Counter(i for b in batches.plan(epoch) for i in b)
            for g, (n, q) in enumerate(zip(sizes, quotas(list(sizes), mix), strict=True)):
                counts = [seen[i] for i, e in enumerate(examples) if e.group == g]
                assert sum(counts) == q
                assert set(counts) <= {q // n, -(-q // n)}, (seed, epoch, g, counts)
        for g, n in enumerate(sizes):
            if quotas(list(sizes), mix)[g] < n:  # the first n drawn are n distinct examples
                firsts, k = set(), 0
                for epoch in range(6):
                    got = [i for b in batches.plan(epoch) for i in b if examples[i].group == g]
                    if len(firsts) + len(got) > n:
                        break
                    firsts.update(got)
                    k += len(got)
                assert len(firsts) == k



@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-300])
def test_only_the_weights_ratios_count(scale):
    """data.mix weighs by w / sum(w), at any scale (was: huge weights summed to inf, a deep
    "cannot convert float NaN to integer")."""
    sizes, mix = [23, 17, 9], (0.7, 0.2, 0.1)
    want = [round(sum(sizes) * w / sum(mix)) for w in mix]  # no ties here: plain rounding
    assert quotas(sizes, tuple(w * scale for w in mix)) == want == [34, 10, 5]
    assert quotas([10, 10], (1e308, 1e308)) == [10, 10]


def test_mixing_is_deterministic_by_seed_and_resumes_exactly():
    examples = _sources((30, 10))
    a = PackedBatches(examples, 40, seed=1, mix=(0.7, 0.3))
    b = PackedBatches(examples, 40, seed=1, mix=(0.7, 0.3))
    assert [a.plan(e) for e in range(3)] == [b.plan(e) for e in range(3)]
    assert a.plan(0) != PackedBatches(examples, 40, seed=2, mix=(0.7, 0.3)).plan(0)
    assert a.plan(0) != a.plan(1)  # a new draw each epoch
    full = [x.input_ids.tolist() for _ in range(2) for x in a]
    cut = len(b.plan(0)) + 3
    got = [x.input_ids.tolist() for _, x in zip(range(cut), _forever(b), strict=False)]
    state = b.state_dict()
    c = PackedBatches(examples, 40, seed=1, mix=(0.7, 0.3))
    c.load_state_dict(state)
    rest = [x.input_ids.tolist() for _, x in zip(range(len(full) - cut), _forever(c), strict=False)]
    assert got + rest == full
    with pytest.raises(EmberError, match="differ from the checkpoint"):
        PackedBatches(examples, 40, seed=1, mix=(0.6, 0.4)).load_state_dict(state)
    with pytest.raises(EmberError, match="differ from the checkpoint"):
        PackedBatches(examples, 40, seed=1).load_state_dict(state)


def _forever(batches):
    while True:
        yield from batches


@pytest.mark.parametrize(
    "mix,match",
    [
        ([1.0], "data.mix has 1 weights but data.train has 2 files"),
        ([1.0, 2.0, 3.0], "has 3 weights"),
        ([0.5, -0.5], r"data.mix\[1\] = -0.5: weights must be finite and > 0"),
        ([1.0, 0.0], r"data.mix\[1\] = 0.0"),
        ([math.nan, 1.0], r"data.mix\[0\] = nan"),
        ([math.inf, 1.0], r"data.mix\[0\] = inf"),
    ],
)
def test_bad_weights_are_errors(mix, match):
    with pytest.raises(EmberError, match=match):
        DataConfig(train=("a.jsonl", "b.jsonl"), mix=tuple(mix))


def test_bad_sources_are_errors(tiny, tmp_path):
    from ember.engine.config import load_config

    with pytest.raises(EmberError, match=r"data.mix\[0\] must be a number"):
        load_config(None, ['data.train=["a", "b"]', 'data.mix="x"'])
    with pytest.raises(EmberError, match="data.validation is an empty list"):
        DataConfig(train=("a",), validation=())
    with pytest.raises(EmberError, match="data.train lists .* twice"):
        source_names(["x/a.jsonl", "x/a.jsonl"], "data.train")
    with pytest.raises(EmberError, match="data.train lists x/a.jsonl twice"):  # however written
        source_names(["x/a.jsonl", "./x/a.jsonl"], "data.train")
    with pytest.raises(EmberError, match="data.train lists x/a.jsonl twice"):  # names differ
        source_names(["x/a.jsonl", str(Path("x/a.jsonl").resolve())], "data.train")
    assert source_names(["d/math/val.jsonl", "d/chat/val.jsonl"], "v") == ["math/val", "chat/val"]
    assert source_names(["d/math.jsonl.gz", "d/chat.csv"], "t") == ["math", "chat"]


def _stub_files(sizes: dict):
    """load_datasets' ``load_file``: ``sizes[name]`` examples for a file of that name."""
    return lambda path, cfg, tok: (make_examples(sizes[Path(path).name], seed=len(path)), None)


def test_a_train_file_listed_twice_is_refused_without_mix_too(tmp_path):
    """(was: data.train = ["a", "a"] silently showed a's examples twice an epoch, while with
    data.mix or data.val_fraction the same list was refused as a duplicate)"""
    load = _stub_files({"a.jsonl": 6, "b.jsonl": 4})
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert len(load_datasets(DataConfig(train=(a, b)), None, load).train) == 10
    for train_ in ((a, a), (a, b, f"{tmp_path}/./a.jsonl")):
        with pytest.raises(EmberError, match=r"data.train lists .*a.jsonl twice; give each file "
                                             r"once \(to show .* on purpose, weigh it up with "
                                             r"data.mix"):
            load_datasets(DataConfig(train=train_), None, load)
    # the way the message gives: a weighed up, 2/3 of each epoch
    ds = load_datasets(DataConfig(train=(a, b), mix=(2.0, 1.0)), None, load)
    assert "a: 7 per epoch (70%) from 6 examples" in ds.mixing


def test_a_mix_weight_that_rounds_to_no_examples_is_refused(tmp_path):
    """(was: the summary said "b: 0 per epoch" and b was never trained on)"""
    load = _stub_files({"a.jsonl": 30, "b.jsonl": 10})
    files = (str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    with pytest.raises(EmberError, match=r"data.mix\[1\] = 0.01 gives training file b 0 of the "
                                         r"40 examples of an epoch .* at least 0.0257"):
        load_datasets(DataConfig(train=files, mix=(1.0, 0.01)), None, load)
    ds = load_datasets(DataConfig(train=files, mix=(1.0, 0.0257)), None, load)  # the advice
    assert "b: 1 per epoch" in ds.mixing


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """Two sources of different sizes and styles, with a validation file each."""
    root = tmp_path_factory.mktemp("mix")
    rev = [
        {
            "prompt": r["prompt"].replace("say", "reverse"),
            "completion": " " + " ".join(reversed(r["completion"].split())),
        }
        for r in tiny_rows(24, seed=7)
    ]
    return {
        "a": write_jsonl(root / "copy.jsonl", tiny_rows(8, seed=1)),
        "b": write_jsonl(root / "reverse.jsonl", rev[:16]),
        "va": write_jsonl(root / "copy_val.jsonl", tiny_rows(4, seed=2)),
        "vb": write_jsonl(root / "reverse_val.jsonl", rev[16:20]),
    }


def _mix_config(tiny, t, run, *extra):
    return tiny_config(
        tiny,
        run,
        f'data.train=["{t["a"]}", "{t["b"]}"]',
        "data.mix=[0.75, 0.25]",
        f'data.validation=["{t["va"]}", "{t["vb"]}"]',
        "eval.metrics=[]",
        *extra,
    )


def test_training_logs_per_source_validation_loss(tiny, two_tasks, tmp_path):
    run = tmp_path / "run"
    train(
        _mix_config(tiny, two_tasks, run, "max_steps=4", "eval.every_steps=2"),
        echo=quiet,
        progress=False,
    )
    evals = [r for r in rows_of(run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert {"val_loss", "val_loss/copy_val", "val_loss/reverse_val"} <= r.keys()
    model, tok, cfg = load_run_model(run, "cpu")  # the final model scores each file alike
    ds = load_datasets(cfg.data, tok)
    for name, examples in ds.val_sources.items():
        loss, _ = validation_loss(model, examples, cfg.data.tokens_per_batch, "cpu")
        assert loss == pytest.approx(evals[-1][f"val_loss/{name}"], rel=1e-6)
    # The copy task (8 examples) fills 75% of each 24-example epoch: 18 draws, 2.25x.
    assert "copy: 18 per epoch (75%) from 8 examples (2.25x)" in ds.summary()


def test_mixed_run_resumes_exactly(tiny, two_tasks, tmp_path):
    # 3 batches per epoch: stopped in the middle of epoch 0, resumed into epoch 1.
    extra = ("max_steps=5", "eval.every_steps=2", "lora.dropout=0.1")
    t = Trainer(_mix_config(tiny, two_tasks, tmp_path / "a", *extra), echo=quiet, progress=False)
    t.run()
    ds = t.datasets
    assert len(PackedBatches.from_config(ds.train, t.cfg.data).plan(0)) == 3
    cfg_b = _mix_config(tiny, two_tasks, tmp_path / "b", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=2)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    with pytest.raises(EmberError, match="data"):
        train(
            _mix_config(tiny, two_tasks, tmp_path / "b", *extra, "data.mix=[0.5, 0.5]"),
            resume=True,
            echo=quiet,
            progress=False,
        )
