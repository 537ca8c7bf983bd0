"""Checkpoints commit atomically, verify on load, and a broken one is skipped with a warning."""

import json

import pytest
import torch

from tandem.errors import CheckpointError
from tandem.train.checkpoint import (latest_valid, list_checkpoints, load_checkpoint, save_checkpoint,
                                     verify_checkpoint)


def _save(root, step, keep=3):
    weights = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3.0)}
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(2)
    opt.step()
    return save_checkpoint(root, step, weights, {"phase": "sft", "data_position": step}, opt.state_dict(),
                           extra_files={"note.json": b'{"x": 1}'}, keep=keep)


def test_round_trip_and_manifest(tmp_path):
    folder = _save(tmp_path, 5)
    assert folder.name == "step_000005" and verify_checkpoint(folder) is None
    ckpt = load_checkpoint(folder)
    assert ckpt["train_state"]["step"] == 5 and torch.equal(ckpt["model"]["w"], torch.full((4, 4), 5.0))
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param])
    opt.load_state_dict(ckpt["optimizer"])
    assert torch.is_tensor(opt.state[param]["exp_avg"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "train_state.json", "note.json"}
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_manifest", "missing_file"])
def test_damaged_checkpoint_is_skipped(tmp_path, damage, capsys):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "bitflip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    assert verify_checkpoint(newest) is not None
    assert latest_valid(tmp_path).name == "step_000001"
    assert "skipping checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not usable"):
        load_checkpoint(newest)


def test_keeps_newest_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_000004"]


def test_leftover_temp_folder_from_a_crash_is_cleaned(tmp_path):
    stale = tmp_path / ".tmp-step_000009-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, 1)
    assert not stale.exists() and latest_valid(tmp_path).name == "step_000001"
