"""The one place where known third-party warnings that a user cannot act on are silenced.

detectron2 0.6 and torch print deprecation warnings on every start (``torch.jit.script`` is
deprecated, ``torch.meshgrid`` needs ``indexing``, ...) that bury usdet's own messages. Each tool
calls :func:`silence_known_warnings` first. Filters match the exact message text (and category)
listed here, so usdet's own warnings and any *new* third-party warning still show; add an entry
only for a warning that comes from code usdet does not own and cannot change.
``USDET_SHOW_ALL_WARNINGS=1`` turns the filter off (to see them all again).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import List, Tuple, Type

# (category, exact message text)
KNOWN_WARNINGS: List[Tuple[Type[Warning], str]] = [
    # torch >= 2.9 on detectron2 0.6's @torch.jit.script helpers (detectron2.layers, structures)
    (FutureWarning, "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."),
    # detectron2 0.6 calls torch.meshgrid without indexing= in its anchor generator
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument."),
]

# torch's C++ warnings end with " (Triggered internally at <build path>:<line>.)", which differs per build
_TORCH_SUFFIX = r"( \(Triggered internally at [^)]*\))?\Z"
_installed = False


def silence_known_warnings() -> None:
    """Ignore exactly the :data:`KNOWN_WARNINGS` (idempotent; call before importing torch)."""
    global _installed
    if _installed or os.environ.get("USDET_SHOW_ALL_WARNINGS", "") not in ("", "0"):
        return
    for category, message in KNOWN_WARNINGS:
        # literal text, whole message (filterwarnings alone would match any message starting so)
        warnings.filterwarnings("ignore", message=re.escape(message) + _TORCH_SUFFIX, category=category)
    _installed = True
