"""CI-sized run of the schema-driven API fuzz (`bench/fuzz_api.py`): a few hundred generated requests over every
route with valid, wrong and missing keys of two tenants: no answer >= 500, the server healthy afterwards, and no
tenant shown another's subject or job."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("litserve")
pytest.importorskip("hypothesis")

from .serve_helpers import served  # noqa: E402

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("fuzz_api", Path(__file__).parents[1] / "bench" / "fuzz_api.py")
fuzz_api = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz_api)


def test_generated_requests_never_get_a_5xx_nor_another_tenants_data(tmp_path):
    with served(tmp_path, fuzz_api.SUBJECTS, place_rate=1000.0, place_burst=1000, max_jobs_per_tenant=2) as env:
        client = env["client"]
        ctx = fuzz_api.context(env["keys"], env["scene"])
        schema = client.get("/openapi.json", headers={"X-API-Key": env["keys"]["acme"]}).json()
        routes = {"/v1/place", "/v1/subjects", "/v1/subjects/{ref}", "/v1/jobs/{job_id}", "/metrics"}
        assert routes <= set(schema["paths"])
        result = fuzz_api.fuzz(client, schema, ctx, 400, seed_value=0)
        assert sum(result["statuses"].values()) > 300
        assert result["server_errors"] == []
        assert {200, 401, 404, 422} <= set(result["statuses"])  # it reached the handlers, not only the key check
        assert result["leaks"] + fuzz_api.check_isolation(client, ctx) == []
        assert client.get("/health").status_code == 200
