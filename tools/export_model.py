#!/usr/bin/env python
"""Export a trained model to TorchScript or ONNX (detectron2's tracing export), for use without
detectron2: `tools/predict.py --backend torchscript|onnxruntime --weights OUTPUT/model.ts|onnx`.

Writes OUTPUT/model.ts or OUTPUT/model.onnx and OUTPUT/model.json (class names, channel order,
the resize rule the caller applies before the model, which weights were exported, and the check
against the PyTorch model on a frame of another size). The weights are those --eval-only uses
(the EMA weights when the config enables EMA and the checkpoint has them). Test-time
augmentation cannot be exported and is refused.

  python tools/export_model.py --config-file output/run/config.yaml --weights output/run/model_best.pth \\
      --format onnx --output output/run/export_onnx [KEY VALUE ...]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (e.g. the run's config.yaml)")
    p.add_argument("--weights", required=True, help="checkpoint (.pth), e.g. output/.../model_best.pth")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    from usdet.engine.export import ExportError, export_model
    from usdet.engine.predictor import build_predictor_cfg

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    opts = [o for o in (args.opts or []) if o != "--"]
    try:
        cfg = build_predictor_cfg(args.config_file, args.weights, "cpu", opts)
        meta = export_model(cfg, args.format, args.output, config_file=args.config_file)
    except ExportError as e:
        print(f"export_model: cannot export: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"export_model: error: {msg}", file=sys.stderr)
        return 2
    check = meta["check"]
    verdict = ("check frame not run (" + check.get("note", "") + ")" if check["ok"] is None else
               f"same {check['detections']} detection(s) as PyTorch on a {check['image_size'][0]}x"
               f"{check['image_size'][1]} check frame (max box diff {check['max_box_diff_px']:.2g} px, "
               f"score {check['max_score_diff']:.2g})")
    print(f"exported {meta['format']} ({meta['weights_used']} weights) -> "
          f"{os.path.join(args.output, meta['file'])}; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
