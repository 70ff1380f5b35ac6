"""Registration: <dataset>_<split> names resolve from USDET_DATASETS and load via DatasetCatalog."""
import json
import os
import shutil

from detectron2.data import DatasetCatalog, MetadataCatalog

from usdet.data.register import register_all_usdet_datasets, register_usdet_dataset


def test_busi_style_names_resolve(tmp_path, phantom_dataset, monkeypatch):
    shutil.copytree(phantom_dataset, tmp_path / "busi")
    monkeypatch.setenv("USDET_DATASETS", str(tmp_path))
    names = register_all_usdet_datasets()
    assert names == ["busi_test", "busi_train", "busi_val"]
    recs = DatasetCatalog.get("busi_train")
    doc = json.load(open(tmp_path / "busi/annotations/train.json"))
    assert len(recs) == len(doc["images"])
    assert recs[0]["file_name"] == os.path.join(str(tmp_path / "busi"), doc["images"][0]["file_name"])
    meta = MetadataCatalog.get("busi_train")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["benign", "malignant"]
    assert meta.json_file == str(tmp_path / "busi/annotations/train.json")
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    # re-registration (e.g. after a re-conversion with other classes) is harmless and takes effect
    doc["categories"] = [{"id": 1, "name": "lesion"}]
    for a in doc["annotations"]:
        a["category_id"] = 1
    (tmp_path / "busi/annotations/train.json").write_text(json.dumps(doc))
    assert "busi_train" in register_all_usdet_datasets()
    assert MetadataCatalog.get("busi_train").thing_classes == ["lesion"]
    assert len(DatasetCatalog.get("busi_train")) == len(doc["images"])


def test_missing_root_and_single_registration(tmp_path, phantom_dataset):
    assert register_all_usdet_datasets(str(tmp_path / "nope")) == []
    register_usdet_dataset("usdet_one_test", os.path.join(phantom_dataset, "annotations/val.json"), phantom_dataset)
    register_usdet_dataset("usdet_one_test", os.path.join(phantom_dataset, "annotations/val.json"), phantom_dataset)
    assert len(DatasetCatalog.get("usdet_one_test")) > 0
