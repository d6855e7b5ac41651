"""Sharded loading and DCP conversion through ``torch.distributed.checkpoint`` (DCP).

:func:`load_bagel_checkpoint_distributed` fills a model's (possibly ``DTensor``-sharded) state dict
in place from an HF-layout BAGEL folder. Validation is the single-process loader's own code
(:mod:`bagelverify.checkpoint`), run from the safetensors headers on every rank; the ranks then
agree on the verdict in one small collective, so a bad checkpoint raises the same error on every
rank and none is left waiting in DCP. DCP then plans, per rank, the pieces of each stored tensor
that overlap the rank's local shards, and :class:`BagelHFStorageReader` (DCP's
:class:`~torch.distributed.checkpoint.HuggingFaceStorageReader`, fed the validated headers) reads
each piece's byte range into the shard, so a rank reads the bytes of its own shards only.

:func:`hf_to_dcp` and :func:`dcp_to_hf` convert between an HF-layout folder and a DCP checkpoint
in native (``model.``-rooted) layout, the form sharded training saves and resumes from.

Importing this module imports ``torch.distributed`` but never initialises a process group.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.futures import Future

from .adapter import BagelStateDictAdapter, strip_root, to_native_key
from .checkpoint import (
    Cast,
    _fill,
    _open_report,
    _target_shape,
    check_destinations,
    find_config,
    write_bagel_checkpoint,
)
from .config import CONFIG_FILES
from .engine import EngineOptions, Transfer
from .engine import run as run_engine
from .errors import BagelError, CorruptCheckpointError, DistributedMismatchError, format_examples
from .safetensors_io import (
    DTYPES,
    TensorInfo,
    TensorSpec,
    dtype_name,
)

try:  # the Hugging Face reader and its per-entry record arrived in torch 2.8
    from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
except ImportError as error:  # pragma: no cover - depends on the installed torch
    raise ImportError(
        f"bagelverify.distributed needs torch.distributed.checkpoint.HuggingFaceStorageReader "
        f"(torch >= 2.8); this is torch {torch.__version__}"
    ) from error

logger = logging.getLogger(__name__)

_NO_PREFETCH = EngineOptions(prefetch=False)

__all__ = [
    "BagelHFStorageReader",
    "DistributedLoadResult",
    "dcp_to_hf",
    "hf_to_dcp",
    "load_bagel_checkpoint_distributed",
]


class DistributedLoadResult(NamedTuple):
    """What :func:`load_bagel_checkpoint_distributed` did on this rank."""

    missing_keys: list[str]
    """Destination keys the checkpoint does not provide (left untouched; only without strict)."""
    unexpected_keys: list[str]
    """Kept checkpoint keys (native) that the destination has no tensor for (not read)."""
    bytes_read: int
    """Bytes of tensor data this rank copied out of the checkpoint files."""
    bytes_loaded: int
    """Bytes of the loaded tensors in full (what one rank holding everything would read)."""


class BagelHFStorageReader(HuggingFaceStorageReader):
    """DCP's Hugging Face reader, restricted to tensors whose headers were already validated.

    The stock reader lists every ``*.safetensors`` file in the folder (``ae.safetensors``, and
    both the single file and the shards of a folder holding both) and parses each header again.
    This one builds DCP's metadata from the :class:`~bagelverify.safetensors_io.TensorInfo`
    records that :func:`bagelverify.checkpoint.open_checkpoint` validated, so DCP sees exactly
    the tensors the single-process loader would read, from the same files.

    Each read request (the part of one stored tensor that overlaps one local shard) whose bytes
    are one contiguous range of the file -- any slice along the first dimension, which is how
    FSDP2 shards -- is read by the read engine (:mod:`bagelverify.engine`, the single-process
    loaders' reader: in place, or staged for CUDA destinations), on a descriptor advised
    ``POSIX_FADV_RANDOM`` so the kernel reads that range and no read-ahead around it. The stock
    path maps the file and faults pages in with read-around; with large read-ahead windows that
    fetches neighbouring tensors the rank does not need (measured: 2 ranks together fetched the
    whole file in a stage-1 load that keeps 55% of it). Other requests (column slices) use the
    stock ``safe_open`` slice. :attr:`bytes_read` counts the requested bytes.
    """

    def __init__(self, tensors: Mapping[str, TensorInfo], *, thread_count: int = 1) -> None:
        paths = {info.path.parent for info in tensors.values()}
        super().__init__(str(next(iter(paths))) if paths else ".", thread_count=thread_count)
        self.tensors = dict(tensors)
        self.bytes_read = 0

    def read_metadata(self) -> Metadata:
        """DCP metadata for :attr:`tensors`: one unsharded chunk per tensor."""
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        for name, info in self.tensors.items():
            origin = torch.Size([0] * len(info.shape))
            size = torch.Size(info.shape)
            state[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=info.torch_dtype),
                size=size,
                chunks=[ChunkStorageMetadata(offsets=origin, sizes=size)],
            )
            storage[MetadataIndex(fqn=name, offset=origin)] = _HFStorageInfo(
                relative_path=str(info.path), shape=size, dtype=info.torch_dtype
            )
        return Metadata(
            state_dict_metadata=state,
            storage_data=storage,
            storage_meta=StorageMeta(load_id=self.load_id),
        )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read the plan's slices (stock reader) and add their size to :attr:`bytes_read`."""
        for item in plan.items:
            info = self.tensors[item.storage_index.fqn]
            self.bytes_read += math.prod(item.lengths) * info.torch_dtype.itemsize
        result: Future[None] = super().read_data(plan, planner)
        return result

    def _process_read_request(self, f: Any, req: ReadItem, planner: LoadPlanner) -> None:
        info = self.tensors[req.storage_index.fqn]
        span = _byte_span(info, req.storage_offsets, req.lengths)
        if span is None:
            super()._process_read_request(f, req, planner)
            return
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != tuple(req.lengths):
            raise CorruptCheckpointError(
                f"{info.path}: DCP asked for a {list(req.lengths)} slice of {info.name!r} into "
                f"a {list(target.shape)} destination"
            )
        transfer = Transfer(
            info.name, info.path, span[0], span[1], info.torch_dtype, tuple(req.lengths), target
        )
        fd = os.open(info.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            if hasattr(os, "posix_fadvise"):  # this range only: no read-ahead around it
                os.posix_fadvise(fd, span[0], span[1], os.POSIX_FADV_RANDOM)
            # in place when possible, else staged (CUDA destinations) or through a temporary
            run_engine([transfer], options=_NO_PREFETCH, fds={info.path: fd})
        finally:
            os.close(fd)
        planner.commit_tensor(req, target)


def _byte_span(
    info: TensorInfo, offsets: Sequence[int], lengths: Sequence[int]
) -> tuple[int, int] | None:
    """``(file offset, byte count)`` of a slice of a stored tensor when its bytes are one
    contiguous range (every dimension before the last partial one has length 1), else
    ``None``."""
    shape = info.shape
    partial = [d for d in range(len(shape)) if (offsets[d], lengths[d]) != (0, shape[d])]
    if partial and any(lengths[d] != 1 for d in range(partial[-1])):
        return None
    stride, start = 1, 0
    for d in reversed(range(len(shape))):
        start += offsets[d] * stride
        stride *= shape[d]
    itemsize = info.torch_dtype.itemsize
    return info.start + start * itemsize, math.prod(lengths) * itemsize


def _quietly(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a DCP call that was asked for ``no_dist`` without its warning that it is not
    distributed (which it was told)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, **kwargs)


# -- agreement between ranks -------------------------------------------------------------------


def _world(process_group: dist.ProcessGroup | None) -> tuple[bool, int]:
    """(whether to coordinate with other ranks, this rank's number)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False, 0
    return True, dist.get_rank(process_group)


def _transportable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a :class:`BagelError` carrying its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return BagelError(f"{type(error).__name__}: {error}")
    return error


def _agree(
    error: BaseException | None,
    destinations: Mapping[str, Any],
    process_group: dist.ProcessGroup | None,
) -> None:
    """Raise on every rank if any rank failed its checks or requests different tensors.

    One ``all_gather_object`` that every rank reaches whatever its own outcome, before any DCP
    collective: a rank whose checks failed re-raises its own error, the others the first failing
    rank's (same class, same message), so no rank is left waiting for a peer that gave up.
    """
    coordinated, rank = _world(process_group)
    if not coordinated:
        if error is not None:
            raise error
        return
    size = dist.get_world_size(process_group)
    verdicts: list[Any] = [None] * size
    sent = None if error is None else _transportable(error)
    dist.all_gather_object(verdicts, (sent, _fingerprint(destinations)), group=process_group)
    if error is not None:
        raise error
    for other, (remote, _) in enumerate(verdicts):
        if remote is not None:
            if hasattr(remote, "add_note"):
                remote.add_note(f"(raised by the checks on rank {other}; this is rank {rank})")
            raise remote
    if len({remote_print for _, remote_print in verdicts}) > 1:
        # every rank sees the same fingerprints, so every rank takes this second gather
        described: list[Any] = [None] * size
        dist.all_gather_object(described, _describe(destinations), group=process_group)
        raise DistributedMismatchError(
            "the ranks pass different state dicts: "
            + "; ".join(_differences(described))
            + ". Every rank must pass the same model's full state dict (sharded values are "
            "fine); DCP would hang or fail otherwise."
        )


def _describe(destinations: Mapping[str, Any]) -> dict[str, str]:
    """Key -> ``"<global shape> <dtype>"`` (the type name for non-tensors)."""
    out = {}
    for key, value in destinations.items():
        kind = getattr(value, "dtype", type(value).__name__)
        out[key] = f"{list(getattr(value, 'shape', ()))} {kind}"
    return out


def _fingerprint(destinations: Mapping[str, Any]) -> str:
    """A digest of :func:`_describe`, in key order."""
    digest = hashlib.sha256()
    for key, text in sorted(_describe(destinations).items()):
        digest.update(f"{key}\0{text}\n".encode())
    return digest.hexdigest()


def _differences(described: Sequence[Mapping[str, str]]) -> list[str]:
    """How each rank's state dict differs from rank 0's, one phrase per differing rank."""
    base = described[0]
    phrases = []
    for rank, other in enumerate(described[1:], start=1):
        parts = []
        if lacks := [k for k in base if k not in other]:
            parts.append(f"lacks {len(lacks)} of rank 0's keys ({format_examples(lacks)})")
        if extra := [k for k in other if k not in base]:
            parts.append(f"has {len(extra)} keys rank 0 lacks ({format_examples(extra)})")
        if changed := [
            f"{k} {base[k]} vs {other[k]}" for k in base if other.get(k, base[k]) != base[k]
        ]:
            parts.append(f"{len(changed)} differ from rank 0's ({format_examples(changed)})")
        if parts:
            phrases.append(f"rank {rank} " + ", ".join(parts))
    return phrases


# -- loading ---------------------------------------------------------------------------------


def _fill_converted(
    jobs: Mapping[str, tuple[TensorInfo, bool]], destinations: Mapping[str, torch.Tensor]
) -> None:
    """Load Conv2d patch-embedding weights converted to Linear: every rank reads the (small)
    tensor whole, converts it, and keeps its own shard."""
    for key, (info, convert) in jobs.items():
        full = torch.empty(_target_shape(info, convert), dtype=info.torch_dtype)
        _fill({key: (info, convert)}, {key: full})
        destination = destinations[key]
        with torch.no_grad():
            if isinstance(destination, DTensor):
                local = distribute_tensor(
                    full.to(destination.device),
                    destination.device_mesh,
                    destination.placements,
                    src_data_rank=None,
                ).to_local()
                destination.to_local().copy_(local)
            else:
                destination.copy_(full)


def load_bagel_checkpoint_distributed(
    model_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: object = "stage1",
    strict: bool = True,
    config: Any = None,
    cast: Cast = "lossless",
    convert_conv_patch_embedding: bool = False,
    process_group: dist.ProcessGroup | None = None,
    thread_count: int = 1,
) -> DistributedLoadResult:
    """Fill a native state dict whose values may be sharded ``DTensor`` s, in place, through DCP.

    Call it on every rank with the same keys (e.g. ``model.state_dict()`` of an FSDP2 model).
    Checks are those of :func:`bagelverify.checkpoint.load_into`, in the same code: the folder is
    validated from its headers (unknown keys, missing keys, config shapes), then the destinations
    against it (key sets under ``strict``, global shapes, dtypes as ``cast`` allows). Any failure
    raises the same error on every rank before DCP starts. Then
    :func:`torch.distributed.checkpoint.load` with :class:`BagelHFStorageReader` copies into each
    rank's local shards only the slices they hold. Without an initialised process group it loads
    in this process alone.
    """
    destinations: Mapping[str, torch.Tensor] = model_state_dict
    error: BaseException | None = None
    common: dict[str, tuple[TensorInfo, bool]] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    try:
        _, jobs = _open_report(checkpoint_dir, stage, strict, config, convert_conv_patch_embedding)
        common, incompatible = check_destinations(
            jobs, destinations, checkpoint_dir, strict=strict, cast=cast
        )
        missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
    except Exception as caught:  # any failure must reach the other ranks, not strand them
        error = caught
    _agree(error, destinations, process_group)

    converted = {key: job for key, job in common.items() if job[1]}
    direct = {key: job for key, job in common.items() if not job[1]}
    # DCP addresses tensors by checkpoint (HF) key: map each native destination to its name.
    by_name = {info.name: destinations[key] for key, (info, _) in direct.items()}
    reader = BagelHFStorageReader(
        {info.name: info for info, _ in direct.values()}, thread_count=thread_count
    )
    coordinated, rank = _world(process_group)
    _quietly(
        dcp_load,
        by_name,
        storage_reader=reader,
        planner=DefaultLoadPlanner(allow_partial_load=False),
        process_group=process_group,
        no_dist=not coordinated,
    )
    _fill_converted(converted, destinations)
    bytes_read = reader.bytes_read + sum(info.nbytes for info, _ in converted.values())
    total = sum(info.nbytes for info, _ in common.values())
    logger.info(
        "rank %d: loaded %d tensors from %s, reading %d of their %d bytes (%.1f%%)",
        rank,
        len(common),
        checkpoint_dir,
        bytes_read,
        total,
        100.0 * bytes_read / total if total else 0.0,
    )
    return DistributedLoadResult(missing, unexpected, bytes_read, total)


# -- DCP <-> HF conversion -------------------------------------------------------------------


def _mapped_state_dict(jobs: Mapping[str, tuple[TensorInfo, bool]]) -> dict[str, torch.Tensor]:
    """Native key -> tensor viewing its bytes in a copy-on-write map of the file (no read yet).

    Each view owns a storage of exactly its bytes, so DCP's writer does not copy it; pages are
    read as the writer reaches them and stay clean, evictable page cache, not process memory.
    A tensor whose offset is not a multiple of its element size, or a Conv2d patch weight to
    convert, is read into memory instead.
    """
    maps: dict[Path, mmap.mmap] = {}
    out: dict[str, torch.Tensor] = {}
    for key, (info, convert) in jobs.items():
        itemsize = info.torch_dtype.itemsize
        if convert or info.nbytes == 0 or info.start % itemsize:
            out[key] = torch.empty(_target_shape(info, convert), dtype=info.torch_dtype)
            _fill({key: (info, convert)}, out)
            continue
        if info.path not in maps:
            with open(info.path, "rb") as handle:
                maps[info.path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(
            maps[info.path],
            dtype=info.torch_dtype,
            count=info.nbytes // itemsize,
            offset=info.start,
        )
        out[key] = flat.view(info.shape)
    return out


def hf_to_dcp(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    strict: bool = True,
    config: Any = None,
    convert_conv_patch_embedding: bool = False,
) -> int:
    """Convert an HF-layout BAGEL folder to a DCP checkpoint in native layout; return the count
    of tensors written.

    The source is validated exactly as :func:`bagelverify.load_bagel_checkpoint_state_dict`
    validates it (``stage`` chooses what is kept; the default keeps UND and GEN), before anything
    is written. The kept tensors are then written unchanged (same dtype, same bytes) by
    :class:`~torch.distributed.checkpoint.FileSystemWriter` from this process alone, streamed
    from a memory map of the source: the process holds no copy of the checkpoint. The config
    files (``config`` if given, else the source folder's) are written next to DCP's files so
    that :func:`dcp_to_hf` validates shapes on the way back.
    """
    _, jobs = _open_report(src_dir, stage, strict, config, convert_conv_patch_embedding)
    state = _mapped_state_dict(jobs)
    target = Path(dst_dir)
    target.mkdir(parents=True, exist_ok=True)
    _quietly(dcp_save, state, storage_writer=FileSystemWriter(str(target)), no_dist=True)
    if config is not None:
        config.save_pretrained(target)
    else:
        for name in CONFIG_FILES:
            if (Path(src_dir) / name).is_file():
                shutil.copyfile(Path(src_dir) / name, target / name)
    logger.info("%s: wrote %d tensors as a DCP checkpoint", target, len(state))
    return len(state)


def _dcp_tensor_specs(metadata: Metadata, source: str) -> dict[str, TensorSpec]:
    """Checkpoint key -> spec (named by its HF key) of every entry of a DCP checkpoint."""
    specs: dict[str, TensorSpec] = {}
    others: list[str] = []
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            shape = tuple(entry.size)
            specs[key] = TensorSpec(strip_root(key), dtype_name(entry.properties.dtype), shape)
        else:
            others.append(key)
    if others:
        raise CorruptCheckpointError(
            f"{source}: {len(others)} entries are not tensors: {format_examples(others)}. A BAGEL "
            "DCP checkpoint holds the model's tensors only; save the model's state dict alone."
        )
    return specs


class _MetadataOnceReader(FileSystemReader):
    """DCP's file-system reader that parses ``.metadata`` once for many loads."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, read on the first call."""
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def dcp_to_hf(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    strict: bool = True,
    config: Any = None,
    max_shard_size: int | str | None = None,
) -> int:
    """Convert a native-layout DCP checkpoint to an HF-layout BAGEL folder; return the count of
    tensors written.

    Validation is :func:`bagelverify.save_bagel_checkpoint`'s, run on the DCP metadata before any
    tensor is read: keys under the ``model.`` root (``to_hf``), known families, config shapes and
    completeness (``config`` defaults to config files found in ``src_dir``). The tensors
    ``stage`` keeps are then streamed by :func:`bagelverify.checkpoint.write_bagel_checkpoint`:
    each is loaded from DCP, written and released, so memory holds about two copies of the
    largest tensor (DCP deserialises, then copies into the buffer). Files are written atomically,
    with the config files when there is a config.
    """
    source = Path(src_dir)
    if not (source / ".metadata").is_file():
        raise FileNotFoundError(f"{source / '.metadata'}: not found; is {source} a DCP checkpoint?")
    reader = _MetadataOnceReader(str(source))
    native = _dcp_tensor_specs(reader.read_metadata(), str(source))
    specs = BagelStateDictAdapter().to_hf(native, strict=strict)
    fetched = [0]

    def fetch(hf_key: str) -> torch.Tensor:
        spec = specs[hf_key]
        out = {to_native_key(hf_key): torch.empty(spec.shape, dtype=DTYPES[spec.dtype].torch_dtype)}
        _quietly(dcp_load, out, storage_reader=reader, no_dist=True)
        fetched[0] += 1
        return out[to_native_key(hf_key)]

    write_bagel_checkpoint(
        specs,
        fetch,
        dst_dir,
        stage=stage,
        max_shard_size=max_shard_size,
        strict=strict,
        config=find_config(source, config),
    )
    return fetched[0]
