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
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import ConfigError
from tandem.model import ARCHITECTURES, LATENT_FIELDS, ModelConfig
from tandem.tomlcompat import tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunConfig:
    seed: int = 0             # seeds data order, init and sampling; same seed => same weights
    threads: int = 0          # torch intra-op threads (0 = torch's default); part of determinism
    device: str = "auto"      # default device for every phase: auto|cpu|cuda[:i]|npu[:i]|xpu|mps
    deterministic: bool = True  # deterministic kernels (accel.set_deterministic): bitwise exact resume and
    #                             the corruption votes need them; false = faster GPU kernels, resume not bitwise
    parallel: str = "ddp"     # SFT ranks under torchrun: ddp (replicated weights, summed gradients) |
    #                           fsdp (FSDP2: weights, gradients, optimizer state sharded; sharded checkpoints)


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
    init: str = ""            # "" = from scratch; else a tandem run (or checkpoint) whose newest committed
                              # weights and tokenizer SFT starts from (`tandem sft --init`; fresh optimizer)
    batch_size: int = 32      # sequences per micro-batch
    grad_accum: int = 1       # micro-batches per optimizer step
    lr: float = 3e-3          # peak learning rate
    min_lr_ratio: float = 0.1 # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20    # linear warmup from 0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0    # max global grad norm (0 = off)
    dtype: str = "fp32"       # fp32 | bf16 (bf16 autocast, fp32 master weights) | auto (bf16 where fast)
    device: str = ""          # "" = run.device
    max_seq_len: int = 256    # longer examples are truncated
    packing: bool = True      # padding-free micro-batches: examples packed into rows, each attending
                              # only to itself (tandem/train/packing.py); false: right-padded rows
    checkpoint_every: int = 100
    keep_checkpoints: int = 3 # newest K committed checkpoints kept
    log_every: int = 10


@dataclass
class RLConfig:
    """GRPO (tandem/train/grpo.py): the trainer role. Papers are cited in grpo.py, next to each option."""
    steps: int = 50                # GRPO steps; each trains on one batch of rollouts
    prompts_per_step: int = 8      # distinct prompts per batch
    group_size: int = 8            # G: samples per prompt; advantages are relative within a group (>= 2)
    tasks: list = field(default_factory=list)  # tasks whose prompts RL trains on ([] = data.tasks)
    system_prompt: str = ""        # a system turn before every RL prompt (e.g. the answer format for an
                                   # instruct model that never saw <think>/<answer>); "" = none
    correctness_weight: float = 1.0  # reward = correctness_weight * correct + format_weight * format_ok
    format_weight: float = 0.1
    temperature: float = 1.0       # rollout sampling temperature (> 0; 1 keeps rollouts on-policy, grpo.py)
    top_p: float = 1.0             # rollout nucleus sampling (1 = off)
    max_new_tokens: int = 128      # completion length cap
    max_prompt_len: int = 128      # longer prompts are an error (raise this for long JSONL prompts)
    mode: str = "async"            # async: batch k+1 is generated with weights k while the trainer
                                   # updates (one step stale, corrected by tis_cap); sync: on-policy
    tis_cap: float = 2.0           # C in min(exp(logp_train_old - logp_rollout), C) (0 = no correction)
    lr: float = 2e-5               # peak learning rate (AdamW)
    warmup_steps: int = 0          # linear warmup from 0 to lr
    min_lr_ratio: float = 1.0      # after warmup, cosine decay to lr * min_lr_ratio (1 = constant, as verl;
                                   # TRL decays to 0 by default)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0         # max global grad norm (0 = off)
    updates_per_batch: int = 1     # mu: optimizer steps on each batch (> 1 makes the clip bite)
    micro_batch_size: int = 0      # sequences per forward/backward (0 = the whole batch at once)
    clip_eps: float = 0.2          # epsilon: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float = 0.0     # 0 = clip_eps (symmetric); DAPO uses 0.28
    kl_coef: float = 0.0           # beta: k3 KL penalty to the frozen initial policy (0 = no reference)
    loss_norm: str = "dapo"        # grpo (per-sequence mean) | dapo (per-token) | dr_grpo (constant)
    loss: str = "grpo"             # grpo (token-level ratio) | gspo (one ratio per sequence, GSPO; its
                                   # clip is gspo_clip/gspo_clip_high and its tokens average per sequence)
    gspo_clip: float = 3e-4        # GSPO's sequence ratio clipped to [1 - gspo_clip, 1 + gspo_clip_high]
    gspo_clip_high: float = 4e-4   # (the GSPO paper's values)
    scale_rewards: str = "group"   # advantage divisor: group std | batch std | none (Dr. GRPO)
    filter_groups: bool = False    # drop groups whose rewards are all equal (zero advantage) from the
                                   # update, as DAPO's dynamic sampling does (without its resampling)
    dtype: str = "fp32"            # trainer compute: fp32 | bf16 (autocast, fp32 master weights) | auto
    packing: bool = True           # padding-free update: sequences packed, each attending only to itself
                                   # (tandem/train/packing.py); false: right-padded rows
    device: str = ""               # trainer device ("" = run.device)
    threads: int = 0               # trainer torch threads (0 = run.threads)
    trainers: int = 1              # trainer ranks (data parallel over the trainer device's backend)
    checkpoint_every: int = 25
    keep_checkpoints: int = 2      # newest K committed RL checkpoints kept
    log_every: int = 1


