"""BUSI (Al-Dhabyani et al. 2020) -> usdet COCO layout.

``python tools/convert_to_coco.py busi --root ROOT --output OUT [options]``

BUSI ships ``benign/``, ``malignant/`` and ``normal/`` folders of ``NAME.png`` images with
``NAME_mask.png`` (+ ``NAME_mask_1.png``, ...) masks. The original study kept one box per image;
here every non-empty mask file becomes its own annotation, normals are kept as negatives, and
near-duplicate frames (BUSI has many) are grouped from their pixels so a group never straddles
train/val/test. Exact duplicates whose labels disagree are dropped, since no label can be trusted.

Images are decoded once (OpenCV), optionally cropped to the scanner's image region and
downscaled, written, and summarised (hashes, pixel moments) in one streaming pass; the split,
the JSONs and the report are written only after every image is on disk.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from usdet.data.coco import (PixelStats, categories_for, image_moments, invalidate_previous_output,
                             mask_to_annotation, remove_stale_images, write_coco_dataset)
from usdet.data.split import SPLITS, group_stratified_split, parse_fractions

logger = logging.getLogger(__name__)

CLASS_FOLDERS = ("benign", "malignant", "normal")
LESION_CLASSES = ("benign", "malignant")
CLASS_CHOICES = {"lesion": ["lesion"], "benign,malignant": ["benign", "malignant"]}
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# near-duplicate thresholds: 64x64 grayscale correlation, or 256-bit dHash Hamming distance
NEAR_DUP_CORR = 0.95
NEAR_DUP_HAMMING = 10

EXPECTED_LAYOUT = """expected the BUSI layout (Dataset_BUSI_with_GT):
  ROOT/benign/benign (1).png, ROOT/benign/benign (1)_mask.png, ROOT/benign/benign (4)_mask_1.png, ...
  ROOT/malignant/malignant (1).png, ROOT/malignant/malignant (1)_mask.png, ...
  ROOT/normal/normal (1).png, ROOT/normal/normal (1)_mask.png, ...
i.e. ROOT holds the class folders benign/, malignant/, normal/ (at least one of them)"""


class BusiLayoutError(ValueError):
    """ROOT does not look like BUSI; the message says what was expected."""


class OutputWriteError(Exception):
    """An output file could not be written (disk full, quota, read-only): the run stops.

    Not a per-image problem: skipping the image and going on would leave a dataset that silently
    lacks it. (A plain Exception with (path, reason) args, so it crosses worker processes.)
    """

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``convert_to_coco.py busi``."""
    parser.description = __doc__.strip().splitlines()[0]
    parser.add_argument("--root", default=os.environ.get("USDET_BUSI_ROOT"),
                        help="BUSI folder holding benign/, malignant/, normal/ (default: $USDET_BUSI_ROOT)")
    parser.add_argument("--output", required=True, help="output folder (e.g. datasets/busi)")
    parser.add_argument("--classes", default="lesion", choices=sorted(CLASS_CHOICES),
                        help="one 'lesion' class (as in the original study) or 'benign,malignant'")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--crop", default="none", choices=("auto", "none"),
                        help="'auto': crop to the scanner's image region (usdet.data.crop); 'none': unchanged")
    parser.add_argument("--workers", type=int, default=1, help="parallel decode/encode processes (default 1)")
    parser.add_argument("--image-format", default="png", choices=("png", "jpg"),
                        help="written image format (png is lossless; default png)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --image-format jpg")
    parser.add_argument("--max-size", type=int, default=0,
                        help="downscale so the longer side is at most N pixels (0: keep size); "
                             "masks are resized with the image and boxes recomputed on them")
    parser.add_argument("--near-dup-corr", type=float, default=NEAR_DUP_CORR,
                        help=f"64x64 grayscale correlation that makes two frames near-duplicates "
                             f"(default {NEAR_DUP_CORR})")
    parser.add_argument("--near-dup-hamming", type=int, default=NEAR_DUP_HAMMING,
                        help=f"256-bit dHash Hamming distance that makes two frames near-duplicates "
                             f"(default {NEAR_DUP_HAMMING})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the conversion; returns a process exit code (0 ok, 1 nothing converted or the output could not be
    written, 2 bad arguments)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.root:
        print("busi: --root is required (or set USDET_BUSI_ROOT)", file=sys.stderr)
        return 2
    try:
        fractions = parse_fractions(args.split)
        options = ConvertOptions(
            classes=CLASS_CHOICES[args.classes], fractions=fractions, seed=args.seed, crop=args.crop,
            workers=max(1, args.workers), image_format=args.image_format, jpeg_quality=args.jpeg_quality,
            max_size=max(0, args.max_size), near_dup_corr=args.near_dup_corr,
            near_dup_hamming=args.near_dup_hamming, progress=not args.no_progress,
        )
        t0 = time.time()
        report = convert_busi(args.root, args.output, options)
    except (BusiLayoutError, ValueError) as e:
        print(f"busi: {e}", file=sys.stderr)
        return 2
    except (OutputWriteError, OSError) as e:
        where = getattr(e, "filename", None) or getattr(e, "path", None) or args.output
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        print(f"busi: error: cannot write {where}: {reason}. The conversion stopped; {args.output} holds no "
              f"report.json, so it is marked incomplete: free space (or fix permissions) and re-run the same "
              f"command", file=sys.stderr)
        return 1
    total = report["counts"]["total"]
    print(f"busi: wrote {total['images']} images ({total['annotations']} boxes) to {args.output} "
          f"in {time.time() - t0:.1f} s; "
          + ", ".join(f"{s} {report['counts'][s]['images']}" for s in SPLITS)
          + f"; {len(report['skipped'])} files skipped, {len(report['near_duplicate_groups'])} near-duplicate "
            f"groups; details in {os.path.join(args.output, 'report.json')}")
    return 0 if total["images"] > 0 else 1


