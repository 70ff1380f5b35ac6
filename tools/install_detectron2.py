#!/usr/bin/env python
"""Install detectron2 v0.6 from the PyPI sdist ``pb1-detectron2==0.6``, patched for today's stack.

Why this file exists: upstream detectron2 is not on PyPI and is normally built from git, which
machines without general internet cannot reach. ``pb1-detectron2==0.6`` is upstream tag v0.6
republished as an sdist, but (1) it lacks the C++ sources, (2) its ``setup.py`` does not package
the model-zoo configs, and (3) v0.6 predates numpy 2, Pillow 10 and setuptools 81. This is the
ONE place where usdet fixes those, at install time, on an unpacked copy of the sdist; nothing in
usdet edits site-packages at run time. Every patch states how many places it must change, so a
different upstream file fails loudly instead of being silently half-patched.

Users who already have an importable detectron2 (e.g. built from upstream git) never run this:
``make setup`` only calls it when ``import detectron2`` fails.

Usage: python tools/install_detectron2.py [--python PY] [--sdist FILE] [--keep DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import List

SDIST_SPEC = "pb1-detectron2==0.6"


@dataclass(frozen=True)
class Patch:
    """A regex substitution applied to every file matching ``pattern`` (relative glob)."""

    pattern: str
    regex: str
    replacement: str
    min_count: int  # fewer matches than this means the source is not what we expect
    why: str


# Stub for the missing compiled extension. Faster R-CNN R50-FPN needs no _C op (ROIAlign and
# NMS come from torchvision); rotated boxes, deformable conv and the fast COCO evaluator do.
C_STUB = '''"""Placeholder for detectron2's compiled ops, written by usdet's tools/install_detectron2.py.

This detectron2 was installed from an sdist without C++ sources. Ops that need the compiled
extension (rotated boxes, deformable convolution, the fast COCO evaluator) are unavailable;
Faster R-CNN with axis-aligned boxes does not need them.
"""


def get_compiler_version():
    return "none (detectron2 installed without its compiled extension)"


def get_cuda_version():
    return "none (detectron2 installed without its compiled extension)"


def has_cuda():
    return False


def __getattr__(name):
    raise ImportError(
        "detectron2._C." + name + " is unavailable: detectron2 was installed without its compiled "
        "extension (see usdet README, 'Installing detectron2'). Use an upstream build for rotated "
        "boxes, deformable conv or COCOEvaluator(use_fast_impl=True)."
    )
'''

PATCHES: List[Patch] = [
    Patch("setup.py", r"ext_modules=get_extensions\(\),", "ext_modules=[],", 1,
          "the sdist has no C++ sources; build a pure-Python package"),
    Patch("setup.py", r'cmdclass=\{"build_ext": torch\.utils\.cpp_extension\.BuildExtension\},', "", 1,
          "no extension to build"),
    Patch("setup.py", r'package_data=\{"detectron2\.model_zoo": get_model_zoo_configs\(\)\},',
          'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},', 1,
          "the configs ship inside detectron2/model_zoo/configs in the sdist; package them"),
    Patch("setup.py", r'\s*"black==21\.4b2",', "", 1,
          "a formatter pin from 2021 that is not needed to run detectron2"),
    Patch("detectron2/data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR", 1,
          "Image.LINEAR was removed in Pillow 10 (it was an alias of BILINEAR)"),
    Patch("detectron2/**/*.py", r"\bnp\.int\b(?!\w)", "int", 4,
          "np.int was removed in numpy 1.24 (it was an alias of int)"),
    Patch("detectron2/**/*.py", r"\bnp\.float\b(?!\w)", "float", 5,
          "np.float was removed in numpy 1.24"),
    Patch("detectron2/**/*.py", r"\bnp\.bool\b(?!\w)", "bool", 9,
          "np.bool was removed in numpy 1.24"),
    Patch("detectron2/**/*.py", r"\bnp\.str\b(?!\w)", "str", 1,
          "np.str was removed in numpy 1.24"),
    Patch("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources\n", "", 1,
          "pkg_resources is gone from setuptools >= 81"),
    Patch("detectron2/model_zoo/model_zoo.py",
          r'pkg_resources\.resource_filename\(\s*"detectron2\.model_zoo", os\.path\.join\("configs", config_path\)\s*\)',
          'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)', 1,
          "resolve packaged configs without pkg_resources"),
]


def apply_patches(src_root: str, patches: List[Patch] = PATCHES) -> List[str]:
    """Apply ``patches`` in place under ``src_root``; return a log line per patch.

    Raises RuntimeError naming the patch when it matches fewer places than expected.
    """
    log = []
    for p in patches:
        files = sorted(glob.glob(os.path.join(src_root, p.pattern), recursive=True))
        total = 0
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            new, n = re.subn(p.regex, p.replacement, text, flags=re.MULTILINE)
            if n:
                with open(f, "w", encoding="utf-8") as fh:
                    fh.write(new)
                total += n
        if total < p.min_count:
            raise RuntimeError(
                f"patch '{p.why}' matched {total} place(s) in {p.pattern}, expected >= {p.min_count}: "
                "the detectron2 source is not the expected v0.6"
            )
        log.append(f"{p.pattern}: {total} change(s): {p.why}")
    stub = os.path.join(src_root, "detectron2", "_C.py")
    with open(stub, "w", encoding="utf-8") as fh:
        fh.write(C_STUB)
    log.append("detectron2/_C.py: stub for the missing compiled extension")
    return log


def _run(cmd: List[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter whose environment gets detectron2")
    ap.add_argument("--sdist", help="a local pb1-detectron2-0.6.tar.gz (default: download from PyPI)")
    ap.add_argument("--keep", help="also keep the patched source tree in this folder")
    ap.add_argument("--no-install", action="store_true", help="patch only (with --keep)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="usdet-d2-") as tmp:
        sdist = args.sdist
        if not sdist:
            # The sdist's setup.py imports torch, so metadata preparation needs the target env.
            _run([args.python, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                  "--no-binary", ":all:", SDIST_SPEC, "-d", tmp])
            sdist = glob.glob(os.path.join(tmp, "pb1-detectron2-*.tar.gz"))[0]
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = glob.glob(os.path.join(tmp, "pb1-detectron2-*/"))[0]
        for line in apply_patches(src):
            print("patched", line)
        if args.keep:
            if os.path.exists(args.keep):
                shutil.rmtree(args.keep)
            shutil.copytree(src, args.keep)
        if not args.no_install:
            _run([args.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", src])
    if not args.no_install:
        _run([args.python, "-c", "import detectron2, detectron2.layers, detectron2.engine; "
              "from detectron2 import model_zoo; "
              "model_zoo.get_config_file('COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml'); "
              "print('detectron2', detectron2.__version__, 'installed and importable')"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