@dataclass
class RolloutConfig:
    """Rollout workers (tandem/train/rollout.py): the inference role, on its own device and dtype."""
    workers: int = 1               # rollout worker processes (0 = colocated: the trainer generates itself)
    device: str = ""               # rollout device ("" = run.device), e.g. an Ascend device next to an NVIDIA trainer
    dtype: str = "fp32"            # rollout compute dtype: auto (bf16 where fast, else fp32) | fp32 | bf16 | fp16
    threads: int = 1               # torch threads per worker process
    max_batch: int = 64            # engine KV-cache slots per worker (concurrent sequences)
    timeout: float = 300.0         # seconds a worker may hold work without returning a result before
                                   # it is declared hung, killed (if local) and its prompts reassigned
    max_restarts: int = 3          # respawns per local worker before it is given up
    port: int = 0                  # TCP port of the job's store for local runs (0 = any free port)


@dataclass
class EvalConfig:
    n: int = 200              # held-out examples per task
    split: str = "test"       # test (claims) or validation (while tuning a preset: the test split stays unseen)
    batch_size: int = 64
    max_new_tokens: int = 128
    pass_k: int = 0           # k for sampled pass@k (0 = greedy pass@1 only)
    temperature: float = 0.8  # sampling temperature for pass@k
    samples_in_report: int = 4
    device: str = ""          # "" = run.device
    dtype: str = "fp32"


@dataclass
class ResilienceConfig:
    """Surviving unstable hardware (tandem/resilience/)."""
    faults: str = ""               # injected faults, e.g. "kill@37,hang@50,nan@60,bitflip:grad@70" (grammar
                                   # in resilience/faults.py); each fires once per run folder
    mtbf: float = 0.0              # also inject random faults, one per `mtbf` steps on average (0 = off)
    mtbf_kinds: list = field(default_factory=lambda: ["kill", "device_error"])  # what the random faults are
    fault_seed: int = 0            # seeds the random faults and where bit flips land
    guard: bool = True             # skip an update whose loss or gradient is non-finite or whose grad
                                   # norm spikes (a z-score of log(norm) over the recent steps)
    guard_window: int = 50         # steps of grad-norm history; also the window for counting skips
    guard_zscore: float = 8.0      # skip when log(grad norm) is this many std above the window mean
    guard_min_history: int = 20    # the z-score test starts once the window holds this many norms
    rollback_after: int = 3        # this many skips within guard_window steps roll back to the last
                                   # checkpoint before the trouble (0 = never roll back)
    max_rollbacks: int = 3         # rollbacks in a row without progress (no update applied past the step
                                   # the previous rollback left) before training gives up: one-line
                                   # error, exit status 3, not retried by --supervise; it also gives up
                                   # when the last guard_window updates were all skipped (0 = never give up)
    replicas: int = 1              # in-process model replicas fed the same batches (2 = silent-corruption
                                   # detection that can tell the bad replica and repair it; 2x compute)
    check_every: int = 0           # compare weight and gradient fingerprints every K steps (0 = off; with
                                   # one replica a checked step is computed twice)
    async_checkpoint: bool = False # write checkpoints in a background thread (the step waits only for
                                   # a copy to host memory)
    heartbeat_timeout: float = 30.0  # --supervise: a job with no step for this long is hung: killed, restarted
    startup_timeout: float = 300.0   # --supervise: the same, before the first step of each attempt
    backoff: float = 1.0           # --supervise: delay before a restart that follows a restart without
                                   # progress; doubles each time (a restart after progress is immediate)
    backoff_max: float = 30.0      # --supervise: cap on that delay


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
    "rl": RLConfig, "rollout": RolloutConfig, "resilience": ResilienceConfig,
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
        head_dim_given = isinstance(data.get("model"), dict) and "head_dim" in data["model"]
    else:
        head_dim_given = False
    for text in overrides:
        section, name, value = parse_override(text)
        _apply(cfg, section, {name: value}, "--set")
        head_dim_given |= (section, name) == ("model", "head_dim")
    if cfg.model.is_latent:  # HF DeepseekV3Config: head_dim is the rotary width
        cfg.model.head_dim = cfg.model.qk_rope_head_dim
    elif not head_dim_given:  # derived from the final width and head count, like HF's default
        cfg.model.head_dim = cfg.model.hidden_size // max(1, cfg.model.num_attention_heads)
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


