#!/usr/bin/env python
"""Convert a dataset to usdet's COCO layout (OUT/annotations/{train,val,test}.json + images).

  python tools/convert_to_coco.py busi   --root ROOT --output OUT [options]
  python tools/convert_to_coco.py frames --images DIR --annotations FILE --output OUT [options]

Each subcommand lives in its usdet.data module (``add_arguments`` + ``main``); this script only
dispatches. ``--help`` after a subcommand lists its options.
"""
import argparse
import importlib
import sys

from usdet.utils.known_warnings import silence_known_warnings

silence_known_warnings()  # before torch/detectron2 print their deprecations

SUBCOMMANDS = {"busi": "usdet.data.busi", "frames": "usdet.data.frames"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    modules = {name: importlib.import_module(mod) for name, mod in SUBCOMMANDS.items()}
    for name, module in modules.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
    args = ap.parse_args(argv)
    return modules[args.dataset].main(args)


if __name__ == "__main__":
    sys.exit(main())
