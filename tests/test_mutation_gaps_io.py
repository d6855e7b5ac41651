"""Issue 29: tests that kill the mutants a probe of the read engine, the loaders and the
safetensors reader found alive (short ``preadv`` reads, overlapping and gapped destinations,
the int64 and header-length edges). In mutmut's test selection (``[tool.mutmut]``)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify.checkpoint.load import _overlaps
from bagelverify.engine import EngineOptions, EngineStats, Transfer, run
from bagelverify.errors import CorruptCheckpointError, format_examples
from bagelverify.safetensors_io import (
    DTYPES,
    MAX_HEADER_BYTES,
    lossless_cast,
    read_header,
    require_little_endian,
)
from bagelverify.synthetic import SyntheticCheckpoint

# -- short reads -------------------------------------------------------------------------------

_CAPS = (1, 5, 3, 16, 2, 7)  # bytes each call may read: mid-buffer and on buffer boundaries


@pytest.fixture
def short_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """``os.preadv`` that reads at most the next of :data:`_CAPS` bytes per call (a legal short
    read, as a signal or a network file system may give); logs (bytes asked, bytes read)."""
    real, caps, log = os.preadv, itertools.cycle(_CAPS), []

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        left, capped = next(caps), []
        asked = sum(len(b) for b in buffers)
        for buffer in buffers:
            view = memoryview(buffer)[:left]
            capped.append(view)
            left -= len(view)
        got = real(fd, capped, offset)
        log.append((asked, got))
        return got

    monkeypatch.setattr(os, "preadv", short)
    yield log


def _file_of(tmp_path: Path, nbytes: int) -> tuple[Path, bytes]:
    data = bytes((7 * n + 3) % 251 for n in range(nbytes))
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _expected(data: bytes, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    raw = bytearray(data[offset : offset + count * dtype.itemsize])
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).clone()


_SIZES = (3, 5, 1, 16, 9, 2, 11)  # element counts: pieces of several lengths, back to back


def test_short_preadv_reads_resume_in_place_across_and_inside_buffers(
    tmp_path: Path, short_reads: list[tuple[int, int]]
) -> None:
    """CPU destinations of the file's dtype are read in place with one ``preadv`` per read over
    several buffers; every short count resumes at the right byte of the right buffer."""
    path, data = _file_of(tmp_path, 4 + sum(_SIZES) * 2)
    transfers, offset = [], 4
    for n, count in enumerate(_SIZES):
        dtype = torch.uint8 if n % 2 else torch.int16
        nbytes = count * dtype.itemsize
        transfers.append(
            Transfer(
                f"t{n}", path, offset, nbytes, dtype, (count,), torch.empty(count, dtype=dtype)
            )
        )
        offset += nbytes
    stats = run(transfers, options=EngineOptions(threads=1, chunk_bytes=4096, staging_bytes=4096))
    assert stats.reads == 1 and stats.staging_bytes == 0  # one multi-buffer read, in place
    assert any(got < asked for asked, got in short_reads)
    for transfer in transfers:
        want = _expected(data, transfer.offset, transfer.shape[0], transfer.dtype)
        assert torch.equal(transfer.destination, want), transfer.label


def test_short_preadv_reads_resume_on_the_staged_path(
    tmp_path: Path, short_reads: list[tuple[int, int]]
) -> None:
    """A cast (BF16 file into an F32 destination) goes through the staging buffer; short reads
    into it resume where they stopped."""
    count = 37
    path, data = _file_of(tmp_path, 6 + 2 * count)
    destination = torch.empty(count, dtype=torch.float32)
    transfer = Transfer("cast", path, 6, 2 * count, torch.bfloat16, (count,), destination)
    stats = run([transfer], options=EngineOptions(threads=1, chunk_bytes=4096, staging_bytes=4096))
    assert stats.staging_bytes > 0
    assert any(got < asked for asked, got in short_reads)
    want = _expected(data, 6, count, torch.bfloat16).float()
    assert torch.equal(destination.view(torch.int32), want.view(torch.int32))


def test_a_file_ending_during_short_reads_is_still_a_corrupt_checkpoint(
    tmp_path: Path, short_reads: list[tuple[int, int]]
) -> None:
    path, _ = _file_of(tmp_path, 20)
    destination = torch.empty(30, dtype=torch.uint8)
    with pytest.raises(CorruptCheckpointError, match="unexpected end of file at byte 20"):
        run([Transfer("past", path, 0, 30, torch.uint8, (30,), destination)])


# -- destinations whose elements share memory ----------------------------------------------------


def _shares_memory(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Brute force: whether two indices of the layout land on the same storage offset."""
    offsets = [
        sum(i * s for i, s in zip(index, strides, strict=True))
        for index in itertools.product(*(range(n) for n in shape))
    ]
    return len(set(offsets)) < len(offsets)


