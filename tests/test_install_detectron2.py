"""The one place that patches detectron2 v0.6 for today's numpy/Pillow/setuptools (install time)."""
import importlib.metadata
import importlib.util
import inspect
import os
import sys

import pytest
from train_helpers import REPO

spec = importlib.util.spec_from_file_location("install_detectron2", os.path.join(REPO, "tools", "install_detectron2.py"))
inst = importlib.util.module_from_spec(spec)
sys.modules["install_detectron2"] = inst
spec.loader.exec_module(inst)


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path


def test_patch_rewrites_removed_aliases_but_not_sized_types(tmp_path):
    root = str(tmp_path)
    f = _write(root, "detectron2/x.py", "a = np.int\nb = np.int32\nc = x.astype(np.bool)\nd = np.float\ne = np.float64\n")
    patches = [p for p in inst.PATCHES if p.pattern == "detectron2/**/*.py" and p.replacement != "str"]
    patches = [inst.Patch(p.pattern, p.regex, p.replacement, 1, p.why) for p in patches]
    inst.apply_patches(root, patches)
    assert open(f).read() == "a = int\nb = np.int32\nc = x.astype(bool)\nd = float\ne = np.float64\n"
    stub = open(os.path.join(root, "detectron2", "_C.py")).read()
    assert "def __getattr__" in stub


def test_patch_fails_loudly_on_unexpected_source(tmp_path):
    _write(str(tmp_path), "detectron2/x.py", "nothing to patch here\n")
    p = inst.Patch("detectron2/**/*.py", r"\bnp\.int\b(?!\w)", "int", 1, "np.int removed")
    with pytest.raises(RuntimeError, match="matched 0 place"):
        inst.apply_patches(str(tmp_path), [p])


def _is_patched_pb1():
    try:
        importlib.metadata.distribution("pb1-detectron2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _is_patched_pb1(), reason="detectron2 here is not the pb1-detectron2 sdist build "
                    "(an upstream build is in use), so usdet's install-time patches were not applied")
def test_installed_detectron2_works_with_current_stack():
    from PIL import Image

    from detectron2 import model_zoo
    from detectron2.data.transforms.transform import ExtentTransform

    assert inspect.signature(ExtentTransform.__init__).parameters["interp"].default == Image.BILINEAR
    cfg_file = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    assert os.path.isfile(cfg_file) and cfg_file.endswith(".yaml")
    import detectron2._C as C

    with pytest.raises(ImportError, match="compiled extension"):
        C.nms_rotated  # noqa: B018
    from detectron2.utils.collect_env import collect_env_info

    assert "without its compiled extension" in collect_env_info()
    import numpy as np

    from detectron2.structures.masks import polygons_to_bitmask

    m = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=np.float64)], 6, 6)
    assert m.dtype == bool and m.sum() > 0
