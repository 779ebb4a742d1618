"""Index hot reload: automatic on manifest change, POST /admin/reload, old index kept on failure."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
from api_helpers import FakeEncoder, make_images, serve

from api.app import create_app
from api.index_holder import IndexHolder
from api.settings import Settings
from index import Index
from retrieval.images import open_image


def _wait_for_size(url: str, size: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = httpx.get(url + "/health").json()["index_size"]
        if got == size or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_reload_automatic_and_admin(tmp_path: Path, fake_encoder: FakeEncoder) -> None:
    paths = make_images(tmp_path / "imgs", n=5)
    index_dir = tmp_path / "index"
    index = Index.create(index_dir, fake_encoder.embed_dim, model=fake_encoder.name, mode=fake_encoder.mode)
    index.add(
        fake_encoder.encode_images([open_image(p) for p in paths[:3]]), [{"path": str(p)} for p in paths[:3]]
    )
    index.save()
    settings = Settings(index=str(index_dir), reload_interval_s=0.1)
    with serve(create_app(settings, encoder=fake_encoder)) as url:
        assert httpx.get(url + "/health").json()["index_size"] == 3
        index.add(
            fake_encoder.encode_images([open_image(p) for p in paths[3:]]),
            [{"path": str(p)} for p in paths[3:]],
        )
        index.save()  # what build_index.py does: the manifest changes -> automatic reload
        assert _wait_for_size(url, 5) == 5
        r = httpx.post(url + "/search", json={"text": "x", "k": 10})
        assert len(r.json()["results"]) == 5

        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 200 and r.json() == {
            "reloaded": True,
            "index_size": 5,
            "index_dir": str(index_dir),
        }

        (index_dir / "manifest.json").write_text("{ half written")
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 503 and "previous index" in r.json()["detail"]
        time.sleep(0.3)  # the watcher sees the broken manifest too and must keep the old index
        assert httpx.get(url + "/health").json()["index_size"] == 5
        assert len(httpx.post(url + "/search", json={"text": "x", "k": 10}).json()["results"]) == 5
        metrics = httpx.get(url + "/metrics").text
        assert 'ivl_index_reloads_total{result="error"}' in metrics
        assert 'ivl_index_reloads_total{result="ok"} 2.0' in metrics  # the automatic one and the admin one
    index.close()


class _SlowIndex:
    def __init__(self, name: str, gate: threading.Event | None = None) -> None:
        self.name, self.gate = name, gate

    def __len__(self) -> int:
        return 1

    def search(self) -> str:
        if self.gate is not None:
            self.gate.wait(5)
        return self.name


def test_in_flight_search_finishes_on_the_old_index(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    gate = threading.Event()
    versions = iter([_SlowIndex("old", gate), _SlowIndex("new")])

    async def scenario() -> tuple[str, str]:
        holder = IndexHolder(tmp_path, lambda _: next(versions))
        holder.executor.shutdown()
        from concurrent.futures import ThreadPoolExecutor

        holder.executor = ThreadPoolExecutor(4)  # let the reload run while the slow search is in flight
        await holder.load()
        pinned = holder.current  # what a request does first
        in_flight = asyncio.get_running_loop().run_in_executor(None, pinned.search)
        await asyncio.sleep(0.05)
        (tmp_path / "manifest.json").write_text('{"generation": 2}')
        assert await holder.reload(force=False) is True
        gate.set()
        old_result = await in_flight
        holder.close()
        return old_result, holder.current.search()

    assert asyncio.run(scenario()) == ("old", "new")


def test_searches_during_repeated_rebuilds_never_fail(tmp_path: Path, fake_encoder: FakeEncoder) -> None:
    """Hammer /search while the index is saved again and again: every answer is a complete generation."""
    paths = make_images(tmp_path / "imgs", n=8)
    vecs = fake_encoder.encode_images([open_image(p) for p in paths])
    index = Index.create(
        tmp_path / "index", fake_encoder.embed_dim, model=fake_encoder.name, mode=fake_encoder.mode
    )
    index.add(vecs[:2], [{"path": str(p)} for p in paths[:2]])
    index.save()
    sizes_seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()
    with serve(
        create_app(Settings(index=str(tmp_path / "index"), reload_interval_s=0.05), encoder=fake_encoder)
    ) as url:

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    r = client.post("/search", json={"image_id": 0, "k": 100})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        sizes_seen.append(len(r.json()["results"]))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(2, 8):
            index.add(vecs[i : i + 1], [{"path": str(paths[i])}])
            index.save()
            time.sleep(0.15)
        assert _wait_for_size(url, 8) == 8
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
    index.close()
    assert not failures
    assert set(sizes_seen) <= set(range(2, 9)) and 8 in sizes_seen and len(sizes_seen) > 10


def test_reload_refuses_an_index_of_another_width(tmp_path: Path, fake_encoder: FakeEncoder) -> None:
    paths = make_images(tmp_path / "imgs", n=2)
    index_dir = tmp_path / "index"
    index = Index.create(index_dir, fake_encoder.embed_dim, model=fake_encoder.name, mode=fake_encoder.mode)
    index.add(fake_encoder.encode_images([open_image(p) for p in paths]), [{"path": str(p)} for p in paths])
    index.save()
    index.close()
    with serve(create_app(Settings(index=str(index_dir), reload_interval_s=0), encoder=fake_encoder)) as url:
        other = tmp_path / "other"
        Index.create(other, 16, model="other-model", mode="internvl-c").close()
        (index_dir / "manifest.json").rename(tmp_path / "manifest.bak")
        (other / "manifest.json").rename(index_dir / "manifest.json")  # simulate a rebuild with another model
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 503 and "dim 16" in r.json()["detail"]
        assert httpx.get(url + "/health").json()["index_size"] == 2
        assert httpx.post(url + "/search", json={"text": "x"}).status_code == 200
