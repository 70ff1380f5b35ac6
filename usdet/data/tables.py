"""Read a dataset's table (CSV, or a spreadsheet as published: .xlsx via openpyxl) into rows.

One reader for every converter, so a missing column, a duplicate ID or an empty cell is
reported the same way: a table that lacks a required column cannot be used at all (a
``ValueError`` naming the file and the column); everything else is a per-row problem.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

MISSING_TEXT = ("", "not available", "n/a", "na", "nan", "none")


class TableError(ValueError):
    """The table as a whole cannot be used; the message names the file and the problem."""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def read_table(path: str, required: Sequence[str]) -> Tuple[List[str], List[Tuple[int, Dict[str, str]]]]:
    """(column names, [(row number as a spreadsheet shows it, {column: text})]) of the first sheet / the CSV.

    Cells are text (integers without ``.0``); raises :class:`TableError` when the file cannot be
    read or lacks a ``required`` column.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise TableError(f"{path}: table not found")
    try:
        if path.lower().endswith((".xlsx", ".xlsm")):
            import openpyxl

            wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
            try:
                raw = [list(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
            finally:
                wb.close()
        else:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                raw = list(csv.reader(fh))
    except Exception as e:  # a corrupt workbook or a binary file named .csv: one line, the file named
        raise TableError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None
    if not raw:
        raise TableError(f"{path}: the table is empty (no header row)")
    header = [_cell(c) for c in raw[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise TableError(f"{name}: column(s) {missing} missing; the table has {[h for h in header if h]}")
    dup = sorted(c for c, n in Counter(h for h in header if h).items() if n > 1)
    if dup:
        raise TableError(f"{name}: column(s) {dup} appear more than once")
    rows = []
    for n, values in enumerate(raw[1:], start=2):
        cells = [_cell(v) for v in values]
        if not any(cells):
            continue  # blank line
        rows.append((n, {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header) if h}))
    return header, rows


def value(row: Dict[str, str], column: str) -> str:
    """The cell, or "" when the column is absent or the cell says 'not available'."""
    v = row.get(column, "")
    return "" if v.lower() in MISSING_TEXT else v


def duplicates(rows: List[Tuple[int, Dict[str, str]]], column: str) -> Dict[str, List[int]]:
    """{value: [row numbers]} for the values of ``column`` that appear in more than one row."""
    seen: Dict[str, List[int]] = {}
    for n, row in rows:
        seen.setdefault(row.get(column, ""), []).append(n)
    return {k: v for k, v in seen.items() if k and len(v) > 1}
