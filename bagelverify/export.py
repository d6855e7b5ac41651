"""Exporting a NeMo Automodel training checkpoint to the released BAGEL layout.

Automodel ends a run as a step folder (``epoch_E_step_S/``): the model in ``model/`` (a DCP
checkpoint written by every rank, each ``.distcp`` file holding its rows of each tensor, or
Automodel's safetensors format: one ``shard-*.safetensors`` file per rank, the rows' offsets in
its metadata), the EMA in ``ema/`` (a DCP checkpoint written by ``save_distributed_state``,
keyed by ``named_parameters()`` names, trainable parameters only), optimizer and scheduler
state. :func:`export_checkpoint` writes what serving tools read: ``ema.safetensors`` (or shards
and ``model.safetensors.index.json``), optionally ``model.safetensors``, ``ae.safetensors`` and
the three config files.

One tensor is held at a time: its stored row blocks are read straight into one buffer by the
read engine (:mod:`bagelverify.engine`) when their bytes are plain -- a safetensors range, or
the uncompressed data record of DCP's ``torch.save`` blob, found from the blob's zip directory
and checked against its pickle without running it -- and decoded by ``torch.load``
(``weights_only``) otherwise; cast; written; released.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from .buckets import Bucket
from .checkpoint import (
    INDEX_FILE,
    MODEL_WEIGHTS_FILE,
    build_report,
    find_config,
    write_bagel_checkpoint,
)
from .checkpoint.report import header_buckets
from .checkpoint.save import parse_size, replaced_by_save
from .config import CONFIG_FILE, CONFIG_FILES, BagelConfig
from .distributed.convert import DCP_METADATA, check_data_files, dcp_tensor_specs
from .engine import EngineOptions, Transfer
from .engine import run as run_engine
from .errors import (
    ConfigError,
    CorruptCheckpointError,
    KeyCollisionError,
    LossyCastError,
    ShardSizeError,
    UnknownKeysError,
    UnsupportedTensorError,
    WeightsMismatchError,
    agree,
    counted,
    format_examples,
)
from .integrations.automodel import bagel_config_from_automodel
from .keys import strip_root
from .manifest import MODEL_FILE, VAE_FILE
from .partition import classify
from .plan import WRAPPER_PREFIXES
from .publish import publishing
from .rewrite import CastTransform, is_lossless
from .safe_pickle import load_dcp_metadata
from .safetensors_io import DTYPES, TensorSpec, layout_order, read_header, write_safetensors
from .strict_json import MAX_CONFIG_BYTES, read_json_file

logger = logging.getLogger(__name__)

ExportWeights = Literal["ema", "model", "both"]
"""Which weights files an export writes: ``ema.safetensors`` (the EMA, frozen tensors from the
model), ``model.safetensors`` (the model's own weights), or both."""
ExportDtype = Literal["bf16", "f32", "keep"]
"""The dtype floating tensors are written in: the release's BF16, F32, or as stored."""

MODEL_DIR = "model"
EMA_DIR = "ema"
AUTOMODEL_CONFIG = Path(".hf_metadata") / CONFIG_FILE
"""Where Automodel's safetensors format keeps the model's own config, under ``model/``."""
SHARDING_INFO = "DCP_SHARDING_INFO"
"""The metadata entry of Automodel's safetensors shards giving each tensor's offsets."""
RELEASE_DTYPE = "BF16"
ROUNDED = ("F32", RELEASE_DTYPE)
"""The one narrowing cast an export makes by default: F32 master weights to the release's
BF16 (the rounding ``dtype="bf16"`` asks for). Any other narrowing cast needs ``allow_lossy``."""

_DTYPES: dict[str, str | None] = {"bf16": RELEASE_DTYPE, "f32": "F32", "keep": None}
_FRAGMENTS = tuple(WRAPPER_PREFIXES)
_ENGINE = EngineOptions(prefetch=False)

# -- where each tensor's bytes are --------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One stored block of a tensor: its place in the tensor and where its bytes are."""

    path: Path
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    start: int
    """File offset of the raw bytes (``plain``) or of DCP's ``torch.save`` blob."""
    nbytes: int
    """Byte count of the raw bytes (``plain``) or of the blob."""
    plain: bool

    @property
    def numel(self) -> int:
        """Elements in the block."""
        return math.prod(self.lengths)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a training checkpoint: its stored name, HF key, dtype, shape and blocks."""

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor in its stored dtype."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class StoredWeights:
    """One set of weights of a step folder (``model/`` or ``ema/``), by HF key."""

    folder: Path
    layout: Literal["dcp", "safetensors"]
    files: int
    tensors: dict[str, StoredTensor]
    dropped: int = 0
    """Transformer-Engine ``._extra_state`` entries left out."""

    @property
    def label(self) -> str:
        """``model/ (DCP, 2 files)``: the folder and its layout, for reports."""
        kind = "DCP" if self.layout == "dcp" else "Automodel safetensors"
        return f"{self.folder.name}/ ({kind}, {counted(self.files, 'file')})"


_END_BYTES = 4096
"""Bytes read at each end of a ``torch.save`` blob: its zip records are there."""
_EOCD = struct.Struct("<4s4H2LH")
_CENTRAL = struct.Struct("<4s6H3L5HLL")
_LOCAL_SIZE = 30


class _Blob(io.RawIOBase):
    """The byte range ``[start, start + size)`` of an open file (a ``torch.save`` blob inside a
    DCP file) as a seekable file, its two ends read once."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self.fd, self.begin, self.size, self.at = fd, start, size, 0
        self.head = os.pread(fd, min(size, _END_BYTES), start)
        self.tail_start = size - min(size, _END_BYTES)
        self.tail = os.pread(fd, size - self.tail_start, start + self.tail_start)

    def bytes_at(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` of the blob (fewer at its end)."""
        count = max(0, min(count, self.size - offset))
        if offset + count <= len(self.head):
            return self.head[offset : offset + count]
        if offset >= self.tail_start:
            return self.tail[offset - self.tail_start : offset - self.tail_start + count]
        return os.pread(self.fd, count, self.begin + offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.at, 2: self.size}[whence]
        self.at = max(0, base + offset)
        return self.at

    def tell(self) -> int:
        return self.at

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.bytes_at(self.at, len(view))
        view[: len(data)] = data
        self.at += len(data)
        return len(data)

    def entries(self) -> dict[str, tuple[int, int, int, int]]:
        """Member name -> (compression method, stored size, size, local header offset), from
        the central directory (parsed here; by :mod:`zipfile` when it uses zip64 fields)."""
        at = self.tail.rfind(b"PK\x05\x06")
        if at >= 0 and at + _EOCD.size <= len(self.tail):
            _, _, _, _, count, size, offset, _ = _EOCD.unpack_from(self.tail, at)
            if count != 0xFFFF and 0xFFFFFFFF not in (size, offset):
                directory, found, position = self.bytes_at(offset, size), {}, 0
                for _ in range(count):
                    if position + _CENTRAL.size > len(directory):
                        break
                    fields = _CENTRAL.unpack_from(directory, position)
                    if fields[0] != b"PK\x01\x02":
                        break
                    method, stored, full, name_length, extra, comment = (
                        fields[4],
                        *fields[8:10],
                        *fields[10:13],
                    )
                    local = fields[16]
                    name = directory[position + 46 : position + 46 + name_length]
                    found[name.decode("utf-8", "replace")] = (method, stored, full, local)
                    position += 46 + name_length + extra + comment
                if len(found) == count and 0xFFFFFFFF not in {
                    v for entry in found.values() for v in entry
                }:
                    return found
        try:
            with zipfile.ZipFile(self) as archive:
                return {
                    i.filename: (i.compress_type, i.compress_size, i.file_size, i.header_offset)
                    for i in archive.infolist()
                }
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise _NotPlain(str(error)) from None

    def member(self, entry: tuple[int, int, int, int]) -> tuple[int, int]:
        """Blob offset and size of a stored (uncompressed) member's bytes."""
        method, stored, full, local = entry
        header = self.bytes_at(local, _LOCAL_SIZE)
        if method != zipfile.ZIP_STORED or stored != full or len(header) != _LOCAL_SIZE:
            raise _NotPlain("compressed member")
        if header[:4] != b"PK\x03\x04":
            raise _NotPlain("local header")
        name_length, extra_length = struct.unpack_from("<HH", header, 26)
        begin = local + _LOCAL_SIZE + name_length + extra_length
        if begin + full > self.size:
            raise _NotPlain("member beyond the blob")
        return begin, full


class _NotPlain(Exception):
    """The blob is not a plain, contiguous ``torch.save`` of one tensor."""


_STORAGES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
"""The storage classes ``torch.save`` names in a pickle, and their dtypes."""


def _rebuilt(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    return ("tensor", storage, offset, tuple(size), tuple(stride))


class _BlobUnpickler(pickle.Unpickler):
    """Reads the tensor record of a ``torch.save`` pickle without building anything: only
    ``_rebuild_tensor_v2``, an empty ``OrderedDict`` and storage class names resolve."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuilt
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain("storage record")
        return pid[1], str(pid[2]), pid[4]


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _plain_range(
    fd: int, start: int, length: int, dtype: torch.dtype, lengths: tuple[int, ...]
) -> tuple[int, int]:
    """File offset and byte count of the raw data of a ``torch.save`` blob that holds one
    contiguous ``dtype`` tensor of shape ``lengths`` (storage of exactly its size, offset 0,
    stored uncompressed, little-endian); :class:`_NotPlain` otherwise."""
    blob = _Blob(fd, start, length)
    names = blob.entries()
    pickled = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickled) != 1:
        raise _NotPlain("no data.pkl")
    prefix = pickled[0][: -len("data.pkl")]
    if prefix + "byteorder" in names:
        begin, size = blob.member(names[prefix + "byteorder"])
        if blob.bytes_at(begin, size) != b"little":
            raise _NotPlain("byte order")
    begin, size = blob.member(names[pickled[0]])
    try:
        record = _BlobUnpickler(io.BytesIO(blob.bytes_at(begin, size))).load()
    except _NotPlain:
        raise
    except Exception as error:  # a malformed pickle: the decoder reports it
        raise _NotPlain(type(error).__name__) from None
    if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "tensor"):
        raise _NotPlain("not one tensor")
    _, (storage_dtype, key, numel), offset, shape, stride = record
    count = math.prod(lengths)
    data = names.get(f"{prefix}data/{key}")
    if (
        storage_dtype != dtype
        or offset != 0
        or shape != lengths
        or (stride != _contiguous_strides(lengths) and count > 1)
        or numel != count
        or data is None
    ):
        raise _NotPlain("layout")
    begin, size = blob.member(data)
    if size != count * dtype.itemsize:
        raise _NotPlain("data size")
    return start + begin, size


def _check_tiling(name: str, folder: Path, shape: tuple[int, ...], pieces: list[Piece]) -> None:
    """Raise :class:`CorruptCheckpointError` unless the pieces tile ``shape`` exactly: inside
    it, not overlapping, and holding all of its elements."""
    fault = None
    for piece in pieces:
        if len(piece.offsets) != len(shape) or any(
            o < 0 or o + n > s for o, n, s in zip(piece.offsets, piece.lengths, shape, strict=True)
        ):
            fault = f"a block at {list(piece.offsets)} of {list(piece.lengths)} lies outside it"
    full = [p for p in pieces if p.numel]
    if fault is None and all(p.lengths[1:] == shape[1:] for p in full):  # row blocks (FSDP2)
        full.sort(key=lambda p: p.offsets[0])
        for a, b in itertools.pairwise(full):
            if b.offsets[0] < a.offsets[0] + a.lengths[0]:
                fault = f"blocks at {list(a.offsets)} and {list(b.offsets)} overlap"
    elif fault is None:
        for i, a in enumerate(full):
            for b in full[i + 1 :]:
                if all(
                    oa < ob + nb and ob < oa + na
                    for oa, na, ob, nb in zip(
                        a.offsets, a.lengths, b.offsets, b.lengths, strict=True
                    )
                ):
                    fault = f"blocks at {list(a.offsets)} and {list(b.offsets)} overlap"
    if fault is None and sum(p.numel for p in pieces) != math.prod(shape):
        fault = f"its blocks hold {sum(p.numel for p in pieces):,} of its elements"
    if fault is not None:
        raise CorruptCheckpointError(
            f"{folder}: {name!r} of shape {list(shape)} is not stored whole: {fault} "
            f"({math.prod(shape):,} elements). A rank's file is missing or the save was cut "
            "short; export another step folder."
        )


def _close_all(fds: dict[Path, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


def _open(path: Path, fds: dict[Path, int]) -> int:
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    return fds[path]


def _read_dcp(folder: Path, fds: dict[Path, int]) -> tuple[dict[str, Any], int]:
    """Stored name -> (dtype, shape, pieces) of a DCP checkpoint, and its data file count."""
    metadata = load_dcp_metadata(folder / DCP_METADATA)
    specs = dcp_tensor_specs(metadata, str(folder))
    check_data_files(metadata, folder)
    pieces: dict[str, list[Piece]] = {name: [] for name in specs}
    sizes = {
        (name, tuple(chunk.offsets)): tuple(chunk.sizes)
        for name in specs
        for chunk in getattr(metadata.state_dict_metadata[name], "chunks", ())
    }
    files = set()
    for index, info in metadata.storage_data.items():
        spec = specs[index.fqn]
        offsets = tuple(index.offset or (0,) * len(spec.shape))
        lengths = sizes.get((index.fqn, offsets))
        if lengths is None:
            raise CorruptCheckpointError(
                f"{folder / DCP_METADATA}: {index.fqn!r} has stored data at {list(offsets)} but "
                "no chunk there. Re-save the checkpoint."
            )
        path = folder / info.relative_path
        files.add(path)
        dtype = DTYPES[spec.dtype].torch_dtype
        transforms = getattr(info, "transform_descriptors", None)
        if transforms:
            raise UnsupportedTensorError(
                f"{path}: {index.fqn!r} is stored through DCP storage transforms ({transforms}); "
                "export reads DCP files written without them (Automodel's default). Load and "
                "re-save the step folder without the transform."
            )
        start, nbytes, plain = info.offset, info.length, True
        try:
            start, nbytes = _plain_range(_open(path, fds), start, nbytes, dtype, lengths)
        except _NotPlain as why:
            logger.debug(
                "%s: %r at %s is decoded by torch.load (%s)", path, index.fqn, offsets, why
            )
            plain = False
        pieces[index.fqn].append(Piece(path, offsets, lengths, start, nbytes, plain))
    out = {}
    for name, spec in specs.items():
        _check_tiling(name, folder, spec.shape, pieces[name])
        out[name] = (spec.dtype, spec.shape, tuple(pieces[name]))
    return out, len(files)


def _read_shards(folder: Path, fds: dict[Path, int]) -> tuple[dict[str, Any], int]:
    """Stored name -> (dtype, shape, pieces) of Automodel's safetensors format: one file per
    rank, each tensor's row offsets in the ``DCP_SHARDING_INFO`` metadata entry."""
    paths = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    found: dict[str, list[tuple[str, Piece]]] = {}
    for path in paths:
        header = read_header(path, fd=_open(path, fds))
        text = header.metadata.get(SHARDING_INFO)
        try:
            where = json.loads(text) if text is not None else {}
        except ValueError:
            where = None
        if not isinstance(where, dict):
            raise CorruptCheckpointError(
                f"{path}: the {SHARDING_INFO} metadata entry is not a JSON object; re-save the "
                "checkpoint"
            )
        for name, info in header.tensors.items():
            entry = where.get(name) or {}
            offsets = entry.get("saved_offsets") if isinstance(entry, dict) else repr(entry)
            offsets = [0] * len(info.shape) if offsets is None else offsets
            if not (
                isinstance(offsets, list)
                and len(offsets) == len(info.shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            ):
                raise CorruptCheckpointError(
                    f"{path}: {SHARDING_INFO} gives {name!r} the offsets {offsets!r}, which do "
                    f"not fit its shape {list(info.shape)}; re-save the checkpoint"
                )
            piece = Piece(path, tuple(offsets), info.shape, info.start, info.nbytes, True)
            found.setdefault(name, []).append((info.dtype, piece))
    out = {}
    for name, entries in found.items():
        dtypes = {dtype for dtype, _ in entries}
        pieces = [piece for _, piece in entries]
        if len(dtypes) > 1:
            raise CorruptCheckpointError(
                f"{folder}: {name!r} is stored as {sorted(dtypes)} by different ranks' files"
            )
        shape = tuple(
            max(p.offsets[d] + p.lengths[d] for p in pieces) for d in range(len(pieces[0].lengths))
        )
        _check_tiling(name, folder, shape, pieces)
        out[name] = (dtypes.pop(), shape, tuple(pieces))
    return out, len(paths)


def normalised_key(name: str) -> str:
    """The HF key of a stored name: wrapper fragments (``_orig_mod.``,
    ``_checkpoint_wrapped_module.``, ``module.`` ...) removed wherever they are, then one
    leading ``model.`` root."""
    parts = [part for part in name.split(".") if part + "." not in _FRAGMENTS]
    return strip_root(".".join(parts))


def read_weights(folder: str | os.PathLike[str], fds: dict[Path, int]) -> StoredWeights:
    """The tensors of a step folder's ``model/`` or ``ema/`` (DCP or Automodel's safetensors
    format), by HF key, from their metadata alone.

    Every name must normalise (:func:`normalised_key`) to a key of the family table:
    :class:`~bagelverify.errors.UnknownKeysError` names those that do not (VAE keys included),
    :class:`~bagelverify.errors.KeyCollisionError` two names of one key. Transformer-Engine
    ``._extra_state`` entries are left out.
    """
    folder = Path(folder)
    if (folder / DCP_METADATA).is_file():
        layout: Literal["dcp", "safetensors"] = "dcp"
        stored, files = _read_dcp(folder, fds)
    elif folder.is_dir() and any(folder.glob("*.safetensors")):
        layout = "safetensors"
        stored, files = _read_shards(folder, fds)
    else:
        raise FileNotFoundError(
            f"{folder}: neither a DCP checkpoint ({DCP_METADATA}) nor Automodel's safetensors "
            "shards; is the step folder complete?"
        )
    tensors: dict[str, StoredTensor] = {}
    unknown, clashes, dropped = [], [], 0
    for name, (dtype, shape, pieces) in stored.items():
        key = normalised_key(name)
        bucket = classify(key)
        if bucket is Bucket.EXTRA:
            dropped += 1
        elif bucket not in (Bucket.UND, Bucket.GEN):
            unknown.append(name if key == name else f"{name} (as {key})")
        elif key in tensors:
            clashes.append((tensors[key].name, name))
        else:
            tensors[key] = StoredTensor(name, key, dtype, shape, pieces)
    if unknown:
        raise UnknownKeysError(
            f"{folder}: {counted(len(unknown), 'tensor')} {agree(len(unknown), 'matches', 'match')}"
            f" no BAGEL key family once wrapper fragments and the 'model.' root are removed: "
            f"{format_examples(unknown)}. Nothing was written; export a BAGEL model's step folder "
            "(VAE weights belong in ae.safetensors, not in the model).",
            unknown,
        )
    if clashes:
        raise KeyCollisionError(
            f"{folder}: {counted(len(clashes), 'pair')} of tensors name the same BAGEL key: "
            f"{format_examples(clashes)}. Nothing was written.",
            clashes,
        )
    return StoredWeights(folder, layout, files, tensors, dropped)


def assemble(
    tensors: Sequence[StoredTensor],
    fds: dict[Path, int],
    into: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The whole tensors, in their stored dtypes, from their blocks: every row block with plain
    bytes read in place by one run of the read engine, any other block decoded and copied into
    its place. ``into``: the tensors to fill (new ones by default)."""
    outs, transfers = [], []
    for i, tensor in enumerate(tensors):
        dtype = DTYPES[tensor.dtype].torch_dtype
        out = torch.empty(tensor.shape, dtype=dtype) if into is None else into[i]
        outs.append(out)
        for piece in tensor.pieces:
            if piece.plain and piece.lengths[1:] == tensor.shape[1:]:
                target = out.narrow(0, piece.offsets[0], piece.lengths[0]) if out.dim() else out
                transfers.append(
                    Transfer(
                        tensor.name,
                        piece.path,
                        piece.start,
                        piece.nbytes,
                        dtype,
                        piece.lengths,
                        target,
                    )
                )
                continue
            place = tuple(
                slice(o, o + n) for o, n in zip(piece.offsets, piece.lengths, strict=True)
            )
            out[place] = _decode(tensor, piece, fds)
    for path in {t.path for t in transfers}:
        _open(path, fds)
    run_engine(transfers, options=_ENGINE, fds=fds)
    return outs


@contextlib.contextmanager
def _one_cast_thread() -> Iterator[None]:
    """Run torch's element-wise work (the dtype casts) on one thread while the export writes,
    restoring the caller's setting after: a cast is bound by memory bandwidth, and on a busy
    host a pool of spinning OpenMP threads made it several times slower (measured: 6.6 GB/s on
    one thread, 4.8 on two, far less under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


class _Arena:
    """One reusable byte buffer that tensors are laid out in: allocated (and its pages faulted
    in) once, not once per tensor -- on a virtual machine fresh pages cost more than the copy."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)

    def views(self, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Tensors of these dtypes and shapes, one after another in the buffer (grown when too
        small); they are valid until the next call."""
        sizes = [_aligned(math.prod(shape) * dtype.itemsize) for dtype, shape in specs]
        if sum(sizes) > self.buffer.numel():
            self.buffer = torch.empty(0, dtype=torch.uint8)  # release before allocating
            self.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        out, at = [], 0
        for (dtype, shape), size in zip(specs, sizes, strict=True):
            count = math.prod(shape) * dtype.itemsize
            out.append(self.buffer[at : at + count].view(dtype).view(shape))
            at += size
        return out


class _Prefetch:
    """Tensors assembled ahead in the order the writer asks for them, several per engine run
    while their stored bytes stay within the largest tensor's: few thread start-ups for many
    small tensors, memory still about the largest tensor, laid out in one reused buffer."""

    def __init__(
        self, order: Sequence[str], chosen: Mapping[str, StoredTensor], fds: dict[Path, int]
    ) -> None:
        self.order = list(order)
        self.position = {key: i for i, key in enumerate(self.order)}
        self.chosen, self.fds = chosen, fds
        self.budget = max((_aligned(t.nbytes) for t in chosen.values()), default=0)
        self.ready: dict[str, torch.Tensor] = {}
        self.arena = _Arena(self.budget)

    def get(self, key: str) -> torch.Tensor:
        """``key``'s tensor, assembled now (with the next ones) unless it already was; valid
        until the next call that assembles."""
        if key not in self.ready:
            batch: list[str] = []
            total = 0
            for next_key in self.order[self.position[key] :]:
                size = _aligned(self.chosen[next_key].nbytes)
                if batch and total + size > self.budget:
                    break
                batch.append(next_key)
                total += size
            stored = [self.chosen[k] for k in batch]
            # the buffer is reused only once every tensor of the last batch was taken
            into = None
            if not self.ready:
                into = self.arena.views([(DTYPES[t.dtype].torch_dtype, t.shape) for t in stored])
            self.ready.update(zip(batch, assemble(stored, self.fds, into), strict=True))
        return self.ready.pop(key)


def _decode(tensor: StoredTensor, piece: Piece, fds: dict[Path, int]) -> torch.Tensor:
    dtype = DTYPES[tensor.dtype].torch_dtype
    fd = _open(piece.path, fds)
    if piece.plain:  # a plain block that is not a row block: read it whole, then place it
        block = torch.empty(piece.lengths, dtype=dtype)
        run_engine(
            [
                Transfer(
                    tensor.name, piece.path, piece.start, piece.nbytes, dtype, piece.lengths, block
                )
            ],
            options=_ENGINE,
            fds=fds,
        )
        return block
    blob = os.pread(fd, piece.nbytes, piece.start)
    try:
        block = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CorruptCheckpointError(
            f"{piece.path}: the block of {tensor.name!r} at {list(piece.offsets)} does not "
            f"deserialise ({type(error).__name__}: {error}); the file is damaged, copy or save "
            "the checkpoint again"
        ) from None
    if (
        not isinstance(block, torch.Tensor)
        or tuple(block.shape) != piece.lengths
        or block.dtype != dtype
    ):
        raise CorruptCheckpointError(
            f"{piece.path}: the block of {tensor.name!r} at {list(piece.offsets)} is not a "
            f"{dtype} tensor of shape {list(piece.lengths)}; re-save the checkpoint"
        )
    return block


# -- the step folder's config -------------------------------------------------------------------


def _automodel_config(path: Path) -> BagelConfig:
    """The BagelConfig of the ``config.json`` Automodel writes beside its safetensors format
    (its ``BagelConfig`` serialised after the vision tower was cut to the layers BAGEL uses)."""
    document = read_json_file(path, MAX_CONFIG_BYTES, lambda what: ConfigError(f"{path}: {what}"))
    try:
        assert isinstance(document, dict)
        config = SimpleNamespace(**document)
        config.text_config = SimpleNamespace(**document["text_config"])
        config.vision_config = SimpleNamespace(**document["vision_config"])
        config._bagel_vit_select_layer_applied = True
        return bagel_config_from_automodel(config)
    except (AssertionError, AttributeError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path}: not an Automodel BagelConfig ({type(error).__name__}: {error}); pass the "
            "run's BAGEL config folder as config= (--config DIR)"
        ) from None


def step_config(step: Path, given: object = None) -> tuple[BagelConfig, str]:
    """The config of a step folder and where it came from: ``given`` (a BagelConfig or a folder
    of BAGEL config files), else BAGEL config files in the step folder, else the config Automodel
    wrote under ``model/.hf_metadata``. :class:`~bagelverify.errors.ConfigError` when none."""
    if given is not None:
        found = find_config(step, given)
        assert found is not None
        return found, "given" if isinstance(given, BagelConfig) else str(given)
    if any((step / name).is_file() for name in CONFIG_FILES):
        return BagelConfig.from_pretrained(step), str(step)
    automodel = step / MODEL_DIR / AUTOMODEL_CONFIG
    if automodel.is_file():
        return _automodel_config(automodel), str(automodel)
    raise ConfigError(
        f"{step}: no config found (no {', '.join(CONFIG_FILES)} in the step folder, no "
        f"{MODEL_DIR}/{AUTOMODEL_CONFIG}, which Automodel writes with model_save_format "
        "safetensors only); pass the run's BAGEL config folder or a BagelConfig as config= "
        "(--config DIR)"
    )


# -- the export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFile:
    """One weights file an export writes and where its tensors come from."""

    name: str
    tensors: int
    bytes_before: int
    bytes_after: int
    sources: dict[str, int]
    """Source folder label -> tensors taken from it."""


@dataclass
class ExportReport:
    """What :func:`export_checkpoint` wrote (or, with ``dry_run``, would write)."""

    step_dir: str
    out: str
    weights: ExportWeights
    dtype: str
    """The written dtype of floating tensors (``"BF16"``, ``"F32"``) or ``"keep"``."""
    stage: str
    model: str
    ema: str | None
    config: str
    vae: str | None
    dry_run: bool
    from_model: dict[str, int] = field(default_factory=dict)
    """Bucket -> tensors of ``ema.safetensors`` the EMA does not hold, taken from the model."""
    rounded: int = 0
    """Tensors cast to a narrower dtype (F32 -> BF16)."""
    files: list[ExportFile] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def other_files(self) -> list[str]:
        """The files written besides the weights: the config files, the VAE if any."""
        return [*CONFIG_FILES, *([VAE_FILE] if self.vae is not None else [])]

    @property
    def bytes_before(self) -> int:
        """Tensor bytes of the written weights files, as stored in the step folder."""
        return sum(f.bytes_before for f in self.files)

    @property
    def bytes_after(self) -> int:
        """Tensor bytes of the written weights files."""
        return sum(f.bytes_after for f in self.files)

    def notes(self) -> list[str]:
        """One line per fact a user should see: frozen tensors taken from the model, a run
        without EMA, the rounding, a missing VAE."""
        lines = []
        if self.weights != "model" and self.ema is None:
            lines.append(f"no EMA in this step folder: {MODEL_FILE} holds the model weights")
        for bucket, count in self.from_model.items():
            lines.append(
                f"{count} {bucket.upper()} {agree(count, 'tensor', 'tensors')} from the model "
                "weights: not trainable in this run"
            )
        if self.rounded:
            lines.append(f"{counted(self.rounded, 'tensor')} rounded from F32 to {self.dtype}")
        if self.vae is None:
            lines.append(f"no {VAE_FILE}: none in the step folder and none given (vae=, --vae)")
        return lines

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "step_dir": self.step_dir,
            "out": self.out,
            "dry_run": self.dry_run,
            "weights": self.weights,
            "dtype": self.dtype,
            "stage": self.stage,
            "model": self.model,
            "ema": self.ema,
            "config": self.config,
            "vae": self.vae,
            "from_model": dict(self.from_model),
            "rounded": self.rounded,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "files": [dataclasses.asdict(f) for f in self.files],
            "other_files": self.other_files,
            "notes": self.notes(),
            "written": [str(p) for p in self.written],
        }


def _check_agreement(model: StoredWeights, ema: StoredWeights) -> None:
    """Refuse an EMA with a tensor the model lacks or of another shape, naming them all."""
    extra = [t.name for key, t in ema.tensors.items() if key not in model.tensors]
    wrong = [
        f"{key}: {model.folder.name}/ {list(model.tensors[key].shape)}, "
        f"{ema.folder.name}/ {list(t.shape)}"
        for key, t in ema.tensors.items()
        if key in model.tensors and model.tensors[key].shape != t.shape
    ]
    if extra or wrong:
        parts = []
        if extra:
            parts.append(
                f"{counted(len(extra), 'EMA tensor')} the model lacks ({format_examples(extra)})"
            )
        if wrong:
            parts.append(
                f"{counted(len(wrong), 'tensor')} of another shape ({format_examples(wrong)})"
            )
        raise WeightsMismatchError(
            f"{ema.folder.parent}: the model ({model.label}) and the EMA ({ema.label}) disagree: "
            + "; ".join(parts)
            + ". They are not of one run; nothing was written. Export a step folder written by "
            "one save, or pass weights='model' (--weights model) to leave the EMA out.",
            [*extra, *(line.split(":")[0] for line in wrong)],
        )


def _target_dtype(dtype: object) -> str | None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[str(dtype)]


def export_checkpoint(
    step_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    weights: ExportWeights = "ema",
    dtype: ExportDtype = "bf16",
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    config: BagelConfig | str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    allow_lossy: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Export an Automodel step folder (``epoch_E_step_S/``) to the released BAGEL layout.

    Args:
        step_dir: the step folder: ``model/`` (DCP from any number of ranks, or Automodel's
            safetensors format) and, when the run kept one, ``ema/`` (DCP).
        out: the folder to write: ``ema.safetensors`` (``weights="ema"``, the default: the EMA
            where it holds a tensor, the model's weights for the frozen tensors it does not
            hold, and the model's weights alone when there is no ``ema/``), ``model.safetensors``
            (``"model"``), or both (``"both"``); ``ae.safetensors`` (``vae`` or the step
            folder's); the three config files.
        weights: see ``out``.
        dtype: ``"bf16"`` (the release's: F32 master weights are rounded to BF16), ``"f32"`` or
            ``"keep"``. Another narrowing cast (an F64 or F16 tensor to BF16) raises
            :class:`~bagelverify.errors.LossyCastError` unless ``allow_lossy``.
        max_shard_size: write ``model-0000i-of-0000n.safetensors`` shards of at most this size
            and ``model.safetensors.index.json`` instead of one file (with ``weights`` ``"ema"``
            or ``"model"``).
        dry_run: check everything and return the plan; write nothing.
        config: a :class:`~bagelverify.BagelConfig` or a folder of BAGEL config files; default:
            the step folder's (:func:`step_config`).
        overwrite: replace an export already in ``out``; its other files always stay.

    Returns:
        An :class:`ExportReport`: the files, their sources, sizes before and after, notes.

    Every name is normalised through the family table (:func:`read_weights`); an EMA whose keys
    or shapes disagree with the model raises :class:`~bagelverify.errors.WeightsMismatchError`;
    the tensors are checked against the config's shapes like a save. All before anything is
    written. One tensor is in memory at a time, and the files are published together
    (:func:`bagelverify.publish.publishing`).

    Example:
        >>> report = export_checkpoint("ckpt/epoch_0_step_1000", "export")  # doctest: +SKIP
        >>> report.notes()  # doctest: +SKIP
        ['821 UND tensors from the model weights: not trainable in this run', ...]
    """
    if weights not in ("ema", "model", "both"):
        raise ValueError(f"weights must be 'ema', 'model' or 'both', got {weights!r}")
    target = _target_dtype(dtype)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    if limit is not None and weights == "both":
        raise ShardSizeError(
            "max_shard_size with weights='both': the released layout has one shard index; "
            "export the EMA and the model weights to two folders"
        )
    step, destination = Path(step_dir), Path(out)
    with contextlib.ExitStack() as stack:
        fds: dict[Path, int] = {}
        stack.callback(_close_all, fds)
        model = read_weights(step / MODEL_DIR, fds)
        ema = read_weights(step / EMA_DIR, fds) if (step / EMA_DIR).exists() else None
        if ema is not None:
            _check_agreement(model, ema)
        found, config_source = step_config(step, config)
        stage: Literal["stage1", "stage2"] = (
            "stage2" if any(classify(k) is Bucket.GEN for k in model.tensors) else "stage1"
        )
        vae_path = Path(vae) if vae is not None else step / VAE_FILE
        if vae is not None or vae_path.is_file():
            _check_vae(vae_path)
        report = ExportReport(
            str(step),
            str(destination),
            weights,
            target or "keep",
            stage,
            model.label,
            None if ema is None else ema.label,
            config_source,
            str(vae_path) if vae_path.is_file() else None,
            dry_run,
        )
        plans: list[tuple[str, dict[str, StoredTensor], dict[str, TensorSpec]]] = []
        if weights in ("ema", "both"):
            chosen = {
                key: ema.tensors[key] if ema is not None and key in ema.tensors else tensor
                for key, tensor in model.tensors.items()
            }
            if ema is not None:
                counts = Counter(classify(k).value for k in model.tensors if k not in ema.tensors)
                report.from_model = {b.value: counts[b.value] for b in Bucket if counts[b.value]}
            plans.append((INDEX_FILE if limit else MODEL_FILE, chosen, {}))
        if weights in ("model", "both"):
            plans.append((INDEX_FILE if limit else MODEL_WEIGHTS_FILE, dict(model.tensors), {}))
        cast = CastTransform(target) if target is not None else None
        narrowed: set[str] = set()
        for name, chosen, specs in plans:
            sources: Counter[str] = Counter()
            for key, tensor in chosen.items():
                spec = TensorSpec(key, tensor.dtype, tensor.shape)
                if cast is not None:
                    spec = cast.spec(spec)
                if not is_lossless(tensor.dtype, spec.dtype):
                    if (tensor.dtype, spec.dtype) != ROUNDED and not allow_lossy:
                        raise LossyCastError(
                            f"{step}: casting {tensor.name!r} from {tensor.dtype} to {spec.dtype} "
                            "loses precision or range beyond rounding F32 to BF16; nothing was "
                            "written. Pass dtype='keep' (--dtype keep), or allow_lossy=True "
                            "(--allow-lossy) to cast anyway."
                        )
                    narrowed.add(key)
                specs[key] = spec
                sources[_folder_label(tensor, ema)] += 1
            build_report(specs, stage=stage, config=found, source=str(step)).raise_for_problems(
                strict=True, verb="save"
            )
            report.files.append(
                ExportFile(
                    name,
                    len(specs),
                    sum(t.nbytes for t in chosen.values()),
                    sum(s.nbytes for s in specs.values()),
                    dict(sources),
                )
            )
        report.rounded = len(narrowed)
        for line in report.notes():
            logger.info("%s: %s", step, line)
        if dry_run:
            return report

        def fetch_from(
            chosen: Mapping[str, StoredTensor], specs: Mapping[str, TensorSpec]
        ) -> Callable[[str], torch.Tensor]:
            # the order the writers ask for tensors: layout order, shard after shard
            prefetch = _Prefetch([s.name for s in layout_order(specs.values())], chosen, fds)
            # the cast tensors: the writer writes each before it asks for the next
            arena = _Arena(max((_aligned(spec.nbytes) for spec in specs.values()), default=0))

            def fetch(key: str) -> torch.Tensor:
                tensor = prefetch.get(key)
                wanted = DTYPES[specs[key].dtype].torch_dtype
                if tensor.dtype == wanted:
                    return tensor
                (out,) = arena.views([(wanted, tuple(tensor.shape))])
                return out.copy_(tensor)  # rounds to nearest even, as Tensor.to does

            return fetch

        written: list[Path] = []
        stack.enter_context(_one_cast_thread())
        with publishing(
            destination,
            replaces=_replaced(destination, vae=report.vae is not None),
            guard=_guard(destination, vae=report.vae is not None, overwrite=overwrite),
            reads=[step, vae, config if isinstance(config, (str, os.PathLike)) else None],
            last=(INDEX_FILE,),
        ) as staging:
            for name, chosen, specs in plans:
                if name == MODEL_WEIGHTS_FILE:
                    write_safetensors(
                        staging / name, list(specs.values()), fetch_from(chosen, specs)
                    )
                    written.append(destination / name)
                    continue
                files = write_bagel_checkpoint(
                    specs,
                    fetch_from(chosen, specs),
                    staging,
                    stage=stage,
                    max_shard_size=limit,
                    config=found,
                )
                written.extend(destination / p.name for p in files)
            if not any(p.name == CONFIG_FILE for p in written):
                found.save_pretrained(staging)
                written.extend(destination / n for n in CONFIG_FILES)
            if report.vae is not None:
                shutil.copyfile(vae_path, staging / VAE_FILE)
                written.append(destination / VAE_FILE)
        report.written = written
    logger.info("%s: exported %d files to %s", step, len(written), destination)
    return report


def _folder_label(tensor: StoredTensor, ema: StoredWeights | None) -> str:
    if ema is not None and ema.tensors.get(tensor.key) is tensor:
        return f"{EMA_DIR}/"
    return f"{MODEL_DIR}/"


def _check_vae(path: Path) -> None:
    counts = header_buckets(path)
    if counts is None:
        raise FileNotFoundError(f"{path}: no readable VAE file ({VAE_FILE}) there")
    other = sum(n for bucket, n in counts.items() if bucket is not Bucket.VAE)
    if other or not counts:
        raise CorruptCheckpointError(
            f"{path}: holds {other} tensors that are not VAE tensors (encoder.*/decoder.*); "
            f"pass BAGEL's {VAE_FILE} as the VAE"
        )


def _replaced(directory: Path, *, vae: bool) -> Callable[[str], bool]:
    """The files an export replaces: every weights file of the released layout (single files,
    shards and index), so none of an earlier export is left beside the new one; the config
    files; the VAE when one is written."""
    shards = replaced_by_save(directory, sharded=True, config=True)
    weights = {MODEL_FILE, MODEL_WEIGHTS_FILE} | ({VAE_FILE} if vae else set())
    return lambda name: name in weights or shards(name)


def _guard(directory: Path, *, vae: bool, overwrite: bool) -> Callable[[list[str]], None]:
    """Refuse a folder that holds weights (or the VAE an export would replace) unless
    ``overwrite``."""

    def guard(entries: list[str]) -> None:
        held = [
            name
            for name in entries
            if name in (MODEL_FILE, MODEL_WEIGHTS_FILE, INDEX_FILE) or (vae and name == VAE_FILE)
        ]
        if held and not overwrite:
            raise FileExistsError(
                f"{directory} already holds a checkpoint ({held[0]}); pass overwrite=True "
                "(--overwrite) to replace it, or export to another folder"
            )

    return guard


__all__ = [
    "ExportDtype",
    "ExportFile",
    "ExportReport",
    "ExportWeights",
    "Piece",
    "StoredTensor",
    "StoredWeights",
    "assemble",
    "export_checkpoint",
    "normalised_key",
    "read_weights",
    "step_config",
]
