"""A conservative model (its FROC curve stops below 8 FP/image) gets a CPM by the usual convention,
with the extended rates flagged, so compare_models can compare it."""
import json
import re

import pytest

from eval_synth import synth_gt, synth_model
from train_helpers import load_tool
from usdet.evaluation.compare import load_detection_data
from usdet.evaluation.froc import froc


def test_compare_models_gives_a_conservative_model_a_cpm_and_flags_its_extended_rates(tmp_path, capsys):
    gt = synth_gt(30, seed=9)
    full = synth_model(gt, 0.8, seed=2)  # low-score boxes everywhere: reaches 8 FP/image
    conservative = [p for p in full if p["score"] >= 0.1]  # the same model, its low-score boxes cut
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "a.json").write_text(json.dumps(full))
    (tmp_path / "b.json").write_text(json.dumps(conservative))
    fa = froc(load_detection_data(gt, full)[1])
    fb = froc(load_detection_data(gt, conservative)[1])
    assert fa["extended_rates"] == [] and fb["max_fps_per_image"] < 1
    assert fb["extended_rates"] and fb["extended_rates"][-1] == 8.0
    last = fb["sensitivity"][-1]
    assert 0 < last < 1 and all(s == last for s, e in zip(fb["sensitivity"], fb["extended"]) if e)
    rc = load_tool("compare_models").main(["--gt", str(tmp_path / "gt.json"), "--pred", f"A={tmp_path / 'a.json'}",
                                           "--pred", f"B={tmp_path / 'b.json'}", "--bootstrap", "200",
                                           "--output", str(tmp_path / "cmp"), "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    cpm_line = next(line for line in out.splitlines() if line.startswith("cpm:"))
    assert "undefined" not in cpm_line
    assert float(re.search(r" B=([0-9.]+)", cpm_line).group(1)) == pytest.approx(fb["cpm"], abs=1e-4)
    rates = ", ".join(f"{r:g}" for r in fb["extended_rates"])
    note = (f"CPM of B: its FROC curve ends at {fb['max_fps_per_image']:.3g} FP/image (no more detections); at "
            f"{rates} FP/image its last sensitivity is carried on (extended rates)")
    assert f"note: {note}" in out and "CPM of A" not in out
    c = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert c["froc_extended_rates"] == {"A": [], "B": fb["extended_rates"]}
    d = c["metrics"]["cpm"]["delta"]
    assert d["estimate"] == pytest.approx(fb["cpm"] - fa["cpm"]) and d["n_valid"] == 200 and d["low"] <= d["high"]
    assert note in (tmp_path / "cmp" / "comparison.md").read_text()
