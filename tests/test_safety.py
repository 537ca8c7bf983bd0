"""Nothing tandem did not make is deleted, file-system trouble is one line, files follow the umask,
and a resume may change what cannot change the weights. Every check runs the real `tandem` CLI
(or a benchmark script) in a subprocess, on real folders, permissions and mounts."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_tandem

SMOKE = ["--preset", "smoke", "--set", "sft.steps=6", "--set", "sft.checkpoint_every=3"]


def tandem_umask(umask, *args):
    """`tandem ARGS` in a subprocess running under `umask`."""
    return subprocess.run([sys.executable, "-m", "tandem.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, preexec_fn=lambda: os.umask(umask))


def one_line_error(result, *needles):
    """Exit 2 with one "error:" line (the last; warnings may come before it) holding `needles`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert str(needle) in lines[-1], (needle, lines[-1])
    return lines[-1]


def foreign_folder(path):
    """A folder of someone else's files; returns a snapshot to compare with afterwards."""
    (path / "sub").mkdir(parents=True)
    (path / "other-model.bin").write_bytes(b"\0weights")
    (path / "README.txt").write_text("mine")
    (path / "sub" / "x").write_text("x")
    return snapshot(path)


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def fingerprint(model):
    result = run_tandem("inspect", model, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["fingerprint"]


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step smoke SFT run, made under umask 022."""
    out = tmp_path_factory.mktemp("safety") / "run"
    result = tandem_umask(0o022, "sft", *SMOKE, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


# -----------------------------------------------------------------------------------------------
# 1. --force and every other deleting path spare what tandem did not make


def test_export_force_replaces_only_an_earlier_export(run, tmp_path):
    foreign = tmp_path / "foreign"
    before = foreign_folder(foreign)
    a_run = tmp_path / "copy-of-run"
    shutil.copytree(run, a_run)
    run_before = snapshot(a_run)
    for out, kept in ((foreign, before), (a_run, run_before)):
        result = run_tandem("export", "--model", run, "--format", "hf", "--out", out, "--force")
        one_line_error(result, out, "not an earlier tandem export", "tandem_export.json")
        assert snapshot(out) == kept
    (tmp_path / "file").write_text("a file")
    one_line_error(run_tandem("export", "--model", run, "--out", tmp_path / "file", "--force"), "is a file")
    one_line_error(run_tandem("export", "--model", run, "--out", tmp_path / "file" / "x"), tmp_path / "file")

    export = tmp_path / "export"
    assert run_tandem("export", "--model", run, "--out", export).returncode == 0
    (export / "stale.txt").write_text("left by the earlier export's user")
    result = run_tandem("export", "--model", run, "--out", export, "--force")
    assert result.returncode == 0, result.stderr
    assert (export / "tandem_export.json").is_file() and not (export / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy-of-run", "export", "file", "foreign"]


def test_gguf_export_is_a_folder_that_force_replaces(run, tmp_path):
    out = tmp_path / "gguf"
    for extra in ([], ["--force"]):
        result = run_tandem("export", "--model", run, "--format", "gguf", "--out", out, *extra)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "tandem_export.json"]


def test_stale_staging_of_dead_exports_is_cleaned_and_nothing_else(run, tmp_path):
    out = tmp_path / "exp"
    dead, alive = dead_pid(), os.getpid()   # this test process is alive for the whole export
    for name in (f".exp.tmp-{dead}", f".exp.tmp-{alive}", ".exp.tmp-notapid", f".other.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    result = run_tandem("export", "--model", run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".exp.tmp-{alive}", ".exp.tmp-notapid", f".other.tmp-{dead}", "exp"])

    # A crash between the two renames of a --force swap: no --out, the old export set aside.
    (out / "marker").write_text("the previous export")
    os.rename(out, tmp_path / f".exp.old-{dead}")
    result = run_tandem("export", "--model", run, "--out", out)  # the old one is back: --force needed
    one_line_error(result, "already exists", "--force")
    assert (out / "marker").is_file() and not (tmp_path / f".exp.old-{dead}").exists()


def test_checkpoint_pruning_spares_folders_without_a_manifest(tmp_path):
    out = tmp_path / "run"
    args = ["sft", "--preset", "smoke", "--set", "sft.steps=4", "--set", "sft.checkpoint_every=1",
            "--set", "sft.keep_checkpoints=1", "--set", "resilience.faults=kill@2", "--out", out, "--quiet"]
    assert run_tandem(*args).returncode != 0          # killed at step 2: step_000002 committed
    ckpts = out / "checkpoints" / "sft"
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == ["step_000002"]
    dead = dead_pid()
    mine = {name: foreign_folder(ckpts / name) for name in ("step_000001", f".tmp-step_000005-{os.getpid()}")}
    (ckpts / f".tmp-step_000005-{dead}").mkdir()
    in_the_way = foreign_folder(ckpts / "step_000003")
    one_line_error(run_tandem(*args), ckpts / "step_000003", "not written by tandem", "manifest.json")
    assert snapshot(ckpts / "step_000003") == in_the_way
    shutil.move(ckpts / "step_000003", tmp_path / "moved")
    result = run_tandem(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == sorted([*mine, "step_000004"])
    assert all(snapshot(ckpts / name) == kept for name, kept in mine.items())


def test_rollback_discards_only_tandems_checkpoints(tmp_path):
    from tandem.train.checkpoint import discard_newer, save_checkpoint
    import torch
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2)}, {"phase": "sft"})
    kept = foreign_folder(tmp_path / "step_000007")
    discard_newer(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000007"]
    assert snapshot(tmp_path / "step_000007") == kept


def test_pipeline_export_stage_leaves_a_foreign_export_folder(run, tmp_path):
    from tandem.config import load_config
    from tandem.publish import run_export_stage
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    kept = foreign_folder(copy / "export" / "hf")
    results = run_export_stage(load_config("smoke", overrides=["export.gate=false"]), copy, progress=False)
    assert not results["hf"]["published"] and "not an earlier tandem export" in results["hf"]["reason"]
    assert snapshot(copy / "export" / "hf") == kept


def test_chaos_and_benchmarks_refuse_a_foreign_out(tmp_path, monkeypatch):
    kept = foreign_folder(tmp_path / "c")
    one_line_error(run_tandem("chaos", "--preset", "smoke", "--out", tmp_path / "c", "--faults", "kill@3"),
                   tmp_path / "c", "not empty")
    result = subprocess.run([sys.executable, "benchmarks/bench_chaos.py", "--work", tmp_path / "c"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "not a benchmark's scratch folder" in result.stderr, result.stderr
    assert snapshot(tmp_path / "c") == kept

    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.bench_grpo as bench_grpo
    from tandem.errors import ModelError
    monkeypatch.setattr(bench_grpo, "BENCH", tmp_path)
    with pytest.raises(ModelError, match="not a tandem run folder"):
        bench_grpo.rl_run(tmp_path / "nothing", "c", [])   # bench_trl's runs go through the same remove_run
    assert snapshot(tmp_path / "c") == kept


# -----------------------------------------------------------------------------------------------
# 6. File-system trouble and damaged weights: one line, exit 2


def test_out_that_is_a_file_or_under_one(tmp_path):
    (tmp_path / "file").write_text("a file")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        one_line_error(run_tandem("sft", *SMOKE, "--out", out), tmp_path / "file", "is a file")
    assert (tmp_path / "file").read_text() == "a file"


@pytest.fixture
def read_only(tmp_path):
    """(folder, command prefix): a folder no write into succeeds for commands run with the prefix.
    Not root: chmod 555. Root ignores modes, so a read-only bind mount of the folder, made in a
    private mount namespace (`unshare -m`) that lives only as long as the command."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, []
        folder.chmod(0o755)
        return
    prefix = ["unshare", "-m", "sh", "-c", 'mount -o bind,ro "$0" "$0" && exec "$@"', str(folder)]
    probe = subprocess.run([*prefix, "touch", str(folder / "probe")], capture_output=True, text=True)
    if shutil.which("unshare") is None or "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()}")
    yield folder, prefix


