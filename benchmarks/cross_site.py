#!/usr/bin/env python
"""The cross-site drop, measured (issue 11 section 4): BUSI-only vs BUSI + BrEaST training.

  python benchmarks/cross_site.py [--data DIR] [--output DIR] [--max-iter N] [--evals 5]
                                  [--converter-repo REPO] [--only a]

1. Converts BUSI (``busi --seed 0``), BrEaST with its default split (``breast``) and BrEaST as a
   whole (``breastall``: ``--split 0,0,1``, an external test set) into ``--data`` unless already
   there, with ``tools/convert_to_coco.py`` of ``--converter-repo`` (default: this repository;
   env ``USDET_CONVERTER_REPO``).
2. Trains (a) ``configs/BUSI/recipe_scratch_cpu.yaml`` (BUSI only) and (b)
   ``configs/BUSI/recipe_mixed_cpu.yaml`` (BUSI + BrEaST train), each a normal ``train_net.py``
   run with ``USDET_DATASETS=--data`` and its own OUTPUT_DIR, resumed with ``--resume`` when a
   run was interrupted. ``--max-iter N`` scales the schedule for a reduced budget: MAX_ITER N,
   WARMUP_ITERS and CHECKPOINT_PERIOD = EVAL_PERIOD in proportion (``--evals`` evaluations on val).
   Each checkpoint is chosen on val by the config's own rule (``model_best.pth``); no choice is
   ever made on a test split.
3. ``tools/cross_eval.py``: (a) on busi_test, breast_test, breastall_test; (b) on busi_test,
   breast_test (bootstrap CIs).
4. ``tools/compare_models.py``: paired (a) vs (b) on busi_test and on breast_test.
5. Writes ``benchmarks/results/cross_site.json`` (after each stage, atomically, with a ``status``)
   and ``benchmarks/results/reports/cross_site.md``.

The full budget is the recipes' own (1100 iterations, about 65 minutes each on 2 idle cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, write_result  # noqa: E402
import summarize_run  # noqa: E402

PY = sys.executable
FULL_ITER = 1100  # the recipes' MAX_ITER
FULL_WARMUP = 100
#: name -> (config, test datasets it is evaluated on, pixel_stats of its training sources)
MODELS = OrderedDict([
    ("busi_only", ("configs/BUSI/recipe_scratch_cpu.yaml", ["busi_test", "breast_test", "breastall_test"],
                   ["busi"])),
    ("mixed", ("configs/BUSI/recipe_mixed_cpu.yaml", ["busi_test", "breast_test"], ["busi", "breast"])),
])
#: name -> converter arguments (after the subcommand), root under the shared data folder
CONVERSIONS = OrderedDict([
    ("busi", ["busi", "--root", "{shared}/busi", "--seed", "0", "--workers", "2"]),
    ("breast", ["breast", "--root", "{shared}/breast"]),
    ("breastall", ["breast", "--root", "{shared}/breast", "--split", "0,0,1"]),
])
PAIRED_ON = ("busi_test", "breast_test")
LOADS: List[float] = []  # 1-minute load averages sampled while training and evaluating


def _rel(path: str) -> str:
    """A path as recorded in the result: relative to the repository, so the JSON names no machine."""
    return os.path.relpath(path, REPO)


def _log(msg: str) -> None:
    print(f"[cross_site {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: List[str], log: str, cwd: str = REPO, env: Optional[Dict[str, str]] = None,
         progress: Optional[str] = None, total: int = 0) -> float:
    """Run ``cmd``, output to ``log``; wall seconds. With ``progress`` (a training OUTPUT_DIR), a
    tqdm bar follows the iterations in its ``metrics.json``. Fails loudly with the log's path."""
    from tqdm import tqdm

    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        bar = tqdm(total=total, desc=os.path.basename(progress), unit="it") if progress else None
        while proc.poll() is None:
            time.sleep(5)
            LOADS.append(os.getloadavg()[0])
            if bar is not None:
                ev = summarize_run._events(os.path.join(progress, "metrics.json"))
                its = [e["iteration"] + 1 for e in ev if "iteration" in e]
                if its:
                    bar.n = min(max(its), total)
                    bar.refresh()
        if bar is not None:
            bar.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return time.time() - t0


