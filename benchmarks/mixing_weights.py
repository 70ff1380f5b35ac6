#!/usr/bin/env python
"""Choose the mixed recipe's sampling across sources on val (issue 24), not a priori.

  python benchmarks/mixing_weights.py [--config configs/BUSI/recipe_mixed_cpu.yaml]
      [--weights 0.4/0.6 0.6/0.4 0.75/0.25] [--budget-min 14 | --max-iter N] [--evals 5]
      [--adopt w0.6-0.4=RUN_DIR] [--data datasets] [--output output/mixing_weights]
      [--bootstrap 1000] [--note TEXT] [--results benchmarks/results]

Each ``--weights`` candidate (one sampling probability per ``DATASETS.TRAIN`` source, in the
config's order, ``/``-separated) trains the mixed recipe with ``DATASETS.TRAIN_WEIGHTS`` set to it
and everything else the recipe's (its normalization follows the mix: ``usdet.config``). Every
candidate gets the same budget: a short proxy budget chooses, the full one confirms.

Choice: each candidate's **last** checkpoint (``model_final.pth``: the weights' effect, not the
checkpoint rule's) is evaluated on every val split of the config's ``DATASETS.TEST``; the score is
the mean AP50 over those val splits (each site counts once, whatever its size); the best score wins.
The winner is compared paired with the config's own weights (the incumbent) on each val split
(``compare_models``), or with the runner-up where the incumbent wins, and the result says whether
the difference is detectable. No test split is
read. ``benchmarks/results/mixing_weights.json`` (written after every stage, atomically) records
the budget, each training's wall time and load, the val table and the choice;
``benchmarks/results/reports/mixing_weights.md`` the table. Resumable: finished trainings,
evaluations and comparisons are kept and skipped.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, write_result  # noqa: E402
import cross_site  # noqa: E402

CONFIG = "configs/BUSI/recipe_mixed_cpu.yaml"
DEFAULT_WEIGHTS = ["0.4/0.6", "0.6/0.4", "0.75/0.25"]  # 0.75/0.25 is about plain concatenation (542 : 178)


def _log(msg: str) -> None:
    print(f"[mixing_weights {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_weights(items: Sequence[str], n_sources: int) -> List[Tuple[float, ...]]:
    """``["0.4/0.6", ...]`` -> [(0.4, 0.6), ...]: one positive weight per source, summing to 1."""
    out = []
    for item in items:
        try:
            w = tuple(float(x) for x in item.split("/"))
        except ValueError:
            raise SystemExit(f"--weights {item!r}: expected numbers separated by '/'") from None
        if len(w) != n_sources or min(w) <= 0 or abs(sum(w) - 1.0) > 1e-6:
            raise SystemExit(f"--weights {item!r}: expected {n_sources} positive weights (one per DATASETS.TRAIN "
                             "source, in its order) summing to 1")
        out.append(w)
    if len(set(out)) != len(out):
        raise SystemExit("--weights: a candidate is given twice")
    return out


def weights_name(w: Sequence[float]) -> str:
    """(0.6, 0.4) -> ``w0.6-0.4``: the candidate's training folder and ``--adopt`` name."""
    return "w" + "-".join(f"{x:g}" for x in w)


def weights_text(w: Sequence[float]) -> str:
    """(0.6, 0.4) -> ``0.6/0.4``, as ``--weights`` takes it and the report shows it."""
    return "/".join(f"{x:g}" for x in w)


def winner_and_rival(scores: Dict[str, Optional[float]], incumbent: Optional[str]) -> Tuple[str, Optional[str]]:
    """The best-scoring candidate, and the one it is paired with on val: the incumbent where it lost,
    else the runner-up (so that a kept default also says whether val could tell it from the next
    best); ``None`` where no other candidate has a score."""
    scored = [n for n, v in scores.items() if v is not None]
    if not scored:
        raise SystemExit("no candidate has an AP50 on every val split")
    best = max(scored, key=lambda n: scores[n])
    if incumbent and incumbent != best:
        return best, incumbent
    return best, max((n for n in scored if n != best), key=lambda n: scores[n], default=None)


