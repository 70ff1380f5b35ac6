#!/usr/bin/env python
"""`make bench`: run every benchmarks/bench_*.py in turn; each writes benchmarks/results/<name>.json.

  python benchmarks/run_all.py [--only NAME ...]

A failing benchmark is reported and the others still run; the exit code is non-zero if any failed
or missed its target (each script exits 1 when its target is missed).
"""
import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="benchmark names, e.g. crop predict")
    args = ap.parse_args()
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if args.only:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in args.only]
    failed = []
    for s in scripts:
        name = os.path.basename(s)[6:-3]
        print(f"=== {name} ===", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, s])
        print(f"=== {name}: exit {rc} in {time.time() - t0:.0f}s ===", flush=True)
        if rc:
            failed.append(name)
    print("benchmarks failed or off target:", ", ".join(failed) if failed else "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
