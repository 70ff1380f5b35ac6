#!/usr/bin/env python
"""Clips (issue 22): single-frame vs temporal decision on synthetic cine clips; throughput; memory.

Needs a phantom-trained model; by default the one `make demo` trains (output/demo/train/model_best.pth
with configs/demo/phantom_R18_FPN_demo.yaml):

  python benchmarks/bench_clips.py [--config-file CFG --weights PTH] [--val-clips 20] [--test-clips 12]
      [--frames 240] [--throughput-frames 200] [--memory-frames 5000] [--device cpu]

1. Synthetic clips (usdet/data/cine.py; val seeds 1000+, test seeds 2000+) written as frame folders
   and run once through the clip pipeline, keeping every box with score >= 0.05.
2. The temporal rule's parameters are chosen on the val clips (grid over CLIP.DECISION, WINDOW,
   MIN_HITS, HIT_SCORE, TRACK_IOU; the tracker re-run on the stored boxes): fewest false positives per
   lesion-free frame at the per-frame sensitivity the single-frame rule reaches at
   --single-thresh, among the settings that find the most lesions, then the widest margin;
   CLIP.SCORE_THRESH is the middle of the gap between the temporal threshold reaching that
   sensitivity on val and the highest val false-positive score below it (margin_threshold).
3. On the test clips: per-frame sensitivity, FP per lesion-free frame and per-lesion sensitivity
   of both rules, each rule's FP at the other's sensitivity and at 80% / 90% (FP80 / FP90).
4. Throughput (frames/s) of the clip pipeline on one clip, batch --batch-size vs batch 1, and with
   the overlay video written.
5. Peak memory (RSS) of the whole clip run (outputs and overlay video included) on a video of
   --memory-base and of --memory-frames frames, each in a fresh process.
6. The shared real multi-frame DICOM (../shared/data/dicom_us) end to end through tools/predict.py --clip.
Writes benchmarks/results/clips.json (or --results-dir/clips.json).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine, peak_rss_mib  # noqa: E402

REAL_CINE = os.path.join(REPO, "..", "shared", "data", "dicom_us", "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm")
GRID = {"decision": ("track", "window"), "window": (5, 9, 15), "min_hits_frac": (0.3, 0.5, 0.7),
        "hit_score": (0.2, 0.35, 0.5), "track_iou": (0.1, 0.3)}


def build_predictor(args, batch_size):
    from usdet.engine.predictor import BatchPredictor, build_predictor_cfg

    cfg = build_predictor_cfg(args.config_file, args.weights, args.device, [])
    return BatchPredictor(cfg, batch_size=batch_size)


def make_clips(root, seeds, frames, size):
    from usdet.data.cine import SyntheticCine, write_cine_frames

    out = []
    for seed in seeds:
        path = os.path.join(root, f"clip_{seed}")
        truths = write_cine_frames(SyntheticCine(seed=seed, num_frames=frames, size=tuple(size)), path)
        out.append((seed, path, truths))
    return out


def run_clips(predictor, clips, keep):
    """Every clip once through the pipeline, boxes >= ``keep`` stored (the grid re-tracks them)."""
    from usdet.engine.clip import predict_clip
    from usdet.engine.tracking import TrackParams

    out = []
    for seed, path, truths in clips:
        res = predict_clip(predictor, path, TrackParams(min_score=keep), score_thresh=keep, progress=False)
        out.append((seed, res.records, truths))
    return out


def table_for(runs, params, iou):
    from usdet.engine.clip import retrack
    from usdet.evaluation.clips import clip_table, merge_tables

    return merge_tables([clip_table(retrack(records, params)[0], truths, iou, seed) for seed, records, truths in runs])


def choose_rule(val_runs, single_thresh, iou, keep):
    """The grid setting with the fewest val FP per lesion-free frame at the single-frame rule's
    val sensitivity, among those finding the most val lesions there; returns (params, rows)."""
    import itertools

    from usdet.engine.tracking import TrackParams
    from usdet.evaluation.clips import fp_at_sensitivity, margin_threshold, rule_metrics

    base = table_for(val_runs, TrackParams(min_score=keep), iou)
    target = rule_metrics(base, "single", single_thresh)["per_frame_sensitivity"]
    rows, best = [], None
    for decision, n, frac, hit, tiou in itertools.product(*GRID.values()):
        k = max(1, int(round(frac * n)))
        p = TrackParams(min_score=keep, track_iou=tiou, max_gap=5, window=n, min_hits=k, hit_score=hit,
                        score_thresh=0.0, decision=decision)
        table = table_for(val_runs, p, iou)
        at = fp_at_sensitivity(table, "temporal", target)
        row = {"decision": decision, "window": n, "min_hits": k, "hit_score": hit, "track_iou": tiou,
               "at_val_single_sensitivity": at}
        rows.append(row)
        if at is None:
            continue
        thr, margin = margin_threshold(table, "temporal", target)
        row["margin"] = round(margin, 4)
        key = (-at["lesions_found"], at["fp_per_lesion_free_frame"], -margin)
        if best is None or key < best[0]:
            best = (key, p, round(thr, 4))
    if best is None:
        raise SystemExit(f"no temporal setting reaches the single-frame val sensitivity {target}: the model is too weak")
    _, p, thr = best
    chosen = TrackParams(p.min_score, p.track_iou, p.max_gap, p.window, p.min_hits, p.hit_score, thr, p.decision)
    return chosen, target, rows


def throughput(args, clip_path):
    """frames/s of predict_clip on one clip at --batch-size and at 1, and with outputs + video."""
    import torch

    from usdet.engine.clip import predict_clip, write_clip_outputs

    out = {"frames": args.throughput_frames, "torch_threads": torch.get_num_threads()}
    for bs in (args.batch_size, 1):
        pred = build_predictor(args, bs)
        predict_clip(pred, clip_path, progress=False)  # warm-up
        t0 = time.perf_counter()
        res = predict_clip(pred, clip_path, progress=False)
        out[f"batch_{bs}_frames_per_s"] = round(len(res.records) / (time.perf_counter() - t0), 2)
        if bs == args.batch_size:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                res = predict_clip(pred, clip_path, progress=False)
                write_clip_outputs(res, d, pred.class_names, video=True)
                out["with_outputs_and_video_frames_per_s"] = round(len(res.records) / (time.perf_counter() - t0), 2)
    out["batch_speedup"] = round(out[f"batch_{args.batch_size}_frames_per_s"] / out["batch_1_frames_per_s"], 3)
    return out


def memory_child(args) -> int:
    """Run one clip end to end (outputs and overlay video included); print frames, seconds, peak RSS."""
    from usdet.engine.clip import predict_clip, write_clip_outputs

    pred = build_predictor(args, args.batch_size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res = predict_clip(pred, args.memory_child, progress=False)
        write_clip_outputs(res, d, pred.class_names, video=True)
    print(json.dumps({"frames": len(res.records), "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mib": round(peak_rss_mib(), 1), "failure": res.failure}))
    return 0


def memory(args, root):
    from usdet.data.cine import SyntheticCine, write_cine_video

    out = {}
    for n in (args.memory_base, args.memory_frames):
        path = os.path.join(root, f"memory_{n}.avi")
        write_cine_video(SyntheticCine(seed=3000, num_frames=n, size=tuple(args.size)), path)
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", path, "--config-file", args.config_file,
               "--weights", args.weights, "--device", args.device, "--batch-size", str(args.batch_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"memory run on {n} frames failed:\n{r.stderr[-3000:]}")
        out[f"frames_{n}"] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = out[f"frames_{args.memory_base}"], out[f"frames_{args.memory_frames}"]
    extra = max(1, b["frames"] - a["frames"])
    out["rss_growth_mib_per_1000_frames"] = round((b["peak_rss_mib"] - a["peak_rss_mib"]) * 1000 / extra, 2)
    # flat: the long clip's peak is within 10% of the short one's (frames themselves would add
    # width x height x 3 bytes each: 61 KB at 128x160)
    out["flat"] = b["peak_rss_mib"] <= 1.1 * a["peak_rss_mib"]
    return out


def real_clip(args, root):
    if not os.path.isfile(REAL_CINE):
        return {"skipped": f"{REAL_CINE} not found"}
    out_dir = os.path.join(root, "real")
    cmd = [sys.executable, os.path.join(REPO, "tools", "predict.py"), "--config-file", args.config_file,
           "--weights", args.weights, "--clip", "--input", REAL_CINE, "--output", out_dir, "--device", args.device,
           "--no-progress"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    res = {"file": os.path.relpath(REAL_CINE, REPO), "exit_status": r.returncode,
           "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode == 0:
        with open(os.path.join(out_dir, "report.json")) as fh:
            clip = json.load(fh)["clips"][0]
        res.update({k: clip[k] for k in ("frames", "size", "failure", "tracks", "lesion_tracks")})
        res["crop"] = clip["crop"]["crops"]
        res["overlay_video"] = clip["outputs"]["overlay_video"]
    else:
        res["stderr_tail"] = r.stderr[-1000:]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=os.path.join(REPO, "configs", "demo", "phantom_R18_FPN_demo.yaml"))
    ap.add_argument("--weights", default=os.path.join(REPO, "output", "demo", "train", "model_best.pth"),
                    help="a phantom-trained model (default: the one `make demo` trains)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--val-clips", type=int, default=20)
    ap.add_argument("--test-clips", type=int, default=12)
    ap.add_argument("--frames", type=int, default=240, help="frames per val/test clip")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    ap.add_argument("--single-thresh", type=float, default=0.5, help="the single-frame rule's score (predict.py default)")
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--keep", type=float, default=0.05, help="boxes stored per frame (and tracked) from this score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--throughput-frames", type=int, default=200, help="0 skips the throughput run")
    ap.add_argument("--memory-frames", type=int, default=5000, help="0 skips the memory runs")
    ap.add_argument("--memory-base", type=int, default=500)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--results-dir", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    if not os.path.isfile(args.weights):
        print(f"bench_clips: {args.weights} not found: it needs a phantom-trained model (run `make demo` first, "
              "or pass --config-file/--weights)", file=sys.stderr)
        return 1

    from usdet.evaluation.clips import compare_rules
    from usdet.utils.io import atomic_write_json

    t_start = time.time()
    result = {"benchmark": "clips", "config": args.config_file, "weights": args.weights, "device": args.device,
              "clips": {"val": args.val_clips, "test": args.test_clips, "frames_each": args.frames,
                        "size": list(args.size)}, "single_thresh": args.single_thresh, "iou": args.iou,
              "keep_score": args.keep}
    with tempfile.TemporaryDirectory(prefix="bench_clips_") as root:
        predictor = build_predictor(args, args.batch_size)
        val = make_clips(os.path.join(root, "val"), [1000 + i for i in range(args.val_clips)], args.frames, args.size)
        test = make_clips(os.path.join(root, "test"), [2000 + i for i in range(args.test_clips)], args.frames, args.size)
        val_runs, test_runs = run_clips(predictor, val, args.keep), run_clips(predictor, test, args.keep)
        chosen, target, grid = choose_rule(val_runs, args.single_thresh, args.iou, args.keep)
        result["val"] = {"single_frame_sensitivity": target, "chosen_rule": chosen.to_dict(), "grid": grid}
        result["cfg_keys"] = {f"CLIP.{k.upper()}": v for k, v in chosen.to_dict().items()}
        test_table = table_for(test_runs, chosen, args.iou)
        cmp = compare_rules(test_table, args.single_thresh, chosen.score_thresh, targets=(0.8, 0.9))
        result["test"] = cmp
        result["test"]["frames"] = test_table.n_frames
        ratio = cmp.get("fp_ratio_temporal_over_single")
        at = cmp.get("temporal_at_single_sensitivity") or {}
        result["goal"] = {"fp_halved_at_equal_sensitivity": ratio is not None and ratio <= 0.5,
                          "every_lesion_track_found": at.get("per_lesion_sensitivity") == 1.0}
        if args.throughput_frames:
            (_, tp_path, _), = make_clips(os.path.join(root, "tp"), [4000], args.throughput_frames, args.size)
            result["throughput"] = throughput(args, tp_path)
        if args.memory_frames:
            result["memory"] = memory(args, root)
        if not args.skip_real:
            result["real_dicom_cine"] = real_clip(args, root)
    result["seconds"] = round(time.time() - t_start, 1)
    result["machine"] = machine()
    try:
        result["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = os.path.join(args.results_dir, "clips.json")
    atomic_write_json(path, result)
    s, t = cmp["single_frame"], cmp.get("temporal_at_single_sensitivity") or cmp["temporal"]
    print(f"[bench] clips: test per-frame sensitivity {s['per_frame_sensitivity']} single / "
          f"{t['per_frame_sensitivity']} temporal; FP per lesion-free frame {s['fp_per_lesion_free_frame']} / "
          f"{t['fp_per_lesion_free_frame']} (ratio {ratio}); lesions found {t['lesions_found']}/{t['lesions']}; "
          f"chosen {result['cfg_keys']} -> {path}")
    return 0 if all(result["goal"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
