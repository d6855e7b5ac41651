"""Issue 14 part b: loads during saves, concurrent saves, stale shards, doubly rooted keys,
truncation under hf_to_dcp, and the exact error class for odd files. The concurrency tests run
real processes for a bounded time."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bagelverify as bv
from bagelverify.checkpoint import INDEX_FILE, SAVE_ID
from bagelverify.errors import (
    AllocationError,
    CorruptCheckpointError,
    ReadError,
    RootError,
    UnsupportedTensorError,
)
from bagelverify.synthetic import SyntheticCheckpoint

KEYS = [f"model.language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(60)]


def version(tag: int) -> dict[str, torch.Tensor]:
    """Two saves whose tensors differ in shape (so in offsets) and in values."""
    return {
        key: torch.full((i + 1 if tag == 0 else 60 - i, 4), float(tag * 1000 + i))
        for i, key in enumerate(KEYS)
    }


def which(loaded: dict[str, torch.Tensor]) -> int | None:
    """0 or 1 when every tensor is that version's, None for a mix."""
    for tag in (0, 1):
        expected = version(tag)
        if loaded.keys() == expected.keys() and all(
            torch.equal(loaded[k], expected[k]) for k in KEYS
        ):
            return tag
    return None


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import bagelverify as bv
    from test_concurrency import version
    folder, seconds, shard, first = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        bv.save_bagel_checkpoint(
            version((n + first) % 2), folder, stage=1, strict=False,
            max_shard_size=None if shard == "none" else shard, overwrite=True,
        )
        n += 1
    print(n)
    """
)


def writer(
    folder: Path, seconds: float, shard: str = "none", first: int = 0
) -> subprocess.Popen[str]:
    code = WRITER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(folder), str(seconds), shard, str(first)],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("shard", ["none", "2kB"])
def test_a_load_during_saves_returns_one_save_or_a_clear_error(tmp_path: Path, shard: str) -> None:
    """Item 1: every load that succeeds while another process saves returns the tensors of one
    save (header and data are read through the same descriptors; a sharded folder whose files
    change while they are opened is re-opened); the others raise ReadError or, in the instant
    between a sharded save's old and new index, FileNotFoundError."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(
        version(0), folder, stage=1, strict=False, max_shard_size=None if shard == "none" else shard
    )
    process = writer(folder, 4.0, shard, first=1)
    seen: dict[object, int] = {}
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        try:
            outcome: object = which(
                bv.load_bagel_checkpoint_state_dict(folder, stage=1, strict=False)
            )
        except (ReadError, FileNotFoundError) as error:
            outcome = type(error).__name__
        seen[outcome] = seen.get(outcome, 0) + 1
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and int(out) > 5
    assert None not in seen, seen
    assert seen.get(0, 0) + seen.get(1, 0) > 10, seen


def test_two_concurrent_sharded_saves_leave_one_complete_save(tmp_path: Path) -> None:
    """Item 2: saves into one folder are serialised (a lock held over the whole save), so after
    two processes saved concurrently, the index and its shards are those of one save, and
    no other shard is left."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for _ in range(3):
        first, second = writer(folder, 1.5, "2kB", 0), writer(folder, 1.5, "2kB", 1)
        for process in (first, second):
            process.communicate(timeout=120)
            assert process.returncode == 0
        files = bv.checkpoint.open_checkpoint(folder)
        assert which(bv.load_bagel_checkpoint_state_dict(folder, stage=1, strict=False)) in (0, 1)
        on_disk = {Path(p).name for p in glob.glob(str(folder / "*.safetensors"))}
        assert on_disk == {path.name for path in files.files}


def test_a_resave_with_fewer_shards_removes_the_old_ones(tmp_path: Path) -> None:
    """Item 3: torch's glob-based HF reader sees exactly the new save's shards."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(version(0), folder, stage=1, strict=False, max_shard_size="1kB")
    many = len(glob.glob(str(folder / "*.safetensors")))
    bv.save_bagel_checkpoint(
        version(1), folder, stage=1, strict=False, max_shard_size="100kB", overwrite=True
    )
    index = json.loads((folder / INDEX_FILE).read_text())
    named = set(index["weight_map"].values())
    assert many > len(named) == 1
    assert {Path(p).name for p in glob.glob(str(folder / "*.safetensors"))} == named
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder))
    assert len(reader.read_metadata().state_dict_metadata) == len(KEYS)


