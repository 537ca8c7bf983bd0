"""Backends and the parity gate: specs parse with clear errors, backends agree where they must,
a clean export passes its gate, a corrupted one fails it and is never published."""

import json

import pytest
import torch

from conftest import run_tandem
from tandem.errors import TandemError


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A smoke-sized run trained long enough to produce varied reasoning text (no default export)."""
    out = tmp_path_factory.mktemp("parity") / "run"
    result = run_tandem("pipeline", "--preset", "smoke", "--out", out, "--quiet", "--set", "sft.steps=150",
                        "--set", "export.formats=[]", timeout=600)
    assert result.returncode == 0, result.stderr
    return out


# -----------------------------------------------------------------------------------------------
# Specs and thresholds


def test_parse_backend_specs_and_errors():
    from tandem.infer.backends import BackendError, parse_backend
    assert str(parse_backend("torch")) == "torch:cpu:fp32"
    assert str(parse_backend("torch:cpu:bf16")) == "torch:cpu:bf16"
    assert str(parse_backend("hf")) == "hf:cpu:fp32" and parse_backend("hf:cpu:fp16").precision == "fp16"
    assert str(parse_backend("llamacpp")) == "llamacpp:f16" and parse_backend("llamacpp:q8_0").precision == "q8_0"
    for bad, needle in [("tensorrt", "unknown backend"), ("torch:cpu:fp8", "unknown dtype 'fp8'"),
                        ("llamacpp:q4_k", "f32, f16, q8_0"), ("torch::bf16", "torch[:DEVICE[:DTYPE]]"),
                        ("torch:cpu:bf16:x", "torch[:DEVICE[:DTYPE]]")]:
        with pytest.raises(BackendError) as err:
            parse_backend(bad)
        assert needle in str(err.value), str(err.value)


def test_missing_backend_names_the_extra(trained_run):
    """On a machine without llama-cpp-python (hidden from the child here, so this runs everywhere)."""
    result = run_tandem("parity", "--model", trained_run, "--target", "llamacpp", "--n", "2", hide=["llama_cpp"])
    assert result.returncode == 2 and "pip install 'tandem[llamacpp]'" in result.stderr
    result = run_tandem("eval", "--model", trained_run, "--backend", "llamacpp:q8_0", "--n", "2", hide=["llama_cpp"])
    assert result.returncode == 2 and "pip install 'tandem[llamacpp]'" in result.stderr


def test_thresholds_parse_and_default_by_precision():
    from tandem.infer.backends import parse_backend
    from tandem.parity import PROFILES, ParityError, default_thresholds, parse_thresholds
    assert parse_thresholds(["kl_mean=0.5", "greedy_match=1"]) == {"kl_mean": 0.5, "greedy_match": 1.0}
    for bad, needle in [(["kl=1"], "unknown parity metric 'kl'"), (["kl_mean"], "METRIC=VALUE"),
                        (["kl_mean=abc"], "not a number"), (["kl_mean=-1"], ">= 0")]:
        with pytest.raises(ParityError) as err:
            parse_thresholds(bad)
        assert needle in str(err.value)
    fp32 = parse_backend("torch:cpu:fp32")
    assert default_thresholds(fp32, parse_backend("hf"))[0] == "fp32"
    assert default_thresholds(fp32, parse_backend("torch:cpu:bf16"))[0] == "bf16"
    assert default_thresholds(parse_backend("llamacpp:f16"), fp32)[0] == "fp16"
    tight, loose, mid = PROFILES["fp32"], PROFILES["bf16"], PROFILES["fp16"]
    assert tight["kl_mean"] < mid["kl_mean"] < loose["kl_mean"]   # f16 GGUF sits in between


# -----------------------------------------------------------------------------------------------
# Backends


def test_backends_agree_on_distributions_and_scores(trained_run):
    from tandem.infer.backends import open_backend
    from tandem.infer.engine import SamplingParams
    with open_backend("torch", trained_run) as ref, open_backend("hf", trained_run) as hf:
        prompt = "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
        assert ref.encode(prompt) == hf.encode(prompt)
        params = SamplingParams(max_new_tokens=30, stop_token_ids=(ref.eos_id,))
        a, b = ref.generate([prompt], params)[0], hf.generate([prompt], params)[0]
        assert a.token_ids == b.token_ids and a.text == b.text and a.text.startswith("<think>")
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        ids = ref.encode(prompt)
        rows = ref.next_token_logprobs([ids], [a.token_ids])[0]
        assert rows.shape == (len(a.token_ids), ref.vocab_size)
        assert torch.allclose(rows.exp().sum(-1), torch.ones(len(a.token_ids)), atol=1e-5)
        for backend in (ref, hf):   # score == the rows at the tokens == generate's own logprobs
            score = backend.score([ids], [a.token_ids])[0]
            assert torch.allclose(score, torch.tensor(a.logprobs), atol=1e-4)
        values, indices = hf.next_token_logprobs([ids], [a.token_ids], top_k=3)[0]
        assert values.shape == (len(a.token_ids), 3) and torch.equal(indices[:, 0], torch.tensor(a.token_ids))
        seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
        assert hf.generate([ids], seeded)[0].token_ids == hf.generate([ids], seeded)[0].token_ids


def test_eval_and_generate_take_a_backend(trained_run):
    base = run_tandem("eval", "--model", trained_run, "--n", "4", "--json", "--max-new-tokens", "30")
    via_hf = run_tandem("eval", "--model", trained_run, "--n", "4", "--json", "--max-new-tokens", "30",
                        "--backend", "hf:cpu:fp32")
    assert base.returncode == 0 and via_hf.returncode == 0, via_hf.stderr
    a, b = json.loads(base.stdout), json.loads(via_hf.stdout)
    assert (a["accuracy"], a["format_rate"], a["avg_tokens"]) == (b["accuracy"], b["format_rate"], b["avg_tokens"])
    gen = run_tandem("generate", "--model", trained_run, "--prompt", "What is 3 + 4?", "--json",
                     "--max-new-tokens", "30", "--backend", "torch:cpu:bf16")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["tokens"] >= 1
    bad = run_tandem("generate", "--model", trained_run, "--prompt", "hi", "--backend", "torch:gpu9")
    assert bad.returncode == 2 and "unknown device" in bad.stderr


# -----------------------------------------------------------------------------------------------
# The gate


def test_parity_fp32_vs_bf16_reports_and_records(trained_run):
    from tandem.parity import METRICS
    result = run_tandem("parity", "--model", trained_run, "--ref", "torch:cpu:fp32", "--target", "torch:cpu:bf16",
                        "--n", "8", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == (0 if report["passed"] else 1), result.stdout + result.stderr
    # Whether this 150-step model meets the bf16 limits depends on how its training went on this
    # CPU (one answer of 8 flipped by bf16 is an accuracy drop of 0.125 > 0.1), so the verdict is
    # checked against the metrics instead of assumed.
    m, failed = report["metrics"], {f.split()[0] for f in report["failures"]}
    assert "routing_match" not in m and "routing_match" not in failed      # a dense model: nothing routed
    for name, limit in report["thresholds"].items():
        if name != "routing_match":
            assert (m[name] <= limit if METRICS[name] == "max" else m[name] >= limit) == (name not in failed), name
    assert report["profile"] == "bf16" and report["n"] == 8 and report["tokens"] > 50
    assert 0 < m["logprob_mean_abs"] <= m["logprob_max_abs"] and 0 <= m["kl_mean"] <= m["kl_max"]
    assert 0 < m["top1_agreement"] <= 1 and m["prompt_token_match"] == 1.0
    assert 0 <= m["accuracy_ref"] <= 1 and 0 <= m["accuracy_target"] <= 1
    assert {"prompt", "position", "context", "ref_completion", "target_completion"} <= set(report["worst"])
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["parity"]["torch:cpu:fp32 vs torch:cpu:bf16"]["passed"] == report["passed"]
    assert "## Parity: `torch:cpu:fp32` vs `torch:cpu:bf16`" in (trained_run / "report.md").read_text()
    # an impossible threshold fails: exit 1, the failing metric named
    result = run_tandem("parity", "--model", trained_run, "--target", "torch:cpu:bf16", "--n", "4",
                        "--threshold", "greedy_match=1.5", "--no-record")
    assert result.returncode == 1 and "FAIL" in result.stdout and "greedy sequence match" in result.stdout
    result = run_tandem("parity", "--model", trained_run, "--target", "hf", "--threshold", "kl=1")
    assert result.returncode == 2 and "unknown parity metric 'kl'" in result.stderr


def test_clean_export_passes_the_gate_and_a_corrupted_one_fails(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file
    clean = tmp_path / "clean"
    result = run_tandem("export", "--model", trained_run, "--out", clean, "--gate", "torch:cpu:fp32", "--n", "6")
    assert result.returncode == 0, result.stderr
    provenance = json.loads((clean / "tandem_export.json").read_text())
    assert provenance["gate"]["passed"] and provenance["gate"]["metrics"]["logprob_max_abs"] <= 1e-4

    weights = load_file(str(clean / "model.safetensors"))
    weights["model.norm.weight"][5] += 0.5          # one weight perturbed
    save_file(weights, str(clean / "model.safetensors"), metadata={"format": "pt"})
    result = run_tandem("parity", "--model", trained_run, "--target", "hf", "--target-model", clean, "--n", "6",
                        "--json", "--no-record")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["passed"] and any(f.startswith("logprob_max_abs") for f in report["failures"])
    # a grossly wrong export (final norm negated: every logit flips sign) fails the loose profiles too
    weights["model.norm.weight"] = -weights["model.norm.weight"]
    save_file(weights, str(clean / "model.safetensors"), metadata={"format": "pt"})
    for target, profile in (("hf:cpu:bf16", "bf16"), ("hf:cpu:fp16", "fp16")):
        result = run_tandem("parity", "--model", trained_run, "--target", target, "--target-model", clean, "--n", "4",
                            "--json", "--no-record")
        report = json.loads(result.stdout)
        assert result.returncode == 1 and report["profile"] == profile and not report["passed"], result.stderr
        assert {f.split()[0] for f in report["failures"]} >= {"kl_mean", "top1_agreement"}, report["failures"]


def test_gate_refuses_to_publish_a_corrupted_export(trained_run, tmp_path, monkeypatch):
    import tandem.export.hf as hf_module
    from tandem.publish import GateFailure, export_model
    real = hf_module.write_hf

    def corrupting(config, weights, tokenizer, folder, **kw):
        weights = dict(weights)
        weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"].clone()
        weights["model.layers.0.mlp.down_proj.weight"][3, 7] += 1.0
        return real(config, weights, tokenizer, folder, **kw)

    monkeypatch.setattr(hf_module, "write_hf", corrupting)
    out = tmp_path / "bad"
    with pytest.raises(GateFailure) as err:
        export_model(trained_run, out, gate="torch:cpu:fp32", gate_n=4, record=False, progress=False)
    assert "nothing was published" in str(err.value) and not err.value.report["passed"]
    assert list(tmp_path.iterdir()) == []   # neither the export nor its staging folder


def test_pipeline_stage_records_a_refused_export(trained_run, monkeypatch):
    """The pipeline's export stage: a corrupted export is not published, and the refusal is in
    summary.json and the report (cmd_pipeline turns it into exit status 1)."""
    import tandem.export.hf as hf_module
    from tandem.config import config_from_dict
    from tandem.publish import run_export_stage
    real = hf_module.write_hf

    def corrupting(config, weights, tokenizer, folder, **kw):
        weights = dict(weights, **{"model.norm.weight": weights["model.norm.weight"] * 1.5})
        return real(config, weights, tokenizer, folder, **kw)

    monkeypatch.setattr(hf_module, "write_hf", corrupting)
    cfg = config_from_dict(json.loads((trained_run / "config.json").read_text()))
    cfg.export.formats, cfg.export.gate_n = ["hf"], 3
    results = run_export_stage(cfg, trained_run, progress=False)
    assert results["hf"]["published"] is False and "parity gate" in results["hf"]["reason"]
    assert not (trained_run / "export" / "hf").exists()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["export"]["hf"]["published"] is False
    assert not summary["parity"]["torch:cpu:fp32 vs hf:cpu:fp32"]["passed"]
    assert "**FAIL**" in (trained_run / "report.md").read_text()


def test_gate_with_a_missing_backend_fails_before_writing(trained_run, tmp_path):
    result = run_tandem("export", "--model", trained_run, "--format", "gguf", "--out", tmp_path / "g",
                        "--gate", "torch:cpu:fp32", hide=["llama_cpp"])
    assert result.returncode == 2 and "tandem[llamacpp]" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_doctor_lists_backends():
    result = run_tandem("doctor", "--json")
    assert result.returncode == 0, result.stderr
    backends = {b["backend"]: b for b in json.loads(result.stdout)["backends"]}
    assert set(backends) == {"torch", "hf", "llamacpp"}
    assert "torch:cpu:fp32" in backends["torch"]["runs"] and "torch:cpu:bf16" in backends["torch"]["runs"]
    assert backends["llamacpp"]["install"] == "pip install 'tandem[llamacpp]'"
    text = run_tandem("doctor")
    assert "inference backends" in text.stdout


def test_backend_errors_are_tandem_errors():
    from tandem.infer.backends import BackendError, BackendMissing
    assert issubclass(BackendMissing, BackendError) and issubclass(BackendError, TandemError)
