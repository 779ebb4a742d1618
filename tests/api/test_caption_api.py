"""``POST /caption`` with the InternVL cg_tiny fixture model: the captions of the reference
(``captions.json``) from base64, multipart and indexed images; video rows by their middle frame; seeded
sampling; bounds and errors (OpenCLIP-like encoders without a decoder answer 400)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from api_helpers import FakeEncoder, b64
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.settings import Settings
from index import Index

CG_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_cg_tiny"
CASES = json.loads((CG_FIXTURE / "captions.json").read_text(encoding="utf-8"))["cases"]
MANIFEST = json.loads((CG_FIXTURE / "manifest.json").read_text(encoding="utf-8"))
IMAGE_FILES = [CG_FIXTURE / "images" / name for name in MANIFEST["images"]]
FPS = 10


def _knobs(case: dict) -> dict:
    """The request fields of a reference case (``min_new_tokens`` 0 where the reference left the default)."""
    kwargs = {"min_new_tokens": 0, **case["generate_kwargs"]}
    knobs = {k: kwargs[k] for k in ("num_beams", "min_new_tokens", "max_new_tokens")}
    return {"prompt": case["prompt"], **knobs}


@pytest.fixture(scope="module")
def client(real_index_dir: Path, real_encoder) -> Iterator[TestClient]:  # noqa: ANN001
    settings = Settings(index=str(real_index_dir), max_pixels=1_000_000, reload_interval_s=0)
    with TestClient(create_app(settings, encoder=real_encoder)) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}-{c['setting']}" for i, c in enumerate(CASES)])
def test_caption_equals_reference(client: TestClient, case: dict) -> None:
    if case["generate_kwargs"].get("length_penalty", 1.0) != 1.0:
        pytest.skip("length_penalty is not an API knob")
    for path, text in zip(IMAGE_FILES, case["texts"], strict=True):
        r = client.post("/caption", json={"image": b64(path.read_bytes()), **_knobs(case)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["caption"] == text
        assert body["prompt"] == case["prompt"] and body["image_id"] is None and body["took_ms"] >= 0


def test_multipart_upload(client: TestClient) -> None:
    case = CASES[0]
    path = IMAGE_FILES[1]
    form = {k: str(v) for k, v in _knobs(case).items()}
    r = client.post("/caption", files={"image": (path.name, path.read_bytes(), "image/png")}, data=form)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == case["texts"][1]
    r = client.post("/caption", data=form)  # no image part
    assert r.status_code == 422


def test_indexed_image(client: TestClient, real_index_dir: Path) -> None:
    case = CASES[0]
    with Index.open(real_index_dir) as idx:
        rows = {Path(r["path"]).name: r["id"] for r in idx.get(idx.ids().tolist()) if r is not None}
    for path, text in zip(IMAGE_FILES, case["texts"], strict=True):
        r = client.post("/caption", json={"image_id": rows[path.name], **_knobs(case)})
        assert r.status_code == 200, r.text
        assert r.json() | {"took_ms": 0} == {
            "caption": text, "prompt": case["prompt"], "image_id": rows[path.name], "took_ms": 0,
        }  # fmt: skip
    assert client.post("/caption", json={"image_id": 10**9}).status_code == 404


def test_seeded_sampling(client: TestClient) -> None:
    image = b64(IMAGE_FILES[0].read_bytes())
    body = {"image": image, "num_beams": 1, "do_sample": True, "temperature": 0.8, "top_p": 0.9,
            "max_new_tokens": 10}  # fmt: skip
    first = client.post("/caption", json={**body, "seed": 7}).json()["caption"]
    assert client.post("/caption", json={**body, "seed": 7}).json()["caption"] == first
    others = {client.post("/caption", json={**body, "seed": s}).json()["caption"] for s in (1, 2, 3)}
    assert others - {first}  # other seeds sample other captions
    # extremes of the knobs answer 200 (no NaN from a degenerate distribution)
    for extreme in ({"temperature": 0.01, "top_p": 1e-9, "top_k": 1}, {"temperature": 2.0, "top_k": 0}):
        r = client.post("/caption", json={**body, **extreme, "num_beams": 3, "seed": 0})
        assert r.status_code == 200, r.text


def test_min_new_tokens_above_max_is_capped(client: TestClient) -> None:
    body = {"image": b64(IMAGE_FILES[0].read_bytes()), "min_new_tokens": 40, "max_new_tokens": 3}
    r = client.post("/caption", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"image": "AAAA", "image_id": 0},
        {"image": "not base64!"},
        {"image": b64(b"not an image")},
        {"image_id": 0, "num_beams": 0},
        {"image_id": 0, "num_beams": 9},
        {"image_id": 0, "max_new_tokens": 0},
        {"image_id": 0, "max_new_tokens": 129},
        {"image_id": 0, "temperature": 0},
        {"image_id": 0, "top_p": 0},
        {"image_id": 0, "seed": -1},
        {"image_id": 0, "do_sample": "yes"},
        {"image_id": 0, "prompt": "x" * 1001},
        {"image_id": 0, "beams": 2},
    ],
)
def test_bad_requests(client: TestClient, body: dict) -> None:
    r = client.post("/caption", json=body)
    assert r.status_code == 422, r.text


def test_openapi_documents_caption(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    content = doc["paths"]["/caption"]["post"]["requestBody"]["content"]
    schema = content["application/json"]["schema"]
    assert [b["required"] for b in schema["oneOf"]] == [["image"], ["image_id"]]
    assert schema["properties"]["image"]["anyOf"][0]["format"] == "byte"
    assert schema["properties"]["num_beams"]["maximum"] == 8
    multipart = content["multipart/form-data"]["schema"]
    assert multipart["required"] == ["image"] and multipart["properties"]["image"]["format"] == "binary"
    assert multipart["properties"]["seed"]["type"] == "integer"


def test_encoder_without_decoder_answers_400() -> None:
    with TestClient(create_app(Settings(), encoder=FakeEncoder())) as c:
        r = c.post("/caption", json={"image": b64(IMAGE_FILES[0].read_bytes())})
    assert r.status_code == 400
    assert "cannot caption" in r.json()["detail"]


def test_no_index_for_image_id(real_encoder) -> None:  # noqa: ANN001
    with TestClient(create_app(Settings(), encoder=real_encoder)) as c:
        assert c.post("/caption", json={"image_id": 0}).status_code == 503
        assert c.post("/caption", json={"image": b64(IMAGE_FILES[0].read_bytes())}).status_code == 200


def test_api_key_required(real_encoder) -> None:  # noqa: ANN001
    with TestClient(create_app(Settings(api_key="k3y"), encoder=real_encoder)) as c:
        body = {"image": b64(IMAGE_FILES[0].read_bytes()), "max_new_tokens": 2}
        assert c.post("/caption", json=body).status_code == 401
        assert c.post("/caption", json=body, headers={"Authorization": "Bearer k3y"}).status_code == 200


# ------------------------------------------------------------------------------------------ videos
def _clip(path: Path, n: int) -> list[np.ndarray]:
    """An H.264 clip of ``n`` frames whose colours change every frame; returns the decoded frames."""
    rng = np.random.default_rng(4)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            blocks = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8) // (1 + i % 3)
            img = np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_video_rows_use_their_middle_frame(tmp_path: Path, real_encoder) -> None:  # noqa: ANN001
    from index.builder import build_index

    library = tmp_path / "library"
    library.mkdir()
    frames = _clip(library / "clip.mp4", 3 * FPS)
    index_dir = tmp_path / "index"
    build_index([str(library)], index_dir, real_encoder, workers=0, progress=False, video_segments=1.0)
    with Index.open(index_dir) as idx:
        rows = [r for r in idx.get(idx.ids().tolist()) if r is not None]
    knobs = {"num_beams": 1, "min_new_tokens": 0, "max_new_tokens": 8}
    settings = Settings(index=str(index_dir), reload_interval_s=0)
    with TestClient(create_app(settings, encoder=real_encoder)) as c:
        for row in rows:
            if row["kind"] == "video":
                middle = int((len(frames) - 1) / 2)  # the model cards' get_index with one segment
            else:
                start, end = round(row["t_start"] * FPS), min(round(row["t_end"] * FPS), len(frames) - 1)
                middle = int(start + (end - start) / 2)
            want = real_encoder.caption([Image.fromarray(frames[middle])], **knobs)[0]
            r = c.post("/caption", json={"image_id": row["id"], **knobs})
            assert r.status_code == 200, r.text
            assert r.json()["caption"] == want, row
    assert sorted(r["kind"] for r in rows) == ["segment"] * 3 + ["video"]


def test_demo_model_captions_without_crashing() -> None:
    """The demo's query branch is untrained (8 query tokens): noise, but every knob answers 200."""
    from retrieval import load_encoder
    from retrieval.loader import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    encoder = load_encoder("demo", device="cpu")
    image = b64(IMAGE_FILES[0].read_bytes())
    with TestClient(create_app(Settings(), encoder=encoder)) as c:
        for knobs in (
            {},
            {"num_beams": 1, "prompt": ""},
            {"num_beams": 2, "do_sample": True, "temperature": 0.01, "top_p": 1e-9, "seed": 1},
            {"num_beams": 1, "do_sample": True, "temperature": 2.0, "top_k": 0, "max_new_tokens": 128},
        ):
            r = c.post("/caption", json={"image": image, **knobs})
            assert r.status_code == 200, (knobs, r.text)
            assert isinstance(r.json()["caption"], str)