# Training has no loss scaling, so fp16 gradients would underflow silently; inference may use fp16.
TRAIN_DTYPES = "auto, fp32, bf16 (auto: bf16 where the device has bf16 units; fp16 only for inference: no loss scaling)"


def _check(condition: bool, key: str, allowed: str, value) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")


def _validate_rl(cfg: Config) -> None:
    r, w = cfg.rl, cfg.rollout
    _check(r.steps >= 0, "rl.steps", ">= 0", r.steps)
    _check(r.prompts_per_step >= 1, "rl.prompts_per_step", ">= 1", r.prompts_per_step)
    _check(0 <= r.min_lr_ratio <= 1, "rl.min_lr_ratio", "0..1", r.min_lr_ratio)
    _check(r.group_size >= 2, "rl.group_size", ">= 2 (group-relative advantages need two or more samples "
           "per prompt)", r.group_size)
    _check(r.temperature > 0, "rl.temperature", "> 0 (rollouts must sample)", r.temperature)
    _check(0 < r.top_p <= 1, "rl.top_p", "0 < top_p <= 1", r.top_p)
    _check(r.max_new_tokens >= 1, "rl.max_new_tokens", ">= 1", r.max_new_tokens)
    _check(r.max_prompt_len >= 1, "rl.max_prompt_len", ">= 1", r.max_prompt_len)
    _check(r.mode in ("async", "sync"), "rl.mode", "async, sync", r.mode)
    _check(r.tis_cap == 0 or r.tis_cap >= 1, "rl.tis_cap", "0 (off) or >= 1", r.tis_cap)
    _check(r.lr > 0, "rl.lr", "> 0", r.lr)
    _check(r.warmup_steps >= 0, "rl.warmup_steps", ">= 0", r.warmup_steps)
    _check(r.updates_per_batch >= 1, "rl.updates_per_batch", ">= 1", r.updates_per_batch)
    _check(r.micro_batch_size >= 0, "rl.micro_batch_size", ">= 0 (0 = whole batch)", r.micro_batch_size)
    _check(0 < r.clip_eps < 1, "rl.clip_eps", "0 < clip_eps < 1", r.clip_eps)
    _check(r.clip_eps_high >= 0, "rl.clip_eps_high", ">= 0 (0 = clip_eps)", r.clip_eps_high)
    _check(r.kl_coef >= 0, "rl.kl_coef", ">= 0", r.kl_coef)
    _check(r.loss_norm in ("grpo", "dapo", "dr_grpo"), "rl.loss_norm", "grpo, dapo, dr_grpo", r.loss_norm)
    _check(r.loss in ("grpo", "gspo"), "rl.loss", "grpo, gspo", r.loss)
    _check(0 < r.gspo_clip < 1 and r.gspo_clip_high > 0, "rl.gspo_clip / rl.gspo_clip_high",
           "0 < gspo_clip < 1 and gspo_clip_high > 0", (r.gspo_clip, r.gspo_clip_high))
    _check(r.scale_rewards in ("group", "batch", "none"), "rl.scale_rewards", "group, batch, none", r.scale_rewards)
    _check(r.threads >= 0 and w.threads >= 0, "rl.threads / rollout.threads", ">= 0", (r.threads, w.threads))
    _check(1 <= r.trainers <= r.prompts_per_step * r.group_size, "rl.trainers",
           ">= 1 and at most one trainer per sequence of a batch", r.trainers)
    _check(r.checkpoint_every >= 1, "rl.checkpoint_every", ">= 1", r.checkpoint_every)
    _check(r.keep_checkpoints >= 1, "rl.keep_checkpoints", ">= 1", r.keep_checkpoints)
    _check(r.log_every >= 1, "rl.log_every", ">= 1", r.log_every)
    _check(r.dtype in ("auto", "fp32", "bf16"), "rl.dtype", TRAIN_DTYPES, r.dtype)
    _check(w.dtype in ("auto", "fp32", "bf16", "fp16"), "rollout.dtype", "auto, fp32, bf16, fp16", w.dtype)
    _check(w.workers >= 0, "rollout.workers", ">= 0 (0 = colocated in the trainer)", w.workers)
    _check(w.max_batch >= 1, "rollout.max_batch", ">= 1", w.max_batch)
    _check(w.timeout > 0, "rollout.timeout", "> 0 seconds", w.timeout)
    _check(w.max_restarts >= 0, "rollout.max_restarts", ">= 0", w.max_restarts)
    _check(0 <= w.port < 65536, "rollout.port", "0..65535 (0 = any free port)", w.port)


