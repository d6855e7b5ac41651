"""Writing BAGEL checkpoint folders: one ``ema.safetensors`` or index-described shards, validated
like a load before anything is written and published as a whole (:mod:`bagelverify.publish`);
and folder-to-folder conversion, one tensor in memory at a time."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..atomic import atomic_open
from ..config import CONFIG_FILES, BagelConfig, ConfigLike
from ..errors import ArgumentTypeError, CorruptCheckpointError, ShardSizeError
from ..keys import strip_root, to_native_key
from ..manifest import MODEL_FILE
from ..plan import require_mapping, unroot, without_prefix
from ..publish import Guard, public_path, publishing
from ..safetensors_io import (
    DEFAULT_METADATA,
    TensorSpec,
    layout_order,
    spec_of,
    write_safetensors,
)
from ..stage import StageLike
from ..strict_json import MAX_INDEX_BYTES, read_json_file
from .files import INDEX_FILE, MODEL_WEIGHTS_FILE, SAVE_ID, Weights
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
    stage: StageLike | None = None,
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    overwrite: bool = False,
    strip_prefix: str | None = None,
) -> list[Path]:
    """Write a native state dict as an HF-layout BAGEL checkpoint; return the files written.

    A folder that already holds a checkpoint (``ema.safetensors`` or a shard index) is refused
    with ``FileExistsError`` unless ``overwrite`` is true.

    Keys must be under the ``model.`` root (``._extra_state`` entries are dropped); ``stage``
    chooses what is written (``"stage1"``: UND only; ``"stage2"``: UND and GEN; ``None``, the
    default: the stage the state dict holds, so every UND and GEN tensor given is written).
    Unknown keys raise under ``strict`` and are dropped with a warning
    otherwise, as on loading. With a
    ``config`` the tensors are validated like a load (shapes, missing keys under ``strict``) and
    the three config files are written too. Without ``max_shard_size`` one ``ema.safetensors``
    is written; with it, ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json``, with ``__metadata__ {"format": "pt"}``.

    The files are written into a staging folder and published together
    (:func:`bagelverify.publish.publishing`): at every instant, a SIGKILL included, the folder
    holds the previous checkpoint or the new one, never a mix, and the next save (or load)
    finishes or removes what a killed one left. The new files replace the previous
    ``ema.safetensors`` (a single-file save) or the previous index and its shards (a sharded
    save), and the config files when a config is written; the folder's other files stay. Every
    value (except dropped ``._extra_state``) must be a tensor a safetensors file can hold, kept
    by the stage or not: :class:`~bagelverify.errors.UnsupportedTensorError` otherwise, before
    anything is written.

    A state dict without the tensors its stage is made of (an empty one, no GEN tensor for
    stage 2) is refused strict or not: a
    :class:`~bagelverify.errors.MissingKeysError` says what it holds and which stage fits.
    ``strip_prefix`` (e.g. ``"module."`` from a DDP-wrapped model's ``state_dict()``) is removed
    from the keys that carry it before the ``model.`` root is checked.
    """
    # the report below checks the keys, strict or not
    hf = unroot(without_prefix(require_mapping(native_state_dict, "state_dict"), strip_prefix))
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
    stage: StageLike | None = None,
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    keys: KeyLayout = "hf",
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    metadata: Mapping[str, str] | None = None,
    config_base: Mapping[str, Mapping[str, Any]] | None = None,
    read_ahead: bool = False,
) -> list[Path]:
    """Write a checkpoint described by its specs, fetching one tensor at a time.

    ``specs`` maps HF key -> :class:`TensorSpec`; ``fetch(hf_key)`` returns that tensor and is
    called once per written tensor, in file order, and its result released after writing, so
    peak memory is about the largest tensor. Validation, stage selection, sharding, files and
    publishing are those of :func:`save_bagel_checkpoint`; ``keys="native"`` names the tensors
    by their native (``model.``-rooted) keys instead of their HF keys; ``overwrite`` as there.
    ``inputs`` are the folders or files the tensors are read from: an ``out_dir`` that is one of
    them, or whose replaced files are among their files (by identity: symlinks, bind mounts and
    hard links count), raises :class:`~bagelverify.errors.AliasError` before anything is
    written. ``metadata`` is every file's ``__metadata__`` (default ``{"format": "pt"}``; a
    sharded save adds its save id); ``config_base`` adds fields to the config files (see
    :meth:`~bagelverify.BagelConfig.to_json_documents`). ``read_ahead``: fetch the next tensor
    while one is written (:func:`~bagelverify.safetensors_io.write_safetensors`; at most 1.5
    times the largest tensor in memory).
    """
    if isinstance(config, (str, os.PathLike)):
        config = BagelConfig.from_pretrained(config)
    if config is not None and not isinstance(config, BagelConfig):
        raise ArgumentTypeError(
            f"config must be a bagelverify.BagelConfig or the folder of its config files "
            f"(written as the checkpoint's config files), got {type(config).__name__}"
        )
    directory = Path(out_dir)
    report = build_report(specs, stage=stage, config=config, source=str(public_path(directory)))
    report.raise_for_problems(strict=strict, verb="save")
    report.plan.log(strict=strict)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    names = {
        key: (native if keys == "native" else key) for key, native in report.plan.native.items()
    }
    kept = [TensorSpec(names[key], specs[key].dtype, specs[key].shape) for key in names]
    by_name = {name: key for key, name in names.items()}

    def fetch_by_name(name: str) -> torch.Tensor:
        return fetch(by_name[name])

    with publishing(
        directory,
        replaces=replaced_by_save(directory, sharded=limit is not None, config=config is not None),
        guard=save_guard(directory, sharded=limit is not None, overwrite=overwrite),
        reads=inputs,
        last=(INDEX_FILE,),
    ) as staging:
        if limit is None:
            write_safetensors(
                staging / MODEL_FILE, kept, fetch_by_name, metadata=metadata, read_ahead=read_ahead
            )
            written = [MODEL_FILE]
        else:
            written = _write_shards(staging, kept, fetch_by_name, limit, metadata, read_ahead)
        if config is not None:
            config.save_pretrained(staging, base=config_base)
            written.extend(CONFIG_FILES)
    logger.info("%s: wrote %d tensors (%s)", directory, len(kept), report.stage)
    return [directory / name for name in written]


SHARD_NAME = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")
"""The names :func:`write_bagel_checkpoint` gives shards."""


def _indexed_shards(directory: Path) -> set[str]:
    """The file names the folder's current shard index lists (none without a readable one)."""
    try:
        document = read_json_file(directory / INDEX_FILE, MAX_INDEX_BYTES, CorruptCheckpointError)
    except (OSError, ValueError):  # no index, or one that does not parse: nothing to go by
        return set()
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    return {
        name
        for name in weight_map.values()
        if isinstance(name, str)
        and name
        and "\0" not in name
        and Path(name).name == name
        and name not in (".", "..")
    }


