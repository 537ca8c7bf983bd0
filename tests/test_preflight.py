"""Preflight: the support tables are data with sources, checks say what will not work and why,
and no vendor name leaks into the portability code."""

import json
import re
from pathlib import Path


from conftest import ROOT, fragile_llama, tiny_model_config


def run_tandem(*args, capsys=None):
    """The real CLI entry point, in-process (preflight loads no weights; a subprocess would spend
    its time importing torch). Returns an object shaped like CompletedProcess."""
    import types
    from tandem.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _hf_like(tmp_path, **overrides):
    """An HF-style folder with just a config (preflight reads no weights)."""
    from tandem.export.hf import hf_config
    from tandem.tasks import get_task
    from tandem.tokenizer import train_tokenizer
    tok = train_tokenizer(get_task("addition", max_digits=2).corpus(50), 300)
    config = tiny_model_config(vocab_size=tok.vocab_size, **overrides)
    import torch
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config, tok, torch.float32)))
    return folder


def test_every_target_and_rule_cites_a_source():
    from tandem.preflight import TARGETS_FILE, load_targets
    from tandem.tomlcompat import tomllib
    targets = load_targets()
    assert set(targets) == {"cpu", "cuda", "npu", "llamacpp", "vllm", "vllm-ascend", "mindie"}
    for name, t in targets.items():
        for key in ("title", "loads", "architectures", "dtypes", "default_dtype", "architectures_source",
                    "dtypes_source"):
            assert t.get(key), f"{name}.{key}"
        assert t["default_dtype"] in t["dtypes"]
        for rule in t.get("rules", []):
            assert rule.get("source") and rule.get("message") and rule["severity"] in ("error", "warn"), (name, rule)
    tomllib.loads(TARGETS_FILE.read_text())


def test_no_vendor_device_names_in_portability_code():
    """accel.py is the only file that names vendors; the tables are data (preflight_targets.toml)."""
    files = ["tandem/export/__init__.py", "tandem/export/hf.py", "tandem/export/gguf.py",
             "tandem/infer/backends.py", "tandem/parity.py", "tandem/preflight.py", "tandem/cli/portability.py",
             "tandem/publish.py"]
    for name in files:
        text = (ROOT / name).read_text().lower()
        assert not re.search(r"\bcuda\b|\bnpu\b", text), name


def test_vllm_rejects_a_head_dim_its_attention_cannot_run(tmp_path, capsys):
    folder = _hf_like(tmp_path, hidden_size=80)   # head_dim 20: not a multiple of 8
    result = run_tandem("preflight", "--model", folder, "--target", "vllm", "--json", capsys=capsys)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["ok"] and report["dtype"] == "bf16" and report["arch"] == "LlamaForCausalLM"
    head = next(c for c in report["checks"] if c["check"] == "head_dim_multiple_of")
    assert head["status"] == "fail" and "head_dim is 20" in head["message"] and "FLEX_ATTENTION" in head["message"]
    assert "flash_attn.py" in head["source"]
    old = next(c for c in report["checks"] if c["check"] == "head_dim_in")
    assert old["status"] == "warn"   # older vLLM: a fixed list of head sizes
    assert not any(c["check"] == "head_dim_convention" for c in report["checks"])
    odd = _hf_like(tmp_path / "odd", hidden_size=64, head_dim=32)    # 4 heads x 32 != 64
    from tandem.preflight import preflight
    assert any(c["check"] == "head_dim_convention" and c["status"] == "warn"
               for c in preflight(odd, "vllm")["checks"])
    text = run_tandem("preflight", "--model", folder, "--target", "vllm", capsys=capsys)
    assert text.returncode == 1 and "problem" in text.stdout and "source:" in text.stdout


