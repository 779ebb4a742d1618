"""Videos in the index: video and segment rows, bad videos, resume, prune, and the schema-1 migration."""

from __future__ import annotations

import json
import os
import sqlite3
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import TEST_MAX_PIXELS, make_images

import index.builder as builder_module
from index import Index
from index.builder import SKIPPED_FILE, build_index
from index.store import SCHEMA_VERSION, MetaStore
from retrieval.video import embed_video

FPS = 12


def make_clip(
    path: Path, n: int, seed: int, *, codec: str = "libx264", size: tuple[int, int] = (64, 48)
) -> Path:
    """``n`` frames at ``FPS`` whose colour drifts (distinct per ``seed``), encoded with PyAV."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 6
        for i in range(n):
            blocks = np.clip(base + (i * 9) % 200 - 100, 0, 255).astype(np.uint8)
            img = np.kron(blocks, np.ones((size[1] // 4, size[0] // 4, 1), dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_bad_videos(folder: Path, good: Path) -> set[str]:
    """Broken video files; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "notes.mov").write_text("not a video at all\n")
    (folder / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    audio_only(folder / "voice.m4v")
    return {"zero.mp4", "notes.mov", "cut.mp4", "voice.m4v"}


def build(folders, index_dir, encoder, **kw):
    kw = {"workers": 0, "batch_size": 16, "max_pixels": TEST_MAX_PIXELS, "progress": False, **kw}
    return build_index([str(f) for f in folders], index_dir, encoder, **kw)


def rows_of(index_dir) -> list[dict]:
    with Index.open(index_dir) as idx:
        return [r for r in idx.get(idx.ids().tolist()) if r is not None]


@pytest.fixture
def library(tmp_path):
    """3 images, 2 good videos (3 s mp4, 2 s mkv) and 4 broken ones."""
    folder = tmp_path / "lib"
    make_images(folder / "photos", 3)
    long_clip = make_clip(folder / "clips" / "walk.mp4", 3 * FPS, seed=1)
    make_clip(folder / "clips" / "sub" / "cat.mkv", 2 * FPS, seed=2)
    bad = make_bad_videos(folder / "broken", long_clip)
    return folder, bad


def test_mixed_folder_with_segments(tmp_path, encoder, library):
    folder, bad = library
    index_dir = tmp_path / "index"
    report = build([folder], index_dir, encoder, video_segments=1.0)
    assert (report.scanned, report.added, report.skipped, report.videos, report.segments) == (9, 5, 4, 2, 5)
    assert report.indexed == 3 + 2 + 5
    summary = report.summary()
    assert summary["videos"] == 2 and summary["segments"] == 5 and summary["skipped"] == 4

    lines = (index_dir / SKIPPED_FILE).read_text().splitlines()[1:]
    reasons = {os.path.basename(line.split("\t")[0]): line.split("\t")[1] for line in lines}
    assert set(reasons) == bad
    assert reasons["zero.mp4"] == "empty" and reasons["voice.m4v"] == "no_video"
    assert all(reasons.values())

    rows = rows_of(index_dir)
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == ["image"] * 3 + ["segment"] * 5 + ["video"] * 2
    walk = str(folder / "clips" / "walk.mp4")
    segs = sorted((r["t_start"], r["t_end"]) for r in rows if r["path"] == walk and r["kind"] == "segment")
    assert segs == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    (video,) = [r for r in rows if r["path"] == walk and r["kind"] == "video"]
    assert (video["t_start"], video["t_end"], video["width"], video["height"]) == (0.0, 3.0, 64, 48)

    # the stored vectors are embed_video's (float16 storage)
    expected = embed_video(encoder, walk, segment_seconds=1.0, max_pixels=TEST_MAX_PIXELS)
    with Index.open(index_dir) as idx:
        by_kind = {
            (r["kind"], r["t_start"]): r["id"] for r in idx.get(idx.ids().tolist()) if r["path"] == walk
        }
        got = idx.get_vectors(
            [by_kind[("video", 0.0)], *(by_kind[("segment", s.t_start)] for s in expected.segments)]
        )
        assert np.allclose(got[0], expected.vector, atol=2e-3)
        assert np.allclose(got[1:], [s.vector for s in expected.segments], atol=2e-3)
        ids, _, _ = idx.search(expected.segments[1].vector[None], 1)
        assert ids[0][0] == by_kind[("segment", 1.0)]


def test_rerun_resettings_and_prune(tmp_path, encoder, library):
    folder, bad = library
    index_dir = tmp_path / "index"
    build([folder], index_dir, encoder)
    assert sorted(r["kind"] for r in rows_of(index_dir)) == ["image"] * 3 + ["video"] * 2

    again = build([folder], index_dir, encoder)  # nothing changed: nothing read, bad videos remembered
    assert (again.added, again.updated, again.encoded, again.unchanged, again.skipped) == (0, 0, 0, 5, 4)

    segmented = build([folder], index_dir, encoder, video_segments=1.0)  # new setting: videos re-embedded
    assert (segmented.updated, segmented.encoded, segmented.segments) == (2, 2, 5)
    assert len(rows_of(index_dir)) == 10

    clip = folder / "clips" / "walk.mp4"
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    touched = build([folder], index_dir, encoder, video_segments=1.0)
    assert (touched.encoded, touched.unchanged) == (0, 5)
    assert {r["mtime_ns"] for r in rows_of(index_dir) if r["path"] == str(clip)} == {clip.stat().st_mtime_ns}

    clip.unlink()
    kept = build([folder], index_dir, encoder, video_segments=1.0)  # without --prune rows stay
    assert kept.removed == 0 and len(rows_of(index_dir)) == 10
    pruned = build([folder], index_dir, encoder, video_segments=1.0, prune=True)
    assert pruned.removed == 4  # the video row and its 3 segments
    rows = rows_of(index_dir)
    assert len(rows) == 6 and all(r["path"] != str(clip) for r in rows)


def test_too_long_and_too_large_videos_are_skipped(tmp_path, encoder, library):
    folder, _ = library
    index_dir = tmp_path / "index"
    report = build([folder / "clips"], index_dir, encoder, max_video_seconds=2.5)
    reasons = {os.path.basename(p): r for p, r, _ in report.skipped_files}
    assert reasons == {"walk.mp4": "too_long"} and report.videos == 1
    small = build([folder / "clips"], tmp_path / "other", encoder, max_video_bytes=10)
    assert {r for _, r, _ in small.skipped_files} == {"too_large"} and small.indexed == 0


def test_interrupted_mid_videos_resumes(tmp_path, encoder, library, monkeypatch):
    folder, _ = library
    index_dir = tmp_path / "index"
    calls = 0
    original = builder_module.embed_video

    def interrupting(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(builder_module, "embed_video", interrupting)
    with pytest.raises(KeyboardInterrupt):
        build([folder / "clips"], index_dir, encoder, video_segments=1.0, commit_every=1)
    first = rows_of(index_dir)
    assert sorted(r["kind"] for r in first) == ["segment"] * 3 + ["video"]  # walk.mp4 (walked first), whole
    monkeypatch.setattr(builder_module, "embed_video", original)
    rest = build([folder / "clips"], index_dir, encoder, video_segments=1.0)
    assert (rest.added, rest.unchanged, rest.indexed) == (1, 1, 7)
    assert len({(r["path"], r["kind"], r["t_start"]) for r in rows_of(index_dir)}) == 7


def _downgrade_to_schema_1(db: Path) -> None:
    """Rewrite ``meta.sqlite`` as the code before segment rows wrote it."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DROP INDEX images_live_part")
        conn.execute("ALTER TABLE images DROP COLUMN part")
        conn.execute(
            "CREATE UNIQUE INDEX images_live_path ON images(root, relpath) WHERE gen_removed IS NULL"
        )
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
    conn.close()


def test_schema_1_index_opens_and_is_migrated_by_the_writer(tmp_path, encoder, library):
    folder, _ = library
    index_dir = tmp_path / "index"
    build([folder], index_dir, encoder, videos=False)
    before = rows_of(index_dir)
    _downgrade_to_schema_1(index_dir / "meta.sqlite")
    store = MetaStore(index_dir / "meta.sqlite")
    assert store.schema_version() == 1
    store.close()

    assert rows_of(index_dir) == before  # readers need no migration
    report = build([folder], index_dir, encoder, video_segments=1.0)
    assert (report.added, report.unchanged, report.videos) == (2, 3, 2)
    store = MetaStore(index_dir / "meta.sqlite")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() is False
    store.close()
    rows = rows_of(index_dir)
    assert [r for r in rows if r["kind"] == "image"] == before and len(rows) == 10


def test_newer_schema_is_refused(tmp_path, encoder, library):
    folder, _ = library
    index_dir = tmp_path / "index"
    build([folder / "photos"], index_dir, encoder)
    conn = sqlite3.connect(index_dir / "meta.sqlite")
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    from index import IndexFormatError

    with pytest.raises(IndexFormatError, match="schema 99"):
        build([folder / "photos"], index_dir, encoder)


def test_cli_video_segments(tmp_path, encoder, library, capsys):
    from test_index_cli import cli_args, load_script

    folder, _ = library
    script = load_script()
    assert script.DEFAULT_MAX_VIDEO_SECONDS == builder_module.DEFAULT_MAX_VIDEO_SECONDS
    assert script.DEFAULT_MAX_VIDEO_BYTES == builder_module.DEFAULT_MAX_VIDEO_BYTES
    index_dir = tmp_path / "index"
    argv = cli_args(folder / "clips", index_dir, "--video-segments", "1", "--no-progress", "--workers", "0")
    assert script.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["videos"], summary["segments"], summary["added"]) == (2, 5, 2)
    with pytest.raises(SystemExit):
        script.parse_args(cli_args(folder, index_dir, "--video-segments", "0"))
    assert script.main(cli_args(folder / "clips", tmp_path / "imgs", "--no-videos", "--no-progress")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scanned"] == 0


def _shape_frame(shape: str, colour: tuple[int, int, int], i: int, size: int = 96) -> np.ndarray:
    """A filled circle or square moving slowly on a light grey background."""
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = size / 2 + (i % 6) - 3, size / 2, size * 0.3
    mask = (
        (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        if shape == "circle"
        else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    )
    img = np.full((size, size, 3), 235, np.uint8)
    img[mask] = colour
    return img


def test_text_search_finds_the_video_moment(tmp_path):
    """With the bundled demo model, "a red circle" finds the segment where the red circle is shown."""
    from retrieval import load_encoder
    from retrieval.loader import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    encoder = load_encoder("demo", device="cpu")
    folder = tmp_path / "clips"
    folder.mkdir()
    scenes = [("square", (30, 60, 220)), ("circle", (220, 30, 30)), ("square", (40, 180, 60))]
    with av.open(str(folder / "scenes.mp4"), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width = stream.height = 96
        stream.pix_fmt = "yuv420p"
        for shape, colour in scenes:
            for i in range(FPS):
                frame = av.VideoFrame.from_ndarray(_shape_frame(shape, colour, i), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    make_clip(folder / "other.mp4", 2 * FPS, seed=5)
    report = build([folder], tmp_path / "index", encoder, video_segments=1.0)
    assert (report.videos, report.segments) == (2, 5)
    with Index.open(tmp_path / "index") as idx:
        for text, start in (("a red circle", 1.0), ("a blue square", 0.0), ("a green square", 2.0)):
            _, _, results = idx.search(encoder.encode_texts([text]), 10)
            segments = [r for r in results[0] if r["kind"] == "segment"]
            top = segments[0]
            assert (os.path.basename(top["path"]), top["t_start"]) == ("scenes.mp4", start), text


def _video_rows(index_dir) -> list[tuple[str, str, float, float]]:
    """``(path, kind, t_start, t_end)`` of every row, sorted (duplicates kept)."""
    try:
        rows = rows_of(index_dir)
    except Exception:  # noqa: BLE001 - not created yet / mid-creation
        return []
    return sorted((r["path"], r["kind"], r["t_start"], r["t_end"]) for r in rows)


def test_sigkill_mid_video_then_rerun_gives_the_clean_set(tmp_path, encoder):
    """The real CLI, SIGKILLed while it embeds a video, then re-run: exactly a clean run's rows."""
    import signal
    import subprocess
    import sys
    import time

    from test_index_cli import SCRIPT, cli_args

    folder = tmp_path / "clips"
    n_videos, seconds = 5, 12
    for i in range(n_videos):  # 8 + 12 * 8 frames each, one per forward pass (--batch-size 1): slow
        make_clip(folder / f"v{i}.mp4", seconds * FPS, seed=10 + i, size=(160, 120))
    index_dir, clean_dir = tmp_path / "index", tmp_path / "clean"
    args = cli_args(folder, index_dir, "--video-segments", "1", "--batch-size", "1", "--commit-every", "1",
                    "--no-progress", "--workers", "0")  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    partial: list = []
    while proc.poll() is None and time.monotonic() < deadline:
        partial = _video_rows(index_dir)
        if any(kind == "video" for _, kind, _, _ in partial):
            break  # the first video is committed: the next one is being read and embedded now
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.1)  # well inside the next video's embedding
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _video_rows(index_dir)
    done = {p for p, kind, _, _ in partial if kind == "video"}
    assert 1 <= len(done) < n_videos
    # only whole videos were committed: each has its video row and all its segments, nothing else
    assert len(partial) == len(done) * (1 + seconds) and {p for p, *_ in partial} == done

    rerun = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["added"], summary["unchanged"]) == (n_videos - len(done), len(done))
    assert summary["videos"] == n_videos - len(done)

    build([folder], clean_dir, encoder, video_segments=1.0)
    final, clean = _video_rows(index_dir), _video_rows(clean_dir)
    assert final == clean and len(final) == len(set(final)) == n_videos * (1 + seconds)
    with Index.open(index_dir) as resumed, Index.open(clean_dir) as fresh:
        key = lambda r: (r["path"], r["kind"], r["t_start"])  # noqa: E731
        a = sorted(resumed.get(resumed.ids().tolist()), key=key)
        b = sorted(fresh.get(fresh.ids().tolist()), key=key)
        va = resumed.get_vectors([r["id"] for r in a])
        vb = fresh.get_vectors([r["id"] for r in b])
        assert np.allclose(va, vb, atol=2e-3)  # the same embeddings, whichever run wrote them