@st.composite
def _power_of_two_layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    strides = tuple(
        draw(st.lists(st.sampled_from([0, 1, 2, 4, 8, 16]), min_size=rank, max_size=rank))
    )
    return shape, strides


@given(_power_of_two_layouts())
def test_with_dividing_strides_a_destination_is_refused_exactly_when_elements_share_memory(
    layout: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    """Invariant: for strides that divide one another (powers of two, or 0), the overlap check
    refuses an ``as_strided`` view exactly when two of its elements share memory (any stride
    below the extent of the smaller ones then lands on another element)."""
    shape, strides = layout
    view = torch.zeros(1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)))
    view = view.as_strided(shape, strides)
    assert _overlaps(view) == _shares_memory(shape, strides)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.lists(st.integers(0, 7), min_size=3, max_size=3),
)
def test_a_destination_whose_elements_share_memory_is_never_accepted(
    shape: list[int], strides: list[int]
) -> None:
    """Invariant: for any strides, shared memory implies refusal (the check may refuse some
    irregular layouts that do not overlap, never accept one that does)."""
    strides = strides[: len(shape)]
    view = torch.zeros(1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)))
    view = view.as_strided(shape, strides)
    if _shares_memory(tuple(shape), tuple(strides)):
        assert _overlaps(view)


def test_gapped_and_permuted_views_are_accepted() -> None:
    assert not _overlaps(torch.zeros(4, 8)[:, ::2])
    assert not _overlaps(torch.zeros(4, 8)[::2, ::3])
    assert not _overlaps(torch.zeros(3, 5, 2).permute(2, 0, 1))
    assert not _overlaps(torch.zeros(1, 6)[:, ::3])
    assert _overlaps(torch.zeros(4, 8).as_strided((4, 4), (2, 1)))  # rows overlap by half


def _stage1_with_matrix(folder: Path) -> tuple[dict[str, torch.Tensor], str, int, int]:
    """Zeroed stage-1 destinations of ``folder`` and a 2-d key of at least 3 x 3 with its shape."""
    report = bv.inspect_checkpoint(folder, stage=1)
    destination = {
        native: torch.zeros(info.shape, dtype=DTYPES[info.dtype].torch_dtype)
        for native, info in report.retained.items()
    }
    key = next(k for k, v in destination.items() if v.dim() == 2 and min(v.shape) > 2)
    rows, cols = destination[key].shape
    return destination, key, rows, cols


