"""Scanner-style augmentations (INPUT.AUG.SCANNER.*): each does what it names and leaves boxes,
masks and ignore regions exact; the sector and the text never cover a box."""
import numpy as np
import pytest
from detectron2.data import transforms as T

from train_helpers import QUICK_CFG


def _cfg(*opts):
    from usdet.engine import build_config

    return build_config(QUICK_CFG, list(opts))


def _phantom(seed=0, size=(160, 200)):
    from usdet.data.phantom import render_phantom

    rgb, boxes, _ = render_phantom(np.random.default_rng(seed), size, kinds=["benign", "malignant"])
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    return rgb, b


def _geometry_exact(tfm: T.Transform, boxes: np.ndarray) -> None:
    coords = np.array([[0.5, 1.5], [17.25, 99.0]])
    assert np.array_equal(tfm.apply_coords(coords.copy()), coords)
    assert np.array_equal(tfm.apply_box(boxes.copy()), boxes)
    seg = (np.arange(160 * 200).reshape(160, 200) % 7).astype(np.uint8)
    assert np.array_equal(tfm.apply_segmentation(seg.copy()), seg)
    poly = [np.array([3.0, 4.0, 30.0, 4.0, 30.0, 40.0])]
    assert np.array_equal(tfm.apply_polygons(poly)[0], poly[0])


def test_scanner_augmentations_are_off_by_default_and_built_in_order():
    from usdet.data import augment as A

    assert A.build_scanner_augmentation(_cfg()) == []
    base = [type(a) for a in A.build_augmentation(_cfg(), True)]
    opts = ["INPUT.AUG.SCANNER.DEPTH_GAIN", "0.3", "INPUT.AUG.SCANNER.SPECKLE_GRAIN", "0.1",
            "INPUT.AUG.SCANNER.RESOLUTION", "0.5", "INPUT.AUG.SCANNER.LOG_COMPRESSION", "4.0",
            "INPUT.AUG.SCANNER.JPEG_QUALITY", "30", "INPUT.AUG.SCANNER.SECTOR", "True",
            "INPUT.AUG.SCANNER.TEXT", "True"]
    augs = A.build_scanner_augmentation(_cfg(*opts))
    assert all(isinstance(a, T.RandomApply) and a.prob == 0.5 for a in augs)
    assert [type(a.aug) for a in augs] == [A.RandomResolutionLoss, A.RandomSpeckleGrain, A.RandomDepthGain,
                                           A.RandomLogCompression, A.RandomSectorMask, A.RandomBurntInText,
                                           A.RandomJpeg]
    full = A.build_augmentation(_cfg(*opts, "INPUT.AUG.SCANNER.PROB", "1.0"), True)
    assert [type(a) for a in full[:len(base)]] == base  # appended after usdet's own
    assert [type(a) for a in full[len(base):]] == [type(a.aug) for a in augs]
    assert [type(a) for a in A.build_augmentation(_cfg(*opts), False)] == [T.ResizeShortestEdge]  # test: none
    with pytest.raises(ValueError, match="DEPTH_GAIN"):
        A.build_scanner_augmentation(_cfg("INPUT.AUG.SCANNER.DEPTH_GAIN", "1.5"))


def test_depth_gain_follows_its_curve():
    from usdet.data.augment import DepthGainTransform, RandomDepthGain

    flat = np.full((160, 200, 3), 100, np.uint8)
    out = DepthGainTransform([0.5, 1.0, 1.5]).apply_image(flat)
    assert out[0, 0, 0] == 50 and out[-1, 0, 0] == 150 and abs(int(out[80, 0, 0]) - 100) <= 1
    assert (out == out[:, :1]).all()  # one gain per row (depth), none across
    assert (np.diff(out[:, 0, 0].astype(int)) >= 0).all()
    np.random.seed(0)
    t = RandomDepthGain(0.3, 5).get_transform(flat)
    assert len(t.gains) == 5 and all(0.7 <= g <= 1.3 for g in t.gains)
    _geometry_exact(t, _phantom()[1])


