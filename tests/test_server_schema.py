"""Property-based API test: schemathesis generates requests from the server's own OpenAPI schema
(FastAPI's /openapi.json) and sends them to a live server; no answer may be a 5xx, and every
error must be an OpenAI-style JSON error.

    .venv/bin/python -m pytest tests/test_server_schema.py

Bounded to a few examples per operation (hypothesis settings below) so it runs in seconds. The
hypothesis tests are built per operation inside the test, because schemathesis's pytest plugin
(`from_fixture`) does not work with the pytest used here. A random body almost never names the
served model (and often sets a parameter tandem refuses), so each generated body is also sent
once more with `model` set to it and those parameters left out, which drives real generation
through the engine.
"""

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings  # hypothesis comes with schemathesis

from test_server import LiveServer, build_tokenizer, random_model

ERROR_KEYS = {"message", "type", "param", "code"}
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "tools", "echo", "suffix")   # always 400


@pytest.fixture(scope="module")
def live():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    server = LiveServer(random_model(tok), tok, name="rand", max_batch=8, max_queue=64).start()
    yield server
    server.stop()


def check(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type") or [""]        # schemathesis: a list per header
        assert content_type[0].startswith("application/json"), response.text[:300]
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS and error["message"], error


def test_no_server_errors_and_json_errors(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=operation.as_strategy())
        def run(case):
            check(case.call(base_url=live.url, timeout=60))
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "rand"
                for name in UNSUPPORTED:
                    case.body.pop(name, None)
                check(case.call(base_url=live.url, timeout=60))
        run()
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(labels)
    assert live.state.engine_loop.thread.is_alive()
    assert live.wait_idle()["tandem_requests_inflight"] == 0
