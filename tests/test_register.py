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


def test_registration_is_lazy_import_usdet_data_registers_nothing(tmp_path, phantom_dataset):
    """`import usdet.data` reads no dataset JSON (a broken one would be logged) and loads no detectron2;
    importing the engine (what a trainer does) registers <dataset>_<split>; missing splits are simply absent."""
    import subprocess
    import sys

    from train_helpers import REPO

    shutil.copytree(phantom_dataset, tmp_path / "ph")
    os.remove(tmp_path / "ph/annotations/val.json")  # e.g. converted with --split 0.8,0,0.2
    code = """
import sys, builtins
opened = []
real_open = builtins.open
def spy(file, *a, **k):
    opened.append(str(file))
    return real_open(file, *a, **k)
builtins.open = spy
import usdet.data, usdet.data.register
assert not [f for f in opened if f.endswith(".json")], opened
assert "detectron2" not in sys.modules and "torch" not in sys.modules
builtins.open = real_open
import usdet.engine
from detectron2.data import DatasetCatalog
print(sorted(n for n in DatasetCatalog.list() if n.startswith("ph_")))
"""
    env = dict(os.environ, USDET_DATASETS=str(tmp_path), PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['ph_test', 'ph_train']"
