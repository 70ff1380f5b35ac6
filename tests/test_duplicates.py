"""The near-duplicate graph: pairs found across tiles, by either fingerprint, joined transitively."""
import numpy as np

from usdet.data.duplicates import components, near_duplicate_components


def _unit(v):
    v = v - v.mean()
    return (v / np.linalg.norm(v)).astype(np.float16)


def test_pairs_across_tiles_and_by_either_fingerprint_form_components():
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(4096) for _ in range(5)]
    vecs = np.stack([_unit(b) for b in base])
    vecs[4] = _unit(base[0] + 0.05 * rng.standard_normal(4096))  # 0 ~ 4 by correlation, other tile
    hashes = rng.integers(0, 256, (5, 32), dtype=np.uint8)
    hashes[2] = hashes[1]
    hashes[2, 0] ^= 0b111  # 1 ~ 2 by dHash: 3 bits apart
    labels = near_duplicate_components(vecs, hashes, corr_thresh=0.95, ham_thresh=10, block=2)
    assert labels.tolist() == [0, 1, 1, 3, 0]
    # one tile for all gives the same graph
    assert near_duplicate_components(vecs, hashes, 0.95, 10, block=256).tolist() == labels.tolist()
    # no pair under stricter thresholds
    assert near_duplicate_components(vecs, hashes, 0.9999, 2, block=2).tolist() == [0, 1, 2, 3, 4]


def test_components_join_transitively_to_the_smallest_member():
    assert components(6, [(4, 5), (1, 4), (2, 3)]).tolist() == [0, 1, 2, 2, 1, 1]
