"""The one place where known third-party warnings that a user cannot act on are silenced.

detectron2 0.6 and torch print deprecation warnings on every start (``torch.jit.script`` is
deprecated, ``torch.meshgrid`` needs ``indexing``, ...) that bury usdet's own messages. Each tool
calls :func:`silence_known_warnings` first. Filters match the exact message text (and category)
listed here, so usdet's own warnings and any *new* third-party warning still show; add an entry
only for a warning that comes from code usdet does not own and cannot change.
"""
from __future__ import annotations

import re
import warnings
from typing import List, Tuple, Type

# (category, exact message text; a message that ends in run-specific text is matched up to it)
KNOWN_WARNINGS: List[Tuple[Type[Warning], str]] = [
    # torch >= 2.9 on detectron2 0.6's @torch.jit.script helpers (detectron2.layers, structures)
    (FutureWarning, "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."),
    # detectron2 0.6 calls torch.meshgrid without indexing= in its anchor generator; the message
    # ends with "(Triggered internally at <torch build path>...)", which differs per build
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument."),
]

_installed = False


def silence_known_warnings() -> None:
    """Ignore exactly the :data:`KNOWN_WARNINGS` (idempotent; call before importing torch)."""
    global _installed
    if _installed:
        return
    for category, message in KNOWN_WARNINGS:
        # filterwarnings matches the message's start; the escape makes it literal text
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    _installed = True
