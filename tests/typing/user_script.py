"""A user's script, type-checked by ``mypy --strict`` against the installed package
(tests/test_typing.py, .ci/run): the README's main job, written as a user would."""

from __future__ import annotations

from pathlib import Path

import torch

import bagelverify as bv
from bagelverify import BagelConfig, Bucket, CheckpointReport


def main(folder: Path) -> None:
    bv.make_synthetic_checkpoint(folder, scale=32, dtype="bf16")
    report: CheckpointReport = bv.inspect_checkpoint(folder, stage="stage2", weights="ema")
    assert report.stage in ("stage1", "stage2")
    state: dict[str, torch.Tensor] = bv.load_bagel_checkpoint_state_dict(
        folder, stage=1, config=str(folder), weights=None
    )
    config = BagelConfig.from_pretrained(folder)
    bv.save_bagel_checkpoint(state, folder / "out", config=config)
    bv.convert_checkpoint(folder, folder / "native", stage="stage1", keys="native", config=folder)
    parts: dict[Bucket, list[str]] = bv.partition(list(state))
    by_bucket: dict[Bucket, dict[str, torch.Tensor]] = bv.partition(state)
    assert len(parts) == len(by_bucket)
    adapter = bv.BagelStateDictAdapter(stage="2")
    hf = adapter.to_hf(adapter.from_hf(state))
    assert set(hf) <= set(state) | {key.removeprefix("model.") for key in state}
