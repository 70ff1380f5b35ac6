"""group_stratified_split: groups stay whole, labels are balanced, the result is deterministic."""
from collections import Counter

import pytest

from usdet.data.split import group_stratified_split, parse_fractions


def _toy(n=200):
    keys = [f"img{i:03d}" for i in range(n)]
    groups = [f"g{i // 4}" if i < 80 else f"g{i}" for i in range(n)]  # 20 groups of 4, then singletons
    labels = ["benign" if i % 3 else "malignant" for i in range(n)]
    return keys, groups, labels


def test_groups_never_straddle_splits():
    keys, groups, labels = _toy()
    split = group_stratified_split(keys, groups, labels, seed=3)
    by_group = {}
    for k, g in zip(keys, groups):
        by_group.setdefault(g, set()).add(split[k])
    assert all(len(s) == 1 for s in by_group.values())
    assert set(split) == set(keys)


def test_stratified_fractions_per_label():
    keys, groups, labels = _toy()
    split = group_stratified_split(keys, groups, labels, fractions=(0.7, 0.15, 0.15), seed=0)
    per = Counter((lab, split[k]) for k, lab in zip(keys, labels))
    for lab in ("benign", "malignant"):
        n = sum(v for (l2, _), v in per.items() if l2 == lab)
        for s, f in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(per[(lab, s)] - f * n) <= 4, (lab, s, per[(lab, s)], f * n)


def test_deterministic_and_order_independent_but_seed_sensitive():
    keys, groups, labels = _toy()
    a = group_stratified_split(keys, groups, labels, seed=5)
    rev = group_stratified_split(keys[::-1], groups[::-1], labels[::-1], seed=5)
    assert a == rev
    b = group_stratified_split(keys, groups, labels, seed=6)
    assert a != b


def test_zero_fraction_split_stays_empty():
    keys, groups, labels = _toy(50)
    split = group_stratified_split(keys, groups, labels, fractions=(0.8, 0.2, 0.0))
    assert Counter(split.values())["test"] == 0
    assert Counter(split.values())["val"] > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="duplicate keys"):
        group_stratified_split(["a", "a"], ["g", "h"], ["x", "x"])
    with pytest.raises(ValueError, match="differ in length"):
        group_stratified_split(["a"], ["g", "h"], ["x"])
    with pytest.raises(ValueError, match="three fractions"):
        parse_fractions("0.5,0.5")
    assert parse_fractions("7,1.5,1.5") == pytest.approx((0.7, 0.15, 0.15))


def test_multi_member_groups_spread_over_splits():
    """Large groups must not all go to train (that would leave val/test without any sequence)."""
    keys, groups, labels = _toy()
    split = group_stratified_split(keys, groups, labels, seed=0)
    big = {split[k] for k, g in zip(keys, groups) if int(g[1:]) < 20}
    assert big == {"train", "val", "test"}


def test_kfold_split_tests_every_key_once_and_keeps_groups_whole():
    from usdet.data.split import kfold_split

    keys = [f"k{i}" for i in range(60)]
    groups = [f"g{i // 3}" for i in range(60)]
    labels = ["benign" if i % 4 else "malignant" for i in range(60)]
    tested = []
    for fold in range(5):
        split = kfold_split(keys, groups, labels, folds=5, fold=fold, val_fraction=0.2, seed=3)
        assert set(split) == set(keys)
        by_group = {}
        for key, group in zip(keys, groups):
            by_group.setdefault(group, set()).add(split[key])
        assert all(len(s) == 1 for s in by_group.values())
        test = [k for k in keys if split[k] == "test"]
        assert 9 <= len(test) <= 15
        assert any(split[k] == "val" for k in keys) and any(split[k] == "train" for k in keys)
        tested += test
    assert sorted(tested) == sorted(keys)


def test_kfold_split_refuses_a_fold_out_of_range():
    import pytest
    from usdet.data.split import kfold_split

    with pytest.raises(ValueError, match="--fold must be in 0..2"):
        kfold_split(["a", "b", "c"], ["a", "b", "c"], ["x"] * 3, folds=3, fold=3)
