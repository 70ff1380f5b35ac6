"""Quiet tools: known third-party deprecation warnings never reach a tool's stderr (--help and a
small real run of each), while usdet's own warnings and new third-party ones still show."""
import json
import os
import subprocess
import sys

import pytest

from usdet.utils.known_warnings import KNOWN_WARNINGS

from train_helpers import QUICK_CFG, REPO, make_datasets_root, train_net_cmd

KNOWN_TEXTS = [msg for _, msg in KNOWN_WARNINGS]
HELP = {
    "train_net": ["--help"], "predict": ["--help"], "gradcam": ["--help"], "evaluate_json": ["--help"],
    "plot_metrics": ["--help"], "visualize_json_results": ["--help"], "crop_workspace": ["--help"],
    "convert_to_coco": ["busi", "--help"], "demo": ["--help"],
}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "USDET_SHOW_ALL_WARNINGS")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _tool(name, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args], cwd=REPO,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _assert_quiet(name, proc):
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    for text in KNOWN_TEXTS:
        assert text not in proc.stderr, f"{name} printed a known third-party warning:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("name", sorted(HELP))
def test_help_is_quiet(name):
    _assert_quiet(name, _tool(name, *HELP[name]))


def test_filter_is_what_hides_them():
    """Without the filter (USDET_SHOW_ALL_WARNINGS=1) train_net --help prints torch's deprecation:
    the quiet --help above is the filter's doing, not an environment without the warning."""
    proc = _tool("train_net", "--help", env=_env(USDET_SHOW_ALL_WARNINGS="1"))
    assert proc.returncode == 0
    assert KNOWN_TEXTS[0] in proc.stderr


def test_new_and_usdet_warnings_still_show():
    """The filter installed by a tool (evaluate_json's import) drops only the exact known messages."""
    code = (
        "import importlib.util, sys, warnings\n"
        f"spec = importlib.util.spec_from_file_location('t', {os.path.join(REPO, 'tools', 'evaluate_json.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "from usdet.utils.known_warnings import KNOWN_WARNINGS\n"
        "for cat, msg in KNOWN_WARNINGS:\n"
        "    warnings.warn(msg, cat)\n"
        "    warnings.warn(msg + ' (Triggered internally at /build/x.cpp:1.)', cat)\n"
        "warnings.warn('a brand-new third-party deprecation', FutureWarning)\n"
        "warnings.warn(KNOWN_WARNINGS[0][1] + ' Now also torch.fx.', FutureWarning)\n"
        "warnings.warn('usdet: 3 images had no truth box', UserWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "a brand-new third-party deprecation" in proc.stderr
    assert "Now also torch.fx." in proc.stderr  # same start, different message: not silenced
    assert "usdet: 3 images had no truth box" in proc.stderr
    shown = [line for line in proc.stderr.splitlines() if "Warning:" in line]
    assert len(shown) == 3, proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration train_net run (with its final evaluation) on 16 phantoms; its stderr too."""
    root = make_datasets_root(str(tmp_path_factory.mktemp("quiet_ds")))
    out = str(tmp_path_factory.mktemp("quiet_run"))
    proc = subprocess.run(train_net_cmd(out, "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1"),
                          env=_env(USDET_DATASETS=root), capture_output=True, text=True, timeout=300, cwd=REPO)
    return root, out, proc


def test_real_runs_are_quiet(trained, tmp_path):
    root, out, train = trained
    _assert_quiet("train_net (train + evaluation)", train)
    weights = os.path.join(out, "model_final.pth")
    image = os.path.join(root, "ph1", "images", "phantom_0001.png")
    gt = os.path.join(root, "ph1", "annotations", "val.json")
    preds = os.path.join(out, "inference", "ph1_val", "coco_instances_results.json")
    runs = {
        "predict": ["--config-file", QUICK_CFG, "--weights", weights, "--input", image, "--output",
                    str(tmp_path / "pred"), "--no-progress", "--device", "cpu"],
        "gradcam": ["--config-file", QUICK_CFG, "--weights", weights, "--input", image, "--output",
                    str(tmp_path / "cam"), "--method", "eigencam", "--no-progress"],
        "evaluate_json": ["--gt", gt, "--pred", preds, "--output", str(tmp_path / "eval"), "--bootstrap", "0"],
        "visualize_json_results": ["--input", preds, "--gt", gt, "--output", str(tmp_path / "ov"), "--no-progress"],
        "plot_metrics": [os.path.join(out, "metrics.json"), "--output", str(tmp_path / "curves.png")],
        "crop_workspace": ["--input", os.path.dirname(image), "--output", str(tmp_path / "crops"), "--no-progress"],
    }
    for name, args in runs.items():
        _assert_quiet(name, _tool(name, *args, env=_env(USDET_DATASETS=root)))
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f)["inputs"]["num_images"] > 0  # the evaluation really ran
    assert (tmp_path / "eval" / "report.html").is_file()
