#!/usr/bin/env python
"""Start-up time of each tool's ``--help``, as a ratio to a bare ``python -c "import cv2"``.

Each command runs in a fresh process (best of ``--repeat``, the least disturbed by other load),
the reference in the same run. Tools that neither train nor run a model (converters, cropper,
evaluation, plots, overlays) must answer within 1 s on an idle 2-core machine, where the bare
cv2 import takes about 0.4 s: target ratio <= 2.5. Each also records whether importing it pulls
in torch. The model tools (train_net, predict, gradcam) are measured for scale, with no target.

  python benchmarks/bench_startup.py [--repeat 3]
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, write_result  # noqa: E402

TARGET_RATIO = 2.5
# name -> (argv after the interpreter, has a target)
COMMANDS = {
    "convert_to_coco busi": (["tools/convert_to_coco.py", "busi", "--help"], True),
    "crop_workspace": (["tools/crop_workspace.py", "--help"], True),
    "evaluate_json": (["tools/evaluate_json.py", "--help"], True),
    "plot_metrics": (["tools/plot_metrics.py", "--help"], True),
    "visualize_json_results": (["tools/visualize_json_results.py", "--help"], True),
    "train_net": (["tools/train_net.py", "--help"], False),
    "predict": (["tools/predict.py", "--help"], False),
    "gradcam": (["tools/gradcam.py", "--help"], False),
}
# does loading the tool's module import torch? (its --help then pays for it)
TORCH_PROBE = (
    "import importlib.util, sys; spec = importlib.util.spec_from_file_location('tool', sys.argv[1]); "
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print('torch' in sys.modules)"
)


def wall(argv, env, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reference = wall(["-c", "import cv2"], env, args.repeat)
    tools = {}
    for name, (argv, targeted) in COMMANDS.items():
        seconds = wall(argv, env, args.repeat)
        probe = subprocess.run([sys.executable, "-c", TORCH_PROBE, argv[0]], cwd=REPO, env=env,
                               capture_output=True, text=True)
        tools[name] = {
            "seconds": round(seconds, 3),
            "ratio_to_cv2_import": round(seconds / reference, 2),
            "imports_torch": probe.stdout.strip() == "True" if probe.returncode == 0 else None,
            "has_target": targeted,
        }
        print(f"  {name} --help: {seconds:.2f} s ({seconds / reference:.1f}x)", flush=True)
    off = sorted(n for n, t in tools.items() if t["has_target"] and t["ratio_to_cv2_import"] > TARGET_RATIO)
    write_result("startup", {
        "repeat": args.repeat,
        "reference": "python -c 'import cv2' in a fresh process",
        "reference_seconds": round(reference, 3),
        "target_ratio": TARGET_RATIO,
        "tools": tools,
        "off_target": off,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "target_met": not off,
    })
    return 0 if not off else 1


if __name__ == "__main__":
    sys.exit(main())