def test_speckle_grain_size_sets_the_correlation_length():
    from usdet.data.augment import RandomSpeckleGrain, SpeckleGrainTransform

    flat = np.full((160, 200, 3), 120, np.uint8)

    def corr(img, lag):
        x = img[:, :, 0].astype(np.float64) - img[:, :, 0].mean()
        return float((x[:, :-lag] * x[:, lag:]).mean() / x.var())

    fine = SpeckleGrainTransform(0.2, 0.6, 0.6, 3).apply_image(flat)
    coarse = SpeckleGrainTransform(0.2, 3.0, 0.6, 3).apply_image(flat)
    assert corr(coarse, 3) > corr(fine, 3) + 0.3  # lateral grain 5x longer
    for img in (fine, coarse):
        assert abs(img[:, :, 0].astype(float).std() / 120 - 0.2) < 0.03 and abs(img.mean() - 120) < 2
        assert (img[:, :, 0] == img[:, :, 1]).all()  # stays grey
    assert np.array_equal(fine, SpeckleGrainTransform(0.2, 0.6, 0.6, 3).apply_image(flat))  # seeded
    np.random.seed(1)
    t = RandomSpeckleGrain(0.1, (1.0, 2.0)).get_transform(flat)
    assert 1.0 <= t.grain_x <= 2.0 and 1.0 <= t.grain_y <= 2.0
    _geometry_exact(t, _phantom()[1])


def test_resolution_loss_removes_fine_detail():
    from usdet.data.augment import RandomResolutionLoss, ResolutionLossTransform

    img, boxes = _phantom()

    def detail(x):
        g = x[:, :, 0].astype(np.float64)
        return float(np.abs(np.diff(g, axis=1)).mean())

    assert np.array_equal(ResolutionLossTransform(1.0, 0.0).apply_image(img), img)
    half = ResolutionLossTransform(0.5, 0.0).apply_image(img)
    blurred = ResolutionLossTransform(1.0, 1.5).apply_image(img)
    assert half.shape == img.shape == blurred.shape
    assert detail(half) < 0.75 * detail(img) and detail(blurred) < 0.6 * detail(img)
    assert abs(half.mean() - img.mean()) < 1.0
    np.random.seed(2)
    t = RandomResolutionLoss(0.5, 1.0).get_transform(img)
    assert 0.5 <= t.scale <= 1.0 and 0.0 <= t.sigma <= 1.0
    _geometry_exact(t, boxes)


def test_log_compression_curves():
    from usdet.data.augment import LogCompressionTransform, RandomLogCompression

    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    up = LogCompressionTransform(4.0).apply_image(ramp)[0, :, 0].astype(int)
    down = LogCompressionTransform(-4.0).apply_image(ramp)[0, :, 0].astype(int)
    assert up[0] == down[0] == 0 and up[255] == down[255] == 255
    assert up[64] > 64 + 40 and down[192] < 192 - 30  # compression lifts the dark, expansion darkens
    assert (np.diff(up) >= 0).all() and (np.diff(down) >= 0).all()
    # inverse curves: expansion undoes compression (to rounding)
    back = LogCompressionTransform(-4.0).apply_image(LogCompressionTransform(4.0).apply_image(ramp))
    assert np.abs(back[0, :, 0].astype(int) - np.arange(256)).max() <= 3
    assert np.array_equal(LogCompressionTransform(0.0).apply_image(ramp), ramp)
    np.random.seed(3)
    ks = [RandomLogCompression(4.0).get_transform(ramp).k for _ in range(50)]
    assert max(abs(k) for k in ks) <= 4.0 and min(ks) < 0 < max(ks)
    _geometry_exact(LogCompressionTransform(ks[0]), _phantom()[1])


