"""Load a model for inference from whatever the user points at.

    loaded = load_model("runs/demo")                      # a run: its newest valid checkpoint
    loaded = load_model("runs/demo/checkpoints/sft/step_000200")
    loaded = load_model("exports/demo-hf")                # an HF Llama/Qwen2 folder
    loaded.model, loaded.tokenizer, loaded.info           # info: kind, step, path, fingerprint

Every command that takes --model goes through here, so they all accept the same things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem import accel
from tandem.errors import ModelError
from tandem.architectures import model_from_state
from tandem.model import ModelConfig, Transformer, weights_fingerprint
from tandem.tokenizer import ChatTokenizer
from tandem.train.checkpoint import latest_valid, load_checkpoint

PHASE_ORDER = ("rl", "sft")  # a run's "final" model: RL's newest checkpoint if any, else SFT's


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: ChatTokenizer
    info: dict = field(default_factory=dict)


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder a path means: itself, or a run's newest valid one."""
    if (path / "manifest.json").is_file() or (path / "train_state.json").is_file():
        return path
    for phase in PHASE_ORDER:
        found = latest_valid(path / "checkpoints" / phase)
        if found is not None:
            return found
    return None


def run_folder(path: Path) -> Path | None:
    """The run folder `path` belongs to (itself or a checkpoint's run), if any."""
    for candidate in (path, *path.parents):
        if (candidate / "config.json").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def init_run(path: str | Path) -> tuple[Path, Path]:
    """(run folder, its newest committed checkpoint) for a tandem run or checkpoint that an --init
    names; ModelError when it is not one, or when its run has no config.json."""
    path = Path(path)
    checkpoint = find_checkpoint(path) if path.is_dir() else None
    if checkpoint is None:
        raise ModelError(f"--init {path} is not a tandem run or checkpoint with a committed checkpoint "
                         "(expected runs/NAME with config.json + checkpoints/, or one of its checkpoint folders)")
    run = run_folder(checkpoint)
    if run is None:
        raise ModelError(f"--init {path}: no config.json in the run folder around {checkpoint}; "
                         "--init needs a whole tandem run folder (config.json + checkpoints/)")
    return run, checkpoint


def is_hf_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "architectures" in json.loads(config.read_text()) or "model_type" in json.loads(config.read_text())
    except ValueError:
        return False


def load_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], ChatTokenizer, dict]:
    """(config, weights on cpu, tokenizer, info) for a run, checkpoint or HF folder."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path not found: {path}")
    checkpoint = find_checkpoint(path)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        config = ModelConfig.from_dict(json.loads((checkpoint / "model_config.json").read_text()))
        tokenizer = ChatTokenizer.load(checkpoint)
        info = {"kind": "tandem", "path": str(checkpoint), "step": ckpt["train_state"]["step"],
                "phase": ckpt["train_state"].get("phase", "sft")}
        return config, ckpt["model"], tokenizer, info
    if is_hf_folder(path):
        from tandem.export.hf import import_hf  # lands with the portability work
        return import_hf(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        raise ModelError(f"run {path} has no committed checkpoint yet; train it first (tandem sft --out {path})")
    from tandem.export.gguf import is_gguf
    if is_gguf(path):
        raise ModelError(f"{path} is a GGUF model, which tandem runs only through llama.cpp: --backend llamacpp "
                         f"(eval, generate, parity) or llama.cpp's own server (llama-server -m FILE.gguf --jinja); "
                         f"tandem serve takes the run or HF export it came from")
    raise ModelError(f"{path} is not a tandem run, checkpoint or HF model folder "
                     "(expected config.json + checkpoints/, manifest.json, or an HF config.json)")


def load_model(path: str | Path, device: str = "cpu", dtype: str = "fp32") -> LoadedModel:
    """The model on `device` in `dtype`, its weights loaded straight there (no random init). The
    fingerprint is of the weights in fp32, whatever `dtype` and the stored dtype (as tandem trains)."""
    config, weights, tokenizer, info = load_weights(path)
    target = accel.resolve_device(device)
    torch_dtype = accel.resolve_dtype(dtype, target)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = model_from_state(config, weights, target, torch_dtype).eval()
    info["fingerprint"] = weights_fingerprint(weights, torch.float32)
    info["parameters"] = config.num_parameters()
    return LoadedModel(model, tokenizer, info)
