"""Decoding an image file as mmdetection does, with a fallback and the checks around it.

* **Decoder.**  :func:`mmcv.imread` (OpenCV, BGR, EXIF orientation applied: mmcv's
  ``'color'`` flag, mmdetection's ``LoadImageFromFile``).  OpenCV 5's ``imdecode`` returns
  ``None`` for a JPEG that ends early ("Premature end of JPEG file"), which OpenCV 4, PIL
  and most viewers decode with a warning (the missing rows grey); then PIL decodes it, with
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` set for that one call only, and a warning names the
  file.  The fallback applies the EXIF orientation too, so both paths give the same frame.
* **Size.**  The decoded (oriented) size must equal the annotated one (COCO
  ``width``/``height``, VOC ``<size>``): boxes are in the annotation's frame, and the
  padded shapes the cache groups batches by are computed from it.  A mismatch is a
  :class:`DataError` naming the file, both sizes and the EXIF orientation tag if the image
  has one (a tag 5-8 image whose stored size is the annotated one was annotated unrotated).
* **Undecodable files** (0 bytes, not an image, truncated beyond what PIL reads) raise
  :class:`UndecodableImage`; with ``data.skip_undecodable_images`` the data set skips them
  instead (counted, see ``ldpipe.data.dataset``).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings

import mmcv
import numpy as np

from ldpipe.data.errors import DataError

log = logging.getLogger("ldpipe.data")
EXIF_ORIENTATION = 0x0112
_PIL_LOCK = threading.Lock()  # LOAD_TRUNCATED_IMAGES is a module global of PIL


class UndecodableImage(DataError):
    """An image file no decoder can read; the message names it."""


def exif_orientation(path: str) -> int:
    """The EXIF orientation tag (1 = as stored; 5-8 swap width and height), 1 if none."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # no EXIF, or not readable by PIL: nothing to report
        return 1


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) as decoded, i.e. after the EXIF orientation, from the header."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            tag = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, ValueError) as exc:
        raise DataError(f"image not found or unreadable: {path} ({exc})") from None
    return (h, w) if tag in (5, 6, 7, 8) else (w, h)


def _pil_decode(path: str) -> np.ndarray:
    """BGR uint8 via PIL, reading truncated files as far as they go, EXIF orientation applied."""
    from PIL import Image, ImageFile, ImageOps
    with _PIL_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                rgb = np.asarray(im)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before
    return np.ascontiguousarray(rgb[:, :, ::-1])


def read_image(path: str) -> np.ndarray:
    """BGR uint8 ``[H, W, 3]``: mmcv (OpenCV) first, PIL for what OpenCV 5 refuses."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"image not found or unreadable: {path} ({exc.strerror})") from None
    if size == 0:
        raise UndecodableImage(f"image file is empty (0 bytes): {path}")
    try:
        img = mmcv.imread(path)
    except Exception as exc:  # cv2.error for bytes OpenCV does not recognise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.debug("mmcv.imread failed on %s: %s", path, first)
        img = None
    if img is not None:
        return img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _pil_decode(path)
    except Exception as exc:
        raise UndecodableImage(f"image cannot be decoded by OpenCV or PIL: {path} ({exc})") from None
    log.warning("%s: OpenCV could not decode it (truncated or damaged file?); decoded with PIL "
                "(truncated rows, if any, are grey)", path)
    return img


def load_checked(path: str, width: int, height: int) -> np.ndarray:
    """:func:`read_image`, refusing an image whose decoded size is not the annotated one."""
    img = read_image(path)
    h, w = img.shape[:2]
    if (w, h) != (width, height):
        tag = exif_orientation(path)
        why = (f"; it has EXIF orientation {tag}, which ldpipe applies (as mmcv and mmdetection "
               "do), so it was annotated on the stored, unrotated pixels: remove the tag from the "
               "file (keeping its pixels) or annotate the rotated image" if tag != 1
               else "; fix the annotation or the image")
        raise DataError(f"{path}: decoded size {w}x{h} differs from the annotated {width}x{height}"
                        f"{why}")
    return img


__all__ = ["UndecodableImage", "exif_orientation", "load_checked", "oriented_size", "read_image"]
