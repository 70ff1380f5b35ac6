#!/usr/bin/env python
"""The cross-site drop, measured (issue 11 section 4): BUSI-only vs BUSI + BrEaST training.

  python benchmarks/cross_site.py [--data DIR] [--output DIR] [--max-iter N] [--evals 5]
                                  [--converter-repo REPO] [--only a]

1. Converts BUSI (``busi --seed 0``), BrEaST with its default split (``breast``) and BrEaST as a
   whole (``breastall``: ``--split 0,0,1``, an external test set) into ``--data`` unless already
   there, with ``tools/convert_to_coco.py`` of ``--converter-repo`` (default: this repository;
   env ``USDET_CONVERTER_REPO``).
2. Trains (a) ``configs/BUSI/recipe_lite_cpu.yaml`` (BUSI only) and (b)
   ``configs/BUSI/recipe_mixed_cpu.yaml`` (BUSI + BrEaST train), each a normal ``train_net.py``
   run with ``USDET_DATASETS=--data`` and its own OUTPUT_DIR, resumed with ``--resume`` when a
   run was interrupted. ``--max-iter N`` counts a reduced run in iterations instead: MAX_ITER N,
   WARMUP_ITERS and CHECKPOINT_PERIOD = EVAL_PERIOD in proportion (``--evals`` evaluations on val).
   Each checkpoint is chosen on val by the config's own rule (``model_best.pth``); no choice is
   ever made on a test split.
3. ``tools/cross_eval.py``: (a) on busi_test, breast_test, breastall_test; (b) on busi_test,
   breast_test (bootstrap CIs).
4. ``tools/compare_models.py``: paired (a) vs (b) on busi_test and on breast_test.
5. Writes ``benchmarks/results/cross_site.json`` (after each stage, atomically, with a ``status``)
   and ``benchmarks/results/reports/cross_site.md``.

The full budget is the recipes' own: a 69-minute wall-clock budget per training (training plus
its val evaluations, ``SOLVER.TIME_BUDGET_MIN``); ``--budget-min M`` for another, ``--max-iter N``
for a reduced run counted in iterations instead (the budget off). ``--adopt NAME=RUN_DIR`` takes a
training already done elsewhere (``make train-busi-cpu``, ``make train-mixed-cpu``) instead of
training it again, after checking that its ``config.yaml`` is the one this script would train.
"""
from __future__ import annotations

