"""Filling a (possibly ``DTensor``-sharded) state dict in place through DCP."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoint import (
    Cast,
    IncompatibleKeys,
    ReadJob,
    ReadJobs,
    check_destinations,
    check_weights,
    read_jobs,
    read_tensor,
)
from ..checkpoint.files import Weights
from ..config import BagelConfig, ConfigLike
from ..safetensors_io import header_digest
from ..stage import StageLike
from .agreement import agree, quietly, world
from .reader import BagelHFStorageReader

logger = logging.getLogger(__name__)


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


def fill_converted(jobs: ReadJobs, destinations: Mapping[str, torch.Tensor]) -> None:
    """Load Conv2d patch-embedding weights converted to Linear: every rank reads the (small)
    tensor whole, converts it, and keeps its own shard."""
    for key, job in jobs.items():
        full = read_tensor(job)
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


def checkpoint_identity(
    checkpoint_dir: str | os.PathLike[str], jobs: ReadJobs, config: BagelConfig | None
) -> dict[str, str]:
    """What identifies the checkpoint a load reads, from its headers (no tensor data): the
    folder's resolved path, each file read with its size and a digest of its safetensors header
    (tensor names, dtypes, shapes, offsets and metadata, which holds a sharded save's id), and
    each field of the config the folder is validated with.

    The path is part of it because two folders of one model's shapes have equal headers: ranks
    must name the checkpoint by one path (a copy per node at the same path passes; the same
    path holding different values of the same shapes and headers is not detected, as no tensor
    data is compared)."""
    identity = {"folder": str(Path(checkpoint_dir).resolve())}
    for path, fd in sorted({job.info.path: job.fd for job in jobs.values()}.items()):
        assert fd is not None  # read_jobs keeps every file open for its jobs
        digest = header_digest(fd, path)
        identity[f"file {path.name}"] = (
            f"{os.fstat(fd).st_size:,} bytes, header sha256 {digest[:16]}"
        )
    fields = dataclasses.asdict(config) if config is not None else {"": None}
    identity.update((f"config {name}".rstrip(), repr(value)) for name, value in fields.items())
    return identity


class ValidatedLoad(NamedTuple):
    """A checked load, ready for DCP (see :func:`validated_load`)."""

    reader: BagelHFStorageReader
    """DCP storage reader over exactly the validated tensors (checkpoint keys) that both sides
    have and that need no conversion; reads through the engine."""
    converted: ReadJobs
    """Conv2d patch-embedding weights to convert, read whole and converted after DCP."""
    common: ReadJobs
    """Every job both sides have (native keys)."""
    missing_keys: list[str]
    unexpected_keys: list[str]
    rank: int


@contextlib.contextmanager
def validated_load(
    destinations: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike,
    strict: bool,
    config: ConfigLike | None,
    cast: Cast,
    convert_conv_patch_embedding: bool = False,
    process_group: dist.ProcessGroup | None = None,
    thread_count: int = 1,
    weights: Weights | None = None,
) -> Iterator[ValidatedLoad]:
    """Check a folder and native destinations (possibly sharded ``DTensor`` s) on every rank,
    then yield the DCP reader for the load; the files stay open for the ``with`` block.

    The checks are :func:`bagelverify.checkpoint.load_into`'s, in the same code: the folder from
    its headers (unknown keys, missing keys, config shapes), then the destinations against it
    (key sets under ``strict``, global shapes, dtypes as ``cast`` allows). A failure on any rank
    raises on every rank (:func:`~bagelverify.distributed.agreement.agree`) before any tensor
    is read, so no rank is left in a collective its peers abandoned. So does a
    :class:`~bagelverify.errors.DistributedMismatchError` when the ranks' destinations (keys,
    global shapes, dtypes), arguments (``stage`` normalised, ``strict``, ``cast``, ``weights``,
    ``convert_conv_patch_embedding``, the config's fields) or checkpoints
    (:func:`checkpoint_identity`) differ: ranks that each pass their own checks would otherwise
    fill their shards from different checkpoints, or some not at all.
    """
    with contextlib.ExitStack() as files:  # the checkpoint's files stay open for the reads
        error: BaseException | None = None
        identity: dict[str, str] = {}
        common: dict[str, ReadJob] = {}
        incompatible = IncompatibleKeys([], [])
        try:
            report, jobs = files.enter_context(
                read_jobs(
                    checkpoint_dir,
                    stage=stage,
                    strict=strict,
                    config=config,
                    convert_conv=convert_conv_patch_embedding,
                    weights=weights,
                )
            )
            common, incompatible = check_destinations(
                jobs, destinations, checkpoint_dir, strict=strict, cast=cast, report=report
            )
            identity = {
                "stage": repr(report.stage),
                "strict": repr(strict),
                "cast": repr(cast),
                "weights": repr(check_weights(weights)),
                "convert_conv_patch_embedding": repr(convert_conv_patch_embedding),
                **checkpoint_identity(checkpoint_dir, jobs, report.config),
            }
        except Exception as caught:  # any failure must reach the other ranks, not strand them
            error = caught
        agree(error, destinations, process_group, identity)
        direct = [job for job in common.values() if not job.convert]
        reader = BagelHFStorageReader(
            {job.info.name: job.info for job in direct},
            thread_count=thread_count,
            fds={job.info.path: job.fd for job in direct if job.fd is not None},
        )
        yield ValidatedLoad(
            reader,
            {key: job for key, job in common.items() if job.convert},
            common,
            incompatible.missing_keys,
            incompatible.unexpected_keys,
            world(process_group)[1],
        )


def load_bagel_checkpoint_distributed(
    model_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike = "stage1",
    strict: bool = True,
    config: ConfigLike | None = None,
    cast: Cast = "lossless",
    convert_conv_patch_embedding: bool = False,
    process_group: dist.ProcessGroup | None = None,
    thread_count: int = 1,
    weights: Weights | None = None,
) -> DistributedLoadResult:
    """Fill a native state dict whose values may be sharded ``DTensor`` s, in place, through DCP.

    Call it on every rank with the same keys (e.g. ``model.state_dict()`` of an FSDP2 model).
    The folder and the destinations are checked first (:func:`validated_load`: any failure
    raises the same error on every rank before DCP starts). Then
    :func:`torch.distributed.checkpoint.load` with :class:`BagelHFStorageReader` copies into each
    rank's local shards only the slices they hold. Without an initialised process group it loads
    in this process alone. ``weights`` picks the folder's ``ema`` or ``model`` weights.
    """
    destinations: Mapping[str, torch.Tensor] = model_state_dict
    with validated_load(
        destinations,
        checkpoint_dir,
        stage=stage,
        strict=strict,
        config=config,
        cast=cast,
        convert_conv_patch_embedding=convert_conv_patch_embedding,
        process_group=process_group,
        thread_count=thread_count,
        weights=weights,
    ) as load:
        # DCP addresses tensors by checkpoint (HF) key: map each native destination to its name.
        by_name = {
            job.info.name: destinations[key] for key, job in load.common.items() if not job.convert
        }
        quietly(
            dcp_load,
            by_name,
            storage_reader=load.reader,
            planner=DefaultLoadPlanner(allow_partial_load=False),
            process_group=process_group,
            no_dist=not world(process_group)[0],
        )
        fill_converted(load.converted, destinations)
    bytes_read = load.reader.bytes_read + sum(job.info.nbytes for job in load.converted.values())
    total = sum(job.info.nbytes for job in load.common.values())
    logger.info(
        "rank %d: loaded %d tensors from %s, reading %d of their %d bytes (%.1f%%)",
        load.rank,
        len(load.common),
        checkpoint_dir,
        bytes_read,
        total,
        100.0 * bytes_read / total if total else 0.0,
    )
    return DistributedLoadResult(load.missing_keys, load.unexpected_keys, bytes_read, total)
