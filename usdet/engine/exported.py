"""Load a model written by :mod:`usdet.engine.export` (TorchScript or ONNX) and run it on CPU.

Kept apart from the exporter, which needs the predictor's preprocessing and weights choice,
so that the predictor can run an exported model without importing the exporter back.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["FORMATS", "BACKEND_OF_FORMAT", "meta_path", "runner_from_bytes", "load_exported"]

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
BACKEND_OF_FORMAT = {"torchscript": "torchscript", "onnx": "onnxruntime"}


def meta_path(model_path: str) -> str:
    """The JSON beside an exported model (``model.onnx`` -> ``model.json``)."""
    return os.path.splitext(model_path)[0] + ".json"


def runner_from_bytes(data: bytes, backend: str, threads: Optional[int] = None) -> Optional[Callable]:
    """A function ``uint8 CHW tensor -> (boxes, scores, classes)`` numpy arrays; None without onnxruntime."""
    if backend == "torchscript":
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

        def run_ts(image: torch.Tensor):
            with torch.inference_mode():
                return tuple(t.numpy() for t in module(image))

        return run_ts
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    # the same thread budget as PyTorch (OMP_NUM_THREADS / torch.set_num_threads), not every core
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def run_ort(image: torch.Tensor):
        return tuple(session.run(None, {"image": image.numpy()}))

    return run_ort


def load_exported(path: str, backend: str, threads: Optional[int] = None) -> Tuple[Dict[str, Any], Callable]:
    """The JSON beside an exported model and a function running it (see :func:`runner_from_bytes`).

    Errors are one line naming the file: missing model or JSON, an export of the other format,
    an unreadable file, onnxruntime not installed.
    """
    if backend not in BACKEND_OF_FORMAT.values():
        raise ValueError(f"unknown backend {backend!r} for an exported model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: exported model not found")
    mpath = meta_path(path)
    try:
        with open(mpath, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{mpath}: not found beside {path} (tools/export_model.py writes it)") from None
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{mpath}: unreadable ({e})") from None
    if BACKEND_OF_FORMAT.get(meta.get("format")) != backend:
        want = BACKEND_OF_FORMAT.get(meta.get("format"), "?")
        raise ValueError(f"{path} is a {meta.get('format')} export: use --backend {want}")
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise RuntimeError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
    try:
        with open(path, "rb") as fh:
            run = runner_from_bytes(fh.read(), backend, threads)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise RuntimeError(f"{path}: not a readable {meta['format']} model ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return meta, run
