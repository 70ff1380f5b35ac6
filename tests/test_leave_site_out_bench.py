"""benchmarks/leave_site_out.py at a tiny budget on two phantom "sites" (clean and intensity-shifted):
every model and lever is trained, adapted, chosen on the target's val split, evaluated and paired,
and a second invocation redoes nothing."""
import importlib.util
import json
import os

import pytest

from train_helpers import QUICK_CFG, phantom_sites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def lso(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    spec = importlib.util.spec_from_file_location("leave_site_out_bench",
                                                  os.path.join(REPO, "benchmarks", "leave_site_out.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_leave_site_out_run_is_complete_chosen_on_val_and_resumable(lso, tmp_path, monkeypatch):
    import torch

    data, out, res = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "results")
    phantom_sites(data)
    mixed_cfg = tmp_path / "mixed.yaml"
    mixed_cfg.write_text(f'_BASE_: "{QUICK_CFG}"\nDATASETS:\n  TRAIN: ("ph_train", "phs_train")\n'
                         '  TEST: ("phs_val",)\n')
    site = lambda s: {"train": f"{s}_train", "val": f"{s}_val", "tests": [f"{s}_test"], "stats": s}  # noqa: E731
    lso.PRESETS["phantom"] = {"config": QUICK_CFG, "mixed_config": str(mixed_cfg), "mixed_stats": ["ph", "phs"],
                              "full_iter": 20, "full_warmup": 5, "convert": False,
                              "sites": {"ph": site("ph"), "phs": site("phs")}, "mixed_trained_on": [],
                              "directions": ["ph:phs"]}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("USDET_DATASETS", data)  # main() sets it: restored after the test
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torch.set_num_threads(1)
    argv = ["--preset", "phantom", "--data", data, "--output", out, "--max-iter", "2", "--evals", "1",
            "--candidates", "adabn:backbone+fpn,pixel-stats", "--adapt-sizes", "4", "--tta", "--bootstrap", "20",
            "--results", res, "--note", "test"]
    assert lso.main(argv) == 0
    r = json.load(open(os.path.join(res, "leave_site_out.json")))
    assert r["status"] == "complete" and r["budget"]["max_iter"] == 2 and r["budget"]["reduced"]
    assert set(r["training"]) == {"mixed", "ph_only", "ph_scanner_aug"}
    for t in r["training"].values():
        assert t["iterations"] == 2 and "load_avg_1min_mean" in t and t["train_wall_s"] > 0
    # the +aug model really trained with the scanner augmentation
    with open(os.path.join(out, "ph_scanner_aug", "config.yaml")) as fh:
        aug_cfg = fh.read()
    assert "SECTOR: true" in aug_cfg and "JPEG_QUALITY: 40" in aug_cfg
    d = r["directions"]["ph_to_phs"]
    assert list(d["table"]) == ["source", "+adapt", "+tta", "+adapt+tta", "+aug", "+both", "mixed"]
    n_test = d["table"]["source"]["phs_test"]["num_images"]
    assert n_test > 0 and all(row["phs_test"]["num_images"] == n_test for row in d["table"].values())
    for lever in ("adaptation", "adaptation_after_aug"):
        a = d[lever]
        assert a["selection_set"] == "phs_val" and set(a["val_AP50"]) == {"adabn_backbone-fpn", "pixel-stats"}
        vals = {k: (-1.0 if v is None else v) for k, v in a["val_AP50"].items()}
        assert vals[a["chosen"]] == max(vals.values())  # the choice is the val split's best
        assert a["chosen_record"]["images_folder"] == [os.path.join(out, "adapt_images", "phs_train")]
        n_train = len(json.load(open(os.path.join(data, "phs", "annotations", "train.json")))["images"])
        assert a["chosen_record"]["num_images"] == n_train
        assert a["val_decision"] in ("adapt", "do not adapt", "no detectable difference")
    # +tta: each variant evaluated on val with its own overrides, the best taken to the tests
    tta = d["tta"]
    assert tta["selection_set"] == "phs_val" and set(tta["val_AP50"]) == set(lso.TTA_VARIANTS)
    vals = {k: (-1.0 if v is None else v) for k, v in tta["val_AP50"].items()}
    assert vals[tta["chosen"]] == max(vals.values()) and tta["opts"] == lso.TTA_VARIANTS[tta["chosen"]]
    import yaml

    with open(os.path.join(out, "eval", "ph_only_tta_multiscale_to_phs_val", "multiscale", "config_eval.yaml")) as fh:
        ms_aug = yaml.safe_load(fh)["TEST"]["AUG"]
    assert ms_aug["ENABLED"] and list(ms_aug["MIN_SIZES"]) == [256, 320, 384] and ms_aug["MAX_SIZE"] == 640
    assert d["table"]["+tta"]["phs_test"]["num_images"] == n_test
    # +adapt+tta: the chosen adaptation's checkpoint under the chosen TTA
    combo = os.path.join(out, "eval", f"ph_only_adapt_tta_{tta['chosen']}_on_phs")
    combo_eval = json.load(open(os.path.join(combo, "cross_eval.json")))
    adapt_eval = json.load(open(os.path.join(out, "eval", "ph_only_to_phs", "cross_eval.json")))
    assert combo_eval["models"]["adapt+tta"] == adapt_eval["models"][d["adaptation"]["chosen"]]
    with open(os.path.join(combo, "adapt+tta", "config_eval.yaml")) as fh:
        combo_test = yaml.safe_load(fh)["TEST"]
    assert combo_test["FLIP"] if tta["chosen"] == "flip" else combo_test["AUG"]["ENABLED"]
    for model in ("+adapt", "+tta", "+adapt+tta", "+aug", "+both", "mixed"):
        c = d["paired_vs_source"][model]["phs_test"]["AP50"]
        vs = c["values"]
        if vs["source"] is not None and vs[model] is not None:
            assert c["delta"]["estimate"] == pytest.approx(vs[model] - vs["source"])
    sizes = d["adaptation_cost"]
    assert [s["num_images"] for s in sizes] == [n_train, 4] and sizes[1]["max_images"] == 4
    md = open(os.path.join(res, "reports", "leave_site_out.md")).read()
    assert "## ph → phs" in md and "| +both | phs_test |" in md and "reduced" in md
    assert f"test-time augmentation: chosen `{tta['chosen']}` on phs_val" in md

    # resumed: nothing is trained, adapted, evaluated or compared again; same result
    def refuse(*a, **k):
        raise AssertionError("a finished stage was run again")

    import usdet.experiments.adapt
    import usdet.evaluation.compare
    import usdet.experiments.cross_eval

    monkeypatch.setattr(lso.cross_site, "_run", refuse)
    monkeypatch.setattr(usdet.experiments.adapt, "adapt_site", refuse)
    monkeypatch.setattr(usdet.experiments.cross_eval, "cross_evaluate", refuse)
    monkeypatch.setattr(usdet.evaluation.compare, "compare_models", refuse)
    assert lso.main(argv) == 0
    r2 = json.load(open(os.path.join(res, "leave_site_out.json")))
    assert r2["directions"]["ph_to_phs"]["table"] == d["table"]
    assert r2["directions"]["ph_to_phs"]["paired_vs_source"] == d["paired_vs_source"]

    # fewer candidates for +both: only those are tried on the +aug model (cached here, nothing runs)
    assert lso.main(argv + ["--both-candidates", "pixel-stats"]) == 0
    r3 = json.load(open(os.path.join(res, "leave_site_out.json")))["directions"]["ph_to_phs"]
    assert set(r3["adaptation_after_aug"]["val_AP50"]) == {"pixel-stats"}
    assert r3["adaptation_after_aug"]["chosen"] == "pixel-stats"
    assert set(r3["adaptation"]["val_AP50"]) == {"adabn_backbone-fpn", "pixel-stats"}

    # --no-aug starts no +aug training: a finished one is still reported ...
    assert lso.main(argv + ["--no-aug"]) == 0
    r4 = json.load(open(os.path.join(res, "leave_site_out.json")))["directions"]["ph_to_phs"]
    assert r4["table"] == d["table"] and "not_measured" not in r4
    # ... one that is not finished is not started; source, +adapt and mixed are reported without it
    final = os.path.join(out, "ph_scanner_aug", "model_final.pth")
    os.rename(final, final + ".away")
    assert lso.main(argv + ["--no-aug"]) == 0
    r5 = json.load(open(os.path.join(res, "leave_site_out.json")))["directions"]["ph_to_phs"]
    assert list(r5["table"]) == ["source", "+adapt", "+tta", "+adapt+tta", "mixed"] and r5["not_measured"] == ["+aug", "+both"]
    assert r5["table"]["+adapt"] == d["table"]["+adapt"] and "adaptation_after_aug" not in r5
    assert list(r5["paired_vs_source"]) == ["+adapt", "+tta", "+adapt+tta", "mixed"]
    md = open(os.path.join(res, "reports", "leave_site_out.md")).read()
    assert "Not measured in this run: `+aug`, `+both`" in md and "| +aug |" not in md
