"""One image of the converter core: what a source says about it, and the work done on it in a worker.

A dataset module describes each image as a :class:`SourceImage` (image, masks with their roles,
label, patient, attributes); :func:`process_image` then decodes it, checks it, crops and resizes
it with its masks, turns each mask into a COCO annotation (``iscrowd: 1`` for ignore regions),
writes it, and returns its entry and fingerprints. It runs in worker processes, which import
neither torch nor detectron2.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

from usdet.data.coco import image_moments, mask_to_annotation
from usdet.data.crop import find_image_region
from usdet.data.decode import FileProblem, SkipFile, decode_file, is_binary_mask, mask_bool
from usdet.data.duplicates import fingerprint, pixel_sha

NORMAL = "normal"


class OutputWriteError(FileProblem):
    """An output file could not be written (disk full, quota, read-only): the run stops.

    Not a per-image problem: skipping the image and going on would leave a dataset that silently
    lacks it. ``path`` is the file that could not be written.
    """

    @property
    def path(self) -> str:
        return self.file

    def __str__(self) -> str:
        return f"cannot write {self.file}: {self.reason}"


class ConversionBugError(RuntimeError):
    """Images failed with an error that is not a problem of their files (a bug): the run fails.

    Expected bad input raises :class:`SkipFile` and is a reasoned skip in report.json; anything
    else passed off as a skip would leave a dataset silently short of images and exit 0.
    ``errors``: ``[{"file", "error", "traceback"}]``, one per failed image.
    """

    def __init__(self, errors: List[Dict[str, str]]):
        self.errors = errors
        first = errors[0]
        super().__init__(
            f"{len(errors)} image(s) failed with an unexpected error, a bug rather than a problem of the file "
            f"(bad files are skipped with a reason); the conversion is incomplete and wrote no report.json. "
            f"First: {first['file']}: {first['error']}\n{first['traceback'].rstrip()}")


@dataclass
class MaskFile:
    """One mask file of an image. ``role`` "lesion" gives boxes, "ignore" gives COCO ignore regions.

    ``category`` None means the image's label. ``colors`` ({(r, g, b): category}) marks a
    colour-coded class mask: each connected region of each listed colour is one annotation.
    """

    file: str  # as named in report.json (relative to the source root)
    path: str  # where to read it
    role: str = "lesion"
    category: Optional[str] = None
    colors: Optional[Dict[Tuple[int, int, int], str]] = None


@dataclass
class SourceImage:
    """One image of a source layout, as its dataset module describes it (nothing decoded yet)."""

    file: str  # relative name, written as ``source_file``
    path: str  # where to read it
    name: str  # short name: output file stem and default group name
    folder: str  # output sub-folder: images/<folder>/<name>.png
    label: Optional[str]  # benign | malignant | normal | ... ; None: from the masks (lesion if any, else normal)
    masks: List[MaskFile] = field(default_factory=list)
    group: Optional[str] = None  # patient / case: images of one group never straddle splits
    attrs: Dict[str, Any] = field(default_factory=dict)  # extra per-image keys (patient, birads, device, ...)
    mask_hint: str = ""  # expected mask name, for the "mask missing" reason
    strict_masks: bool = False  # a mask with more than two grey values is refused (else thresholded)
    expected_size: Optional[Tuple[int, int]] = None  # (w, h) a table claims: a disagreement is a note
    size_source: str = ""  # which table claims it
    fold: Optional[int] = None  # published cross-validation fold


# ----------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)
# ----------------------------------------------------------------------------------------------
def crop_box_for(bgr: np.ndarray, crop: str) -> Tuple[List[int], Optional[str]]:
    """The kept region ``[x0, y0, x1, y1]`` and, when the cropper refused, why (the whole image is kept)."""
    h, w = bgr.shape[:2]
    whole = [0, 0, w, h]
    if crop != "auto":
        return whole, None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else np.repeat(bgr[..., None], 3, axis=2)
    result = find_image_region(rgb)
    box = getattr(result, "box", None)
    if box is None:
        return whole, f"no image region found ({getattr(result, 'reason', 'no reason given')})"
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return whole, f"cropper returned an empty region {list(box)}"
    return [x0, y0, x1, y1], None


_MADE_FOLDERS: set = set()


def write_output_image(path: str, data: bytes) -> None:
    """Write an encoded image via a temp file + rename (a killed run never leaves a partial file).

    Unlike usdet.utils.io.atomic_write there is no fsync per image (it doubled the run time);
    the conversion syncs once before writing the JSONs, so JSONs never point at unflushed images.
    An identical existing file is left alone, which keeps re-runs fast and byte-identical.
    """
    try:
        if os.path.getsize(path) == len(data):
            with open(path, "rb") as fh:
                if fh.read() == data:
                    return
    except OSError:
        pass
    folder = os.path.dirname(path)
    if folder not in _MADE_FOLDERS:  # one makedirs per folder and process, not per image
        os.makedirs(folder, exist_ok=True)
        _MADE_FOLDERS.add(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputWriteError(path, e.strerror or str(e)) from None
        raise


_WORKER: Dict[str, Any] = {}


def init_worker(out_dir: str, options: Any) -> None:
    """Per-process set-up; ``options`` is the run's usdet.data.convert.ConvertOptions."""
    cv2.setNumThreads(1)
    try:  # OpenCV's own warnings (e.g. "PNG input buffer is incomplete") would only repeat the report
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    _WORKER.update(out_dir=out_dir, options=options)
    _MADE_FOLDERS.clear()  # a new run: its output folders may have been removed since


