"""Ultrasound augmentations as detectron2 ``T.Augmentation``s, chosen by ``cfg.INPUT.AUG``.

Ultrasound is grey, speckled and depth-dependent: a lesion may sit anywhere left-right (flips
are safe) but gain, contrast and speckle vary between machines and presets. These options model
that variation. Randomness comes only from ``np.random`` (as in detectron2), so the training
loader can make every sample's augmentation a fixed function of the seed and its position.
"""
from __future__ import annotations

import math
from typing import List, Optional

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "build_augmentation",
    "RandomResizedCropKeepBoxes",
    "RandomGamma",
    "RandomSpeckle",
    "GammaTransform",
    "SpeckleTransform",
]


class PhotometricTransform(T.Transform):
    """A transform that changes intensities only: boxes, masks and geometry pass through."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()


class GammaTransform(PhotometricTransform):
    """Intensity gamma ``255 * (x / 255) ** gamma`` on uint8 images (geometry unchanged)."""

    def __init__(self, gamma: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** self.gamma + 0.5, 0, 255).astype(np.uint8)
        if img.dtype == np.uint8:
            return lut[img]
        return np.clip(255.0 * (np.clip(img, 0, 255) / 255.0) ** self.gamma, 0, 255).astype(img.dtype)


class SpeckleTransform(PhotometricTransform):
    """Multiplicative, slightly correlated noise ``x * (1 + sigma * n)``, the same on every channel.

    Grey ultrasound is stored as 3 equal channels; noise shared across them keeps it grey.
    ``seed`` fixes the noise field, so the transform is deterministic once drawn.
    """

    def __init__(self, sigma: float, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        noise = np.random.default_rng(self.seed).standard_normal((h, w), dtype=np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), 0.8)
        noise *= 1.0 / max(float(noise.std()), 1e-6)
        gain = 1.0 + self.sigma * noise
        out = img.astype(np.float32) * (gain[..., None] if img.ndim == 3 else gain)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8) if img.dtype == np.uint8 else out.astype(img.dtype)


class RandomGamma(T.Augmentation):
    """Gamma drawn uniformly in ``[1 - delta, 1 + delta]`` (ultrasound display curves differ)."""

    def __init__(self, delta: float):
        super().__init__()
        if not 0 < delta < 1:
            raise ValueError(f"INPUT.AUG.GAMMA must be in (0, 1), got {delta}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return GammaTransform(float(self._rand_range(1.0 - self.delta, 1.0 + self.delta)))


class RandomSpeckle(T.Augmentation):
    """Speckle-like multiplicative noise with standard deviation ``sigma``."""

    def __init__(self, sigma: float):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"INPUT.AUG.SPECKLE must be > 0, got {sigma}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return SpeckleTransform(self.sigma, int(np.random.randint(0, 2**31 - 1)))


class RandomResizedCropKeepBoxes(T.Augmentation):
    """Crop a random window (area fraction in ``scale``, aspect ratio in ``ratio``).

    With ``keep_boxes`` the window must hold every box whole: a crop that cuts a lesion in half
    teaches the wrong extent, and one that drops it turns a lesion image into a false negative.
    The resize that follows (``ResizeShortestEdge``) gives the "resized" part.
    """

    def __init__(self, scale=(0.6, 1.0), ratio=(0.75, 1.333), prob: float = 0.5, keep_boxes: bool = True,
                 max_tries: int = 10):
        super().__init__()
        scale = (float(scale[0]), float(scale[1]))
        ratio = (float(ratio[0]), float(ratio[1]))
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"INPUT.AUG.RANDOM_RESIZED_CROP.SCALE must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"INPUT.AUG.RANDOM_RESIZED_CROP.RATIO must satisfy 0 < lo <= hi, got {ratio}")
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray] = None) -> T.Transform:
        h, w = image.shape[:2]
        if self._rand_range() >= self.prob:
            return T.NoOpTransform()
        union = None
        if self.keep_boxes and boxes is not None and len(boxes):
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            union = (math.floor(b[:, 0].min()), math.floor(b[:, 1].min()),
                     math.ceil(b[:, 2].max()), math.ceil(b[:, 3].max()))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.max_tries):
            area = self._rand_range(self.scale[0], self.scale[1]) * h * w
            aspect = math.exp(self._rand_range(log_lo, log_hi))
            cw = int(round(math.sqrt(area * aspect)))
            ch = int(round(math.sqrt(area / aspect)))
            if not (1 <= cw <= w and 1 <= ch <= h):
                continue
            x_lo, x_hi, y_lo, y_hi = 0, w - cw, 0, h - ch
            if union is not None:
                x_lo, x_hi = max(x_lo, union[2] - cw), min(x_hi, union[0])
                y_lo, y_hi = max(y_lo, union[3] - ch), min(y_hi, union[1])
                if x_lo > x_hi or y_lo > y_hi:
                    continue
            x0 = int(np.random.randint(x_lo, x_hi + 1))
            y0 = int(np.random.randint(y_lo, y_hi + 1))
            return T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)
        return T.NoOpTransform()


def build_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """The augmentation list for training (``is_train``) or testing, from ``cfg.INPUT``.

    Test: resize only. Train: [box-keeping random crop] -> resize -> flips -> photometric (after
    the resize, where images are smallest).
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    aug = cfg.INPUT.AUG
    augs: List[T.Augmentation] = []
    rrc = aug.RANDOM_RESIZED_CROP
    if rrc.ENABLED:
        augs.append(RandomResizedCropKeepBoxes(rrc.SCALE, rrc.RATIO, rrc.PROB, rrc.KEEP_BOXES))
    augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    if aug.HFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    if aug.VFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if aug.BRIGHTNESS > 0:
        augs.append(T.RandomBrightness(1.0 - aug.BRIGHTNESS, 1.0 + aug.BRIGHTNESS))
    if aug.CONTRAST > 0:
        augs.append(T.RandomContrast(1.0 - aug.CONTRAST, 1.0 + aug.CONTRAST))
    if aug.GAMMA > 0:
        augs.append(RandomGamma(aug.GAMMA))
    if aug.SPECKLE > 0:
        augs.append(RandomSpeckle(aug.SPECKLE))
    augs.extend(build_scanner_augmentation(cfg))
    return augs