def _validate_latent(m: ModelConfig) -> None:
    """MLA + DeepSeekMoE shape rules (deepseek_v3); on a dense arch none of their fields may be set."""
    if not m.is_latent:
        for key in LATENT_FIELDS:
            _check(getattr(m, key) == 0, f"model.{key}", f'0 on arch {m.arch!r} (MLA/MoE fields need '
                   f'model.arch = "deepseek_v3")', getattr(m, key))
        return
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
        _check(getattr(m, key) > 0, f"model.{key}", "> 0 for deepseek_v3", getattr(m, key))
    _check(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim",
           "an even number > 0", m.qk_rope_head_dim)
    _check(m.num_key_value_heads == m.num_attention_heads, "model.num_key_value_heads",
           "= model.num_attention_heads for deepseek_v3 (MLA has no grouped-query heads)", m.num_key_value_heads)
    _check(m.num_experts_per_tok <= m.n_routed_experts, "model.num_experts_per_tok",
           f"<= model.n_routed_experts ({m.n_routed_experts})", m.num_experts_per_tok)
    _check(m.n_routed_experts % m.n_group == 0, "model.n_routed_experts",
           f"a multiple of model.n_group ({m.n_group})", m.n_routed_experts)
    _check(m.topk_group <= m.n_group, "model.topk_group", f"<= model.n_group ({m.n_group})", m.topk_group)
    _check(m.num_experts_per_tok <= m.topk_group * (m.n_routed_experts // m.n_group), "model.num_experts_per_tok",
           "<= the experts in the kept groups (topk_group x n_routed_experts / n_group)", m.num_experts_per_tok)
    _check(0 <= m.first_k_dense_replace <= m.num_hidden_layers, "model.first_k_dense_replace",
           f"0..model.num_hidden_layers ({m.num_hidden_layers})", m.first_k_dense_replace)
    _check(m.routed_scaling_factor > 0, "model.routed_scaling_factor", "> 0", m.routed_scaling_factor)
    _check(m.bias_update_speed >= 0, "model.bias_update_speed", ">= 0 (0 = off)", m.bias_update_speed)
    _check(m.aux_loss_alpha >= 0, "model.aux_loss_alpha", ">= 0 (0 = off)", m.aux_loss_alpha)


def _validate_resilience(r: ResilienceConfig) -> None:
    from tandem.resilience.faults import parse_schedule
    parse_schedule(r.faults)
    parse_schedule(",".join(f"{kind}@1" for kind in r.mtbf_kinds), key="resilience.mtbf_kinds")
    _check(r.mtbf >= 0, "resilience.mtbf", ">= 0 steps (0 = off)", r.mtbf)
    _check(r.guard_window >= 1 and r.guard_min_history >= 2, "resilience.guard_window / guard_min_history",
           "window >= 1, min_history >= 2", (r.guard_window, r.guard_min_history))
    _check(r.guard_zscore > 0, "resilience.guard_zscore", "> 0", r.guard_zscore)
    _check(r.rollback_after >= 0, "resilience.rollback_after", ">= 0 (0 = never)", r.rollback_after)
    _check(r.max_rollbacks >= 0, "resilience.max_rollbacks", ">= 0 (0 = never give up)", r.max_rollbacks)
    _check(r.replicas >= 1, "resilience.replicas", ">= 1", r.replicas)
    _check(r.check_every >= 0, "resilience.check_every", ">= 0 (0 = off)", r.check_every)
    _check(r.replicas == 1 or r.check_every >= 1, "resilience.check_every",
           ">= 1 when resilience.replicas > 1 (replicas are only useful if compared)", r.check_every)
    for key in ("heartbeat_timeout", "startup_timeout", "backoff_max"):
        _check(getattr(r, key) > 0, f"resilience.{key}", "> 0 seconds", getattr(r, key))
    _check(r.backoff >= 0, "resilience.backoff", ">= 0 seconds", r.backoff)


def _validate_finite(cfg: Config) -> None:
    """No float field of any section may be inf or nan (TOML and --set accept both)."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for key, tp in typing.get_type_hints(type(section)).items():
            value = getattr(section, key)
            _check(tp is not float or math.isfinite(value), f"{name}.{key}", "a finite number", value)


def validate(cfg: Config) -> None:
    m, s = cfg.model, cfg.sft
    _validate_finite(cfg)
    _validate_rl(cfg)
    _check(m.arch in ARCHITECTURES, "model.arch", ", ".join(ARCHITECTURES), m.arch)
    _validate_latent(m)
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
    _check(s.dtype in ("auto", "fp32", "bf16"), "sft.dtype", TRAIN_DTYPES, s.dtype)
    _check(cfg.run.parallel in ("ddp", "fsdp"), "run.parallel", "ddp, fsdp", cfg.run.parallel)
    _check(cfg.eval.dtype in ("fp32", "bf16", "fp16"), "eval.dtype", "fp32, bf16, fp16", cfg.eval.dtype)
    _check(len(cfg.data.tasks) >= 1, "data.tasks", "a non-empty list of task names", cfg.data.tasks)
    _check(s.max_seq_len <= m.max_position_embeddings, "sft.max_seq_len",
           f"<= model.max_position_embeddings ({m.max_position_embeddings})", s.max_seq_len)
    _check(cfg.eval.n >= 1, "eval.n", ">= 1", cfg.eval.n)
    _check(cfg.eval.split in ("test", "validation"), "eval.split", "test or validation", cfg.eval.split)
    _check(cfg.eval.pass_k >= 0, "eval.pass_k", ">= 0", cfg.eval.pass_k)
    x = cfg.export
    _check(all(f in ("hf", "gguf") for f in x.formats) and len(set(x.formats)) == len(x.formats),
           "export.formats", 'a list of distinct "hf", "gguf"', x.formats)
    _check(x.hf_dtype in ("auto", "fp32", "bf16", "fp16"), "export.hf_dtype", "auto, fp32, bf16, fp16", x.hf_dtype)
    _check(x.gguf_type in ("f32", "f16", "q8_0"), "export.gguf_type", "f32, f16, q8_0", x.gguf_type)
    _check(not (m.is_latent and "gguf" in x.formats), "export.formats", '["hf"] for model.arch = "deepseek_v3" '
           "(its GGUF export, llama.cpp's deepseek2, is not implemented yet)", x.formats)
    _check(x.gate_n >= 1, "export.gate_n", ">= 1", x.gate_n)
    _validate_resilience(cfg.resilience)
    if not cfg.run.deterministic and (cfg.resilience.check_every or cfg.resilience.replicas > 1):
        raise ConfigError("resilience.check_every / resilience.replicas compare exact fingerprints, which "
                          "nondeterministic kernels break (false corruption alarms): set run.deterministic = true "
                          "or resilience.check_every = 0 and resilience.replicas = 1")


def config_diff(a: dict, b: dict, prefix: str = "", ignore=frozenset()) -> list[str]:
    """Keys whose values differ between two resolved configs, as 'section.key: old -> new';
    keys named in `ignore` ('section.key') are not compared."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "task_params":
            diffs += config_diff(va, vb, f"{prefix}{key}.", ignore)
        elif va != vb and f"{prefix}{key}" not in ignore:
            diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return diffs
