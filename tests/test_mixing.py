"""Training on several sources: weights honoured, exact resume, classes reconciled by name or refused,
and normalization statistics of the weighted mix."""
import collections
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from train_helpers import REPO, make_datasets_root, quick_cfg, tail, train_net_cmd, train_net_env


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return make_datasets_root(str(tmp_path_factory.mktemp("mix_datasets")))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_weighted_sampler_honours_weights_and_resumes_exactly():
    from usdet.data.loader import ResumableBatchSampler

    sources = [0] * 40 + [1] * 6  # a large and a small source
    sizes = [(120, 90) if i % 4 else (90, 120) for i in range(len(sources))]
    kw = dict(sources=sources, source_weights=[0.3, 0.7], rank=0, world_size=1)
    batches = _take(iter(ResumableBatchSampler(sizes, 4, seed=3, **kw)), 1000)
    drawn = [i for b in batches for _, i in b]
    share = collections.Counter(sources[i] for i in drawn)
    assert share[1] / len(drawn) == pytest.approx(0.7, abs=0.02)  # not 6/46 = 0.13 as concatenation gives
    # within a source, its own permutations: every image of the small source equally often (up to
    # the few items the aspect-ratio buckets hold back)
    small = collections.Counter(i for i in drawn if sources[i] == 1)
    assert sorted(small) == list(range(40, 46)) and max(small.values()) - min(small.values()) <= 4
    positions = sorted(p for b in batches for p, _ in b)
    assert len(set(positions)) == len(positions)
    # exact resume at any iteration, and the weights are part of the stream (another seed differs)
    for k in (1, 17, 600):
        resumed = ResumableBatchSampler(sizes, 4, seed=3, **kw)
        resumed.start_batch = k
        assert _take(iter(resumed), 20) == batches[k:k + 20]
    assert _take(iter(ResumableBatchSampler(sizes, 4, seed=4, **kw)), 5) != batches[:5]
    # ranks split the weighted stream disjointly; together they are the 1-process stream
    flat = ResumableBatchSampler(sizes, 4, seed=3, aspect_ratio_grouping=False, **kw)
    one = [x for b in _take(iter(flat), 50) for x in b]
    two = [x for r in range(2) for b in _take(iter(ResumableBatchSampler(
        sizes, 2, seed=3, aspect_ratio_grouping=False, sources=sources, source_weights=[0.3, 0.7], rank=r,
        world_size=2)), 50) for x in b]
    assert sorted(two) == sorted(one)


def _batch_files(trainer, n):
    it = iter(trainer._trainer.data_loader)
    return [[(d["file_name"], float(d["image"].float().mean())) for d in next(it)] for _ in range(n)]


