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


def test_exact_duplicates_are_hashed_only_where_fingerprints_tie(tmp_path, monkeypatch):
    """Pixel-identical files group together; a copy with other pixels but a tied fingerprint does not;
    an image whose fingerprint ties with no other is never decoded again."""
    import cv2

    from usdet.data import convert_image
    from usdet.data.convert import _pixel_identical
    from usdet.data.convert_image import SourceImage
    from usdet.data.duplicates import fingerprint

    rng = np.random.default_rng(2)
    base = rng.integers(20, 200, (70, 90), dtype=np.uint8)
    other = rng.integers(20, 200, (70, 90), dtype=np.uint8)
    files = {"a": base, "a_copy": base, "a_brighter": base + 7, "b": other}
    sources, results = [], []
    for name, img in files.items():
        cv2.imwrite(str(tmp_path / f"{name}.png"), img)
        sources.append(SourceImage(file=f"{name}.png", path=str(tmp_path / f"{name}.png"), name=name,
                                   folder="x", label="benign"))
        vec, dhash = fingerprint(img)
        results.append({"source_size": (90, 70), "vec": vec, "dhash": dhash})
    results[2].update(vec=results[0]["vec"], dhash=results[0]["dhash"])  # a fingerprint tie, other pixels
    decoded = []
    real = convert_image.pixel_identity
    monkeypatch.setattr(convert_image, "pixel_identity", lambda src: decoded.append(src.name) or real(src))
    by_sha = _pixel_identical(sources, [0, 1, 2, 3], results)
    assert sorted(decoded) == ["a", "a_brighter", "a_copy"]  # "b" ties with nothing: not decoded again
    assert sorted(m for m in by_sha.values()) == [[0, 1], [2]]
    (tmp_path / "a_copy.png").write_bytes(b"gone")  # a file that changed during the run stays apart
    assert sorted(m for m in _pixel_identical(sources, [0, 1, 2, 3], results).values()) == [[0], [1], [2]]