def replaced_by_save(directory: Path, *, sharded: bool, config: bool) -> Callable[[str], bool]:
    """The names of a folder's previous checkpoint that a save replaces: ``ema.safetensors``
    (a single-file save) or the index and the shards it names or that have the saver's shard
    names (a sharded save), and the config files when a config is written. The other weights
    of a training output folder (``model.safetensors`` beside ``ema.safetensors``) stay."""
    indexed: dict[tuple[int, int, int], set[str]] = {}

    def previous_shards() -> set[str]:  # read again whenever the index changed
        try:
            stats = os.stat(directory / INDEX_FILE)
        except OSError:
            return set()
        key = (stats.st_ino, stats.st_size, stats.st_mtime_ns)
        if key not in indexed:
            indexed.clear()
            indexed[key] = _indexed_shards(directory)
        return indexed[key]

    def replaces(name: str) -> bool:
        if config and name in CONFIG_FILES:
            return True
        if not sharded:
            return name == MODEL_FILE
        return (
            name == INDEX_FILE
            or SHARD_NAME.fullmatch(name) is not None
            or (name.endswith(".safetensors") and name in previous_shards())
        )

    return replaces


def save_guard(directory: Path, *, sharded: bool, overwrite: bool) -> Guard:
    """Refuse a folder that holds a checkpoint unless ``overwrite``, and, for a sharded save, a
    weights file that would shadow the new index."""

    def guard(entries: list[str]) -> None:
        if sharded:
            for name in (MODEL_FILE, MODEL_WEIGHTS_FILE):
                if name in entries:
                    raise FileExistsError(
                        f"{directory / name} exists and would shadow the sharded checkpoint (a "
                        f"load reads {name} before {INDEX_FILE}); remove it or save to another "
                        "folder"
                    )
        found = [name for name in (MODEL_FILE, INDEX_FILE) if name in entries]
        if found and not overwrite:
            raise FileExistsError(
                f"{directory} already holds a checkpoint ({found[0]}); pass overwrite=True to "
                "replace it, or save to another folder"
            )

    return guard


