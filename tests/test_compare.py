"""Paired model comparison: bootstrap deltas with CIs and p-values, DeLong's AUC test, the CLI."""
import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from eval_synth import synth_gt, synth_model, take_images
from train_helpers import load_tool
from usdet.evaluation.coco_metrics import coco_bbox_metrics
from usdet.evaluation.compare import compare_models, delong_test, load_detection_data, paired_bootstrap_p
from usdet.evaluation.weighted import full_values, metric_functions


def test_weighted_ap_equals_coco_ap():
    gt = synth_gt(60, seed=1)
    preds = synth_model(gt, 0.7, seed=2, jitter=6.0)
    _, data, _ = load_detection_data(gt, preds)
    vals = full_values(metric_functions(data, ("AP50", "AP")), data.num_images)
    coco = coco_bbox_metrics(gt, preds)["metrics"]
    assert vals["AP50"] == pytest.approx(coco["AP50"], abs=1e-6)
    assert vals["AP"] == pytest.approx(coco["AP"], abs=1e-6)
    assert 10 < vals["AP"] < vals["AP50"]


def test_identical_models_give_zero_delta_and_p_one(tmp_path):
    gt = synth_gt(40, seed=3)
    a = synth_model(gt, 0.6, seed=4)
    c = compare_models(gt, {"A": a, "B": [dict(p) for p in a]}, str(tmp_path), n_resamples=200)
    for k, v in c["metrics"].items():
        assert v["delta"]["estimate"] == 0.0, k
        assert v["delta"]["p_value"] == 1.0, k
        assert v["values"]["A"] == v["values"]["B"]
    assert c["metrics"]["image_auc"]["delta"]["method"] == "DeLong"
    disk = json.loads((tmp_path / "comparison.json").read_text())
    assert disk["metrics"]["AP50"]["delta"]["p_value"] == 1.0
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert "| AP50 (%) |" in (tmp_path / "comparison.md").read_text()


def test_interval_covers_the_population_difference_and_large_difference_is_significant():
    # A population of 3000 images; its deltas are the "true" differences. A 150-image test set drawn
    # from it must have paired 95% intervals that cover them.
    pop = synth_gt(3000, seed=5)
    a, b = synth_model(pop, 0.55, seed=6), synth_model(pop, 0.8, seed=7)
    true = compare_models(pop, {"A": a, "B": b}, n_resamples=1)["metrics"]
    assert true["AP50"]["delta"]["estimate"] > 10
    ids = np.random.default_rng(8).choice(np.arange(1, 3001), size=150, replace=False)
    g, pa = take_images(pop, a, ids)
    _, pb = take_images(pop, b, ids)
    c = compare_models(g, {"A": pa, "B": pb}, n_resamples=1000, seed=1)["metrics"]
    for k in ("AP50", "AP", "piou", "cpm", "image_auc"):
        d = c[k]["delta"]
        assert d["low"] <= true[k]["delta"]["estimate"] <= d["high"], (k, d, true[k]["delta"]["estimate"])
    assert c["AP50"]["delta"]["p_value"] < 0.01
    assert c["piou"]["delta"]["p_value"] < 0.01
    # A small difference on few images is not significant.
    g2, pa2 = take_images(pop, a, ids[:30])
    _, pb2 = take_images(pop, synth_model(pop, 0.57, seed=6), ids[:30])
    c2 = compare_models(g2, {"A": pa2, "B": pb2}, n_resamples=500)["metrics"]
    assert c2["AP50"]["delta"]["p_value"] > 0.05


def test_delong_hand_computed_case():
    # 3 positives, 2 negatives. psi(x, y) = 1 if x > y, 1/2 if equal, 0 otherwise.
    y = np.array([1, 1, 1, 0, 0], bool)
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.2])
    b = np.array([0.8, 0.7, 0.05, 0.6, 0.1])

    def psi(x, yy):
        return 1.0 if x > yy else 0.5 if x == yy else 0.0

    def placements(s):
        pos, neg = s[y], s[~y]
        v10 = [sum(psi(x, t) for t in neg) / len(neg) for x in pos]
        v01 = [sum(psi(x, t) for x in pos) / len(pos) for t in neg]
        return np.array(v10), np.array(v01)

    (a10, a01), (b10, b01) = placements(a), placements(b)
    # By hand: V10(a) = [1, 1, 1/2], V01(a) = [2/3, 1]; V10(b) = [1, 1, 0], V01(b) = [2/3, 2/3].
    np.testing.assert_allclose(a10, [1, 1, 0.5])
    np.testing.assert_allclose(a01, [2 / 3, 1])
    np.testing.assert_allclose(b10, [1, 1, 0])
    np.testing.assert_allclose(b01, [2 / 3, 2 / 3])
    # AUC(a) = 5/6, AUC(b) = 2/3. S10: var a 1/12, var b 1/3, cov 1/6; S01: var a 1/18, var b 0, cov 0.
    # Var(AUC(b) - AUC(a)) = (1/12 + 1/3 - 2/6) / 3 + (1/18 + 0 - 0) / 2 = 1/36 + 1/36 = 1/18.
    var = 1 / 18
    z = (2 / 3 - 5 / 6) / math.sqrt(var)
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(5 / 6)
    assert r["auc_b"] == pytest.approx(2 / 3)
    assert r["delta"] == pytest.approx(-1 / 6)
    assert r["se"] == pytest.approx(math.sqrt(var))
    assert r["z"] == pytest.approx(z)
    assert r["p_value"] == pytest.approx(2 * norm.cdf(-abs(z)))
    assert r["p_value"] == pytest.approx(0.4795, abs=1e-4)
    # 0/0: identical scores.
    same = delong_test(y, a, a.copy())
    assert same["delta"] == 0 and same["se"] == 0 and same["p_value"] == 1.0


