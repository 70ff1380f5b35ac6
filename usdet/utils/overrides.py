"""``KEY VALUE`` config overrides anywhere on a tool's command line.

An argparse option with ``nargs="+"`` (``--input a.png b/``) swallows the pairs that follow it, and
a ``REMAINDER`` positional swallows the options after the first pair; so the tools take the pairs
out of the command line before argparse sees it. A pair starts at a token that names a config key
(upper case, its first part a top-level key of the config, e.g. ``MODEL.ROI_HEADS.NUM_CLASSES`` or
``SEED``) and is not an existing file or the value of an option that takes one; everything after
``--`` is overrides too.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
from typing import FrozenSet, List, Sequence, Tuple

__all__ = ["split_overrides", "parse_with_overrides"]

_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*")


@functools.lru_cache(maxsize=1)
def _top_level_keys() -> FrozenSet[str]:
    from detectron2.config import get_cfg

    from usdet.config import add_usdet_config

    cfg = get_cfg()
    add_usdet_config(cfg)
    return frozenset(cfg.keys())


def _is_key(token: str) -> bool:
    return bool(_KEY.fullmatch(token)) and token.split(".")[0] in _top_level_keys() and not os.path.exists(token)


def split_overrides(argv: Sequence[str], value_options: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """``(argv without the overrides, [KEY, VALUE, ...])``; ``value_options``: options taking one value."""
    takes_value = set(value_options)
    rest: List[str] = []
    opts: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            opts += list(argv[i + 1:])
            break
        if i + 1 < len(argv) and not (rest and rest[-1] in takes_value) and _is_key(token):
            opts += [token, argv[i + 1]]
            i += 2
            continue
        rest.append(token)
        i += 1
    return rest, opts


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` with every ``KEY VALUE`` pair, wherever it stands, in ``args.opts``."""
    value_options = [s for a in parser._actions for s in a.option_strings if a.nargs is None]
    rest, opts = split_overrides(list(argv), value_options)
    args = parser.parse_args(rest)
    args.opts = opts + [o for o in (getattr(args, "opts", None) or []) if o != "--"]
    return args