def schedule(max_iter: Optional[int], evals: int) -> Dict[str, int]:
    """MAX_ITER, WARMUP_ITERS and CHECKPOINT_PERIOD = EVAL_PERIOD for ``max_iter`` (None: full)."""
    n = max_iter or FULL_ITER
    period = max(1, round(n / evals))
    return {"MAX_ITER": n, "WARMUP_ITERS": max(1, round(FULL_WARMUP * n / FULL_ITER)),
            "CHECKPOINT_PERIOD": period, "EVAL_PERIOD": period}


def convert(data: str, shared: str, converter_repo: str, logs: str) -> Dict[str, Any]:
    """Each conversion unless its ``report.json`` exists (the converters write it last)."""
    out = {}
    env = dict(os.environ, PYTHONPATH=converter_repo)
    for name, argv in CONVERSIONS.items():
        dest = os.path.join(data, name)
        if os.path.isfile(os.path.join(dest, "report.json")):
            _log(f"{name}: already converted in {dest}")
            out[name] = {"converted": "earlier"}
            continue
        _log(f"converting {name} -> {dest}")
        cmd = [PY, "tools/convert_to_coco.py"] + [a.format(shared=shared) for a in argv] + ["--output", dest]
        out[name] = {"converted": "now", "seconds": round(_run(cmd, os.path.join(logs, f"convert_{name}.log"),
                                                               cwd=converter_repo, env=env), 1)}
    for name in CONVERSIONS:
        with open(os.path.join(data, name, "report.json")) as fh:
            rep = json.load(fh)
        out[name]["summary"] = {"counts": rep.get("counts"), "split": rep.get("split"),
                                "skipped": len(rep.get("skipped") or [])}
    return out


def _interrupted(t: Dict[str, Any]) -> str:
    """What the training time leaves out: attempts killed before they could record their time."""
    n = t.get("interrupted_attempts", 0)
    if not n:
        return ""
    its = ", ".join(str(i) for i in t.get("resumed_from_iteration", []))
    return (f" in its last attempt; {n} earlier attempt{'s' if n > 1 else ''} interrupted and not timed "
            f"(resumed at iteration {its})")


def _checkpoint_iteration(run_dir: str) -> Optional[int]:
    """The iteration a ``--resume`` starts from: the one after ``last_checkpoint``'s (model_0000439 -> 440)."""
    with open(os.path.join(run_dir, "last_checkpoint")) as fh:
        name = fh.read().strip()
    digits = "".join(c for c in os.path.splitext(name)[0] if c.isdigit())
    return int(digits) + 1 if digits else None


def train(name: str, cfg: str, sources: List[str], data: str, run_dir: str, sched: Dict[str, int],
          logs: str, extra_opts: Sequence[str] = ()) -> Dict[str, Any]:
    """One resumable ``train_net.py`` run; its wall time adds up over the attempts that finished.

    An attempt killed with this script (a stopped session) cannot record its time: the state file
    marks each attempt as running before it starts, so a later run counts it as interrupted and
    the result says which iterations were resumed from, instead of passing the last attempt's
    time off as the whole training's. ``extra_opts``: further ``KEY VALUE`` overrides (datasets,
    augmentation) placed before the schedule's.
    """
    from usdet.utils.io import atomic_write_json

    state_path = os.path.join(run_dir, "cross_site_wall.json")
    state: Dict[str, Any] = {"train_wall_s": 0.0, "attempts": 0}
    if os.path.isfile(state_path):
        with open(state_path) as fh:
            state = json.load(fh)
    if not os.path.isfile(os.path.join(run_dir, "model_final.pth")):
        os.makedirs(run_dir, exist_ok=True)
        resume = os.path.isfile(os.path.join(run_dir, "last_checkpoint"))
        if resume:
            state.setdefault("resumed_from_iteration", []).append(_checkpoint_iteration(run_dir))
            if state.pop("running", False) or state["attempts"] == 0:  # killed before it could record itself
                state["interrupted_attempts"] = state.get("interrupted_attempts", 0) + 1
        state["running"] = True
        atomic_write_json(state_path, state)
        _log(f"training {name} ({cfg}, {sched['MAX_ITER']} iterations){' resumed' if resume else ''} -> {run_dir}")
        stats = ",".join(os.path.join(data, s, "pixel_stats.json") for s in sources)
        cmd = [PY, "tools/train_net.py", "--config-file", cfg] + (["--resume"] if resume else []) + [
            "INPUT.NORMALIZATION_FILE", stats, *extra_opts, "SOLVER.MAX_ITER", str(sched["MAX_ITER"]),
            "SOLVER.WARMUP_ITERS", str(sched["WARMUP_ITERS"]),
            "SOLVER.CHECKPOINT_PERIOD", str(sched["CHECKPOINT_PERIOD"]),
            "TEST.EVAL_PERIOD", str(sched["EVAL_PERIOD"]), "OUTPUT_DIR", run_dir]
        loads0 = len(LOADS)
        s = _run(cmd, os.path.join(logs, f"train_{name}.log"), env=dict(os.environ, USDET_DATASETS=data),
                 progress=run_dir, total=sched["MAX_ITER"])
        state.pop("running", None)
        state.update(train_wall_s=state["train_wall_s"] + s, attempts=state["attempts"] + 1,
                     load_avg_1min_mean=round(sum(LOADS[loads0:]) / max(1, len(LOADS) - loads0), 2),
                     load_avg_1min_max=max(LOADS[loads0:], default=None))
        atomic_write_json(state_path, state)
    events = summarize_run._events(os.path.join(run_dir, "metrics.json"))
    with open(os.path.join(run_dir, "best_metric.json")) as fh:
        best = json.load(fh)
    evals = [{k: v for k, v in e.items() if "AP50" in k or k in ("iteration",) or k.endswith("piou/score")}
             for e in events if any(k.endswith("bbox/AP50") for k in e)]
    return OrderedDict(config=cfg, output_dir=_rel(run_dir), iterations=sched["MAX_ITER"],
                       seconds_per_iter=summarize_run.seconds_per_iter(events),
                       train_wall_s=round(state["train_wall_s"], 1), attempts=state["attempts"],
                       interrupted_attempts=state.get("interrupted_attempts", 0),
                       resumed_from_iteration=state.get("resumed_from_iteration", []),
                       load_avg_1min_mean=state.get("load_avg_1min_mean"),
                       load_avg_1min_max=state.get("load_avg_1min_max"),
                       chosen_on_val=best, val_curve=evals)