# ----------------------------------------------------------------------------------------------
# Scanning ROOT
# ----------------------------------------------------------------------------------------------
@dataclass
class ConvertOptions:
    classes: List[str] = field(default_factory=lambda: ["lesion"])
    fractions: Sequence[float] = (0.7, 0.15, 0.15)
    seed: int = 0
    crop: str = "none"
    workers: int = 1
    image_format: str = "png"
    jpeg_quality: int = 95
    max_size: int = 0
    near_dup_corr: float = NEAR_DUP_CORR
    near_dup_hamming: int = NEAR_DUP_HAMMING
    progress: bool = True


@dataclass
class SourceImage:
    label: str  # class folder
    name: str  # file stem, e.g. "benign (4)"
    image: str  # path relative to ROOT
    masks: List[str]  # paths relative to ROOT, mask, mask_1, mask_2, ...


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def check_root(root: str) -> List[str]:
    """Return the class folders present in ``root``; raise BusiLayoutError when there are none."""
    if not os.path.isdir(root):
        raise BusiLayoutError(f"ROOT {root!r} is not a folder; {EXPECTED_LAYOUT}")
    present = [c for c in CLASS_FOLDERS if os.path.isdir(os.path.join(root, c))]
    if not present:
        entries = sorted(os.listdir(root))[:10]
        hint = ""
        for sub in entries:
            if os.path.isdir(os.path.join(root, sub)) and any(
                    os.path.isdir(os.path.join(root, sub, c)) for c in CLASS_FOLDERS):
                hint = f"\n(did you mean --root {os.path.join(root, sub)!r}?)"
        raise BusiLayoutError(f"ROOT {root!r} has no benign/, malignant/ or normal/ folder "
                              f"(it holds: {entries or 'nothing'}); {EXPECTED_LAYOUT}{hint}")
    return present


