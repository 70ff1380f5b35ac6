"""How numbers, estimates with intervals and tables are written in every usdet report.

One module that imports no other part of usdet, so that each report (``report.md``,
subgroups, operating point, comparison, cross-evaluation, cross-validation, benchmarks) writes
a value the same way and the modules that compute results never import each other to borrow a
formatter.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

__all__ = ["fmt_number", "fmt_value", "fmt_estimate", "markdown_table"]


def fmt_number(v: Optional[float], spec: str, undefined: str = "n/a") -> str:
    """``v`` formatted by ``spec`` (e.g. ``"+.4f"``), or ``undefined`` where it is None or NaN
    (image AUC without lesion-free images, a DeLong test of 0/0)."""
    return undefined if v is None or v != v else format(v, spec)


def fmt_value(v: Any, digits: int = 3, undefined: str = "n/a") -> str:
    """A table cell: floats with ``digits`` decimals, integers and booleans as they are,
    ``undefined`` for None, NaN and infinities, anything else as text."""
    if v is None:
        return undefined
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return undefined if not np.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def fmt_estimate(v: Dict[str, Any], digits: int = 3, undefined: str = "n/a") -> str:
    """``{"estimate", "low"?, "high"?}`` as ``est [low, high]`` (``undefined`` alone when the
    estimate is undefined)."""
    s = fmt_value(v.get("estimate"), digits, undefined)
    if v.get("low") is not None and s != undefined:
        s += f" [{fmt_value(v['low'], digits, undefined)}, {fmt_value(v['high'], digits, undefined)}]"
    return s


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A markdown table; each cell through :func:`fmt_value` (text cells pass unchanged)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt_value(v, digits) for v in r) + " |")
    return "\n".join(lines) + "\n"