def test_a_user_file_is_not_taken_for_an_old_shard(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(version(0), folder, stage=1, strict=False, max_shard_size="1kB")
    mine = folder / "notes.safetensors"
    mine.write_bytes(b"mine")
    bv.save_bagel_checkpoint(
        version(1), folder, stage=1, strict=False, max_shard_size="100kB", overwrite=True
    )
    assert mine.read_bytes() == b"mine"


def test_shards_of_another_save_are_refused(tmp_path: Path) -> None:
    """The index and every shard carry the save's id: a shard from another save is named."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, tag in ((one, 0), (two, 1)):
        bv.save_bagel_checkpoint(version(tag), folder, stage=1, strict=False, max_shard_size="2kB")
    index = json.loads((one / INDEX_FILE).read_text())
    assert SAVE_ID in index["metadata"]
    # same tensor names and shard layout only when the shapes match: use a copy of one's save
    three = tmp_path / "three"
    bv.save_bagel_checkpoint(version(0), three, stage=1, strict=False, max_shard_size="2kB")
    shard = sorted(set(index["weight_map"].values()))[0]
    os.replace(three / shard, one / shard)
    with pytest.raises(CorruptCheckpointError, match=rf"{shard} was written by another save"):
        bv.load_bagel_checkpoint_state_dict(one, stage=1, strict=False)


def test_a_doubly_rooted_key_is_refused_on_save(tmp_path: Path) -> None:
    """Item 4: model.model.<key> used to be written as model.<key> under strict=True."""
    state = {"model.model.language_model.model.norm.weight": torch.ones(4)}
    for strict in (True, False):
        with pytest.raises(RootError, match=r"rooted twice .*model\.model\.language_model"):
            bv.save_bagel_checkpoint(state, tmp_path / "out", stage=1, strict=strict)
    assert not (tmp_path / "out" / "ema.safetensors").exists()


def test_hf_to_dcp_of_a_file_truncated_while_read_is_corrupt_not_sigbus(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """Item 12: hf_to_dcp read through a memory map died with SIGBUS when the source shrank."""
    source = tmp_path / "src"
    source.mkdir()
    for path in synthetic_checkpoint.path.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    code = textwrap.dedent(
        f"""
        import os, sys
        import bagelverify as bv
        from bagelverify import safetensors_io
        from bagelverify.checkpoint import files
        real = safetensors_io.read_header
        def then_truncate(path, **kwargs):
            header = real(path, **kwargs)
            os.truncate(path, header.data_start + header.file_size // 3)
            return header
        files.read_header = then_truncate
        try:
            bv.hf_to_dcp({str(source)!r}, {str(tmp_path / "dcp")!r}, stage=1)
        except bv.CorruptCheckpointError as error:
            print("corrupt:", error)
            sys.exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "unexpected end of file" in done.stdout and "ema.safetensors" in done.stdout


def test_a_nul_in_a_shard_name_is_corrupt(tmp_path: Path) -> None:
    """Item 13: it was a FileNotFoundError ("does not exist")."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(version(0), folder, stage=1, strict=False, max_shard_size="100kB")
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"][KEYS[0].removeprefix("model.")] = "model\u0000.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"is not a file name in the folder"):
        bv.inspect_checkpoint(folder)


def test_a_fifo_as_a_shard_is_named_as_such_without_blocking(tmp_path: Path) -> None:
    """Item 13: a FIFO said "does not exist" (and opening one for reading would block)."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(version(0), folder, stage=1, strict=False, max_shard_size="100kB")
    shard = folder / "model-00001-of-00001.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CorruptCheckpointError, match=rf"{shard}: is a FIFO, not a regular file"):
        bv.inspect_checkpoint(folder)


def test_a_nested_tensor_is_unsupported_on_save(tmp_path: Path) -> None:
    """Item 13: torch's RuntimeError escaped before."""
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    state = {"model.language_model.model.norm.weight": nested}
    with pytest.raises(UnsupportedTensorError, match=r"norm\.weight.*nested tensor"):
        bv.save_bagel_checkpoint(state, tmp_path / "out", stage=1, strict=False)


def test_a_valid_10_tb_file_is_an_allocation_error_naming_file_and_size(tmp_path: Path) -> None:
    """Item 13: a sparse 10 TB file raised torch's bare "can't allocate"."""
    folder = tmp_path / "big"
    folder.mkdir()
    count = 5 * 2**40  # bf16 elements: 10 TiB
    header = json.dumps(
        {
            "language_model.model.norm.weight": {
                "dtype": "BF16",
                "shape": [count],
                "data_offsets": [0, 2 * count],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    path = folder / "ema.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        try:
            handle.truncate(8 + len(header) + 2 * count)
        except OSError:
            pytest.skip("this file system cannot hold a sparse 10 TiB file")
    with pytest.raises(AllocationError) as info:
        bv.load_bagel_checkpoint_state_dict(folder, strict=False)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot allocate 'language_model.model.norm.weight'")
    assert f"{2 * count:,} bytes" in message


def test_folder_lock_is_reentrant_in_a_thread_and_serialises_threads(tmp_path: Path) -> None:
    """A save into a staging folder its caller holds does not deadlock (it did: convert hung);
    another thread waits until the holder is done."""
    import threading

    from bagelverify.atomic import folder_lock

    order: list[str] = []
    with folder_lock(tmp_path), folder_lock(tmp_path):
        other = threading.Thread(target=lambda: _hold(tmp_path, order))
        other.start()
        time.sleep(0.3)
        order.append("first done")
    other.join(timeout=30)
    assert not other.is_alive() and order == ["first done", "second"]


def _hold(folder: Path, order: list[str]) -> None:
    from bagelverify.atomic import folder_lock

    with folder_lock(folder):
        order.append("second")
