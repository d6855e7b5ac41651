"""Conversion between an HF-layout BAGEL folder and a native-layout DCP checkpoint."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, WriteItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..adapter import BagelStateDictAdapter
from ..checkpoint import (
    INDEX_FILE,
    ReadJobs,
    find_config,
    read_jobs,
    read_tensor,
    write_bagel_checkpoint,
)
from ..checkpoint.files import Weights
from ..config import CONFIG_FILES, BagelConfig, ConfigLike
from ..errors import BagelError, CorruptCheckpointError, agree, counted, format_examples
from ..keys import strip_root, to_native_key
from ..manifest import MODEL_FILE
from ..publish import Guard, publishing, recover
from ..safe_pickle import load_dcp_metadata
from ..safetensors_io import DTYPES, TensorSpec, dtype_name
from ..stage import StageLike
from .agreement import quietly

logger = logging.getLogger(__name__)

DCP_METADATA = ".metadata"
"""The file that describes a DCP checkpoint (written last)."""


def _is_dcp_file(name: str) -> bool:
    return name == DCP_METADATA or name.endswith(".distcp")


def _dcp_guard(target: Path, overwrite: bool) -> Guard:
    """Refuse a folder that holds a checkpoint (DCP or safetensors) unless ``overwrite``."""

    def guard(entries: list[str]) -> None:
        found = [n for n in entries if _is_dcp_file(n) or n in (MODEL_FILE, INDEX_FILE)]
        if found and not overwrite:
            raise FileExistsError(
                f"{target} already holds a checkpoint ({found[0]}); pass overwrite=True to "
                "replace it, or write to another folder"
            )

    return guard


@contextlib.contextmanager
def _disk_faults_named(target: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (DCP's writer on a full disk) with its errno
    and a message naming ``target``; what was staged is already removed by then."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(
            error.errno,
            f"{error.strerror or error} while writing {target}; nothing was published there. "
            "Free space (or fix the file system) and run it again, or write to another folder",
        ) from error


class _ReadingPlanner(DefaultSavePlanner):
    """DCP's save planner over placeholder entries: each tensor is read from the source (through
    the descriptor its header was read through) when DCP's writer reaches it, and released
    after, so the process holds one tensor at a time and a file cut short while it is read is a
    :class:`~bagelverify.errors.CorruptCheckpointError`, not a crash (as a memory map would be)."""

    def __init__(self, jobs: ReadJobs) -> None:
        super().__init__()
        self.jobs = jobs

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """The tensor of ``write_item``, read now."""
        job = self.jobs.get(write_item.index.fqn)
        if job is None:
            return super().resolve_data(write_item)
        return read_tensor(job)


def _placeholders(jobs: ReadJobs) -> dict[str, torch.Tensor]:
    """Native key -> a tensor of the job's shape and dtype that owns one element of memory
    (an expanded scalar): what DCP plans from; :class:`_ReadingPlanner` supplies the data."""
    return {
        key: torch.empty((), dtype=job.info.torch_dtype).expand(job.shape)
        for key, job in jobs.items()
    }


def hf_to_dcp(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: StageLike | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    convert_conv_patch_embedding: bool = False,
    weights: Weights | None = None,
    overwrite: bool = False,
) -> int:
    """Convert an HF-layout BAGEL folder to a DCP checkpoint in native layout; return the count
    of tensors written.

    The source is validated exactly as :func:`bagelverify.load_bagel_checkpoint_state_dict`
    validates it (``stage`` chooses what is kept; the default, ``None``, keeps the stage the
    source holds), before anything is written. The kept tensors are then written unchanged
    (same dtype, same bytes) by :class:`~torch.distributed.checkpoint.FileSystemWriter` from
    this process alone, each read from the source as the writer reaches it, into one DCP file
    per tensor: the process holds about one tensor at a time. The config files (``config`` if
    given, else the source folder's) are written next to DCP's files so
    that :func:`dcp_to_hf` validates shapes on the way back. ``weights`` picks the source's
    ``ema`` or ``model`` weights.

    The output is published like every checkpoint write
    (:func:`bagelverify.save_bagel_checkpoint`): written into a staging folder and swapped in
    whole, so ``dst_dir`` never holds a partial checkpoint. A ``dst_dir`` that holds a
    checkpoint (DCP or safetensors) is refused with ``FileExistsError`` unless ``overwrite``;
    with it, the previous DCP files (and config files, when new ones are written) are all
    replaced, none left stale. A ``dst_dir`` that is the source (or the config folder) by any
    name -- a symlink, a bind mount, hard links -- raises
    :class:`~bagelverify.errors.AliasError` before anything is written. A failure inside DCP is
    raised as itself (a full disk: the ``OSError``, errno kept, naming ``dst_dir``; Ctrl-C:
    ``KeyboardInterrupt``), with the staging folder removed.
    """
    target = Path(dst_dir)
    config_path = config if isinstance(config, (str, os.PathLike)) else None
    folder = Path(config_path) if config_path is not None else Path(src_dir)
    copied = [name for name in CONFIG_FILES if (folder / name).is_file()]
    written_configs = isinstance(config, BagelConfig) or bool(copied)

    def replaces(name: str) -> bool:
        return _is_dcp_file(name) or (written_configs and name in CONFIG_FILES)

    with read_jobs(
        src_dir,
        stage=stage,
        strict=strict,
        config=config,
        convert_conv=convert_conv_patch_embedding,
        weights=weights,
    ) as (_, jobs):
        state = _placeholders(jobs)
        with (
            _disk_faults_named(target),
            publishing(
                target,
                replaces=replaces,
                guard=_dcp_guard(target, overwrite),
                reads=[src_dir, config_path],
                last=(DCP_METADATA,),
            ) as staging,
        ):
            quietly(
                dcp_save,
                state,
                # one file per tensor: DCP's writer keeps every tensor of a file alive until the
                # file is written, so one file per rank would hold the whole checkpoint in memory
                storage_writer=FileSystemWriter(str(staging), single_file_per_rank=False),
                planner=_ReadingPlanner(jobs),
                no_dist=True,
            )
            if isinstance(config, BagelConfig):
                config.save_pretrained(staging)
            else:  # the files of the folder the config came from, as they are
                for name in copied:
                    shutil.copyfile(folder / name, staging / name)
    logger.info("%s: wrote %d tensors as a DCP checkpoint", target, len(state))
    return len(state)


def dcp_tensor_specs(metadata: Metadata, source: str) -> dict[str, TensorSpec]:
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
        what = agree(len(others), "is not a tensor", "are not tensors")
        raise CorruptCheckpointError(
            f"{source}: {counted(len(others), 'entry', 'entries')} {what}: "
            f"{format_examples(others)}. A BAGEL DCP checkpoint holds the model's tensors only; "
            "save the model's state dict alone."
        )
    return specs


def check_data_files(metadata: Metadata, source: Path) -> None:
    """Raise :class:`~bagelverify.errors.CorruptCheckpointError` naming every data file that
    ``.metadata`` points into and that is missing, not a file name in ``source``, or shorter
    than the bytes it indexes there (a copy or save cut short): before anything is written."""
    ends: dict[str, tuple[int, str]] = {}  # file -> (end of its last entry, that entry's key)
    for index, info in (metadata.storage_data or {}).items():
        name, offset, length = (
            getattr(info, f, None) for f in ("relative_path", "offset", "length")
        )
        if not (
            isinstance(name, str)
            and Path(name).name == name
            and name not in ("", ".", "..")
            and isinstance(offset, int)
            and isinstance(length, int)
            and min(offset, length) >= 0
        ):
            raise CorruptCheckpointError(
                f"{source / DCP_METADATA}: {index.fqn!r} is stored at {name!r} (offset "
                f"{offset!r}, length {length!r}), which is not a byte range of a file in "
                f"{source}. Re-save the checkpoint or restore the file."
            )
        end = offset + length
        if end > ends.get(name, (-1, ""))[0]:
            ends[name] = (end, index.fqn)
    faults = []
    for name, (end, key) in sorted(ends.items()):
        path = source / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"{size:,} bytes"
            faults.append(f"{name} ({found}; {key!r} ends at byte {end:,})")
    if faults:
        raise CorruptCheckpointError(
            f"{source}: {counted(len(faults), 'data file')} "
            f"{agree(len(faults), 'is', 'are')} missing or shorter than {DCP_METADATA} says: "
            f"{format_examples(faults, show=str)}. The checkpoint was cut short (an interrupted "
            "copy or save); copy or save it again. Nothing was written."
        )


class _MetadataOnceReader(FileSystemReader):
    """DCP's file-system reader that parses ``.metadata`` once for many loads, through
    :func:`bagelverify.safe_pickle.load_dcp_metadata` (no code from the file runs); data that
    DCP cannot deserialise is a :class:`~bagelverify.errors.CorruptCheckpointError` naming its
    file."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, read on the first call."""
        if self._metadata is None:
            metadata = load_dcp_metadata(Path(self.path) / ".metadata")
            storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            storage_meta.load_id = self.load_id
            metadata.storage_meta = storage_meta
            self._metadata = metadata
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        """DCP's read; what fails in it other than an interrupt or an ``OSError`` (data that
        does not deserialise, or of another size than its entry) is a
        :class:`~bagelverify.errors.CorruptCheckpointError` naming the files and keys."""
        try:
            return super().read_data(plan, planner)
        except (BagelError, OSError):
            raise
        except Exception as error:
            entries = [self.storage_data[item.storage_index] for item in plan.items]
            files = sorted({str(Path(self.path) / entry.relative_path) for entry in entries})
            keys = [item.storage_index.fqn for item in plan.items]
            raise CorruptCheckpointError(
                f"{', '.join(files)}: the data of {format_examples(keys)} does not deserialise "
                f"({type(error).__name__} in DCP's reader). The file is damaged: copy or "
                "save the checkpoint again; do not load it with weights_only=False."
            ) from error


def dcp_to_hf(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: StageLike | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> int:
    """Convert a native-layout DCP checkpoint to an HF-layout BAGEL folder; return the count of
    tensors written.

    Validation is :func:`bagelverify.save_bagel_checkpoint`'s, run on the DCP metadata before any
    tensor is read: keys under the ``model.`` root (``to_hf``), known families, config shapes and
    completeness (``config`` defaults to config files found in ``src_dir``). The tensors
    ``stage`` keeps are then streamed by :func:`bagelverify.checkpoint.write_bagel_checkpoint`:
    each is loaded from DCP, written and released, so memory holds about two copies of the
    largest tensor (DCP deserialises, then copies into the buffer). Files are written atomically,
    with the config files when there is a config, and published as a whole (see
    :func:`bagelverify.save_bagel_checkpoint`); an existing checkpoint in ``dst_dir`` is replaced
    only with ``overwrite``; a ``dst_dir`` that is the source by any name raises
    :class:`~bagelverify.errors.AliasError`. A data file that ``.metadata`` points into and that
    is missing or shorter than the bytes it indexes is a
    :class:`~bagelverify.errors.CorruptCheckpointError` naming it, before anything is written;
    so is data DCP cannot deserialise.
    """
    source = Path(src_dir)
    recover(source)  # a killed write of the source is finished or undone first
    if not (source / DCP_METADATA).is_file():
        raise FileNotFoundError(
            f"{source / DCP_METADATA}: not found; is {source} a DCP checkpoint?"
        )
    reader = _MetadataOnceReader(str(source))
    native = dcp_tensor_specs(reader.read_metadata(), str(source))
    check_data_files(reader.read_metadata(), source)
    specs = BagelStateDictAdapter().to_hf(native, strict=strict)
    fetched = [0]

    def fetch(hf_key: str) -> torch.Tensor:
        spec = specs[hf_key]
        out = {to_native_key(hf_key): torch.empty(spec.shape, dtype=DTYPES[spec.dtype].torch_dtype)}
        quietly(dcp_load, out, storage_reader=reader, no_dist=True)
        fetched[0] += 1
        return out[to_native_key(hf_key)]

    with _disk_faults_named(Path(dst_dir)):
        write_bagel_checkpoint(
            specs,
            fetch,
            dst_dir,
            stage=stage,
            max_shard_size=max_shard_size,
            strict=strict,
            config=find_config(source, config),
            overwrite=overwrite,
            inputs=(source, config if isinstance(config, (str, os.PathLike)) else None),
        )
    return fetched[0]
