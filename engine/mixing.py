"""Multi-task mixing of several training files (``data.mix``) and per-source validation.

``data.train = ["a.jsonl", "b.jsonl"]`` with ``data.mix = [0.7, 0.3]``: each epoch holds as
many examples as all the files together (N), of which ``round(N * w_i / sum(w))`` come from file
i (largest remainders, so they add up to N). A file with fewer examples than its share is
upsampled (seen several times per epoch), one with more is downsampled. Each file is read as an
endless stream of seeded shuffled passes, and every epoch takes the next share of that stream: a
downsampled file shows all of its examples before repeating any, and an upsampled one shows
each example the same number of times, to within one. The epoch's examples are then ordered and
packed as ``data.order`` / ``data.packing`` say. All of it is a function of (seed, epoch), so
a resumed run sees exactly the batches an uninterrupted one would. Without ``data.mix`` the
files are concatenated and every example is seen once per epoch.

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
from pathlib import Path

from ember import EmberError


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
    n, total = sum(sizes), sum(mix)
    exact = [n * w / total for w in mix]
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
        n, perms = len(idx), {}
        for k in range(epoch * q, (epoch + 1) * q):  # source i's stream, its next q examples
            p, j = divmod(k, n)
            if p not in perms:
                perm = list(range(n))
                random.Random(f"{seed}:mix:{i}:{p}").shuffle(perm)
                perms[p] = perm
            out.append(idx[perms[p][j]])
    return out


def source_names(paths: list[str], what: str) -> list[str]:
    """Short distinct names of files: the name without extension, with as many parent folders
    as it takes to tell them apart (``data/math/val.jsonl`` or ``.jsonl.gz`` -> ``math/val``)."""

    def stem(p: Path) -> Path:
        p = p.with_suffix("") if p.suffix.lower() == ".gz" else p
        return p.with_suffix("")

    parts = [stem(Path(p)).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    twice = next((p for p in paths if paths.count(p) > 1), None)
    if twice is None:  # names that differ only in their extensions
        return list(paths)
    raise EmberError(
        f"{what} lists {twice} twice; give each file once (with data.mix, weigh "
        "a training file up instead of repeating it)"
    )


def describe(sizes: list[int], mix: tuple[float, ...], names: list[str]) -> str:
    """One line per source: its share of an epoch and how often each example is seen."""
    if 0 in sizes:
        raise EmberError(
            f"data.mix: training file {names[sizes.index(0)]} has no training "
            "examples left (after data.val_fraction)"
        )
    lines = [f"mixing {len(sizes)} training sources, {sum(sizes)} examples per epoch:"]
    for name, n, q in zip(names, sizes, quotas(sizes, mix), strict=True):
        lines.append(
            f"  {name}: {q} per epoch ({q / sum(sizes):.0%}) from {n} examples ({q / n:.2f}x)"
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
