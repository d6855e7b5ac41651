"""``TensorReader`` reading through borrowed descriptors, and ``diff`` reading through the
descriptors its headers were read through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bagelverify import diff, repair, rewrite
from bagelverify.checkpoint import open_weights
from bagelverify.manifest import MODEL_FILE
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint, make_synthetic_checkpoint
from bagelverify.tensor_reader import TensorReader


def test_a_reader_reads_through_the_descriptors_it_is_given_and_leaves_them_open(
    tmp_path: Path,
) -> None:
    """A file replaced after its header was read: the reader still reads the bytes of the file
    the header describes, and the borrowed descriptor stays open when the reader closes."""
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"t": torch.arange(8, dtype=torch.float32)})
    with open_weights(path, keep_open=True) as files:
        replacement = tmp_path / "y.safetensors"
        save_tensors(replacement, {"t": torch.zeros(8, dtype=torch.float32)})
        os.replace(replacement, path)
        with TensorReader(files.fds) as reader:
            assert torch.equal(reader.read(files.tensors["t"]), torch.arange(8.0))
        assert os.fstat(files.fds[path]).st_size > 0  # still open
    with TensorReader() as reader:  # by path: the new file
        assert torch.equal(reader.read(read_header(path).tensors["t"]), torch.zeros(8))


@pytest.fixture
def two_checkpoints(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> tuple[Path, Path]:
    """A (a copy of the session checkpoint) and B (seed 1: every value differs)."""
    a = tmp_path / "a"
    shutil.copytree(synthetic_checkpoint.path, a)
    return a, make_synthetic_checkpoint(tmp_path / "b", scale=64, seed=1).path


def _replace_after(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, path: Path, new: Path
) -> None:
    """Once ``module.name`` (called after the headers are read, before any data) returns,
    ``path`` is replaced by a copy of ``new``, as a concurrent save would."""
    original = getattr(module, name)

    def then_replace(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        shutil.copyfile(new, path.with_suffix(".new"))
        os.replace(path.with_suffix(".new"), path)
        return result

    monkeypatch.setattr(module, name, then_replace)


def test_diff_reads_the_files_its_headers_came_from(
    two_checkpoints: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_checkpoints
    differing = diff.diff_checkpoints(a, b).differing_keys
    assert len(differing) == 1221  # all but the two position tables, which seeds do not change
    _replace_after(monkeypatch, diff, "compare_headers", b / MODEL_FILE, a / MODEL_FILE)
    assert diff.diff_checkpoints(a, b).differing_keys == differing  # B's old values, not A's


def test_repair_copies_the_bytes_of_the_files_its_headers_came_from(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_checkpoints
    src = tmp_path / "src"
    src.mkdir()
    tensors = load_file(a / MODEL_FILE)
    save_tensors(src / MODEL_FILE, {k: v for k, v in tensors.items() if "vit_model" not in k})
    for name in ("config.json", "llm_config.json", "vit_config.json"):
        shutil.copy(a / name, src / name)
    _replace_after(monkeypatch, repair, "_base_tensors", b / MODEL_FILE, a / MODEL_FILE)
    repair.repair_checkpoint(src, base=b, out=tmp_path / "out")
    repaired = load_file(tmp_path / "out" / MODEL_FILE)
    base_values = make_synthetic_checkpoint(tmp_path / "b2", scale=64, seed=1).path
    original = load_file(base_values / MODEL_FILE)
    vision = [k for k in repaired if "vit_model" in k]
    assert vision and all(torch.equal(repaired[k], original[k]) for k in vision)


def test_rewrite_reads_the_file_its_header_came_from(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_checkpoints
    before = load_file(a / MODEL_FILE)
    _replace_after(monkeypatch, rewrite, "build_report", a / MODEL_FILE, b / MODEL_FILE)
    rewrite.rewrite_checkpoint(a, tmp_path / "out", stage=2, dtype="f32")
    after = load_file(tmp_path / "out" / MODEL_FILE)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k].float()) for k in before)
