"""Exact and near-duplicate frames, found from the pixels (ultrasound sets are full of them).

A re-saved, slightly brighter copy of a frame, or the next frame of the same sweep, must never
land in train while its twin is in test. Each image gets a small fingerprint in the worker that
decodes it; the graph of close fingerprints is then split into connected components.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

import cv2
import numpy as np

# near-duplicate thresholds: 64x64 grayscale correlation, or 256-bit dHash Hamming distance
NEAR_DUP_CORR = 0.95
NEAR_DUP_HAMMING = 10


def pixel_sha(img: np.ndarray) -> str:
    """Identity of the decoded pixels (and their size): equal for pixel-identical files."""
    h, w = img.shape[:2]
    return hashlib.sha256(np.ascontiguousarray(img).data).hexdigest()[:32] + f":{w}x{h}"


def fingerprint(img: np.ndarray) -> Tuple[np.ndarray, bytes]:
    """64x64 zero-mean unit-norm vector (for correlation) and a 256-bit dHash, from a downscaled gray copy."""
    import imagehash
    from PIL import Image

    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    vec = small.astype(np.float32).ravel()
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    vec = vec / norm if norm > 0 else vec
    dhash = imagehash.dhash(Image.fromarray(small), hash_size=16)
    return vec.astype(np.float16), np.packbits(dhash.hash.ravel()).tobytes()


def near_duplicate_components(vecs: np.ndarray, hashes: np.ndarray, corr_thresh: float,
                              ham_thresh: int, block: int = 256) -> np.ndarray:
    """Connected components of the 'near-duplicate' graph (correlation or dHash distance).

    Pairs are compared in ``block`` x ``block`` tiles of the upper triangle, converted to float32
    tile by tile, so the working memory beyond the fingerprints themselves stays constant
    however many images there are.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(vecs)
    if n == 0:
        return np.zeros(0, np.int64)
    rows, cols = [], []
    for i0 in range(0, n, block):
        vi = vecs[i0:i0 + block].astype(np.float32)
        bi = np.unpackbits(hashes[i0:i0 + block], axis=1).astype(np.float32)
        for j0 in range(i0, n, block):
            vj = vi if j0 == i0 else vecs[j0:j0 + block].astype(np.float32)
            bj = bi if j0 == i0 else np.unpackbits(hashes[j0:j0 + block], axis=1).astype(np.float32)
            corr = vi @ vj.T
            # Hamming distance of 0/1 vectors: popcount(a) + popcount(b) - 2 a.b
            ham = bi.sum(axis=1)[:, None] + bj.sum(axis=1)[None, :] - 2 * (bi @ bj.T)
            r, c = np.nonzero((corr >= corr_thresh) | (ham <= ham_thresh))
            rows.append(r + i0)
            cols.append(c + j0)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
