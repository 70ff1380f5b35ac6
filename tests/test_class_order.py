"""Test datasets must have the model's class names in the model's order, not only as many classes:
class ids are positions, so the same names in another order permute class-aware AP."""
import json
import os

import pytest

from train_helpers import QUICK_CFG, make_datasets_root


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """``ph2`` (benign, malignant) registered, plus ``ph2swap_val``: ph2's val set whose category
    ids list malignant first (each box keeps its own label)."""
    from usdet.data.register import register_usdet_dataset

    root = make_datasets_root(str(tmp_path_factory.mktemp("order")))
    ph2 = os.path.join(root, "ph2")
    doc = json.load(open(os.path.join(ph2, "annotations", "val.json")))
    assert [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])] == ["benign", "malignant"]
    doc["categories"] = [{"id": 1, "name": "malignant"}, {"id": 2, "name": "benign"}]
    for a in doc["annotations"]:
        a["category_id"] = 3 - a["category_id"]
    path = os.path.join(root, "swapped_val.json")
    json.dump(doc, open(path, "w"))
    register_usdet_dataset("ph2swap_val", path, ph2)
    return root


def _cfg(train, test):
    from usdet.engine import build_config

    return build_config(QUICK_CFG, ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "DATASETS.TRAIN", repr(tuple(train)),
                                    "DATASETS.TEST", repr(tuple(test))])


def test_test_dataset_with_the_classes_in_another_order_is_refused(swapped):
    from usdet.engine import check_datasets

    check_datasets(_cfg(["ph2_train"], ["ph2_val", "ph2_test"]))  # same names, same order: fine
    with pytest.raises(ValueError, match=r"dataset ph2swap_val has classes \['malignant', 'benign'\] but ph2_train "
                                         r"\(whose class order the model uses\) has \['benign', 'malignant'\].*swap"):
        check_datasets(_cfg(["ph2_train"], ["ph2_val", "ph2swap_val"]))
    # --eval-only: the config's training dataset sets the order where it is registered ...
    with pytest.raises(ValueError, match=r"ph2swap_val has classes .* but ph2_train"):
        check_datasets(_cfg(["ph2_train"], ["ph2swap_val"]), eval_only=True)
    # ... else the first test dataset does
    with pytest.raises(ValueError, match=r"ph2swap_val has classes .* but ph2_val"):
        check_datasets(_cfg(["nowhere_train"], ["ph2_val", "ph2swap_val"]), eval_only=True)
    check_datasets(_cfg(["nowhere_train"], ["ph2swap_val"]), eval_only=True)  # one order throughout: fine
