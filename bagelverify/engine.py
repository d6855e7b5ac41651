"""The read engine: every byte of tensor data that bagelverify loads goes through :func:`run`.

A load is a list of :class:`Transfer` s (a byte range of a file and the tensor it fills). The
engine plans reads over them (:func:`plan_reads`: byte ranges of one file that touch are
coalesced into one read, large ones split into chunks) and runs the reads on a few threads
(``os.preadv`` releases the GIL):

- a contiguous CPU destination of the file's dtype is read straight into its memory;
- any other contiguous destination (a CUDA tensor, a cast) is read into a staging buffer from a
  bounded pool (pinned when CUDA is in use) and copied from there, on the thread's own CUDA
  stream with ``non_blocking=True``; the buffer is reused only after that copy's event is done.
  A read of which the page cache holds nothing goes around it (``O_DIRECT``, a few reads at
  once: a cold disk reads fastest so) where the system allows;
- a destination that needs the whole tensor first (the Conv2d patch conversion, a
  non-contiguous destination) is filled through a temporary of the file's dtype on the
  destination's device, then converted there.

Staging memory never exceeds :attr:`EngineOptions.staging_bytes`. An error in one thread stops
the others; :func:`run` waits for every thread and copy, then raises one error naming the file
and the tensor. Destinations of transfers that were being read or had already been read when the
error happened hold new data (all of them, some of them, or partly); the rest are untouched.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from .errors import BagelError, CorruptCheckpointError, ReadError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 64 * MiB
"""Default largest single read into CPU memory (64 MiB: the best chunk size measured on an H200
host)."""
DEFAULT_CUDA_CHUNK_BYTES = 16 * MiB
"""Default largest single read when CUDA destinations are read (through pinned staging).

Measured on the lent H100 host (NVIDIA H100 80GB HBM3, 16 cores; ``benchmarks/bench_gpu.py``,
stage 1 = 16.1 GB from ``/dev/shm`` into BF16 parameters, each load the first of a fresh process,
2026-12-07), with the pinned staging each setting allocates (at most ``2 x threads`` chunks
within :data:`DEFAULT_STAGING_BYTES`):

=======  =======  ========  =================================================
threads  chunk    pinned    GB/s
=======  =======  ========  =================================================
8        64 MiB   1 GiB     13.3, 16.2-16.9 (the defaults before)
16       64 MiB   1 GiB     15.5
16       32 MiB   1 GiB     16.5, 17.8
24       32 MiB   1 GiB     15.3
12       32 MiB   768 MiB   21.0
16       16 MiB   512 MiB   19.2-20.5, 23.8 (these defaults)
=======  =======  ========  =================================================

Pinning is the first load's largest fixed cost: 1 GiB took 0.58 s on one thread and 0.32 s on
16 (0.44 s with ``cudaHostRegister`` on plain memory), against about 0.8 s for the whole load;
the third load of a process, its pool already pinned, ran at 25.8 GB/s. Smaller chunks pin less.
These runs predate the staging pool's fix (each reader then waited for its own copy before its
next read, and "pinned" above is the pool's cap: about half of it was used); they are to be
repeated on a GPU (docs/engine.md gives the command).
"""
MAX_DEFAULT_THREADS = 8
"""Default thread count for loads staged on the CPU (casts, transforms into CPU tensors): the CPU
count capped at this (on a 16-core H200 host 8 threads beat 4 and 16)."""
MAX_DEFAULT_DIRECT_THREADS = 16
"""Default thread count when every read lands straight in CPU destinations: the CPU count capped
at this (there 16 threads read 1.5x faster than 8)."""
MAX_DEFAULT_CUDA_THREADS = 16
"""Default thread count when CUDA destinations are read: the CPU count capped at this (see
:data:`DEFAULT_CUDA_CHUNK_BYTES` for the measurements)."""
DEFAULT_STAGING_BYTES = 1024 * MiB
"""Default cap on staging memory (pinned when CUDA destinations are read)."""

DEFAULT_DIRECT_READS = 4
"""Default number of ``O_DIRECT`` reads at once (:attr:`EngineOptions.direct_reads`): on the
lent H100 host's disk 4 threads reading with ``O_DIRECT`` ran at 1.73 GB/s, 16 at 1.12, 16
through the page cache at 1.44 (``benchmarks/bench_gpu.py``, cold, 2026-12-07)."""

_PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffers (a multiple of any block size)
_DIRECT_SLACK = 3 * _PAGE  # staging bytes a read leaves free: aligning the buffer, its start, end

_CAST_SLICE_BYTES = 16 * MiB  # stored bytes cast at once on a CUDA device (per reader thread)

_IOV_MAX = 1024  # the fewest buffers one preadv takes on Linux (and the POSIX minimum is 16)
if hasattr(os, "sysconf"):
    with suppress(ValueError, OSError):
        _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``; called from reader threads, after each read."""