def _color_regions(mf: MaskFile, bgr: np.ndarray, notes: List[Tuple[str, str]]) -> List[Tuple[str, np.ndarray]]:
    """(category, region) for every connected region of every listed colour of a colour-coded mask."""
    rgb = bgr[..., ::-1]
    known = np.zeros(rgb.shape[:2], bool)
    out = []
    for color, category in sorted(mf.colors.items()):
        hit = np.all(rgb == np.array(color, np.uint8), axis=2)
        known |= hit
        n, labels = cv2.connectedComponents(hit.view(np.uint8), connectivity=8)
        out += [(category, labels == k) for k in range(1, n)]
    stray = int(np.count_nonzero(~known & rgb.any(axis=2)))
    if stray:
        notes.append((mf.file, f"{stray} pixels of a colour not in --mask-colors ignored"))
    return out


def _category_id(category: str, classes: List[str], where: str) -> int:
    if classes == ["lesion"]:
        return 1
    if category not in classes:
        raise SkipFile(where, f"label {category!r} is not one of --classes {','.join(classes)}")
    return classes.index(category) + 1


def _read_masks(src: SourceImage, w: int, h: int, notes: List[Tuple[str, str]]):
    """Decode and check every mask; returns [(file, role, category or None, bool mask)]."""
    regions = []
    for mf in src.masks:
        arr, mnotes = decode_file(mf.path, mf.file, is_mask=True, color_mask=mf.colors is not None)
        notes += [(mf.file, n) for n in mnotes if "Pillow" in n]
        if arr.shape[:2] != (h, w):
            raise SkipFile(mf.file, f"mask is {arr.shape[1]}x{arr.shape[0]} but its image {src.file} is {w}x{h}")
        if mf.colors is not None:
            found = _color_regions(mf, arr, notes)
            if not found:
                notes.append((mf.file, "empty mask (no pixel of a listed colour): no annotation"))
            regions += [(mf.file, mf.role, cat, m) for cat, m in found]
            continue
        if src.strict_masks and not is_binary_mask(arr):
            raise SkipFile(mf.file, "mask is not binary (more than two grey values)")
        m = mask_bool(arr)
        if not m.any():
            if mf.role == "lesion" and src.label != NORMAL:
                notes.append((mf.file, "empty mask: no annotation"))
            elif mf.role == "ignore":
                notes.append((mf.file, "empty ignore mask: no ignore region"))
            continue
        regions.append((mf.file, mf.role, mf.category, m))
    return regions