def test_writing_into_a_read_only_folder(run, read_only):
    folder, prefix = read_only

    def tandem(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "tandem.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    for out in (folder, folder / "run"):
        one_line_error(tandem("sft", *SMOKE, "--out", out), folder, "cannot write", "--out you can write to")
    one_line_error(tandem("export", "--model", run, "--out", folder / "hf"), folder, "cannot write")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("keep", ["header", "half"])
def test_truncated_safetensors_is_one_line(run, tmp_path, keep):
    hf = tmp_path / "hf"
    assert run_tandem("export", "--model", run, "--out", hf).returncode == 0
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:5] if keep == "header" else data[:len(data) // 2])
    for args in (["eval", "--model", hf, "--n", "2"], ["inspect", hf], ["serve", "--model", hf, "--port", "0"]):
        one_line_error(run_tandem(*args, timeout=120), weights, "truncated or corrupt")


# -----------------------------------------------------------------------------------------------
# 8. Weights follow the umask like every other file


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_and_checkpoints_follow_the_umask(run, tmp_path, umask):
    expected = 0o666 & ~umask
    folders = []
    if umask == 0o022:
        folders.append(run / "checkpoints" / "sft" / "step_000006")
    else:
        out = tmp_path / "run"
        result = tandem_umask(umask, "sft", "--preset", "smoke", "--set", "sft.steps=1", "--out", out, "--quiet")
        assert result.returncode == 0, result.stderr
        folders.append(out / "checkpoints" / "sft" / "step_000001")
    for fmt in ("hf", "gguf") if _has_gguf() else ("hf",):
        result = tandem_umask(umask, "export", "--model", run, "--format", fmt, "--out", tmp_path / fmt)
        assert result.returncode == 0, result.stderr
        folders.append(tmp_path / fmt)
    for folder in folders:
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
        assert "model.safetensors" in modes or "model.gguf" in modes
        assert set(modes.values()) == {oct(expected)}, (folder, modes)


def _has_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


# -----------------------------------------------------------------------------------------------
# 11. Run folders: a foreign config.json, and what a resume may change


def test_sft_into_a_folder_with_someone_elses_config_json(tmp_path):
    for config in ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "not json"):
        out = tmp_path / "theirs"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
        for supervise in ([], ["--supervise"]):   # the supervisor writes nothing into it either
            one_line_error(run_tandem("sft", *SMOKE, "--out", out, *supervise), out,
                           "is not a tandem run folder (its config.json is not one)")
            assert [p.name for p in out.iterdir()] == ["config.json"]


def test_resume_with_a_changed_log_every_is_exact(run, tmp_path):
    out = tmp_path / "run"
    crash = ["sft", *SMOKE, "--set", "resilience.faults=kill@4", "--out", out, "--quiet"]
    assert run_tandem(*crash).returncode != 0   # killed at step 4; step 3 is committed
    one_line_error(run_tandem(*crash, "--set", "sft.lr=0.001"), "sft.lr")   # weights would differ: refused
    result = run_tandem(*crash, "--set", "sft.log_every=1")
    assert result.returncode == 0, result.stderr
    assert fingerprint(out) == fingerprint(run)
    assert json.loads((out / "config.json").read_text())["sft"]["log_every"] == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [4, 5, 6]   # logged every step after the resume
