"""Issue 32's quieter, truer output: a DCP conversion summarised, repair's table of the filled
families only, progress that counts the bytes written and never runs ahead of the disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import edited_copy

from bagelverify import cli
from bagelverify.checkpoint import convert_checkpoint
from bagelverify.manifest import MODEL_FILE
from bagelverify.rewrite import rewrite_checkpoint
from bagelverify.safetensors_io import read_header
from bagelverify.synthetic import SyntheticCheckpoint

LOST = "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"


def test_convert_to_dcp_summarises_its_files(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: one entry per .distcp file (1,228 at full size)."""
    assert (
        cli.main(["convert", str(synthetic_checkpoint.path), str(tmp_path / "d"), "--to", "dcp"])
        == 0
    )
    out = capsys.readouterr().out
    assert "1,223 .distcp files __0_0.distcp .. " in out
    assert out.count(".distcp") == 3 and len(out.splitlines()) <= 4


@pytest.fixture(scope="module")
def lacking(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return edited_copy(synthetic_checkpoint, tmp_path_factory.mktemp("lacking"), drop=[LOST])


def test_repair_lists_only_the_families_it_filled(
    synthetic_checkpoint: SyntheticCheckpoint,
    lacking: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: a row per family, 34 of them "N / 0"."""
    base = str(synthetic_checkpoint.path)
    assert cli.main(["repair", str(lacking), "--base", base, "-o", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rows = out[out.index("Families filled from BASE") :].splitlines()[2:]
    family, _, from_base = rows[0].split()
    assert (family, from_base) == ("vit.fc1", "1")
    assert rows[1] == ""  # one family filled, one row
    full = ["repair", base, "--base", base, "-o", str(tmp_path / "r2"), "--dry-run"]
    assert cli.main(full) == 0
    assert "nothing to fill: SRC holds every key stage2 expects" in capsys.readouterr().out


def test_progress_counts_the_bytes_written_and_ends_when_published(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """Before: the bytes read (the source's BF16 bytes for an F32 output), reported before each
    write, so the bar reached its end while the last tensor and fsync were still to come."""
    seen: list[tuple[str, int, bool]] = []
    out = tmp_path / "f32"

    def on_tensor(key: str, nbytes: int) -> None:
        seen.append((key, nbytes, (out / MODEL_FILE).exists()))

    report = rewrite_checkpoint(synthetic_checkpoint.path, out, dtype="f32", on_tensor=on_tensor)
    assert report.bytes_after != report.bytes_before
    assert sum(nbytes for _, nbytes, _ in seen) == report.bytes_after
    assert [published for _, _, published in seen] == [False] * (len(seen) - 1) + [True]
    seen.clear()
    out = tmp_path / "copy"
    convert_checkpoint(synthetic_checkpoint.path, out, stage="stage1", on_tensor=on_tensor)
    written = read_header(out / MODEL_FILE).tensors
    assert sum(nbytes for _, nbytes, _ in seen) == sum(i.nbytes for i in written.values())
    assert seen[-1][2] and not any(published for _, _, published in seen[:-1])
