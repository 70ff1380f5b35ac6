"""Exact and near-duplicate frames, found from the pixels (ultrasound sets are full of them).

A re-saved, slightly brighter copy of a frame, or the next frame of the same sweep, must never
land in train while its twin is in test. Each image gets a small fingerprint in the worker that
decodes it; the graph of close fingerprints is then split into connected components.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Tuple

import cv2
import numpy as np

from usdet.data.defaults import NEAR_DUP_CORR, NEAR_DUP_HAMMING  # noqa: F401  (the thresholds' defaults)


def pixel_sha(img: np.ndarray) -> str:
    """Identity of the decoded pixels (and their size): equal for pixel-identical files."""
    h, w = img.shape[:2]
    return hashlib.sha256(np.ascontiguousarray(img).data).hexdigest()[:32] + f":{w}x{h}"


def fingerprint(img: np.ndarray) -> Tuple[np.ndarray, bytes]:
    """64x64 zero-mean unit-norm vector (for correlation) and a 256-bit dHash, from a downscaled gray copy.

    A colour image is downscaled first and converted to gray at 64x64 (both are linear, so this
    equals gray-then-downscale up to rounding, for a fraction of the work). The image is first
    brought to a multiple of 64 (bilinear, a scale close to 1), so the area average is an integer
    one: a third of the cost (measured by benchmarks/bench_convert.py), the same BUSI groups.
    """
    import imagehash
    from PIL import Image

    h, w = img.shape[:2]
    kx, ky = max(1, w // 64), max(1, h // 64)
    if (w, h) != (64 * kx, 64 * ky):  # to a multiple of 64 first: OpenCV's area resize is 3x faster then
        img = cv2.resize(img, (64 * kx, 64 * ky), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    vec = small.astype(np.float32).ravel()
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    vec = vec / norm if norm > 0 else vec
    dhash = imagehash.dhash(Image.fromarray(small), hash_size=16)
    return vec.astype(np.float16), np.packbits(dhash.hash.ravel()).tobytes()


def components(n: int, pairs: Iterable[Tuple[int, int]]) -> np.ndarray:
    """Connected components of ``n`` nodes joined by ``pairs``: each node's smallest member index.

    A plain union-find: scipy.sparse.csgraph gives the same answer but costs a quarter second of
    import in every converter run (measured by benchmarks/bench_convert.py), for a sparse graph.
    """
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], np.int64)


def near_duplicate_components(vecs: np.ndarray, hashes: np.ndarray, corr_thresh: float,
                              ham_thresh: int, block: int = 256) -> np.ndarray:
    """Connected components of the 'near-duplicate' graph (correlation or dHash distance).

    Pairs are compared in ``block`` x ``block`` tiles of the upper triangle, converted to float32
    tile by tile, so the working memory beyond the fingerprints themselves stays constant
    however many images there are. Returns each image's component label (its smallest member).

    The tiles are small products: BLAS runs them on one thread. With its default thread pool the
    waiting threads spin, which cost 12x the CPU time (50x the wall time) of one thread on a
    loaded 2-core machine (1875 images: 0.25 s on one thread; benchmarks/bench_convert.py).
    """
    from threadpoolctl import threadpool_limits

    n = len(vecs)
    if n == 0:
        return np.zeros(0, np.int64)
    with threadpool_limits(limits=1, user_api="blas"):
        rows, cols = _close_pairs(vecs, hashes, corr_thresh, ham_thresh, block)
    return components(n, zip(rows.tolist(), cols.tolist()))


def _close_pairs(vecs: np.ndarray, hashes: np.ndarray, corr_thresh: float, ham_thresh: int,
                 block: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, cols), row < col, of every pair closer than either threshold, tile by tile."""
    n = len(vecs)
    rows, cols = [], []
    for i0 in range(0, n, block):
        vi = vecs[i0:i0 + block].astype(np.float32, copy=False)  # float32 fingerprints: a view
        bi = np.unpackbits(hashes[i0:i0 + block], axis=1).astype(np.float32)
        for j0 in range(i0, n, block):
            vj = vi if j0 == i0 else vecs[j0:j0 + block].astype(np.float32, copy=False)
            bj = bi if j0 == i0 else np.unpackbits(hashes[j0:j0 + block], axis=1).astype(np.float32)
            corr = vi @ vj.T
            # Hamming distance of 0/1 vectors: popcount(a) + popcount(b) - 2 a.b
            ham = bi.sum(axis=1)[:, None] + bj.sum(axis=1)[None, :] - 2 * (bi @ bj.T)
            r, c = np.nonzero((corr >= corr_thresh) | (ham <= ham_thresh))
            keep = r + i0 < c + j0  # each pair once, no self-pairs
            rows.append(r[keep] + i0)
            cols.append(c[keep] + j0)
    return np.concatenate(rows), np.concatenate(cols)
