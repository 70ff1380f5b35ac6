"""benchmarks/mixing_weights.py at a tiny budget on two phantom sites: each candidate trains with its
own sampling weights, the choice is the best mean val AP50 of the last checkpoints, the winner is
paired on each val split with the config's weights (or with the runner-up where those win), and a second invocation redoes nothing."""
import json
import os

import pytest

from train_helpers import QUICK_CFG, load_benchmark, phantom_sites


@pytest.fixture()
def mw(monkeypatch):
    return load_benchmark("mixing_weights", "mixing_weights_bench")


def test_weights_are_parsed_per_source_and_bad_ones_refused(mw):
    assert mw.parse_weights(["0.4/0.6", "0.75/0.25"], 2) == [(0.4, 0.6), (0.75, 0.25)]
    assert mw.weights_name((0.6, 0.4)) == "w0.6-0.4"
    for bad, why in (("0.5/0.6", "summing to 1"), ("1.0", "2 positive"), ("a/b", "numbers"), ("0/1", "positive")):
        with pytest.raises(SystemExit, match=why):
            mw.parse_weights([bad], 2)
    with pytest.raises(SystemExit, match="twice"):
        mw.parse_weights(["0.5/0.5", "0.5/0.5"], 2)
    assert mw.weights_text((0.75, 0.25)) == "0.75/0.25"
    # the winner is paired with the incumbent where it lost, else with the runner-up
    scores = {"w0.4-0.6": 46.1, "w0.6-0.4": 44.3, "w0.75-0.25": 48.9, "w0.5-0.5": None}
    assert mw.winner_and_rival(scores, "w0.6-0.4") == ("w0.75-0.25", "w0.6-0.4")
    assert mw.winner_and_rival(scores, "w0.75-0.25") == ("w0.75-0.25", "w0.4-0.6")
    assert mw.winner_and_rival(scores, None) == ("w0.75-0.25", "w0.4-0.6")
    assert mw.winner_and_rival({"w0.6-0.4": 80.0, "w0.5-0.5": None}, "w0.6-0.4") == ("w0.6-0.4", None)
    with pytest.raises(SystemExit, match="no candidate has an AP50"):
        mw.winner_and_rival({"w0.6-0.4": None}, "w0.6-0.4")
    from usdet.engine.setup import build_config
    from usdet.evaluation.compare import interval_verdict

    cfg = build_config(mw.CONFIG, resolve=False)  # a clean clone has no converted datasets
    assert mw.sources_of(cfg, mw.CONFIG) == ["busi", "breast"]
    cfg.defrost()
    cfg.INPUT.NORMALIZATION_FILE = "datasets/busi/pixel_stats.json"
    with pytest.raises(SystemExit, match="recipe_mixed_cpu.yaml: INPUT.NORMALIZATION_FILE names 1"):
        mw.sources_of(cfg, mw.CONFIG)

    assert interval_verdict({"low": 0.5, "high": 3.0}) == "better"
    assert interval_verdict({"low": -3.0, "high": -0.1}, worse="loss") == "loss"
    assert interval_verdict({"low": -1.0, "high": 2.0}) == "no detectable difference"
    assert interval_verdict({"low": None, "high": None}) == "no detectable difference"


def test_tiny_sweep_trains_each_mix_chooses_on_val_and_is_resumable(mw, tmp_path, monkeypatch):
    import torch

    data, out, res = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "results")
    phantom_sites(data)
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(f'_BASE_: "{QUICK_CFG}"\nDATASETS:\n  TRAIN: ("ph_train", "phs_train")\n'
                   '  TRAIN_WEIGHTS: (0.5, 0.5)\n  TEST: ("ph_val", "phs_val")\n'
                   'SOLVER:\n  BEST_CHECKPOINT:\n    METRIC: "phs_val/bbox/AP50"\n')
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("USDET_DATASETS", data)  # main() sets it: restored after the test
    monkeypatch.setenv("PYTHONPATH", mw.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torch.set_num_threads(1)
    argv = ["--config", str(cfg), "--sources", "ph,phs", "--weights", "0.2/0.8", "0.5/0.5", "--data", data,
            "--output", out, "--max-iter", "3", "--evals", "1", "--bootstrap", "20", "--results", res,
            "--note", "test"]
    assert mw.main(argv) == 0
    r = json.load(open(os.path.join(res, "mixing_weights.json")))
    assert r["status"] == "complete" and r["budget"]["max_iter"] == 3 and r["incumbent"] == [0.5, 0.5]
    assert list(r["candidates"]) == ["w0.2-0.8", "w0.5-0.5"]
    assert [c["incumbent"] for c in r["candidates"].values()] == [False, True]
    for name, c in r["candidates"].items():
        # each candidate really trained with its own weights (and the mix's statistics)
        with open(os.path.join(out, name, "config.yaml")) as fh:
            trained = fh.read()
        assert f"TRAIN_WEIGHTS:\n  - {c['weights'][0]}\n  - {c['weights'][1]}" in trained
        assert c["training"]["iterations"] == 3 and c["training"]["train_wall_s"] > 0
        # the score is the mean of the two val splits' AP50, as evaluated (test splits never read)
        assert set(c["val_AP50"]) == {"ph_val", "phs_val"}
        if c["score"] is not None:
            assert c["score"] == pytest.approx((c["val_AP50"]["ph_val"] + c["val_AP50"]["phs_val"]) / 2)
        rows = json.load(open(os.path.join(out, "eval", name, "cross_eval.json")))["rows"]
        assert {row["dataset"] for row in rows} == {"ph_val", "phs_val"}
    scores = {n: c["score"] for n, c in r["candidates"].items() if c["score"] is not None}
    ch = r["choice"]
    assert ch["score"] == max(scores.values()) and r["candidates"][ch["name"]]["score"] == ch["score"]
    assert ch["incumbent"] == "0.5/0.5"
    # paired against the incumbent where it lost, else against the runner-up (if one has a score)
    rival = "0.5/0.5" if ch["name"] != "w0.5-0.5" else ("0.2/0.8" if len(scores) == 2 else None)
    assert ch["paired_against"] == rival
    assert set(ch["paired"]) == ({"ph_val", "phs_val"} if rival else set())
    for ds, c in ch["paired"].items():
        d = c["AP50"]["delta"]
        assert c["AP50"]["values"][ch["name"]] == pytest.approx(r["candidates"][ch["name"]]["val_AP50"][ds])
        assert c["verdict"] == ("better" if d["low"] > 0 else "worse" if d["high"] < 0
                                else "no detectable difference")
    if ch["name"] == "w0.5-0.5":
        assert "keep them" in ch["conclusion"] and (rival is None or "runner-up 0.2/0.8" in ch["conclusion"])
    md = open(os.path.join(res, "reports", "mixing_weights.md")).read()
    assert "| 0.5/0.5 (config) | 3 |" in md and "Chosen: **" in md

    # resumed: nothing trains, evaluates or compares again; same choice
    def refuse(*a, **k):
        raise AssertionError("a finished stage was run again")

    import usdet.evaluation.compare
    import usdet.experiments.cross_eval

    monkeypatch.setattr(mw.cross_site, "_run", refuse)
    monkeypatch.setattr(usdet.experiments.cross_eval, "cross_evaluate", refuse)
    monkeypatch.setattr(usdet.evaluation.compare, "compare_models", refuse)
    assert mw.main(argv) == 0
    r2 = json.load(open(os.path.join(res, "mixing_weights.json")))
    assert r2["choice"] == r["choice"]
