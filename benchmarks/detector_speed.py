#!/usr/bin/env python
"""Training and inference throughput of detector variants on this machine (issue 21).

  python benchmarks/detector_speed.py [--variants baseline,lite,...] [--iters 20] [--warmup 5]

Each variant is a config file plus ``KEY VALUE`` overrides (``VARIANTS`` below, shared with the
ablation runner ``benchmarks/detector_ablation.py``). For each, usdet's own ``Trainer`` (its
loader, mapper, augmentations and model) runs ``--warmup`` steps, then ``--iters`` timed steps:
training images/s. Then the model in eval mode predicts ``--infer-images`` val images one at a
time at the test size: inference images/s at batch 1. The first variant is the reference; every
other is recorded as a ratio to it, measured in the same run. Run it on an idle machine (it
records the load average before and after): the proxy budgets of the ablation are derived from
these figures. Results: ``benchmarks/results/detector_speed.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, load_average, write_result  # noqa: E402

#: Cheaper per image: no stride-4 level, a narrower FPN, fewer proposals and ROI samples, a
#: smaller box head (lesions are large: most boxes are >= 40 px at the 320 px input).
LITE = [
    "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
    "MODEL.FPN.OUT_CHANNELS", "128",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256]]",
    "MODEL.RPN.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']",
    "MODEL.ROI_HEADS.IN_FEATURES", "['p3', 'p4', 'p5']",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "1000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "256",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "500", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
]
#: Half-width R18 (32 channels in the stem and res2): usdet's registered slim backbone.
HALF_WIDTH = ["MODEL.BACKBONE.NAME", "build_slim_resnet_fpn_backbone",
              "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32"]

OLD = "configs/BUSI/recipe_scratch_cpu.yaml"
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    "baseline": (OLD, []),
    "lite": (OLD, LITE),
    "lite_half": (OLD, LITE + HALF_WIDTH),
    "lite_b8": (OLD, LITE + ["SOLVER.IMS_PER_BATCH", "8"]),
    "lite_half_b8": (OLD, LITE + HALF_WIDTH + ["SOLVER.IMS_PER_BATCH", "8"]),
}



def measure(config: str, opts: Sequence[str], iters: int, warmup: int, infer_images: int) -> Dict[str, Any]:
    """Train ``warmup + iters`` steps of the variant, then time batch-1 inference on val images."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from usdet.data.mapper import UsdetDatasetMapper
    from usdet.engine import Trainer
    from usdet.engine.setup import build_config

    out = tempfile.mkdtemp(prefix="usdet-speed-")
    cfg = build_config(os.path.join(REPO, config), list(opts) + [
        "OUTPUT_DIR", out, "TEST.EVAL_PERIOD", "0", "SOLVER.BEST_CHECKPOINT.ENABLED", "False",
        "SOLVER.MAX_ITER", str(warmup + iters + 1)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer._trainer.storage = storage
        for i in range(warmup):
            trainer.iter = i
            trainer.run_step()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + iters):
            trainer.iter = i
            trainer.run_step()
        train_s = time.perf_counter() - t0
    model = trainer.model
    model.eval()
    mapper = UsdetDatasetMapper(cfg, is_train=False)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:infer_images + 2]
    inputs = [mapper(d) for d in dicts]
    with torch.no_grad():
        for x in inputs[:2]:
            model([x])
        t0 = time.perf_counter()
        for x in inputs[2:]:
            model([x])
        infer_s = time.perf_counter() - t0
    ims = int(cfg.SOLVER.IMS_PER_BATCH)
    return {"config": config, "opts": list(opts), "ims_per_batch": ims, "params_m": round(n_params / 1e6, 2),
            "seconds_per_iter": round(train_s / iters, 3),
            "train_images_per_s": round(ims * iters / train_s, 3),
            "infer_images_per_s": round((len(inputs) - 2) / infer_s, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--infer-images", type=int, default=30)
    p.add_argument("--result-name", default="detector_speed")
    args = p.parse_args(argv)
    import torch

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    load_before = load_average()
    rows: Dict[str, Any] = {}
    for name in names:
        config, opts = VARIANTS[name]
        rows[name] = measure(config, opts, args.iters, args.warmup, args.infer_images)
        print(name, rows[name], flush=True)
    ref = rows[names[0]]
    for row in rows.values():
        row["train_speed_ratio"] = round(row["train_images_per_s"] / ref["train_images_per_s"], 3)
        row["infer_speed_ratio"] = round(row["infer_images_per_s"] / ref["infer_images_per_s"], 3)
    write_result(args.result_name, {"reference": names[0], "iters": args.iters, "warmup": args.warmup,
                                    "torch_threads": torch.get_num_threads(), "load_before": load_before,
                                    "load_after": load_average(), "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