def test_jpeg_artefacts():
    import cv2

    from usdet.data.augment import JpegTransform, RandomJpeg

    img, boxes = _phantom()
    q10, q90 = JpegTransform(10).apply_image(img), JpegTransform(90).apply_image(img)
    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 10])
    assert np.array_equal(q10, cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
    err = lambda x: float(np.abs(x.astype(int) - img.astype(int)).mean())  # noqa: E731
    assert 0 < err(q90) < err(q10)
    assert q10.shape == img.shape and q10.dtype == np.uint8
    np.random.seed(4)
    assert 30 <= RandomJpeg(30).get_transform(img).quality <= 95
    _geometry_exact(JpegTransform(50), boxes)


def test_sector_mask_blacks_out_only_outside_and_keeps_every_box():
    from usdet.data.augment import RandomSectorMask, SectorMaskTransform

    img, boxes = _phantom()
    img = np.maximum(img, 1)  # so that any masked pixel is visible as 0
    t = SectorMaskTransform(cx=100, cy=-40, half_angle=35, radius=220)
    out = t.apply_image(img)
    assert out[0, 0].max() == 0 and out[0, 199].max() == 0 and out[150, 100].min() > 0  # corners gone, centre kept
    inside = t.inside(160, 200)
    assert np.array_equal(out[inside], img[inside]) and (out[~inside] == 0).all()
    aug = RandomSectorMask((30.0, 50.0))
    masked = 0
    for seed in range(40):
        np.random.seed(seed)
        tfm = aug.get_transform(img, boxes)
        if isinstance(tfm, T.NoOpTransform):
            continue
        masked += 1
        res = tfm.apply_image(img)
        for x0, y0, x1, y1 in boxes:  # every box pixel untouched
            ys, xs = slice(int(np.floor(y0)), int(np.ceil(y1))), slice(int(np.floor(x0)), int(np.ceil(x1)))
            assert np.array_equal(res[ys, xs], img[ys, xs])
        _geometry_exact(tfm, boxes)
    assert masked >= 20
    # a box filling the top corners cannot lie in any sector: no mask
    np.random.seed(0)
    assert isinstance(aug.get_transform(img, np.array([[0.0, 0.0, 200.0, 20.0]])), T.NoOpTransform)


def test_burnt_in_text_never_touches_a_box():
    from usdet.data.augment import BurntInTextTransform, RandomBurntInText

    img, boxes = _phantom()
    aug = RandomBurntInText(max_items=4)
    drawn = 0
    for seed in range(30):
        np.random.seed(seed)
        tfm = aug.get_transform(img, boxes)
        if isinstance(tfm, T.NoOpTransform):
            continue
        assert isinstance(tfm, BurntInTextTransform) and 1 <= len(tfm.items) <= 4
        res = tfm.apply_image(img)
        changed = np.any(res != img, axis=2)
        drawn += int(changed.sum() > 0)
        for x0, y0, x1, y1 in boxes:
            assert not changed[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))].any()
        _geometry_exact(tfm, boxes)
    assert drawn >= 25
    # an image whose only box covers everything gets no text
    np.random.seed(0)
    assert isinstance(aug.get_transform(img, np.array([[0.0, 0.0, 200.0, 160.0]])), T.NoOpTransform)


def test_mapper_keeps_boxes_and_ignore_regions_exact_with_every_scanner_augmentation(tmp_path):
    """Through usdet's mapper (no resize, no flip): instances equal the annotations, ignore
    regions flagged, and the image did change."""
    from detectron2.structures import BoxMode

    from usdet.data.mapper import UsdetDatasetMapper
    from usdet.utils.io import atomic_write_image

    img, boxes = _phantom(5)
    path = str(tmp_path / "f.png")
    atomic_write_image(path, img)
    annos = [{"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0} for b in boxes]
    annos.append({"bbox": [150.0, 110.0, 190.0, 150.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1})
    cfg = _cfg("INPUT.AUG.HFLIP", "False", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "200",
               "INPUT.AUG.SCANNER.PROB", "1.0", "INPUT.AUG.SCANNER.DEPTH_GAIN", "0.3",
               "INPUT.AUG.SCANNER.SPECKLE_GRAIN", "0.1", "INPUT.AUG.SCANNER.RESOLUTION", "0.6",
               "INPUT.AUG.SCANNER.BLUR", "1.0", "INPUT.AUG.SCANNER.LOG_COMPRESSION", "3.0",
               "INPUT.AUG.SCANNER.JPEG_QUALITY", "40", "INPUT.AUG.SCANNER.SECTOR", "True",
               "INPUT.AUG.SCANNER.TEXT", "True")
    mapper = UsdetDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    d = mapper({"file_name": path, "height": 160, "width": 200, "image_id": 1, "annotations": annos})
    inst = d["instances"]
    expected = np.array([a["bbox"] for a in annos], np.float32)
    assert np.allclose(inst.gt_boxes.tensor.numpy(), expected, atol=1e-4)
    assert inst.gt_ignore.tolist() == [False] * len(boxes) + [True]
    bgr = d["image"].numpy().transpose(1, 2, 0)
    assert bgr.shape == img.shape and np.abs(bgr.astype(int) - img[:, :, ::-1].astype(int)).mean() > 3
