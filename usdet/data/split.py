"""Group-aware, label-stratified train/val/test split.

Ultrasound sets hold many near-duplicate frames (adjacent frames of one sweep, re-saved crops);
splitting by file leaks them across train and test. Whole groups are assigned to one split, and
the assignment balances every label's image count against the requested fractions.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Dict, List, Sequence, Tuple

SPLITS: Tuple[str, str, str] = ("train", "val", "test")


def parse_fractions(text: str) -> Tuple[float, float, float]:
    """Parse ``"0.7,0.15,0.15"`` into three non-negative fractions that sum to 1."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--split {text!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(parts) != 3:
        raise ValueError(f"--split {text!r}: expected three fractions (train,val,test), got {len(parts)}")
    return _normalize(parts)


def _normalize(fractions: Sequence[float]) -> Tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 or f != f for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers with a positive sum, "
                         f"got {list(fractions)}")
    total = float(sum(fractions))
    return tuple(float(f) / total for f in fractions)  # type: ignore[return-value]


def group_stratified_split(
    keys: List[str],
    groups: List[str],
    labels: List[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Dict[str, str]:
    """Map each key to ``"train"``/``"val"``/``"test"``; members of a group never straddle splits.

    Each group is filed under its majority label (ties: alphabetical) and, within that label,
    groups go largest first (seeded shuffle among equal sizes) to the split whose image count is
    furthest below its target. The result depends only on the inputs and ``seed``, not on their order.
    """
    if not (len(keys) == len(groups) == len(labels)):
        raise ValueError(f"keys, groups and labels differ in length ({len(keys)}, {len(groups)}, {len(labels)})")
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise ValueError(f"duplicate keys: {dup}")
    fracs = _normalize(fractions)

    members: Dict[str, List[str]] = defaultdict(list)
    group_labels: Dict[str, Counter] = defaultdict(Counter)
    for key, group, label in zip(keys, groups, labels):
        members[group].append(key)
        group_labels[group][label] += 1

    by_label: Dict[str, List[str]] = defaultdict(list)
    for group in sorted(members):
        counts = group_labels[group]
        top = max(counts.values())
        majority = sorted(lbl for lbl, n in counts.items() if n == top)[0]
        by_label[majority].append(group)

    rng = random.Random(seed)
    assignment: Dict[str, str] = {}
    for label in sorted(by_label):
        label_groups = by_label[label]  # sorted, so the shuffle is input-order independent
        rng.shuffle(label_groups)
        label_groups.sort(key=lambda g: -len(members[g]))  # stable: shuffled order breaks ties
        total = sum(len(members[g]) for g in label_groups)
        filled = [0, 0, 0]
        for group in label_groups:
            deficits = [fracs[i] * total - filled[i] if fracs[i] > 0 else float("-inf") for i in range(3)]
            best = max(range(3), key=lambda i: (deficits[i], -i))
            filled[best] += len(members[group])
            for key in members[group]:
                assignment[key] = SPLITS[best]
    return assignment