def cross_eval(name: str, cfg: str, sources: List[str], datasets: List[str], data: str, run_dir: str,
               out: str, bootstrap: int, logs: str) -> Dict[str, Any]:
    """``tools/cross_eval.py`` of the run's val-chosen ``model_best.pth`` (skipped when done)."""
    res_path = os.path.join(out, "cross_eval.json")
    wall_path = os.path.join(out, "cross_site_wall.json")
    if not os.path.isfile(res_path):
        _log(f"evaluating {name} on {', '.join(datasets)}")
        stats = ",".join(os.path.join(data, s, "pixel_stats.json") for s in sources)
        cmd = [PY, "tools/cross_eval.py", "--config-file", cfg, "--weights",
               f"{name}={os.path.join(run_dir, 'model_best.pth')}", "--datasets", *datasets,
               "--output", out, "--bootstrap", str(bootstrap), "INPUT.NORMALIZATION_FILE", stats]
        loads0 = len(LOADS)
        wall = round(_run(cmd, os.path.join(logs, f"eval_{name}.log"), env=dict(os.environ, USDET_DATASETS=data)), 1)
        from usdet.utils.io import atomic_write_json

        atomic_write_json(wall_path, {"eval_wall_s": wall, "load_avg_1min_mean": round(
            sum(LOADS[loads0:]) / max(1, len(LOADS) - loads0), 2)})
    with open(wall_path) as fh:
        wall = json.load(fh)
    with open(res_path) as fh:
        r = json.load(fh)
    rows = OrderedDict()
    for row in r["rows"]:
        rows[row["dataset"]] = OrderedDict(num_images=row["num_images"], num_lesion_images=row["num_lesion_images"],
                                           metrics=row["metrics"],
                                           predictions=_rel(os.path.join(out, row["predictions"])))
    return OrderedDict(eval_wall_s=wall["eval_wall_s"], load_avg_1min_mean=wall["load_avg_1min_mean"], datasets=rows)


def compare(a: Dict[str, Any], b: Dict[str, Any], data: str, out: str, bootstrap: int, logs: str) -> Dict[str, Any]:
    """Paired (a) vs (b) on each dataset both were evaluated on."""
    res = OrderedDict()
    for ds in PAIRED_ON:
        dest = os.path.join(out, ds)
        if not os.path.isfile(os.path.join(dest, "comparison.json")):
            _log(f"paired comparison on {ds}")
            source, split = ds.rsplit("_", 1)
            _run([PY, "tools/compare_models.py", "--gt", os.path.join(data, source, "annotations", f"{split}.json"),
                  "--pred", f"busi_only={a['datasets'][ds]['predictions']}",
                  "--pred", f"mixed={b['datasets'][ds]['predictions']}",
                  "--bootstrap", str(bootstrap), "--output", dest], os.path.join(logs, f"compare_{ds}.log"))
        with open(os.path.join(dest, "comparison.json")) as fh:
            c = json.load(fh)
        res[ds] = OrderedDict((k, OrderedDict(values=v["values"], delta=v["delta"])) for k, v in c["metrics"].items())
    return res


