"""Keyed pseudonyms for patients, clips and source files, so no identifier reaches an output.

Hospital exports name files and folders after patients (names, MRNs, dates). The converter
replaces every such value by an HMAC-SHA256 pseudonym under a key only the user holds: the
same key gives the same pseudonyms (splits are reproducible, new frames of a known patient
join the same group), while without the key the pseudonyms cannot be reversed or recomputed
from a guessed name. A mapping back to the originals is written only on request, and never
inside the output tree that is meant to be shared.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional

__all__ = ["KEY_ENV", "PseudonymKeyError", "load_key", "Pseudonymizer", "is_inside", "check_mapping_path",
           "redact"]

KEY_ENV = "USDET_PSEUDONYM_KEY"
MIN_KEY_BYTES = 8


class PseudonymKeyError(ValueError):
    """No usable pseudonym key (missing, empty or too short)."""


def load_key(key_file: Optional[str] = None) -> bytes:
    """The pseudonym key from ``key_file`` (surrounding whitespace stripped) or ``$USDET_PSEUDONYM_KEY``."""
    if key_file:
        try:
            with open(key_file, "rb") as fh:
                key = fh.read().strip()
        except OSError as e:
            raise PseudonymKeyError(f"{key_file}: cannot read the pseudonym key file ({e.strerror})") from None
        source = key_file
    else:
        key = os.environ.get(KEY_ENV, "").strip().encode("utf-8")
        source = f"${KEY_ENV}"
        if not key:
            raise PseudonymKeyError(
                f"no pseudonym key: pass --key-file FILE or set {KEY_ENV} (hospital data is never converted "
                "without pseudonymizing patient identifiers)")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"{source}: pseudonym key is shorter than {MIN_KEY_BYTES} bytes")
    return key


class Pseudonymizer:
    """``p(value, kind)`` -> ``"<kind>-<16 hex>"``; the kind is mixed in, so a patient and a file with
    the same text get unrelated pseudonyms."""

    def __init__(self, key: bytes, length: int = 16):
        if not key:
            raise PseudonymKeyError("empty pseudonym key")
        self._key = bytes(key)
        self.length = int(length)

    def __call__(self, value: str, kind: str = "pt") -> str:
        msg = f"{kind}\x00{value}".encode("utf-8")
        return f"{kind}-{hmac.new(self._key, msg, hashlib.sha256).hexdigest()[: self.length]}"

    @property
    def key_id(self) -> str:
        """A short fingerprint of the key (not the key), so reports show which key made them."""
        return hmac.new(self._key, b"usdet-key-id", hashlib.sha256).hexdigest()[:8]


def is_inside(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or lies under it (symlinks resolved)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def check_mapping_path(mapping: str, output_dir: str) -> None:
    """Refuse a mapping file inside the output tree (which may be shared); raise ValueError."""
    if is_inside(mapping, output_dir):
        raise ValueError(f"--mapping {mapping} lies inside the output folder {output_dir}: the mapping back "
                         "to real file names must be kept outside the (shareable) output tree")


def redact(text: str, identifiers: Iterable[str]) -> str:
    """Replace every occurrence of the given identifiers (and their path components) in ``text``."""
    parts = set()
    for ident in identifiers:
        if not ident:
            continue
        parts.add(str(ident))
        for comp in str(ident).replace("\\", "/").split("/"):
            if len(comp) >= 3:
                parts.add(comp)
                parts.add(os.path.splitext(comp)[0])
    for p in sorted(parts, key=len, reverse=True):
        if len(p) >= 3:
            text = text.replace(p, "<redacted>")
    return text
