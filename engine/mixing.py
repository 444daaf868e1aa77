"""Multi-task mixing of several training files (``data.mix``) and per-source validation.

``data.train = ["a.jsonl", "b.jsonl"]`` with ``data.mix = [0.7, 0.3]``: each epoch holds as
many examples as all the files together (N), of which ``round(N * w_i / sum(w))`` come from file
i (largest remainders, so they add up to N). A file with fewer examples than its share is
upsampled (seen several times per epoch), one with more is downsampled. A share of
``q = m * n + r`` examples from a file of ``n`` holds each example ``m`` times plus ``r``
distinct extras, the next ``r`` of an endless stream of seeded shuffled passes over the file
(each pass starts with examples its epoch has not taken yet). So within every epoch an upsampled
file shows each example the same number of times, to within one, and a downsampled one shows
no example twice; over the epochs a downsampled file shows all of its examples before repeating
any, and the counts of every file stay within one of each other. The epoch's examples are then
ordered and
packed as ``data.order`` / ``data.packing`` say. All of it is a function of (seed, epoch), so
a resumed run sees exactly the batches an uninterrupted one would. Without ``data.mix`` the
files are concatenated and every example is seen once per epoch. A file listed twice in
``data.train`` is an error, with or without ``data.mix`` (weigh it up to upsample it), and so is a
weight whose share of an epoch rounds to 0 examples (that file would never be trained on).

Per-source validation: ``data.validation`` may be a list of files, and ``data.val_fraction``
carved out of several training files keeps each example's file; either way the evaluation logs
``val_loss/<name>`` (and the objective's other ``val_*`` scores) per source next to the overall
``val_loss``, ``<name>`` being the file's name without its extension (with as many parent
folders as it takes to tell the files apart). This costs one more pass over the validation set.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from pathlib import Path

from ember import EmberError
from ember.engine import hfdatasets


def check_weights(mix: tuple[float, ...], files: int) -> None:
    """EmberError unless ``mix`` is one positive, finite weight per training file."""
    if len(mix) != files:
        raise EmberError(
            f"data.mix has {len(mix)} weights but data.train has {files} files; "
            "give one weight per training file, in the same order"
        )
    for i, w in enumerate(mix):
        if not math.isfinite(w) or w <= 0:
            raise EmberError(
                f"data.mix[{i}] = {w}: weights must be finite and > 0 (leave a "
                "file out of data.train rather than give it weight 0)"
            )


def quotas(sizes: list[int], mix: tuple[float, ...]) -> list[int]:
    """Examples per epoch from each source: shares of ``sum(sizes)`` by ``mix``, rounded by
    largest remainder so they add up exactly."""
    top = max(mix)  # weights relative to the largest: a sum of huge ones overflowed to inf
    rel = [w / top for w in mix]
    n, total = sum(sizes), sum(rel)
    exact = [n * w / total for w in rel]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: n - sum(out)]:
        out[i] += 1
    return out


def epoch_indices(
    members: list[list[int]], mix: tuple[float, ...], seed: int, epoch: int
) -> list[int]:
    """The example indices of ``epoch`` (with repeats when upsampling), source by source.
    ``members[i]``: the indices of source i's examples."""
    out = []
    for i, (idx, q) in enumerate(zip(members, quotas([len(m) for m in members], mix), strict=True)):
        m, r = divmod(q, len(idx))
        out += idx * m
        out += [idx[j] for j in _extras(len(idx), r, f"{seed}:mix:{i}", epoch)]
    return out


# (stream seed, n, r) -> (p, pass p): the last pass an epoch's window reached, from which the
# next epoch's passes follow without rebuilding the chain from pass 0 (a cache: results are the
# same without it)
_LAST_PASS: dict[tuple[str, int, int], tuple[int, array]] = {}


def _extras(n: int, r: int, seed: str, epoch: int) -> list[int]:
    """Items ``[epoch * r, (epoch + 1) * r)`` (``r < n``) of a stream of shuffled passes over
    ``range(n)``, all distinct: a pass whose start falls inside an epoch's window begins with
    items that window has not taken from the end of the previous pass (was: a plain stream, so
    such an epoch could show one example twice and skip another)."""
    if r == 0:
        return []
    lo, hi = epoch * r, (epoch + 1) * r
    first, last = lo // n, (hi - 1) // n
    period = r // math.gcd(n, r)  # a pass p with p * n % r == 0 starts a window: no chain
    p, perm = first - first % period, None
    key = (seed, n, r)
    if key in _LAST_PASS and p <= _LAST_PASS[key][0] <= first:
        p, perm = _LAST_PASS[key][0], list(_LAST_PASS[key][1])
    else:
        perm = _pass(None, p, n, r, seed)
    out: list[int] = []
    while True:
        out += perm[max(lo - p * n, 0): max(min(hi - p * n, n), 0)]
        if p == last:
            break
        p += 1
        perm = _pass(perm, p, n, r, seed)
    if len(_LAST_PASS) >= 64 and key not in _LAST_PASS:
        del _LAST_PASS[next(iter(_LAST_PASS))]
    _LAST_PASS[key] = (last, array("q", perm))
    return out


