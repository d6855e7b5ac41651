"""A save that is killed (SIGKILL) or runs out of space never leaves a partial file under a final
name and never damages the previous checkpoint; abandoned temporary files are cleaned up by the
next save of the same file. (Kills at every instant of publishing a folder: test_publish.py.)"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bagelverify as bv
from bagelverify import atomic, safetensors_io
from bagelverify.synthetic import SyntheticCheckpoint

CHILD = Path(__file__).with_name("_crash_writer.py")
# the child imports this checkout's bagelverify, not whichever one is installed
CHILD_ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
    ),
)
SHARD_SIZE = "1MB"  # the scale-64 synthetic model (~4 MB) in a handful of shards
INDEX = "model.safetensors.index.json"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Name -> bytes of every file in ``folder``."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.fixture
def folder(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    """A writable copy of the synthetic checkpoint (single ema.safetensors, configs, VAE)."""
    target = tmp_path / "checkpoint"
    shutil.copytree(synthetic_checkpoint.path, target)
    return target


def make_sharded(folder: Path) -> None:
    native = bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    (folder / "ema.safetensors").unlink()
    bv.save_bagel_checkpoint(native, folder, stage=2, max_shard_size=SHARD_SIZE)


def run_child(mode: str, folder: Path, shard_size: str) -> subprocess.Popen[str]:
    """Start the crash writer; for ``data``/``rename`` return once it signals it stopped."""
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(folder), shard_size, str(write_end)],
            pass_fds=(write_end,),
            env=CHILD_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_end)
        if mode != "fsize":
            ready, _, _ = select.select([read_end], [], [], 120)
            if not ready or os.read(read_end, 1) != b"!":
                process.kill()
                _, stderr = process.communicate()
                pytest.fail(f"the crash writer never reached its stop point:\n{stderr}")
    finally:
        os.close(read_end)
    return process


def kill(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def staging_folders(folder: Path) -> list[Path]:
    """The staging folders beside ``folder`` (where its saves are built)."""
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_sigkill_mid_write_leaves_the_previous_checkpoint(folder: Path, sharded: bool) -> None:
    """Killed while a tensor is half written: the folder is exactly as it was (the save was
    being built in a staging folder beside it), the previous checkpoint loads bit-identically,
    and the next save removes the killed one's staging folder at once."""
    if sharded:
        make_sharded(folder)
    before = snapshot(folder)
    loaded_before = bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    process = run_child("data", folder, SHARD_SIZE if sharded else "-")
    [staging] = staging_folders(folder)
    leftovers = [p for p in staging.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and any(p.stat().st_size > 0 for p in leftovers)  # caught mid-write
    kill(process)

    assert snapshot(folder) == before  # nothing hidden in the folder either
    assert_same_tensors(bv.load_bagel_checkpoint_state_dict(folder, stage=2), loaded_before)

    # The next save removes the dead run's staging folder (nobody holds its lock): no wait.
    changed = {k: v + 1 for k, v in loaded_before.items()}
    bv.save_bagel_checkpoint(
        changed, folder, stage=2, max_shard_size=SHARD_SIZE if sharded else None, overwrite=True
    )
    assert temporaries(folder) == [] and staging_folders(folder) == []
    assert_same_tensors(bv.load_bagel_checkpoint_state_dict(folder, stage=2), changed)


def test_sigkill_between_shard_renames_leaves_the_previous_checkpoint(folder: Path) -> None:
    """Killed after the first new shard took its final name: that happened in the staging
    folder, so the folder still holds the previous sharded checkpoint, index and shards of one
    save (it used to hold no index at all)."""
    make_sharded(folder)
    before = snapshot(folder)
    process = run_child("rename", folder, SHARD_SIZE)
    kill(process)
    assert snapshot(folder) == before
    assert (folder / INDEX).exists()
    bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    for path in folder.glob("model-*.safetensors"):
        safetensors_io.read_header(path)  # every file under a final name is complete
    assert staging_folders(folder) == []  # the load removed the dead run's staging folder


def test_kernel_refusing_a_write_leaves_no_partial_file(folder: Path) -> None:
    """A real failed write(2) (``RLIMIT_FSIZE``: EFBIG, as a full disk gives ENOSPC) surfaces as
    an OSError with its errno and the target's name; the previous file is intact, nothing
    temporary remains."""
    before = snapshot(folder)
    process = run_child("fsize", folder, "-")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    target = folder / "ema.safetensors"
    assert result["errno"] == errno.EFBIG
    assert f"while writing {target}; the partial temporary file was removed" in result["message"]
    assert f"{target} was not changed" in result["message"]
    assert snapshot(folder) == before


def disk_full_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> None:
    """Make the writer fail with ENOSPC on its ``tensors``-th tensor."""
    real = safetensors_io._write_tensor
    count = 0

    def writer(handle: object, spec: object, tensor: torch.Tensor) -> None:
        nonlocal count
        count += 1
        if count == tensors:
            handle.write(b"\0" * 100)  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(handle, spec, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(safetensors_io, "_write_tensor", writer)


@pytest.mark.parametrize("existing", ["none", "single-file", "sharded"])
def test_disk_full_leaves_no_partial_file(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: str
) -> None:
    """ENOSPC mid-save: a clear OSError (errno kept, target named), the folder as it was."""
    native = bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    target = tmp_path / "fresh" if existing == "none" else folder
    if existing == "sharded":
        make_sharded(folder)
    before = snapshot(target) if target.exists() else {}
    disk_full_after(monkeypatch, 300)
    shard_size = SHARD_SIZE if existing == "sharded" else None
    with pytest.raises(OSError) as info:
        bv.save_bagel_checkpoint(native, target, stage=2, max_shard_size=shard_size, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device while writing" in str(info.value)
    assert "was not changed" in str(info.value)
    assert (snapshot(target) if target.exists() else {}) == before
    assert target.exists() == (existing != "none")  # a new folder appears only when complete
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_stale_temporaries_are_removed_only_when_abandoned(tmp_path: Path) -> None:
    """Removed: unlocked and idle. Kept: locked by a live writer, recently modified, or named
    for another file."""
    target = tmp_path / "ema.safetensors"
    old = time.time() - atomic.STALE_AFTER_SECONDS - 1
    names = {
        "abandoned": atomic.temporary_name(target),
        "locked": atomic.temporary_name(target),
        "fresh": atomic.temporary_name(target),
        "other file": atomic.temporary_name(tmp_path / "ae.safetensors"),
        "not temporary": ".ema.safetensors.e5.keep",
    }
    for label, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if label != "fresh":
            os.utime(tmp_path / name, (old, old))
    with open(tmp_path / names["locked"], "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        removed = atomic.remove_stale_temporaries(target)
    assert removed == [tmp_path / names["abandoned"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for label, n in names.items() if label != "abandoned"
    )


def test_writer_holds_its_lock_while_writing(tmp_path: Path) -> None:
    """While a write is in progress its temporary file cannot be locked by anyone else."""
    with atomic.atomic_open(tmp_path / "x.bin") as handle:
        handle.write(b"data")
        (temporary,) = [p for p in tmp_path.iterdir() if p.name.startswith(".x.bin.")]
        with open(temporary, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
