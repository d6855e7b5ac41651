"""Reading and writing the safetensors format without holding a file in memory.

:func:`read_header` parses and validates a file's header before any tensor byte is read;
:func:`read_into` copies one tensor's bytes straight from the file into a destination tensor's
memory; :func:`write_safetensors` streams tensors one at a time into a temporary file that is
fsync'ed and then renamed over the final name, so a crash never leaves a partial file there.

The format: 8 bytes little-endian header length ``N``; ``N`` bytes of UTF-8 JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
section) plus an optional ``"__metadata__"`` of str -> str; then the data section, which the
tensors must tile exactly (no overlap, no hole, nothing after the last one).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .atomic import atomic_open
from .errors import CorruptCheckpointError, UnsupportedPlatformError, UnsupportedTensorError
from .strict_json import is_unicode, json_type, parse_json, short_repr

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header this reader accepts (the real 1,223-tensor header is about 150 KB)."""

METADATA_KEY = "__metadata__"
DEFAULT_METADATA: dict[str, str] = {"format": "pt"}
"""What ``safetensors.torch.save_file`` writes, so loaders that check it accept our files."""

_HEADER_ALIGN = 8
_COPY_CHUNK = 64 * 1024 * 1024  # bytes per write() call when streaming a tensor to disk


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in the header, the torch dtype, bytes per element."""

    name: str
    torch_dtype: torch.dtype
    itemsize: int


def _dtype_table() -> dict[str, DType]:
    names = {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
    table: dict[str, DType] = {}
    for name, attr in names.items():
        dtype = getattr(torch, attr, None)  # older torch lacks the unsigned and float8 types
        if isinstance(dtype, torch.dtype):
            table[name] = DType(name, dtype, torch.empty((), dtype=dtype).element_size())
    return table


DTYPES: dict[str, DType] = _dtype_table()
"""Safetensors dtype name -> :class:`DType`, for every dtype this torch build has."""
DTYPE_BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return DTYPE_BY_TORCH[dtype].name
    except KeyError:
        raise UnsupportedTensorError(
            f"torch dtype {dtype} has no safetensors equivalent (supported: "
            f"{', '.join(str(d) for d in DTYPE_BY_TORCH)}); convert the tensor first"
        ) from None


def lossless_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every value of ``source`` is exactly representable in ``target``: the same
    dtype, or a floating widening (BF16 -> F32, F16 -> F32, FP8 -> BF16/F16/F32).

    Decided from ``torch.finfo`` (range, precision and smallest normal all at least as fine),
    not ``torch.promote_types``, which refuses the float8 types."""
    if source == target:
        return True
    if not (source.is_floating_point and target.is_floating_point):
        return False
    a, b = torch.finfo(source), torch.finfo(target)
    return b.max >= a.max and b.eps <= a.eps and b.smallest_normal <= a.smallest_normal


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, name, dtype, shape and absolute byte range ``[start, end)``."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored values."""
        return DTYPES[self.dtype].torch_dtype


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in header order, the metadata, and the file layout."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what}. The file is not a valid safetensors file; re-download or re-save it."
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_MAX_ELEMENTS = 2**63 - 1  # torch counts elements and strides in int64


def _overflows_int64(shape: Sequence[int]) -> bool:
    """Whether the product of the non-zero dims exceeds int64 (stops at the first overflow, so a
    shape of millions of dims costs linear time, never a huge product)."""
    product = 1
    for dim in shape:
        product *= max(dim, 1)
        if product > _MAX_ELEMENTS:
            return True
    return False


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"tensor {short_repr(name)}"
    if not isinstance(entry, dict) or set(entry) != set(_ENTRY_FIELDS):
        if not isinstance(entry, dict):
            found = f"found {json_type(entry)} {short_repr(entry)}"
        else:
            missing = [f for f in _ENTRY_FIELDS if f not in entry]
            extra = [f for f in entry if f not in _ENTRY_FIELDS]
            found = f"missing {missing}, unexpected {short_repr(extra)}"
        raise _corrupt(
            path,
            f"{where}: entry must be an object with exactly dtype, shape, data_offsets; {found}",
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(
            path, f"{where}: unknown dtype {short_repr(dtype)} (known: {', '.join(sorted(DTYPES))})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(
            path, f"{where}: shape {short_repr(shape)} is not a list of non-negative integers"
        )
    if _overflows_int64(shape):
        raise _corrupt(path, f"{where}: shape {short_repr(shape)} overflows int64 element counts")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(
            path,
            f"{where}: data_offsets {short_repr(offsets)} is not [begin, end] with "
            "0 <= begin <= end",
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            path,
            f"{where}: shape {shape} x {dtype} is {expected} bytes but data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(
        path, name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]
    )


