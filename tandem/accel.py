"""THE device layer: the only file in tandem that knows accelerator vendors.

Everything else asks this module for a device, a dtype, a distributed backend or an RNG snapshot.

    resolve_device("auto")       -> the best accelerator present, else cpu
    resolve_device("cuda:1")     -> torch.device("cuda", 1), or DeviceError listing what exists
    supported_dtypes(device)     -> ["fp32", "bf16", "fp16"] (what this device can compute in)
    resolve_dtype("bf16", dev)   -> torch.bfloat16, or DeviceError
    choose_dtype("auto", dev)    -> "bf16" where bf16 matmuls are fast (fast_bf16), else "fp32"
    fast_bf16(dev)               -> bf16 units here? (CUDA/NPU/XPU: yes if supported; CPU: AMX,
                                 AVX512-BF16 or Arm BF16 in /proc/cpuinfo; without them bf16 is emulated)
    dist_backend(device)         -> "gloo" | "nccl" | "hccl" | "xccl"
    can_shard(device)            whether FSDP2 can shard over ranks on this kind of device
    get_rng_state(dev)/set_rng_state(state, dev)  every RNG tandem touches (python, numpy, torch,
                                 and the one device `dev` trains on)
    set_device(dev)              make `dev` this process's current device (collectives, kernels)
    local_device(dev, rank)      the device torchrun's LOCAL_RANK `rank` trains on
    set_deterministic(dev, on)   deterministic kernels (bitwise reproducible runs) or the fast ones
    free_memory(dev)/empty_cache(dev)  bytes left to allocate; return cached blocks to the device
    optimizer_options(dev)       fused or foreach optimizer kernels, what the device supports
    graph_capture_reason(dev)    None where a step can be captured and replayed as a device graph
                                 (CUDA graphs), else why not; capture_graph(dev, fn) does it

Ascend NPUs come through `torch_npu`, which registers the `npu` device with PyTorch when imported;
it is optional and imported only when an `npu` device is asked for or auto-detected. PyTorch >= 2.6
exposes `torch.accelerator`, which we use for "what accelerator is here" wherever it exists.
"""

from __future__ import annotations

import base64
import importlib
import os
import random
import time

import torch

from tandem.errors import DeviceError

