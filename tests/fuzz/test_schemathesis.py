"""Schemathesis against the server's own /openapi.json: requests generated from the published
request schemas (valid ones and, in its negative mode, ones that break them), sent to a real
`pagedllm serve`. Pass: no 5xx, then /health 200 and nothing left running.

Runs in `make test-fuzz` (which installs schemathesis); skipped where it is not installed.

    PAGEDLLM_SCHEMATHESIS_EXAMPLES=100 pytest tests/fuzz/test_schemathesis.py
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.entrypoints.test_openai_server import API_KEY, serving, wait_idle  # noqa: E402

EXAMPLES = int(os.environ.get("PAGEDLLM_SCHEMATHESIS_EXAMPLES", "60"))
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # A short context keeps generated max_tokens (up to the context) cheap on the tiny model.
    yield from serving("--model", tiny_llama_dir, "--max-model-len", "128",
                       "--cpu-kv-cache-gib", "0.05", "--swap-space", "0.05",
                       "--max-request-body-bytes", "1000000")


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=HEADERS)
    operations = {op.ok().path for op in schema.get_all_operations()}
    # The request bodies are published: the generator has something to fuzz.
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= operations
    return schema


# NOTE: schemathesis' pytest plugin (from_fixture/parametrize) fails under pytest 9; each
# operation's hypothesis strategy is driven directly instead.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_get_no_5xx(api_schema, mode):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    failures, calls = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(schemathesis.GenerationMode(mode))

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            calls.append(case.operation.label)
            try:
                case.call_and_validate(headers=HEADERS, checks=[not_a_server_error],
                                       timeout=60)
            except Exception as exc:  # collect every operation's first failure
                failures.append((case.operation.label, repr(exc)[:500]))
                raise

        try:
            check()
        except Unsatisfiable:
            assert mode == "negative"  # an operation without inputs cannot break its schema
        except Exception as exc:
            if not failures or failures[-1][0] != operation.label:
                failures.append((operation.label, repr(exc)[:500]))
    assert not failures, failures
    # Every operation was exercised (negative cases need inputs to break: bodies only).
    labels = {r.ok().label for r in api_schema.get_all_operations()}
    if mode == "negative":
        labels = {label for label in labels if label.startswith("POST")}
    assert set(calls) == labels and len(calls) >= 5 * len(labels), len(calls)


def test_server_is_clean_after_schemathesis(server):
    """Runs after the generated cases (pytest keeps file order)."""
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert wait_idle(http)["pagedllm:engine_alive"] == 1