def test_bootstrap_p_value_rule():
    assert paired_bootstrap_p(np.zeros(100)) == 1.0
    assert paired_bootstrap_p(np.full(99, 0.3)) == pytest.approx(2 / 100)
    assert paired_bootstrap_p(np.r_[np.full(50, -1.0), np.full(50, 1.0)]) == 1.0


def test_cli_writes_comparison_and_rejects_bad_input(tmp_path, capsys):
    gt = synth_gt(30, seed=9)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "a.json").write_text(json.dumps(synth_model(gt, 0.5, seed=1)))
    (tmp_path / "b.json").write_text(json.dumps(synth_model(gt, 0.9, seed=2)))
    tool = load_tool("compare_models")
    out = tmp_path / "cmp"
    rc = tool.main(["--gt", str(tmp_path / "gt.json"), "--pred", f"A={tmp_path / 'a.json'}",
                    "--pred", f"B={tmp_path / 'b.json'}", "--bootstrap", "300", "--output", str(out)])
    assert rc == 0
    c = json.loads((out / "comparison.json").read_text())
    assert c["models"] == ["A", "B"] and c["n_resamples"] == 300
    ap = c["metrics"]["AP50"]
    assert ap["delta"]["estimate"] == pytest.approx(ap["values"]["B"] - ap["values"]["A"])
    assert ap["delta"]["low"] <= ap["delta"]["estimate"] <= ap["delta"]["high"]
    assert "AP50:" in capsys.readouterr().out
    rc = tool.main(["--gt", str(tmp_path / "gt.json"), "--pred", f"A={tmp_path / 'a.json'}",
                    "--pred", f"B={tmp_path / 'missing.json'}", "--output", str(out)])
    assert rc == 2
    assert "missing.json: prediction file not found" in capsys.readouterr().err


def test_cli_says_undefined_where_a_metric_is_undefined(tmp_path, capsys):
    gt = synth_gt(20, seed=11, normal_frac=0.0)  # no lesion-free image: image AUC is undefined
    assert all(any(a["image_id"] == im["id"] for a in gt["annotations"]) for im in gt["images"])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "a.json").write_text(json.dumps(synth_model(gt, 0.5, seed=1)))
    (tmp_path / "b.json").write_text(json.dumps(synth_model(gt, 0.9, seed=2)))
    rc = load_tool("compare_models").main(["--gt", str(tmp_path / "gt.json"), "--pred", f"A={tmp_path / 'a.json'}",
                                           "--pred", f"B={tmp_path / 'b.json'}", "--bootstrap", "100",
                                           "--output", str(tmp_path / "cmp"), "--no-plots"])
    assert rc == 0
    lines = {ln.split(":")[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["image_auc"] == ("image_auc: A=undefined B=undefined delta=undefined [undefined, undefined] "
                                  "p=undefined (DeLong)")
    assert "undefined" not in lines["AP50"] and "nan" not in lines["AP50"]


def test_fmt_number_names_undefined_values():
    """One formatter for every table of paired results: None and NaN read as the caller's placeholder."""
    from usdet.evaluation.formatting import fmt_number

    assert fmt_number(0.12345, "+.3f") == "+0.123"
    assert fmt_number(float("nan"), ".4f", undefined="undefined") == "undefined"
    assert fmt_number(None, ".4f", undefined="–") == "–"
    assert fmt_number(None, ".4f") == "n/a"


def test_delong_without_variance_stays_json_safe():
    """A difference with no spread (one model constant, one separating perfectly): z unbounded, stored as None."""
    import json

    import numpy as np

    from usdet.evaluation.compare import delong_test

    y = np.array([1, 1, 1, 0, 0, 0])
    r = delong_test(y, np.full(6, 0.5), np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3]))
    assert r["delta"] == 0.5 and r["se"] == 0.0 and r["z"] is None and r["p_value"] == 0.0
    json.dumps(r, allow_nan=False)  # raised on inf before
    same = delong_test(y, np.full(6, 0.5), np.full(6, 0.5))
    assert same["z"] == 0.0 and same["p_value"] == 1.0
