"""Data-parallel SFT under real torchrun (2 ranks, gloo on the cpu): DDP and FSDP2 take the same steps as
one process on the same global batch; sharded checkpoints resume exactly, reject a damaged shard, load
into one process; bad launches are refused with one line and exit 2, writing nothing.

    PYTHONPATH=. python -m pytest -q tests/test_parallel_sft.py
"""

import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, run_tandem
from tandem.model import weights_fingerprint
from tandem.runs import read_metrics
from tandem.train.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint

SETS = ["sft.steps=4", "sft.checkpoint_every=2", "sft.log_every=1", "run.threads=1", "sft.lr=0.01"]
# Same global batch in one process and on 2 ranks; only the order of the gradient sums differs (each rank
# sums its rows, then the ranks' sums are added): after 4 AdamW steps the weights agree to ~1e-6 here.
TOLERANCE = 1e-5


def torchrun(out, *sets, ranks=2):
    with socket.socket() as probe:                                    # a free port for the job's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = sum((["--set", s] for s in [*SETS, *sets]), [])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                           "--master-port", str(port), "-m", "tandem.cli", "sft", "--preset", "smoke", "--quiet",
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def final(run):
    return load_checkpoint(latest_valid(run / "checkpoints" / "sft"))["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps in one process, on 2 DDP ranks and on 2 FSDP2 ranks."""
    root = tmp_path_factory.mktemp("parallel")
    assert run_tandem("sft", "--preset", "smoke", "--quiet", "--out", root / "one",
                      *sum((["--set", s] for s in SETS), [])).returncode == 0
    for kind in ("ddp", "fsdp"):
        launch = torchrun(root / kind, f"run.parallel={kind}")
        assert launch.returncode == 0, launch.stderr[-3000:]
    return root


def test_ddp_and_fsdp_ranks_take_the_steps_of_one_process(runs):
    one, ddp, fsdp = (final(runs / kind) for kind in ("one", "ddp", "fsdp"))
    start = load_checkpoint(list_checkpoints(runs / "one" / "checkpoints" / "sft")[-1])["model"]
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3     # the steps moved the weights
    for other in (ddp, fsdp):
        assert set(other) == set(one)
        assert max(float((one[k] - other[k]).abs().max()) for k in one) < TOLERANCE
    losses = [[m["loss"] for m in read_metrics(runs / kind, "sft")] for kind in ("one", "ddp", "fsdp")]
    assert len(losses[1]) == len(losses[2]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    # Rank 0 alone writes: one metrics line per step; FSDP's checkpoint holds one shard file per rank.
    newest = latest_valid(runs / "fsdp" / "checkpoints" / "sft")
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((newest / "train_state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_resume_at_the_same_world_size_is_exact(runs, tmp_path, kind):
    """Lose the step-4 checkpoint (as if killed after step 2): the rerun redoes steps 3-4 bit for bit."""
    import shutil
    run = tmp_path / kind
    shutil.copytree(runs / kind, run)
    shutil.rmtree(run / "checkpoints" / "sft" / "step_000004")
    assert torchrun(run, f"run.parallel={kind}").returncode == 0
    assert weights_fingerprint(final(run)) == weights_fingerprint(final(runs / kind))
    assert [m["loss"] for m in read_metrics(run, "sft")] == [m["loss"] for m in read_metrics(runs / kind, "sft")]


def test_a_damaged_shard_is_rejected_and_the_previous_checkpoint_used(runs, tmp_path):
    import shutil
    run = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", run)
    shard = run / "checkpoints" / "sft" / "step_000004" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    launch = torchrun(run, "run.parallel=fsdp")
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "__1_0.distcp does not match its SHA-256" in launch.stderr
    incidents = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    assert [(i["kind"], i["step"]) for i in incidents] == [("checkpoint_rejected", 4)]   # rank 0 records it once
    assert weights_fingerprint(final(run)) == weights_fingerprint(final(runs / "fsdp"))   # redone from step 2


def test_a_sharded_checkpoint_loads_whole_in_one_process(runs, tmp_path):
    """2 ranks -> 1: `tandem inspect` gives a sharded checkpoint and a gathered copy of it one fingerprint."""
    sharded = latest_valid(runs / "fsdp" / "checkpoints" / "sft")
    loaded = load_checkpoint(sharded)
    gathered = save_checkpoint(tmp_path / "gathered", 4, loaded["model"], loaded["train_state"],
                               extra_files={n: sharded / n for n in ("model_config.json", "tokenizer.json",
                                                                     "tokenizer_config.json")})
    lines = [[line for line in run_tandem("inspect", folder).stdout.splitlines() if line.startswith("fingerprint:")]
             for folder in (sharded, gathered)]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert not (gathered / ".metadata").exists()


def test_bad_launches_are_refused_with_one_line(runs, tmp_path):
    """A world size that does not divide the batch; a resume at another world size (here 1 process
    into a 2-rank run): exit 2, one line naming the rule, nothing written."""
    launch = torchrun(tmp_path / "odd", "sft.batch_size=3")
    errors = [line for line in launch.stderr.splitlines() if line.startswith("error:")]
    assert launch.returncode != 0 and errors and "does not divide over 2 ranks" in errors[0]
    assert not (tmp_path / "odd").exists()
    before = sorted(p.relative_to(runs) for p in (runs / "ddp").rglob("*"))
    metrics = (runs / "ddp" / "metrics.jsonl").read_text()
    result = run_tandem("sft", "--preset", "smoke", "--quiet", "--out", runs / "ddp",
                        *sum((["--set", s] for s in [*SETS, "run.parallel=ddp"]), []))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "written by 2 rank(s), not 1" in result.stderr
    assert sorted(p.relative_to(runs) for p in (runs / "ddp").rglob("*")) == before
    assert (runs / "ddp" / "metrics.jsonl").read_text() == metrics


def test_the_guard_skips_a_poisoned_step_on_fsdp_ranks_as_in_one_process(tmp_path):
    """A NaN loss injected at step 2 on one rank reaches every rank's guard through the summed
    gradients: all skip the update (one incident, recorded once), as a single process does."""
    fault = 'resilience.faults="nan:loss@2"'
    assert run_tandem("sft", "--preset", "smoke", "--quiet", "--out", tmp_path / "one",
                      *sum((["--set", s] for s in [*SETS, fault]), [])).returncode == 0
    launch = torchrun(tmp_path / "fsdp", "run.parallel=fsdp", fault)
    assert launch.returncode == 0, launch.stderr[-3000:]
    for run in ("one", "fsdp"):
        incidents = [json.loads(line) for line in (tmp_path / run / "incidents.jsonl").read_text().splitlines()]
        assert [(i["kind"], i["step"]) for i in incidents] == [("skip", 2)]
    one, fsdp = final(tmp_path / "one"), final(tmp_path / "fsdp")
    assert max(float((one[k] - fsdp[k]).abs().max()) for k in one) < TOLERANCE


def test_async_sharded_checkpoints_resume_exactly(runs, tmp_path):
    """resilience.async_checkpoint on FSDP ranks: the shards are written in the background and
    committed at the next save; a rerun from the step-2 one ends on the synchronous run's weights."""
    import shutil
    launch = torchrun(tmp_path / "async", "run.parallel=fsdp", "resilience.async_checkpoint=true")
    assert launch.returncode == 0, launch.stderr[-3000:]
    run = tmp_path / "async"
    assert [p.name for p in list_checkpoints(run / "checkpoints" / "sft")] == ["step_000004", "step_000002"]
    shutil.rmtree(run / "checkpoints" / "sft" / "step_000004")
    assert torchrun(run, "run.parallel=fsdp", "resilience.async_checkpoint=true").returncode == 0
    assert weights_fingerprint(final(run)) == weights_fingerprint(final(runs / "fsdp"))


@pytest.mark.parametrize("overrides,device,message", [
    (["sft.batch_size=5"], "cpu", "sft.batch_size = 5 does not divide over 2 ranks"),
    (["resilience.replicas=2", "resilience.check_every=1"], "cpu", "resilience.replicas / resilience.check_every are for one SFT process"),
    (["run.parallel=fsdp"], "mps", "run.parallel = 'fsdp' cannot run on mps"),
    (["run.parallel=fsdp", 'resilience.faults="bitflip:grad@2"'], "cpu", "grad/weight fault injection is not built"),
])
def test_the_rules_of_sft_ranks_name_what_to_change(overrides, device, message):
    import torch
    from tandem.config import load_config
    from tandem.errors import ConfigError
    from tandem.train.parallel import check_sft_ranks
    cfg = load_config(preset="smoke", overrides=["sft.batch_size=4", *overrides])
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_sft_ranks(cfg, 2, torch.device(device))
    check_sft_ranks(load_config(preset="smoke", overrides=["sft.batch_size=4"]), 2, torch.device("cpu"))


def test_fsdp_is_refused_for_grpo_trainer_ranks_before_anything_runs():
    from tandem.config import load_config
    from tandem.train.rollout import RolloutError, check_devices
    with pytest.raises(RolloutError, match="^run.parallel = 'fsdp' is not built for GRPO trainer ranks"):
        check_devices(load_config(preset="smoke", overrides=["run.parallel=fsdp", "rl.trainers=2"]))
    check_devices(load_config(preset="smoke", overrides=["run.parallel=fsdp"]))   # one trainer: nothing to shard