def sources_of(cfg: Any, path: str) -> List[str]:
    """The statistics folders of the config's ``INPUT.NORMALIZATION_FILE`` (one per training source,
    ``datasets/<name>/pixel_stats.json``): what ``cross_site.train`` recomputes under ``--data``."""
    files = [f for f in str(cfg.INPUT.NORMALIZATION_FILE).split(",") if f.strip()]
    if len(files) != len(cfg.DATASETS.TRAIN):
        raise SystemExit(f"{path}: INPUT.NORMALIZATION_FILE names {len(files)} statistics files for "
                         f"{len(cfg.DATASETS.TRAIN)} training sources; give --sources")
    return [os.path.basename(os.path.dirname(f.strip())) for f in files]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if any(v is None for v in values) else sum(values) / len(values)


def render(result: Dict[str, Any]) -> str:
    from usdet.evaluation.formatting import fmt_number

    vals = result["val_sets"]
    lines = [f"# Mixed recipe: sampling across sources chosen on val ({result['status']})", "",
             cross_site.budget_text(result["budget"], "candidate") + f"; {result['machine_note']}", "",
             f"Config `{result['config']}`, sources {', '.join(result['train_sets'])}; score = mean AP50 over "
             f"{', '.join(vals)} (last checkpoint).", "",
             "| weights | iterations | train min | mean load | " + " | ".join(f"{v} AP50" for v in vals)
             + " | score |", "|---" * (5 + len(vals)) + "|"]
    for name, c in result["candidates"].items():
        t = c.get("training", {})
        lines.append(f"| {weights_text(c['weights'])}{' (config)' if c['incumbent'] else ''} | "
                     f"{t.get('iterations', '–')} | {fmt_number(t.get('train_wall_s', 0) / 60, '.1f')} | "
                     f"{fmt_number(t.get('load_avg_1min_mean'), '.2f', undefined='–')} | "
                     + " | ".join(fmt_number(c.get("val_AP50", {}).get(v), ".1f", undefined="–") for v in vals)
                     + f" | {fmt_number(c.get('score'), '.1f', undefined='–')} |")
    ch = result.get("choice")
    if ch:
        lines += ["", f"Chosen: **{ch['weights']}** (score {fmt_number(ch['score'], '.1f')}); the config's "
                  f"{ch['incumbent']} scores {fmt_number(ch['incumbent_score'], '.1f')}."]
        for ds, c in ch.get("paired", {}).items():
            d = c["AP50"]["delta"]
            lines.append(f"- {ds}, {ch['weights']} − {ch['paired_against']}: ΔAP50 {fmt_number(d['estimate'], '+.1f')} "
                         f"[{fmt_number(d['low'], '+.1f')}, {fmt_number(d['high'], '+.1f')}]: {c['verdict']}")
        lines.append("- " + ch["conclusion"])
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=CONFIG, help=f"the mixed recipe (default {CONFIG})")
    ap.add_argument("--weights", nargs="+", default=DEFAULT_WEIGHTS,
                    help=f"candidates, one sampling weight per DATASETS.TRAIN source (default {' '.join(DEFAULT_WEIGHTS)})")
    ap.add_argument("--sources", default="", help="statistics folders under --data, one per training source "
                    "(default: those of the config's INPUT.NORMALIZATION_FILE)")
    cross_site.add_run_arguments(ap, "output/mixing_weights", "w0.6-0.4=output/mixed_recipe_cpu")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--note", default="", help="free text recorded with the result (e.g. 'machine shared')")
    ap.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    from usdet.engine.setup import build_config

    t0 = time.time()
    data, out = os.path.abspath(args.data), os.path.abspath(args.output)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    os.chdir(REPO)
    base = build_config(args.config, resolve=False)  # the trainings resolve their own statistics
    train_sets, val_sets = list(base.DATASETS.TRAIN), list(base.DATASETS.TEST)
    if len(train_sets) < 2:
        raise SystemExit(f"{args.config}: DATASETS.TRAIN has one source; nothing to weigh")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] or sources_of(base, args.config)
    candidates = parse_weights(args.weights, len(train_sets))
    incumbent = tuple(float(x) for x in base.DATASETS.TRAIN_WEIGHTS) or None
    names = [weights_name(w) for w in candidates]
    adopted = cross_site.parse_adopt(args.adopt, names)
    sched = cross_site.schedule(args.max_iter, args.evals, args.budget_min)

    result: Dict[str, Any] = OrderedDict(status="running", budget=cross_site.budget_record(sched),
                                         config=args.config, train_sets=train_sets, val_sets=val_sets,
                                         sources=sources, incumbent=list(incumbent) if incumbent else None,
                                         rule="last checkpoint of each candidate; score = mean AP50 over the val "
                                              "splits; the best score is chosen; no test split is read",
                                         machine_note=args.note or "machine not described",
                                         load_avg_at_start=os.getloadavg(),
                                         command=" ".join(shlex.quote(a) for a in (
                                             [sys.argv[0]] + list(argv) if argv is not None else sys.argv)),
                                         candidates=OrderedDict())
    os.environ["USDET_DATASETS"] = data
    from usdet.data.register import register_all_usdet_datasets

    register_all_usdet_datasets(data)
    import common

    common.RESULTS = args.results

    def save(status: str) -> None:
        result["status"] = status
        result["wall_s"] = round(time.time() - t0, 1)
        write_result("mixing_weights", result)
        from usdet.utils.io import atomic_write_text

        atomic_write_text(os.path.join(args.results, "reports", "mixing_weights.md"), render(result))

    for w, name in zip(candidates, names):
        result["candidates"][name] = OrderedDict(weights=list(w), incumbent=bool(incumbent) and
                                                 all(abs(a - b) < 1e-6 for a, b in zip(w, incumbent)))
    opts_of = {name: ["DATASETS.TRAIN_WEIGHTS", repr(tuple(w))] for w, name in zip(candidates, names)}
    for name in names:  # every training first: the CPU is then free for the evaluations
        run_dir = os.path.join(out, name)
        if name in adopted:
            cross_site.adopt(name, adopted[name], run_dir, args.config,
                             cross_site.train_opts(sources, data, sched, run_dir, opts_of[name]))
        t = cross_site.train(name, args.config, sources, data, run_dir, sched, logs, extra_opts=opts_of[name])
        result["candidates"][name]["training"] = {k: v for k, v in t.items() if k != "val_curve"}
        save(f"trained {name}")

    preds: Dict[str, Dict[str, str]] = {}
    for name in names:
        run_dir, dest = os.path.join(out, name), os.path.join(out, "eval", name)
        ev = cross_site.evaluate_cached(dest, os.path.join(run_dir, "config.yaml"),
                                        {name: os.path.join(run_dir, "model_final.pth")}, val_sets, args.bootstrap,
                                        "mixing_weights_wall.json")
        rows = ev["cross_eval"]["rows"]
        c = result["candidates"][name]
        c["val_AP50"] = OrderedDict((r["dataset"], r["metrics"]["AP50"]["estimate"]) for r in rows)
        c["score"] = _mean([c["val_AP50"].get(v) for v in val_sets])
        c["evaluation"] = ev["wall"]
        preds[name] = {r["dataset"]: os.path.join(dest, r["predictions"]) for r in rows}
        save(f"evaluated {name}")

    inc = next((n for n in names if result["candidates"][n]["incumbent"]), None)
    best, rival = winner_and_rival(OrderedDict((n, result["candidates"][n]["score"]) for n in names), inc)
    choice = OrderedDict(name=best, weights=weights_text(result["candidates"][best]["weights"]),
                         score=result["candidates"][best]["score"],
                         incumbent=weights_text(incumbent) if incumbent else None,
                         incumbent_score=result["candidates"][inc]["score"] if inc else None,
                         paired_against=weights_text(result["candidates"][rival]["weights"]) if rival else None,
                         paired=OrderedDict())
    if rival:
        from usdet.evaluation.compare import interval_verdict

        for ds in val_sets:
            metrics = cross_site.paired_cached(os.path.join(out, "paired", f"{best}_vs_{rival}", ds), ds,
                                               (rival, preds[rival][ds]), (best, preds[best][ds]), args.bootstrap)
            delta = metrics["AP50"]["delta"]
            choice["paired"][ds] = OrderedDict(AP50=OrderedDict(values=metrics["AP50"]["values"], delta=delta),
                                               verdict=interval_verdict(delta))
    verdicts = {c["verdict"] for c in choice["paired"].values()}
    paired_text = ("paired on each val split the difference is not detectable: the choice rests on the point "
                   "estimate" if verdicts == {"no detectable difference"}
                   else "paired: " + ", ".join(f"{ds} {c['verdict']}" for ds, c in choice["paired"].items()))
    if inc and inc != best:
        choice["conclusion"] = f"{choice['weights']} beats the config's {choice['incumbent']} on the val score; " + paired_text
    elif inc:
        choice["conclusion"] = "the config's weights score best on val: keep them" + (
            f"; against the runner-up {choice['paired_against']}, {paired_text}" if rival else "")
    else:
        choice["conclusion"] = "the config's weights were not among the candidates"
    result["choice"] = choice
    save("complete")
    _log(f"chosen {choice['weights']} ({choice['conclusion']}); {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
