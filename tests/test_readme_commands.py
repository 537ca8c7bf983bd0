"""Every `tandem ...` command README.md shows, run as written against a demo-shaped model.

The model is the README's own `tandem pipeline --preset tiny --out runs/demo` (the tiny preset's
shape: 4 layers, d128, a 256-token context) trained for a few steps only: accuracy does not matter
here, only that each command does what the README says instead of failing (the README's
`tandem generate` once exited 2 because its default reply length filled the whole context).
Commands run in a temporary folder that holds runs/ and exports/, in README order.

What is changed for time, appended to the README's command: fewer steps and shorter evals (--set)
for the pipeline and the RL run (parity and the export gate take the run's eval.max_new_tokens);
--n and --max-new-tokens for eval/parity (fewer, shorter answers: a barely trained model never
stops by itself); --port for serve (a free port).
What is not run (needs hardware, peers or software that is not here): torchrun across two machines
(README "Reinforcement learning on hybrid hardware"), `tandem rl` on Qwen2.5 with cuda + npu (a
download and two accelerators), `tandem pipeline ... run.device=cuda` ("Running on GPU / NPU"),
`vllm serve` and `llama-server` (not tandem commands, and not installed here). `tandem parity
--target llamacpp:q8_0` runs only where llama-cpp-python is installed; elsewhere it must fail
with the install hint.
"""

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
FEW_STEPS = [a for kv in ("sft.steps=4", "sft.checkpoint_every=2", "eval.n=4", "eval.max_new_tokens=16",
                          "rl.steps=2", "rl.checkpoint_every=1", "rl.prompts_per_step=4", "rl.group_size=4",
                          "export.gate_n=4") for a in ("--set", kv)]

# (README line as written, what this test appends, expected exit codes), in README order.
COMMANDS = [
    # README "A quick tour of the CLI" (also "Chat with your model": its pipeline line is this one)
    ("tandem pipeline --preset tiny --out runs/demo", FEW_STEPS, {0}),
    ("tandem pipeline --preset moe  --out runs/moe", FEW_STEPS, {0}),
    ("tandem sft      --preset smoke --out runs/s1", [], {0}),
    ("tandem sft      --preset smoke --init runs/s1 --out runs/s2 --set sft.steps=400", ["--set", "sft.steps=8"], {0}),
    ("tandem rl       --preset smoke --init runs/s1 --out runs/r1", FEW_STEPS, {0}),
    ("tandem eval     --model runs/demo --task addition --json", ["--n", "4", "--max-new-tokens", "16"], {0}),
    ('tandem generate --model runs/demo --prompt "What is 482 + 37?"', [], {0}),
    ("tandem chat     --model runs/demo", [], {0}),                       # stdin: one question, then EOF
    ("tandem inspect  runs/demo --json", [], {0}),
    ("tandem doctor", [], {0}),
    # README "A mistake prints one line and exits with status 2"
    ("tandem sft --preset tiny --set sft.stpes=3 --out runs/x", [], {2}),
    # README "Chat with your model"
    ("tandem serve --model runs/demo", ["--port", "{port}"], {0}),         # until /health answers, then Ctrl-C
    ("tandem serve --model runs/demo --step-timeout 2 --fault device_error@3,nan@6,hang@9 --request-restarts 3",
     ["--port", "{port}"], {0}),                         # the faults strike the request, which still gets its answer
    # README "Export, gate, serve anywhere"
    ("tandem export --model runs/demo --format hf --out exports/demo-hf", [], {0}),
    ("tandem export --model runs/demo --format hf --dtype bf16 --out exports/demo-hf-bf16", [], {0}),
    ("tandem export --model runs/demo --format gguf --gguf-type q8_0 --out exports/demo-gguf", [], {0}),
    ("tandem inspect exports/demo-hf", [], {0}),
    # README "The parity gate": 1 means the (barely trained) model failed a threshold, which is a result
    ("tandem parity --model runs/demo --ref torch:cpu:fp32 --target torch:cpu:bf16", ["--n", "4"], {0, 1}),
    ("tandem parity --model runs/demo --target hf --json", ["--n", "4"], {0, 1}),
    ("tandem parity --model runs/demo --target llamacpp:q8_0 --threshold kl_mean=0.02", ["--n", "4"],
     {0, 1} if importlib.util.find_spec("llama_cpp") else {2}),
    ("tandem export --model runs/demo --format hf --out exports/demo-hf-gated --gate torch:cpu:fp32",
     ["--n", "4"], {0, 1}),
    ("tandem eval   --model runs/demo --backend hf:cpu:bf16", ["--n", "2", "--max-new-tokens", "16"], {0}),
    # README "Preflight before you ship"
    ("tandem preflight --model exports/demo-hf --target vllm --tp 2", [], {0}),
    ("tandem preflight --model exports/demo-hf --target vllm-ascend --dtype bf16", [], {0}),
    ("tandem preflight --model exports/demo-hf --target mindie", [], {0}),
    # README "Reinforcement learning on hybrid hardware"
    ("tandem rl --init runs/demo --out runs/demo-rl --preset tiny", FEW_STEPS, {0}),
]
# README "Training on unstable hardware": the chaos example spans several lines
CHAOS = ("tandem chaos --preset smoke --out runs/chaos \\\n"
         "    --faults kill@5,bitflip:weight@8,kill:ckpt@10,hang@12,device_error@15,ckpt_truncate@17,nan@18 \\\n"
         "    --set sft.steps=24 --set sft.checkpoint_every=4 --set resilience.heartbeat_timeout=3 \\\n"
         "    --set resilience.replicas=2 --set resilience.check_every=1")