def _write_shards(
    directory: Path,
    kept: list[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    limit: int,
    metadata: Mapping[str, str] | None = None,
    read_ahead: bool = False,
) -> list[str]:
    """Write ``kept`` into the (new, private) ``directory`` as shards of at most ``limit`` bytes,
    then their index; return the names written."""
    shards = _shards(kept, limit)
    save_id = secrets.token_hex(16)
    weight_map: dict[str, str] = {}
    written: list[str] = []
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(
            directory / name,
            shard,
            fetch,
            metadata={**(metadata or DEFAULT_METADATA), SAVE_ID: save_id},
            read_ahead=read_ahead,
        )
        weight_map.update((spec.name, name) for spec in shard)
        written.append(name)
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in kept), SAVE_ID: save_id},
        "weight_map": {spec.name: weight_map[spec.name] for spec in kept},
    }
    with atomic_open(directory / INDEX_FILE) as handle:
        handle.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))
    written.append(INDEX_FILE)
    return written


class WrittenTensors:
    """Progress that counts what is written: :meth:`fetched` (called from a ``fetch`` of
    :func:`write_bagel_checkpoint`) reports the previous tensor, which the writer has written
    by the time it fetches the next one, and :meth:`done` the last, once the files are
    published; so ``on_tensor(hf_key, nbytes)`` never runs ahead of the disk, fsync included,
    and ``nbytes`` are the bytes written (after a cast), not those read."""

    def __init__(self, on_tensor: Callable[[str, int], None] | None) -> None:
        self.on_tensor = on_tensor
        self._pending: tuple[str, int] | None = None

    def fetched(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Report the tensor fetched before this one; return ``tensor``."""
        self.done()
        self._pending = (hf_key, tensor.numel() * tensor.element_size())
        return tensor

    def done(self) -> None:
        """Report the last tensor fetched (the write it was fetched for has finished)."""
        if self._pending is not None and self.on_tensor is not None:
            self.on_tensor(*self._pending)
        self._pending = None


def convert_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: StageLike | None = None,
    keys: KeyLayout = "hf",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    convert_conv_patch_embedding: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
    weights: Weights | None = None,
    strip_prefix: str | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> list[Path]:
    """Rewrite a checkpoint folder with HF or native keys, streaming one tensor at a time.

    The source (HF- or native-keyed, single file or sharded) is validated from its headers like
    a load; each kept tensor is then read into a fresh buffer, written and released, so peak
    memory is about the largest tensor, never the checkpoint. The config (``config`` if given,
    else the source's config files) is written with the tensors. ``on_tensor(hf_key, nbytes)``
    is called after each tensor is written, with the bytes written (for progress:
    :class:`WrittenTensors`); ``overwrite`` as for
    :func:`save_bagel_checkpoint`; ``weights`` picks the source's ``ema`` or ``model`` weights;
    ``strip_prefix`` removes a wrapper's prefix (``module.``) from the source's keys. A
    ``dst_dir`` that is the source (the same folder through a symlink or a bind mount, or a
    folder holding hard links to its files) raises :class:`~bagelverify.errors.AliasError`.
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
        strip_prefix=strip_prefix,
    ) as (report, jobs):
        specs = {
            strip_root(native): TensorSpec(strip_root(native), job.info.dtype, job.shape)
            for native, job in jobs.items()
        }

        written = WrittenTensors(on_tensor)

        def fetch(hf_key: str) -> torch.Tensor:
            out = read_tensor(jobs[to_native_key(hf_key)])
            if transform is not None:
                out = transform(hf_key, out)
            return written.fetched(hf_key, out)

        files = write_bagel_checkpoint(
            specs,
            fetch,
            dst_dir,
            stage=report.stage,
            max_shard_size=max_shard_size,
            strict=strict,
            config=report.config,
            keys=keys,
            overwrite=overwrite,
            inputs=(src_dir, config if isinstance(config, (str, os.PathLike)) else None),
        )
        written.done()
        return files
