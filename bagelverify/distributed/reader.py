"""DCP's Hugging Face storage reader, fed the headers bagelverify already validated."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
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
