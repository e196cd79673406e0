"""Train/test splits of one snapshot of the relation (pure logic, unit tested)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def test_count(n_rows: int, test_size: float) -> int:
    """Rows to hold out: a fraction (0 < test_size < 1) or a row count (test_size > 1)."""
    if test_size <= 0 or test_size == 1:
        raise ValueError(f"test_size {test_size} is out of range: use a fraction in (0, 1) or a row count > 1")
    n = int(test_size) if test_size > 1 else round(n_rows * test_size)
    n = max(1, n)
    if n >= n_rows:
        raise ValueError(f"test_size {test_size} leaves no rows to train on ({n_rows} rows in all)")
    return n


def split(labels: Sequence[str], test_size: float, sampling: str, seed: int = 42) -> tuple[list[int], list[int]]:
    """Indices (train, test) of rows whose classes are `labels` (in relation order).

    last: the last rows are the test set (relation order); random: a seeded shuffle; stratified: each class
    contributes in proportion, at least one row per class that has two or more.
    """
    n = len(labels)
    k = test_count(n, test_size)
    order = list(range(n))
    if sampling == "last":
        return order[: n - k], order[n - k :]
    rng = random.Random(seed)
    if sampling == "random":
        rng.shuffle(order)
        return sorted(order[k:]), sorted(order[:k])
    if sampling != "stratified":
        raise ValueError(f"unknown test_sampling {sampling!r}: use last, random or stratified")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    # largest-remainder apportionment of k test rows over the classes
    quotas = {c: k * len(ix) / n for c, ix in by_class.items()}
    take = {c: int(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (quotas[c] - take[c], c), reverse=True)[: k - sum(take.values())]:
        take[c] += 1
    for c, ix in by_class.items():  # every class with ≥ 2 rows is seen in both sets
        if len(ix) >= 2:
            take[c] = min(max(take[c], 1), len(ix) - 1)
    test: list[int] = []
    for c in sorted(by_class):
        ix = by_class[c][:]
        rng.shuffle(ix)
        test.extend(ix[: take[c]])
    test_set = set(test)
    return [i for i in order if i not in test_set], sorted(test_set)