import argparse
import json
import math
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
FULL_ITER = 1100  # iterations of a full run counted in iterations (recipe_scratch_cpu.yaml's MAX_ITER)
FULL_WARMUP = 100
#: the recipe whose SOLVER.TIME_BUDGET_MIN is a full run's wall-clock budget (read, not repeated here)
BUDGET_RECIPE = os.path.join(REPO, "configs", "BUSI", "recipe_lite_cpu.yaml")
#: name -> (config, test datasets it is evaluated on, pixel_stats of its training sources)
MODELS = OrderedDict([
    ("busi_only", ("configs/BUSI/recipe_lite_cpu.yaml", ["busi_test", "breast_test", "breastall_test"],
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
        bar = tqdm(total=total or None, desc=os.path.basename(progress), unit="it") if progress else None
        while proc.poll() is None:
            time.sleep(5)
            LOADS.append(os.getloadavg()[0])
            if bar is not None:
                ev = summarize_run._events(os.path.join(progress, "metrics.json"))
                its = [e["iteration"] + 1 for e in ev if "iteration" in e]
                if its:
                    bar.n = min(max(its), total) if total else max(its)
                    bar.refresh()
        if bar is not None:
            bar.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return time.time() - t0


def full_budget_min() -> float:
    """A full run's wall-clock budget: ``BUDGET_RECIPE``'s ``SOLVER.TIME_BUDGET_MIN`` (the light
    recipes' budget), so that a change to the recipe cannot leave these scripts behind."""
    from usdet.engine.setup import build_config

    return float(build_config(BUDGET_RECIPE, resolve=False).SOLVER.TIME_BUDGET_MIN)


def schedule(max_iter: Optional[int], evals: int, budget_min: Optional[float] = None) -> Dict[str, Any]:
    """The training schedule's overrides: a wall-clock budget (``TIME_BUDGET_MIN``, default the full
    :func:`full_budget_min`; the recipe's own iterations, warmup and periods), or with ``max_iter`` a run
    counted in iterations: MAX_ITER, WARMUP_ITERS and CHECKPOINT_PERIOD = EVAL_PERIOD in proportion
    (``evals`` evaluations on val) and the budget off."""
    if max_iter and budget_min:
        raise SystemExit("--max-iter and --budget-min: give one (iterations or minutes), not both")
    if not max_iter:
        return {"TIME_BUDGET_MIN": float(budget_min or full_budget_min())}
    period = max(1, round(max_iter / evals))
    return {"MAX_ITER": max_iter, "WARMUP_ITERS": max(1, round(FULL_WARMUP * max_iter / FULL_ITER)),
            "CHECKPOINT_PERIOD": period, "EVAL_PERIOD": period, "TIME_BUDGET_MIN": 0.0}


def schedule_opts(sched: Dict[str, Any]) -> List[str]:
    """``KEY VALUE`` overrides of a :func:`schedule`."""
    keys = {"MAX_ITER": "SOLVER.MAX_ITER", "WARMUP_ITERS": "SOLVER.WARMUP_ITERS",
            "CHECKPOINT_PERIOD": "SOLVER.CHECKPOINT_PERIOD", "EVAL_PERIOD": "TEST.EVAL_PERIOD",
            "TIME_BUDGET_MIN": "SOLVER.TIME_BUDGET_MIN"}
    return [x for k, v in sched.items() for x in (keys[k], str(v))]


def budget_record(sched: Dict[str, Any]) -> Dict[str, Any]:
    """What the result says of the budget: minutes or iterations, full or reduced."""
    if sched.get("TIME_BUDGET_MIN"):
        m, full = sched["TIME_BUDGET_MIN"], full_budget_min()
        return OrderedDict(budget_min=m, full_budget_min=full, reduced=m < full,
                           schedule=sched, evaluations_on_val="every SOLVER.CHECKPOINT_PERIOD iterations and at the end")
    return OrderedDict(max_iter=sched["MAX_ITER"], full_max_iter=FULL_ITER, reduced=sched["MAX_ITER"] < FULL_ITER,
                       schedule=sched, evaluations_on_val=-(-sched["MAX_ITER"] // sched["EVAL_PERIOD"]))


def budget_text(b: Dict[str, Any], what: str = "model") -> str:
    """``budget_record`` in words, for the reports."""
    if "budget_min" in b:
        return (f"Budget: **a {b['budget_min']:g}-minute wall-clock budget** per {what} (training and its val "
                f"evaluations)" + (f" (reduced, full {b['full_budget_min']:g})" if b["reduced"] else ""))
    return (f"Budget: **{b['max_iter']} of {b['full_max_iter']} iterations** per {what}"
            + (" (reduced)" if b["reduced"] else "") + f", {b['evaluations_on_val']} val evaluations")


#: keys (prefixes) that may differ between an adopted run and the one this script would train: the
#: output folder, the statistics files' paths (their values are compared as PIXEL_MEAN/STD) and the
#: clip-prediction defaults, which training never reads (they changed after issue 22)
_ADOPT_IGNORED = ("OUTPUT_DIR", "INPUT.NORMALIZATION_FILE", "CLIP.")


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    """A config as ``{"A.B.C": value}`` (yacs' CfgNode has no diff of its own)."""
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _same_value(a: Any, b: Any) -> bool:
    """Equal, numbers to 1e-3 (a config dumped to YAML and read back loses the last digits)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
    return a == b


def state_path(run_dir: str) -> str:
    """The training's time record: in its own folder, or beside the link of an adopted training
    (whose folder is another run's output, shared by every script that adopts it: never written)."""
    if os.path.islink(run_dir):
        return run_dir.rstrip(os.sep) + ".cross_site_wall.json"
    return os.path.join(run_dir, "cross_site_wall.json")


def adopt(name: str, src_dir: str, run_dir: str, cfg: str, opts: Sequence[str]) -> None:
    """Use the finished training in ``src_dir`` as ``run_dir`` (a link) instead of training it here.

    Refused, naming the keys, unless ``src_dir/config.yaml`` equals ``cfg`` + ``opts`` (paths of
    the output and of the statistics files aside: the statistics' values are compared through the
    resolved PIXEL_MEAN/STD). Its training time is the budget clock's (``evaluations.jsonl``); the
    machine load of a run made elsewhere is unknown here and recorded as such.
    """
    from usdet.engine.setup import build_config
    from usdet.utils.io import atomic_write_json

    src_dir = os.path.abspath(src_dir)
    if os.path.realpath(run_dir) == src_dir and os.path.isfile(state_path(run_dir)):
        return  # adopted by an earlier invocation
    for f in ("config.yaml", "model_final.pth", "model_best.pth", "best_metric.json", "metrics.json"):
        if not os.path.isfile(os.path.join(src_dir, f)):
            raise SystemExit(f"--adopt {name}={src_dir}: no {f} there (not a finished training)")
    if os.path.lexists(run_dir):
        raise SystemExit(f"--adopt {name}={src_dir}: {run_dir} exists already; remove it or drop --adopt")
    want = _flat(build_config(cfg, list(opts)))
    have = _flat(build_config(os.path.join(src_dir, "config.yaml")))
    diff = sorted(k for k in set(want) | set(have) if not k.startswith(_ADOPT_IGNORED)
                  and not _same_value(want.get(k), have.get(k)))
    if diff:
        raise SystemExit(f"--adopt {name}={src_dir}: its config.yaml is not {cfg} with this script's overrides; "
                         "differs in " + ", ".join(f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in diff))
    wall = None
    ev_path = os.path.join(src_dir, "evaluations.jsonl")
    if os.path.isfile(ev_path):
        with open(ev_path) as fh:
            last = [json.loads(line) for line in fh if line.strip()][-1]
        wall = last.get("eval_end_s", last.get("elapsed_s"))
    if wall is None:
        raise SystemExit(f"--adopt {name}={src_dir}: no evaluations.jsonl with the budget clock, so its training "
                         "time is unknown")
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    os.symlink(src_dir, run_dir)
    atomic_write_json(state_path(run_dir),
                      {"train_wall_s": float(wall), "attempts": 1, "adopted_from": _rel(src_dir),
                       "load_avg_1min_mean": None, "load_avg_1min_max": None})
    _log(f"{name}: adopted the finished training in {src_dir} ({float(wall) / 60:.1f} min by its budget clock)")


def add_run_arguments(ap: argparse.ArgumentParser, output: str, adopt_example: str) -> None:
    """The options this script and leave_site_out.py share: data, output, budget, adopted trainings."""
    ap.add_argument("--data", default="datasets", help="USDET_DATASETS folder of the conversions (default datasets)")
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"),
                    help="folder holding busi/ and breast/ (default ../shared/data)")
    ap.add_argument("--output", default=output, help=f"trainings, evaluations and logs (default {output})")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="wall-clock budget per training in minutes (default the light recipe's SOLVER.TIME_BUDGET_MIN, "
                         f"{os.path.relpath(BUDGET_RECIPE, REPO)})")
    ap.add_argument("--max-iter", type=int, default=None,
                    help="a run counted in iterations instead of minutes (the budget off): iterations per training")
    ap.add_argument("--adopt", action="append", default=[], metavar="NAME=RUN_DIR",
                    help=f"use a finished training (e.g. {adopt_example}) instead of training NAME here; refused "
                         "unless its config is the one this script would train")
    ap.add_argument("--evals", type=int, default=5, help="val evaluations per training with --max-iter (default 5)")


def parse_adopt(items: Sequence[str], names: Sequence[str]) -> Dict[str, str]:
    """``["NAME=RUN_DIR", ...]`` -> {NAME: RUN_DIR}; NAME must be one this script trains."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or name not in names:
            raise SystemExit(f"--adopt {item!r}: expected NAME=RUN_DIR with NAME one of {sorted(names)}")
        out[name] = path
    return out


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


def train_opts(sources: List[str], data: str, sched: Dict[str, Any], run_dir: str,
               extra_opts: Sequence[str] = ()) -> List[str]:
    """The ``KEY VALUE`` overrides a training gets: its sources' statistics, ``extra_opts``, the schedule."""
    stats = ",".join(os.path.join(data, s, "pixel_stats.json") for s in sources)
    return ["INPUT.NORMALIZATION_FILE", stats, *extra_opts, *schedule_opts(sched), "OUTPUT_DIR", run_dir]


def train(name: str, cfg: str, sources: List[str], data: str, run_dir: str, sched: Dict[str, Any],
          logs: str, extra_opts: Sequence[str] = ()) -> Dict[str, Any]:
    """One resumable ``train_net.py`` run; its wall time adds up over the attempts that finished.

    An attempt killed with this script (a stopped session) cannot record its time: the state file
    marks each attempt as running before it starts, so a later run counts it as interrupted and
    the result says which iterations were resumed from, instead of passing the last attempt's
    time off as the whole training's. ``extra_opts``: further ``KEY VALUE`` overrides (datasets,
    augmentation) placed before the schedule's.
    """
    from usdet.utils.io import atomic_write_json

    record = state_path(run_dir)
    state: Dict[str, Any] = {"train_wall_s": 0.0, "attempts": 0}
    if os.path.isfile(record):
        with open(record) as fh:
            state = json.load(fh)
    if not os.path.isfile(os.path.join(run_dir, "model_final.pth")):
        os.makedirs(run_dir, exist_ok=True)
        resume = os.path.isfile(os.path.join(run_dir, "last_checkpoint"))
        if resume:
            state.setdefault("resumed_from_iteration", []).append(_checkpoint_iteration(run_dir))
            if state.pop("running", False) or state["attempts"] == 0:  # killed before it could record itself
                state["interrupted_attempts"] = state.get("interrupted_attempts", 0) + 1
        state["running"] = True
        atomic_write_json(record, state)
        what = (f"{sched['MAX_ITER']} iterations" if "MAX_ITER" in sched
                else f"{sched['TIME_BUDGET_MIN']:g}-minute budget")
        _log(f"training {name} ({cfg}, {what}){' resumed' if resume else ''} -> {run_dir}")
        cmd = [PY, "tools/train_net.py", "--config-file", cfg] + (["--resume"] if resume else []) + \
            train_opts(sources, data, sched, run_dir, extra_opts)
        loads0 = len(LOADS)
        s = _run(cmd, os.path.join(logs, f"train_{name}.log"), env=dict(os.environ, USDET_DATASETS=data),
                 progress=run_dir, total=sched.get("MAX_ITER", 0))
        state.pop("running", None)
        state.update(train_wall_s=state["train_wall_s"] + s, attempts=state["attempts"] + 1,
                     load_avg_1min_mean=round(sum(LOADS[loads0:]) / max(1, len(LOADS) - loads0), 2),
                     load_avg_1min_max=max(LOADS[loads0:], default=None))
        atomic_write_json(record, state)
    events = summarize_run._events(os.path.join(run_dir, "metrics.json"))
    with open(os.path.join(run_dir, "best_metric.json")) as fh:
        best = json.load(fh)
    evals = [{k: v for k, v in e.items() if "AP50" in k or k in ("iteration",) or k.endswith("piou/score")}
             for e in events if any(k.endswith("bbox/AP50") for k in e)]
    its = [e["iteration"] + 1 for e in events if "iteration" in e and "total_loss" in e]  # training rows
    return OrderedDict(config=cfg, output_dir=_rel(run_dir),
                       iterations=sched.get("MAX_ITER") or max(its, default=None),
                       adopted_from=state.get("adopted_from"),
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


def evaluate_cached(out: str, config_file: str, weights: Dict[str, str], datasets: Sequence[str],
                    bootstrap: int, wall_name: str, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """In-process ``cross_evaluate`` of ``{name: weights}`` on ``datasets`` into ``out`` (config overrides
    ``opts``, e.g. test-time augmentation), skipped when its ``wall_name`` record exists (so a resumed
    benchmark redoes nothing) -> ``{"cross_eval", "wall"}``."""
    from usdet.engine.setup import build_config
    from usdet.experiments.cross_eval import cross_evaluate
    from usdet.utils.io import atomic_write_json

    wall_path = os.path.join(out, wall_name)
    if not os.path.isfile(wall_path):
        _log(f"evaluating {', '.join(weights)} on {', '.join(datasets)}")
        t0, load0 = time.time(), round(os.getloadavg()[0], 2)
        cfg = build_config(config_file, ["TEST.BOOTSTRAP", str(bootstrap), *opts])
        cross_evaluate(cfg, dict(weights), list(datasets), out, plots=False, config_file=config_file)
        atomic_write_json(wall_path, {"eval_wall_s": round(time.time() - t0, 1), "load_avg_1min_start": load0,
                                      "load_avg_1min_end": round(os.getloadavg()[0], 2)})
    with open(os.path.join(out, "cross_eval.json")) as fh, open(wall_path) as wh:
        return {"cross_eval": json.load(fh), "wall": json.load(wh)}


def paired_cached(dest: str, dataset: str, first: Sequence[str], second: Sequence[str],
                  bootstrap: int) -> Dict[str, Any]:
    """In-process paired ``second - first`` on registered ``dataset`` (each a (name, predictions file)),
    skipped when ``dest/comparison.json`` exists -> metric -> {values, delta}."""
    from detectron2.data import MetadataCatalog

    from usdet.evaluation.compare import compare_models

    path = os.path.join(dest, "comparison.json")
    if not os.path.isfile(path):
        compare_models(MetadataCatalog.get(dataset).get("json_file"), OrderedDict([tuple(first), tuple(second)]),
                       dest, n_resamples=max(bootstrap, 100), plots=False)
    with open(path) as fh:
        c = json.load(fh)
    return OrderedDict((m, OrderedDict(values=v["values"], delta=v["delta"])) for m, v in c["metrics"].items())


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

    lines = [f"# Cross-site drop: BUSI-only vs BUSI + BrEaST training ({result['status']})", "",
             budget_text(result["budget"]) + "; " + result["machine_note"], "",
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
                     f"training {t['train_wall_s'] / 60:.1f} min (incl. val evaluations){_interrupted(t)}"
                     + (f", trained by `{t['adopted_from']}` (adopted; its load not recorded here)"
                        if t.get("adopted_from") else f", mean 1-min load {t['load_avg_1min_mean']}")
                     + f"; checkpoint chosen on val: {t['chosen_on_val']}")
    for name, e in result["evaluations"].items():
        lines.append(f"- {name} test evaluations (`tools/cross_eval.py`): {e['eval_wall_s'] / 60:.1f} min")
    lines.append(f"- wall time of the stages: {result['stages_wall_s'] / 60:.1f} min "
                 f"(this invocation: {result['wall_s'] / 60:.1f} min)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap, "output/cross_site", "busi_only=output/busi_recipe_lite_cpu")
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
    sched = schedule(args.max_iter, args.evals, args.budget_min)
    adopted = parse_adopt(args.adopt, MODELS)
    result: Dict[str, Any] = OrderedDict()
    result["status"] = "running"
    result["budget"] = budget_record(sched)
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
        if name in adopted:
            adopt(name, adopted[name], run_dir, cfg, train_opts(sources, data, sched, run_dir))
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
