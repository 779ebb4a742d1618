"""``GET /thumbs/{id}?size=N`` over the real server: EXIF-rotated JPEGs, video poster frames, the disk cache
next to the index (refreshed when the file changes), ETag / 304, bounds, errors, and /images' access rules."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from api_helpers import FakeEncoder, make_images, serve
from PIL import Image, ImageOps

from api.app import create_app
from api.settings import Settings
from api.web.thumbnails import SIZE_BUCKETS, snap_size
from index import Index
from index.builder import build_index

KEY = "thumb-key"
FPS = 6
RED, BLUE = (220, 30, 30), (30, 60, 220)


def make_rotated_jpeg(path: Path) -> Path:
    """Stored 200x100, left half red and right half blue, EXIF orientation 6 (shown rotated 90° cw)."""
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100], arr[:, 100:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def make_two_colour_clip(path: Path) -> Path:
    """2 s at ``FPS``: red for the first second, blue for the second (H.264, PyAV)."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for colour in (RED, BLUE):
            for _ in range(FPS):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), colour, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("thumb_library")
    make_images(root, n=3, size=(48, 40))
    make_rotated_jpeg(root / "rotated.jpg")
    (root / "broken.png").write_bytes((root / "img0.png").read_bytes())  # indexed, then corrupted
    (root / "gone.png").write_bytes((root / "img1.png").read_bytes())  # indexed, then deleted
    (root / "changing.png").write_bytes((root / "img2.png").read_bytes())  # indexed, then rewritten
    make_two_colour_clip(root / "clip.mp4")
    return root


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, library: Path) -> Path:
    index_dir = tmp_path_factory.mktemp("thumb_index")
    build_index([str(library)], index_dir, FakeEncoder(), workers=0, progress=False, video_segments=1.0)
    (library / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png any more")
    (library / "gone.png").unlink()
    return index_dir


@pytest.fixture(scope="module")
def rows(index_dir: Path) -> dict[tuple[str, float | None], dict]:
    """Rows by (file name, t_start of segments / None)."""
    with Index.open(index_dir) as idx:
        found = [r for r in idx.get(idx.ids().tolist()) if r is not None]
    by_name = {}
    for r in found:
        t = r.get("t_start") if r.get("kind") == "segment" else None
        by_name[(os.path.basename(r["path"]), t)] = r
    return by_name


def _app(index_dir: Path, **settings: object):  # noqa: ANN202
    return create_app(Settings(index=str(index_dir), reload_interval_s=0, **settings), encoder=FakeEncoder())


@pytest.fixture(scope="module")
def url(index_dir: Path) -> Iterator[str]:
    with serve(_app(index_dir)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(index_dir: Path) -> Iterator[str]:
    with serve(_app(index_dir, api_key=KEY)) as base:
        yield base


def _get(url: str, row: dict, size: int = 128, **headers: str) -> httpx.Response:
    return httpx.get(f"{url}/thumbs/{row['id']}", params={"size": size}, headers=headers, timeout=60)


def _jpeg(r: httpx.Response) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "JPEG"
    return image.convert("RGB")


def _mean(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(0)


def test_sizes_snap_up_to_buckets() -> None:
    assert [snap_size(s) for s in (32, 33, 64, 100, 256, 257, 1024)] == [32, 64, 64, 128, 256, 512, 1024]
    assert SIZE_BUCKETS[0] == 32 and SIZE_BUCKETS[-1] == 1024


def test_image_thumbnail_is_exif_rotated_and_bounded(url: str, rows: dict, library: Path) -> None:
    thumb = _jpeg(_get(url, rows[("rotated.jpg", None)], size=100))  # bucket 128
    assert thumb.size == (64, 128)  # shown portrait: stored 200x100, EXIF orientation 6
    expected = ImageOps.exif_transpose(Image.open(library / "rotated.jpg")).convert("RGB").resize((64, 128))
    diff = np.abs(np.asarray(thumb, np.float64) - np.asarray(expected, np.float64)).mean()
    assert diff < 6.0
    assert np.allclose(_mean(thumb, (8, 8, 56, 56)), RED, atol=25)  # the stored left half is on top
    assert np.allclose(_mean(thumb, (8, 72, 56, 120)), BLUE, atol=25)
    small = _jpeg(_get(url, rows[("img0.png", None)], size=1024))
    assert small.size == (48, 40)  # never enlarged


def test_video_rows_get_poster_frames(url: str, rows: dict) -> None:
    video = _jpeg(_get(url, rows[("clip.mp4", None)], size=64))
    assert video.size == (64, 48)
    assert np.allclose(_mean(video, (8, 8, 56, 40)), RED, atol=30)  # the first frame
    segment = _jpeg(_get(url, rows[("clip.mp4", 1.0)], size=64))
    assert np.allclose(_mean(segment, (8, 8, 56, 40)), BLUE, atol=30)  # the frame at the segment's start


def test_etag_cache_control_and_304(url: str, rows: dict) -> None:
    row = rows[("img1.png", None)]
    first = _get(url, row)
    etag = first.headers["etag"]
    assert etag.startswith('"') and "max-age" in first.headers["cache-control"]
    again = _get(url, row, **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert _get(url, row, **{"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert _get(url, row, **{"If-None-Match": '"other"'}).status_code == 200
    assert _get(url, row, size=256).headers["etag"] != etag  # another bucket, another thumbnail
    assert _get(url, row, size=100).headers["etag"] == etag  # 100 and 128 share the 128 bucket


def test_thumbnails_are_cached_next_to_the_index_and_refreshed(
    url: str, rows: dict, index_dir: Path, library: Path
) -> None:
    row = rows[("changing.png", None)]
    first = _get(url, row)
    cached = list((index_dir / "thumbs" / "128").rglob(f"{row['id']}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    marker = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(marker, format="JPEG")
    cached[0].write_bytes(marker.getvalue())
    assert _get(url, row).content == marker.getvalue()  # served from the disk cache, not re-rendered

    path = library / "changing.png"
    Image.new("RGB", (30, 20), BLUE).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    fresh = _get(url, row)
    assert fresh.headers["etag"] != first.headers["etag"]
    assert np.allclose(_mean(_jpeg(fresh), (2, 2, 28, 18)), BLUE, atol=25)  # the new file, not the stale one
    now = list((index_dir / "thumbs" / "128").rglob(f"{row['id']}-*.jpg"))
    assert len(now) == 1 and now[0] != cached[0]  # the stale thumbnail was removed
    assert _get(url, row, **{"If-None-Match": first.headers["etag"]}).status_code == 200


@pytest.mark.parametrize("size", ["31", "1025", "0", "-5", "big", "1.5"])
def test_size_out_of_bounds_is_422(url: str, rows: dict, size: str) -> None:
    r = httpx.get(f"{url}/thumbs/{rows[('img0.png', None)]['id']}", params={"size": size}, timeout=30)
    assert r.status_code == 422, r.text


def test_unknown_gone_and_broken_files_are_clear_4xx(url: str, rows: dict) -> None:
    assert httpx.get(f"{url}/thumbs/999999", timeout=30).status_code == 404
    assert httpx.get(f"{url}/thumbs/-1", timeout=30).status_code == 422
    gone = _get(url, rows[("gone.png", None)])
    assert gone.status_code == 404 and "missing" in gone.json()["detail"]
    broken = _get(url, rows[("broken.png", None)])
    assert broken.status_code == 422, broken.text
    assert broken.json()["detail"]["reason"] in {"undecodable", "truncated", "unreadable"}


def test_unwritable_cache_still_serves(tmp_path: Path, library: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "img0.png").write_bytes((library / "img0.png").read_bytes())
    index_dir = tmp_path / "index"
    build_index([str(one)], index_dir, FakeEncoder(), workers=0, progress=False)
    (index_dir / "thumbs").write_text("a file where the cache folder would be")
    with Index.open(index_dir) as idx:
        (image_id,) = idx.ids().tolist()
    with serve(_app(index_dir)) as base:
        assert _jpeg(_get(base, {"id": image_id})).size == (48, 40)


def test_same_access_rules_as_images(keyed_url: str, rows: dict) -> None:
    row = rows[("img0.png", None)]
    for path in (f"/thumbs/{row['id']}", f"/images/{row['id']}"):
        assert httpx.get(keyed_url + path, timeout=30).status_code == 401
        assert httpx.get(keyed_url + path, headers={"X-API-Key": "wrong"}, timeout=30).status_code == 401
        assert httpx.get(keyed_url + path, headers={"X-API-Key": KEY}, timeout=30).status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(keyed_url + path, headers=auth, timeout=30).status_code == 200
    for path in ("/", "/static/app.js"):  # the page itself is public: its data calls carry the key
        assert httpx.get(keyed_url + path, timeout=30).status_code == 200


def test_files_outside_the_roots_are_refused(tmp_path: Path, library: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in ("ok.png", "swapped.png"):
        (root / name).write_bytes((library / "img0.png").read_bytes())
    index_dir = tmp_path / "index"
    build_index([str(root)], index_dir, FakeEncoder(), workers=0, progress=False)
    outside = tmp_path / "outside.png"
    outside.write_bytes((library / "img0.png").read_bytes())
    (root / "swapped.png").unlink()
    (root / "swapped.png").symlink_to(outside)  # after indexing: a link out of the root
    with Index.open(index_dir) as idx:
        by_name = {os.path.basename(r["path"]): r["id"] for r in idx.get(idx.ids().tolist()) if r}
    with serve(_app(index_dir)) as base:
        for path in (f"/thumbs/{by_name['swapped.png']}", f"/images/{by_name['swapped.png']}"):
            r = httpx.get(base + path, timeout=30)
            assert r.status_code == 404 and "outside the indexed roots" in r.json()["detail"]
        assert httpx.get(f"{base}/thumbs/{by_name['ok.png']}", timeout=30).status_code == 200
