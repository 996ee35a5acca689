"""Small copies of preview images and verify grids for the web page: made once with Pillow (WebP, at most
320 px a side) into the home folder's cache, keyed by the image's SHA-256, so each costs one decode ever."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.zoo.home_cache import cache_path

THUMB_PX = 320
MAX_PIXELS = 64_000_000  # a bigger "preview" is refused rather than decoded (decompression bombs)
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a page view reads no bytes


def image_digest(path: Path) -> str:
    """The SHA-256 of an image file's bytes, remembered while its size and mtime stay the same."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _digests[key]


def image_type(path: Path) -> str:
    """The media type of a real image file (PNG, JPEG, WebP, GIF); anything else is refused."""
    try:
        with Image.open(path) as image:
            kind = image.format
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise BadFileError(f"{path.name} is not an image ({exc.__class__.__name__})") from None
    if kind not in IMAGE_FORMATS or width * height > MAX_PIXELS:
        raise BadFileError(f"{path.name} is not an image we show ({kind}, {width}x{height})")
    return IMAGE_FORMATS[kind]


def thumbnail(path: Path) -> tuple[Path, str]:
    """(the thumbnail file, its digest): a WebP of `path` fitted into 320 x 320 px, made on first use."""
    image_type(path)
    digest = image_digest(path)
    thumb = cache_path("thumbs", digest, ".webp")
    if not thumb.is_file():
        with Image.open(path) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            small = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
        with atomic_output(thumb) as tmp:
            small.save(tmp, "WEBP", quality=82)
    return thumb, digest
