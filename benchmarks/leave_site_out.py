#!/usr/bin/env python
"""Leave one site out (issue 24): train on one site, test on the other, with and without each lever.

  python benchmarks/leave_site_out.py [--data DIR] [--output DIR] [--budget-min 69 | --max-iter N] [--evals 5]
      [--adopt NAME=RUN_DIR ...]
      [--directions busi:breast breast:busi] [--candidates adabn:backbone+fpn,adabn:backbone,pixel-stats,...]
      [--both-candidates LIST]
      [--adapt-sizes 10,50] [--tta] [--no-mixed] [--no-aug] [--bootstrap 1000] [--note TEXT]

Directions (preset ``busi_breast``): BUSI -> BrEaST (reported on BrEaST's test split and on all 256
BrEaST images, ``breastall_test``) and BrEaST train -> BUSI test. Per direction, models:

- ``source``: the CPU recipe trained on the source site's train split, checkpoint chosen on the
  source's val split (``model_best.pth``, the recipe's own rule);
- ``+adapt``: ``source`` adapted without labels (``usdet.experiments.adapt``, what tools/adapt_site.py runs)
  to the target's *train-split* images (their boxes unused). Each candidate in ``--candidates``
  (method[:scope]) is evaluated on the **target's val split** and the best AP50 there is kept;
  whether it beats ``source`` on that val split is recorded (paired) as the adapt-or-not verdict;
- ``+tta`` (with ``--tta``): ``source`` with detectron2's test-time augmentation, the variant of
  ``TTA_VARIANTS`` (flip; flip at three scales around or above the test size) chosen on the target's val split in the same way,
  and ``+adapt+tta``: the chosen adaptation evaluated under the chosen TTA (no further choice);
- ``+aug``: the recipe plus scanner-style augmentation (``SCANNER_AUG``, fixed a priori), chosen on
  the source's val split like ``source``;
- ``+both``: ``+aug`` adapted as ``+adapt`` (its own choice on the target's val split, among
  ``--both-candidates``, default the same candidates);
- ``mixed``: the mixed recipe (both sites' train splits), the ceiling, where its training images are
  not the test images.

Every model is evaluated on the target's test sets (``cross_eval``) and compared paired with
``source`` on the same images (``compare_models``); no choice looks at a test split (all of BrEaST
holds BrEaST's val and train images: it is reported, never used to choose). The chosen adaptation
is also re-run on ``--adapt-sizes`` frames (cost and gain against the number of unlabelled images).

Each training has the recipe's wall-clock budget (``cross_site.schedule``). ``--adopt`` takes a
training made elsewhere with the same config (``busi_only`` from ``make train-busi-cpu``, ``mixed``
from ``make train-mixed-cpu``) instead of training it again (``cross_site.adopt`` checks the config).

Resumable: trainings resume from their last checkpoint, every finished adaptation, evaluation and
comparison is kept and skipped. ``benchmarks/results/leave_site_out.json`` (written after every
stage, atomically) records the budget, the schedule, the wall time and the 1-minute load average of
every training, adaptation and evaluation; ``benchmarks/results/reports/leave_site_out.md`` the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, write_result  # noqa: E402
import cross_site  # noqa: E402

#: Scanner-style augmentation of the "+aug" models, chosen a priori (not tuned on any split).
SCANNER_AUG = ["INPUT.AUG.SCANNER.PROB", "0.5", "INPUT.AUG.SCANNER.DEPTH_GAIN", "0.3",
               "INPUT.AUG.SCANNER.SPECKLE_GRAIN", "0.1", "INPUT.AUG.SCANNER.RESOLUTION", "0.6",
               "INPUT.AUG.SCANNER.BLUR", "1.0", "INPUT.AUG.SCANNER.LOG_COMPRESSION", "3.0",
               "INPUT.AUG.SCANNER.JPEG_QUALITY", "40", "INPUT.AUG.SCANNER.SECTOR", "True",
               "INPUT.AUG.SCANNER.TEXT", "True"]
#: Test-time augmentation variants of the "+tta" lever (``--tta``): detectron2's GeneralizedRCNNWithTTA
#: (horizontal flip; flip at three scales around the recipe's 320-pixel test size), chosen on the
#: target's val split like the adaptations. Label-free and training-free: only inference changes.
TTA_VARIANTS: Dict[str, List[str]] = OrderedDict([
    ("flip", ["TEST.FLIP", "True"]),
    ("multiscale", ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(256, 320, 384)", "TEST.AUG.MAX_SIZE", "640",
                    "TEST.AUG.FLIP", "True"]),
    # the same above the recipe's test size (320): BrEaST's frames are larger than BUSI's
    ("multiscale_up", ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(320, 384, 448)", "TEST.AUG.MAX_SIZE",
                       "768", "TEST.AUG.FLIP", "True"]),
])
DEFAULT_CANDIDATES = "adabn:backbone+fpn,adabn:backbone,pixel-stats,pixel-stats+adabn:backbone+fpn"

PRESETS: Dict[str, Dict[str, Any]] = {
    "busi_breast": {
        "config": "configs/BUSI/recipe_lite_cpu.yaml",
        "mixed_config": "configs/BUSI/recipe_mixed_cpu.yaml",
        "mixed_stats": ["busi", "breast"],
        "full_iter": cross_site.FULL_ITER,
        "convert": True,
        "sites": {
            "busi": {"train": "busi_train", "val": "busi_val", "tests": ["busi_test"], "stats": "busi"},
            "breast": {"train": "breast_train", "val": "breast_val", "tests": ["breast_test", "breastall_test"],
                       "stats": "breast"},
        },
        #: test sets the mixed model trained on (never reported for it)
        "mixed_trained_on": ["breastall_test"],
        "directions": ["busi:breast", "breast:busi"],
    },
}


def _log(msg: str) -> None:
    print(f"[leave_site_out {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _read(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def parse_candidates(text: str) -> List[Tuple[str, str]]:
    """``"adabn:backbone,pixel-stats"`` -> [(method, scope), ...] (scope ``backbone+fpn`` when omitted)."""
    from usdet.experiments.adapt import METHODS, SCOPES

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        method, _, scope = item.partition(":")
        scope = scope or "backbone+fpn"
        if method not in METHODS or scope not in SCOPES:
            raise SystemExit(f"--candidates: {item!r} is not method[:scope] with method in {METHODS}, scope in {SCOPES}")
        out.append((method, scope))
    if not out:
        raise SystemExit("--candidates: no candidate given")
    return out


def _cand_name(method: str, scope: str, max_images: int = 0) -> str:
    name = method if method == "pixel-stats" else f"{method}_{scope}"
    return name.replace("+", "-") + (f"_n{max_images}" if max_images else "")


def split_images(data: str, dataset: str, dest: str) -> str:
    """A folder of links to the images of a registered ``<site>_<split>`` (numbered names: the
    adaptation record names the folder only), made once."""
    site, split = dataset.rsplit("_", 1)
    if os.path.isdir(dest) and os.listdir(dest):
        return dest
    doc = _read(os.path.join(data, site, "annotations", f"{split}.json"))
    tmp = dest + ".partial"
    os.makedirs(tmp, exist_ok=True)
    for i, im in enumerate(sorted(doc["images"], key=lambda r: r["id"])):
        src = os.path.join(data, site, im["file_name"])
        link = os.path.join(tmp, f"{i:05d}{os.path.splitext(src)[1].lower()}")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(src), link)
    os.replace(tmp, dest)
    return dest


class Protocol:
    """The stages, each skipped when its output exists."""

    def __init__(self, preset: Dict[str, Any], data: str, out: str, sched: Dict[str, int], bootstrap: int,
                 candidates: List[Tuple[str, str]], sizes: List[int], result: Dict[str, Any], save):
        self.p, self.data, self.out, self.sched = preset, data, out, sched
        self.bootstrap, self.candidates, self.sizes = bootstrap, candidates, sizes
        self.both_candidates = candidates
        self.tta = False  # --tta: the test-time augmentation lever
        self.result, self.save = result, save
        self.adopted: Dict[str, str] = {}
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def stats(self, site: str) -> str:
        return os.path.join(self.data, self.p["sites"][site]["stats"], "pixel_stats.json")

    # -- training ---------------------------------------------------------------------------
    def train(self, name: str, site: Optional[str], aug: bool) -> Dict[str, Any]:
        """``source``/``+aug`` on ``site`` (``None``: the mixed recipe), via cross_site.train."""
        run_dir = os.path.join(self.out, name)
        if site is None:
            cfg, extra, stats = self.p["mixed_config"], [], self.p["mixed_stats"]
        else:
            s = self.p["sites"][site]
            cfg, stats = self.p["config"], [s["stats"]]
            extra = ["DATASETS.TRAIN", repr((s["train"],)), "DATASETS.TEST", repr((s["val"],))]
            extra += SCANNER_AUG if aug else []
        if name in self.adopted:
            cross_site.adopt(name, self.adopted[name], run_dir, cfg,
                             cross_site.train_opts(stats, self.data, self.sched, run_dir, extra))
        t = cross_site.train(name, cfg, stats, self.data, run_dir, self.sched, self.logs, extra_opts=extra)
        t["opts"] = extra
        self.result["training"][name] = t
        self.save("training")
        return t

    def finished(self, name: str) -> bool:
        """Trained to the end here, or adopted."""
        return name in self.adopted or os.path.isfile(os.path.join(self.out, name, "model_final.pth"))

    def weights(self, name: str) -> str:
        return os.path.join(self.out, name, "model_best.pth")

    def config_of(self, name: str) -> str:
        return os.path.join(self.out, name, "config.yaml")

    # -- adaptation, evaluation, comparison (in process; each result kept on disk) --------------
    def adapt(self, model: str, images: str, source_site: str, method: str, scope: str,
              max_images: int = 0) -> Dict[str, Any]:
        from usdet.experiments.adapt import adapt_site

        dest = os.path.join(self.out, "adapt", model, _cand_name(method, scope, max_images) + ".pth")
        rec_path = dest + ".json"
        if not os.path.isfile(rec_path):
            _log(f"adapting {model}: {method} ({scope}) on {max_images or 'all'} frames of {images}")
            load0 = _load()
            rec = adapt_site(self.config_of(model), self.weights(model), [images], dest, method=method, scope=scope,
                             max_images=max_images, source_pixel_stats=self.stats(source_site), progress=False,
                             crop=False)  # the converted images, already cropped, as evaluated
            rec = dict(rec, load_avg_1min_start=load0, load_avg_1min_end=_load())
            from usdet.utils.io import atomic_write_json

            atomic_write_json(rec_path, rec)
        rec = _read(rec_path)
        rec["weights"] = dest
        return rec

    def evaluate(self, key: str, model: str, weights: Dict[str, str], datasets: Sequence[str],
                 opts: Sequence[str] = ()) -> Dict[str, Any]:
        """cross_eval of ``{name: weights}`` (config of ``model`` + ``opts``) on ``datasets``; rows by (name, dataset)."""
        out = os.path.join(self.out, "eval", key)
        ev = cross_site.evaluate_cached(out, self.config_of(model), weights, datasets, self.bootstrap,
                                        "leave_site_out_wall.json", opts)
        rows = OrderedDict()
        for row in ev["cross_eval"]["rows"]:
            report = _read(os.path.join(out, os.path.dirname(row["report"]), "metrics.json"))
            metrics = OrderedDict(row["metrics"])
            metrics["AP75"] = {"estimate": report.get("bbox", {}).get("AP75")}  # cross_eval's table has no AP75
            rows[(row["model"], row["dataset"])] = dict(row, metrics=metrics,
                                                        predictions=os.path.join(out, row["predictions"]))
        return {"rows": rows, "wall": ev["wall"]}

    def compare(self, key: str, dataset: str, first: Tuple[str, str], second: Tuple[str, str]) -> Dict[str, Any]:
        """Paired ``second - first`` on ``dataset``; ``first``/``second`` = (name, predictions file)."""
        return cross_site.paired_cached(os.path.join(self.out, "paired", key, dataset), dataset, first, second,
                                        self.bootstrap)

    # -- one direction ----------------------------------------------------------------------
    def choose_on_val(self, key: str, val_ds: str, plain: Dict[str, Any], rows: Dict[str, Dict[str, Any]],
                      better: str, worse: str) -> Dict[str, Any]:
        """The candidate (``rows``: name -> its cross_eval row on ``val_ds``) with the best val AP50, paired
        on val against ``plain`` (the unchanged model's row) and that interval in words."""
        from usdet.evaluation.compare import interval_verdict

        val = OrderedDict((k, r["metrics"]["AP50"]["estimate"]) for k, r in rows.items())
        best = max(val, key=lambda k: -1.0 if val[k] is None else val[k])
        paired = self.compare(f"{key}/val_choice", val_ds, ("source", plain["predictions"]),
                              (best, rows[best]["predictions"]))
        return OrderedDict(val_AP50=val, chosen=best, paired=paired,
                           decision=interval_verdict(paired["AP50"]["delta"], better=better, worse=worse))

    def adapted_lever(self, model: str, src: str, tgt: str,
                      candidates: Optional[List[Tuple[str, str]]] = None) -> Dict[str, Any]:
        """Every candidate adaptation of ``model`` to ``tgt``, evaluated on tgt val; the best kept."""
        t = self.p["sites"][tgt]
        images = split_images(self.data, t["train"], os.path.join(self.out, "adapt_images", t["train"]))
        recs = OrderedDict()
        for method, scope in candidates or self.candidates:
            recs[_cand_name(method, scope)] = self.adapt(model, images, src, method, scope)
        weights = OrderedDict([("source", self.weights(model))] + [(k, r["weights"]) for k, r in recs.items()])
        ev = self.evaluate(f"{model}_to_{tgt}", model, weights, [t["val"]] + t["tests"])
        c = self.choose_on_val(f"{model}_to_{tgt}", t["val"], ev["rows"][("source", t["val"])],
                               OrderedDict((k, ev["rows"][(k, t["val"])]) for k in recs), "adapt", "do not adapt")
        best = c["chosen"]
        return OrderedDict(selection_set=t["val"], adaptation_images=f"{t['train']} images (labels unused)",
                           val_AP50=c["val_AP50"], chosen=best, val_paired_vs_unadapted=c["paired"],
                           val_decision=c["decision"],
                           chosen_record={k: v for k, v in recs[best].items() if k != "weights"},
                           evaluation=ev, weights=recs[best]["weights"],
                           method=recs[best]["method"], scope=(recs[best].get("bn") or {}).get("scope"))

    def tta_lever(self, model: str, tgt: str, unadapted: Dict[str, Any]) -> Dict[str, Any]:
        """Each ``TTA_VARIANTS`` of ``model`` on the target's val split, the best evaluated on its tests and
        paired on val against plain inference (``unadapted``: ``adapted_lever``'s record, its ``source`` rows)."""
        t = self.p["sites"][tgt]
        on_val = OrderedDict((v, self.evaluate(f"{model}_tta_{v}_to_{tgt}_val", model, {v: self.weights(model)},
                                               [t["val"]], opts)["rows"][(v, t["val"])])
                             for v, opts in TTA_VARIANTS.items())
        c = self.choose_on_val(f"{model}_tta_to_{tgt}", t["val"], unadapted["evaluation"]["rows"][("source", t["val"])],
                               on_val, "use TTA", "do not")
        best = c["chosen"]
        ev = self.evaluate(f"{model}_tta_{best}_on_{tgt}", model, {best: self.weights(model)}, t["tests"],
                           TTA_VARIANTS[best])
        return OrderedDict(selection_set=t["val"], val_AP50=c["val_AP50"], chosen=best, opts=TTA_VARIANTS[best],
                           val_paired_vs_plain=c["paired"], val_decision=c["decision"], evaluation=ev)

    def direction(self, src: str, tgt: str, with_mixed: bool, with_aug: bool = True) -> Dict[str, Any]:
        """One direction, recorded in the result and saved after each stage: ``source`` and
        ``+adapt`` (and ``mixed``) before the ``+aug`` training starts, so that a run stopped during
        it keeps them. ``with_aug=False`` starts no ``+aug`` training: ``+aug``/``+both`` are reported
        where it is finished (or adopted) already, else recorded as not measured."""
        t = self.p["sites"][tgt]
        src_only, src_aug = f"{src}_only", f"{src}_scanner_aug"
        self.train(src_only, src, aug=False)
        res: Dict[str, Any] = OrderedDict(source=src, target=tgt, tests=t["tests"])
        self.result["directions"][f"{src}_to_{tgt}"] = res
        rows: Dict[str, Dict[str, Any]] = OrderedDict()
        ad = self.adapted_lever(src_only, src, tgt)
        for ds in t["tests"]:
            rows.setdefault("source", {})[ds] = ad["evaluation"]["rows"][("source", ds)]
            rows.setdefault("+adapt", {})[ds] = ad["evaluation"]["rows"][(ad["chosen"], ds)]
        res["adaptation"] = self._lever_record(ad)
        res["adaptation_cost"] = self.sizes_curve(src_only, src, tgt, ad)
        if self.tta:
            tta = self.tta_lever(src_only, tgt, ad)
            for ds in t["tests"]:
                rows.setdefault("+tta", {})[ds] = tta["evaluation"]["rows"][(tta["chosen"], ds)]
            res["tta"] = self._lever_record(tta)
            # the two label-free levers together: the val-chosen adaptation under the val-chosen TTA (no new choice)
            ev = self.evaluate(f"{src_only}_adapt_tta_{tta['chosen']}_on_{tgt}", src_only, {"adapt+tta": ad["weights"]},
                               t["tests"], tta["opts"])
            for ds in t["tests"]:
                rows.setdefault("+adapt+tta", {})[ds] = ev["rows"][("adapt+tta", ds)]
        if with_mixed:
            mixed_tests = [ds for ds in t["tests"] if ds not in self.p["mixed_trained_on"]]
            if mixed_tests:
                ev_mixed = self.evaluate(f"mixed_on_{tgt}", "mixed", {"mixed": self.weights("mixed")}, mixed_tests)
                for ds in mixed_tests:
                    rows.setdefault("mixed", {})[ds] = ev_mixed["rows"][("mixed", ds)]
        self._tabulate(res, src, tgt, rows)
        res["not_measured"] = ["+aug", "+both"]
        if not with_aug and not self.finished(src_aug):
            return res
        self.save(f"{src} -> {tgt}: +aug training")
        self.train(src_aug, src, aug=True)
        both = self.adapted_lever(src_aug, src, tgt, self.both_candidates)
        ev_aug = self.evaluate(f"{src_aug}_on_{tgt}", src_aug, {"aug": self.weights(src_aug)}, t["tests"])
        for ds in t["tests"]:
            rows.setdefault("+aug", {})[ds] = ev_aug["rows"][("aug", ds)]
            rows.setdefault("+both", {})[ds] = both["evaluation"]["rows"][(both["chosen"], ds)]
        res["adaptation_after_aug"] = self._lever_record(both)
        del res["not_measured"]
        self._tabulate(res, src, tgt, rows)
        return res

    @staticmethod
    def _lever_record(lever: Dict[str, Any]) -> Dict[str, Any]:
        return OrderedDict((k, v) for k, v in lever.items() if k not in ("evaluation", "weights"))

    def _tabulate(self, res: Dict[str, Any], src: str, tgt: str, rows: Dict[str, Dict[str, Any]]) -> None:
        """``rows`` (model -> test set -> cross_eval row) as the table, each model paired with ``source``."""
        order = [m for m in ("source", "+adapt", "+tta", "+adapt+tta", "+aug", "+both", "mixed") if m in rows]
        res["table"] = OrderedDict(
            (model, OrderedDict((ds, OrderedDict(num_images=r["num_images"], metrics=r["metrics"]))
                                for ds, r in rows[model].items())) for model in order)
        paired: Dict[str, Any] = OrderedDict()
        for model in order[1:]:
            for ds, r in rows[model].items():
                paired.setdefault(model, OrderedDict())[ds] = self.compare(
                    f"{src}_to_{tgt}/{model.strip('+')}", ds, ("source", rows["source"][ds]["predictions"]),
                    (model, r["predictions"]))
        res["paired_vs_source"] = paired

    def sizes_curve(self, model: str, src: str, tgt: str, chosen: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The chosen adaptation on fewer frames: seconds and AP50 on each target test set."""
        t = self.p["sites"][tgt]
        images = os.path.join(self.out, "adapt_images", t["train"])
        scope = chosen["scope"] or "backbone+fpn"
        out = [OrderedDict(max_images="all", num_images=chosen["chosen_record"]["num_images"],
                           seconds=chosen["chosen_record"]["seconds"],
                           AP50={ds: chosen["evaluation"]["rows"][(chosen["chosen"], ds)]["metrics"]["AP50"]["estimate"]
                                 for ds in t["tests"]})]
        weights = OrderedDict()
        recs = {}
        for n in self.sizes:
            rec = self.adapt(model, images, src, chosen["method"], scope, max_images=n)
            name = f"n{n}"
            weights[name], recs[name] = rec["weights"], rec
        if weights:
            ev = self.evaluate(f"{model}_to_{tgt}_sizes", model, weights, t["tests"])
            for name, rec in recs.items():
                out.append(OrderedDict(max_images=rec["max_images"], num_images=rec["num_images"], seconds=rec["seconds"],
                                       AP50={ds: ev["rows"][(name, ds)]["metrics"]["AP50"]["estimate"]
                                             for ds in t["tests"]}))
        return out


def render(result: Dict[str, Any]) -> str:
    """Markdown: per direction, the models' table and the paired differences against ``source``."""
    from usdet.evaluation.formatting import fmt_estimate, fmt_number

    lines = [f"# Leave one site out ({result['status']})", "",
             cross_site.budget_text(result["budget"], "training") + f"; {result['machine_note']}", ""]
    for key, d in result.get("directions", {}).items():
        lines += [f"## {d['source']} → {d['target']}", "",
                  "| model | test set | images | AP50 | AP | AP75 | penalized IoU | CPM |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, by_ds in d.get("table", {}).items():
            for ds, row in by_ds.items():
                m = row["metrics"]
                lines.append(f"| {model} | {ds} | {row['num_images']} | " + " | ".join(
                    fmt_estimate(m[k], 1 if k.startswith("AP") else 3, undefined="–") for k in ("AP50", "AP", "AP75", "penalized IoU", "CPM"))
                    + " |")
        lines += ["", "Paired against `source` on the same images (delta [95% CI], p):", "",
                  "| model | test set | ΔAP50 | ΔAP | Δ penalized IoU | ΔCPM |", "|---|---|---|---|---|---|"]
        for model, by_ds in d.get("paired_vs_source", {}).items():
            for ds, c in by_ds.items():
                cells = []
                for k in ("AP50", "AP", "piou", "cpm"):
                    v = c.get(k, {}).get("delta", {})
                    spec = "+.1f" if k.startswith("AP") else "+.3f"
                    cells.append(f"{fmt_number(v.get('estimate'), spec, undefined='–')} "
                                 f"[{fmt_number(v.get('low'), spec, undefined='–')}, "
                                 f"{fmt_number(v.get('high'), spec, undefined='–')}], "
                                 f"p {fmt_number(v.get('p_value'), '.3g', undefined='–')}")
                lines.append(f"| {model} | {ds} | " + " | ".join(cells) + " |")
        if d.get("not_measured"):
            lines += ["", "Not measured in this run: " + ", ".join(f"`{m}`" for m in d["not_measured"])
                      + " (the scanner-augmented training has not run)."]
        for lk in ("adaptation", "adaptation_after_aug", "tta"):
            if lk not in d:
                continue
            a = d[lk]
            what = "test-time augmentation" if lk == "tta" else lk.replace("_", " ")
            lines += ["", f"{what}: chosen `{a['chosen']}` on {a['selection_set']} (val AP50 "
                      + ", ".join(f"{k} {fmt_number(v, '.1f', undefined='–')}" for k, v in a["val_AP50"].items())
                      + f"); on val against {'plain inference' if lk == 'tta' else 'no adaptation'}: "
                      f"{a['val_decision']}."]
        lines += ["", "Adaptation cost (the chosen adaptation of `source`): "
                  + "; ".join(f"{c['num_images']} frames, {c['seconds']:.1f} s, AP50 "
                              + ", ".join(f"{ds} {fmt_number(v, '.1f', undefined='–')}" for ds, v in c["AP50"].items())
                              for c in d.get("adaptation_cost", [])), ""]
    lines += ["Trainings:", ""]
    for name, t in result["training"].items():
        spi = f"{t['seconds_per_iter']:.2f}" if t.get("seconds_per_iter") else "?"
        lines.append(f"- {name}: `{t['config']}` {' '.join(t['opts'][:4])}{' + scanner aug' if 'INPUT.AUG.SCANNER.SECTOR' in t['opts'] else ''}, "
                     f"{t['iterations']} it, {spi} s/it, {t['train_wall_s'] / 60:.1f} min"
                     f"{cross_site._interrupted(t)}"
                     + (f", trained by `{t['adopted_from']}` (adopted; its load not recorded here)"
                        if t.get("adopted_from") else f", mean 1-min load {t['load_avg_1min_mean']}"))
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="busi_breast", help="sites, configs and directions (default busi_breast)")
    cross_site.add_run_arguments(ap, "output/leave_site_out", "busi_only=output/busi_recipe_lite_cpu")
    ap.add_argument("--directions", nargs="+", default=None, help="SOURCE:TARGET pairs (default: the preset's)")
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES, help=f"method[:scope] list (default {DEFAULT_CANDIDATES})")
    ap.add_argument("--both-candidates", default=None,
                    help="method[:scope] list tried on the +aug model (default: --candidates); fewer saves evaluations")
    ap.add_argument("--adapt-sizes", default="10,50", help="frame counts for the cost curve (default 10,50; '' = none)")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed model (the ceiling)")
    ap.add_argument("--no-aug", action="store_true",
                    help="start no scanner-augmented training: +aug and +both are reported only where it is "
                         "finished (or adopted) already")
    ap.add_argument("--tta", action="store_true",
                    help="also the +tta lever: the source model with test-time augmentation (TTA_VARIANTS), "
                         "chosen on the target's val split")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--note", default="", help="free text recorded with the result (e.g. 'machine shared')")
    ap.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}")
    preset = PRESETS[args.preset]
    t0 = time.time()
    data, out = os.path.abspath(args.data), os.path.abspath(args.output)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.chdir(REPO)
    cross_site.FULL_ITER, cross_site.FULL_WARMUP = preset["full_iter"], preset.get("full_warmup", cross_site.FULL_WARMUP)
    sched = cross_site.schedule(args.max_iter, args.evals, args.budget_min)
    candidates = parse_candidates(args.candidates)
    sizes = [int(s) for s in args.adapt_sizes.split(",") if s.strip()]
    directions = [tuple(d.split(":")) for d in (args.directions or preset["directions"])]
    for d in directions:
        if len(d) != 2 or any(s not in preset["sites"] for s in d) or d[0] == d[1]:
            raise SystemExit(f"--directions: {':'.join(d)} is not SOURCE:TARGET of {sorted(preset['sites'])}")
    result: Dict[str, Any] = OrderedDict()
    result["status"] = "running"
    result["budget"] = cross_site.budget_record(sched)
    result["protocol"] = OrderedDict(preset=args.preset, scanner_aug=SCANNER_AUG, candidates=args.candidates,
                                     choice="adaptation chosen by AP50 on the target's val split; checkpoints on the "
                                            "source's val split; nothing chosen on a test split",
                                     adaptation_images="the target's train-split images, labels unused")
    result["machine_note"] = args.note or "machine not described"
    result["load_avg_at_start"] = os.getloadavg()
    result["command"] = " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(argv) if argv is not None else sys.argv))
    if preset.get("convert"):
        result["conversions"] = cross_site.convert(data, os.path.abspath(args.shared), REPO, os.path.join(out, "logs"))
    os.environ["USDET_DATASETS"] = data
    from usdet.data.register import register_all_usdet_datasets

    register_all_usdet_datasets(data)
    result["training"], result["directions"] = OrderedDict(), OrderedDict()
    import common

    common.RESULTS = args.results

    def save(status: str) -> None:
        result["status"] = status
        result["wall_s"] = round(time.time() - t0, 1)
        result["load_avg_1min_mean_whole_run"] = round(sum(cross_site.LOADS) / len(cross_site.LOADS), 2) \
            if cross_site.LOADS else None
        write_result("leave_site_out", result)
        from usdet.utils.io import atomic_write_text

        atomic_write_text(os.path.join(args.results, "reports", "leave_site_out.md"), render(result))

    proto = Protocol(preset, data, out, sched, args.bootstrap, candidates, sizes, result, save)
    proto.tta = args.tta
    if args.tta:
        result["protocol"]["tta_variants"] = TTA_VARIANTS
    if args.both_candidates:
        proto.both_candidates = parse_candidates(args.both_candidates)
        result["protocol"]["both_candidates"] = args.both_candidates
    names = ["mixed"] + [f"{s}_{kind}" for s in preset["sites"] for kind in ("only", "scanner_aug")]
    proto.adopted = cross_site.parse_adopt(args.adopt, names)
    with_mixed = not args.no_mixed and bool(preset.get("mixed_config"))
    if with_mixed:
        proto.train("mixed", None, aug=False)
    for src, tgt in directions:
        proto.direction(src, tgt, with_mixed, with_aug=not args.no_aug)
        save(f"{src} -> {tgt} done")
    save("complete")
    _log(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(args.results, 'leave_site_out.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
