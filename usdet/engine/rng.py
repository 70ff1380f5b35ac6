"""RNG state as checkpoint data, and a guard that keeps hooks from moving the training streams.

A resumed run is identical to an uninterrupted one only if torch/NumPy/Python RNGs continue
where they were; states are stored in types ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "preserve_rng", "reseed_all"]


def capture_rng() -> Dict[str, Any]:
    """torch/NumPy/Python RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Put back a state from :func:`capture_rng` (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserve_rng():
    """Run a block (evaluation, validation loss) without moving the training RNG streams.

    Evaluation draws from torch's global RNG (e.g. each DataLoader iterator takes a seed);
    restoring the state afterwards keeps a resumed run identical to an uninterrupted one.
    """
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def reseed_all(seed: int) -> None:
    """Seed torch, NumPy and Python from one integer (mixed first, so nearby seeds differ well)."""
    seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
