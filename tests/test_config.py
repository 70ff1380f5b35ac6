"""usdet config: every shipped YAML loads, normalization is one explicit choice, clear errors."""
import glob
import json
import os
import subprocess
import sys

import pytest

from train_helpers import QUICK_CFG, REPO, TRAIN_NET, make_datasets_root, tail, train_net_env, write_pixel_stats

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


@pytest.fixture
def stats_file(tmp_path):
    return write_pixel_stats(tmp_path / "pixel_stats.json", [10.0, 20.0, 30.0], [1.0, 2.0, 3.0])


def test_usdet_keys_and_defaults():
    from detectron2.config import get_cfg

    from usdet.config import add_usdet_config

    cfg = get_cfg()
    add_usdet_config(cfg)
    assert cfg.SOLVER.BEST_CHECKPOINT.METRIC == "piou/score" and cfg.SOLVER.BEST_CHECKPOINT.MODE == "max"
    assert (cfg.TEST.PIOU.SCORE_THRESH, cfg.TEST.PIOU.IOU_THRESH, cfg.TEST.PIOU.TOPK) == (0.45, 0.0, 1)
    assert cfg.TEST.VAL_LOSS_PERIOD == 0 and cfg.INPUT.NORMALIZATION == "imagenet"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_every_config_loads_and_keeps_negatives(path, stats_file):
    from usdet.engine import build_config

    # one statistics file per training dataset (a mixed config needs one per source)
    n_train = max(len(build_config(path, ["INPUT.NORMALIZATION", "imagenet"]).DATASETS.TRAIN), 1)
    cfg = build_config(path, ["INPUT.NORMALIZATION_FILE", ",".join([stats_file] * n_train)])
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False  # lesion-free frames train
    assert cfg.SEED >= 0  # a fixed seed makes the resumed data order the uninterrupted one
    assert cfg.INPUT.NORMALIZATION_RESOLVED
    if not cfg.MODEL.WEIGHTS and not os.path.basename(path).startswith("Base-"):
        # from scratch: FrozenBN diverges, and frozen random layers never learn
        assert cfg.MODEL.RESNETS.NORM in ("BN", "GN", "SyncBN") and cfg.MODEL.BACKBONE.FREEZE_AT == 0


def test_recipe_roles():
    from usdet.engine import build_config

    stage1 = build_config(os.path.join(REPO, "configs", "BUSI", "faster_rcnn_R_50_FPN.yaml"))
    assert stage1.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/")
    assert stage1.INPUT.NORMALIZATION == "config" and list(stage1.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    stage2 = build_config(os.path.join(REPO, "configs", "finetune", "faster_rcnn_R_50_FPN_from_busi.yaml"))
    assert stage2.MODEL.WEIGHTS.endswith("model_best.pth")
    assert stage2.DATASETS.TRAIN == ("hospital_train",) and stage2.DATASETS.TEST == ("hospital_val",)
    assert list(stage2.MODEL.PIXEL_MEAN) == list(stage1.MODEL.PIXEL_MEAN)  # stage 1's normalization


def test_normalization_dataset_imagenet_config(stats_file, tmp_path):
    from usdet.engine import build_config

    bgr = build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset", "INPUT.NORMALIZATION_FILE", stats_file])
    assert list(bgr.MODEL.PIXEL_MEAN) == [30.0, 20.0, 10.0] and list(bgr.MODEL.PIXEL_STD) == [3.0, 2.0, 1.0]
    rgb = build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset", "INPUT.NORMALIZATION_FILE", stats_file,
                                   "INPUT.FORMAT", "RGB"])
    assert list(rgb.MODEL.PIXEL_MEAN) == [10.0, 20.0, 30.0]
    imnet = build_config(QUICK_CFG, ["INPUT.FORMAT", "RGB"])
    assert list(imnet.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(imnet.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    as_written = build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "config", "MODEL.PIXEL_MEAN", "[1.0, 2.0, 3.0]"])
    assert list(as_written.MODEL.PIXEL_MEAN) == [1.0, 2.0, 3.0]

    # Applied once: a resolved config (e.g. a run's saved config.yaml) no longer needs the file.
    saved = tmp_path / "config.yaml"
    saved.write_text(bgr.dump())
    os.unlink(stats_file)
    again = build_config(str(saved))
    assert list(again.MODEL.PIXEL_MEAN) == [30.0, 20.0, 10.0]


def test_normalization_errors_name_the_file(tmp_path):
    from usdet.engine import build_config

    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset", "INPUT.NORMALIZATION_FILE", missing])
    scaled = tmp_path / "scaled.json"
    scaled.write_text(json.dumps({"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}))
    with pytest.raises(ValueError, match="scaled.json.*0-1 scaled"):
        build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset", "INPUT.NORMALIZATION_FILE", str(scaled)])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset", "INPUT.NORMALIZATION_FILE", str(broken)])
    with pytest.raises(ValueError, match="NORMALIZATION_FILE"):
        build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "dataset"])
    with pytest.raises(ValueError, match="must be one of"):
        build_config(QUICK_CFG, ["INPUT.NORMALIZATION", "imagenet2"])


def test_unknown_key_and_bad_override_name_their_source(tmp_path):
    from usdet.engine import build_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{QUICK_CFG}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(ValueError, match=r"bad.yaml.*SOLVER.BASE_LRR"):
        build_config(str(bad))
    with pytest.raises(ValueError, match="command-line overrides.*SOLVER.NOPE"):
        build_config(QUICK_CFG, ["SOLVER.NOPE", "1"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_config(str(tmp_path / "missing.yaml"))


def test_check_datasets_unregistered_and_class_count(tmp_path):
    from usdet.engine import build_config, check_datasets

    make_datasets_root(str(tmp_path / "ds"))
    cfg = build_config(QUICK_CFG, ["DATASETS.TRAIN", "('nowhere_train',)", "DATASETS.TEST", "('ph1_val',)"])
    with pytest.raises(KeyError, match="nowhere_train.*not registered.*USDET_DATASETS"):
        check_datasets(cfg)
    check_datasets(cfg, eval_only=True)  # eval-only needs only the test set
    cfg = build_config(QUICK_CFG, ["DATASETS.TRAIN", "('ph2_train',)", "DATASETS.TEST", "('ph2_val',)"])
    with pytest.raises(ValueError, match=r"ph2_train has 2 class\(es\).*NUM_CLASSES 2"):
        check_datasets(cfg)


def test_cuda_less_machine_falls_back_to_cpu():
    import torch

    from usdet.engine import build_config

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert build_config(QUICK_CFG, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cpu"


def test_train_net_config_error_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{QUICK_CFG}"\nINPUT:\n  NORMALISATION: "dataset"\n')
    r = subprocess.run([sys.executable, TRAIN_NET, "--config-file", str(bad)], env=train_net_env(str(tmp_path)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, tail(r.stderr)
    assert "usdet train_net: error:" in r.stderr and "bad.yaml" in r.stderr and "INPUT.NORMALISATION" in r.stderr
    assert "Traceback" not in r.stderr
