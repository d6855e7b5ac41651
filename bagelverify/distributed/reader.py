"""DCP's Hugging Face storage reader, fed the headers bagelverify already validated."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..engine import EngineOptions, Transfer
from ..engine import run as run_engine
from ..errors import CorruptCheckpointError
from ..safetensors_io import TensorInfo

try:  # the Hugging Face reader and its per-entry record arrived in torch 2.8
    from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
except ImportError as error:  # pragma: no cover - depends on the installed torch
    raise ImportError(
        f"bagelverify.distributed needs torch.distributed.checkpoint.HuggingFaceStorageReader "
        f"(torch >= 2.8); this is torch {torch.__version__}"
    ) from error

_NO_PREFETCH = EngineOptions(prefetch=False)


class BagelHFStorageReader(HuggingFaceStorageReader):
    """DCP's Hugging Face reader, restricted to tensors whose headers were already validated.

    The stock reader lists every ``*.safetensors`` file in the folder (``ae.safetensors``, and
    both the single file and the shards of a folder holding both) and parses each header again.
    This one builds DCP's metadata from the :class:`~bagelverify.safetensors_io.TensorInfo`
    records that :func:`bagelverify.checkpoint.open_checkpoint` validated, so DCP sees exactly
    the tensors the single-process loader would read, from the same files.

    The read requests (the part of one stored tensor that overlaps one local shard) whose bytes
    are one contiguous range of the file -- any slice along the first dimension, which is how
    FSDP2 shards -- are read together by one run of the read engine (:mod:`bagelverify.engine`,
    the single-process loaders' reader: several threads, in place, or staged for CUDA
    destinations with the copies overlapped), on a descriptor advised
    ``POSIX_FADV_RANDOM`` so the kernel reads that range and no read-ahead around it. The stock
    path maps the file and faults pages in with read-around; with large read-ahead windows that
    fetches neighbouring tensors the rank does not need (measured: 2 ranks together fetched the
    whole file in a stage-1 load that keeps 55% of it). Other requests (column slices) use the
    stock ``safe_open`` slice. :attr:`bytes_read` counts the requested bytes.
    """

    def __init__(
        self,
        tensors: Mapping[str, TensorInfo],
        *,
        thread_count: int = 1,
        fds: Mapping[Path, int] | None = None,
    ) -> None:
        paths = {info.path.parent for info in tensors.values()}
        super().__init__(str(next(iter(paths))) if paths else ".", thread_count=thread_count)
        self.tensors = dict(tensors)
        self.fds = dict(fds or {})
        """File -> an open descriptor to read it through (the one its header was read
        through); files without one are opened by name for each request."""
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
        """Read the plan's slices and add their size to :attr:`bytes_read`: every contiguous
        slice in one run of the read engine (its threads, and pinned staging overlapped with
        host-to-device copies for CUDA shards), the others through the stock reader."""
        ranges: list[tuple[ReadItem, TensorInfo, tuple[int, int]]] = []
        others: list[ReadItem] = []
        for item in plan.items:
            info = self.tensors[item.storage_index.fqn]
            self.bytes_read += math.prod(item.lengths) * info.torch_dtype.itemsize
            span = _byte_span(info, item.storage_offsets, item.lengths)
            if span is None:
                others.append(item)
            else:
                ranges.append((item, info, span))
        if others:
            super().read_data(dataclasses.replace(plan, items=others), planner).wait()
        if ranges:
            self._read_ranges(ranges, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_ranges(
        self, ranges: list[tuple[ReadItem, TensorInfo, tuple[int, int]]], planner: LoadPlanner
    ) -> None:
        targets = []
        transfers = []
        for item, info, (offset, nbytes) in ranges:
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(item.lengths):
                raise CorruptCheckpointError(
                    f"{info.path}: DCP asked for a {list(item.lengths)} slice of {info.name!r} "
                    f"into a {list(target.shape)} destination"
                )
            targets.append(target)
            transfers.append(
                Transfer(
                    info.name,
                    info.path,
                    offset,
                    nbytes,
                    info.torch_dtype,
                    tuple(item.lengths),
                    target,
                )
            )
        with contextlib.ExitStack() as opened:
            fds = dict(self.fds)
            for path in {info.path for _, info, _ in ranges} - set(fds):
                fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                opened.callback(os.close, fds[path])
            if hasattr(os, "posix_fadvise"):  # these ranges only: no read-ahead around them
                for _, info, (offset, nbytes) in ranges:
                    os.posix_fadvise(fds[info.path], offset, nbytes, os.POSIX_FADV_RANDOM)
            # in place when possible, else staged (CUDA destinations) or through a temporary
            run_engine(transfers, options=_NO_PREFETCH, fds=fds)
        for (item, _, _), target in zip(ranges, targets, strict=True):
            planner.commit_tensor(item, target)


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
