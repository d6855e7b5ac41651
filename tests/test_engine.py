"""The read engine: its read plan and its parallel, staged reads against a plain sequential read."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bagelverify import engine
from bagelverify.engine import EngineOptions, Read, Transfer, plan_reads, run
from bagelverify.errors import CorruptCheckpointError, ReadError
from bagelverify.patch_embedding import conv_patch_weight_to_linear


@st.composite
def _spans(draw: st.DrawFn) -> tuple[list[tuple[Path, int, int]], int]:
    """Non-overlapping spans over two files, some touching, some empty, and a chunk size."""
    spans: list[tuple[Path, int, int]] = []
    for path in (Path("a"), Path("b")):
        offset = draw(st.integers(0, 50))
        for _ in range(draw(st.integers(0, 8))):
            offset += draw(st.sampled_from([0, 0, 1, 7]))
            size = draw(st.integers(0, 300))
            spans.append((path, offset, size))
            offset += size
    order = draw(st.permutations(range(len(spans))))
    return [spans[i] for i in order], draw(st.integers(1, 128))


@given(_spans())
def test_plan_covers_every_byte_once_in_contiguous_reads_within_the_chunk(
    case: tuple[list[tuple[Path, int, int]], int],
) -> None:
    """Invariant: each span's bytes are in exactly one piece, in order; each read is one
    contiguous file range of at most ``chunk`` bytes, made of its pieces back to back."""
    spans, chunk = case
    reads = plan_reads(spans, chunk)
    covered: dict[int, list[tuple[int, int, int]]] = {}
    for read in reads:
        assert 0 < read.length <= chunk
        assert sum(p.length for p in read.pieces) == read.length
        position = 0
        for piece in read.pieces:
            path, offset, _ = spans[piece.transfer]
            assert path == read.path
            assert piece.buffer_offset == position
            assert offset + piece.start == read.offset + position  # file-contiguous
            position += piece.length
            covered.setdefault(piece.transfer, []).append((piece.start, piece.length, read.offset))
    for index, (_, _, size) in enumerate(spans):
        parts = sorted(covered.get(index, []))
        assert sum(length for _, length, _ in parts) == size
        assert [start for start, _, _ in parts] == [
            sum(length for _, length, _ in parts[:n]) for n in range(len(parts))
        ]


def test_plan_coalesces_touching_small_spans_and_splits_large_ones() -> None:
    a = Path("f")
    reads = plan_reads([(a, 0, 10), (a, 10, 10), (a, 25, 5), (a, 30, 100)], chunk=40)
    assert [(r.offset, r.length, [p.transfer for p in r.pieces]) for r in reads] == [
        (0, 20, [0, 1]),
        (25, 5, [2]),  # a span longer than the chunk starts its own reads (element-aligned)
        (30, 40, [3]),
        (70, 40, [3]),
        (110, 20, [3]),
    ]


def _file(tmp_path: Path, nbytes: int) -> tuple[Path, bytes]:
    data = os.urandom(nbytes)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _stored(data: bytes, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    raw = bytearray(data[offset : offset + count * dtype.itemsize])
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-equal (random bytes hold NaNs, which ``torch.equal`` never calls equal)."""
    got, want = got.detach().cpu().contiguous(), want.contiguous()
    return got.dtype == want.dtype and torch.equal(
        got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
    )


