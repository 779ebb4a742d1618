"""Property-based fuzz of the OpenAPI schema (schemathesis): no 5xx, responses match the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from api_helpers import FakeEncoder, serve
from hypothesis import HealthCheck, settings
from schemathesis import checks

from api.app import create_app
from api.settings import Settings

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzz_url(fake_index_dir: Path, fake_encoder: FakeEncoder):
    app_settings = Settings(index=str(fake_index_dir), max_pixels=1_000_000, reload_interval_s=0)
    with serve(create_app(app_settings, encoder=fake_encoder)) as base:
        yield base


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str):
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case) -> None:  # noqa: ANN001
    case.call_and_validate(checks=CHECKS)
