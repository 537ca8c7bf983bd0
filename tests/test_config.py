"""Presets load, overrides apply, and every mistake names the key and what is allowed."""

from pathlib import Path

import pytest

from tandem.config import config_from_dict, load_config, parse_override, presets
from tandem.errors import ConfigError


def test_presets_exist_and_load():
    assert {"smoke", "tiny"} <= set(presets())
    for name in presets():
        cfg = load_config(preset=name)
        assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_overrides_apply_with_toml_types():
    cfg = load_config(preset="smoke", overrides=["sft.steps=7", "sft.lr=1e-3", "run.device=cpu",
                                                 'data.tasks=["addition", "countdown"]', "sft.dtype=bf16"])
    assert (cfg.sft.steps, cfg.sft.lr, cfg.run.device, cfg.data.tasks, cfg.sft.dtype) == \
        (7, 1e-3, "cpu", ["addition", "countdown"], "bf16")
    assert parse_override("model.hidden_size=64") == ("model", "hidden_size", 64)


@pytest.mark.parametrize("override,needle", [
    ("sft.stpes=3", "unknown config key 'sft.stpes'"),
    ("sft.steps=abc", "'sft.steps' must be int"),
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("sftsteps", "--set section.key=value"),
    ("sft.dtype=fp8", "sft.dtype"),
    ("sft.dtype=fp16", "no loss scaling"),                  # fp16 gradients would underflow silently
    ("rl.dtype=fp16", "no loss scaling"),
    ("model.num_key_value_heads=3", "a divisor of model.num_attention_heads"),
    ("sft.lr=inf", "'sft.lr' = inf is out of range; allowed: a finite number"),
    ("rl.lr=nan", "'rl.lr' = nan"),
    ("model.rope_theta=-inf", "'model.rope_theta' = -inf"),
    ("resilience.heartbeat_timeout=inf", "'resilience.heartbeat_timeout' = inf"),
    ("resilience.max_rollbacks=-1", "resilience.max_rollbacks"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=[override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known presets: .*smoke.*tiny"):
        load_config(preset="huge")


def test_config_file(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('[sft]\nsteps = 3\n[data]\ntasks = ["countdown"]\n')
    cfg = load_config(path=path)
    assert cfg.sft.steps == 3 and cfg.data.tasks == ["countdown"]
    path.write_text("[sft\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path=path)


def test_package_stays_python_3_10_compatible():
    """pyproject.toml promises 3.10: the grammar parses as 3.10 (best effort: ast's feature_version),
    and TOML goes through tandem/tomlcompat.py only (tomllib is 3.11+; 3.10 gets tomli)."""
    import ast
    package = Path(__file__).resolve().parent.parent / "tandem"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
        if path.name == "tomlcompat.py":
            continue
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"tomllib", "tomli"} & set(names), f"{path}: import TOML via tandem.tomlcompat"
            if isinstance(node, ast.ImportFrom) and node.module in ("typing", "enum", "datetime"):
                late = {a.name for a in node.names} & {"Self", "StrEnum", "UTC", "LiteralString", "Never"}
                assert not late, f"{path}: {late} is Python 3.11+"