ACCELERATOR_KINDS = ("cuda", "npu", "xpu", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo"}


def _load_npu() -> bool:
    """Import torch_npu if installed (it registers torch.npu); False when it is absent."""
    if hasattr(torch, "npu"):
        return True
    try:
        importlib.import_module("torch_npu")
        return True
    except Exception:  # absent, or present without CANN: either way no NPU here
        return False


def _kind_module(kind: str):
    """torch.cuda / torch.npu / torch.xpu / torch.mps, or None when this build lacks it."""
    if kind == "npu" and not _load_npu():
        return None
    return getattr(torch, kind, None)


def kind_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    module = _kind_module(kind)
    try:
        return bool(module is not None and module.is_available())
    except Exception:
        return False


def device_count(kind: str) -> int:
    if kind == "cpu":
        return 1
    if not kind_available(kind):
        return 0
    module = _kind_module(kind)
    return int(module.device_count()) if hasattr(module, "device_count") else 1


def available_devices() -> list[str]:
    """Every device name usable here, e.g. ["cpu", "cuda:0", "cuda:1"]."""
    names = ["cpu"]
    for kind in ACCELERATOR_KINDS:
        count = device_count(kind)
        names += [kind] if kind == "mps" and count else [f"{kind}:{i}" for i in range(count)]
    return names


def default_accelerator() -> str | None:
    """The accelerator kind PyTorch considers current (torch.accelerator), else the first found."""
    _load_npu()  # torch_npu must be imported before torch.accelerator can see an NPU
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return next((k for k in ACCELERATOR_KINDS if kind_available(k)), None)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn auto|cpu|cuda[:i]|npu[:i]|xpu[:i]|mps into a torch.device that exists here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(default_accelerator() or "cpu")
    kind, _, index = spec.partition(":")
    if kind not in ("cpu",) + ACCELERATOR_KINDS or (index and not index.isdigit()):
        raise DeviceError(f"unknown device '{spec}'; use auto, cpu, cuda[:i], npu[:i], xpu[:i] or mps "
                          f"(available here: {', '.join(available_devices())})")
    if kind == "cpu":
        return torch.device("cpu")
    count = device_count(kind)
    if count == 0 or (index and int(index) >= count):
        hint = " (install the 'npu' extra and CANN for Ascend)" if kind == "npu" else ""
        raise DeviceError(f"device '{spec}' is not available{hint}; available here: "
                          f"{', '.join(available_devices())}")
    return torch.device(kind, int(index)) if index else torch.device(kind)


def device_kind(device: torch.device | str) -> str:
    """'cpu', 'cuda', 'npu', ... (the ledger groups device-seconds by this)."""
    return torch.device(device).type


def _probe_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(4, 4, device=device, dtype=dtype)
        return bool(torch.isfinite((a @ a).float()).all())
    except Exception:
        return False


_DTYPE_CACHE: dict[tuple[str, str], bool] = {}


def supported_dtypes(device: torch.device | str) -> list[str]:
    """Dtypes this device can run a matmul in, probed once and cached."""
    device = torch.device(device)
    names = []
    for name, dtype in DTYPES.items():
        key = (str(device), name)
        if key not in _DTYPE_CACHE:
            _DTYPE_CACHE[key] = _probe_dtype(device, dtype)
        if _DTYPE_CACHE[key]:
            names.append(name)
    return names


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    if name not in supported_dtypes(device):
        raise DeviceError(f"device '{device}' cannot compute in {name}; it supports "
                          f"{', '.join(supported_dtypes(device))} (choose one of those, or auto)")
    return DTYPES[name]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there
    is no such file (macOS, Windows): no fast bf16 is then assumed."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        flags: set[str] = set()
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    key, _, value = line.partition(":")
                    if key.strip() in ("flags", "Features"):
                        flags.update(value.split())
                        break
        except OSError:
            pass
        _CPU_FLAGS = frozenset(flags)
    return _CPU_FLAGS


_CPU_FLAGS: frozenset[str] | None = None
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")   # Intel AMX, AVX512-BF16 (Intel/AMD Zen4+), Armv8.6 BF16


def fast_bf16(device: torch.device | str) -> bool:
    """Whether this device has bf16 arithmetic units, so bf16 training beats fp32. On a CPU without
    them oneDNN emulates bf16 matmuls through fp32 (correct, and slower than fp32 itself): the
    cpuinfo flags decide, cross-checked with torch's own dispatch level where it names one."""
    device = torch.device(device)
    if "bf16" not in supported_dtypes(device):
        return False
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) or "BF16" in capability.upper()
    if device.type == "cuda":      # pre-Ampere GPUs emulate bf16; older torch has no including_emulation
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:
            return bool(torch.cuda.is_bf16_supported())
    return device.type in ("npu", "xpu")     # mps: bf16 is partial there, fp32 stays the choice


def choose_dtype(name: str, device: torch.device | str) -> str:
    """A role's dtype name (trainer or rollout worker): "auto" becomes bf16 where it is fast
    (fast_bf16) and fp32 elsewhere, so a preset never picks a dtype the CPU only emulates; any other
    name must be one the device can compute in (DeviceError otherwise)."""
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    resolve_dtype(name, device)
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on this device (no-op on cpu), so timings measure real work."""
    device = torch.device(device)
    module = _kind_module(device.type) if device.type != "cpu" else None
    if module is not None and hasattr(module, "synchronize"):
        if device.index is None or device.type == "mps":  # mps has one device and no argument
            module.synchronize()
        else:
            module.synchronize(device)


def optimizer_options(device: torch.device | str) -> dict:
    """Keyword arguments for a torch.optim optimizer (AdamW) updating parameters on `device`: the
    fused kernel on CUDA (one launch for every parameter), the foreach path elsewhere (batched ops:
    the cpu, and torch_npu implements them on Ascend). Both replace the per-tensor loop, whose
    results they match up to the last bits; each is deterministic."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


