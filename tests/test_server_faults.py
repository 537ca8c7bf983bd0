"""Engine faults under `tandem serve`: each kind is survived with the answer a fault-free run gives.

    .venv/bin/python -m pytest tests/test_server_faults.py

Each test starts `tandem serve` on a free loopback port with `--fault` (a tiny random model saved
as a checkpoint here) and talks to it with the official `openai` client. Faults strike at fixed
engine steps (one step per generated token of a lone request; the prefill step gives the first):
a streamed request is hit after 3 of its tokens went out, a non-streamed one after 1. Their answers
must equal those of the same seeded requests sent afterwards to the same server, when every fault
has fired: no duplicated or missing text, same finish reason and token count. The bounded-restart
test checks the explicit errors once a request has used up --request-restarts.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from test_server import MESSAGES, build_tokenizer, free_port, random_model, save_as_checkpoint, serve, wait_healthy

BODY = dict(model="f", messages=MESSAGES, max_tokens=10, temperature=0.9, seed=7, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    tok = build_tokenizer()
    return save_as_checkpoint(random_model(tok), tok, tmp_path_factory.mktemp("faults"))


class Served:
    """`tandem serve` of the checkpoint with extra flags, until the `with` block ends."""

    def __init__(self, checkpoint: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = serve(checkpoint, self.port, "--name", "f", *flags)

    def __enter__(self) -> "Served":
        wait_healthy(self.url, self.proc)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stream(self, **overrides) -> tuple[str, str, str, int]:
        """(reasoning, content, finish reason, completion tokens) of a streamed chat completion."""
        chunks = list(self.client.chat.completions.create(**{**BODY, **overrides}, stream=True,
                                                          stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1, finish
        return ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                "".join(d.content or "" for d in deltas), finish[0], chunks[-1].usage.completion_tokens)

    def whole(self, **overrides) -> tuple[str, str, str, int]:
        r = self.client.chat.completions.create(**{**BODY, **overrides})
        m = r.choices[0].message
        return getattr(m, "reasoning_content", None) or "", m.content or "", r.choices[0].finish_reason, \
            r.usage.completion_tokens

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out


@pytest.mark.parametrize("kind, flags", [("device_error", []), ("nan", []), ("hang", ["--step-timeout", "1"])])
def test_each_engine_fault_is_survived_with_the_fault_free_answer(checkpoint, kind, flags):
    fault = "nan:logits" if kind == "nan" else kind
    with Served(checkpoint, "--fault", f"{fault}@4,{kind}@16", *flags) as server:
        streamed = server.stream()                  # steps 1-3 sent 3 tokens; 4 faults; replayed from step 5
        whole = server.whole(seed=8)                # starts at step 15; 16 faults
        m = server.metrics()
        assert streamed == server.stream()          # the same requests, now fault-free
        assert whole == server.whole(seed=8)
        assert streamed[2:] == ("length", 10) and whole[2:] == ("length", 10)
        assert streamed != server.stream(seed=9)    # the seed matters: the comparison can fail
        detected = "nonfinite" if kind == "nan" else kind
        faults = m["tandem_engine_faults_total"]
        assert m[f'tandem_engine_faults_by_kind_total{{kind="{detected}"}}'] == faults
        # exactly the 2 injected; with a 1 s watchdog, a step of a starved process may really hang too
        assert faults == 2 or (kind == "hang" and faults > 2)
        assert m["tandem_requests_restarted_total"] == m["tandem_engine_recoveries_total"] == faults   # 1 request each
        assert m["tandem_requests_failed_total"] == 0
        assert m["tandem_engine_recovery_seconds_sum"] > 0
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_request_past_max_restarts_ends_with_an_explicit_error(checkpoint):
    """--request-restarts 1: the streamed request faults at steps 3 and 5 (its first restart replays one
    token at 4), the non-streamed one (from step 6) at 8 and 10. Both end with engine_fault errors:
    in the stream, after the text already sent and without a finish reason; as a 500 otherwise."""
    with Served(checkpoint, "--request-restarts", "1", "--fault",
                "device_error@3,nan@5,device_error@8,device_error@10") as server:
        seen = []
        with pytest.raises(openai.APIError) as e:
            for chunk in server.client.chat.completions.create(**BODY, stream=True):
                seen.append(chunk)
        assert "restarted 1 time(s)" in e.value.message
        assert all(c.choices[0].finish_reason is None for c in seen if c.choices)
        with pytest.raises(openai.InternalServerError) as e:
            server.whole(seed=8)
        assert e.value.body["code"] == "engine_fault"
        m = server.metrics()
        assert (m["tandem_engine_faults_total"], m["tandem_requests_restarted_total"]) == (4, 2)
        assert m["tandem_requests_failed_total"] == 2
        assert server.whole()[2:] == ("length", 10)         # the server goes on
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
