"""benchmarks/ab.py: each side of an A/B imports tandem from its own tree (else the comparison would
time the same code twice), the baseline being a real git worktree of the asked ref."""

import subprocess

import pytest

from conftest import ROOT


def test_each_side_runs_its_own_tree():
    from benchmarks import ab
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: no ref to compare against")
    baseline = ab.baseline_tree("HEAD")
    assert (baseline / "tandem" / "__init__.py").is_file() and baseline.resolve() != ROOT.resolve()
    assert ab.measure_in(ROOT, "ab.py:source_tree", {}) == {"tree": str(ROOT.resolve())}
    assert ab.measure_in(baseline, "ab.py:source_tree", {}) == {"tree": str(baseline.resolve())}