def _check_tiling(path: Path, tensors: Iterable[TensorInfo], data_start: int, size: int) -> None:
    """The tensors must cover ``[data_start, size)`` exactly, in some order."""

    def span(info: TensorInfo) -> str:
        begin, end = info.start - data_start, info.end - data_start
        return f"tensor {short_repr(info.name)} (data bytes {begin}-{end})"

    cursor, previous = data_start, "the header"
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.end > size:
            raise _corrupt(
                path,
                f"{span(info)} ends at file byte {info.end}, past the file end ({size} bytes)",
            )
        if info.start < cursor:
            raise _corrupt(path, f"{span(info)} overlaps {previous}")
        if info.start > cursor:
            raise _corrupt(
                path, f"{info.start - cursor} unused bytes between {previous} and {span(info)}"
            )
        cursor, previous = info.end, span(info)
    if cursor != size:
        raise _corrupt(path, f"{size - cursor} bytes after the last tensor ({previous})")


def open_regular(path: str | os.PathLike[str]) -> int:
    """Open ``path`` for reading and return the descriptor, refusing anything but a regular file
    (a FIFO, a device, a socket) without blocking on it: ``FileNotFoundError`` when it is absent,
    :class:`~bagelverify.errors.CorruptCheckpointError` naming what it is otherwise."""
    path = Path(path)
    if "\0" in str(path):
        raise CorruptCheckpointError(f"{str(path)!r}: a file name cannot hold a NUL character")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else ("a device or socket")
            )
            raise CorruptCheckpointError(
                f"{path}: is {kind}, not a regular file; a checkpoint file must be a plain file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header_bytes(fd: int, path: Path, count: int, offset: int) -> bytes:
    """``count`` header bytes at ``offset`` (``os.pread``: tensor data is read by
    :func:`read_exact` alone, with ``os.preadv``)."""
    parts, done = [], 0
    while done < count:
        part = os.pread(fd, count - done, offset + done)
        if not part:
            raise _corrupt(path, f"the file ends at byte {offset + done}, inside its header")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _header_length(fd: int, path: Path) -> int:
    """The header length the file's 8-byte prefix gives, refused above the cap."""
    (length,) = struct.unpack("<Q", _read_header_bytes(fd, path, 8, 0))
    if length > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte cap")
    return int(length)


def read_header(path: str | os.PathLike[str], *, fd: int | None = None) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file, reading no tensor data.

    Raises ``FileNotFoundError`` for a missing file (other ``OSError`` s, such as a directory or
    an unreadable file, propagate too) and :class:`~bagelverify.errors.CorruptCheckpointError`
    for anything malformed: a short file, a header length past the file end or above
    :data:`MAX_HEADER_BYTES`, bad UTF-8 or JSON (see :func:`~bagelverify.strict_json.parse_json`:
    repeated names or fields, lone surrogates, too deep), a header or entry that is not an object,
    missing or extra fields, an unknown dtype, a shape that is not a list of non-negative ints
    (``bool`` is not an int) or that overflows int64, offsets that overlap, leave holes or leave
    the file, a byte span that disagrees with shape x dtype, or non-string metadata. Every message
    names the file and the offending tensor or field.

    With ``fd`` (open on ``path``, e.g. by :func:`open_regular`) the header is read through it,
    so a caller that reads the data through the same descriptor reads the file whose header
    this is, whatever renames happen meanwhile.
    """
    path = Path(path)
    if fd is None:
        fd = open_regular(path)
        try:
            return read_header(path, fd=fd)
        finally:
            os.close(fd)
    size = os.fstat(fd).st_size
    if size < 8:
        raise _corrupt(path, f"the file is {size} bytes, shorter than the 8-byte length prefix")
    length = _header_length(fd, path)
    if 8 + length > size:
        raise _corrupt(path, f"header length {length} runs past the file end ({size} bytes)")
    raw = _read_header_bytes(fd, path, length, 8)
    document = parse_json(raw, lambda what: _corrupt(path, f"unusable header JSON: {what}"))
    if not isinstance(document, dict):
        raise _corrupt(
            path,
            f"the header is {json_type(document)} {short_repr(document)}, not a JSON object",
        )
    data_start = 8 + length
    metadata = document.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict):
        raise _corrupt(
            path, f"{METADATA_KEY} must map strings to strings, got {short_repr(metadata)}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _corrupt(
                path,
                f"{METADATA_KEY} must map strings to strings, but {short_repr(key)} is "
                f"{json_type(value)} {short_repr(value)}",
            )
    tensors = {
        name: _parse_entry(path, name, entry, data_start) for name, entry in document.items()
    }
    _check_tiling(path, tensors.values(), data_start, size)
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, size)


def header_digest(fd: int, path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of the header -- length prefix and JSON, ``__metadata__`` included -- of
    the safetensors file open as ``fd``, whose header :func:`read_header` validated: files with
    equal digests list the same tensors at the same offsets, with the same metadata."""
    path = Path(path)
    return hashlib.sha256(_read_header_bytes(fd, path, 8 + _header_length(fd, path), 0)).hexdigest()


# -- raw tensor memory -------------------------------------------------------------------------


def require_little_endian() -> None:
    """Safetensors data is little-endian; raw byte copies are only correct on such hosts."""
    if sys.byteorder != "little":
        raise UnsupportedPlatformError(
            f"this host is {sys.byteorder}-endian; bagelverify copies safetensors bytes "
            "(little-endian) straight into tensor memory and supports little-endian hosts only"
        )


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (keep ``tensor`` alive)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def read_exact(fd: int, buffer: memoryview, offset: int, *, source: str = "") -> None:
    """Fill ``buffer`` from file descriptor ``fd`` at ``offset``; short reads are retried.

    ``source`` (file and tensor) starts the error message of a file that ends too early.
    """
    done, total = 0, len(buffer)
    while done < total:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise CorruptCheckpointError(
                f"{source}{': ' if source else ''}unexpected end of file at byte {offset + done} "
                f"while reading {total} bytes at offset {offset}; the file was truncated after "
                "its header was read. Re-download or re-save it."
            )
        done += got


def read_into(fd: int, info: TensorInfo, destination: torch.Tensor) -> None:
    """Copy ``info``'s bytes into ``destination`` (contiguous, CPU, same dtype and element count).

    This is the only place that reads tensor data: nothing but ``[info.start, info.end)`` is read.
    """
    require_little_endian()
    if destination.dtype != info.torch_dtype or destination.numel() != math.prod(info.shape):
        raise ValueError(
            f"{info.name!r}: destination {destination.dtype} x {destination.numel()} does not "
            f"hold {info.dtype} x {math.prod(info.shape)}"
        )
    read_exact(fd, byte_view(destination), info.start, source=f"{info.path}: {info.name!r}")


# -- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name == METADATA_KEY or not is_unicode(name):
        raise UnsupportedTensorError(
            f"{short_repr(name)} cannot name a tensor in a safetensors file (names are str, "
            f"valid Unicode, and {METADATA_KEY!r} is reserved); rename or drop it. Nothing was "
            "written."
        )
    return name


def check_writable(name: str, value: object) -> torch.Tensor:
    """``value`` if a safetensors file can hold it as ``name``, else
    :class:`~bagelverify.errors.UnsupportedTensorError` naming the key, what it is and what to do.

    Accepted: dense (strided) tensors with memory on any device, of a dtype in :data:`DTYPES`,
    contiguous or not; ``nn.Parameter`` and ``requires_grad`` tensors included.
    """
    _check_name(name)
    if not isinstance(value, torch.Tensor):
        why = f"the value is {type(value).__name__}, not a torch.Tensor"
    elif type(value).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        why = (
            f"the value is a {type(value).__name__}, a tensor subclass whose memory is not its "
            "values (gather a DTensor with .full_tensor() first)"
        )
    elif value.is_nested:
        why = "the tensor is a nested tensor of ragged pieces (save each piece as its own key)"
    elif value.layout != torch.strided:
        why = f"the tensor's layout is {value.layout} (call .to_dense() first)"
    elif value.device.type == "meta":
        why = "the tensor is on the meta device and has no values to write"
    elif value.dtype not in DTYPE_BY_TORCH:
        why = f"torch dtype {value.dtype} has no safetensors equivalent (convert it first)"
    else:
        return value
    raise UnsupportedTensorError(f"{name!r}: {why}. Nothing was written.")


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The :class:`TensorSpec` of a tensor (checked by :func:`check_writable`)."""
    tensor = check_writable(name, tensor)
    return TensorSpec(name, dtype_name(tensor.dtype), tuple(tensor.shape))


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header, padded with spaces so the data section is 8-byte aligned.

    Tensors are laid out in ``specs`` order; callers sort by element size (largest first) so
    every tensor starts at a multiple of its element size.
    """
    document: dict[str, Any] = {METADATA_KEY: dict(metadata)}
    offset = 0
    for spec in specs:
        if _check_name(spec.name) in document:
            raise UnsupportedTensorError(f"{spec.name!r} is listed twice; names must be unique")
        document[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % _HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


def layout_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Largest element size first, otherwise in the given order: keeps every tensor aligned."""
    return sorted(specs, key=lambda spec: -DTYPES[spec.dtype].itemsize)


def _write_all(handle: BinaryIO, view: memoryview) -> None:
    for begin in range(0, len(view), _COPY_CHUNK):
        handle.write(view[begin : begin + _COPY_CHUNK])


def _write_tensor(handle: BinaryIO, spec: TensorSpec, tensor: torch.Tensor) -> None:
    tensor = check_writable(spec.name, tensor)
    if tensor.dtype != DTYPES[spec.dtype].torch_dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(
            f"{spec.name!r}: tensor is {tensor.dtype} {tuple(tensor.shape)}, "
            f"the header says {spec.dtype} {spec.shape}"
        )
    # a lazily negated or conjugated view keeps its raw memory: materialise it (else a no-op)
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()  # a no-op for contiguous tensors
    _write_all(handle, byte_view(tensor))


def write_safetensors(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    read_ahead: bool = False,
) -> None:
    """Write a safetensors file atomically (:func:`atomic_open`), fetching one tensor at a time.

    ``fetch(name)`` must return the tensor described by each spec; it is called in file order
    and the result is released after writing, so a producer can generate tensors on the fly.
    With ``read_ahead``, the next tensor is fetched on a second thread while one is written when
    it is at most half the size of the file's largest tensor (so at most 1.5 times the largest
    tensor is held at once); a larger one is fetched once the previous one is written.
    """
    with atomic_open(path) as handle:
        stream_safetensors(handle, specs, fetch, metadata=metadata, read_ahead=read_ahead)


def stream_safetensors(
    handle: BinaryIO,
    specs: Sequence[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    read_ahead: bool = False,
) -> None:
    """Write a whole safetensors file to an open ``handle`` (as :func:`write_safetensors`)."""
    require_little_endian()
    ordered = layout_order(specs)
    handle.write(encode_header(ordered, DEFAULT_METADATA if metadata is None else metadata))
    if not read_ahead:
        for spec in ordered:
            _write_tensor(handle, spec, fetch(spec.name))
        return
    early = max(spec.nbytes for spec in ordered) // 2 if ordered else 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bagelverify-fetch") as pool:
        upcoming: dict[int, Future[torch.Tensor]] = {}
        for index, spec in enumerate(ordered):
            pending = upcoming.pop(index, None)
            tensor = fetch(spec.name) if pending is None else pending.result()
            following = ordered[index + 1] if index + 1 < len(ordered) else None
            if following is not None and following.nbytes <= early:
                upcoming[index + 1] = pool.submit(fetch, following.name)
            _write_tensor(handle, spec, tensor)
            del tensor, pending


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a dict of tensors as one safetensors file, atomically (see :func:`write_safetensors`).

    Tensors that share memory are written as independent copies.
    """
    specs = [spec_of(name, tensor) for name, tensor in tensors.items()]
    write_safetensors(path, specs, tensors.__getitem__, metadata=metadata)
