"""Helpers shared by the tests: tiny phantom datasets, the quick config, train_net runs, tools.

Everything runs the real code on CPU with one thread (two shared cores: several threads per
process only spin against each other) and the tiny quick schedule.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_CFG = os.path.join(REPO, "configs", "quick_schedules", "phantom_R18_FPN.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def load_tool(name: str):
    """The module of ``tools/<name>.py``, so a test can call its ``main()`` in process."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def load_benchmark(name: str, as_name: Optional[str] = None):
    """A fresh module of ``benchmarks/<name>.py`` (run from its file, not cached in sys.modules)."""
    spec = importlib.util.spec_from_file_location(as_name or f"bench_{name}", os.path.join(REPO, "benchmarks",
                                                                                           f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_datasets_root(root: str) -> str:
    """``root/ph1`` (class lesion) and ``root/ph2`` (benign, malignant): 16 phantoms of 96 px each."""
    from usdet.data.phantom import make_phantom_dataset
    from usdet.data.register import register_all_usdet_datasets

    if not os.path.isdir(os.path.join(root, "ph1")):
        make_phantom_dataset(os.path.join(root, "ph1"), num_images=16, size=96, seed=0, classes="lesion")
        make_phantom_dataset(os.path.join(root, "ph2"), num_images=16, size=96, seed=1, classes="benign,malignant")
    register_all_usdet_datasets(root)
    return root


def dataset_opts(name: str = "ph1") -> List[str]:
    return ["DATASETS.TRAIN", f"('{name}_train',)", "DATASETS.TEST", f"('{name}_val',)"]


def quick_cfg(output_dir: str, *opts: str, dataset: str = "ph1"):
    """The quick config for an in-process Trainer (CPU, given OUTPUT_DIR, extra overrides)."""
    from usdet.engine import build_config

    num_classes = "1" if dataset == "ph1" else "2"
    return build_config(QUICK_CFG, ["OUTPUT_DIR", str(output_dir), "MODEL.DEVICE", "cpu",
                                    "MODEL.ROI_HEADS.NUM_CLASSES", num_classes, *dataset_opts(dataset), *opts])


def train_net_env(datasets_root: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(USDET_DATASETS=datasets_root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    return env


def train_net_cmd(output_dir: str, *opts: str, resume: bool = False, eval_only: bool = False,
                  dataset: str = "ph1") -> List[str]:
    cmd = [sys.executable, TRAIN_NET, "--config-file", QUICK_CFG]
    if resume:
        cmd.append("--resume")
    if eval_only:
        cmd.append("--eval-only")
    return cmd + ["OUTPUT_DIR", str(output_dir), "MODEL.DEVICE", "cpu", *dataset_opts(dataset), *opts]


def run_train_net(datasets_root: str, output_dir: str, *opts: str, timeout: float = 240,
                  **kw) -> subprocess.CompletedProcess:
    return subprocess.run(train_net_cmd(output_dir, *opts, **kw), env=train_net_env(datasets_root),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def state_tensors(sd, prefix: str = "") -> Dict[str, object]:
    """Flatten nested dicts/lists of a checkpoint to ``{dotted.key: tensor}``."""
    import torch

    out: Dict[str, object] = {}
    if isinstance(sd, torch.Tensor):
        out[prefix] = sd
    elif isinstance(sd, dict):
        for k, v in sd.items():
            out.update(state_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            out.update(state_tensors(v, f"{prefix}.{i}"))
    return out


def phantom_batches(seed: int, size: int, batch_size: int = 4):
    """Endless batches of one-lesion phantoms in detectron2's training input format (BGR, as the quick config)."""
    import numpy as np
    import torch
    from detectron2.structures import Boxes, Instances

    from usdet.data.phantom import render_phantom

    rng = np.random.default_rng(seed)
    while True:
        batch = []
        for _ in range(batch_size):
            rgb, boxes, _ = render_phantom(rng, size, kinds=[str(rng.choice(["benign", "malignant"]))])
            b = np.asarray(boxes, np.float32).reshape(-1, 4)
            b[:, 2:] += b[:, :2]
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.from_numpy(b))
            inst.gt_classes = torch.zeros(len(b), dtype=torch.int64)
            bgr = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))
            batch.append({"image": torch.from_numpy(bgr), "instances": inst})
        yield batch


_TRAINED: Dict[tuple, object] = {}


def train_phantom_detector(iters: int = 150, size: int = 128, seed: int = 0):
    """``(cfg, model)``: the quick R18-FPN trained ``iters`` steps on phantoms (detectron2's
    SimpleTrainer, one thread), confident enough to detect phantom lesions. Trained once per
    test session for given arguments; every call gets its own copy of the model, in eval mode."""
    import torch
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.modeling import build_model

    from usdet.engine.predictor import build_predictor_cfg

    key = (iters, size, seed)
    cfg = build_predictor_cfg(QUICK_CFG, "", "cpu")
    if key not in _TRAINED:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(seed)
            model = build_model(cfg)
            opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
            warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, (it + 1) / 10))
            trainer = SimpleTrainer(model, phantom_batches(seed, size), opt)
            trainer.register_hooks([hooks.LRScheduler(opt, warmup)])
            trainer.train(0, iters)
        finally:
            torch.set_num_threads(threads)
        _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = build_model(cfg)
    model.load_state_dict(_TRAINED[key])
    return cfg, model.eval()


def link_busi_subset(busi_root: str, dest, counts=(("benign", 10), ("malignant", 8), ("normal", 6))):
    """A small BUSI-layout folder of symlinks to the first images (and masks) of each class."""
    import glob

    for cls, n in counts:
        os.makedirs(os.path.join(dest, cls), exist_ok=True)
        for i in range(1, n + 1):
            for f in glob.glob(os.path.join(busi_root, cls, f"{cls} ({i})*.png")):
                os.symlink(f, os.path.join(dest, cls, os.path.basename(f)))
    return dest


def write_pixel_stats(path, mean, std) -> str:
    """A pixel_stats.json as the converters write it (train split of 3 images)."""
    import json

    with open(path, "w") as fh:
        json.dump({"mean": list(mean), "std": list(std), "split": "train", "num_images": 3}, fh)
    return str(path)


def tail(text: Optional[str], n: int = 3000) -> str:
    return (text or "")[-n:]


def seq(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


class capture_log:
    """Collect messages of one logger directly (pytest's caplog misses loggers that detectron2's
    ``setup_logger`` has set to not propagate, which depends on what ran before)."""

    def __init__(self, name: str):
        import logging

        self.logger = logging.getLogger(name)
        self.messages: List[str] = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.messages.append(record.getMessage())

        self.handler = _Handler(level=logging.DEBUG)

    def __enter__(self):
        import logging

        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._level)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


def phantom_sites(data: str, num_images: int = 16, size: int = 96) -> None:
    """Two phantom "sites" under ``data``: ``ph`` and ``phs``, the same images intensity-shifted
    (0.6 x + 50), as a second scanner would show them (the cross-site benchmarks' tests)."""
    import shutil

    import numpy as np

    from usdet.data.image_io import read_image
    from usdet.data.phantom import make_phantom_dataset
    from usdet.utils.io import atomic_write_image

    make_phantom_dataset(os.path.join(data, "ph"), num_images=num_images, size=size, seed=0)
    shutil.copytree(os.path.join(data, "ph"), os.path.join(data, "phs"))
    folder = os.path.join(data, "phs", "images")
    for name in os.listdir(folder):
        img = read_image(os.path.join(folder, name)).astype(np.float32)
        atomic_write_image(os.path.join(folder, name), np.clip(0.6 * img + 50, 0, 255).astype(np.uint8))
