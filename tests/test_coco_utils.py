"""mask -> box/annotation, pixel statistics and deterministic atomic writing."""
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util

from usdet.data.coco import compute_pixel_stats, encode_rle, mask_to_annotation, mask_to_box, write_coco_dataset


def test_mask_to_box_first_last_inclusive():
    m = np.zeros((20, 30), np.uint8)
    m[5, 7] = 1
    assert mask_to_box(m) == [7.0, 5.0, 1.0, 1.0]
    m[12, 21] = 255
    assert mask_to_box(m) == [7.0, 5.0, 15.0, 8.0]
    assert mask_to_box(np.zeros((4, 4), bool)) is None


def test_mask_to_annotation_rle_roundtrip():
    rng = np.random.default_rng(0)
    m = np.zeros((40, 50), bool)
    m[10:25, 8:30] = rng.random((15, 22)) > 0.3
    ann = mask_to_annotation(m, category_id=2, image_id=7)
    assert ann["category_id"] == 2 and ann["image_id"] == 7 and ann["iscrowd"] == 0
    assert ann["area"] == float(m.sum())
    decoded = mask_util.decode({"size": ann["segmentation"]["size"],
                                "counts": ann["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), m)
    assert ann["bbox"] == mask_to_box(m)
    assert mask_to_annotation(np.zeros((3, 3))) is None


def _edge_masks():
    """Masks at every edge case of the column-band RLE: touching each border, one pixel, full, empty, blobs."""
    rng = np.random.default_rng(3)
    shapes = [np.zeros((6, 9), bool) for _ in range(9)]
    shapes[0][2, 4] = True  # one pixel
    shapes[1][:, 0] = True  # the first column, whole
    shapes[2][0, -1] = True  # the last column's first pixel
    shapes[3][:] = True  # everything
    shapes[4][-1, :] = True  # the last row, every column
    shapes[5][0, 0] = shapes[5][-1, -1] = True  # two corners: the band is the whole width
    shapes[6][1:4, 2:5] = rng.random((3, 3)) > 0.4
    shapes[7][5, 8] = True  # the very last pixel alone
    # shapes[8] stays empty
    blobs = (rng.random((37, 53)) > 0.7) & (rng.random((37, 53)) > 0.5)
    return shapes + [blobs, np.asfortranarray(blobs), blobs[::2, 1::3], (blobs * 200).astype(np.uint8)]


def test_encode_rle_equals_pycocotools_whole_frame_encoding():
    """The column-band RLE gives pycocotools.mask.encode's bytes (what the feature replaces) on every edge case."""
    for m in _edge_masks():
        ref = mask_util.encode(np.asfortranarray((np.asarray(m) > 0).astype(np.uint8)))
        got = encode_rle(m)
        assert got == {"size": [int(s) for s in ref["size"]], "counts": ref["counts"].decode("ascii")}, m
        back = mask_util.decode({"size": got["size"], "counts": got["counts"].encode()})
        assert np.array_equal(back.astype(bool), np.asarray(m) > 0)
        box = mask_to_box(m)
        if box is not None:  # the caller's box gives the same result
            assert encode_rle(m, box) == got


def test_pixel_stats_match_numpy():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((10, 20), (33, 7))]
    st = compute_pixel_stats(iter(imgs))
    allpx = np.concatenate([i.reshape(-1, 3) for i in imgs]).astype(np.float64)
    assert st["num_images"] == 2 and st["split"] == "train"
    np.testing.assert_allclose(st["mean"], allpx.mean(0), atol=1e-3)
    np.testing.assert_allclose(st["std"], allpx.std(0), atol=1e-3)


def test_write_coco_dataset_deterministic_and_validated(tmp_path):
    cats = [{"id": 1, "name": "lesion"}]
    imgs = {"train": [{"id": 2, "file_name": "b.png", "width": 4, "height": 4},
                      {"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "val": [], "test": []}
    anns = {"train": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
                      {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}]}
    write_coco_dataset(str(tmp_path / "a"), imgs, anns, cats, report={"x": 1}, pixel_stats={"mean": [1, 2, 3]})
    write_coco_dataset(str(tmp_path / "b"), imgs, anns, cats, report={"x": 1}, pixel_stats={"mean": [1, 2, 3]})
    for name in ("annotations/train.json", "annotations/val.json", "annotations/test.json",
                 "report.json", "pixel_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    doc = json.loads((tmp_path / "a/annotations/train.json").read_text())
    assert [im["id"] for im in doc["images"]] == [1, 2]
    assert [(a["id"], a["image_id"]) for a in doc["annotations"]] == [(1, 1), (2, 2)]
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]
    bad = {"train": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match="unknown image 9"):
        write_coco_dataset(str(tmp_path / "c"), imgs, bad, cats)


@pytest.mark.parametrize("values,dtype,binary", [
    ([0, 255], np.uint8, True), ([0, 1], np.uint8, True), ([7], np.uint8, True), ([3, 4], np.uint8, True),
    ([0, 65535], np.uint16, True), ([0, 1, 2], np.uint8, False), ([0, 128, 255], np.uint8, False),
    ([0, 5, 65535], np.uint16, False), ([10, 11, 12], np.uint8, False),
])
def test_is_binary_mask_counts_grey_values(values, dtype, binary):
    """The converter's strict-mask check: at most two grey values, whatever they are and at any depth."""
    from usdet.data.decode import distinct_values, is_binary_mask

    rng = np.random.default_rng(0)
    mask = np.asarray(values, dtype)[rng.integers(0, len(values), (37, 41))]
    mask.flat[: len(values)] = values  # every value present
    assert is_binary_mask(mask) is binary
    assert is_binary_mask(np.dstack([mask] * 3)) is binary  # a colour file read as colour
    assert (distinct_values(mask) <= 2) is binary


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_mask_bool_thresholds_at_half_the_mask_maximum(dtype):
    """Any encoding (0/1, 0/255, odd maxima, 16-bit, colour) is cut at half its own maximum, as in float."""
    from usdet.data.decode import mask_bool

    rng = np.random.default_rng(4)
    top_values = [1, 2, 3, 127, 128, 254, 255] + ([256, 1001, 65535] if dtype == np.uint16 else [])
    for top in top_values:
        mask = rng.integers(0, top + 1, (23, 29)).astype(dtype)
        mask.flat[0] = top
        want = mask.astype(np.float64) > (0 if top <= 1 else top / 2)
        assert np.array_equal(mask_bool(mask), want), top
        assert np.array_equal(mask_bool(np.dstack([mask] * 3)), want), top
    assert not mask_bool(np.zeros((4, 5), dtype)).any()


def test_image_moments_are_exact_integers():
    """Sums and sums of squares equal numpy's int64 ones, on the fast path and on the counting one."""
    from usdet.data.coco import image_moments

    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
              [(1, 1), (7, 3), (391, 637), (391, 637, 3), (2000, 3000), (1200, 1300, 3)]]
    images += [np.full((999, 1001), 255, np.uint8), np.zeros((5, 5, 3), np.uint8),
               np.clip(rng.normal(200, 1, (3000, 3000)), 0, 255).astype(np.uint8),  # near-constant
               rng.integers(250, 256, (4097, 4097), dtype=np.uint8)]  # over 2**24 pixels: counted
    for img in images:
        flat = img.reshape(img.shape[0] * img.shape[1], -1).astype(np.int64)
        n, sums, sumsqs = image_moments(img)
        want_s, want_ss = flat.sum(axis=0).tolist(), (flat * flat).sum(axis=0).tolist()
        if len(want_s) == 1:
            want_s, want_ss = want_s * 3, want_ss * 3
        assert (n, sums, sumsqs) == (flat.shape[0], want_s, want_ss), img.shape
        assert all(isinstance(v, int) for v in sums + sumsqs)


def test_annotation_json_is_compact_coco(tmp_path):
    """Annotation files are compact one-line COCO JSON (json's C encoder); report.json stays readable."""
    images = {"train": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}]}
    anns = {"train": [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "area": 4.0, "iscrowd": 0}]}
    paths = write_coco_dataset(str(tmp_path), images, anns, [{"id": 1, "name": "lesion"}], report={"skipped": []})
    text = open(paths["train"]).read()
    assert text.count("\n") == 1 and json.loads(text)["annotations"][0]["id"] == 1
    assert open(tmp_path / "report.json").read().count("\n") > 1
