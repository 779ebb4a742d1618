"""Settings from IVL_* variables, the ``python -m api`` command line, per-app metrics registries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from api_helpers import free_port

from api.__main__ import main, parse_args, settings_from_args
from api.app import create_app
from api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("IVL_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.max_body_bytes == 20 * 1024 * 1024
    assert s.cors_origins == [] and s.api_key is None and s.batching is True


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IVL_INDEX", "/data/index")
    monkeypatch.setenv("IVL_MODEL", "demo")
    monkeypatch.setenv("IVL_CHAT_MODEL", "/models/chat")
    monkeypatch.setenv("IVL_API_KEY", "k")
    monkeypatch.setenv("IVL_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("IVL_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("IVL_BATCHING", "false")
    s = Settings()
    assert (s.index, s.model, s.chat_model) == ("/data/index", "demo", "/models/chat")
    assert s.api_key.get_secret_value() == "k"
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.max_body_bytes == 1000 and s.batching is False


def test_cli_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IVL_PORT", "9000")
    monkeypatch.setenv("IVL_MODEL", "env-model")
    args = parse_args(["--index", "/i", "--model", "m", "--api-key", "x", "--no-batching", "--device", "cpu"])
    s = settings_from_args(args)
    assert (s.index, s.model, s.port, s.device, s.batching) == ("/i", "m", 9000, "cpu", False)
    assert s.api_key.get_secret_value() == "x"


def test_invalid_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        Settings(max_body_bytes=0)


def test_two_apps_have_separate_metrics() -> None:
    a, b = create_app(Settings()), create_app(Settings())
    assert a.state.service.metrics.registry is not b.state.service.metrics.registry


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_python_m_api_serves_the_fixture_model(fake_index_dir: Path, dtype: str | None) -> None:
    """The real command line: binds 127.0.0.1, loads the fixture model, /health turns ready; ``--dtype bf16``
    is taken (the spelling ``load_encoder`` and ``build_index.py`` take) and runs on the CPU."""
    from index import Index

    model = ROOT / "tests" / "fixtures" / "internvl_cg_tiny"
    index_dir = fake_index_dir.parent / f"cli_index_{dtype}"
    Index.create(index_dir, 32, model="internvl_cg_tiny:internvl-c", mode="internvl-c").close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVL_")}
    cmd = [sys.executable, "-m", "api", "--index", str(index_dir), "--model", str(model), "--port", str(port)]
    if dtype is not None:
        cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert health["ready"] and health["index_size"] == 0 and health["models"]["embed_dim"] == 32
        assert health["dtype"] == ("bfloat16" if dtype else "float32") and health["device"] == "cpu"
        r = httpx.post(url + "/search", json={"text": "anything"})
        assert r.status_code == 200 and r.json()["results"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_requires_index_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("IVL_"):
            monkeypatch.delenv(key)
    with pytest.raises(SystemExit, match="--index DIR and --model PATH are required"):
        main([])
