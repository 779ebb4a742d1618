"""scripts/build_index.py: the real CLI in a subprocess (SIGKILL midway, re-run) and its exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TEST_MAX_PIXELS, TINY_MODEL, make_bad_files, make_images

from index import Index

SCRIPT = ROOT / "scripts" / "build_index.py"


def load_script():
    spec = importlib.util.spec_from_file_location("build_index_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_args(photos, index_dir, *extra: str) -> list[str]:
    return [str(photos), "--index", str(index_dir), "--model", str(TINY_MODEL), "--device", "cpu",
            "--workers", "2", "--max-pixels", str(TEST_MAX_PIXELS), *extra]  # fmt: skip


def generation(index_dir) -> int:
    try:
        return json.loads((index_dir / "manifest.json").read_text())["generation"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_sigkill_midway_then_rerun_gives_exact_set(tmp_path, script, capsys, encoder):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    images = make_images(photos, 80)
    make_bad_files(photos / "broken")
    args = cli_args(photos, index_dir, "--batch-size", "4", "--commit-every", "8")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--throttle", "0.15"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while generation(index_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the throttled run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert generation(index_dir) >= 3
    partial = Index.open(index_dir)
    assert 0 < len(partial) < 80
    partial.close()

    assert script.main(args) == 0  # the re-run (in-process: the model is already loaded)
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) >= {"scanned", "added", "updated", "removed", "skipped", "seconds", "images_per_s"}
    assert summary["scanned"] == 90 and summary["skipped"] == 10 and summary["updated"] == 0
    assert 0 < summary["added"] < 80 and summary["added"] + summary["unchanged"] == 80
    idx = Index.open(index_dir)
    paths = [r["path"] for r in idx.get(idx.ids().tolist())]
    assert len(idx) == 80 and sorted(paths) == sorted(str(p) for p in images)  # exactly once each
    assert "img/s" in err  # tqdm progress bar


def test_exit_codes_and_summary_line(tmp_path, script, capsys, encoder):
    photos = tmp_path / "photos"
    make_images(photos, 6)
    assert script.main(cli_args(photos, tmp_path / "index", "--no-progress")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["added"] == 6
    # unknown model
    assert (
        script.main(
            cli_args(photos, tmp_path / "i2", "--no-progress")[:3]
            + ["--model", str(tmp_path / "no-such-model")]
        )
        == 3
    )
    assert "cannot load model" in capsys.readouterr().err
    # index made by another model
    Index.create(tmp_path / "other", 32, model="another-model").close()
    assert script.main(cli_args(photos, tmp_path / "other", "--no-progress")) == 3
    assert "another-model" in capsys.readouterr().err
    # missing folder, unwritable index location
    assert script.main(cli_args(tmp_path / "missing", tmp_path / "i3", "--no-progress")) == 4
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert script.main(cli_args(photos, blocker / "index", "--no-progress")) == 4
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(cli_args(photos, tmp_path / "i4", "--batch-size", "0"))
