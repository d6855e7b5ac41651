"""Reading single tensors of safetensors files into fresh CPU tensors, one at a time.

:class:`TensorReader` keeps one open descriptor per file and reads each requested tensor's byte
range (and nothing else) with :func:`~bagelverify.safetensors_io.read_into`; it can ask the kernel
to start reading the next tensor while the caller works on the current one. Streaming commands
(``diff``, ``repair``, rewrites) hold one or two tensors in memory at a time this way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import torch

from .safetensors_io import (
    DTYPES,
    TensorInfo,
    byte_view,
    read_exact,
    read_into,
    require_little_endian,
)

CHUNK_ELEMENTS = 4 * 1024 * 1024
"""Elements per piece in :meth:`TensorReader.read_range` (8 MB of BF16)."""


class TensorReader:
    """Reads :class:`TensorInfo` byte ranges into new tensors; use as a context manager."""

    def __init__(self, fds: Mapping[Path, int] | None = None) -> None:
        """``fds``: descriptors to read files through (e.g. those a checkpoint's headers were
        read through); they stay open on :meth:`close`. Other files are opened by path."""
        self._borrowed = dict(fds or {})
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._borrowed.get(path, self._fds.get(path))
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def read(self, info: TensorInfo) -> torch.Tensor:
        """A new contiguous CPU tensor holding ``info``'s stored values (dtype and shape)."""
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        read_into(self._fd(info.path), info, out)
        return out

    def read_range(
        self, info: TensorInfo, begin: int, end: int, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Elements ``[begin, end)`` of ``info`` (flattened), read into ``buffer`` (a 1-D
        ``uint8`` tensor of at least that many bytes), as a 1-D view of the stored dtype."""
        require_little_endian()
        size = DTYPES[info.dtype].itemsize
        raw = buffer[: (end - begin) * size]
        read_exact(
            self._fd(info.path),
            byte_view(raw),
            info.start + begin * size,
            source=f"{info.path}: {info.name!r}",
        )
        return raw.view(info.torch_dtype)

    def prefetch(self, info: TensorInfo) -> None:
        """Hint the kernel to read ``info``'s bytes soon (no-op where unsupported)."""
        if info.nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(info.path), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Close every descriptor this reader opened."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def element_ranges(count: int, step: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``[begin, end)`` ranges of at most ``step`` elements covering ``count`` elements."""
    for begin in range(0, count, step):
        yield begin, min(count, begin + step)
