"""Running the server for real: API keys, /health states, fault counts in /metrics, SIGTERM drain,
and the bad-input lines of `tandem serve` (test_server_faults.py drives the injected faults).

    .venv/bin/python -m pytest tests/test_server_ops.py

The official `openai` client against a live server (test_server.py's LiveServer) with and without
the right key; an engine whose rebuild is held open, to see /health say `degraded`; and `tandem
serve` subprocesses on free loopback ports: TANDEM_API_KEY, SIGTERM with streams running (they
finish, a request sent meanwhile gets 503 + Retry-After, exit 0), and the bad-input lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from test_server import (MESSAGES, LiveServer, build_tokenizer, error_json, free_port, random_model, save_as_checkpoint,
                         serve, slow_checkpoint, wait_healthy)


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return build_tokenizer()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


# -----------------------------------------------------------------------------------------------
# API keys


def test_api_keys_guard_v1_and_leave_health_open(tok):
    server = LiveServer(random_model(tok), tok, name="locked", api_keys=("right-key", "second-key")).start()
    try:
        before = server.metrics()
        for key in ("wrong-key", "right-key-but-longer", "right-ke"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(server.url, key).chat.completions.create(model="locked", messages=MESSAGES, max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"authorization": "right-key"}, {"authorization": "Basic right-key"}):
            r = httpx.post(server.url + "/v1/completions", json={"model": "locked", "prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and error_json(r)["code"] == "invalid_api_key", r.text
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        after = server.metrics()                 # none of them reached the engine
        assert after["tandem_prompt_tokens_total"] == before["tandem_prompt_tokens_total"] == 0
        assert after["tandem_engine_steps_total"] == before["tandem_engine_steps_total"] == 0
        assert httpx.get(server.url + "/health").json()["status"] == "ok"     # no key needed
        assert 'path="/v1/completions",status="401"} 3.0' in httpx.get(server.url + "/metrics").text

        for key in ("right-key", "second-key"):
            r = client(server.url, key).chat.completions.create(model="locked", messages=MESSAGES, max_tokens=3)
            assert r.usage.completion_tokens >= 1
        assert [m.id for m in client(server.url, "right-key").models.list().data] == ["locked"]
        chunks = list(client(server.url, "right-key").chat.completions.create(
            model="locked", messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True}, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 5
        assert sum(bool(c.choices and c.choices[0].delta.content is not None) for c in chunks) >= 2
    finally:
        server.stop()


# -----------------------------------------------------------------------------------------------
# /health states and the fault counts of /metrics


def test_health_is_degraded_while_the_engine_is_rebuilt_and_metrics_count_it(tok, monkeypatch):
    import tandem.infer.server.recovery as recovery_module
    gate, building = threading.Event(), threading.Event()

    class SlowToBuild(recovery_module.Engine):               # holds the rebuild open until the test looks
        def __init__(self, *args, **kwargs):
            building.set()
            gate.wait(20)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(recovery_module, "Engine", SlowToBuild)
    server = LiveServer(random_model(tok), tok, name="shaky").start()
    body = dict(model="shaky", messages=MESSAGES, max_tokens=4, temperature=1.0, seed=5)
    try:
        engine = server.state.engine_loop.engine

        def broken():
            raise RuntimeError("simulated out of memory")
        engine.step = broken
        answers = []
        asking = threading.Thread(target=lambda: answers.append(server.client().chat.completions.create(**body)))
        asking.start()
        assert building.wait(10)
        r = httpx.get(server.url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert server.metrics()["tandem_degraded"] == 1
        gate.set()
        asking.join(30)
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        assert answers[0].choices[0].message == server.client().chat.completions.create(**body).choices[0].message
        m = server.wait_idle()
        assert (m["tandem_engine_faults_total"], m["tandem_requests_restarted_total"]) == (1, 1)
        assert (m["tandem_engine_recoveries_total"], m["tandem_engine_recovery_seconds_count"]) == (1, 1)
        assert m["tandem_engine_recovery_seconds_sum"] > 0 and m["tandem_degraded"] == 0
        assert m["tandem_requests_failed_total"] == 0
    finally:
        gate.set()
        server.stop()


# -----------------------------------------------------------------------------------------------
# `tandem serve`: TANDEM_API_KEY, SIGTERM, bad input


def test_serve_reads_api_keys_from_the_environment(tok, tmp_path):
    folder = save_as_checkpoint(random_model(tok), tok, tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(folder, port, "--name", "env", env={"TANDEM_API_KEY": "first-key, second-key"})
    try:
        wait_healthy(url, proc)                                    # /health needs no key
        for key in ("first-key", "second-key"):
            assert client(url, key).chat.completions.create(model="env", messages=MESSAGES, max_tokens=2).choices
        for key in ("first-key, second-key", "third-key"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "warning" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_drains_finishes_streams_refuses_new_requests_and_exits_0(tok, tmp_path):
    """Two long streams run; SIGTERM; a request sent during the drain gets 503 + Retry-After (an
    OpenAI error) and /health says draining; both streams still end with all their tokens; exit 0.
    The model is big enough and the streams long enough (2 x 1200 steps, a few seconds even on a fast
    CPU) to outlast the probes, which take a few tens of milliseconds."""
    folder = slow_checkpoint(tok, tmp_path, context=1536)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(folder, port, "--name", "big", "--drain-timeout", "120")
    body = {"model": "big", "messages": MESSAGES, "max_tokens": 1200, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    results: list = [None, None]
    started = [threading.Event(), threading.Event()]

    def stream(i: int) -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:           # the role chunk, then tokens: generation is under way
                        started[i].set()
            results[i] = (r.status_code, lines)
            started[i].set()

    try:
        wait_healthy(url, proc)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        assert results == [None, None], "the streams ended before the signal; the test needs longer ones"
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while (r := httpx.get(url + "/v1/models")).status_code == 200 and time.time() < deadline:
            time.sleep(0.02)                       # until the signal is handled
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert error_json(r)["code"] == "shutting_down"
        chat = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False})
        assert chat.status_code == 503 and "retry-after" in chat.headers and error_json(chat)["type"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert results == [None, None], "the streams ended before the probes; the test needs longer ones"
        for t in threads:
            t.join(240)
        assert proc.wait(60) == 0
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    for status, lines in results:
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 1200     # finished, not cut
    assert "stopped" in out and "Traceback" not in err, err


@pytest.mark.parametrize("args, env, message", [
    (["--api-key", ""], {}, "--api-key holds an empty API key"),
    (["--api-key", "ok", "--api-key", " "], {}, "--api-key holds an empty API key"),
    ([], {"TANDEM_API_KEY": ""}, "TANDEM_API_KEY holds an empty API key"),
    ([], {"TANDEM_API_KEY": "a,,b"}, "TANDEM_API_KEY holds an empty API key"),
    (["--drain-timeout", "0"], {}, "--drain-timeout must be > 0 seconds, got 0.0"),
    (["--shutdown-timeout", "-1"], {}, "--drain-timeout must be > 0 seconds, got -1.0"),
    (["--step-timeout", "0"], {}, "--step-timeout must be > 0 seconds, got 0.0"),
    (["--request-restarts", "-1"], {}, "--request-restarts must be >= 0, got -1"),
    (["--fault", "hang@soon"], {}, "bad fault 'hang@soon' in --fault; write [ROLE/]KIND[:TARGET]@STEP"),
    (["--fault", "kill@3"], {}, "unknown fault 'kill@3' in --fault; write"),
    (["--fault", "nan:grad@3"], {}, "kinds: device_error, hang, nan[:logits]"),
    (["--fault", "trainer/hang@3"], {}, "names role 'trainer'; the server's faults hit its engine"),
    (["--fault-mtbf", "-5"], {}, "--fault-mtbf must be >= 0 engine steps"),
])
def test_serve_bad_keys_timeouts_and_fault_specs_are_one_line_exit_2(args, env, message):
    result = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--model", ".", *args],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, warned", [([], True), (["--api-key", "k"], False)])
def test_listening_beyond_loopback_without_a_key_warns(args, warned):
    """`tests` is not a model, so each run stops at loading, after the warning (or its absence)."""
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--model", "tests", "--host", "0.0.0.0",
                             "--port", "0", *args], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "is not a tandem run" in result.stderr
    assert ("warning: listening on 0.0.0.0 without an API key" in result.stderr) == warned, result.stderr