@dataclass(frozen=True)
class EngineOptions:
    """Knobs of the read engine (the defaults suit a local NVMe disk or the page cache).

    ``threads``: reader threads (``None``: the CPU count, capped at
    :data:`MAX_DEFAULT_DIRECT_THREADS` when every read goes straight into CPU destinations,
    :data:`MAX_DEFAULT_CUDA_THREADS` when CUDA destinations are read, :data:`MAX_DEFAULT_THREADS`
    otherwise). ``chunk_bytes``: the largest single read (``None``:
    :data:`DEFAULT_CUDA_CHUNK_BYTES` when CUDA destinations are read, else
    :data:`DEFAULT_CHUNK_BYTES`); a tensor larger than it is read in chunks. ``staging_bytes``:
    the most memory held in staging buffers at once (at least one chunk; the chunk shrinks to
    the budget if larger). ``prefetch``: ask the kernel (``POSIX_FADV_WILLNEED``) to start
    reading ranges a few reads ahead (files read around the page cache excepted).
    ``direct_reads``: a staged read of which the page cache holds nothing is read with
    ``O_DIRECT``, at most this many such reads at once (0: every read through the page cache; so
    too where the file system refuses ``O_DIRECT`` or the kernel has no ``cachestat``).
    """

    threads: int | None = None
    chunk_bytes: int | None = None
    staging_bytes: int = DEFAULT_STAGING_BYTES
    prefetch: bool = True
    direct_reads: int = DEFAULT_DIRECT_READS

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "staging_bytes"):
            value = getattr(self, name)
            if value is None and name == "chunk_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 4096:
                raise ValueError(f"EngineOptions.{name} must be an int >= 4096, got {value!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"EngineOptions.threads must be an int >= 1, got {self.threads!r}")
        if (
            isinstance(self.direct_reads, bool)
            or not isinstance(self.direct_reads, int)
            or self.direct_reads < 0
        ):
            raise ValueError(
                f"EngineOptions.direct_reads must be an int >= 0, got {self.direct_reads!r}"
            )

    def thread_count(self, *, staged: bool = True, cuda: bool = False) -> int:
        """The number of reader threads a run uses (``staged``: some reads go through staging;
        ``cuda``: some destinations are CUDA tensors)."""
        if cuda:
            cap = MAX_DEFAULT_CUDA_THREADS
        else:
            cap = MAX_DEFAULT_THREADS if staged else MAX_DEFAULT_DIRECT_THREADS
        return self.threads or max(1, min(cap, os.cpu_count() or 1))

    def read_size(self, *, cuda: bool = False) -> int:
        """The read size a run uses: ``chunk_bytes`` (or its default for the destinations)
        limited by the staging budget, a multiple of 64 bytes (so that chunks of a tensor start
        on element boundaries)."""
        wanted = self.chunk_bytes or (DEFAULT_CUDA_CHUNK_BYTES if cuda else DEFAULT_CHUNK_BYTES)
        return max(64, min(wanted, self.staging_bytes) // 64 * 64)


@dataclass(frozen=True)
class Transfer:
    """``nbytes`` bytes of ``path`` at ``offset`` (stored as ``dtype`` with ``shape``) that fill
    ``destination``.

    ``destination`` has ``shape``'s element count unless ``transform`` is given, which maps the
    stored tensor (on the destination's device) to the destination's value.
    ``label`` names the tensor in errors (its key).
    """

    label: str
    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    destination: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


class EngineStats(NamedTuple):
    """What one :func:`run` did: bytes read, reads issued, threads used, staging bytes held."""

    bytes_read: int
    reads: int
    threads: int
    staging_bytes: int


class Piece(NamedTuple):
    """Bytes ``[start, start + length)`` of transfer number ``transfer``, read into a buffer
    at ``buffer_offset``."""

    transfer: int
    start: int
    length: int
    buffer_offset: int


class Read(NamedTuple):
    """One ``preadv``: ``length`` bytes of ``path`` at ``offset``, split into pieces."""

    path: Path
    offset: int
    length: int
    pieces: tuple[Piece, ...]


def plan_reads(spans: Sequence[tuple[Path, int, int]], chunk: int) -> list[Read]:
    """Plan reads over ``spans`` (``(path, offset, nbytes)`` each, pieces indexed by position).

    Sorted by file and offset; spans of one file that touch are coalesced while the read stays
    within ``chunk`` bytes; a span longer than ``chunk`` is split into ``chunk``-sized reads.
    Every byte of every span is in exactly one piece; empty spans are in no read.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    order = sorted(
        (i for i, span in enumerate(spans) if span[2]),
        key=lambda i: (str(spans[i][0]), spans[i][1]),
    )
    reads: list[Read] = []
    pending: list[Piece] = []
    pending_path: Path | None = None
    pending_start = pending_end = 0

    def flush() -> None:
        if pending:
            assert pending_path is not None
            reads.append(
                Read(pending_path, pending_start, pending_end - pending_start, tuple(pending))
            )
            pending.clear()

    for index in order:
        path, offset, nbytes = spans[index]
        done = 0
        while done < nbytes:
            take = min(chunk, nbytes - done)
            start = offset + done
            joins = pending and path == pending_path and start == pending_end
            if not (joins and pending_end - pending_start + take <= chunk):
                flush()
                pending_path, pending_start, pending_end = path, start, start
            pending.append(Piece(index, done, take, pending_end - pending_start))
            pending_end += take
            done += take
    flush()
    return reads


# -- running ---------------------------------------------------------------------------------


class _Copy(Protocol):
    """What the pool needs of a CUDA event: whether the copy it follows is done, and a wait."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class _Staging:
    """A bounded pool of staging buffers, each with the event of the last copy out of it.

    A reader gets the longest-idle buffer whose copy has finished. While no idle buffer's copy
    has finished and fewer than ``count`` buffers exist, a new one is allocated instead (by the
    reader that needs it, so pinning overlaps the other readers' reads, and only as many are
    pinned as the copies in flight need); with ``count`` allocated, the reader waits for the
    oldest idle buffer's copy. Pinned buffers come from PyTorch's caching host allocator, so a
    later run in the process reuses them.
    """

    def __init__(self, count: int, size: int, pinned: bool) -> None:
        self._idle: deque[tuple[torch.Tensor, _Copy | None]] = deque()
        self._unallocated = count
        self._size, self._pinned = size, pinned
        self._ready = threading.Condition()
        self.allocated = 0

    def _allocate(self) -> torch.Tensor:
        import torch

        buffer = torch.empty(self._size, dtype=torch.uint8, pin_memory=self._pinned)
        with self._ready:
            self.allocated += self._size
        return buffer

    def _take(self) -> tuple[torch.Tensor | None, _Copy | None] | None:
        """Under the lock: a finished buffer (and no event), ``(None, None)`` for a new one, the
        oldest idle buffer with the copy to wait for, or ``None`` while readers hold them all."""
        for position, (buffer, copy) in enumerate(self._idle):
            if copy is None or copy.query():
                del self._idle[position]
                return buffer, None
        if self._unallocated:
            self._unallocated -= 1
            return None, None
        return self._idle.popleft() if self._idle else None

    @contextmanager
    def buffer(self, stop: threading.Event) -> Iterator[tuple[torch.Tensor, list[_Copy]]]:
        """A buffer and the list that the copies out of it append their events to."""
        with self._ready:
            while (taken := self._take()) is None:
                if stop.is_set():
                    raise _Stopped
                self._ready.wait(0.05)
        buffer, copy = taken
        events: list[_Copy] = []
        try:
            if copy is not None:
                copy.synchronize()
            if buffer is None:
                buffer = self._allocate()
            yield buffer, events
        finally:
            with self._ready:
                if buffer is not None:
                    self._idle.append((buffer, events[-1] if events else None))
                else:
                    self._unallocated += 1  # its allocation failed: another reader may try
                self._ready.notify()


class _Stopped(Exception):
    """Raised inside a reader thread when another thread has failed."""


@dataclass
class _Run:
    transfers: Sequence[Transfer]
    targets: list[torch.Tensor]
    """Per transfer, the contiguous tensor its bytes land in (a temporary for transforms)."""
    direct: list[bool]
    reads: list[Read]
    fds: Mapping[Path, int]
    direct_fds: Mapping[Path, int]
    """``O_DIRECT`` descriptors of the files whose staged reads may go around the page cache."""
    direct_slots: threading.BoundedSemaphore
    options: EngineOptions
    staging: _Staging
    progress: Progress | None
    total: int
    threads: int
    remaining: list[int] = field(default_factory=list)
    done: int = 0
    next_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    failed_read: Read | None = None


def _byte_target(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's memory."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8)


def _needs_whole(transfer: Transfer) -> bool:
    return transfer.transform is not None or not transfer.destination.is_contiguous()


def _target(transfer: Transfer) -> torch.Tensor:
    import torch

    if _needs_whole(transfer):
        return torch.empty(transfer.shape, dtype=transfer.dtype, device=transfer.destination.device)
    return transfer.destination


def _is_direct(transfer: Transfer, target: torch.Tensor) -> bool:
    return target.device.type == "cpu" and target.dtype == transfer.dtype


def run(
    transfers: Sequence[Transfer],
    *,
    options: EngineOptions | None = None,
    progress: Progress | None = None,
    fds: Mapping[Path, int] | None = None,
) -> EngineStats:
    """Fill every transfer's destination from its file (see the module docstring).

    ``fds``: file descriptors already open for (some of) the paths, used instead of opening the
    path again (so that the bytes come from the same file whose header was read); the others are
    opened here and closed before returning. Raises
    :class:`~bagelverify.errors.CorruptCheckpointError` for a file that ends early and
    :class:`~bagelverify.errors.ReadError` for an I/O error, naming the file and the tensor.
    """
    import torch

    from .safetensors_io import require_little_endian

    options = options or EngineOptions()
    require_little_endian()
    live = [t for t in transfers if t.nbytes]
    if not live:
        for t in transfers:  # empty tensors still get their transform (a no-op copy)
            _finish(t, _target(t))
        return EngineStats(0, 0, 0, 0)
    targets = [_target(t) for t in transfers]
    direct = [_is_direct(t, target) for t, target in zip(transfers, targets, strict=True)]
    uses_cuda = any(target.device.type == "cuda" for target in targets)
    staged = not all(d for t, d in zip(transfers, direct, strict=True) if t.nbytes)
    chunk = options.read_size(cuda=uses_cuda)
    # reads around the page cache leave _DIRECT_SLACK of each buffer free to align in (chunks
    # too small to spare it are read through the cache)
    around_cache = staged and options.direct_reads > 0 and _DIRECT_IO and chunk >= 4 * _DIRECT_SLACK
    planned = chunk - _DIRECT_SLACK if around_cache else chunk
    reads = plan_reads([(t.path, t.offset, t.nbytes) for t in transfers], planned)
    threads = max(1, min(options.thread_count(staged=staged, cuda=uses_cuda), len(reads)))
    buffers = max(1, min(options.staging_bytes // chunk, 2 * threads)) if staged else 0
    state = _Run(
        transfers,
        targets,
        direct,
        reads,
        {},
        {},
        threading.BoundedSemaphore(max(1, options.direct_reads)),
        options,
        _Staging(buffers, chunk, pinned=uses_cuda and torch.cuda.is_available()),
        progress,
        sum(t.nbytes for t in transfers),
        threads,
        remaining=[t.nbytes for t in transfers],
    )
    with ExitStack() as stack:
        opened: dict[Path, int] = dict(fds or {})
        for path in {r.path for r in reads} - set(opened):
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as error:
                raise ReadError(
                    f"{path}: cannot open for reading ({error.strerror}); it was readable when "
                    "its header was checked. Check that nothing removed or replaced it."
                ) from error
            stack.callback(os.close, fd)
            opened[path] = fd
        state.fds = opened
        if around_cache:
            state.direct_fds = _open_direct({r.path for r in reads}, opened, stack)
        _run_workers(state)
        if uses_cuda:
            torch.cuda.synchronize()
    logger.debug(
        "read %d bytes in %d reads on %d threads (%d staging bytes)",
        state.total,
        len(reads),
        threads,
        state.staging.allocated,
    )
    if state.error is not None:
        raise _describe(state)
    return EngineStats(state.total, len(reads), threads, state.staging.allocated)


_CACHESTAT = 451  # cachestat(2)'s number on every Linux architecture (Linux >= 6.5)
_DIRECT_IO = sys.platform.startswith("linux") and hasattr(os, "O_DIRECT")


class _Range(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cached", "dirty", "writeback", "evicted")]
    _fields_ += [("recently_evicted", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _cached_pages(fd: int, offset: int, length: int) -> int:
    """How many pages of bytes ``[offset, offset + length)`` of ``fd`` the page cache holds
    (``cachestat``: it starts no I/O, unlike a ``RWF_NOWAIT`` read); ``OSError`` where the
    kernel cannot tell."""
    found = _CacheStat()
    if _libc().syscall(
        ctypes.c_long(_CACHESTAT),
        ctypes.c_uint(fd),
        ctypes.byref(_Range(offset, length)),
        ctypes.byref(found),
        ctypes.c_uint(0),
    ):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(found.cached)


def _open_direct(paths: set[Path], fds: Mapping[Path, int], stack: ExitStack) -> dict[Path, int]:
    """``O_DIRECT`` descriptors of the same open files (reopened through ``/proc/self/fd``) for
    the paths whose file system takes ``O_DIRECT`` and whose kernel answers ``cachestat``."""
    opened: dict[Path, int] = {}
    for path in sorted(paths):
        try:
            _cached_pages(fds[path], 0, 1)
            direct = os.open(f"/proc/self/fd/{fds[path]}", os.O_RDONLY | os.O_DIRECT)
        except OSError as error:
            logger.debug("%s: read through the page cache (%s)", path, error.strerror)
            continue
        stack.callback(os.close, direct)
        opened[path] = direct
    return opened


def _run_workers(state: _Run) -> None:
    """Start :attr:`_Run.threads` readers and wait for them. An interrupt (Ctrl-C, or SIGTERM
    turned into one) arriving meanwhile stops them after their current read and still waits for
    them before it propagates: the files stay open while they read, and no read runs on after
    :func:`run` returns.

    The wait is on each reader's own exit event, not on ``Thread.join``: before Python 3.13 an
    interrupt landing inside ``join`` can leave the thread marked as stopped while it still runs
    (so a join-based wait returned with a reader still reading). A reader that has no ident yet
    when ``stop`` is set has not asked for a read, and never will.
    """
    exits = [threading.Event() for _ in range(state.threads)]
    workers = [
        threading.Thread(target=_worker, args=(state, exited), name=f"bagelverify-read-{n}")
        for n, exited in enumerate(exits)
    ]
    try:
        for worker in workers:
            worker.start()
        for exited in exits:
            exited.wait()
    except BaseException:
        state.stop.set()
        for worker, exited in zip(workers, exits, strict=True):
            if worker.ident is None:
                continue
            while not exited.is_set():  # a second interrupt must not strand them either
                with suppress(BaseException):
                    exited.wait()
            with suppress(BaseException):
                worker.join()
        raise
    for worker in workers:
        worker.join()


def _describe(state: _Run) -> BaseException:
    error, read = state.error, state.failed_read
    assert error is not None
    if isinstance(error, BagelError) or read is None:
        return error
    labels = ", ".join(repr(state.transfers[p.transfer].label) for p in read.pieces[:3])
    if len(read.pieces) > 3:
        labels += f" (and {len(read.pieces) - 3} more)"
    return ReadError(
        f"{read.path}: reading bytes {read.offset}..{read.offset + read.length} ({labels}) "
        f"failed: {error}. Check the file and the disk, then load again; destinations read so "
        "far hold new data."
    )


def _next(state: _Run) -> Read | None:
    with state.lock:
        if state.stop.is_set() or state.next_read >= len(state.reads):
            return None
        read = state.reads[state.next_read]
        state.next_read += 1
        ahead = state.next_read + state.threads
    if state.options.prefetch and ahead < len(state.reads) and hasattr(os, "posix_fadvise"):
        nxt = state.reads[ahead]
        if nxt.path in state.direct_fds:
            return read  # uncached bytes are read around the page cache: no readahead wanted
        os.posix_fadvise(state.fds[nxt.path], nxt.offset, nxt.length, os.POSIX_FADV_WILLNEED)
    return read


def _worker(state: _Run, exited: threading.Event) -> None:
    import torch

    streams: dict[torch.device, torch.cuda.Stream] = {}
    read: Read | None = None
    try:
        with torch.no_grad():
            while (read := _next(state)) is not None:
                _do_read(state, read, streams)
                with state.lock:
                    state.done += read.length
                    done = state.done
                if state.progress is not None:
                    state.progress(done, state.total)
    except _Stopped:
        pass
    except BaseException as error:
        with state.lock:
            if state.error is None:
                state.error, state.failed_read = error, read
        state.stop.set()
    finally:
        try:
            for stream in streams.values():
                stream.synchronize()
        finally:
            exited.set()


def _stream(
    streams: dict[torch.device, torch.cuda.Stream], device: torch.device
) -> torch.cuda.Stream:
    import torch

    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _do_read(state: _Run, read: Read, streams: dict[torch.device, torch.cuda.Stream]) -> None:
    from .safetensors_io import byte_view

    source = f"{read.path}: {state.transfers[read.pieces[0].transfer].label!r}"
    if all(state.direct[p.transfer] for p in read.pieces):
        views = [
            byte_view(_byte_target(state.targets[p.transfer]))[p.start : p.start + p.length]
            for p in read.pieces
        ]
        _preadv_exact(state.fds[read.path], views, read.offset, source)
    else:
        with state.staging.buffer(state.stop) as (buffer, events):
            staged = _read_staged(state, read, buffer, source)
            for piece in read.pieces:
                _copy_piece(state, piece, staged, streams, events)
    for piece in read.pieces:
        _landed(state, piece)


def _read_staged(state: _Run, read: Read, buffer: torch.Tensor, source: str) -> torch.Tensor:
    """Read ``read`` into the staging ``buffer``; returns the part of it holding the bytes.

    Through the page cache, at the buffer's start, unless the file has an ``O_DIRECT``
    descriptor and the cache holds none of the range: then around it (:func:`_read_direct`,
    holding one of :attr:`_Run.direct_slots`), page-aligned file offsets on page-aligned
    addresses.
    """
    from .safetensors_io import byte_view, read_exact

    fd, view = state.fds[read.path], byte_view(buffer)
    direct = state.direct_fds.get(read.path)
    if direct is None or _cached_pages(fd, read.offset, read.length):
        read_exact(fd, view[: read.length], read.offset, source=source)
        return buffer[: read.length]
    base = read.offset // _PAGE * _PAGE  # the file offset at the buffer's first aligned byte
    shift = (-buffer.data_ptr()) % _PAGE
    with state.direct_slots:
        _read_direct(direct, fd, view[shift:], base, read.offset, read.offset + read.length, source)
    first = shift + read.offset - base
    return buffer[first : first + read.length]


def _read_direct(
    direct: int, fd: int, view: memoryview, base: int, start: int, end: int, source: str
) -> None:
    """Fill file bytes ``[start, end)`` into ``view`` (page-aligned memory holding the file from
    offset ``base``, page-aligned) with ``O_DIRECT`` reads of whole pages. After a short or
    refused one (the file's end, a device's own alignment) the rest is read through the page
    cache, which raises the end-of-file error if the file ended early."""
    from .safetensors_io import read_exact

    position, stop = start // _PAGE * _PAGE, -(-end // _PAGE) * _PAGE
    while position < end:
        try:
            got = os.preadv(direct, [view[position - base : stop - base]], position)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            got = 0
        position += got
        if got == 0 or got % _PAGE:
            break
    if position < end:
        read_exact(fd, view[position - base : end - base], position, source=source)


def _preadv_exact(fd: int, views: list[memoryview], offset: int, source: str) -> None:
    """``preadv`` into ``views`` (consecutive file bytes), retrying short reads."""
    from .safetensors_io import read_exact

    while views:
        got = os.preadv(fd, views[:_IOV_MAX], offset)
        if got == 0:
            read_exact(fd, views[0], offset, source=source)  # raises the end-of-file error
        offset += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views = views[1:]
        if views and got:
            views = [views[0][got:], *views[1:]]


def _copy_piece(
    state: _Run,
    piece: Piece,
    buffer: torch.Tensor,
    streams: dict[torch.device, torch.cuda.Stream],
    events: list[_Copy],
) -> None:
    """Copy one piece out of the staging buffer into its target (async on CUDA)."""

    transfer, target = state.transfers[piece.transfer], state.targets[piece.transfer]
    source = buffer[piece.buffer_offset : piece.buffer_offset + piece.length]
    cast = target.dtype != transfer.dtype
    if cast:  # element ranges (chunks of a tensor start on element boundaries)
        size = transfer.dtype.itemsize
        elements = slice(piece.start // size, (piece.start + piece.length) // size)
        destination = target.detach().reshape(-1)[elements]
    else:
        destination = _byte_target(target)[piece.start : piece.start + piece.length]
    if target.device.type == "cuda":
        _copy_on_cuda(transfer, target, destination, source, streams, events)
        return
    if cast:
        if source.storage_offset() % transfer.dtype.itemsize:
            source = source.clone()
        source = source.view(transfer.dtype)
    destination.copy_(source)


def _copy_on_cuda(
    transfer: Transfer,
    target: torch.Tensor,
    destination: torch.Tensor,
    source: torch.Tensor,
    streams: dict[torch.device, torch.cuda.Stream],
    events: list[_Copy],
) -> None:
    """Copy staged bytes into a CUDA destination on the reader's stream, recording the event
    that frees the buffer (a blocking event: a reader that waits for it sleeps instead of
    spinning, leaving the cores to the other readers). Runs only with a CUDA destination: the
    CUDA tests of ``tests/test_engine.py`` cover it on a GPU; CI has none, so the mutation gate
    skips it."""
    import torch

    stream = _stream(streams, target.device)
    with torch.cuda.stream(stream):
        if target.dtype != transfer.dtype:  # the stored bytes go over the bus, cast on the GPU
            _cast_into(destination, source, transfer.dtype)
        else:
            destination.copy_(source, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        event.record(stream)
    events.append(event)
    if _needs_whole(transfer):
        event.synchronize()  # the whole tensor is converted once all its pieces are in place


def _cast_into(destination: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> None:
    """Fill the flat ``destination`` with ``stored`` (the bytes of ``dtype`` elements, on the
    host) cast to the destination's dtype on its device: the bytes are copied there as stored,
    then cast, :data:`_CAST_SLICE_BYTES` at a time (on CUDA each slice's temporary is freed at
    once and reused by the next: the stream orders them)."""
    import torch

    step = _CAST_SLICE_BYTES // dtype.itemsize
    for first in range(0, destination.numel(), step):
        part = destination[first : first + step]
        size = part.numel() * dtype.itemsize
        at = first * dtype.itemsize
        on_device = torch.empty(size, dtype=torch.uint8, device=destination.device)
        on_device.copy_(stored[at : at + size], non_blocking=True)
        part.copy_(on_device.view(dtype))


def _landed(state: _Run, piece: Piece) -> None:
    with state.lock:
        state.remaining[piece.transfer] -= piece.length
        complete = state.remaining[piece.transfer] == 0
    transfer = state.transfers[piece.transfer]
    if complete and _needs_whole(transfer):
        _finish(transfer, state.targets[piece.transfer])


def _finish(transfer: Transfer, target: torch.Tensor) -> None:
    """Convert a whole stored tensor into its destination (on the destination's device)."""
    import torch

    if target is transfer.destination:
        return
    with torch.no_grad():
        value = transfer.transform(target) if transfer.transform is not None else target
        transfer.destination.copy_(value.reshape(transfer.destination.shape))
    if transfer.destination.device.type == "cuda":
        torch.cuda.current_stream(transfer.destination.device).synchronize()


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "DEFAULT_DIRECT_READS",
    "DEFAULT_STAGING_BYTES",
    "MAX_DEFAULT_CUDA_THREADS",
    "MAX_DEFAULT_DIRECT_THREADS",
    "MAX_DEFAULT_THREADS",
    "CorruptCheckpointError",
    "EngineOptions",
    "EngineStats",
    "Piece",
    "Progress",
    "Read",
    "ReadError",
    "Transfer",
    "plan_reads",
    "run",
]