def _layout(tmp_path: Path) -> tuple[Path, bytes, list[tuple[int, torch.dtype, tuple[int, ...]]]]:
    """A file with many small tensors (coalesced), a large one (chunked), an empty one, and
    odd element sizes so that some pieces start at unaligned buffer offsets."""
    specs = [
        (torch.bfloat16, (3,)),
        (torch.float32, (5, 7)),
        (torch.bfloat16, (0, 4)),
        (torch.bfloat16, (64, 300)),
        (torch.float16, (11,)),
        (torch.bfloat16, (4, 3, 2, 2)),
        (torch.float32, (1000,)),
    ]
    layout, offset = [], 3
    for dtype, shape in specs:
        layout.append((offset, dtype, shape))
        count = 1
        for dim in shape:
            count *= dim
        offset += count * dtype.itemsize
    path, data = _file(tmp_path, offset + 17)
    return path, data, layout


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_values_are_bit_identical_to_a_sequential_read_for_every_thread_count(
    tmp_path: Path, threads: int, chunk: int
) -> None:
    path, data, layout = _layout(tmp_path)
    transfers, expected = [], []
    for n, (offset, dtype, shape) in enumerate(layout):
        stored = _stored(data, offset, dtype, shape)
        count = stored.numel()
        nbytes = count * dtype.itemsize
        kind = n % 4
        if kind == 0:  # straight into a CPU tensor of the file's dtype
            destination, want = torch.empty(shape, dtype=dtype), stored
        elif kind == 1:  # a widening cast
            destination, want = torch.empty(shape, dtype=torch.float64), stored.double()
        elif kind == 2:  # a non-contiguous destination
            dims = tuple(reversed(range(len(shape))))
            destination = torch.empty(tuple(reversed(shape)), dtype=dtype).permute(dims)
            want = stored
        else:  # a whole-tensor transform
            destination = torch.empty((count,), dtype=torch.float32)
            want = stored.float().reshape(-1) * 2
        transform = (lambda t: t.float().reshape(-1) * 2) if kind == 3 else None
        transfers.append(
            Transfer(f"t{n}", path, offset, nbytes, dtype, shape, destination, transform)
        )
        expected.append(want)
    stats = run(
        transfers, options=EngineOptions(threads=threads, chunk_bytes=chunk, staging_bytes=chunk)
    )
    for transfer, want in zip(transfers, expected, strict=False):
        assert _same(transfer.destination.reshape(want.shape), want), transfer.label
    assert stats.bytes_read == sum(t.nbytes for t in transfers)
    assert stats.staging_bytes <= chunk


def test_patch_conversion_through_the_engine(tmp_path: Path) -> None:
    shape = (8, 3, 14, 14)
    path, data = _file(tmp_path, 8 * 3 * 14 * 14 * 2)
    stored = _stored(data, 0, torch.bfloat16, shape)
    destination = torch.empty((8, 588), dtype=torch.float32)
    run(
        [
            Transfer(
                "p",
                path,
                0,
                len(data),
                torch.bfloat16,
                shape,
                destination,
                conv_patch_weight_to_linear,
            )
        ],
        options=EngineOptions(chunk_bytes=4096, staging_bytes=4096),
    )
    assert _same(destination, conv_patch_weight_to_linear(stored).float())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(budget=st.integers(4096, 40_000), threads=st.integers(1, 4))