def test_mixed_training_set_reconciles_classes_and_resumes_data_order(datasets_root, tmp_path):
    from usdet.engine import Trainer

    # ph1 has class 'lesion', ph2 'benign,malignant': into a one-class lesion model every ph2 box is a lesion
    opts = ["DATASETS.TRAIN", "('ph1_train', 'ph2_train')", "DATASETS.TRAIN_WEIGHTS", "(1.0, 3.0)"]
    out = tmp_path / "mix"
    trainer = Trainer(quick_cfg(str(out), *opts))
    loader = trainer._trainer.data_loader
    dataset = loader.dataset._dataset
    ph2 = [dataset[i] for i in range(len(dataset)) if "ph2" in dataset[i]["file_name"]]
    assert ph2 and {a["category_id"] for d in ph2 for a in d["annotations"]} == {0}
    raw_ph2 = json.load(open(os.path.join(datasets_root, "ph2", "annotations", "train.json")))
    assert {a["category_id"] for a in raw_ph2["annotations"]} == {1, 2}  # really two classes on disk
    batches = _batch_files(trainer, 12)
    assert len({f for b in batches for f, _ in b}) > 1
    # weights 1:3: three samples in four from ph2. 4000 draws of the trainer's own sampler give a
    # binomial sd of 0.007, so +-0.03 is > 4 sd; plain concatenation would give ph2's image share.
    is_ph2 = ["ph2" in dataset[i]["file_name"] for i in range(len(dataset))]
    concatenation = sum(is_ph2) / len(is_ph2)
    assert abs(concatenation - 0.75) > 0.15
    drawn = [i for b in _take(iter(loader.batch_sampler), 4000 // len(batches[0])) for _, i in b]
    assert len(drawn) == 4000
    assert sum(is_ph2[i] for i in drawn) / len(drawn) == pytest.approx(0.75, abs=0.03)

    del trainer

    # A real mixed training run, SIGKILLed right after its checkpoint of iteration 3, then resumed: the
    # data order continues at iteration 4 with the uninterrupted stream's images and augmentations.
    schedule = ["SOLVER.MAX_ITER", "200", "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "0"]
    run = str(tmp_path / "killed")
    proc = subprocess.Popen(train_net_cmd(run, *opts, *schedule), env=train_net_env(datasets_root), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tag, deadline = os.path.join(run, "last_checkpoint"), time.time() + 240
    try:
        while not (os.path.exists(tag) and open(tag).read().strip() == "model_0000003.pth"):
            assert proc.poll() is None, tail(proc.stderr.read())
            assert time.time() < deadline, "no model_0000003.pth within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    resumed = Trainer(quick_cfg(run, *opts, *schedule))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert _batch_files(resumed, 8) == batches[4:12]


def test_class_lists_that_cannot_be_mapped_are_refused(datasets_root, tmp_path):
    from usdet.engine import Trainer, check_datasets

    opts = ["DATASETS.TRAIN", "('ph2_train', 'ph1_train')"]
    cfg = quick_cfg(str(tmp_path), *opts, dataset="ph2")
    msg = r"ph1_train has classes \['lesion'\] but ph2_train .* has \['benign', 'malignant'\]; \['lesion'\] " \
          r"cannot be mapped by name"
    with pytest.raises(ValueError, match=msg):
        check_datasets(cfg)
    with pytest.raises(ValueError, match=msg):
        Trainer(cfg)
    with pytest.raises(ValueError, match="DATASETS.TRAIN_WEIGHTS has 1 value"):
        check_datasets(quick_cfg(str(tmp_path), "DATASETS.TRAIN", "('ph1_train', 'ph2_train')",
                                 "DATASETS.TRAIN_WEIGHTS", "(1.0,)"))
    check_datasets(quick_cfg(str(tmp_path), "DATASETS.TRAIN", "('ph1_train', 'ph2_train')"))  # lesion first: fine


def test_dataset_normalization_uses_the_weighted_mix(tmp_path):
    from usdet.engine import build_config

    rng = np.random.default_rng(0)
    a = rng.normal(60, 20, size=(50_000, 3)).clip(0, 255)
    b = rng.normal(140, 35, size=(50_000, 3)).clip(0, 255)
    files = []
    for name, px, n in (("a", a, 40), ("b", b, 10)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"mean": px.mean(0).tolist(), "std": px.std(0).tolist(), "num_images": n}))
        files.append(str(path))
    opts = ["DATASETS.TRAIN", "('x_train', 'y_train')", "INPUT.NORMALIZATION", "dataset",
            "INPUT.NORMALIZATION_FILE", ",".join(files), "INPUT.FORMAT", "RGB"]
    # weights 1:3 -> the statistics of a pool holding b three times as often as a
    cfg = build_config("", [*opts, "DATASETS.TRAIN_WEIGHTS", "(1.0, 3.0)"])
    pool = np.concatenate([a, b, b, b])
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx(pool.mean(0).tolist(), abs=1e-3)
    assert cfg.MODEL.PIXEL_STD == pytest.approx(pool.std(0).tolist(), abs=1e-3)
    # no weights: concatenation, so each source weighs by its num_images (40:10)
    cfg = build_config("", opts)
    pool = np.concatenate([a] * 4 + [b])
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx(pool.mean(0).tolist(), abs=1e-3)
    assert cfg.MODEL.PIXEL_STD == pytest.approx(pool.std(0).tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="names 2 files for 3 training datasets"):
        build_config("", [*opts[:1], "('x', 'y', 'z')", *opts[2:]])


def test_one_stats_file_for_several_sources_is_refused(tmp_path):
    """One pixel_stats.json for a two-source mix would normalize the mix with that source's
    statistics (the old code did, silently, even with weights): refused, naming the file."""
    from usdet.engine import build_config

    path = tmp_path / "busi_stats.json"
    path.write_text(json.dumps({"mean": [60.0] * 3, "std": [20.0] * 3, "num_images": 40}))
    opts = ["DATASETS.TRAIN", "('x_train', 'y_train')", "INPUT.NORMALIZATION", "dataset",
            "INPUT.NORMALIZATION_FILE", str(path)]
    for extra in ([], ["DATASETS.TRAIN_WEIGHTS", "(1.0, 3.0)"]):
        with pytest.raises(ValueError, match=r"names 1 file for 2 training datasets \['x_train', 'y_train'\] "
                                             rf"\(\['{path}'\]\): give one pixel_stats.json per DATASETS.TRAIN"):
            build_config("", [*opts, *extra])
    # one source with its one file is still fine, and so is ImageNet normalization of a mix
    assert build_config("", [*opts[:1], "('x_train',)", *opts[2:], "INPUT.FORMAT", "RGB"]).MODEL.PIXEL_MEAN == [60.0] * 3
    build_config("", [*opts[:2], "INPUT.NORMALIZATION", "imagenet", "INPUT.NORMALIZATION_FILE", str(path)])


def test_mixed_recipe_is_the_cpu_recipe_on_two_sources(tmp_path):
    from train_helpers import REPO

    from usdet.engine import build_config

    stats = []
    for name, mean in (("busi", 70.0), ("breast", 110.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"mean": [mean] * 3, "std": [40.0] * 3, "num_images": 10}))
        stats.append(str(path))
    mixed = build_config(os.path.join(REPO, "configs", "BUSI", "recipe_mixed_cpu.yaml"),
                         ["INPUT.NORMALIZATION_FILE", ",".join(stats)])
    single = build_config(os.path.join(REPO, "configs", "BUSI", "recipe_lite_cpu.yaml"),
                          ["INPUT.NORMALIZATION_FILE", stats[0]])
    assert list(mixed.DATASETS.TRAIN) == ["busi_train", "breast_train"]
    assert list(mixed.DATASETS.TRAIN_WEIGHTS) == [0.6, 0.4]
    assert mixed.MODEL.PIXEL_MEAN == pytest.approx([0.6 * 70 + 0.4 * 110] * 3)
    assert mixed.SOLVER.MAX_ITER == single.SOLVER.MAX_ITER and mixed.SOLVER.IMS_PER_BATCH == single.SOLVER.IMS_PER_BATCH
    assert mixed.MODEL.RESNETS.DEPTH == single.MODEL.RESNETS.DEPTH and mixed.INPUT.AUG == single.INPUT.AUG
    # the light detector on the same wall-clock budget (issue 21 item 4)
    assert mixed.MODEL.BACKBONE.NAME == single.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone"
    assert mixed.MODEL.FPN == single.MODEL.FPN and mixed.MODEL.ROI_BOX_HEAD == single.MODEL.ROI_BOX_HEAD
    assert mixed.SOLVER.TIME_BUDGET_MIN == single.SOLVER.TIME_BUDGET_MIN == 69.0