def _resize(out: np.ndarray, regions: list, max_size: int):
    scale = 1.0
    if max_size and max(out.shape[:2]) > max_size:
        ch, cw = out.shape[:2]
        scale = max_size / max(ch, cw)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
        resized = []
        for file, role, cat, m in regions:
            soft = cv2.resize(m.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
            small = soft >= 128
            resized.append((file, role, cat, small if small.any() else soft > 0))  # keep tiny lesions
        regions = resized
    return out, regions, scale


def source_pixels(src: SourceImage, notes: List[Tuple[str, str]]) -> np.ndarray:
    """The image's decoded pixels as the converter sees them: BGR, or one channel when R=G=B.

    Raises SkipFile; appends what the decoder and the size check found to ``notes``.
    """
    img, inotes = decode_file(src.path, src.file, is_mask=False)
    notes += [(src.file, n) for n in inotes]
    h, w = img.shape[:2]
    if src.expected_size and tuple(src.expected_size) != (w, h):
        notes.append((src.file, f"{src.size_source} says {src.expected_size[0]}x{src.expected_size[1]}, "
                                f"the image is {w}x{h} (the image is used)"))
    if img.ndim == 3:
        b, g, r = cv2.split(img)
        if not cv2.countNonZero(cv2.absdiff(b, g)) and not cv2.countNonZero(cv2.absdiff(b, r)):
            img = b  # R=G=B: one channel is the whole image (smaller, faster file)
    return img


def pixel_identity(src: SourceImage) -> str:
    """Hash of the image's decoded pixels and size (equal for pixel-identical files), or a unique
    placeholder when the file can no longer be decoded (it changed during the run)."""
    try:
        return pixel_sha(source_pixels(src, []))
    except SkipFile as e:
        return f"unreadable:{src.file}:{e.reason}"


def process_image(job: Tuple[int, SourceImage, str]) -> Dict[str, Any]:
    """Decode, check, crop, resize, write one image; return its entry, annotations and fingerprints."""
    index, src, file_name = job
    out_dir, opt = _WORKER["out_dir"], _WORKER["options"]
    notes: List[Tuple[str, str]] = []
    result: Dict[str, Any] = {"index": index, "notes": notes}
    try:
        img = source_pixels(src, notes)
        h, w = img.shape[:2]
        lesion_expected = src.label is not None and src.label != NORMAL
        if lesion_expected and not any(m.role == "lesion" for m in src.masks):
            raise SkipFile(src.file, f"mask missing (expected {src.mask_hint or 'a lesion mask'})")
        if not src.masks:
            notes.append((src.file, "normal image without a mask file: kept as a negative"))
        regions = _read_masks(src, w, h, notes)
        lesions = [r for r in regions if r[1] == "lesion"]
        if src.label == NORMAL and lesions:
            raise SkipFile(src.file, f"normal image with a non-empty mask ({lesions[0][0]}): label conflict")
        if lesion_expected and not lesions:
            raise SkipFile(src.file, f"{src.label} image whose masks are all empty (no lesion to box)")
        label = src.label
        if label is None:  # from the masks
            cats = {r[2] or "lesion" for r in lesions}
            label = NORMAL if not cats else ("malignant" if "malignant" in cats else sorted(cats)[0])

        # duplicate fingerprints from the source pixels, so groups and splits do not depend on
        # --crop, --max-size or --image-format (a compact copy keeps the full copy's splits); the
        # pixel hash of exact duplicates is taken later, only for images whose fingerprints tie
        result["source_size"] = (w, h)
        result["vec"], result["dhash"] = fingerprint(img)

        crop_box, refusal = crop_box_for(img, opt.crop)
        result["crop"] = ("refused: " + refusal) if refusal else (
            "cropped" if crop_box != [0, 0, w, h] else "whole image")
        x0, y0, x1, y1 = crop_box
        regions = [(f, role, cat, m[y0:y1, x0:x1]) for f, role, cat, m in regions]
        out, regions, scale = _resize(img[y0:y1, x0:x1], regions, opt.max_size)
        oh, ow = out.shape[:2]

        ext = ".jpg" if opt.image_format == "jpg" else ".png"
        params = [cv2.IMWRITE_JPEG_QUALITY, int(opt.jpeg_quality)] if ext == ".jpg" else []
        anns = []
        for file, role, cat, m in regions:
            cat_id = _category_id(cat or label, opt.classes, file if cat else src.file)
            ann = mask_to_annotation(m, category_id=cat_id)
            if ann is None:
                what = "lesion" if role == "lesion" else "ignore region"
                notes.append((file, f"{what} lies outside the kept region: no annotation"))
                continue
            if role == "ignore":
                ann["iscrowd"] = 1
            ann["source_mask"] = file
            anns.append(ann)
        if lesion_expected and not any(a["iscrowd"] == 0 for a in anns):
            raise SkipFile(src.file, "every lesion lies outside the kept (cropped) region")
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(out), params)
        if not ok:
            raise SkipFile(src.file, f"could not encode the output image as {ext}")
        write_output_image(os.path.join(out_dir, file_name), buf.tobytes())

        entry = {"file_name": file_name, "width": ow, "height": oh, "source_file": src.file,
                 "crop_box": crop_box, "label": label}
        if scale != 1.0:
            entry["scale"] = round(scale, 6)  # written pixels per source pixel
        entry.update(src.attrs)
        written = out
        if ext == ".jpg":  # statistics describe the image as written, JPEG loss included
            written = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        n, s, ss = image_moments(written)
        if written.ndim == 3:  # BGR -> RGB order
            s, ss = s[::-1], ss[::-1]
        result.update(ok=True, image=entry, anns=anns, moments=(n, s, ss), label=label)
    except SkipFile as e:
        result.update(ok=False, skip={"file": e.file, "reason": e.reason})
    except OutputWriteError:
        raise
    except Exception as e:  # not a problem of the file: a bug. The other images still run; the run then fails
        result.update(ok=False, error={"file": src.file, "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()})
    return result
