"""Shared by every benchmark: machine description and the results file format.

Each benchmark measures usdet against a reference in the same run and records the ratio, so
figures stay comparable across machines; results go to benchmarks/results/<name>.json.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from typing import Any, Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def machine() -> Dict[str, Any]:
    """Describe the machine a figure was measured on."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        # "AMD EPYC" alone hides the generation, and two VMs of that name trained the same peer
        # at 64 and ~27 epochs in 69 minutes: family/model and the vector units tell them apart.
        fields: Dict[str, str] = {}
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        info["cpu"] = fields.get("model name", "")
        info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
        flags = set(fields.get("flags", "").split())
        info["cpu_vector"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def write_result(name: str, result: Dict[str, Any], results_dir: Optional[str] = None) -> str:
    """Write ``benchmarks/results/<name>.json`` (or into ``results_dir``) atomically with the machine
    and a timestamp."""
    from usdet.utils.io import atomic_write_json

    result = dict(result)
    result.setdefault("benchmark", name)
    result["machine"] = machine()
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # RESULTS is read at call time: scripts that redirect it (common.RESULTS = ...) are obeyed.
    path = os.path.join(results_dir or RESULTS, f"{name}.json")
    atomic_write_json(path, result)
    print(f"[bench] {name}: " + ", ".join(f"{k}={v}" for k, v in result.items()
                                         if k not in ("machine", "benchmark") and not isinstance(v, (dict, list))))
    return path


def predictor_setup(config_file: str, min_size_test: int, device: str, images: int, size, prefix: str):
    """For the prediction benchmarks: ``(cfg, tmp_dir, frame_paths)``: the config with random-init
    weights saved in ``tmp_dir`` (speed does not depend on them) and ``images`` phantom PNG frames
    of ``size`` (H, W) there."""
    import tempfile

    import numpy as np
    import torch
    from detectron2.modeling import build_model

    from usdet.data.phantom import render_phantom
    from usdet.data.sources import list_sources
    from usdet.engine.predictor import build_predictor_cfg
    from usdet.utils.io import atomic_write_image

    opts = ["INPUT.MIN_SIZE_TEST", str(min_size_test), "INPUT.MAX_SIZE_TEST", str(2 * min_size_test)]
    tmp = tempfile.mkdtemp(prefix=prefix)
    torch.manual_seed(0)
    weights = os.path.join(tmp, "model.pth")
    torch.save({"model": build_model(build_predictor_cfg(config_file, "", device, opts)).state_dict()}, weights)
    rng = np.random.default_rng(0)
    for i in range(images):
        img, _, _ = render_phantom(rng, tuple(size))
        atomic_write_image(os.path.join(tmp, "frames", f"frame_{i:04d}.png"), img)
    return build_predictor_cfg(config_file, weights, device, opts), tmp, list_sources(os.path.join(tmp, "frames"))


def load_average() -> List[float]:
    """The 1/5/15-minute load averages, recorded beside every timed run (2 decimals)."""
    return [round(x, 2) for x in os.getloadavg()]


def run_logged(cmd: List[str], log: str, cwd: str = REPO) -> float:
    """Run ``cmd`` (output to ``log``) and return its wall seconds; a non-zero exit stops the benchmark."""
    return run_until(cmd, log, cwd=cwd)[0]


def run_until(cmd: List[str], log: str, deadline: Optional[float] = None, cwd: str = REPO,
              grace_s: float = 30.0) -> "tuple[float, bool]":
    """Run ``cmd`` (output to ``log``) until it exits or the wall clock reaches ``deadline``.

    Returns (wall seconds, stopped at the deadline). A wall-clock budget is a budget: a run still
    going at its deadline is stopped (SIGTERM to its whole process group, its loader workers
    included; SIGKILL after ``grace_s``), which is not an error. Any other non-zero exit stops
    the benchmark.
    """
    import signal
    import subprocess

    t0 = time.time()
    stopped = False
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if deadline is not None and time.time() >= deadline:
                stopped = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            time.sleep(1.0)
    if proc.returncode != 0 and not stopped:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}")
    return time.time() - t0, stopped
