"""Ray engine faults (issue 15, acceptance 2): an encoder actor killed, a node removed, the driver killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray engine needs the [distributed] extra")
from conftest import ROOT, TEST_MAX_PIXELS, TINY_MODEL, make_images  # noqa: E402

from index import Index  # noqa: E402
from index.ray_engine import build_index_ray, shard_folder  # noqa: E402
from index.shards import ShardDir  # noqa: E402

SPEC = {"model": str(TINY_MODEL), "mode": None, "device": "cpu", "dtype": None}


def actor_pids() -> list[int]:
    """Processes of live ShardEmbedder actors (titled ``ray::MapWorker(MapBatches(ShardEmbedder))``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ShardEmbedder" in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def wait_for(cond, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def assert_exactly_once(index_dir: Path, n: int) -> None:
    with Index.open(index_dir) as index:
        rows = index.get(index.ids())
        paths = [r["path"] for r in rows]
        assert len(paths) == n == len(set(paths)) == len(index)
        assert index.get_vectors(index.ids()).shape == (n, index.dim)


def test_encoder_actor_killed_mid_run(tmp_path, encoder, ray_session):
    make_images(tmp_path / "imgs", 480)
    result: dict = {}

    def run() -> None:
        result["report"] = build_index_ray(
            [tmp_path / "imgs"], tmp_path / "idx", encoder, SPEC, shard_size=80, batch_size=8,
            max_pixels=TEST_MAX_PIXELS, progress=False, throttle=0.15, seed=0,
        )  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    work = ShardDir(shard_folder(tmp_path / "idx"))
    wait_for(lambda: len(work.merged()) >= 1 and actor_pids())
    victims = actor_pids()
    assert len(work.complete()) < 6, "the run finished before the kill"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    report = result["report"]
    assert report.added == 480 and report.encoded == 480 and report.skipped == 0
    assert_exactly_once(tmp_path / "idx", 480)
    assert work.merged() == work.complete() and len(work.complete()) == 6


def test_driver_killed_then_rerun_does_only_missing_shards(tmp_path, ray_session):
    make_images(tmp_path / "imgs", 480)
    cmd = [
        sys.executable, str(ROOT / "scripts" / "build_index.py"), str(tmp_path / "imgs"), "--index",
        str(tmp_path / "idx"), "--model", str(TINY_MODEL), "--device", "cpu", "--engine", "ray",
        "--ray-address", ray_session.get_runtime_context().gcs_address, "--shard-size", "80",
        "--batch-size", "8", "--no-progress",
    ]  # fmt: skip
    work = ShardDir(shard_folder(tmp_path / "idx"))
    driver = subprocess.Popen([*cmd, "--throttle", "0.15"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(work.merged()) >= 2, timeout=180)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate()
    wait_for(lambda: not actor_pids(), timeout=60)  # Ray ends the dead driver's actors
    done = sorted(work.complete())
    assert 2 <= len(done) < 6
    kept = {s: work.metadata_path(s).stat().st_mtime_ns for s in done}
    rows_done = sum(len(work.read_shard(s)[1]) for s in done)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["encoded"] == 480 - rows_done  # only the unfinished shards were computed again
    assert summary["indexed"] == 480
    assert {s: work.metadata_path(s).stat().st_mtime_ns for s in done} == kept
    assert min(work.complete() - set(done)) > max(done)  # new shards, never an old number reused
    assert_exactly_once(tmp_path / "idx", 480)
    assert not list(work.dir.rglob("*.tmp"))


JOB = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, {tests!r})
    from test_index_ray_faults import actor_pids, wait_for
    from index import Index
    from index.ray_engine import build_index_ray, shard_folder
    from index.shards import ShardDir
    from retrieval import load_encoder

    store = 90 << 20
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0, "object_store_memory": store}})
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=store) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    tmp = Path({tmp!r})
    spec = {{"model": {model!r}, "mode": None, "device": "cpu", "dtype": None}}
    encoder = load_encoder(spec["model"], device="cpu")
    result = {{}}
    def run():
        result["report"] = build_index_ray([tmp / "imgs"], tmp / "idx", encoder, spec, shard_size=80,
            batch_size=8, progress=False, throttle=0.15, seed=0)
    thread = threading.Thread(target=run)
    thread.start()
    work = ShardDir(shard_folder(tmp / "idx"))
    wait_for(lambda: len(work.merged()) >= 1 and actor_pids())
    pid = actor_pids()[0]
    raylets = {{n.all_processes["raylet"][0].process.pid: n for n in nodes}}
    while pid not in raylets and pid > 1:
        pid = int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[1])
    victim = raylets[pid]
    before = len(work.complete())
    cluster.remove_node(victim)
    thread.join(timeout=300)
    with Index.open(tmp / "idx") as index:
        paths = [r["path"] for r in index.get(index.ids())]
    print(json.dumps({{"before": before, "rows": len(paths), "unique": len(set(paths)),
        "added": result["report"].added, "complete": len(work.complete())}}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_node_removed_mid_run(tmp_path):
    make_images(tmp_path / "imgs", 480)
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), model=str(TINY_MODEL)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"before"')]  # Ray logs there too
    result = json.loads(lines[-1])
    assert result["before"] < 6  # the node went away mid-run
    assert result["rows"] == result["unique"] == result["added"] == 480
    assert result["complete"] == 6
