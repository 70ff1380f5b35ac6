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