def test_supported_model_passes_and_warnings_explain(tmp_path, capsys):
    folder = _hf_like(tmp_path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    ok = run_tandem("preflight", "--model", folder, "--target", "vllm", "--json", capsys=capsys)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert all(c["status"] in ("ok", "skip", "warn") for c in json.loads(ok.stdout)["checks"])
    def report(*extra):
        return json.loads(run_tandem("preflight", "--model", folder, *extra, "--json", capsys=capsys).stdout)

    mindie = report("--target", "mindie")
    assert mindie["ok"] and mindie["dtype"] == "fp16"
    assert any(c["check"] == "fp16_range" and c["status"] == "warn" for c in mindie["checks"])
    fp32 = run_tandem("preflight", "--model", folder, "--target", "mindie", "--dtype", "fp32", "--json",
                      capsys=capsys)
    assert fp32.returncode == 1
    dtype = next(c for c in json.loads(fp32.stdout)["checks"] if c["check"] == "dtype")
    assert dtype["status"] == "fail" and "fp16" in dtype["message"]
    tp = report("--target", "vllm", "--tp", "4")
    assert not tp["ok"] and any(c["check"] == "tp_divisible" and c["status"] == "fail" for c in tp["checks"])
    bf16 = report("--target", "vllm-ascend")
    assert any(c["check"] == "dtype_in" and c["status"] == "warn" and "310P" in c["message"] for c in bf16["checks"])


def test_local_targets_probe_this_machine(smoke_run):
    from tandem.preflight import preflight
    cpu = preflight(smoke_run, "cpu")
    assert cpu["ok"] and cpu["stored_dtype"] == "fp32"
    assert any(c["check"] == "hardware" and c["status"] == "ok" for c in cpu["checks"])
    assert any(c["check"] == "software" and "torch" in c["message"] for c in cpu["checks"])
    from tandem import accel
    for target, kind in (("cuda", "cuda"), ("npu", "npu")):
        report = preflight(smoke_run, target)
        hardware = next(c for c in report["checks"] if c["check"] == "hardware")
        if not accel.kind_available(kind):
            assert hardware["status"] == "skip" and f"no {kind} device" in hardware["message"]
        elif report["dtype"] in accel.supported_dtypes(kind):    # the probe's own answer, on this machine
            assert hardware["status"] == "ok" and accel.device_name(kind) in hardware["message"]
        else:
            assert hardware["status"] == "fail" and f"cannot compute in {report['dtype']}" in hardware["message"]


def test_qwen2_and_q8_rows(tmp_path):
    from tandem.preflight import preflight
    folder = _hf_like(tmp_path, arch="qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=72)
    report = preflight(folder, "llamacpp", dtype="q8_0")
    assert report["arch"] == "Qwen2ForCausalLM" and report["ok"]
    row = next(c for c in report["checks"] if c["check"] == "row_multiple_of")
    assert row["status"] == "warn" and "48" in row["message"]


def test_bad_input_is_one_line(tmp_path, smoke_run, capsys):
    for args, needle in [(["--model", smoke_run, "--target", "tpu"], "unknown preflight target 'tpu'"),
                         (["--model", tmp_path / "none", "--target", "cpu"], "model path not found"),
                         (["--model", smoke_run, "--target", "vllm", "--dtype", "fp8"], "unknown --dtype 'fp8'")]:
        result = run_tandem("preflight", *args, capsys=capsys)
        assert result.returncode == 2, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr


def test_targets_file_ships_with_the_package():
    assert Path(ROOT / "tandem" / "preflight_targets.toml").is_file()


def test_llamacpp_fails_a_type_that_crashes_on_this_cpu(tmp_path):
    """With a probe that really segfaults on q8_0 (in its child), preflight for q8_0 fails with a
    line naming every type's result and the types to serve instead."""
    from tandem.preflight import format_text, preflight
    report = preflight(_hf_like(tmp_path), "llamacpp", dtype="q8_0", gguf_probe=fragile_llama)
    check = next(c for c in report["checks"] if c["check"] == "cpu_kernels")
    assert not report["ok"] and check["status"] == "fail", report
    assert check["message"] == ("llama.cpp on this CPU: f32 ok, f16 fails: no f16 kernels, q8_0 crashes "
                                "(signal 11); serve f32 instead (--dtype, and export with it)")
    assert "q8_0 crashes (signal 11)" in format_text(report)
