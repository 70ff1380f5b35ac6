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

    Groups are taken in a seeded random order (not largest first, which would send every
    multi-frame group to train) and each goes to the split that is, for the group's labels,
    the least filled relative to its target; so every label's counts track the fractions
    (off by at most about one group's size) and near-duplicate groups spread over all splits.
    The result depends only on the inputs and ``seed``, not on their order.
    """
    parts = assign_groups(keys, groups, labels, _normalize(fractions), seed)
    return {key: SPLITS[part] for key, part in parts.items()}


def kfold_split(
    keys: List[str],
    groups: List[str],
    labels: List[str],
    folds: int,
    fold: int,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> Dict[str, str]:
    """K-fold cross-validation split: fold ``fold`` (0-based) is ``test``, the rest train/val.

    Groups are dealt into ``folds`` label-balanced folds by the same rule as
    :func:`group_stratified_split` (so every key is ``test`` in exactly one fold and no group
    straddles); the remaining folds are then split into train/val (``val_fraction`` of them),
    again by group. The fold assignment depends on ``seed`` only, never on ``fold``.
    """
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"--fold must be in 0..{folds - 1}, got {fold}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    parts = assign_groups(keys, groups, labels, [1.0 / folds] * folds, seed)
    rest = [i for i, key in enumerate(keys) if parts[key] != fold]
    out = {key: "test" for key in keys if parts[key] == fold}
    out.update(train_val_split([keys[i] for i in rest], [groups[i] for i in rest], [labels[i] for i in rest],
                               val_fraction, seed))
    return out


def train_val_split(
    keys: List[str],
    groups: List[str],
    labels: List[str],
    val_fraction: float,
    seed: int = 0,
) -> Dict[str, str]:
    """Train/val of the images left once the test images are set aside (a k-fold test fold, a
    published test fold): whole groups, label-balanced, ``val_fraction`` of them to ``"val"``.

    The one rule for this inner split: it is drawn with ``seed + 1``, so that its shuffle is not
    the one that dealt the test images out (with the same seed both start from the same random
    stream). Every converter and the cross-validation split the same way.
    """
    if not keys:
        return {}
    parts = assign_groups(keys, groups, labels, [1.0 - val_fraction, val_fraction], seed + 1)
    return {key: ("train", "val")[part] for key, part in parts.items()}


def split_by_group(
    keys: List[str],
    groups: List[str],
    labels: List[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    folds: int = 0,
    fold: int = 0,
    val_fraction: float = 0.15,
) -> Tuple[Dict[str, str], List[str], Dict[str, object]]:
    """What every converter calls: ``(split of each key, splits to write, what report.json says)``.

    ``folds`` > 0 is :func:`kfold_split` (fold ``fold`` is test); else the fractions, and a split
    whose fraction is zero is not written at all (``0,0,1`` = an external test set).
    """
    if folds:
        split_of = kfold_split(keys, groups, labels, folds, fold, val_fraction, seed)
        info: Dict[str, object] = {
            "method": "kfold", "folds": folds, "fold": fold, "val_fraction": val_fraction, "seed": seed,
            "groups": len(set(groups)),
            "note": "fold k is the test split; the same --seed and --folds give the same K folds, so every image "
                    "is tested exactly once over --fold 0..K-1 and no group straddles"}
        return split_of, [s for s in SPLITS if s != "val" or val_fraction > 0], info
    fractions = _normalize(fractions)
    split_of = group_stratified_split(keys, groups, labels, fractions, seed) if keys else {}
    info = {"method": "fractions", "fractions": [round(f, 6) for f in fractions], "seed": seed}
    return split_of, [s for s, f in zip(SPLITS, fractions) if f > 0], info


def assign_groups(
    keys: List[str],
    groups: List[str],
    labels: List[str],
    fractions: Sequence[float],
    seed: int = 0,
) -> Dict[str, int]:
    """Map each key to a part index ``0..len(fractions)-1``, whole groups at a time, label-balanced."""
    if not (len(keys) == len(groups) == len(labels)):
        raise ValueError(f"keys, groups and labels differ in length ({len(keys)}, {len(groups)}, {len(labels)})")
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise ValueError(f"duplicate keys: {dup}")
    total_frac = float(sum(fractions))
    fracs = [float(f) / total_frac for f in fractions]
    nparts = len(fracs)

    members: Dict[str, List[str]] = defaultdict(list)
    group_labels: Dict[str, Counter] = defaultdict(Counter)
    for key, group, label in zip(keys, groups, labels):
        members[group].append(key)
        group_labels[group][label] += 1
    label_names = sorted(set(labels))
    totals = Counter(labels)
    target = {lbl: [f * totals[lbl] for f in fracs] for lbl in label_names}
    filled = {lbl: [0] * nparts for lbl in label_names}

    rng = random.Random(seed)
    order = sorted(members)  # sorted first, so the shuffle is input-order independent
    rng.shuffle(order)
    candidates = [i for i in range(nparts) if fracs[i] > 0]

    def fill_level(group: str, part: int) -> float:
        """Image-weighted relative fill of ``part`` for this group's labels (-1 empty, 0 on target)."""
        level = 0.0
        for lbl, n in group_labels[group].items():
            level += n * (filled[lbl][part] - target[lbl][part]) / target[lbl][part]
        return level

    assignment: Dict[str, int] = {}
    for group in order:
        tie_break = {i: rng.random() for i in candidates}
        best = min(candidates, key=lambda i: (round(fill_level(group, i), 9), tie_break[i]))
        for lbl, n in group_labels[group].items():
            filled[lbl][best] += n
        for key in members[group]:
            assignment[key] = best
    return assignment
