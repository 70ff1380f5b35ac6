#!/usr/bin/env python
"""Train or evaluate a usdet detector (detectron2 conventions; multi-GPU via detectron2's launch).

  python tools/train_net.py --config-file configs/BUSI/faster_rcnn_R_50_FPN_scratch.yaml
  python tools/train_net.py --config-file CFG --resume                      # continue a killed run
  python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/x/model_best.pth
  python tools/train_net.py --config-file CFG --num-gpus 4                  # one machine, 4 GPUs
  python tools/train_net.py --config-file CFG --num-gpus 2                  # no CUDA: 2 CPU processes (gloo)
  python tools/train_net.py --config-file CFG --num-machines 2 --machine-rank 0 --dist-url tcp://HOST0:PORT
Trailing KEY VALUE pairs override the config.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before torch/detectron2 print their deprecations

from detectron2.engine import default_argument_parser  # noqa: E402

from usdet.engine import Trainer, TrainingDivergedError, check_datasets, evaluate_checkpoint, setup  # noqa: E402
from usdet.engine.launch import launch  # noqa: E402  (detectron2's, plus CPU processes on gloo without CUDA)
# (importing usdet.engine registers $USDET_DATASETS/<dataset>_<split>: usdet.data.register.ensure_usdet_datasets)


def _fail(e: Exception) -> SystemExit:
    """Config/dataset problems end with one clear line, not a traceback."""
    return SystemExit(f"usdet train_net: error: {e.args[0] if isinstance(e, KeyError) else e}")


def main(args):
    try:
        cfg = setup(args)
        check_datasets(cfg, eval_only=args.eval_only)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise _fail(e) from None
    if args.eval_only:
        return evaluate_checkpoint(cfg, resume=args.resume)
    try:  # building the trainer loads the datasets: DatasetFormatError (a ValueError) surfaces here
        trainer = Trainer(cfg)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise _fail(e) from None
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except TrainingDivergedError as e:
        logging.getLogger("usdet").error("%s", e)
        raise SystemExit(f"usdet: {e}") from None


def cli(argv=None) -> int:
    args = default_argument_parser(epilog=__doc__).parse_args(argv)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
