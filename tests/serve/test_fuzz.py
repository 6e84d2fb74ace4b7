"""Fuzz ``leaplm serve`` with schemathesis against its own OpenAPI schema (``/openapi.json``): a bounded number of
generated requests per route, valid and invalid, must never get a 5xx, and the server must stay healthy.

The server runs with a 96-token context and ``--default-max-tokens 4`` so that a generated request asking for many
tokens (or many choices) still finishes in a second or so.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from .conftest import ServerProcess  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def fuzz_server(smollm_gguf):
    s = ServerProcess(smollm_gguf, "--max-model-len", "96", "--default-max-tokens", "4", "--max-num-seqs", "8",
                      "--max-body-size", "64KiB").wait_ready()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


def test_no_request_makes_a_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        calls = []

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            response = case.call(timeout=120)
            calls.append(response.status_code)
            assert response.status_code < 500, (f"{case.method} {case.path} -> {response.status_code}: "
                                                f"{response.text[:500]}\nbody: {str(case.body)[:500]}")

        run()
        tried.append((operation.method.upper(), operation.path, len(calls), sum(c < 300 for c in calls)))
        assert fuzz_server.healthy(), f"server down after fuzzing {operation.path}"
    routes = {(m, p) for m, p, _, _ in tried}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")} <= routes, tried
