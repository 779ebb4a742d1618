"""Thumbnails of indexed files: EXIF-rotated images, poster frames of videos, cached on disk as JPEG.

The cache key holds the row id, the size bucket, the file's mtime and size and (videos) the poster time,
so a file changed on disk gets a new thumbnail and a new ETag; older files of the same id are removed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from chat.video import VideoReader
from retrieval.images import open_image

logger = logging.getLogger(__name__)

#: thumbnail sizes served (longest side, pixels); a requested size is rounded up to the next bucket
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024)
MIN_SIZE, MAX_SIZE = SIZE_BUCKETS[0], SIZE_BUCKETS[-1]
JPEG_QUALITY = 85
#: bump when the rendering changes, so cached thumbnails and browser caches are refreshed
RENDER_VERSION = 1


def snap_size(size: int) -> int:
    """The smallest bucket at least ``size`` (the largest bucket for anything above it)."""
    return next((b for b in SIZE_BUCKETS if b >= size), MAX_SIZE)


@dataclass(frozen=True)
class ThumbKey:
    """What a thumbnail depends on."""

    image_id: int
    size: int  #: a bucket of :data:`SIZE_BUCKETS`
    mtime_ns: int
    file_size: int
    poster_s: float | None  #: time of the poster frame for video rows, None for images

    @property
    def digest(self) -> str:
        parts = (RENDER_VERSION, self.image_id, self.size, self.mtime_ns, self.file_size, self.poster_s)
        text = ":".join(map(str, parts))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def key_for(image_id: int, path: Path, size: int, poster_s: float | None) -> ThumbKey:
    """The key of ``path``'s thumbnail as the file is now (raises ``OSError`` when it cannot be read)."""
    st = path.stat()
    return ThumbKey(image_id, snap_size(size), st.st_mtime_ns, st.st_size, poster_s)


def _video_frame(path: Path, at_s: float, max_pixels: int | None) -> Image.Image:
    """The decoded frame shown at ``at_s`` seconds (clamped to the video)."""
    with VideoReader(path, max_pixels=max_pixels) as reader:
        info = reader.info
        index = min(max(int(round(at_s * info.fps)), 0), info.max_frame) if info.fps > 0 else 0
        (frame,) = reader.get_batch([index])
    return Image.fromarray(frame).convert("RGB")


def render(path: Path, size: int, poster_s: float | None, max_pixels: int | None) -> bytes:
    """JPEG bytes of the thumbnail (longest side at most ``size``, never enlarged): the EXIF-rotated image,
    or for a video (``poster_s`` not None) the frame at ``poster_s``. Raises ``ImageDecodeError`` /
    ``VideoDecodeError`` on undecodable files."""
    if poster_s is None:
        image = open_image(path, max_pixels=max_pixels)
    else:
        image = _video_frame(path, poster_s, max_pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


class ThumbCache:
    """Thumbnails on disk in ``folder`` (``<index dir>/thumbs``): ``<size>/<id // 1000>/<id>-<digest>.jpg``.

    Writes are atomic (temporary file, then rename); a folder that cannot be written is logged once and
    thumbnails are then served uncached."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._warned = False

    def _path(self, key: ThumbKey) -> Path:
        return self.folder / str(key.size) / str(key.image_id // 1000) / f"{key.image_id}-{key.digest}.jpg"

    def get(self, key: ThumbKey) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("thumbnail cache unreadable at %s: %s", self._path(key), exc)
            return None

    def put(self, key: ThumbKey, data: bytes) -> None:
        """Store ``data`` and drop this id's thumbnails of older file versions at this size."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise
            for old in path.parent.glob(f"{key.image_id}-*.jpg"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            if not self._warned:
                logger.warning("thumbnail cache %s is not writable, serving uncached: %s", self.folder, exc)
                self._warned = True