NOT_RUN = [
    "tandem rl --init path/to/Qwen2.5-0.5B-Instruct",            # an HF download, cuda and npu
    "tandem pipeline --preset tiny --out runs/gpu --set run.device=cuda",
]


def _readme_command_lines() -> list[str]:
    """Every line of a README code block that starts a tandem command."""
    lines, inside = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside or line.startswith("    tandem "):
            text = line.strip().removeprefix("$ ")
            if text.startswith("tandem "):
                lines.append(text.split("  #")[0].strip())
    return lines


def test_this_list_covers_every_readme_command():
    listed = [c for c, _, _ in COMMANDS] + [CHAOS.splitlines()[0]] + NOT_RUN + ["tandem doctor"]
    for line in _readme_command_lines():
        assert any(line.startswith(c) or c.startswith(line) for c in listed), f"README command not tested: {line}"
    flat = " ".join(README.split())
    for command, _, _ in COMMANDS:
        assert " ".join(command.split()) in flat, f"not in README any more: {command}"
    assert CHAOS in README


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command: str, extra: list[str]) -> list[str]:
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "tandem"
    return [sys.executable, "-m", "tandem.cli", *words[1:], *extra]


def _run(workdir: Path, command: str, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if command.startswith("tandem serve"):
        port = _free_port()
        argv = _argv(command, [e.replace("{port}", str(port)) for e in extra])
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                               json={"model": "demo", "messages": [{"role": "user", "content": "What is 12 + 7?"}]})
            assert reply.status_code == 200, reply.text
            if "--fault" in command:        # the injected faults struck and were recovered from
                faults = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                assert "tandem_engine_faults_total 0.0" not in faults and reply.json()["choices"][0]["finish_reason"]
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    stdin = "What is 482 + 37?\n" if command.startswith("tandem chat") else ""
    return subprocess.run(_argv(command, extra), cwd=workdir, env=env, input=stdin, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("command, extra, codes", COMMANDS + [(CHAOS, [], {0})],
                         ids=[c[0].split("--out")[0][:60] for c in COMMANDS] + ["tandem chaos"])
def test_readme_command(workdir, command, extra, codes):
    for needed in ("runs/demo", "exports/demo-hf"):
        if f"{needed} " in command + " " and f"--out {needed} " not in command + " " \
                and not (workdir / needed).is_dir():
            pytest.skip(f"{needed} is made by a README command above it (run the whole module)")
    result = _run(workdir, command, extra)
    assert result.returncode in codes, f"{command}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        assert result.stderr.splitlines()[-1].startswith("error:"), result.stderr
    if command.startswith("tandem generate"):
        assert result.stdout.strip(), "generate printed no answer"
    if command.startswith("tandem chat"):
        assert "tandem>" in result.stdout and "error" not in result.stderr, result.stdout + result.stderr
    if command.startswith("tandem sft --preset tiny --set sft.stpes"):
        assert "unknown config key 'sft.stpes'" in result.stderr
    if command.startswith("tandem chaos"):       # the jobs wrote where the README says, and agree
        assert "identical" in result.stdout and (workdir / "runs/chaos/chaos/checkpoints").is_dir(), result.stdout
    if "llamacpp" in command and result.returncode == 2:
        assert "pip install" in result.stderr
