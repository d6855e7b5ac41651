"""Writing BAGEL checkpoint folders: one ``ema.safetensors`` or index-described shards, every
file atomic, validated like a load before anything is written; and folder-to-folder conversion,
one tensor in memory at a time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch

from ..atomic import atomic_open, folder_lock, remove_durably
from ..config import CONFIG_FILES, BagelConfig
from ..errors import ShardSizeError
from ..keys import strip_root, to_native_key
from ..manifest import MODEL_FILE
from ..plan import unroot
from ..safetensors_io import (
    DEFAULT_METADATA,
    TensorSpec,
    layout_order,
    spec_of,
    stream_safetensors,
    write_safetensors,
)
from .files import INDEX_FILE, MODEL_WEIGHTS_FILE, SAVE_ID, open_checkpoint
from .load import read_jobs, read_tensor
from .report import build_report

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*([0-9]+)\s*([A-Za-z]*)\s*", size)):
        unit = m.group(2).upper()
        if unit not in _UNITS:
            raise ShardSizeError(
                f"max_shard_size {size!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, "
                "MiB or GiB (for example '5GB')"
            )
        value = int(m.group(1)) * _UNITS[unit]
    else:
        raise ShardSizeError(
            f"max_shard_size must be a byte count or a string like '5GB', got {size!r}"
        )
    if value < 1:
        raise ShardSizeError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(specs: Iterable[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Greedy split in layout order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout_order(specs):
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def save_bagel_checkpoint(
    native_state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a native state dict as an HF-layout BAGEL checkpoint; return the files written.

    A folder that already holds a checkpoint (``ema.safetensors`` or a shard index) is refused
    with ``FileExistsError`` unless ``overwrite`` is true.

    Keys must be under the ``model.`` root (``._extra_state`` entries are dropped); ``stage``
    chooses what is written (``"stage2"``, the default, writes every UND and GEN tensor;
    ``"stage1"`` only UND). Unknown keys raise under ``strict`` and are dropped with a warning
    otherwise, as on loading. With a
    ``config`` the tensors are validated like a load (shapes, missing keys under ``strict``) and
    the three config files are written too. Without ``max_shard_size`` one ``ema.safetensors``
    is written; with it, ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` (written last). Every file is written atomically
    (temporary file, fsync, rename), with ``__metadata__ {"format": "pt"}``; shards are all
    written before any is renamed and the old index is removed first, so a crash never leaves
    an index over shards of two saves. Every value (except dropped ``._extra_state``) must be a
    tensor a safetensors file can hold, kept by the stage or not:
    :class:`~bagelverify.errors.UnsupportedTensorError` otherwise, before anything is written.
    """
    hf = unroot(native_state_dict)  # the report below checks the keys, strict or not
    specs = {key: spec_of(key, tensor) for key, tensor in hf.items()}
    return write_bagel_checkpoint(
        specs,
        hf.__getitem__,
        out_dir,
        stage=stage,
        max_shard_size=max_shard_size,
        strict=strict,
        config=config,
        overwrite=overwrite,
    )


KeyLayout = Literal["hf", "native"]
"""Key names a written checkpoint uses: HF keys, or native keys under the ``model.`` root."""


