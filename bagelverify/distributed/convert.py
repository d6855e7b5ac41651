"""Conversion between an HF-layout BAGEL folder and a native-layout DCP checkpoint."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..adapter import BagelStateDictAdapter
from ..checkpoint import ReadJobs, find_config, read_jobs, read_tensor, write_bagel_checkpoint
from ..config import CONFIG_FILES, BagelConfig
from ..errors import CorruptCheckpointError, format_examples
from ..keys import strip_root, to_native_key
from ..safe_pickle import load_dcp_metadata
from ..safetensors_io import DTYPES, TensorSpec, dtype_name
from .agreement import quietly

logger = logging.getLogger(__name__)


def _mapped_state_dict(jobs: ReadJobs) -> dict[str, torch.Tensor]:
    """Native key -> tensor viewing its bytes in a copy-on-write map of the file (no read yet).

    Each view owns a storage of exactly its bytes, so DCP's writer does not copy it; pages are
    read as the writer reaches them and stay clean, evictable page cache, not process memory.
    A tensor whose offset is not a multiple of its element size, or a Conv2d patch weight to
    convert, is read into memory instead.
    """
    maps: dict[Path, mmap.mmap] = {}
    out: dict[str, torch.Tensor] = {}
    for key, job in jobs.items():
        info = job.info
        itemsize = info.torch_dtype.itemsize
        if job.convert or info.nbytes == 0 or info.start % itemsize:
            out[key] = read_tensor(job)
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
    _, jobs = read_jobs(
        src_dir,
        stage=stage,
        strict=strict,
        config=config,
        convert_conv=convert_conv_patch_embedding,
    )
    state = _mapped_state_dict(jobs)
    target = Path(dst_dir)
    target.mkdir(parents=True, exist_ok=True)
    quietly(dcp_save, state, storage_writer=FileSystemWriter(str(target)), no_dist=True)
    if isinstance(config, BagelConfig):
        config.save_pretrained(target)
    else:  # the files of the folder the config came from, as they are
        folder = Path(config) if isinstance(config, (str, os.PathLike)) else Path(src_dir)
        for name in CONFIG_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, target / name)
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
    """DCP's file-system reader that parses ``.metadata`` once for many loads, through
    :func:`bagelverify.safe_pickle.load_dcp_metadata` (no code from the file runs)."""

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
        quietly(dcp_load, out, storage_reader=reader, no_dist=True)
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
