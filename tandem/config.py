"""Configuration: dataclasses, TOML presets, `--set section.key=value` overrides, validation.

A config has sections (run, model, tokenizer, data, sft, eval, ...); every field is documented
where it is declared. Presets live in `configs/NAME.toml` and only list what differs from the
defaults. Mistakes raise ConfigError naming the key and what is allowed:

    cfg = load_config(preset="tiny", overrides=["sft.steps=200"])
    cfg.sft.steps            # 200
    cfg.to_dict()            # the resolved config, as written to runs/NAME/config.json
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import ConfigError
from tandem.model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunConfig:
    seed: int = 0             # seeds data order, init and sampling; same seed => same weights
    threads: int = 0          # torch intra-op threads (0 = torch's default); part of determinism
    device: str = "auto"      # default device for every phase: auto|cpu|cuda[:i]|npu[:i]|xpu|mps


@dataclass
class TokenizerConfig:
    vocab_size: int = 512     # byte-level BPE vocabulary, special tokens included
    corpus_size: int = 4000   # task texts the BPE is trained on


@dataclass
class DataConfig:
    tasks: list = field(default_factory=lambda: ["addition"])  # task names or .jsonl paths
    task_params: dict = field(default_factory=dict)            # {task: {param: value}}


@dataclass
class SFTConfig:
    steps: int = 200          # optimizer steps
    batch_size: int = 32      # sequences per micro-batch
    grad_accum: int = 1       # micro-batches per optimizer step
    lr: float = 3e-3          # peak learning rate
    min_lr_ratio: float = 0.1 # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20    # linear warmup from 0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0    # max global grad norm (0 = off)
    dtype: str = "fp32"       # fp32 | bf16 (bf16 autocast, fp32 master weights)
    device: str = ""          # "" = run.device
    max_seq_len: int = 256    # longer examples are truncated
    checkpoint_every: int = 100
    keep_checkpoints: int = 3 # newest K committed checkpoints kept
    log_every: int = 10


@dataclass
class EvalConfig:
    n: int = 200              # held-out examples per task
    batch_size: int = 64
    max_new_tokens: int = 128
    pass_k: int = 0           # k for sampled pass@k (0 = greedy pass@1 only)
    temperature: float = 0.8  # sampling temperature for pass@k
    samples_in_report: int = 4
    device: str = ""          # "" = run.device
    dtype: str = "fp32"


@dataclass
class ExportConfig:
    """What `tandem pipeline` exports at its end, into runs/NAME/export/FORMAT (tandem/export/)."""
    formats: list = field(default_factory=lambda: ["hf"])  # "hf" (transformers/vLLM/MindIE), "gguf" (llama.cpp); [] = none
    hf_dtype: str = "auto"            # HF weights dtype: auto (as trained) | fp32 | bf16 | fp16
    gguf_type: str = "f16"            # GGUF tensor type: f32 | f16 | q8_0
    gate: bool = True                 # run the parity gate on each export; a failing export is not published
    gate_ref: str = "torch:cpu:fp32"  # reference backend: the trained model on tandem's engine
    gate_target: str = "hf"           # backend that runs the HF export in the gate (GGUF: always llamacpp)
    gate_n: int = 32                  # held-out prompts in the gate


# Every config section: name -> dataclass. A feature adds its section here (one line) and the
# dataclass above; Config, validation, presets and --set pick it up from this table.
SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig,
    "sft": SFTConfig, "eval": EvalConfig, "export": ExportConfig,
}


class Config:
    """One instance of every section (cfg.sft, cfg.model, ...) plus the preset's name."""

    def __init__(self, preset: str = ""):
        self.preset = preset
        for name, section in SECTIONS.items():
            setattr(self, name, section())

    def to_dict(self) -> dict:
        out = {"preset": self.preset}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def device_for(self, section: str) -> str:
        return getattr(getattr(self, section), "device", "") or self.run.device


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check `value` against the field type; ints are accepted for floats."""
    origin = typing.get_origin(tp) or tp
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict, str, bool, int, float):
        if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"config key '{key}' must be {_type_name(origin)}, got {value!r}")


def _apply(cfg: Config, section: str, values: dict, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}' in {source}; "
                          f"sections: {', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' in {source} must be a table of keys")
    target = getattr(cfg, section)
    hints = typing.get_type_hints(type(target))
    known = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{section}.{key}' in {source}; "
                              f"[{section}] has: {', '.join(known)}")
        setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))


def parse_override(text: str) -> tuple[str, str, object]:
    """'sft.steps=200' -> ('sft', 'steps', 200). Values are TOML (strings may be bare)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"bad override '{text}'; write --set section.key=value, e.g. --set sft.steps=200")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare string such as --set run.device=cpu
    return section, name, value


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] = ()) -> Config:
    """Defaults, then a preset or a TOML file, then --set overrides; validated."""
    cfg = Config()
    if preset and path:
        raise ConfigError("give either --preset or --config, not both")
    if preset:
        if preset not in presets():
            raise ConfigError(f"unknown preset '{preset}'; known presets: {', '.join(presets())}")
        path = CONFIG_DIR / f"{preset}.toml"
        cfg.preset = preset
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            _apply(cfg, section, values, str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        _apply(cfg, section, {name: value}, "--set")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a resolved config (runs/NAME/config.json)."""
    cfg = Config(preset=data.get("preset", ""))
    for section, values in data.items():
        if section != "preset":
            _apply(cfg, section, values, "config.json")
    validate(cfg)
    return cfg


def _check(condition: bool, key: str, allowed: str, value) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")


def validate(cfg: Config) -> None:
    m, s = cfg.model, cfg.sft
    _check(m.arch in ("llama", "qwen2"), "model.arch", "llama, qwen2", m.arch)
    _check(m.hidden_size > 0 and m.num_hidden_layers > 0, "model.hidden_size", "> 0", m.hidden_size)
    _check(m.num_attention_heads > 0 and m.num_key_value_heads > 0
           and m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
           "a divisor of model.num_attention_heads", m.num_key_value_heads)
    _check(m.head_dim % 2 == 0, "model.head_dim", "an even number", m.head_dim)
    _check(cfg.tokenizer.vocab_size >= 300, "tokenizer.vocab_size", ">= 300 (256 bytes + specials)",
           cfg.tokenizer.vocab_size)
    _check(s.steps >= 0, "sft.steps", ">= 0", s.steps)
    _check(s.batch_size >= 1, "sft.batch_size", ">= 1", s.batch_size)
    _check(s.grad_accum >= 1, "sft.grad_accum", ">= 1", s.grad_accum)
    _check(s.lr > 0, "sft.lr", "> 0", s.lr)
    _check(0 <= s.min_lr_ratio <= 1, "sft.min_lr_ratio", "0..1", s.min_lr_ratio)
    _check(s.checkpoint_every >= 1, "sft.checkpoint_every", ">= 1", s.checkpoint_every)
    _check(s.keep_checkpoints >= 1, "sft.keep_checkpoints", ">= 1", s.keep_checkpoints)
    for key, value in (("sft.dtype", s.dtype), ("eval.dtype", cfg.eval.dtype)):
        _check(value in ("fp32", "bf16", "fp16"), key, "fp32, bf16, fp16", value)
    _check(len(cfg.data.tasks) >= 1, "data.tasks", "a non-empty list of task names", cfg.data.tasks)
    _check(s.max_seq_len <= m.max_position_embeddings, "sft.max_seq_len",
           f"<= model.max_position_embeddings ({m.max_position_embeddings})", s.max_seq_len)
    _check(cfg.eval.n >= 1, "eval.n", ">= 1", cfg.eval.n)
    _check(cfg.eval.pass_k >= 0, "eval.pass_k", ">= 0", cfg.eval.pass_k)
    x = cfg.export
    _check(all(f in ("hf", "gguf") for f in x.formats) and len(set(x.formats)) == len(x.formats),
           "export.formats", 'a list of distinct "hf", "gguf"', x.formats)
    _check(x.hf_dtype in ("auto", "fp32", "bf16", "fp16"), "export.hf_dtype", "auto, fp32, bf16, fp16", x.hf_dtype)
    _check(x.gguf_type in ("f32", "f16", "q8_0"), "export.gguf_type", "f32, f16, q8_0", x.gguf_type)
    _check(x.gate_n >= 1, "export.gate_n", ">= 1", x.gate_n)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs, as 'section.key: old -> new'."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "task_params":
            diffs += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return diffs