def test_a_partly_overlapping_as_strided_destination_is_refused(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    destination, key, rows, cols = _stage1_with_matrix(synthetic_checkpoint.path)
    storage = torch.zeros(rows * cols, dtype=destination[key].dtype)
    destination[key] = storage.as_strided((rows, cols), (cols // 2, 1))  # each row half the next
    with pytest.raises(bv.DestinationError, match=rf"{key}: destination's elements share memory"):
        bv.load_into(destination, synthetic_checkpoint.path)
    assert not storage.any()  # refused before any read


def test_a_gapped_destination_view_is_accepted_and_filled(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    """The ``zeros(4, 8)[:, ::2]`` pattern: every other column of a wider tensor."""
    destination, key, rows, cols = _stage1_with_matrix(synthetic_checkpoint.path)
    wide = torch.zeros(rows, 2 * cols, dtype=destination[key].dtype)
    destination[key] = wide[:, ::2]
    bv.load_into(destination, synthetic_checkpoint.path)
    expected = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)[key]
    assert torch.equal(wide[:, ::2], expected) and not wide[:, 1::2].any()


# -- the safetensors reader's edges ------------------------------------------------------------


def _header_file(path: Path, header: Mapping[str, object]) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


@pytest.mark.parametrize(
    ("shape", "overflows"),
    [
        ([2**63 - 1], False),
        ([2**63], True),
        ([2**62, 2], True),
        ([2**62 - 1, 2], False),
        ([0, 2**63 - 1, 1], False),
        ([1, 0, 2**63], True),
    ],
)
def test_element_counts_are_refused_exactly_above_int64(
    tmp_path: Path, shape: list[int], overflows: bool
) -> None:
    """At 2**63 - 1 elements the shape passes (the file is then refused for its byte span, one
    byte too long); one more is refused as an int64 overflow, whatever zero dims stand around."""
    count = 1
    for dim in shape:
        count *= dim
    header = {"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, count + 1]}}
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(_header_file(tmp_path / "x.safetensors", header))
    assert ("overflows int64" in str(info.value)) is overflows, str(info.value)


def test_header_length_is_capped_exactly_at_max_header_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=f"header length {MAX_HEADER_BYTES} runs past"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=f"exceeds the {MAX_HEADER_BYTES}-byte cap"):
        read_header(path)


def test_every_safetensors_dtype_name_maps_to_its_torch_dtype_and_size() -> None:
    """The names are the safetensors format's; the torch dtypes are safetensors' own reader's."""
    names = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32"}
    names |= {"F64", "F8_E4M3", "F8_E5M2"}
    reference = {n: safetensors.torch._TYPES[n] for n in names}
    assert {n: d.torch_dtype for n, d in DTYPES.items()} == reference
    assert all(d.name == n and d.itemsize == d.torch_dtype.itemsize for n, d in DTYPES.items())


# -- the engine's defaults and its summary line --------------------------------------------------


def test_thread_count_is_one_when_the_cpu_count_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert EngineOptions().thread_count() == EngineOptions().thread_count(staged=False) == 1


def test_the_engine_logs_bytes_reads_threads_and_staging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = _file_of(tmp_path, 64)
    destination = torch.empty(64, dtype=torch.uint8)
    with caplog.at_level(logging.DEBUG, logger="bagelverify.engine"):
        run([Transfer("x", path, 0, 64, torch.uint8, (64,), destination)])
    summaries = [r.getMessage() for r in caplog.records if r.name == "bagelverify.engine"]
    assert summaries == ["read 64 bytes in 1 reads on 1 threads (0 staging bytes)"]


def test_a_run_with_nothing_to_read_reports_zero_stats_and_still_converts(tmp_path: Path) -> None:
    """No bytes to read: no read, no thread, no staging, yet an empty tensor's transform runs
    (it may reshape or cast into the destination)."""
    path, _ = _file_of(tmp_path, 0)
    seen: list[tuple[int, ...]] = []

    def transform(stored: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(stored.shape))
        return stored.float().reshape(0, 2)

    destination = torch.empty(0, 2, dtype=torch.float32)
    empty = Transfer("e", path, 0, 0, torch.bfloat16, (2, 0), destination, transform)
    assert run([empty]) == EngineStats(bytes_read=0, reads=0, threads=0, staging_bytes=0)
    assert seen == [(2, 0)]
    assert run([]) == EngineStats(0, 0, 0, 0)


def test_direct_reads_may_use_more_threads_than_staged_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert EngineOptions().thread_count(staged=True) == 8
    assert EngineOptions().thread_count(staged=False) == 16


def test_a_big_endian_host_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(bv.UnsupportedPlatformError) as info:
        require_little_endian()
    assert str(info.value) == (
        "this host is big-endian; bagelverify copies safetensors bytes (little-endian) straight "
        "into tensor memory and supports little-endian hosts only"
    )


# -- the loaders: options, progress, device, log line, plural message --------------------------


def test_lossless_casts_are_the_same_dtype_or_a_floating_widening() -> None:
    assert lossless_cast(torch.int8, torch.int8) and lossless_cast(torch.bfloat16, torch.bfloat16)
    assert lossless_cast(torch.bfloat16, torch.float32)
    assert lossless_cast(torch.float8_e4m3fn, torch.bfloat16)
    assert not lossless_cast(torch.float32, torch.bfloat16)
    assert not lossless_cast(torch.float16, torch.bfloat16)  # BF16 has fewer mantissa bits
    assert not lossless_cast(torch.int8, torch.int16)  # integers are never cast
    assert not lossless_cast(torch.int8, torch.float32)


def test_the_vae_loader_reads_with_the_callers_options_and_reports_progress(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    """With ``chunk_bytes=4096`` no read (one progress step) exceeds 4096 bytes; by default the
    VAE's touching tensors are read in larger reads. Progress ends at every byte."""

    def steps(calls: list[int]) -> list[int]:
        done = sorted(calls)
        return [b - a for a, b in zip([0, *done], done, strict=False)]

    small: list[int] = []
    out = bv.load_bagel_vae_state_dict(
        synthetic_checkpoint.path,
        read_options=EngineOptions(threads=1, chunk_bytes=4096, staging_bytes=4096),
        progress=lambda done, total: small.append(done),
    )
    total = sum(t.numel() * t.element_size() for t in out.values())
    assert total > 3 * 4096 and sorted(small)[-1] == total
    assert max(steps(small)) <= 4096
    default: list[int] = []
    bv.load_bagel_vae_state_dict(
        synthetic_checkpoint.path, progress=lambda done, total: default.append(done)
    )
    assert sorted(default)[-1] == total and max(steps(default)) > 4096


def test_tensors_are_allocated_on_the_device_asked_for_whatever_torchs_default(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    """A model built under ``with torch.device("meta")`` may load its weights there too: the
    ``device`` argument (CPU by default) decides, not torch's default device."""
    reference = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    with torch.device("meta"):
        loaded = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_load_into_logs_the_folder_and_the_count_loaded(
    synthetic_checkpoint: SyntheticCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    destination = {k: torch.empty_like(v) for k, v in _reference(synthetic_checkpoint).items()}
    with caplog.at_level(logging.INFO, logger="bagelverify.checkpoint.load"):
        bv.load_into(destination, synthetic_checkpoint.path)
    lines = [r.getMessage() for r in caplog.records if r.name == "bagelverify.checkpoint.load"]
    assert lines == [f"{synthetic_checkpoint.path}: loaded {len(destination)} tensors in place"]


def test_hugging_face_layout_destinations_are_refused_in_the_right_number(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    reference = _reference(synthetic_checkpoint)
    keys = sorted(reference)[:2]
    phrases = ((2, "2 destination keys are not native keys ("), (1, "1 destination key is not "))
    for count, phrase in phrases:
        destination = {k.removeprefix("model."): reference[k].clone() for k in keys[:count]}
        with pytest.raises(bv.MissingKeysError) as info:
            bv.load_into(destination, synthetic_checkpoint.path)
        message = str(info.value)
        assert message.startswith(f"{synthetic_checkpoint.path}: {phrase}"), message
        assert "they are Hugging Face layout keys" in message


def _reference(checkpoint: SyntheticCheckpoint) -> dict[str, torch.Tensor]:
    return bv.load_bagel_checkpoint_state_dict(checkpoint.path)


def _copy(checkpoint: SyntheticCheckpoint, folder: Path) -> Path:
    shutil.copytree(checkpoint.path, folder)
    return folder


def test_a_vae_file_holding_the_model_says_whether_the_files_are_swapped(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    swapped = _copy(synthetic_checkpoint, tmp_path / "swapped")
    (swapped / "ae.safetensors").rename(swapped / "x")
    (swapped / "ema.safetensors").rename(swapped / "ae.safetensors")
    (swapped / "x").rename(swapped / "ema.safetensors")
    with pytest.raises(bv.UnknownKeysError) as info:
        bv.load_bagel_vae_state_dict(swapped)
    assert f"It holds the model's keys and {swapped / 'ema.safetensors'} holds the VAE: " in str(
        info.value
    )
    twice = _copy(synthetic_checkpoint, tmp_path / "twice")
    shutil.copy(twice / "ema.safetensors", twice / "ae.safetensors")
    with pytest.raises(bv.UnknownKeysError) as info:
        bv.load_bagel_vae_state_dict(twice)
    assert "it is the model's weights, not the VAE" in str(info.value)
    assert "holds the VAE: " not in str(info.value)


def test_destination_keys_the_checkpoint_lacks_are_refused_in_the_right_number(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    reference = _reference(synthetic_checkpoint)
    extra = [f"model.language_model.model.layers.{n}.self_attn.q_proj.weight" for n in (98, 99)]
    for count, phrase in ((2, "2 destination keys are not"), (1, "1 destination key is not")):
        destination = {k: torch.empty_like(v) for k, v in reference.items()}
        destination.update({key: torch.empty(2) for key in extra[:count]})
        with pytest.raises(bv.MissingKeysError) as info:
            bv.load_into(destination, synthetic_checkpoint.path)
        assert f": {phrase} in the checkpoint ({format_examples(extra[:count])})" in str(info.value)
        assert info.value.keys == extra[:count]


def test_destinations_that_cannot_hold_their_tensors_are_counted_in_the_message(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    """One line per destination; the head counts them all, shape mismatches and refused
    dtypes together."""
    reference = _reference(synthetic_checkpoint)
    a, b, c = sorted(k for k, v in reference.items() if v.dim() == 2)[:3]
    destination = {k: torch.empty_like(v) for k, v in reference.items()}
    destination[a] = torch.empty(reference[a].shape, dtype=torch.float16)  # BF16 file: narrowing
    path = synthetic_checkpoint.path
    with pytest.raises(bv.DestinationError) as info:
        bv.load_into(destination, path)
    assert str(info.value).startswith(
        f"{path}: 1 destination tensor cannot hold its checkpoint tensor:\n"
    )
    destination[b] = torch.empty(3, 3, dtype=reference[b].dtype)
    destination[c] = torch.empty(3, 3, dtype=reference[c].dtype)
    with pytest.raises(bv.ShapeMismatchError) as info:
        bv.load_into(destination, path)
    head = f"{path}: 3 destination tensors cannot hold their checkpoint tensors:\n"
    assert str(info.value).startswith(head) and str(info.value).count("\n  model.") == 3


def test_the_state_dict_loader_is_strict_unless_told(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = _copy(synthetic_checkpoint, tmp_path / "c")
    tensors = safetensors.torch.load_file(str(folder / "ema.safetensors"))
    tensors["head.weight"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, str(folder / "ema.safetensors"))
    with pytest.raises(bv.UnknownKeysError, match=r"head\.weight"):
        bv.load_bagel_checkpoint_state_dict(folder)
    loaded = bv.load_bagel_checkpoint_state_dict(folder, strict=False)
    assert loaded.keys() == _reference(synthetic_checkpoint).keys()


def test_a_file_ending_early_on_the_staged_path_names_file_and_tensor(tmp_path: Path) -> None:
    """A cast destination is read through staging; its end-of-file error names the tensor too."""
    path, _ = _file_of(tmp_path, 100)
    destination = torch.empty(100, dtype=torch.float32)
    with pytest.raises(CorruptCheckpointError) as info:
        run([Transfer("cast", path, 0, 200, torch.int16, (100,), destination)])
    assert str(info.value).startswith(f"{path}: 'cast': unexpected end of file at byte 100 "), str(
        info.value
    )


def test_an_allocation_failure_names_the_tensor_and_what_the_load_holds(tmp_path: Path) -> None:
    """A sparse file whose header is valid but holds 10 TiB: torch cannot allocate it."""
    count = 5 * 2**40  # BF16 elements
    header = {
        "language_model.model.norm.weight": {
            "dtype": "BF16",
            "shape": [count],
            "data_offsets": [0, 2 * count],
        },
        "connector.fc1.bias": {
            "dtype": "BF16",
            "shape": [4],
            "data_offsets": [2 * count, 2 * count + 8],
        },
    }
    folder = tmp_path / "big"
    folder.mkdir()
    path = _header_file(folder / "ema.safetensors", header)
    try:
        os.truncate(path, path.stat().st_size + 2 * count + 8)
    except OSError:
        pytest.skip("this file system cannot hold a sparse 10 TiB file")
    with pytest.raises(bv.AllocationError) as info:
        bv.load_bagel_checkpoint_state_dict(folder, strict=False)
    assert str(info.value).startswith(
        f"{path}: cannot allocate 'language_model.model.norm.weight' ({2 * count:,} bytes on cpu; "
        f"the 2 tensors to load hold {2 * count + 8:,} bytes): "
    )


def test_a_tensor_entry_that_is_no_object_is_named_with_what_it_is(tmp_path: Path) -> None:
    path = _header_file(tmp_path / "x.safetensors", {"a": [1, 2]})
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert str(info.value).startswith(
        f"{path}: tensor 'a': entry must be an object with exactly dtype, shape, data_offsets; "
        "found array [1, 2]. "
    )


def test_a_torch_without_some_dtypes_leaves_their_names_out_of_the_table() -> None:
    """torch >= 2.1 is supported, and older releases lack the unsigned and float8 types: the
    table is built without them instead of failing the import (in a fresh interpreter)."""
    script = (
        "import torch\n"
        "del torch.uint16, torch.float8_e5m2\n"
        "from bagelverify.safetensors_io import DTYPES\n"
        "print(' '.join(sorted(DTYPES)))\n"
    )
    names = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "U16" not in names and "F8_E5M2" not in names
    assert {"BF16", "F32", "U32", "F8_E4M3"} <= set(names)