def write_bagel_checkpoint(
    specs: Mapping[str, TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
    keys: KeyLayout = "hf",
    overwrite: bool = False,
) -> list[Path]:
    """Write a checkpoint described by its specs, fetching one tensor at a time.

    ``specs`` maps HF key -> :class:`TensorSpec`; ``fetch(hf_key)`` returns that tensor and is
    called once per written tensor, in file order, and its result released after writing, so
    peak memory is about the largest tensor. Validation, stage selection, sharding and files
    are those of :func:`save_bagel_checkpoint`; ``keys="native"`` names the tensors by their
    native (``model.``-rooted) keys instead of their HF keys; ``overwrite`` as there.
    """
    if config is not None and not isinstance(config, BagelConfig):
        raise TypeError(
            f"config must be a bagelverify.BagelConfig (written as the checkpoint's config "
            f"files), got {type(config).__name__}; use BagelConfig.from_pretrained(folder)"
        )
    report = build_report(specs, stage=stage, config=config, source=str(out_dir))
    report.raise_for_problems(strict=strict, verb="save")
    report.plan.log(strict=strict)
    names = {
        key: (native if keys == "native" else key) for key, native in report.plan.native.items()
    }
    kept = [TensorSpec(names[key], specs[key].dtype, specs[key].shape) for key in names]
    by_name = {name: key for key, name in names.items()}

    def fetch_by_name(name: str) -> torch.Tensor:
        return fetch(by_name[name])

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with folder_lock(directory):
        if max_shard_size is not None:
            _refuse_shadowing(directory)
        existing = [directory / name for name in (MODEL_FILE, INDEX_FILE)]
        if not overwrite and any(path.exists() for path in existing):
            found = next(path for path in existing if path.exists())
            raise FileExistsError(
                f"{directory} already holds a checkpoint ({found.name}); pass overwrite=True to "
                "replace it, or save to another folder"
            )
        if max_shard_size is None:
            target = directory / MODEL_FILE
            write_safetensors(target, kept, fetch_by_name)
            written = [target]
        else:
            written = _write_shards(directory, kept, fetch_by_name, parse_size(max_shard_size))
        if config is not None:
            config.save_pretrained(directory)
            written.extend(directory / name for name in CONFIG_FILES)
    logger.info("%s: wrote %d tensors (%s)", directory, len(kept), report.stage)
    return written


SHARD_NAME = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")
"""The names :func:`write_bagel_checkpoint` gives shards."""


def _indexed_shards(directory: Path) -> set[str]:
    """The shard names the folder's current index lists (none if it has no readable index)."""
    try:
        files = open_checkpoint(directory, weights="model")
    except (OSError, ValueError):  # no index, or one that does not parse: nothing to go by
        return set()
    return {path.name for path in files.files} if files.layout == "sharded" else set()


def _refuse_shadowing(directory: Path) -> None:
    for name in (MODEL_FILE, MODEL_WEIGHTS_FILE):
        if (directory / name).exists():
            raise FileExistsError(
                f"{directory / name} exists and would shadow the sharded checkpoint (a load "
                f"reads {name} before {INDEX_FILE}); remove it or save to another folder"
            )


def _write_shards(
    directory: Path, kept: list[TensorSpec], fetch: Callable[[str], torch.Tensor], limit: int
) -> list[Path]:
    """Write ``kept`` as shards of at most ``limit`` bytes and their index; then remove the
    shards of the previous save that the new index does not name."""
    previous = _indexed_shards(directory) | {
        entry.name for entry in os.scandir(directory) if SHARD_NAME.fullmatch(entry.name)
    }
    shards = _shards(kept, limit)
    save_id = secrets.token_hex(16)
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    # Every shard is complete and fsync'ed under a temporary name before the old index is
    # removed and the shards renamed: a crash leaves the previous checkpoint, or no index
    # (a loud FileNotFoundError), never an index over a mix of old and new shards.
    with contextlib.ExitStack() as renames:
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            handle = renames.enter_context(atomic_open(directory / name))
            stream_safetensors(
                handle, shard, fetch, metadata={**DEFAULT_METADATA, SAVE_ID: save_id}
            )
            handle.flush()
            os.fsync(handle.fileno())
            weight_map.update((spec.name, name) for spec in shard)
            written.append(directory / name)
        remove_durably(directory / INDEX_FILE)
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in kept), SAVE_ID: save_id},
        "weight_map": {spec.name: weight_map[spec.name] for spec in kept},
    }
    with atomic_open(directory / INDEX_FILE) as handle:
        handle.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))
    written.append(directory / INDEX_FILE)
    # Only now, with the new index in place, go the old shards it does not name (glob-based
    # readers would load them too). A crash here leaves unindexed files, removed next time.
    for name in sorted(previous - {path.name for path in written}):
        remove_durably(directory / name)
        logger.info("%s: removed %s, a shard of the previous save", directory, name)
    return written


def convert_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    keys: KeyLayout = "hf",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
    convert_conv_patch_embedding: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
    weights: object = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> list[Path]:
    """Rewrite a checkpoint folder with HF or native keys, streaming one tensor at a time.

    The source (HF- or native-keyed, single file or sharded) is validated from its headers like
    a load; each kept tensor is then read into a fresh buffer, written and released, so peak
    memory is about the largest tensor, never the checkpoint. The config (``config`` if given,
    else the source's config files) is written with the tensors. ``on_tensor(hf_key, nbytes)``
    is called after each tensor is read (for progress); ``overwrite`` as for
    :func:`save_bagel_checkpoint`; ``weights`` picks the source's ``ema`` or ``model`` weights.
    ``transform(hf_key, tensor)``, if given, replaces each tensor read before it is written
    (same shape and dtype: the header is written from the source's). Returns the files
    written.
    """
    with read_jobs(
        src_dir,
        stage=stage,
        strict=strict,
        config=config,
        convert_conv=convert_conv_patch_embedding,
        weights=weights,
    ) as (report, jobs):
        specs = {
            strip_root(native): TensorSpec(strip_root(native), job.info.dtype, job.shape)
            for native, job in jobs.items()
        }

        def fetch(hf_key: str) -> torch.Tensor:
            job = jobs[to_native_key(hf_key)]
            out = read_tensor(job)
            if transform is not None:
                out = transform(hf_key, out)
            if on_tensor is not None:
                on_tensor(hf_key, job.info.nbytes)
            return out

        return write_bagel_checkpoint(
            specs,
            fetch,
            dst_dir,
            stage=report.stage,
            max_shard_size=max_shard_size,
            strict=strict,
            config=report.config,
            keys=keys,
            overwrite=overwrite,
        )