def test_staging_never_exceeds_the_budget(tmp_path: Path, budget: int, threads: int) -> None:
    """Invariant: staging buffers held at once stay within ``staging_bytes``, even for a tensor
    many times larger than the budget."""
    nbytes = 200_000
    path = tmp_path / "big.bin"
    if not path.exists():
        path.write_bytes(os.urandom(nbytes))
    data = path.read_bytes()
    destination = torch.empty(nbytes // 4, dtype=torch.float64)
    stats = run(
        [Transfer("big", path, 0, nbytes, torch.float32, (nbytes // 4,), destination)],
        options=EngineOptions(threads=threads, chunk_bytes=1 << 20, staging_bytes=budget),
    )
    assert 0 < stats.staging_bytes <= budget
    assert _same(destination, _stored(data, 0, torch.float32, (nbytes // 4,)).double())


class _FakeCopy:
    """A stand-in for a CUDA copy's event: done or still running; counts the waits for it."""

    def __init__(self, done: bool) -> None:
        self.done, self.waits = done, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


def _take(pool: engine._Staging, copy: _FakeCopy | None = None) -> torch.Tensor:
    """Take a buffer from ``pool`` and give it back with ``copy`` as its last copy out."""
    with pool.buffer(threading.Event()) as (buffer, events):
        if copy is not None:
            events.append(copy)
    return buffer


def test_staging_hands_out_a_finished_buffer_before_one_whose_copy_runs() -> None:
    """A reader never waits for a running copy while a buffer whose copy is done lies idle,
    whichever was given back last."""
    pool = engine._Staging(count=2, size=4096, pinned=False)
    stop = threading.Event()
    finished, running = _FakeCopy(done=True), _FakeCopy(done=False)
    held_first, held_second = pool.buffer(stop), pool.buffer(stop)
    first, first_events = held_first.__enter__()
    second, second_events = held_second.__enter__()
    first_events.append(finished)
    held_first.__exit__(None, None, None)
    second_events.append(running)
    held_second.__exit__(None, None, None)  # given back last
    assert second is not first
    assert _take(pool) is first
    assert running.waits == 0 and finished.waits == 0


def test_staging_allocates_only_while_every_idle_buffer_is_copied_out() -> None:
    """A new buffer is allocated only while each idle one's copy runs; at the pool's size the
    reader waits for the oldest copy instead."""
    pool = engine._Staging(count=2, size=4096, pinned=False)
    oldest = _FakeCopy(done=False)
    first = _take(pool, oldest)
    assert pool.allocated == 4096
    second = _take(pool, _FakeCopy(done=False))  # the first is still being copied out
    assert second is not first and pool.allocated == 8192
    assert _take(pool) is first  # no third buffer: the oldest copy is waited for
    assert oldest.waits == 1 and pool.allocated == 8192


def test_staging_reuses_a_buffer_whose_copy_is_done_instead_of_allocating() -> None:
    """Buffers given back with no copy running (CPU staging) are reused: one reader at a time
    needs one buffer, however large the pool may grow."""
    pool = engine._Staging(count=8, size=4096, pinned=False)
    buffers = {id(_take(pool, _FakeCopy(done=True))) for _ in range(5)}
    buffers |= {id(_take(pool)) for _ in range(5)}
    assert len(buffers) == 1 and pool.allocated == 4096


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bagelverify-read-")]


def test_an_io_error_in_one_thread_stops_all_and_raises_one_read_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _data = _file(tmp_path, 64 * 4096)
    destinations = [torch.empty(4096, dtype=torch.uint8) for _ in range(64)]
    transfers = [
        Transfer(f"k{n}", path, n * 4096, 4096, torch.uint8, (4096,), d)
        for n, d in enumerate(destinations)
    ]
    real, calls = os.preadv, [0]
    lock = threading.Lock()

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        with lock:
            calls[0] += 1
            fail = calls[0] == 5
        if fail:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(engine.os, "preadv", flaky)
    with pytest.raises(ReadError) as caught:
        run(transfers, options=EngineOptions(threads=4, chunk_bytes=4096, staging_bytes=4096))
    message = str(caught.value)
    assert str(path) in message and "'k" in message and "Input/output error" in message
    assert _reader_threads() == []
    assert calls[0] < 64 + 4  # the others stopped instead of reading everything


def test_a_file_truncated_after_planning_is_a_corrupt_checkpoint_naming_file_and_tensor(
    tmp_path: Path,
) -> None:
    path, _ = _file(tmp_path, 100_000)
    destination = torch.empty(200_000, dtype=torch.uint8)
    with pytest.raises(CorruptCheckpointError, match=r"data\.bin: 'big'.*unexpected end of file"):
        run(
            [Transfer("big", path, 0, 200_000, torch.uint8, (200_000,), destination)],
            options=EngineOptions(threads=3, chunk_bytes=8192, staging_bytes=8192),
        )
    assert _reader_threads() == []


def _drop_from_cache(path: Path, start: int = 0) -> None:
    """Drop ``path``'s pages from ``start`` (a page boundary) on from the page cache (again
    while some stay: pages on another CPU's LRU list can outlast one call), or skip where this
    system keeps them or cannot tell (no ``cachestat`` before Linux 6.5)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(100):
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_DONTNEED)
            try:
                cached = engine._cached_pages(fd, start, os.fstat(fd).st_size - start)
            except OSError as error:
                pytest.skip(f"the kernel cannot tell what is cached: {error.strerror}")
            if not cached:
                return
            threading.Event().wait(0.01)
        pytest.skip("the page cache keeps this file")
    finally:
        os.close(fd)


def _reads_around_cache(path: Path) -> bool:
    """Whether this system lets the engine read ``path`` around the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.ExitStack() as stack:
            return bool(engine._open_direct({path}, {path: fd}, stack))
    finally:
        os.close(fd)


def _direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record ``(start, end)`` of every read that goes around the page cache."""
    calls: list[tuple[int, int]] = []
    read_direct = engine._read_direct

    def recorded(*args: object) -> None:
        calls.append((args[4], args[5]))  # type: ignore[arg-type]
        read_direct(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_read_direct", recorded)
    return calls


def _same_cast(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal values, NaN for NaN (a cast's NaN payload depends on the CPU's code path: a
    vectorised loop keeps it, a scalar tail may not)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


def _odd_casts(path: Path, data: bytes) -> tuple[list[Transfer], list[torch.Tensor]]:
    """F16 tensors at odd offsets of a 4 MiB file cast into F32 (staged reads), two of them
    spanning many chunks."""
    transfers, expected = [], []
    spans = [(3, 5), (1001, 1_000_001), (2_001_007, 9), (2_001_031, 1_000_000)]
    for n, (offset, count) in enumerate(spans):
        stored = _stored(data, offset, torch.float16, (count,))
        destination = torch.empty(count, dtype=torch.float32)
        transfers.append(
            Transfer(f"t{n}", path, offset, 2 * count, torch.float16, (count,), destination)
        )
        expected.append(stored.float())
    return transfers, expected


_DIRECT = EngineOptions(threads=3, chunk_bytes=64 << 10, staging_bytes=1 << 20, direct_reads=2)


@pytest.mark.parametrize("cache", ["cold", "warm", "half", "tail"])
def test_staged_reads_take_cached_bytes_from_the_cache_and_the_rest_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    """Whatever of the file the page cache holds, the values equal a plain read; only reads
    of which it holds nothing go around it (``O_DIRECT``)."""
    path, data = _file(tmp_path, 4 << 20)
    if not _reads_around_cache(path):
        pytest.skip("this system takes no O_DIRECT reads or has no cachestat")
    if cache == "tail":  # the second half cached, the first not
        _drop_from_cache(path)
        with open(path, "rb") as handle:
            handle.seek(2 << 20)
            handle.read()
    elif cache != "warm":
        _drop_from_cache(path, 0 if cache == "cold" else 2 << 20)  # a large folio's boundary
    calls = _direct_reads(monkeypatch)
    buffered = _buffered_reads(monkeypatch)
    transfers, expected = _odd_casts(path, data)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past the cached half
    try:
        run(transfers, options=_DIRECT, fds={path: fd})
    finally:
        os.close(fd)
    for transfer, want in zip(transfers, expected, strict=True):
        assert _same_cast(transfer.destination, want), transfer.label
    if cache == "warm":
        assert calls == []
    elif cache == "cold":
        assert calls and buffered == []
    elif cache == "half":
        assert calls and min(start for start, _ in calls) >= 2 << 20
    else:
        assert calls and max(end for _, end in calls) <= 2 << 20


def test_direct_reads_in_flight_stay_within_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _file(tmp_path, 4 << 20)
    _drop_from_cache(path)
    busy, most, lock = [0], [0], threading.Lock()
    read_direct = engine._read_direct

    def counted(*args: object) -> None:
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        threading.Event().wait(0.01)
        read_direct(*args)  # type: ignore[arg-type]
        with lock:
            busy[0] -= 1

    monkeypatch.setattr(engine, "_read_direct", counted)
    transfers, expected = _odd_casts(path, data)
    run(transfers, options=EngineOptions(threads=4, chunk_bytes=64 << 10, direct_reads=1))
    assert most[0] == 1
    assert all(_same_cast(t.destination, w) for t, w in zip(transfers, expected, strict=True))


@pytest.mark.parametrize("refused", ["O_DIRECT", "cachestat"])
def test_a_system_refusing_o_direct_or_cachestat_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    path, data = _file(tmp_path, 4 << 20)
    _drop_from_cache(path)
    opened = os.open

    def refuse_direct(name: str, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return opened(name, flags, *args)

    def refuse_cachestat(*args: int) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    if refused == "O_DIRECT":
        monkeypatch.setattr(os, "open", refuse_direct)
    else:
        monkeypatch.setattr(engine, "_cached_pages", refuse_cachestat)
    calls = _direct_reads(monkeypatch)
    transfers, expected = _odd_casts(path, data)
    run(transfers, options=_DIRECT)
    assert calls == []
    assert all(_same_cast(t.destination, w) for t, w in zip(transfers, expected, strict=True))


def _buffered_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the offset of every read through the page cache (``read_exact``)."""
    from bagelverify import safetensors_io

    offsets: list[int] = []
    read_exact = safetensors_io.read_exact

    def recorded(fd: int, view: memoryview, offset: int, **kwargs: str) -> None:
        offsets.append(offset)
        read_exact(fd, view, offset, **kwargs)

    monkeypatch.setattr(safetensors_io, "read_exact", recorded)
    return offsets


@pytest.mark.parametrize("answer", ["all", "a page at a time", "short", "refused"])
@pytest.mark.parametrize(("start", "end"), [(4101, 13_000), (8192, 16_384)])
def test_a_direct_read_fills_whole_pages_and_leaves_a_short_or_refused_rest_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, start: int, end: int
) -> None:
    """``_read_direct`` fills file bytes ``[start, end)`` at their place in a view holding the
    file from ``base`` on, reading whole pages and nothing past them (as many reads as it takes);
    after a short read or a refusal the rest (only the rest) comes through the page cache."""
    path, data = _file(tmp_path, 20_000)
    fd = os.open(path, os.O_RDONLY)
    preadv = os.preadv

    def direct_read(handle: int, views: list[memoryview], offset: int) -> int:
        if handle != -1:  # the page cache's read
            return preadv(handle, views, offset)
        assert offset % 4096 == 0 and len(views[0]) % 4096 == 0
        if answer == "refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        wanted = {"all": len(views[0]), "a page at a time": 4096, "short": 100}[answer]
        return preadv(fd, [views[0][:wanted]], offset)

    monkeypatch.setattr(os, "preadv", direct_read)
    buffered = _buffered_reads(monkeypatch)
    view = memoryview(bytearray(b"\xaa" * 20_480))
    base = 4096
    engine._read_direct(-1, fd, view, base, start, end, "data.bin: 't'")
    os.close(fd)
    assert view[start - base : end - base] == data[start:end]
    assert view[16_384:] == b"\xaa" * 4096  # nothing past the last page of the range
    first_page = start // 4096 * 4096
    fallback = {"short": [first_page + 100], "refused": [first_page]}
    assert buffered == fallback.get(answer, [])


def test_a_file_ending_inside_a_direct_read_is_a_corrupt_checkpoint_naming_file_and_tensor(
    tmp_path: Path,
) -> None:
    path, _ = _file(tmp_path, 1 << 20)
    _drop_from_cache(path)
    destination = torch.empty(1 << 20, dtype=torch.float32)
    with pytest.raises(CorruptCheckpointError, match=r"data\.bin: 'big'.*unexpected end of file"):
        run(
            [Transfer("big", path, 0, 2 << 20, torch.float16, (1 << 20,), destination)],
            options=_DIRECT,
        )


def test_a_misaligned_staging_buffer_is_read_around_the_cache_from_its_first_aligned_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes land where page-aligned file offsets meet page-aligned memory, so ``O_DIRECT``
    takes them (no read falls back to the page cache), and the part returned holds them."""
    path, data = _file(tmp_path, 1 << 20)
    _drop_from_cache(path)
    if not _reads_around_cache(path):
        pytest.skip("this system takes no O_DIRECT reads or has no cachestat")
    room = torch.empty(200_000, dtype=torch.uint8)
    buffer = room[(100 - room.data_ptr()) % 4096 :]  # 100 bytes past a page boundary
    buffered = _buffered_reads(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, fd)
        state = SimpleNamespace(
            fds={path: fd},
            direct_fds=engine._open_direct({path}, {path: fd}, stack),
            direct_slots=threading.BoundedSemaphore(1),
        )
        read = Read(path, 5000, 150_000, ())
        got = engine._read_staged(state, read, buffer, "data.bin: 't'")  # type: ignore[arg-type]
    assert bytes(got.numpy()) == data[5000:155_000]
    assert buffered == []


def test_cachestat_errors_carry_their_errno(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 8192)
    _drop_from_cache(path)  # skips where the kernel has no cachestat
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, 8192, 0)
    assert engine._cached_pages(fd, 0, 8192) == 2
    os.close(fd)
    with pytest.raises(OSError) as raised:
        engine._cached_pages(fd, 0, 8192)
    assert raised.value.errno == errno.EBADF
    assert raised.value.strerror == os.strerror(errno.EBADF)


def test_a_file_refusing_o_direct_is_logged_and_the_others_still_read_around_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    for path in (first, second):
        path.write_bytes(b"x" * 8192)
    if not _reads_around_cache(second):
        pytest.skip("this system takes no O_DIRECT reads or has no cachestat")
    fds = {path: os.open(path, os.O_RDONLY) for path in (first, second)}
    refused = f"/proc/self/fd/{fds[first]}"
    opened = os.open

    def refuse_first(name: str, flags: int, *args: int) -> int:
        if name == refused:
            raise OSError(errno.EINVAL, "Invalid argument")
        return opened(name, flags, *args)

    monkeypatch.setattr(os, "open", refuse_first)
    with caplog.at_level("DEBUG", logger="bagelverify.engine"), contextlib.ExitStack() as stack:
        direct = engine._open_direct({first, second}, fds, stack)
        assert list(direct) == [second]
    assert caplog.messages == [f"{first}: read through the page cache (Invalid argument)"]
    for fd in fds.values():
        os.close(fd)


def test_progress_reports_every_byte_once(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 50_000)
    seen: list[tuple[int, int]] = []
    run(
        [
            Transfer(
                "x", path, 0, 50_000, torch.uint8, (50_000,), torch.empty(50_000, dtype=torch.uint8)
            )
        ],
        options=EngineOptions(threads=2, chunk_bytes=4096, staging_bytes=4096),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1] == (50_000, 50_000) and len(seen) == 13
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_an_already_open_descriptor_is_used_instead_of_the_path(tmp_path: Path) -> None:
    """A load reads through the descriptor its header came from, even if the path is replaced."""
    path, data = _file(tmp_path, 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        path.write_bytes(b"\0" * 8192)
        destination = torch.empty(8192, dtype=torch.uint8)
        run([Transfer("x", path, 0, 8192, torch.uint8, (8192,), destination)], fds={path: fd})
    finally:
        os.close(fd)
    assert bytes(destination.numpy()) == data


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="threads"):
        EngineOptions(threads=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        EngineOptions(chunk_bytes=10)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="direct_reads"):
            EngineOptions(direct_reads=bad)  # type: ignore[arg-type]
    cpus = os.cpu_count() or 1
    assert EngineOptions().thread_count() == max(1, min(8, cpus))
    assert EngineOptions().thread_count(staged=False) == max(1, min(16, cpus))
    assert EngineOptions(threads=3).thread_count(staged=False) == 3
    assert EngineOptions(chunk_bytes=1 << 26, staging_bytes=1 << 20).read_size() == 1 << 20


def test_cuda_loads_have_their_own_thread_and_chunk_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert EngineOptions().thread_count(cuda=True) == engine.MAX_DEFAULT_CUDA_THREADS == 16
    assert EngineOptions().thread_count(staged=True) == engine.MAX_DEFAULT_THREADS == 8
    assert EngineOptions(threads=3).thread_count(cuda=True) == 3
    assert EngineOptions().read_size() == engine.DEFAULT_CHUNK_BYTES == 64 << 20
    assert EngineOptions().read_size(cuda=True) == engine.DEFAULT_CUDA_CHUNK_BYTES == 16 << 20
    assert EngineOptions(chunk_bytes=1 << 20).read_size(cuda=True) == 1 << 20
    assert EngineOptions(staging_bytes=(8 << 20) + 100).read_size(cuda=True) == (8 << 20) + 64


@pytest.mark.parametrize("slice_bytes", [2, 6, 20, 1 << 24])
def test_a_cast_on_the_device_fills_every_element_from_the_stored_bytes(
    monkeypatch: pytest.MonkeyPatch, slice_bytes: int
) -> None:
    """Invariant of the cast CUDA destinations get (run here on the CPU, the same code): every
    element of the destination is its stored BF16 value, whatever the slice size (one slice, a
    ragged last one, one element each)."""
    monkeypatch.setattr(engine, "_CAST_SLICE_BYTES", slice_bytes)
    values = torch.randn(11, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    destination = torch.full((11,), float("nan"))
    with torch.device("meta"):  # the temporaries live on the destination's device, not the default
        engine._cast_into(destination, values.view(torch.uint8), torch.bfloat16)
    assert torch.equal(destination, values.float())


def test_a_file_gone_since_its_header_was_read_is_named_with_what_to_check(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "ema.safetensors"
    destination = torch.empty(4, dtype=torch.uint8)
    with pytest.raises(ReadError) as info:
        run([Transfer("k", gone, 0, 4, torch.uint8, (4,), destination)])
    assert str(info.value) == (
        f"{gone}: cannot open for reading (No such file or directory); it was readable when its "
        "header was checked. Check that nothing removed or replaced it."
    )


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(("threads", "cast_slice"), [(1, None), (4, 64)])
def test_cuda_destinations_equal_a_cpu_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int, cast_slice: int | None
) -> None:
    """Every CUDA destination (same dtype, cast on the GPU in one or many slices, converted
    whole) equals the CPU read."""
    if cast_slice:
        monkeypatch.setattr(engine, "_CAST_SLICE_BYTES", cast_slice)
    path, data, layout = _layout(tmp_path)
    transfers, expected = [], []
    for n, (offset, dtype, shape) in enumerate(layout):
        stored = _stored(data, offset, dtype, shape)
        cast = n % 2 == 1
        destination = torch.empty(shape, dtype=torch.float32 if cast else dtype, device="cuda")
        transfers.append(
            Transfer(
                f"t{n}", path, offset, stored.numel() * dtype.itemsize, dtype, shape, destination
            )
        )
        expected.append(stored.float() if cast else stored)
    transfers.append(
        Transfer(
            "conv",
            path,
            0,
            8 * 3 * 2 * 2 * 2,
            torch.bfloat16,
            (8, 3, 2, 2),
            torch.empty((8, 12), dtype=torch.bfloat16, device="cuda"),
            conv_patch_weight_to_linear,
        )
    )
    expected.append(conv_patch_weight_to_linear(_stored(data, 0, torch.bfloat16, (8, 3, 2, 2))))
    stats = run(
        transfers, options=EngineOptions(threads=threads, chunk_bytes=4096, staging_bytes=16384)
    )
    for transfer, want in zip(transfers, expected, strict=False):
        assert _same(transfer.destination, want), transfer.label
    assert stats.staging_bytes <= 16384


def test_an_interrupt_while_waiting_stops_the_readers_and_waits_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C arriving while :func:`run` waits for its readers propagates only once no reader
    runs any more (before: the files were closed under reads still in flight, and a reader
    could outlive the interpreter's shutdown, which aborted the process; then, waiting by
    ``Thread.join``, an interrupt landing inside the join marked a reader still reading as
    stopped on Python < 3.13, and ``run`` returned without it)."""
    import signal
    import time

    path, _data = _file(tmp_path, 16 * 4096)
    destinations = [torch.empty(4096, dtype=torch.uint8) for _ in range(16)]
    transfers = [
        Transfer(f"k{n}", path, n * 4096, 4096, torch.uint8, (4096,), d)
        for n, d in enumerate(destinations)
    ]
    released = threading.Event()
    main = threading.get_ident()
    original = engine._do_read
    both_reading = threading.Barrier(2)
    signalled = threading.Lock()

    def interrupting(state: object, read: object, streams: object) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            both_reading.wait(timeout=5.0)  # both readers started: the caller is waiting
        if signalled.acquire(blocking=False):  # one reader interrupts the waiting caller
            time.sleep(0.05)
            signal.pthread_kill(main, signal.SIGINT)
            released.wait(timeout=2.0)
        original(state, read, streams)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_do_read", interrupting)
    # Python's own handler, whatever the runner installed (mutmut's workers ignore SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(transfers, options=EngineOptions(threads=2, chunk_bytes=4096))
    finally:
        signal.signal(signal.SIGINT, previous)
    readers = [t.name for t in threading.enumerate() if t.name.startswith("bagelverify-read")]
    released.set()
    assert readers == []