def _pass(prev: list[int] | None, p: int, n: int, r: int, seed: str) -> list[int]:
    """Pass ``p`` of the stream: a seeded shuffle, its first items moved so that none is among
    the ``t`` items its window took from the end of pass ``p - 1`` (``prev``)."""
    perm = list(range(n))
    random.Random(f"{seed}:{p}").shuffle(perm)
    t = p * n % r  # items its window took from the end of the previous pass
    if t:
        taken = set(prev[n - t:])
        head = [x for x in perm if x not in taken][: r - t]
        first = set(head)
        perm = head + [x for x in perm if x not in first]
    return perm


def source_names(paths: list[str], what: str) -> list[str]:
    """Short distinct names of files: the name without extension, with as many parent folders
    as it takes to tell them apart (``data/math/val.jsonl`` or ``.jsonl.gz`` -> ``math/val``)."""

    def stem(p: Path) -> Path:
        if hfdatasets.source(p) is not None:  # a datasets folder ("folder.v2:train"): whole
            return p
        p = p.with_suffix("") if p.suffix.lower() == ".gz" else p
        return p.with_suffix("")

    # the same file however it is written (was: "a.jsonl" and "./a.jsonl", or "a.jsonl" and
    # its absolute path, taken for two files)
    where = [str(Path(p).expanduser().resolve()) for p in paths]
    twice = next((p for p, w in zip(paths, where, strict=True) if where.count(w) > 1), None)
    if twice is not None:
        upsample = (" (to show a file's examples more often on purpose, weigh it up with "
                    "data.mix, one weight per file: data.mix = [2, 1] gives the first twice the "
                    "share of the second)") if what == "data.train" else ""
        raise EmberError(f"{what} lists {twice} twice; give each file once{upsample}")
    parts = [stem(Path(p)).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)  # names that differ only in their extensions


def describe(sizes: list[int], mix: tuple[float, ...], names: list[str]) -> str:
    """One line per source: its share of an epoch and how often each example is seen."""
    if 0 in sizes:
        raise EmberError(
            f"data.mix: training file {names[sizes.index(0)]} has no training "
            "examples left (after data.val_fraction)"
        )
    n_all, shares = sum(sizes), quotas(sizes, mix)
    if 0 in shares:  # (was: "0 per epoch" in the summary, and the file never trained on)
        i = shares.index(0)
        top = max(mix)  # n_all * w / sum(w) >= 1: one example (relative weights: no inf)
        least = top * (sum(w / top for w in mix) - mix[i] / top) / (n_all - 1)
        step = 10.0 ** (math.floor(math.log10(least)) - 2)
        least = math.ceil(least / step * (1 - 1e-12)) * step  # 3 digits, rounded up
        raise EmberError(
            f"data.mix[{i}] = {mix[i]:g} gives training file {names[i]} 0 of the {n_all} "
            f"examples of an epoch (its share rounds to 0): it would never be trained on; give "
            f"it a weight of at least {least:.3g}, or leave it out of data.train"
        )
    lines = [f"mixing {len(sizes)} training sources, {n_all} examples per epoch:"]
    for name, n, q in zip(names, sizes, shares, strict=True):
        lines.append(
            f"  {name}: {q} per epoch ({q / n_all:.0%}) from {n} examples ({q / n:.2f}x)"
        )
    return "\n".join(lines)


def per_source_scores(
    objective,
    sources: dict,
    model,
    tokens_per_batch: int,
    device,
    autocast,
    max_batches: int | None,
) -> dict[str, float]:
    """``<score>/<name>`` for each validation source and each ``val_*`` score of the
    objective."""
    scores = {}
    for name, examples in sources.items():
        s = objective.val_scores(model, examples, tokens_per_batch, device, autocast, max_batches)
        scores.update({f"{k}/{name}": v for k, v in s.items() if k.startswith("val_")})
    return scores


def split_examples(examples: list, fraction: float, seed: int):
    """(train, validation): ``round(n * fraction)`` examples (at least one) chosen by a seeded hash
    of each line's content, so the split is the same across runs and across line reordering. The
    examples of one line (a preference pair unpaired for KTO) go to the same side."""
    if fraction <= 0:
        return list(examples), []
    n_val = max(1, round(len(examples) * fraction))
    lines: dict[str, list[int]] = {}  # source ("path:line") -> its examples
    for i, e in enumerate(examples):
        lines.setdefault(e.source, []).append(i)
    rank = sorted(lines.values(), key=lambda idx: (
        hashlib.blake2b(f"{seed}\0{examples[idx[0]].key}".encode(), digest_size=16).digest(),
        idx[0]))
    val: set[int] = set()
    for idx in rank:
        if len(val) >= n_val:
            break
        val.update(idx)
    if len(val) >= len(examples):
        raise EmberError(f"data.val_fraction={fraction} leaves no training examples out of "
                         f"{len(examples)}; lower it or give a validation file")
    return ([e for i, e in enumerate(examples) if i not in val],
            [e for i, e in enumerate(examples) if i in val])
