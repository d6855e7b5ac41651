"""``TensorReader`` pieces and ``read_ahead``: pieces read on a background thread, in order."""

from __future__ import annotations

import math
import threading
from contextlib import closing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bagelverify.errors import CorruptCheckpointError
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.tensor_reader import Piece, TensorReader, element_ranges, read_ahead


def _file(folder: Path, sizes: list[int]) -> dict[str, torch.Tensor]:
    tensors = {f"t{i}": torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(sizes)}
    save_tensors(folder / "x.safetensors", tensors)
    return tensors


def _ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bagelverify-read-ahead"]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    step=st.integers(1, 128),
    depth=st.integers(1, 3),
)
def test_read_ahead_yields_every_group_in_order_with_the_bytes_of_a_direct_read(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], step: int, depth: int
) -> None:
    """Invariant: read_ahead yields exactly the groups asked for, in order, each view equal to
    the tensor's elements [begin, end), whatever the depth and piece size (buffers reused)."""
    folder = tmp_path_factory.mktemp("ahead")
    tensors = _file(folder, sizes)
    infos = read_header(folder / "x.safetensors").tensors
    groups: list[tuple[Piece, Piece]] = [
        ((infos[a], begin, end), (infos[b], begin, end))
        for a, b in zip(infos, reversed(infos), strict=True)
        for begin, end in element_ranges(
            min(math.prod(infos[a].shape), math.prod(infos[b].shape)), step
        )
    ]
    seen = 0
    with TensorReader() as reader:
        for group, views in zip(groups, read_ahead(reader, groups, step * 4, depth), strict=True):
            for (info, begin, end), view in zip(group, views, strict=True):
                assert torch.equal(view, tensors[info.name][begin:end])
            seen += 1
    assert seen == len(groups)
    assert not _ahead_threads()


def test_read_ahead_raises_a_read_error_at_its_group_after_the_earlier_ones(
    tmp_path: Path,
) -> None:
    _file(tmp_path, [100, 100])
    path = tmp_path / "x.safetensors"
    infos = read_header(path).tensors
    with path.open("r+b") as handle:  # the second tensor's bytes end early
        handle.truncate(infos["t1"].start + 40)
    groups = [
        [(info, begin, end)] for info in infos.values() for begin, end in element_ranges(100, 50)
    ]
    got = []
    with (
        TensorReader() as reader,
        closing(read_ahead(reader, groups, 200)) as pieces,
        pytest.raises(CorruptCheckpointError, match=r"x\.safetensors: 't1': unexpected end"),
    ):
        for views in pieces:
            got.append(views[0].clone())
    assert [len(g) for g in got] == [50, 50]  # t0's two pieces came first
    assert not _ahead_threads()


def test_closing_read_ahead_early_stops_its_thread(tmp_path: Path) -> None:
    _file(tmp_path, [1000])
    info = read_header(tmp_path / "x.safetensors").tensors["t0"]
    groups = [[(info, begin, end)] for begin, end in element_ranges(1000, 10)]
    with TensorReader() as reader:
        pieces = read_ahead(reader, groups, 40, depth=2)
        first = next(pieces)
        assert torch.equal(first[0], torch.arange(10, dtype=torch.float32))
        assert len(_ahead_threads()) == 1  # blocked: every slot is full or held
        pieces.close()
    assert not _ahead_threads()


def test_a_reader_shared_by_threads_opens_each_file_once(tmp_path: Path) -> None:
    _file(tmp_path, [10])
    info = read_header(tmp_path / "x.safetensors").tensors["t0"]
    with TensorReader() as reader:
        threads = [threading.Thread(target=reader.read, args=(info,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(reader._fds) == 1
