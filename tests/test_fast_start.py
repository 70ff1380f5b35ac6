"""Fast start: the evaluation, plot and overlay tools load no torch/detectron2 when imported (their
--help answers before any heavy import). Start-up times themselves: benchmarks/bench_startup.py."""
import json
import os
import subprocess
import sys

from train_helpers import REPO

PROBE = (
    "import importlib, importlib.util, json, sys\n"
    "for path in sys.argv[1:]:\n"
    "    if path.endswith('.py'):\n"
    "        spec = importlib.util.spec_from_file_location('tool_' + path.split('/')[-1][:-3], path)\n"
    "        spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    "    else:\n"
    "        importlib.import_module(path)\n"
    "print(json.dumps({m: m in sys.modules for m in ('torch', 'detectron2')}))\n"
)


def _loaded(*targets):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE, *targets], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluation_tools_import_no_torch():
    tools = [os.path.join(REPO, "tools", f"{t}.py") for t in ("evaluate_json", "plot_metrics", "visualize_json_results")]
    modules = ["usdet.evaluation.report", "usdet.evaluation.html_report", "usdet.evaluation.plots",
               "usdet.evaluation.bootstrap", "usdet.utils.known_warnings"]
    assert _loaded(*tools, *modules) == {"torch": False, "detectron2": False}


def test_probe_sees_torch_when_a_tool_needs_it():
    """The same probe on train_net (which imports detectron2 at the top) does see torch."""
    assert _loaded(os.path.join(REPO, "tools", "train_net.py")) == {"torch": True, "detectron2": True}