def graph_capture_reason(device: torch.device | str) -> str | None:
    """None when `device` can record a sequence of kernels once and replay it (CUDA graphs: one
    launch per replay instead of one per op), else the reason it cannot."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device graphs are implemented for CUDA only, not for {device.type}"
    if not kind_available("cuda"):
        return "no CUDA device is available here"
    return None


def capture_graph(device: torch.device | str, step, warmup: int = 2):
    """(graph, output): `step()` recorded as a CUDA graph on `device`; graph.replay() reruns it on
    the same input/output memory. step must read its inputs from, and write its effects to,
    tensors that outlive the graph, and be idempotent (it runs warmup + 1 times here; the warm-up
    runs on a side stream, as the CUDA docs require). Raises DeviceError where
    graph_capture_reason(device) gives a reason."""
    reason = graph_capture_reason(device)
    if reason is not None:
        raise DeviceError(reason)
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output


def set_device(device: torch.device | str) -> None:
    """Make `device` the current one of its kind for this process (where kernels, collectives and
    caches go by default); a no-op on cpu and for a device named without an index."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is None:
        return
    accelerator = getattr(torch, "accelerator", None)
    if (accelerator is not None and hasattr(accelerator, "set_device_index") and accelerator.is_available()
            and accelerator.current_accelerator().type == device.type):
        accelerator.set_device_index(device.index)
        return
    module = _kind_module(device.type)
    if module is not None and hasattr(module, "set_device"):
        module.set_device(device)


def local_device(device: torch.device | str, local_rank: int, local_ranks: int) -> torch.device:
    """The device local rank `local_rank` of `local_ranks` uses when the config names `device`.

    An accelerator without an index means index `local_rank`; with an index i it is the first of the
    ranks' devices (rank r gets i + r), so "cuda:2" with 2 local ranks uses cuda:2 and cuda:3. The cpu
    is shared. Raises DeviceError when the rank's device does not exist here."""
    device = torch.device(device)
    if device.type == "cpu" or (local_ranks <= 1 and device.index is not None):
        return device
    base = device.index or 0
    try:
        return resolve_device(f"{device.type}:{base + local_rank}")
    except DeviceError:
        raise DeviceError(f"{local_ranks} local ranks on {device} need {device.type}:{base} .. "
                          f"{device.type}:{base + local_ranks - 1}; available here: "
                          f"{', '.join(available_devices())} (lower the base index or the ranks)") from None


def timer(device: torch.device | str) -> float:
    """A wall-clock reading taken after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def memory_stats(device: torch.device | str) -> dict:
    """Allocated / peak / total bytes where the device reports them; {} on cpu."""
    device = torch.device(device)
    module = _kind_module(device.type) if device.type != "cpu" else None
    stats = {}
    for key, fn in (("allocated_bytes", "memory_allocated"), ("peak_bytes", "max_memory_allocated")):
        if module is not None and hasattr(module, fn):
            try:
                stats[key] = int(getattr(module, fn)(device))
            except Exception:
                pass
    if module is not None and hasattr(module, "get_device_properties"):
        try:
            stats["total_bytes"] = int(module.get_device_properties(device).total_memory)
        except Exception:
            pass
    return stats


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on the device (free device memory plus what this process's
    caching allocator holds unused; available RAM on cpu); None where nothing reports it."""
    device = torch.device(device)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    module = _kind_module(device.type)
    try:
        free = int(module.mem_get_info(device)[0])
    except Exception:
        return None
    try:  # blocks cached but unused by this process are free to us too
        free += int(module.memory_reserved(device)) - int(module.memory_allocated(device))
    except Exception:
        pass
    return free