def differences(result: Dict[str, Any]) -> None:
    """The drop of the BUSI-only model from BUSI test to BrEaST (points), and mixed − BUSI-only."""
    ev = result["evaluations"]
    a = ev.get("busi_only", {}).get("datasets", {})
    if "busi_test" in a:
        result["drop_busi_only"] = OrderedDict(
            (ds, OrderedDict((m, _sub(a["busi_test"]["metrics"][m], a[ds]["metrics"][m]))
                             for m in a["busi_test"]["metrics"]))
            for ds in ("breast_test", "breastall_test") if ds in a)
    b = ev.get("mixed", {}).get("datasets", {})
    if b and a:
        result["mixed_minus_busi_only"] = OrderedDict(
            (ds, OrderedDict((m, _sub(b[ds]["metrics"][m], a[ds]["metrics"][m])) for m in b[ds]["metrics"]))
            for ds in PAIRED_ON if ds in a and ds in b)
        if "busi_test" in b and "breast_test" in b:
            result["drop_mixed"] = {"breast_test": OrderedDict(
                (m, _sub(b["busi_test"]["metrics"][m], b["breast_test"]["metrics"][m])) for m in b["busi_test"]["metrics"])}


def _sub(x: Dict[str, Any], y: Dict[str, Any]) -> Optional[float]:
    if x.get("estimate") is None or y.get("estimate") is None:
        return None
    return round(x["estimate"] - y["estimate"], 4)


