"""Calls ``mypy --strict`` must refuse (tests/test_typing.py checks each line is flagged): the
values below pass a plain ``object`` annotation but are not stages, weights, dtypes or configs."""

from __future__ import annotations

from pathlib import Path

import bagelverify as bv


def main(folder: Path) -> None:
    bv.load_bagel_checkpoint_state_dict(folder, stage=3)  # error: stage
    bv.inspect_checkpoint(folder, weights="emaa")  # error: weights
    bv.make_synthetic_checkpoint(folder, dtype="int8")  # error: dtype
    bv.save_bagel_checkpoint({}, folder, config=42)  # error: config
    bv.BagelStateDictAdapter(stage="stage3")  # error: stage