def scan_root(root: str) -> Tuple[List[SourceImage], List[Dict[str, str]], List[str]]:
    """Pair images with their masks. Returns (sources, skipped [{file, reason}], missing class folders)."""
    present = check_root(root)
    sources: List[SourceImage] = []
    skipped: List[Dict[str, str]] = []
    for label in present:
        folder = os.path.join(root, label)
        images: Dict[str, str] = {}
        masks: Dict[str, List[Tuple[int, str]]] = defaultdict(list)
        for fname in sorted(os.listdir(folder), key=_natural_key):
            rel = f"{label}/{fname}"
            path = os.path.join(folder, fname)
            if os.path.isdir(path):
                skipped.append({"file": rel, "reason": "unexpected sub-folder (not searched)"})
                continue
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in _IMAGE_EXTS:
                skipped.append({"file": rel, "reason": f"not an image file (extension {ext or 'none'!r})"})
                continue
            m = _MASK_RE.match(stem)
            if m:
                masks[m.group("stem")].append((int(m.group("index") or 0), rel))
            elif stem in images:
                skipped.append({"file": rel, "reason": f"second image named {stem!r} (kept {images[stem]})"})
            else:
                images[stem] = rel
        for stem in sorted(set(masks) - set(images), key=_natural_key):
            for _, rel in sorted(masks[stem]):
                skipped.append({"file": rel, "reason": f"mask without an image ({stem}.png is missing)"})
        for stem in sorted(images, key=_natural_key):
            sources.append(SourceImage(label, stem, images[stem], [rel for _, rel in sorted(masks.get(stem, []))]))
    missing = [c for c in CLASS_FOLDERS if c not in present]
    return sources, skipped, missing


# ----------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)
# ----------------------------------------------------------------------------------------------
class _Skip(Exception):
    """This image cannot be used; the message is the per-file reason for the report."""

    def __init__(self, file: str, reason: str):
        super().__init__(reason)
        self.file = file
        self.reason = reason


def _header_size(data: np.ndarray) -> Optional[Tuple[int, int]]:
    """(width, height) from the file header without decoding pixels; None when unknown."""
    head = data[:24].tobytes()
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.tobytes())) as img:  # reads the header only
                return img.size
    except Image.DecompressionBombError:  # Pillow refuses to even open it: far over any limit
        return (1 << 16, 1 << 16)
    except Exception:  # not something Pillow knows: OpenCV (and its fallback) will say why
        return None


