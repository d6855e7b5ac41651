"""The safetensors reader validates every header fault before data is read; the writer is
atomic and byte-compatible with the safetensors library."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from bagelverify.errors import CorruptCheckpointError, UnsupportedPlatformError
from bagelverify.safetensors_io import (
    DTYPES,
    MAX_HEADER_BYTES,
    byte_view,
    dtype_name,
    read_header,
    read_into,
    save_tensors,
)


def raw_file(path: Path, header: bytes | str | dict[str, Any], data: bytes = b"") -> Path:
    """A file with the given header (dict -> JSON) and data section, length prefix included."""
    if isinstance(header, dict):
        header = json.dumps(header)
    body = header.encode("utf-8") if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": entry("F32", [2], 0, 8), "b": entry("BF16", [2, 2], 8, 16)}


def test_valid_header_gives_absolute_offsets(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "x.safetensors", {"__metadata__": {"format": "pt"}, **GOOD}, b"\0" * 16
    )
    header = read_header(path)
    data_start = 8 + len(json.dumps({"__metadata__": {"format": "pt"}, **GOOD}))
    assert header.metadata == {"format": "pt"}
    assert list(header.tensors) == ["a", "b"]
    b = header.tensors["b"]
    assert (b.dtype, b.shape, b.start, b.end, b.nbytes) == (
        "BF16",
        (2, 2),
        data_start + 8,
        data_start + 16,
        8,
    )
    assert b.torch_dtype is torch.bfloat16 and b.path == path


CORRUPT: dict[str, tuple[bytes | str | dict[str, Any], bytes, str]] = {
    "duplicate name": (
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        "names 'a' twice",
    ),
    "invalid utf-8": (b'{"\xff": 1}', b"", "not UTF-8"),
    "invalid json": ("{not json", b"", "not valid JSON"),
    "not an object": ("[1, 2]", b"", "not a JSON object"),
    "unknown dtype": ({"a": entry("F12", [1], 0, 4)}, b"\0" * 4, "tensor 'a': unknown dtype 'F12'"),
    "negative dim": ({"a": entry("F32", [-1], 0, 4)}, b"\0" * 4, "tensor 'a': shape"),
    "bool dim": ({"a": entry("F32", [True], 0, 4)}, b"\0" * 4, "tensor 'a': shape"),
    "reversed offsets": ({"a": entry("F32", [0], 4, 0)}, b"\0" * 4, "tensor 'a': data_offsets"),
    "extra field": (
        {"a": {**entry("F32", [1], 0, 4), "x": 1}},
        b"\0" * 4,
        "tensor 'a': entry must be an object",
    ),
    "size vs span": (
        {"a": entry("F32", [2], 0, 4)},
        b"\0" * 4,
        "tensor 'a': shape [2] x F32 is 8 bytes",
    ),
    "overlap": (
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)},
        b"\0" * 8,
        "overlaps",
    ),
    "hole": (
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)},
        b"\0" * 12,
        "4 unused bytes between tensor 'a' (data bytes 0-4) and tensor 'b'",
    ),
    "hole at start": (
        {"a": entry("F32", [1], 4, 8)},
        b"\0" * 8,
        "4 unused bytes between the header",
    ),
    "past the end": ({"a": entry("F32", [2], 0, 8)}, b"\0" * 4, "past the file end"),
    "trailing bytes": ({"a": entry("F32", [1], 0, 4)}, b"\0" * 6, "2 bytes after the last tensor"),
    "metadata not str": ({"__metadata__": {"format": 1}}, b"", "__metadata__ must map strings"),
    "metadata not object": ({"__metadata__": [1]}, b"", "__metadata__ must map strings"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_headers_name_the_file_and_fault(tmp_path: Path, case: str) -> None:
    header, data, message = CORRUPT[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError, match=r"bad\.safetensors") as info:
        read_header(path)
    assert message in str(info.value)


@pytest.mark.parametrize("size", [0, 7])
def test_file_shorter_than_prefix(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\1" * size)
    with pytest.raises(CorruptCheckpointError, match=f"is {size} bytes, shorter than the 8-byte"):
        read_header(path)


def test_header_length_past_file_end_and_over_cap(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length 100 runs past the file end"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="exceeds the 104857600-byte cap"):
        read_header(path)


def test_zero_size_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = {
        "e1": entry("F32", [0, 3], 0, 0),
        "e2": entry("I64", [0], 0, 0),
        "a": entry("U8", [2], 0, 2),
    }
    path = raw_file(tmp_path / "z.safetensors", header, b"\1\2")
    loaded = read_header(path)
    assert loaded.tensors["e1"].nbytes == 0
    out = torch.empty(0, 3)
    with open(path, "rb") as handle:
        read_into(handle.fileno(), loaded.tensors["e1"], out)
    assert out.shape == (0, 3)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope.safetensors")


def test_dtype_table_round_trips_torch_dtypes() -> None:
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype.torch_dtype) == name
        assert torch.empty((), dtype=dtype.torch_dtype).element_size() == dtype.itemsize
    assert {"BF16", "F16", "F32", "F64", "I64", "U8", "BOOL"} <= set(DTYPES)


def mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "half": torch.arange(5, dtype=torch.bfloat16),
        "wide": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "byte": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous
    }


def test_writer_output_is_read_by_safetensors_and_aligned(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    path = tmp_path / "mixed.safetensors"
    save_tensors(path, tensors)
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.data_start % 8 == 0
    for info in header.tensors.values():
        assert (info.start - header.data_start) % DTYPES[info.dtype].itemsize == 0


def test_reader_reads_safetensors_files(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    header = read_header(path)
    with open(path, "rb") as handle:
        for name, tensor in tensors.items():
            out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            read_into(handle.fileno(), header.tensors[name], out)
            assert torch.equal(out, tensor)


def test_read_into_refuses_wrong_dtype_or_size(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(4)})
    info = read_header(path).tensors["a"]
    with open(path, "rb") as handle:
        for wrong in (torch.empty(4, dtype=torch.float64), torch.empty(5)):
            with pytest.raises(ValueError, match="does not hold F32 x 4"):
                read_into(handle.fileno(), info, wrong)


def test_truncated_after_header_read_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(1000)})
    info = read_header(path).tensors["a"]
    os.truncate(path, info.start + 100)
    with open(path, "rb") as handle, pytest.raises(CorruptCheckpointError, match="truncated"):
        read_into(handle.fileno(), info, torch.empty(1000))


def test_byte_view_is_the_tensor_memory() -> None:
    tensor = torch.zeros(4, dtype=torch.int16)
    view = byte_view(tensor)
    view[0:2] = b"\x01\x02"
    assert tensor[0].item() == 0x0201 and len(view) == 8
    with pytest.raises(ValueError, match="contiguous CPU"):
        byte_view(torch.zeros(3, 3).t())


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"old": torch.ones(3)})
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def fetch_then_fail() -> dict[str, torch.Tensor]:
        class Failing(dict[str, torch.Tensor]):
            def __getitem__(self, key: str) -> torch.Tensor:
                if key == "second":
                    raise Boom
                return super().__getitem__(key)

        return Failing(first=torch.zeros(100), second=torch.zeros(100))

    with pytest.raises(Boom):
        save_tensors(path, fetch_then_fail())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_big_endian_hosts_are_refused_before_any_byte_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.arange(4, dtype=torch.int32)})
    info = read_header(path).tensors["a"]
    monkeypatch.setattr(sys, "byteorder", "big")
    out = torch.zeros(4, dtype=torch.int32)
    with open(path, "rb") as handle, pytest.raises(UnsupportedPlatformError, match="little-endian"):
        read_into(handle.fileno(), info, out)
    assert torch.equal(out, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(UnsupportedPlatformError, match="big-endian"):
        save_tensors(tmp_path / "y.safetensors", {"a": out})
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize("sizes", [[8, 3, 3, 8, 2, 2, 1], [5], []])
def test_read_ahead_writes_the_same_bytes_holding_at_most_one_small_tensor_early(
    tmp_path: Path, sizes: list[int]
) -> None:
    """Invariant: with read_ahead the file is byte-identical, at most one tensor is live when
    another is fetched, and the two together are at most 1.5 times the largest tensor."""
    import weakref

    from bagelverify.safetensors_io import TensorSpec, write_safetensors

    specs = [TensorSpec(f"t{i}", "F32", (size * 1000,)) for i, size in enumerate(sizes)]
    alive: dict[str, int] = {}
    seen: list[list[int]] = []

    def fetch(name: str) -> torch.Tensor:
        index = int(name[1:])
        seen.append([*alive.values(), sizes[index]])
        tensor = torch.full((sizes[index] * 1000,), float(index))
        alive[name] = sizes[index]
        weakref.finalize(tensor, alive.pop, name)
        return tensor

    write_safetensors(tmp_path / "plain", specs, fetch)
    assert all(len(held) == 1 for held in seen)
    seen.clear()
    write_safetensors(tmp_path / "ahead", specs, fetch, read_ahead=True)
    assert (tmp_path / "plain").read_bytes() == (tmp_path / "ahead").read_bytes()
    assert len(seen) == len(sizes) and alive == {}
    largest = max(sizes, default=0)
    assert all(len(held) <= 2 and sum(held) <= 1.5 * largest for held in seen)
    assert any(len(held) == 2 for held in seen) == (len(sizes) > 1)  # it did read ahead
