"""Issue 15 items 13 and 14: the save API refuses to overwrite by default, says what to do in a
save's own terms, and bad shard sizes raise their own error class."""

from __future__ import annotations

from pathlib import Path

import pytest

import bagelverify as bv
from bagelverify.synthetic import SyntheticCheckpoint


@pytest.fixture
def stage1_state(synthetic_checkpoint: SyntheticCheckpoint) -> dict[str, object]:
    return dict(bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1))


def test_a_save_refuses_an_existing_checkpoint_unless_overwrite(
    stage1_state: dict[str, object], tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    bv.save_bagel_checkpoint(stage1_state, folder, stage=1)  # type: ignore[arg-type]
    before = (folder / "ema.safetensors").read_bytes()
    with pytest.raises(
        FileExistsError,
        match=r"already holds a checkpoint \(ema\.safetensors\); "
        r"pass overwrite=True",
    ):
        bv.save_bagel_checkpoint(stage1_state, folder, stage=1)  # type: ignore[arg-type]
    assert (folder / "ema.safetensors").read_bytes() == before
    bv.save_bagel_checkpoint(stage1_state, folder, stage=1, overwrite=True)  # type: ignore[arg-type]


def test_a_sharded_save_refuses_an_existing_index_unless_overwrite(
    stage1_state: dict[str, object], tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    bv.save_bagel_checkpoint(stage1_state, folder, stage=1, max_shard_size="1MB")  # type: ignore[arg-type]
    with pytest.raises(FileExistsError, match=r"model\.safetensors\.index\.json"):
        bv.save_bagel_checkpoint(stage1_state, folder, stage=1, max_shard_size="1MB")  # type: ignore[arg-type]


def test_saving_und_weights_for_stage_2_says_pass_stage_1(
    synthetic_checkpoint: SyntheticCheckpoint, stage1_state: dict[str, object], tmp_path: Path
) -> None:
    """Stage 2 expects GEN keys; the message is about saving, not loading. (Before issue 32 this
    was the default stage; now a save writes the stage its state dict holds.)"""
    config = bv.BagelConfig.from_pretrained(synthetic_checkpoint.path)
    with pytest.raises(bv.MissingKeysError) as info:
        bv.save_bagel_checkpoint(stage1_state, tmp_path / "out", stage=2, config=config)  # type: ignore[arg-type]
    message = str(info.value)
    assert "Pass stage=1 (--stage 1) to save its UND weights" in message
    assert "to load" not in message and "Load it" not in message


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("5XB", r"max_shard_size '5XB': unknown unit 'XB'"),
        ("-1", r"max_shard_size must be a byte count or a string like '5GB', got '-1'"),
        (0, r"max_shard_size must be positive, got 0"),
        (True, r"got True"),
    ],
)
def test_bad_shard_sizes_are_a_shard_size_error(
    stage1_state: dict[str, object], tmp_path: Path, size: object, message: str
) -> None:
    with pytest.raises(bv.ShardSizeError, match=message):
        bv.save_bagel_checkpoint(stage1_state, tmp_path / "o", stage=1, max_shard_size=size)  # type: ignore[arg-type]
    assert not (tmp_path / "o" / "ema.safetensors").exists()