def render(result: Dict[str, Any]) -> str:
    """The markdown table of ``cross_site.json``."""
    from usdet.evaluation.formatting import fmt_estimate, fmt_number

    def _num(x: Optional[float], spec: str) -> str:
        return fmt_number(x, spec, undefined="–")

    b = result["budget"]
    lines = [f"# Cross-site drop: BUSI-only vs BUSI + BrEaST training ({result['status']})", "",
             f"Budget: **{b['max_iter']} of {b['full_max_iter']} iterations** per model"
             + (" (reduced)" if b["reduced"] else "") + f", {b['evaluations_on_val']} val evaluations; "
             + result["machine_note"], "",
             "| model | test set | images (lesion-free) | AP50 | AP | penalized IoU | CPM | image AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ev in result["evaluations"].items():
        for ds, row in ev["datasets"].items():
            m = row["metrics"]
            lines.append(f"| {name} | {ds} | {row['num_images']} ({row['num_images'] - row['num_lesion_images']}) | "
                         + " | ".join(
                fmt_estimate(m[k], 1 if k in ("AP50", "AP") else 3, undefined="–") for k in ("AP50", "AP", "penalized IoU", "CPM", "image AUC")) + " |")
    lines += ["", "Image AUC needs lesion-free images: with fewer than 5 (BrEaST has 4 in all) it says "
              "nothing, and the paired DeLong test is undefined (–)."]
    for key, title in (("drop_busi_only", "Drop of the BUSI-only model, BUSI test minus"),
                       ("drop_mixed", "Drop of the mixed model, BUSI test minus"),
                       ("mixed_minus_busi_only", "Mixed minus BUSI-only (unpaired point estimates) on")):
        for ds, d in result.get(key, {}).items():
            lines.append("")
            lines.append(f"{title} {ds}: " + ", ".join(
                f"{m} –" if v is None else f"{m} {v:+.1f}" if m in ("AP50", "AP") else f"{m} {v:+.3f}"
                for m, v in d.items()))
    for ds, c in result.get("paired", {}).items():
        lines += ["", f"Paired bootstrap, mixed − BUSI-only on {ds} (same images):", "",
                  "| metric | BUSI-only | mixed | delta [95% CI] | p |", "|---|---|---|---|---|"]
        for m, v in c.items():
            d = v["delta"]
            lines.append(f"| {m} | {_num(v['values']['busi_only'], '.4f')} | {_num(v['values']['mixed'], '.4f')} | "
                         f"{_num(d['estimate'], '+.4f')} [{_num(d['low'], '+.4f')}, {_num(d['high'], '+.4f')}] | "
                         f"{_num(d['p_value'], '.3g')} |")
    lines += ["", "Runs:", ""]
    for name, t in result["training"].items():
        spi = f"{t['seconds_per_iter']:.2f}" if t["seconds_per_iter"] else "?"
        lines.append(f"- {name}: `{t['config']}`, {t['iterations']} it, {spi} s/it, "
                     f"training {t['train_wall_s'] / 60:.1f} min (incl. val evaluations){_interrupted(t)}, "
                     f"mean 1-min load {t['load_avg_1min_mean']}; checkpoint chosen on val: {t['chosen_on_val']}")
    for name, e in result["evaluations"].items():
        lines.append(f"- {name} test evaluations (`tools/cross_eval.py`): {e['eval_wall_s'] / 60:.1f} min")
    lines.append(f"- wall time of the stages: {result['stages_wall_s'] / 60:.1f} min "
                 f"(this invocation: {result['wall_s'] / 60:.1f} min)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="datasets", help="USDET_DATASETS folder of the conversions (default datasets)")
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"),
                    help="folder holding busi/ and breast/ (default ../shared/data)")
    ap.add_argument("--output", default="output/cross_site", help="trainings, evaluations and logs")
    ap.add_argument("--max-iter", type=int, default=None,
                    help=f"reduced budget: iterations per model (default the recipes' {FULL_ITER})")
    ap.add_argument("--evals", type=int, default=5, help="val evaluations per training (default 5)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of every CI (default 1000)")
    ap.add_argument("--converter-repo", default=os.environ.get("USDET_CONVERTER_REPO", REPO),
                    help="repository whose tools/convert_to_coco.py converts (default this one; "
                         "env USDET_CONVERTER_REPO)")
    ap.add_argument("--only", choices=("a", "all"), default="all", help="'a': the BUSI-only model alone")
    ap.add_argument("--note", default="", help="free text recorded with the result (e.g. 'machine shared')")
    ap.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    t0 = time.time()
    data, out = os.path.abspath(args.data), os.path.abspath(args.output)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    os.chdir(REPO)
    sched = schedule(args.max_iter, args.evals)
    result: Dict[str, Any] = OrderedDict()
    result["status"] = "running"
    result["budget"] = OrderedDict(max_iter=sched["MAX_ITER"], full_max_iter=FULL_ITER,
                                   reduced=sched["MAX_ITER"] < FULL_ITER, schedule=sched,
                                   evaluations_on_val=-(-sched["MAX_ITER"] // sched["EVAL_PERIOD"]))
    result["machine_note"] = args.note or "machine not described"
    result["load_avg_at_start"] = os.getloadavg()
    result["command"] = " ".join(shlex.quote(a) for a in sys.argv)
    result["conversions"] = convert(data, os.path.abspath(args.shared), os.path.abspath(args.converter_repo), logs)
    result["training"], result["evaluations"] = OrderedDict(), OrderedDict()
    import common

    common.RESULTS = args.results
    names = ["busi_only"] if args.only == "a" else list(MODELS)

    def save(status: str) -> None:
        result["status"] = status
        result["wall_s"] = round(time.time() - t0, 1)
        result["stages_wall_s"] = round(sum(t["train_wall_s"] for t in result["training"].values())
                                        + sum(e["eval_wall_s"] for e in result["evaluations"].values())
                                        + sum(c.get("seconds", 0) for c in result["conversions"].values()), 1)
        result["load_avg_1min_mean_whole_run"] = round(sum(LOADS) / len(LOADS), 2) if LOADS else None
        differences(result)
        write_result("cross_site", result)
        from usdet.utils.io import atomic_write_text

        atomic_write_text(os.path.join(args.results, "reports", "cross_site.md"), render(result))

    for i, name in enumerate(names):
        cfg, datasets, sources = MODELS[name]
        run_dir = os.path.join(out, name)
        result["training"][name] = train(name, cfg, sources, data, run_dir, sched, logs)
        result["evaluations"][name] = cross_eval(name, cfg, sources, datasets, data, run_dir,
                                                 os.path.join(out, f"eval_{name}"), args.bootstrap, logs)
        save(f"{name} trained and evaluated" + ("" if i == len(names) - 1 else "; the rest pending"))
    if len(names) == 2:
        result["paired"] = compare(result["evaluations"]["busi_only"], result["evaluations"]["mixed"], data,
                                   os.path.join(out, "paired"), max(args.bootstrap, 1000), logs)
        save("complete")
    _log(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(args.results, 'cross_site.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