def _decode(root: str, rel: str, is_mask: bool) -> Tuple[np.ndarray, List[str]]:
    """Decode with OpenCV (fast), falling back to Pillow for formats and errors OpenCV can't explain.

    Returns (array: HxW gray or HxWx3 BGR uint8, notes).
    """
    path = os.path.join(root, rel)
    kind = "mask" if is_mask else "image"
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise _Skip(rel, f"{kind} unreadable ({e.strerror or e})") from None
    if data.size == 0:
        raise _Skip(rel, f"{kind} is a zero-byte file")
    size = _header_size(data)
    if size is not None:
        from usdet.data.image_io import MAX_PIXELS

        w, h = size
        if w * h > MAX_PIXELS:  # refuse before decoding: a tiny file can claim gigabytes of pixels
            raise _Skip(rel, f"{kind} is {w}x{h}, over the {MAX_PIXELS} pixel limit (decompression-bomb guard)")
        if w < 2 or h < 2:
            raise _Skip(rel, f"{kind} is {w}x{h}, too small to be an ultrasound {kind}")
    notes: List[str] = []
    # masks: one channel at native depth is all a mask needs (and decodes faster than colour)
    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH if is_mask else cv2.IMREAD_UNCHANGED
    arr = cv2.imdecode(data, flags)
    if arr is None:
        # OpenCV says nothing about why; Pillow names the problem (truncated, not an image, ...)
        from usdet.data.image_io import ImageReadError, read_image

        try:
            rgb = read_image(path)
        except ImageReadError as e:
            raise _Skip(rel, f"{kind} unreadable: {e.reason}") from None
        notes.append(f"{kind} decoded by Pillow (OpenCV could not)")
        if is_mask:
            return rgb.max(axis=2), notes
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), notes
    if not data[:8].tobytes().startswith(_PNG_SIGNATURE) and rel.lower().endswith(".png"):
        notes.append(f"{kind} has a .png name but is not PNG data")
    if arr.dtype == np.uint16 and not is_mask:  # masks keep their values; _mask_bool thresholds any depth
        notes.append("16-bit image rescaled to 8 bits (min-max)")
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr.astype(np.float32) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr, np.float32)
        arr = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise _Skip(rel, f"{kind} has unsupported pixel type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[..., 3]
        if not is_mask and alpha.min() < 255:
            notes.append("image has transparency: alpha dropped")
        elif not is_mask:
            notes.append("RGBA image: opaque alpha dropped")
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return arr, notes


def _mask_bool(arr: np.ndarray) -> np.ndarray:
    """Binary mask from any mask encoding (1-bit, 0/255 or 0/1 gray, 16-bit, colour read as gray).

    Thresholds at half the mask's own maximum, so 0/1 and 0/255 masks (and a coloured mask
    converted to gray) all work; an all-zero mask stays empty.
    """
    gray = arr.max(axis=2) if arr.ndim == 3 else arr
    top = float(cv2.minMaxLoc(gray)[1]) if gray.size else 0.0
    if top == 0:
        return np.zeros(gray.shape, bool)
    return gray > (0 if top <= 1 else top / 2)


def _load_cropper() -> Optional[Callable[[np.ndarray], Any]]:
    """usdet.data.crop.find_image_region if that module is installed, else None (crop falls back to none)."""
    try:
        from usdet.data.crop import find_image_region
    except ImportError:
        return None
    return find_image_region


def _crop_box(bgr: np.ndarray, crop: str) -> Tuple[List[int], Optional[str]]:
    h, w = bgr.shape[:2]
    whole = [0, 0, w, h]
    if crop != "auto":
        return whole, None
    finder = _load_cropper()
    if finder is None:
        return whole, None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else np.repeat(bgr[..., None], 3, axis=2)
    result = finder(rgb)
    box = getattr(result, "box", None)
    if box is None:
        return whole, f"no image region found ({getattr(result, 'reason', 'no reason given')})"
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return whole, f"cropper returned an empty region {list(box)}"
    return [x0, y0, x1, y1], None


def _small_gray(gray: np.ndarray) -> Tuple[np.ndarray, bytes]:
    """64x64 zero-mean unit-norm vector (for correlation) and a 256-bit dHash, from a downscaled copy."""
    import imagehash
    from PIL import Image

    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    vec = small.astype(np.float32).ravel()
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    vec = vec / norm if norm > 0 else vec
    dhash = imagehash.dhash(Image.fromarray(small), hash_size=16)
    return vec.astype(np.float16), np.packbits(dhash.hash.ravel()).tobytes()


def _write_output_image(path: str, data: bytes) -> None:
    """Write an encoded image via a temp file + rename (a killed run never leaves a partial file).

    Unlike usdet.utils.io.atomic_write there is no fsync per image (it doubled the run time);
    convert_busi syncs once before writing the JSONs, so JSONs never point at unflushed images.
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
    os.makedirs(folder, exist_ok=True)
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


def _init_worker(root: str, out_dir: str, options: ConvertOptions, cat_ids: Dict[str, int]) -> None:
    cv2.setNumThreads(1)
    try:  # OpenCV's own warnings (e.g. "PNG input buffer is incomplete") would only repeat the report
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    _WORKER.update(root=root, out_dir=out_dir, options=options, cat_ids=cat_ids)


def _process(job: Tuple[int, SourceImage, str]) -> Dict[str, Any]:
    """Decode, check, crop, resize, write one image; return its entry, annotations and fingerprints."""
    index, src, file_name = job
    root, out_dir, opt = _WORKER["root"], _WORKER["out_dir"], _WORKER["options"]
    result: Dict[str, Any] = {"index": index, "notes": []}
    try:
        img, notes = _decode(root, src.image, is_mask=False)
        result["notes"] += [(src.image, n) for n in notes]
        h, w = img.shape[:2]
        if img.ndim == 3:
            b, g, r = cv2.split(img)
            if not cv2.countNonZero(cv2.absdiff(b, g)) and not cv2.countNonZero(cv2.absdiff(b, r)):
                img = b  # R=G=B: one channel is the whole image (smaller, faster file)
        masks: List[Tuple[str, np.ndarray]] = []
        if not src.masks and src.label in LESION_CLASSES:
            raise _Skip(src.image, f"mask missing (expected {src.name}_mask.png beside the image)")
        if not src.masks:
            result["notes"].append((src.image, "normal image without a mask file: kept as a negative"))
        for rel in src.masks:
            marr, mnotes = _decode(root, rel, is_mask=True)
            result["notes"] += [(rel, n) for n in mnotes if "Pillow" in n]
            if marr.shape[:2] != (h, w):
                raise _Skip(rel, f"mask is {marr.shape[1]}x{marr.shape[0]} but its image {src.image} "
                                 f"is {w}x{h}")
            masks.append((rel, _mask_bool(marr)))
        nonempty = []
        for rel, m in masks:
            if m.any():
                nonempty.append((rel, m))
            elif src.label in LESION_CLASSES:
                result["notes"].append((rel, "empty mask: no annotation"))
        if src.label == "normal" and nonempty:
            raise _Skip(src.image, f"normal image with a non-empty mask ({nonempty[0][0]}): label conflict")
        if src.label in LESION_CLASSES and not nonempty:
            raise _Skip(src.image, f"{src.label} image whose masks are all empty (no lesion to box)")

        # duplicate fingerprints from the source pixels, so groups and splits do not depend on
        # --crop, --max-size or --image-format (a compact copy keeps the full copy's splits)
        result["pixel_sha"] = hashlib.sha256(np.ascontiguousarray(img).data).hexdigest()[:32] + f":{w}x{h}"
        result["vec"], result["dhash"] = _small_gray(img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))

        crop_box, refusal = _crop_box(img, opt.crop)
        result["crop"] = ("refused: " + refusal) if refusal else (
            "cropped" if crop_box != [0, 0, w, h] else "whole image")
        x0, y0, x1, y1 = crop_box
        out = img[y0:y1, x0:x1]
        masks = [(rel, m[y0:y1, x0:x1]) for rel, m in nonempty]
        scale = 1.0
        if opt.max_size and max(out.shape[:2]) > opt.max_size:
            ch, cw = out.shape[:2]
            scale = opt.max_size / max(ch, cw)
            size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
            out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
            resized = []
            for rel, m in masks:
                soft = cv2.resize(m.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
                small = soft >= 128
                resized.append((rel, small if small.any() else soft > 0))  # keep tiny lesions
            masks = resized
        oh, ow = out.shape[:2]

        ext = ".jpg" if opt.image_format == "jpg" else ".png"
        params = [cv2.IMWRITE_JPEG_QUALITY, int(opt.jpeg_quality)] if ext == ".jpg" else []
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(out), params)
        if not ok:
            raise _Skip(src.image, f"could not encode the output image as {ext}")
        _write_output_image(os.path.join(out_dir, file_name), buf.tobytes())

        anns = []
        for rel, m in masks:
            ann = mask_to_annotation(m, category_id=_WORKER["cat_ids"][src.label])
            if ann is None:
                result["notes"].append((rel, "lesion lies outside the kept region: no annotation"))
                continue
            ann["source_mask"] = rel
            anns.append(ann)
        if src.label in LESION_CLASSES and not anns:
            raise _Skip(src.image, "every lesion lies outside the kept (cropped) region")
        entry = {"file_name": file_name, "width": ow, "height": oh, "source_file": src.image,
                 "crop_box": crop_box, "label": src.label}
        if scale != 1.0:
            entry["scale"] = round(scale, 6)  # written pixels per source pixel
        written = out
        if ext == ".jpg":  # statistics describe the image as written, JPEG loss included
            written = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        n, s, ss = image_moments(written)
        if written.ndim == 3:  # BGR -> RGB order
            s, ss = s[::-1], ss[::-1]
        result.update(ok=True, image=entry, anns=anns, moments=(n, s, ss))
    except _Skip as e:
        result.update(ok=False, skip={"file": e.file, "reason": e.reason})
    except OutputWriteError:
        raise
    except Exception as e:  # one bad file must not lose the rest; report it with its reason
        result.update(ok=False, skip={"file": src.image, "reason": f"unexpected error: {type(e).__name__}: {e}"})
    return result


# ----------------------------------------------------------------------------------------------
# Duplicates and groups
# ----------------------------------------------------------------------------------------------
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


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


# ----------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------
def _check_paths(root: str, out_dir: str) -> None:
    r, o = os.path.realpath(root), os.path.realpath(out_dir)
    if o == r or o.startswith(r + os.sep):
        raise ValueError(f"--output {out_dir!r} is inside --root {root!r}; ROOT is never written to")
    for sub in ("images", "annotations"):
        if r == os.path.join(o, sub) or r.startswith(os.path.join(o, sub) + os.sep):
            raise ValueError(f"--root {root!r} lies inside the output's {sub}/ folder; choose another --output")


def _iter_results(jobs, root, out_dir, options, cat_ids):
    if options.workers <= 1:
        _init_worker(root, out_dir, options, cat_ids)
        for job in jobs:
            yield _process(job)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(options.workers, initializer=_init_worker, initargs=(root, out_dir, options, cat_ids)) as pool:
        yield from pool.imap(_process, jobs, chunksize=4)


def convert_busi(root: str, out_dir: str, options: Optional[ConvertOptions] = None) -> Dict[str, Any]:
    """Convert BUSI at ``root`` into ``out_dir`` (see module docstring); returns the report dict."""
    from tqdm import tqdm

    opt = options or ConvertOptions()
    if list(opt.classes) not in CLASS_CHOICES.values():
        raise ValueError(f"classes must be 'lesion' or 'benign,malignant', got {opt.classes}")
    sources, skipped, missing_folders = scan_root(root)
    _check_paths(root, out_dir)
    invalidate_previous_output(out_dir)
    crop_used = opt.crop
    crop_note = None
    if opt.crop == "auto" and _load_cropper() is None:
        crop_used = "none"
        crop_note = "usdet.data.crop is not installed: --crop auto fell back to none"
        logger.warning("busi: %s", crop_note)
    requested_crop = opt.crop
    opt = replace(opt, crop=crop_used, classes=list(opt.classes))
    categories = categories_for(opt.classes)
    cat_ids = {lbl: (1 if opt.classes == ["lesion"] else opt.classes.index(lbl) + 1) for lbl in LESION_CLASSES}

    ext = ".jpg" if opt.image_format == "jpg" else ".png"
    used_names: set = set()
    jobs = []
    for i, src in enumerate(sources):
        base = f"images/{src.label}/{_safe_stem(src.name)}"
        name, k = base + ext, 2
        while name in used_names:  # two sources that sanitise alike keep distinct outputs
            name, k = f"{base}_{k}{ext}", k + 1
        used_names.add(name)
        jobs.append((i, src, name))

    results: List[Optional[Dict[str, Any]]] = [None] * len(sources)
    notes: List[Dict[str, str]] = []
    with tqdm(total=len(jobs), desc="busi", unit="img", disable=not opt.progress, file=sys.stderr) as bar:
        for res in _iter_results(jobs, root, out_dir, opt, cat_ids):
            i = res["index"]
            notes += [{"file": f, "note": n} for f, n in res.pop("notes")]
            if res.get("ok"):
                results[i] = res
            else:
                skipped.append(res["skip"])
            bar.update(1)
    kept = [i for i in range(len(sources)) if results[i] is not None]

    # exact duplicates (pixel-identical): conflicting labels -> drop all copies; same label -> one group
    by_sha: Dict[str, List[int]] = defaultdict(list)
    for i in kept:
        by_sha[results[i]["pixel_sha"]].append(i)
    exact_dups = []
    excluded: set = set()
    for sha, members in sorted(by_sha.items(), key=lambda kv: kv[1][0]):
        if len(members) < 2:
            continue
        labels = sorted({sources[i].label for i in members})
        conflict = len(labels) > 1
        exact_dups.append({"files": [sources[i].image for i in members], "labels": labels,
                           "action": "excluded (conflicting labels)" if conflict else "kept in one group"})
        if conflict:
            for i in members:
                excluded.add(i)
                skipped.append({"file": sources[i].image,
                                "reason": "exact duplicate with a conflicting label: "
                                          + " = ".join(sources[j].image for j in members)})
                try:  # its image was written before the duplicate was known
                    os.remove(os.path.join(out_dir, jobs[i][2]))
                except FileNotFoundError:
                    pass
    kept = [i for i in kept if i not in excluded]

    # near-duplicate groups from pixels (exact duplicates fall in the same group automatically)
    # (fingerprints move out of the per-image results: one copy of them is held, not two)
    vecs = np.zeros((len(kept), 4096), np.float16)
    hashes = np.zeros((len(kept), 32), np.uint8)
    for row, i in enumerate(kept):
        vecs[row] = results[i].pop("vec")
        hashes[row] = np.frombuffer(results[i].pop("dhash"), np.uint8)
    comp = near_duplicate_components(vecs, hashes, opt.near_dup_corr, opt.near_dup_hamming)
    members_of: Dict[int, List[int]] = defaultdict(list)
    for pos, c in enumerate(comp):
        members_of[int(c)].append(kept[pos])
    group_of: Dict[int, str] = {}
    for members in members_of.values():
        gname = _safe_stem(sources[min(members)].name)
        for i in members:
            group_of[i] = gname

    keys = [sources[i].image for i in kept]
    assignment = group_stratified_split(keys, [group_of[i] for i in kept], [sources[i].label for i in kept],
                                        opt.fractions, opt.seed)

    images_by_split: Dict[str, list] = {s: [] for s in SPLITS}
    anns_by_split: Dict[str, list] = {s: [] for s in SPLITS}
    stats = PixelStats()
    cat_name = {c["id"]: c["name"] for c in categories}
    counts = {s: {"images": 0, "annotations": 0, "images_by_label": {}, "annotations_by_category": {}}
              for s in list(SPLITS) + ["total"]}
    next_ann = 1
    for image_id, i in enumerate(kept, start=1):  # kept is in scan order: (class, natural name)
        res, split = results[i], assignment[sources[i].image]
        entry = {"id": image_id, **res["image"], "group": group_of[i]}
        images_by_split[split].append(entry)
        for ann in res["anns"]:
            anns_by_split[split].append({"id": next_ann, "image_id": image_id, **ann})
            next_ann += 1
        if split == "train":
            stats.add_moments(*res["moments"])
        for s in (split, "total"):
            c = counts[s]
            c["images"] += 1
            c["annotations"] += len(res["anns"])
            c["images_by_label"][entry["label"]] = c["images_by_label"].get(entry["label"], 0) + 1
            for ann in res["anns"]:
                name = cat_name[ann["category_id"]]
                c["annotations_by_category"][name] = c["annotations_by_category"].get(name, 0) + 1
    for c in counts.values():
        c["images_by_label"] = dict(sorted(c["images_by_label"].items()))
        c["annotations_by_category"] = dict(sorted(c["annotations_by_category"].items()))

    near_groups = []
    for members in sorted(members_of.values(), key=lambda m: min(m)):
        if len(members) < 2:
            continue
        members = sorted(members)
        labels = sorted({sources[i].label for i in members})
        near_groups.append({"group": group_of[members[0]], "split": assignment[sources[members[0]].image],
                            "files": [sources[i].image for i in members], "labels": labels,
                            "label_conflict": len(labels) > 1})

    found = {lbl: {"images": sum(s.label == lbl for s in sources),
                   "mask_files": sum(len(s.masks) for s in sources if s.label == lbl)}
             for lbl in CLASS_FOLDERS if lbl not in missing_folders}
    report = {
        "dataset": "busi",
        "options": {"classes": list(opt.classes), "split": [round(f, 6) for f in opt.fractions], "seed": opt.seed,
                    "crop": requested_crop, "image_format": opt.image_format,
                    "max_size": opt.max_size, "near_dup_corr": opt.near_dup_corr,
                    "near_dup_hamming": opt.near_dup_hamming},
        "found": found,
        "missing_class_folders": missing_folders,
        "counts": counts,
        "exact_duplicates": exact_dups,
        "near_duplicate_groups": near_groups,
        "skipped": sorted(skipped, key=lambda s: (_natural_key(s["file"]), s["reason"])),
        "notes": sorted(notes, key=lambda s: (_natural_key(s["file"]), s["note"])),
    }
    crop_outcomes = Counter(results[i]["crop"] for i in kept)
    report["crop"] = {"requested": requested_crop, "used": crop_used, "outcomes": dict(sorted(crop_outcomes.items()))}
    if crop_note:
        report["crop"]["note"] = crop_note
    remove_stale_images(out_dir, CLASS_FOLDERS, {jobs[i][2] for i in kept})
    if hasattr(os, "sync"):
        os.sync()  # every image is on disk before any JSON refers to it
    write_coco_dataset(out_dir, images_by_split, anns_by_split, categories, report=report,
                       pixel_stats=stats.result("train"),
                       info={"description": "BUSI (Al-Dhabyani et al. 2020, Data in Brief 28:104863), "
                                            "converted by usdet"})
    return report