# ---------------------------------------------------------------------------------------------
# Augmentations that combine several training images (issue 21): mosaic and lesion copy-paste.
# A ``T.Augmentation`` sees one image, so these run in the mapper, before its augmentation list,
# on ``(image, annotations)`` pairs whose boxes are XYXY_ABS. Both keep every box and ignore
# region (``iscrowd: 1``) exact: geometry is an integer offset plus the exact scale of each
# resized tile, and no box is ever cut.


def _scaled_annotations(annos: List[dict], sx: float, sy: float, ox: int, oy: int) -> List[dict]:
    out = []
    for a in annos:
        x0, y0, x1, y1 = a["bbox"]
        b = dict(a)
        b["bbox"] = [x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy]
        b.pop("segmentation", None)  # boxes only: a mosaic/pasted mask would need re-encoding
        out.append(b)
    return out


def mosaic_2x2(samples: List[tuple]) -> tuple:
    """Four ``(image HxWx3 uint8, annotations XYXY_ABS)`` pairs -> one 2x2 mosaic and its annotations.

    The canvas is twice the first image's size; each image is resized (aspect kept) to fit its
    quarter whole, at a random position inside it (``np.random``), so no lesion is cut and the
    mosaic shows four contexts at half scale. Boxes follow exactly (scale ``new/old`` per axis,
    integer offset); empty space is black, like the area around an ultrasound image.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic_2x2 needs 4 samples, got {len(samples)}")
    h0, w0 = samples[0][0].shape[:2]
    canvas = np.zeros((2 * h0, 2 * w0, 3), dtype=np.uint8)
    annos_out: List[dict] = []
    for k, (img, annos) in enumerate(samples):
        h, w = img.shape[:2]
        s = min(h0 / h, w0 / w)
        nh, nw = max(1, int(h * s)), max(1, int(w * s))
        tile = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else img
        cy, cx = (k // 2) * h0, (k % 2) * w0
        oy = cy + int(np.random.randint(0, h0 - nh + 1))
        ox = cx + int(np.random.randint(0, w0 - nw + 1))
        canvas[oy:oy + nh, ox:ox + nw] = tile
        annos_out += _scaled_annotations(annos, nw / w, nh / h, ox, oy)
    return canvas, annos_out


def _overlaps(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def paste_lesion(image: np.ndarray, annos: List[dict], donor: np.ndarray, donor_anno: dict,
                 scale=(0.8, 1.2), margin: float = 0.15, tries: int = 10) -> tuple:
    """Paste one lesion of ``donor`` into ``image`` where it overlaps no box or ignore region.

    The lesion is cut from its box plus ``margin`` on each side, resized by a factor drawn in
    ``scale`` and blended in with a feathered border (the cut region's edges fade out), so the
    pasted lesion keeps its own surrounding texture and the new box is exactly the scaled lesion
    box. Returns ``(image, annotations)``, unchanged when no free place is found.
    """
    h, w = image.shape[:2]
    dh, dw = donor.shape[:2]
    bx0, by0, bx1, by1 = donor_anno["bbox"]
    mx, my = (bx1 - bx0) * margin, (by1 - by0) * margin
    cx0, cy0 = max(0, int(math.floor(bx0 - mx))), max(0, int(math.floor(by0 - my)))
    cx1, cy1 = min(dw, int(math.ceil(bx1 + mx))), min(dh, int(math.ceil(by1 + my)))
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return image, annos
    patch = donor[cy0:cy1, cx0:cx1]
    s = float(np.random.uniform(scale[0], scale[1]))
    s = min(s, 0.9 * w / patch.shape[1], 0.9 * h / patch.shape[0])
    ph, pw = max(2, int(round(patch.shape[0] * s))), max(2, int(round(patch.shape[1] * s)))
    sx, sy = pw / patch.shape[1], ph / patch.shape[0]
    taken = [a["bbox"] for a in annos]
    for _ in range(tries):
        ox = int(np.random.randint(0, w - pw + 1))
        oy = int(np.random.randint(0, h - ph + 1))
        box = [(bx0 - cx0) * sx + ox, (by0 - cy0) * sy + oy, (bx1 - cx0) * sx + ox, (by1 - cy0) * sy + oy]
        if _overlaps([ox, oy, ox + pw, oy + ph], taken):
            continue
        resized = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        # Feathered alpha: 1 over the lesion box and half the margin around it, fading to 0 at
        # the cut's border, so the lesion itself is pasted whole and the seam is soft.
        alpha = np.zeros((ph, pw), np.float32)
        fx, fy = 0.5 * mx * sx, 0.5 * my * sy
        ax0, ay0 = max(0, int(box[0] - ox - fx)), max(0, int(box[1] - oy - fy))
        ax1, ay1 = min(pw, int(math.ceil(box[2] - ox + fx))), min(ph, int(math.ceil(box[3] - oy + fy)))
        alpha[ay0:ay1, ax0:ax1] = 1.0
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.5, 0.5 * min(fx, fy)))[..., None]
        region = image[oy:oy + ph, ox:ox + pw].astype(np.float32)
        out = image.copy()
        out[oy:oy + ph, ox:ox + pw] = np.clip(alpha * resized + (1 - alpha) * region + 0.5, 0, 255).astype(np.uint8)
        new = {k: v for k, v in donor_anno.items() if k != "segmentation"}
        new["bbox"] = box
        return out, list(annos) + [new]
    return image, annos
# =============================================================================================
# Scanner-style augmentation (issue 24): what differs between scanners and presets, so that a
# model trained on one site meets another site's look in training. All off by default
# (INPUT.AUG.SCANNER.*), all photometric: geometry, boxes, masks and ignore regions pass through
# exactly; the sector mask and burnt-in text are drawn only where no box (lesion or ignore
# region) lies, so no label is hidden. Added to training by build_augmentation's single
# ``augs.extend(build_scanner_augmentation(cfg))``.
# =============================================================================================

__all__ += [
    "build_scanner_augmentation",
    "DepthGainTransform", "RandomDepthGain",
    "SpeckleGrainTransform", "RandomSpeckleGrain",
    "ResolutionLossTransform", "RandomResolutionLoss",
    "LogCompressionTransform", "RandomLogCompression",
    "JpegTransform", "RandomJpeg",
    "SectorMaskTransform", "RandomSectorMask",
    "BurntInTextTransform", "RandomBurntInText",
]


def _as_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32)


def _back(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Float result -> the input's dtype (uint8 rounded and clipped)."""
    if like.dtype == np.uint8:
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return out.astype(like.dtype)


def _boxes_array(boxes) -> np.ndarray:
    return np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


class DepthGainTransform(PhotometricTransform):
    """Time-gain compensation: each row (depth) multiplied by a smooth gain curve.

    ``gains`` are the curve's values at evenly spaced depths from top to bottom; rows in between
    are interpolated linearly. A scanner's TGC sliders do exactly this, and presets differ.
    """

    def __init__(self, gains):
        super().__init__()
        self._set_attributes({"gains": [float(g) for g in gains]})

    def curve(self, h: int) -> np.ndarray:
        g = np.asarray(self.gains, np.float32)
        return np.interp(np.arange(h, dtype=np.float32), np.linspace(0, h - 1, len(g)), g).astype(np.float32)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        c = self.curve(img.shape[0])
        c = c[:, None, None] if img.ndim == 3 else c[:, None]
        return _back(_as_float(img) * c, img)


class RandomDepthGain(T.Augmentation):
    """Gains drawn uniformly in ``[1 - strength, 1 + strength]`` at ``points`` depths."""

    def __init__(self, strength: float, points: int = 4):
        super().__init__()
        if not 0 < strength < 1:
            raise ValueError(f"INPUT.AUG.SCANNER.DEPTH_GAIN must be in (0, 1), got {strength}")
        if points < 2:
            raise ValueError(f"INPUT.AUG.SCANNER.DEPTH_GAIN_POINTS must be >= 2, got {points}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return DepthGainTransform(np.random.uniform(1 - self.strength, 1 + self.strength, int(self.points)))


class SpeckleGrainTransform(PhotometricTransform):
    """Multiplicative speckle of another grain: Rayleigh noise blurred to ``grain`` (sigma_x,
    sigma_y in pixels), scaled to standard deviation ``strength``; the same on every channel.

    Transducers and frequencies give speckle of different cell sizes; ``seed`` fixes the field.
    """

    def __init__(self, strength: float, grain_x: float, grain_y: float, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def field(self, h: int, w: int) -> np.ndarray:
        noise = np.random.default_rng(self.seed).rayleigh(1.0, (h, w)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(self.grain_x, 1e-3), sigmaY=max(self.grain_y, 1e-3))
        noise -= noise.mean()
        noise *= self.strength / max(float(noise.std()), 1e-6)
        return 1.0 + noise

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        f = self.field(*img.shape[:2])
        return _back(_as_float(img) * (f[..., None] if img.ndim == 3 else f), img)


class RandomSpeckleGrain(T.Augmentation):
    """Speckle of standard deviation ``strength``, grain sigma drawn in ``grain`` per axis."""

    def __init__(self, strength: float, grain=(0.5, 2.5)):
        super().__init__()
        grain = (float(grain[0]), float(grain[1]))
        if strength <= 0:
            raise ValueError(f"INPUT.AUG.SCANNER.SPECKLE_GRAIN must be > 0, got {strength}")
        if not 0 < grain[0] <= grain[1]:
            raise ValueError(f"INPUT.AUG.SCANNER.SPECKLE_GRAIN_SIZE must satisfy 0 < lo <= hi, got {grain}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        gx, gy = np.random.uniform(self.grain[0], self.grain[1], 2)
        return SpeckleGrainTransform(self.strength, float(gx), float(gy), int(np.random.randint(0, 2**31 - 1)))


class ResolutionLossTransform(PhotometricTransform):
    """Lower resolution at the same size: down-sampled by ``scale`` (area) and back up (linear),
    then Gaussian blur ``sigma`` px (a wider beam, an older probe, a zoomed export)."""

    def __init__(self, scale: float, sigma: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        out = _as_float(img)
        if self.scale < 1.0:
            small = cv2.resize(out, (max(1, round(w * self.scale)), max(1, round(h * self.scale))),
                               interpolation=cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), self.sigma)
        if img.ndim == 3 and out.ndim == 2:
            out = out[..., None]
        return _back(out, img)


class RandomResolutionLoss(T.Augmentation):
    """Scale drawn in ``[min_scale, 1]``, blur sigma in ``[0, max_sigma]``."""

    def __init__(self, min_scale: float = 1.0, max_sigma: float = 0.0):
        super().__init__()
        if not 0 < min_scale <= 1:
            raise ValueError(f"INPUT.AUG.SCANNER.RESOLUTION must be in (0, 1], got {min_scale}")
        if max_sigma < 0:
            raise ValueError(f"INPUT.AUG.SCANNER.BLUR must be >= 0, got {max_sigma}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return ResolutionLossTransform(float(np.random.uniform(self.min_scale, 1.0)),
                                       float(np.random.uniform(0.0, self.max_sigma)))


class LogCompressionTransform(PhotometricTransform):
    """Another dynamic range / log compression: a fixed curve through (0, 0) and (255, 255).

    ``k > 0``: ``255 log(1 + k x / 255) / log(1 + k)`` (stronger compression, dark tissue lifted);
    ``k < 0``: its inverse with ``|k|`` (expansion, darker); 0: identity. A lookup table on uint8.
    """

    def __init__(self, k: float):
        super().__init__()
        self._set_attributes(locals())

    def lut(self) -> np.ndarray:
        x = np.arange(256, dtype=np.float64) / 255.0
        k = abs(self.k)
        if k < 1e-6:
            y = x
        elif self.k > 0:
            y = np.log1p(k * x) / np.log1p(k)
        else:
            y = np.expm1(x * np.log1p(k)) / k
        return 255.0 * y

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        lut = self.lut()
        if img.dtype == np.uint8:
            return np.clip(lut + 0.5, 0, 255).astype(np.uint8)[img]
        return np.interp(np.clip(img, 0, 255), np.arange(256), lut).astype(img.dtype)


class RandomLogCompression(T.Augmentation):
    """``|k|`` up to ``max_k`` (``log(1 + |k|)`` uniform), compression or expansion with equal chance."""

    def __init__(self, max_k: float):
        super().__init__()
        if max_k <= 0:
            raise ValueError(f"INPUT.AUG.SCANNER.LOG_COMPRESSION must be > 0, got {max_k}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        k = float(np.expm1(np.random.uniform(0.0, np.log1p(self.max_k))))
        return LogCompressionTransform(k if np.random.rand() < 0.5 else -k)


class JpegTransform(PhotometricTransform):
    """JPEG encode + decode at ``quality`` (OpenCV): block and ringing artefacts of lossy exports."""

    def __init__(self, quality: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8:
            return img
        ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), int(self.quality)])
        if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
            return img
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return out.reshape(img.shape)


class RandomJpeg(T.Augmentation):
    """Quality drawn uniformly in ``[min_quality, 95]``."""

    def __init__(self, min_quality: int):
        super().__init__()
        if not 1 <= min_quality <= 95:
            raise ValueError(f"INPUT.AUG.SCANNER.JPEG_QUALITY must be in [1, 95], got {min_quality}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return JpegTransform(int(np.random.randint(self.min_quality, 96)))


class SectorMaskTransform(PhotometricTransform):
    """Black outside a convex-probe sector: apex ``(cx, cy)`` (cy above the image, <= 0),
    half-angle ``half_angle`` (degrees from vertical), radius ``radius`` (pixels from the apex)."""

    def __init__(self, cx: float, cy: float, half_angle: float, radius: float):
        super().__init__()
        self._set_attributes(locals())

    def inside(self, h: int, w: int) -> np.ndarray:
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        return self.contains(xs + 0.5, ys + 0.5)

    def contains(self, x, y):
        dx, dy = np.asarray(x, np.float64) - self.cx, np.asarray(y, np.float64) - self.cy
        ang = np.degrees(np.arctan2(np.abs(dx), dy))  # 0 straight down
        return (dy > 0) & (ang <= self.half_angle) & (np.hypot(dx, dy) <= self.radius)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        keep = self.inside(*img.shape[:2])
        out = img.copy()
        out[~keep] = 0
        return out


class RandomSectorMask(T.Augmentation):
    """A sector (half-angle in ``half_angle`` degrees) holding every box whole, or no mask.

    The sector is convex, so a box whose four corners are inside is inside: boxes (lesions and
    ignore regions alike) keep every pixel. After ``max_tries`` failed draws: no mask.
    """

    def __init__(self, half_angle=(30.0, 50.0), max_tries: int = 10):
        super().__init__()
        half_angle = (float(half_angle[0]), float(half_angle[1]))
        if not 0 < half_angle[0] <= half_angle[1] < 90:
            raise ValueError(f"INPUT.AUG.SCANNER.SECTOR_ANGLE must satisfy 0 < lo <= hi < 90, got {half_angle}")
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray] = None) -> T.Transform:
        h, w = image.shape[:2]
        b = _boxes_array(boxes)
        corners_x = np.concatenate([b[:, 0], b[:, 2], b[:, 0], b[:, 2]])
        corners_y = np.concatenate([b[:, 1], b[:, 1], b[:, 3], b[:, 3]])
        for _ in range(self.max_tries):
            cx = w * float(np.random.uniform(0.4, 0.6))
            cy = -h * float(np.random.uniform(0.05, 0.6))
            tfm = SectorMaskTransform(cx, cy, float(np.random.uniform(*self.half_angle)),
                                      float(np.hypot(max(cx, w - cx), h - cy)) * float(np.random.uniform(0.9, 1.05)))
            if not len(b) or bool(np.all(tfm.contains(corners_x, corners_y))):
                return tfm
        return T.NoOpTransform()


class BurntInTextTransform(PhotometricTransform):
    """Scanner annotations burnt into the image: ``items`` of ``(text, x, y, scale, value)``
    drawn with OpenCV's Hershey font (``y`` the baseline), in grey ``value``."""

    def __init__(self, items):
        super().__init__()
        self._set_attributes({"items": [tuple(i) for i in items]})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(img.copy())
        for text, x, y, scale, value in self.items:
            colour = (float(value),) * (out.shape[2] if out.ndim == 3 else 1)
            cv2.putText(out, str(text), (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, float(scale), colour,
                        max(1, int(round(scale * 1.5))), cv2.LINE_AA)
        return out


_TEXT_SNIPPETS = ("L12-5", "C5-1", "12 MHz", "GAIN 54", "DR 60", "FR 28", "2.5 cm", "4.1 cm", "RT BREAST",
                  "LT BREAST", "10:00 2CMFN", "RADIAL", "ANTI-RAD", "+", "x", "1 2 3", "MI 1.1", "TIb 0.4")


class RandomBurntInText(T.Augmentation):
    """1 to ``max_items`` text snippets at random places that touch no box (kept as drawn boxes
    never overlap a lesion or an ignore region; a snippet with no free place is skipped)."""

    def __init__(self, max_items: int = 4, max_tries: int = 10):
        super().__init__()
        if max_items < 1:
            raise ValueError(f"INPUT.AUG.SCANNER.TEXT_ITEMS must be >= 1, got {max_items}")
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray] = None) -> T.Transform:
        h, w = image.shape[:2]
        b = _boxes_array(boxes)
        items = []
        for _ in range(int(np.random.randint(1, self.max_items + 1))):
            text = _TEXT_SNIPPETS[int(np.random.randint(len(_TEXT_SNIPPETS)))]
            scale = float(np.random.uniform(0.25, 0.6)) * max(min(h, w), 64) / 256.0
            thick = max(1, int(round(scale * 1.5)))
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            pad = thick + 2  # anti-aliasing and stroke width beyond getTextSize's box
            if tw + 2 * pad >= w or th + base + 2 * pad >= h:
                continue
            for _ in range(self.max_tries):
                x = int(np.random.randint(pad, w - tw - pad + 1))
                y = int(np.random.randint(th + pad, h - base - pad + 1))
                x0, y0, x1, y1 = x - pad, y - th - pad, x + tw + pad, y + base + pad
                if not len(b) or not np.any((b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)):
                    items.append((text, x, y, scale, float(np.random.choice([160.0, 200.0, 255.0]))))
                    break
        return BurntInTextTransform(items) if items else T.NoOpTransform()


def build_scanner_augmentation(cfg) -> List[T.Augmentation]:
    """The scanner-style augmentations enabled in ``cfg.INPUT.AUG.SCANNER`` (training only), each
    applied to an image with probability ``PROB``, in a scanner's own order: beam and speckle,
    gain, display curve, sector, burnt-in text, lossy export."""
    s = cfg.INPUT.AUG.SCANNER
    augs: List[T.Augmentation] = []
    if s.RESOLUTION < 1.0 or s.BLUR > 0:
        augs.append(RandomResolutionLoss(s.RESOLUTION, s.BLUR))
    if s.SPECKLE_GRAIN > 0:
        augs.append(RandomSpeckleGrain(s.SPECKLE_GRAIN, s.SPECKLE_GRAIN_SIZE))
    if s.DEPTH_GAIN > 0:
        augs.append(RandomDepthGain(s.DEPTH_GAIN, s.DEPTH_GAIN_POINTS))
    if s.LOG_COMPRESSION > 0:
        augs.append(RandomLogCompression(s.LOG_COMPRESSION))
    if s.SECTOR:
        augs.append(RandomSectorMask(s.SECTOR_ANGLE))
    if s.TEXT:
        augs.append(RandomBurntInText(s.TEXT_ITEMS))
    if s.JPEG_QUALITY > 0:
        augs.append(RandomJpeg(s.JPEG_QUALITY))
    if not 0 < s.PROB <= 1:
        raise ValueError(f"INPUT.AUG.SCANNER.PROB must be in (0, 1], got {s.PROB}")
    return [a if s.PROB >= 1 else T.RandomApply(a, prob=float(s.PROB)) for a in augs]
