"""The package's shape (issue 11): what `import bagelverify` loads, where each error class
lives, the destination-error taxonomy, and the hf_to_dcp config fix."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bagelverify as bv
from bagelverify import errors
from bagelverify.config import CONFIG_FILES, BagelConfig
from bagelverify.safetensors_io import DTYPES
from bagelverify.synthetic import SyntheticCheckpoint


def test_importing_the_package_loads_neither_the_proofs_nor_argparse() -> None:
    """`import bagelverify` stays light: check_patterns is exported lazily."""
    code = (
        "import sys, bagelverify; "
        "assert 'bagelverify.verify' not in sys.modules, 'verify'; "
        "assert 'argparse' not in sys.modules, 'argparse'; "
        "from bagelverify.verify import check_patterns; "
        "assert bagelverify.check_patterns is check_patterns"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_error_class_is_exported_from_the_package() -> None:
    """Each class a public function raises can be caught as bagelverify.<Name>."""
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.BagelError)
    }
    assert classes <= set(bv.__all__)
    assert all(getattr(bv, name) is getattr(errors, name) for name in classes)
    assert issubclass(bv.UnsupportedPattern, bv.PatternError)


def test_unsupported_pattern_is_raised_by_check_patterns_from_errors() -> None:
    with pytest.raises(bv.UnsupportedPattern, match=r"cannot be translated exactly") as info:
        bv.check_patterns(und=[r"\Aa(?=b)b\Z"], gen=[], vae=[], extra=[])
    assert type(info.value).__module__ == "bagelverify.errors"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Offsets of every data read (all tensor bytes go through os.preadv)."""
    log: list[int] = []
    real = os.preadv

    def recording(fd: int, buffers: list[memoryview], offset: int) -> int:
        log.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", recording)
    yield log


def stage1_zeros(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    report = bv.inspect_checkpoint(folder, stage=1)
    return {
        native: torch.zeros(info.shape, dtype=dtype or DTYPES[info.dtype].torch_dtype)
        for native, info in report.retained.items()
    }


def test_a_refused_cast_is_a_destination_error_still_caught_as_shape_mismatch(
    synthetic_checkpoint: SyntheticCheckpoint, reads: list[int]
) -> None:
    master = stage1_zeros(synthetic_checkpoint.path, torch.float32)
    with pytest.raises(bv.DestinationError, match=r"not allowed by cast='exact'") as info:
        bv.load_into(master, synthetic_checkpoint.path, cast="exact")
    assert isinstance(info.value, bv.ShapeMismatchError) and reads == []


def test_a_meta_destination_is_a_destination_error(
    synthetic_checkpoint: SyntheticCheckpoint, reads: list[int]
) -> None:
    destination = stage1_zeros(synthetic_checkpoint.path)
    key = next(iter(destination))
    destination[key] = torch.empty_like(destination[key], device="meta")
    with pytest.raises(bv.DestinationError, match=rf"{key}: destination is on the meta device"):
        bv.load_into(destination, synthetic_checkpoint.path)
    assert reads == []


def test_an_expanded_destination_is_refused_before_any_read(
    synthetic_checkpoint: SyntheticCheckpoint, reads: list[int]
) -> None:
    """Issue 14 item 5: a stride-0 view cannot take a plain copy; it is refused in the check,
    so no destination is written (before, 40 of 59 were, then torch raised)."""
    destination = stage1_zeros(synthetic_checkpoint.path)
    last = [k for k, v in destination.items() if v.dim() == 2 and v.shape[0] > 1][-1]
    rows, cols = destination[last].shape
    destination[last] = torch.zeros(1, cols, dtype=destination[last].dtype).expand(rows, cols)
    before = {k: v.clone() for k, v in destination.items() if k != last}
    with pytest.raises(bv.DestinationError, match=rf"{last}: destination's elements share memory"):
        bv.load_into(destination, synthetic_checkpoint.path)
    assert reads == []
    assert all(torch.equal(destination[k], v) for k, v in before.items())


def test_a_transposed_destination_is_not_refused(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """Non-contiguous but non-overlapping destinations are loaded (through staging)."""
    destination = stage1_zeros(synthetic_checkpoint.path)
    key = next(k for k, v in destination.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    rows, cols = destination[key].shape
    destination[key] = torch.zeros(cols, rows, dtype=destination[key].dtype).t()
    bv.load_into(destination, synthetic_checkpoint.path)
    expected = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    assert torch.equal(destination[key], expected[key])


def test_missing_keys_error_keeps_missing_and_unexpected_apart(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    destination = stage1_zeros(synthetic_checkpoint.path)
    dropped = next(iter(destination))
    del destination[dropped]
    destination["model.language_model.model.layers.999.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(bv.MissingKeysError) as info:
        bv.load_into(destination, synthetic_checkpoint.path)
    assert info.value.keys == ["model.language_model.model.layers.999.mlp.up_proj.weight"]
    assert info.value.unexpected == [dropped]


def test_other_problems_ride_on_the_raised_error_not_the_log(
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A load with two problems raises the first with the second as a note, logging neither
    (issue 15 item 7: a caught error printed nothing at ERROR)."""
    state = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=2)
    hf = bv.BagelStateDictAdapter().to_hf(state)
    hf["not.a.bagel.key"] = torch.zeros(1)
    del hf["language_model.model.norm.weight"]
    folder = tmp_path / "two"
    folder.mkdir()
    from bagelverify.safetensors_io import save_tensors

    save_tensors(folder / "ema.safetensors", hf)
    config = BagelConfig.from_pretrained(synthetic_checkpoint.path)
    with caplog.at_level("DEBUG", logger="bagelverify"), pytest.raises(bv.UnknownKeysError) as info:
        bv.load_bagel_checkpoint_state_dict(folder, config=config)
    assert any("MissingKeysError" in note for note in info.value.__notes__)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


@pytest.mark.parametrize("kind", ["folder", "foreign object"])
def test_hf_to_dcp_accepts_a_config_folder_or_a_foreign_config(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, kind: str
) -> None:
    """hf_to_dcp(config=<folder>) used to write the DCP files and then fail with
    AttributeError ('str' object has no attribute 'save_pretrained')."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    BagelConfig.from_pretrained(synthetic_checkpoint.path).save_pretrained(config_dir)
    given: object = str(config_dir) if kind == "folder" else types.SimpleNamespace(x=1)
    count = bv.hf_to_dcp(synthetic_checkpoint.path, tmp_path / "dcp", stage=1, config=given)
    assert count == 821
    source = config_dir if kind == "folder" else synthetic_checkpoint.path
    for name in CONFIG_FILES:
        assert (tmp_path / "dcp" / name).read_bytes() == (source / name).read_bytes()
    back = tmp_path / "back"
    bv.dcp_to_hf(tmp_path / "dcp", back, stage=1)
    assert len(bv.inspect_checkpoint(back).plan.native) == 821
