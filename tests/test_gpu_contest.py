"""The GPU contest (issue 21 item 3): the GPU recipe is the light CPU family at GPU size, and
benchmarks/gpu_busi.sh runs it through benchmarks/contest.py (tested on CPU at a tiny budget)."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from train_helpers import REPO, link_busi_subset, load_benchmark, phantom_batches, tail, write_pixel_stats

GPU_CFG = os.path.join(REPO, "configs", "BUSI", "recipe_scratch_gpu.yaml")
LITE_CPU_CFG = os.path.join(REPO, "configs", "BUSI", "recipe_lite_cpu.yaml")
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_busi.sh")


@pytest.fixture
def stats_file(tmp_path):
    return write_pixel_stats(tmp_path / "pixel_stats.json", [60.0] * 3, [40.0] * 3)


def test_gpu_recipe_is_the_light_cpu_family_at_gpu_size(stats_file):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from usdet.engine import build_config

    opts = ["INPUT.NORMALIZATION_FILE", stats_file, "MODEL.DEVICE", "cpu"]
    gpu, cpu = build_config(GPU_CFG, opts), build_config(LITE_CPU_CFG, opts)
    # the same detector, input and augmentation, checkpoint rule and test-time caps as the CPU recipe
    gpu_test = gpu.TEST.clone()
    gpu_test.EVAL_PERIOD = cpu.TEST.EVAL_PERIOD  # the contest fits it to the budget on both
    assert gpu.MODEL == cpu.MODEL and gpu.INPUT == cpu.INPUT and gpu_test == cpu.TEST
    assert gpu.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone" and gpu.MODEL.FPN.OUT_CHANNELS == 128
    assert gpu.MODEL.RPN.IN_FEATURES == ["p3", "p4", "p5", "p6"] and gpu.MODEL.ROI_BOX_HEAD.FC_DIM == 256
    assert gpu.INPUT.AUG.COPY_PASTE.ENABLED and gpu.SOLVER.BEST_CHECKPOINT.METRIC == "bbox/AP"
    assert (gpu.TEST.DETECTIONS_PER_IMAGE, gpu.MODEL.ROI_HEADS.SCORE_THRESH_TEST) == (100, 0.001)
    # sized for one GPU: a 4x batch with a sqrt-scaled LR, AMP, more loader workers
    assert (gpu.SOLVER.IMS_PER_BATCH, cpu.SOLVER.IMS_PER_BATCH) == (16, 4)
    assert gpu.SOLVER.BASE_LR == pytest.approx(cpu.SOLVER.BASE_LR * 2)
    assert gpu.SOLVER.AMP.ENABLED and not cpu.SOLVER.AMP.ENABLED and gpu.DATALOADER.NUM_WORKERS == 12
    assert gpu.SOLVER.CLIP_GRADIENTS.ENABLED

    # it builds, and one training step runs forward and backward (on CPU here)
    torch.manual_seed(0)
    model = build_model(gpu)
    assert model.backbone.bottom_up.stem.conv1.out_channels == 32  # usdet's half-width R18
    assert sorted(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6"]
    model.train()
    with EventStorage(0):
        losses = model(next(phantom_batches(0, 128, batch_size=2)))
        total = sum(losses.values())
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} and torch.isfinite(total)
        total.backward()
    assert float(model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum()) > 0


def test_contest_gives_usdet_the_device_workers_and_overrides(tmp_path):
    import argparse

    c = load_benchmark("contest")
    args = argparse.Namespace(device="cuda", workers=12, dataset_root=str(tmp_path), opts=["SOLVER.BASE_LR", "0.01"])
    assert c.usdet_overrides(args) == ["MODEL.DEVICE", "cuda", "DATALOADER.NUM_WORKERS", "12", "SOLVER.BASE_LR", "0.01"]
    (tmp_path / "pixel_stats.json").write_text("{}")  # the dataset's own statistics, when it has them
    assert c.usdet_overrides(argparse.Namespace(device="cpu", workers=None, dataset_root=str(tmp_path), opts=[])) == [
        "MODEL.DEVICE", "cpu", "INPUT.NORMALIZATION_FILE", str(tmp_path / "pixel_stats.json")]
    with pytest.raises(SystemExit, match="KEY VALUE pairs"):
        c.usdet_overrides(argparse.Namespace(device="cpu", workers=None, dataset_root=str(tmp_path),
                                             opts=["SOLVER.BASE_LR"]))
    assert [c.peer_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "0", "1"]


def test_offline_peer_venv_without_an_ultralytics_wheel_is_refused(tmp_path):
    peer = load_benchmark("peer_yolo")
    wheels = tmp_path / "peer_whl"
    wheels.mkdir()
    with pytest.raises(SystemExit, match=r"peer_whl: no ultralytics wheel.*prepare_gpu_carry"):
        peer.peer_python(str(tmp_path / "venv"), wheels=str(wheels))
    assert not (tmp_path / "venv" / ".peer-ready").exists()
    assert any(w.startswith("ultralytics==") for w in peer.OFFLINE_WHEELS)


def test_gpu_script_smoke_run_trains_the_gpu_recipe_on_cpu(busi_root, tmp_path):
    """The script's --smoke path end to end: converts nothing, trains the GPU recipe for 6 iterations on
    8 images of a converted BUSI subset, scores it on test, copies the results to $OUT. The peer is
    off here (PEER=off: its venv is a PyPI install the test does not make); the script records why."""
    from usdet.data.busi import ConvertOptions, convert_busi

    subset = link_busi_subset(busi_root, tmp_path / "raw")
    # a dataset name other than busi: the contest must train usdet on --dataset-root, not on busi_*
    data = tmp_path / "datasets" / "busisub"
    convert_busi(str(subset), str(data), ConvertOptions(max_size=160, image_format="jpg", progress=False))
    work, results, out = tmp_path / "work", tmp_path / "results", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PY=sys.executable, DATASET_ROOT=str(data), WORK_DIR=str(work), RESULTS=str(results),
               OUT=str(out), PEER="off", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", SCRIPT, "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, tail(r.stdout + r.stderr)
    assert "peer skipped: PEER=off" in r.stdout

    res = json.loads((results / "gpu_contest_smoke.json").read_text())
    u = res["usdet"]
    assert u["config"] == "configs/BUSI/recipe_scratch_gpu.yaml" and u["device"] == "cpu" and not u["amp"]
    assert u["schedule"]["max_iter"] == 6 and u["iterations_done"] >= 6 and u["loader_workers"] == 0
    assert os.path.isfile(os.path.join(REPO, u["chosen"]["weights"]))
    assert res["yolo"] == {"skipped": "PEER=off: usdet alone by request"} and "usdet_minus_yolo" not in res
    assert set(res["test"]) == {"usdet"} and isinstance(res["test"]["usdet"]["AP50"], float)
    preds = json.loads((results / "gpu_contest_smoke" / "usdet_test.json").read_text())
    gt = json.loads((work / "datasets" / "busisub" / "annotations" / "test.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= {im["id"] for im in gt["images"]}

    # what it trained is the GPU recipe's model on the given dataset (smoke: tiny input, batch 2, no AMP)
    from detectron2.config import CfgNode

    with open(work / "usdet_train" / "config.yaml") as fh:
        ran = CfgNode.load_cfg(fh)
    assert list(ran.DATASETS.TRAIN) == ["busisub_train"] and list(ran.DATASETS.TEST) == ["busisub_val"]
    assert ran.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone" and ran.MODEL.FPN.OUT_CHANNELS == 128
    assert ran.SOLVER.IMS_PER_BATCH == 2 and not ran.SOLVER.AMP.ENABLED and ran.SOLVER.MAX_ITER == 6

    # what would come back from a device machine: the summary, both prediction files, the logs
    names = sorted(os.listdir(out))
    assert names == ["gpu_contest_smoke.json", "gpu_contest_smoke_logs.tgz", "gpu_contest_smoke_usdet_test.json",
                     "gpu_contest_smoke_usdet_val.json"], names
    with tarfile.open(out / "gpu_contest_smoke_logs.tgz") as tf:
        assert "./usdet_train.log" in tf.getnames() and "./contest.log" in tf.getnames()
