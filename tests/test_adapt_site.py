"""tools/adapt_site.py: label-free adaptation of a phantom model to an intensity-shifted "site".

The quick R18-FPN is trained on phantoms (tests/train_helpers.py), then shown phantoms whose
scanner applies another gain and offset (0.6 x + 50): it loses its lesions. Adapting to unlabelled
shifted frames of *other* phantoms must bring them back, and the checkpoint must say what was done
and load in the tools like any other.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from train_helpers import QUICK_CFG, load_tool, train_phantom_detector

GAIN, OFFSET = 0.6, 50.0


def _shift(img: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.float32) * GAIN + OFFSET, 0, 255).astype(np.uint8)


def _shift_folder(src: str, dst: str) -> None:
    from usdet.data.image_io import read_image
    from usdet.utils.io import atomic_write_image

    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        atomic_write_image(os.path.join(dst, name), _shift(read_image(os.path.join(src, name))))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Datasets ph (clean) and phs (the same images shifted), shifted unlabelled frames of other
    phantoms, and the trained model's weights file."""
    from usdet.data.phantom import make_phantom_dataset
    from usdet.data.register import register_all_usdet_datasets

    base = tmp_path_factory.mktemp("adapt_site")
    root = str(base / "datasets")
    make_phantom_dataset(os.path.join(root, "ph"), num_images=60, size=128, seed=3, fractions=(0.2, 0.4, 0.4))
    shutil.copytree(os.path.join(root, "ph"), os.path.join(root, "phs"))
    shutil.rmtree(os.path.join(root, "phs", "images"))
    _shift_folder(os.path.join(root, "ph", "images"), os.path.join(root, "phs", "images"))
    make_phantom_dataset(str(base / "other"), num_images=32, size=128, seed=7)
    unlabelled = str(base / "new_site_frames")
    _shift_folder(str(base / "other" / "images"), unlabelled)
    register_all_usdet_datasets(root)
    _, model = train_phantom_detector(iters=150, size=128)
    weights = str(base / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return {"base": base, "root": root, "frames": unlabelled, "weights": weights}


def _adapt(site, out, *extra):
    tool = load_tool("adapt_site")
    torch.set_num_threads(1)
    return tool.main(["--config-file", QUICK_CFG, "--weights", site["weights"], "--images", site["frames"],
                      "--output", str(out), "--no-progress", *extra, "MODEL.DEVICE", "cpu"])


def _ap50(row):
    v = row["metrics"]["AP50"]["estimate"]
    return 0.0 if v is None else v  # None: not one detection on the whole set


@pytest.fixture(scope="module")
def adapted(site):
    out = {}
    for method in ("adabn", "pixel-stats"):
        path = site["base"] / f"{method}.pth"
        assert _adapt(site, path, "--method", method, "--source-pixel-stats",
                      os.path.join(site["root"], "ph", "pixel_stats.json")) == 0
        out[method] = str(path)
    return out


def test_adaptation_restores_ap_on_shifted_site(site, adapted, tmp_path):
    from usdet.engine.setup import build_config
    from usdet.experiments.cross_eval import cross_evaluate

    cfg = build_config(QUICK_CFG, ["MODEL.DEVICE", "cpu", "TEST.BOOTSTRAP", "0"])
    r = cross_evaluate(cfg, {"source": site["weights"], **adapted}, ["ph_test", "phs_test"], str(tmp_path),
                       plots=False)
    ap = {(row["model"], row["dataset"]): _ap50(row) for row in r["rows"]}
    clean, shifted = ap[("source", "ph_test")], ap[("source", "phs_test")]
    assert clean >= 35.0, ap  # the phantom model works on its own site
    assert shifted <= clean - 25.0, ap  # and loses its lesions on the shifted one
    for method in adapted:  # each label-free adaptation measurably restores them
        assert ap[(method, "phs_test")] >= shifted + 25.0, (method, ap)
        assert ap[(method, "phs_test")] >= clean - 12.0, (method, ap)
    # the adapted model is the shifted site's: it no longer suits the clean one (it was changed)
    assert ap[("adabn", "ph_test")] <= clean - 25.0, ap


def test_checkpoint_records_what_was_done(site, tmp_path):
    from usdet.experiments.adapt import ADAPTATION_KEY

    out = tmp_path / "adapted_backbone.pth"
    assert _adapt(site, out, "--scope", "backbone", "--max-images", "10", "--batch-size", "5", "--blend", "0.5") == 0
    ckpt = torch.load(str(out), map_location="cpu", weights_only=False)
    rec = ckpt[ADAPTATION_KEY]
    assert rec["method"] == "adabn" and rec["num_images"] == 10 and rec["max_images"] == 10
    assert rec["images_folder"] == [site["frames"]] and rec["source_weights"] == site["weights"]
    assert rec["bn"]["scope"] == "backbone" and rec["bn"]["batch_size"] == 5 and rec["bn"]["num_batches"] == 2
    assert rec["bn"]["blend"] == 0.5 and rec["bn"]["num_bn_layers"] == 20  # R18: stem + 8 blocks x 2 + 3 shortcuts
    assert rec["verdict"].startswith("unknown") and "no labels" in rec["warning"]
    assert "phantom_00" not in json.dumps(rec) and ".png" not in json.dumps(rec)  # no image file name
    source = torch.load(site["weights"], map_location="cpu", weights_only=False)["model"]
    changed = {k for k, v in ckpt["model"].items() if not torch.equal(v, source[k])}
    assert changed and all(k.startswith("backbone.bottom_up.") and k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("backbone.bottom_up.stem.conv1.norm.running_var") for k in changed)
    # blend 0.5: exactly halfway between the training statistics and the site's (blend 1)
    full = tmp_path / "full.pth"
    assert _adapt(site, full, "--scope", "backbone", "--max-images", "10", "--batch-size", "5") == 0
    site_stats = torch.load(str(full), map_location="cpu", weights_only=False)["model"]
    k = "backbone.bottom_up.stem.conv1.norm.running_mean"
    assert torch.allclose(ckpt["model"][k], 0.5 * source[k] + 0.5 * site_stats[k], atol=1e-5)


def test_pixel_stats_are_recorded_and_applied_on_load(site, adapted):
    """The adapted normalization lives in the checkpoint; loading it (predict.py, --eval-only,
    cross_eval, export) applies it whatever the config says."""
    from usdet.experiments.adapt import ADAPTATION_KEY
    from usdet.engine.predictor import BatchPredictor, build_predictor_cfg

    rec = torch.load(adapted["pixel-stats"], map_location="cpu", weights_only=False)[ADAPTATION_KEY]
    ps = rec["pixel_stats"]
    # the site's std is 0.6 of the training site's: so is the new PIXEL_STD of the config's
    cfg = build_predictor_cfg(QUICK_CFG, adapted["pixel-stats"], "cpu")
    for c in range(3):
        ratio = ps["site_std_rgb"][c] / ps["training_site_std"][::-1][c]
        assert 0.55 < ratio < 0.65
    assert rec["pixel_std"] == pytest.approx([s * GAIN for s in cfg.MODEL.PIXEL_STD], rel=0.1)
    pred = BatchPredictor(cfg, batch_size=2)
    assert pred.model.pixel_mean.flatten().tolist() == pytest.approx(rec["pixel_mean"])
    assert pred.model.pixel_std.flatten().tolist() == pytest.approx(rec["pixel_std"])
    assert "adapted to a site without labels (pixel-stats" in pred.weights_note


def test_adapted_checkpoint_loads_in_predictor(site, adapted):
    """predict.py's predictor on the adapted checkpoint = the adapted weights; it finds the shifted
    lesions the source model misses."""
    from usdet.data.image_io import read_image
    from usdet.engine.predictor import BatchPredictor, build_predictor_cfg

    frames = [read_image(os.path.join(site["root"], "phs", "images", f"phantom_{i:04d}.png")) for i in (1, 2, 3, 6)]
    torch.set_num_threads(1)
    found = {}
    for name, w in (("source", site["weights"]), ("adabn", adapted["adabn"])):
        pred = BatchPredictor(build_predictor_cfg(QUICK_CFG, w, "cpu"), batch_size=4)
        out = pred(frames)
        found[name] = sum(int((o.scores >= 0.5).sum()) for o in out)
        if name == "adabn":
            sd = torch.load(w, map_location="cpu", weights_only=False)["model"]
            k = "backbone.bottom_up.stem.conv1.norm.running_var"
            assert torch.equal(pred.model.state_dict()[k], sd[k])
    assert found["adabn"] >= 3 and found["adabn"] > found["source"], found


def test_val_check_states_a_verdict_and_require_gain(site, tmp_path, capsys):
    out = tmp_path / "checked.pth"
    assert _adapt(site, out, "--val-dataset", "phs_val", "--bootstrap", "200") == 0
    text = capsys.readouterr().out
    rec = torch.load(str(out), map_location="cpu", weights_only=False)["usdet_adaptation"]
    check = rec["val_check"]
    assert check["dataset"] == "phs_val" and check["num_images"] == 24
    assert check["verdict"] == rec["verdict"] == "gain" and check["AP50"]["low"] > 0, check
    assert "phs_val (24 images, paired)" in text and ": gain" in text
    # on the clean site's val the same adaptation is a loss: --require-gain writes nothing
    refused = tmp_path / "refused.pth"
    assert _adapt(site, refused, "--val-dataset", "ph_val", "--require-gain", "--bootstrap", "200") == 1
    err = capsys.readouterr().err
    assert "not written: --require-gain and the verdict is 'loss'" in err
    assert not refused.exists() and not os.path.exists(str(refused) + ".unverified.pth")


def test_without_labels_it_says_it_cannot_tell(site, tmp_path, capsys):
    assert _adapt(site, tmp_path / "a.pth", "--max-images", "4") == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "nothing here shows whether it helps" in err


def test_bad_inputs_name_the_problem(site, tmp_path, capsys):
    missing = str(tmp_path / "no_such_folder")
    assert _adapt(site, tmp_path / "x.pth", "--images", missing) == 2
    assert f"{missing}: image folder or file not found" in capsys.readouterr().err
    # pixel statistics with ImageNet normalization need the training site's statistics
    assert _adapt(site, tmp_path / "x.pth", "--method", "pixel-stats") == 2
    assert "--source-pixel-stats" in capsys.readouterr().err
    # a model without BatchNorm statistics (FrozenBN backbone, no FPN norm) has nothing to adapt
    tool = load_tool("adapt_site")
    rc = tool.main(["--config-file", QUICK_CFG, "--weights", site["weights"], "--images", site["frames"],
                    "--output", str(tmp_path / "x.pth"), "--no-progress", "MODEL.DEVICE", "cpu",
                    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", ""])
    assert rc == 2 and "no BatchNorm layer in scope 'backbone+fpn'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _adapt(site, tmp_path / "x.pth", "--images", str(empty)) == 2
    assert "no images or DICOM files found" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
