#!/usr/bin/env python
"""Detect lesions in new frames: images, folders, DICOM (multi-frame too); cine clips with --clip.

Each frame is cropped to the ultrasound image region (usdet.data.crop), run through the model
in batches, and its boxes are mapped back to the full source frame. Writes OUTPUT/predictions.json
(one entry per frame) and OUTPUT/report.json (counts, the backend and weights used, and the inputs
that failed, with reasons); ``--overlays`` also draws OUTPUT/overlays/*.png. Exit status 1 only
when nothing was processed, 2 on a bad config or weights file.

Backends: ``torch`` (default: the model --eval-only evaluates, EMA weights and test-time
augmentation included when the config enables them), or a file written by tools/export_model.py:
``--backend torchscript --weights DIR/model.ts`` / ``--backend onnxruntime --weights DIR/model.onnx``
(CPU; --config-file is then optional, the JSON beside the file says the classes and resize rule).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", help="model config (e.g. the run's config.yaml); required for --backend torch")
    p.add_argument("--weights", required=True,
                   help="checkpoint (.pth) for torch, e.g. output/.../model_best.pth; the exported file otherwise")
    p.add_argument("--backend", default="torch", choices=["torch", "torchscript", "onnxruntime"])
    p.add_argument("--input", required=True, nargs="+", help="images, folders, DICOM files")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep boxes with score >= this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: the config's MODEL.DEVICE")
    p.add_argument("--overlays", action="store_true", help="also draw each frame with its boxes")
    p.add_argument("--no-crop", action="store_true", help="frames are already cropped: use them whole")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--clip", action="store_true",
                   help="each input is one cine clip (video file, multi-frame DICOM, folder of ordered frames): "
                        "tracks, temporal decision, overlay video (video files are clips without it too)")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides (torch backend; CLIP.* keys for exported ones too): KEY VALUE anywhere on the line (after --input too), "
                        "or after --")
    from usdet.utils.overrides import parse_with_overrides

    return parse_with_overrides(p, sys.argv[1:] if argv is None else argv)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_opts(opts):
    """The KEY VALUE pairs of ``opts`` that are not ``CLIP.*``: an exported model has these baked in,
    while the clip rule (tracker and temporal decision) runs outside the model."""
    pairs = list(zip(opts[0::2], opts[1::2]))
    return [t for k, v in pairs if not k.startswith("CLIP.") for t in (k, v)] + list(opts[len(pairs) * 2:])


def build_predictor(args, opts):
    """The predictor of ``args.backend``, or an error line naming the config or weights file."""
    from usdet.engine.predictor import BatchPredictor, ExportedPredictor, build_predictor_cfg

    if args.backend == "torch":
        if not args.config_file:
            return "--backend torch needs --config-file"
        try:
            cfg = build_predictor_cfg(args.config_file, args.weights, args.device, opts)
        except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:  # bad config file / key
            return f"{args.config_file}: {_one_line(e)}"
        make = lambda: BatchPredictor(cfg, batch_size=args.batch_size)  # noqa: E731
    elif args.device == "cuda":
        return f"--backend {args.backend} runs exported models on the CPU; drop --device cuda"
    elif baked := model_opts(opts):
        return (f"config overrides ({' '.join(baked)}) do not apply to an exported model: re-export "
                "instead (only CLIP.* keys, the clip rule, apply)")
    else:
        make = lambda: ExportedPredictor(args.weights, args.backend, batch_size=args.batch_size)  # noqa: E731
    try:
        return make()
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:  # missing / unreadable weights
        return _one_line(e)


def main(argv=None) -> int:
    args = parse_args(argv)
    from usdet.data.sources import list_sources
    from usdet.engine.predictor import overlay_writer, predict_sources
    from usdet.utils.io import atomic_write_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    opts = args.opts
    predictor = build_predictor(args, opts)
    if isinstance(predictor, str):
        print(f"predict: error: {predictor}", file=sys.stderr)
        return 2
    from usdet.data.clips import is_video_file

    if args.clip or all(is_video_file(p) for p in args.input):  # issue 22: usdet/engine/clip.py
        from usdet.engine.clip import clip_tool

        return clip_tool(predictor, args.input, args.output, args.score_thresh, not args.no_crop,
                         not args.no_progress, {"config_file": args.config_file, "weights": args.weights,
                                                "backend": predictor.backend, "weights_used": predictor.weights_used,
                                                "device": str(predictor.device)},
                         clip_opts=opts if args.backend != "torch" else ())
    sources = list_sources(args.input)
    if not sources:
        print(f"no inputs found in {' '.join(args.input)}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    on_frame = overlay_writer(os.path.join(args.output, "overlays")) if args.overlays else None
    records, failures = predict_sources(
        predictor, sources, score_thresh=args.score_thresh, crop=not args.no_crop,
        on_frame=on_frame, progress=not args.no_progress,
    )
    atomic_write_json(os.path.join(args.output, "predictions.json"), records)
    report = {
        "config_file": args.config_file,
        "weights": args.weights,
        "backend": predictor.backend,
        "weights_used": predictor.weights_used,
        "weights_note": predictor.weights_note,
        "tta": predictor.tta,
        "device": str(predictor.device),
        "score_thresh": args.score_thresh,
        "crop": not args.no_crop,
        "num_sources": len(sources),
        "num_frames": len(records),
        "num_boxes": sum(len(r["boxes"]) for r in records),
        "crop_notes": [{"source": r["source"], "frame": r["frame"], "note": r["crop_note"]}
                       for r in records if "crop_note" in r],
        "failures": failures,
    }
    atomic_write_json(os.path.join(args.output, "report.json"), report)
    print(f"{len(records)} frame(s) from {len(sources) - len({f['source'] for f in failures})} of "
          f"{len(sources)} source(s), {report['num_boxes']} box(es) >= {args.score_thresh} "
          f"[{predictor.backend}, {predictor.weights_used} weights{', TTA' if predictor.tta else ''}]; "
          f"{len(failures)} failed -> {os.path.join(args.output, 'predictions.json')}")
    for f in failures:
        print(f"  FAILED {f['source']}: {f['reason']}", file=sys.stderr)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
