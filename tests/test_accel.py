"""The device layer: resolution, dtypes, backends, RNG round trip, and clear errors."""

import random

import pytest
import torch

from tandem import accel
from tandem.errors import DeviceError


def test_resolve_cpu_and_auto():
    assert accel.resolve_device("cpu") == torch.device("cpu")
    assert accel.resolve_device("auto").type in ("cpu",) + accel.ACCELERATOR_KINDS
    assert "cpu" in accel.available_devices()


@pytest.mark.parametrize("spec", ["cuda", "npu:0", "xpu", "mps"])
def test_missing_accelerator_lists_available(spec):
    if accel.kind_available(spec.split(":")[0]):
        pytest.skip(f"{spec} exists here")
    with pytest.raises(DeviceError, match=r"not available.*available here: cpu"):
        accel.resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu:0"])
def test_unknown_device_names_choices(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        accel.resolve_device(spec)


def test_cpu_dtypes_and_backend():
    assert {"fp32", "bf16"} <= set(accel.supported_dtypes("cpu"))
    assert accel.resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(DeviceError, match="unknown dtype"):
        accel.resolve_dtype("fp8", "cpu")
    assert accel.dist_backend("cpu") == "gloo"
    assert accel.DIST_BACKENDS["npu"] == "hccl" and accel.DIST_BACKENDS["cuda"] == "nccl"


def test_rng_state_round_trip_is_exact():
    import json
    accel.manual_seed(3)
    state = json.loads(json.dumps(accel.get_rng_state()))  # survives JSON, as in a checkpoint
    first = (random.random(), torch.rand(3), torch.randn(2))
    random.random(), torch.rand(5)
    accel.set_rng_state(state)
    again = (random.random(), torch.rand(3), torch.randn(2))
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_rng_state_keeps_one_device_and_reads_the_old_per_kind_lists():
    assert "device" not in accel.get_rng_state("cpu")                # cpu: torch_cpu already holds it
    state = accel.get_rng_state("cpu")
    state["cuda"] = []                 # an old checkpoint's every-visible-GPU list, none visible now
    accel.set_rng_state(state, "cpu")  # restores what exists here, ignores the rest


def test_local_device_rules_and_set_device_on_cpu():
    assert accel.local_device("cpu", 1, 2) == torch.device("cpu")    # the cpu is shared
    accel.set_device("cpu")                                           # no-op, no error
    accel.synchronize("cpu")
    if accel.device_count("cuda") < 2:                                # an index is the first rank's
        with pytest.raises(DeviceError, match="2 local ranks on cuda:0 need cuda:0 .. cuda:1") as info:
            accel.local_device("cuda:0", 1, 2)
        assert "\n" not in str(info.value)
    assert accel.free_memory("cpu") > 0
    accel.empty_cache("cpu")


def test_auto_dtype_is_bf16_only_where_the_device_has_bf16_units():
    """"auto" follows fast_bf16, which on a CPU follows its cpuinfo flags (AMX, AVX512-BF16, Arm
    BF16): a CPU that only emulates bf16 (e.g. AVX2) trains in fp32. Explicit names pass through."""
    fast = accel.fast_bf16("cpu")
    if set(accel.CPU_BF16_FLAGS) & accel.cpu_flags():
        assert fast
    elif accel.cpu_flags() and "BF16" not in torch.backends.cpu.get_cpu_capability().upper():
        assert not fast                   # the cpuinfo flags are there and name no bf16 unit
    assert accel.choose_dtype("auto", "cpu") == ("bf16" if fast else "fp32")
    assert accel.choose_dtype("bf16", "cpu") == "bf16" and accel.choose_dtype("fp32", "cpu") == "fp32"


def test_a_device_without_bf16_refuses_it_in_one_line_and_auto_falls_back(monkeypatch, tmp_path, capsys):
    """A device whose bf16 probe fails (simulated: the probe's cached answer flipped) refuses
    sft.dtype=bf16 through the CLI: one line, exit 2, nothing written; "auto" picks fp32 there."""
    from tandem.cli import main
    monkeypatch.setitem(accel._DTYPE_CACHE, ("cpu", "bf16"), False)
    assert accel.choose_dtype("auto", "cpu") == "fp32"
    code = main(["sft", "--preset", "smoke", "--set", "sft.dtype=bf16", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot compute in bf16" in err[0]
    assert not (tmp_path / "a").exists()