def empty_cache(device: torch.device | str) -> None:
    """Return the caching allocator's unused blocks to the device (no-op on cpu), e.g. between two
    stages sharing a device or after an out-of-memory failure, once references are dropped."""
    device = torch.device(device)
    module = _kind_module(device.type) if device.type != "cpu" else None
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def device_name(device: torch.device | str) -> str:
    """A human-readable name: the chip's name where the vendor module reports one."""
    device = torch.device(device)
    module = _kind_module(device.type) if device.type != "cpu" else None
    if module is not None and hasattr(module, "get_device_name"):
        try:
            return str(module.get_device_name(device))
        except Exception:
            pass
    return device.type


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for collectives among ranks on this kind of device."""
    return DIST_BACKENDS.get(torch.device(device).type, "gloo")


def can_shard(device: torch.device | str) -> bool:
    """Whether FSDP2 runs on this kind of device (its backend has reduce-scatter for its tensors):
    not on mps, whose ranks would talk gloo over tensors gloo cannot read."""
    return torch.device(device).type != "mps"


def manual_seed(seed: int) -> None:
    """Seed python, numpy (if present) and torch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every accelerator's default generator
    try:
        import numpy
        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def get_rng_state(device: torch.device | str | None = None) -> dict:
    """Every RNG state as JSON-serialisable data (goes into a checkpoint's train state): python,
    numpy, torch's cpu generator and, for an accelerator `device`, that one device's generator only
    (a resume may see fewer or other devices, e.g. CUDA_VISIBLE_DEVICES changed)."""
    state = {"python": _to_json(random.getstate()), "torch_cpu": _b64(torch.get_rng_state())}
    try:
        import numpy
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cpu" and kind_available(device.type):
        module = _kind_module(device.type)
        index = device.index if device.index is not None else _current_index(module)
        state["device"] = {"kind": device.type, "state": _b64(module.get_rng_state(index))}
    return state


def _current_index(module) -> int:
    return int(module.current_device()) if hasattr(module, "current_device") else 0


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore get_rng_state's snapshot; the device generator goes to `device` (same kind only).
    Older snapshots held a list per kind (every visible device): `device`'s entry is used."""
    random.setstate(_from_json(state["python"]))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if "numpy" in state:
        import numpy
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu" or not kind_available(device.type):
        return
    module = _kind_module(device.type)
    index = device.index if device.index is not None else _current_index(module)
    saved = state.get("device")
    if saved is not None and saved["kind"] == device.type:
        module.set_rng_state(_unb64(saved["state"]), index)
    elif isinstance(state.get(device.type), list) and index < len(state[device.type]):  # old format
        module.set_rng_state(_unb64(state[device.type][index]), index)


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def versions() -> dict:
    """torch and vendor-stack versions, for `tandem doctor` and run summaries."""
    info = {"torch": torch.__version__}
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    if getattr(torch.version, "hip", None):
        info["rocm"] = torch.version.hip
    if _load_npu():
        try:
            info["torch_npu"] = importlib.import_module("torch_npu").__version__
        except Exception:
            pass
    return info


def set_deterministic(device: torch.device | str, on: bool = True) -> None:
    """Deterministic kernels (on: the same inputs give the same bits, run after run) or the fast,
    nondeterministic ones, process-wide, for training on `device` (run.deterministic).

    On: torch.use_deterministic_algorithms (warn_only: an op with no deterministic kernel warns
    rather than crashes, so a bitwise claim can still fail there; the warning names it), and per
    vendor: CUDA gets CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS reproducible across streams; set
    before its first use in this process, as here at startup), cuDNN's deterministic mode, and
    scaled_dot_product_attention restricted to the math kernel (flash and memory-efficient backward
    accumulate with atomics; math costs memory quadratic in the sequence length); Ascend gets
    HCCL_DETERMINISTIC (ordered reductions). CPU kernels are deterministic per thread count."""
    device = torch.device(device)
    torch.use_deterministic_algorithms(on, warn_only=True)
    if device.type == "cuda":
        if on:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, False
        torch.backends.cuda.enable_flash_sdp(not on)
        torch.backends.cuda.enable_mem_efficient_sdp(not on)
    elif device.type == "npu" and on:
        os.environ.setdefault("HCCL_DETERMINISTIC", "true")


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (determinism holds per thread count); returns it."""
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
