"""The files of a checkpoint folder: which safetensors file(s) hold its tensors, and the config.

Folder layouts: ``ema.safetensors`` (the release), or ``model.safetensors.index.json`` plus the
shards it names. When both exist ``ema.safetensors`` wins: the released folder ships an index
that does not describe ``ema.safetensors``, so the index is only used without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import CONFIG_FILES, BagelConfig
from ..errors import CorruptCheckpointError, ReadError, format_examples
from ..manifest import MODEL_FILE
from ..safetensors_io import TensorInfo, open_regular, read_header
from ..strict_json import MAX_INDEX_BYTES, parse_json, short_repr

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
"""Index of a sharded checkpoint: ``{"metadata": {...}, "weight_map": {key: shard file}}``."""

SAVE_ID = "bagelverify_save_id"
"""Metadata field naming the save that wrote a sharded checkpoint: in the index's ``metadata``
and in every shard's ``__metadata__``. A load refuses shards whose id is not the index's."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The tensors of a checkpoint folder, from its header(s) only.

    From ``open_checkpoint(..., keep_open=True)``, :attr:`fds` holds the descriptors its headers
    were read through (one per file, until :meth:`close`): reading the data through them reads
    the files those headers describe, whatever another process renames meanwhile.
    """

    directory: Path
    layout: Literal["single", "sharded"]
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    """Checkpoint key -> where its bytes are, in file order."""
    fds: dict[Path, int] = field(default_factory=dict, compare=False, repr=False)
    """File -> the open descriptor its header was read through (empty once closed)."""

    @property
    def source(self) -> str:
        """The file the tensors were listed from: ``ema.safetensors`` or the index."""
        return str(self.directory / (MODEL_FILE if self.layout == "single" else INDEX_FILE))

    def close(self) -> None:
        """Close the descriptors in :attr:`fds` (safe to call twice)."""
        _close_all(self.fds)

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_all(fds: dict[Path, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


def require_directory(directory: Path, expected: str) -> None:
    """Raise ``FileNotFoundError`` naming ``directory / expected`` unless the folder exists."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist (expected {directory / expected})"
        )


def _shard_path(directory: Path, index_path: Path, key: str, shard: object) -> Path:
    if (
        not isinstance(shard, str)
        or not shard
        or "\0" in shard
        or Path(shard).name != shard
        or shard in ("..", ".")
    ):
        raise CorruptCheckpointError(
            f"{index_path}: weight_map[{key!r}] = {short_repr(shard)} is not a file name in the "
            "folder; an index may only name shards next to it. Fix the index."
        )
    return directory / shard


class _Changed(Exception):
    """A file of the folder was replaced while the folder was being opened."""


def _identity(stats: os.stat_result) -> tuple[int, int, int, int]:
    return stats.st_dev, stats.st_ino, stats.st_size, stats.st_mtime_ns


def _still(path: Path, fd: int) -> None:
    """Raise :class:`_Changed` unless ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        raise _Changed(f"{path.name} was removed") from None
    if _identity(now) != _identity(os.fstat(fd)):
        raise _Changed(f"{path.name} was replaced")


def _open(path: Path, fds: dict[Path, int]) -> int:
    fds[path] = open_regular(path)
    return fds[path]


def _read_index(directory: Path, fds: dict[Path, int]) -> CheckpointFiles:
    index_path = directory / INDEX_FILE
    index_fd = os.dup(_open(index_path, fds))
    try:
        with os.fdopen(index_fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise CorruptCheckpointError(
                f"{index_path}: larger than the {MAX_INDEX_BYTES}-byte cap on a shard index (an "
                "index of BAGEL's 1,223 tensors is about 100 KB). Fix or re-save the checkpoint."
            )
    finally:
        os.close(index_fd)
    document = parse_json(
        raw,
        lambda what: CorruptCheckpointError(
            f"{index_path}: {what}. Re-save the checkpoint or fix the index."
        ),
    )
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"{index_path}: expected an object with a 'weight_map' object (tensor name -> shard "
            f"file), found {short_repr(document)}. Re-save the checkpoint or fix the index."
        )
    metadata = document.get("metadata")
    save_id = metadata.get(SAVE_ID) if isinstance(metadata, dict) else None
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(_shard_path(directory, index_path, key, shard), []).append(key)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard_path, indexed in shards.items():
        try:
            fd = _open(shard_path, fds)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{shard_path}: shard named by {index_path} for {len(indexed)} tensors "
                f"(e.g. {indexed[0]!r}) does not exist"
            ) from None
        header = read_header(shard_path, fd=fd)
        if save_id is not None and header.metadata.get(SAVE_ID) != save_id:
            problems.append(
                f"{shard_path.name} was written by another save (its {SAVE_ID} is "
                f"{short_repr(header.metadata.get(SAVE_ID))}, the index's {short_repr(save_id)})"
            )
        absent = [key for key in indexed if key not in header.tensors]
        if absent:
            problems.append(
                f"{len(absent)} tensors the index places in {shard_path.name} are not in its "
                f"header: {format_examples(absent)}"
            )
        unindexed = [key for key in header.tensors if weight_map.get(key) != shard_path.name]
        if unindexed:
            problems.append(
                f"{len(unindexed)} tensors of {shard_path.name} are not indexed to it: "
                f"{format_examples(unindexed)}"
            )
        tensors.update((k, v) for k, v in header.tensors.items() if k not in unindexed)
    # A save that replaced the index or a shard while they were opened one by one may have
    # left this load holding files of two saves: every name must still be the file opened.
    for path, fd in fds.items():
        _still(path, fd)
    if problems:
        raise CorruptCheckpointError(
            f"{index_path} disagrees with its shards: " + "; ".join(problems) + ". Re-save the "
            "checkpoint or fix the index."
        )
    os.close(fds.pop(index_path))
    return CheckpointFiles(directory, "sharded", tuple(shards), tensors, fds)


OPEN_ATTEMPTS = 3
"""How often :func:`open_checkpoint` re-opens a sharded folder that changed while it was being
opened (another process saving into it) before it gives up."""


def open_checkpoint(
    checkpoint_dir: str | os.PathLike[str], *, keep_open: bool = False
) -> CheckpointFiles:
    """List a checkpoint folder's tensors from its header(s), reading no tensor data.

    Every header is read through one descriptor per file; with ``keep_open`` those stay open in
    :attr:`CheckpointFiles.fds` for the data reads (close them with ``close()`` or a ``with``
    block). A sharded folder whose index or shards are replaced while they are opened is opened
    again (up to :data:`OPEN_ATTEMPTS` times), so the files listed are those of one save.

    Raises ``FileNotFoundError`` naming the expected file,
    :class:`~bagelverify.errors.CorruptCheckpointError` for a bad header, a file that is not a
    regular file, or an index that disagrees with its shards (every index entry must be in its
    shard's header and every shard tensor in the index; shards of another save), and
    :class:`~bagelverify.errors.ReadError` when the folder kept changing.
    """
    directory = Path(checkpoint_dir)
    require_directory(directory, MODEL_FILE)
    single, index = directory / MODEL_FILE, directory / INDEX_FILE
    what = ""
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        fds: dict[Path, int] = {}
        try:
            files = _open_folder(directory, single, index, fds)
        except _Changed as changed:
            _close_all(fds)
            logger.info("%s: %s while opening it (attempt %d)", directory, changed, attempt)
            what = str(changed)
            continue
        except BaseException:
            _close_all(fds)
            raise
        if not keep_open:
            files.close()
        return files
    raise ReadError(
        f"{directory}: the checkpoint changed while it was being opened ({what}) on each of "
        f"{OPEN_ATTEMPTS} attempts; another process is writing it. Load it once that save "
        "has finished."
    )


def _open_folder(
    directory: Path, single: Path, index: Path, fds: dict[Path, int]
) -> CheckpointFiles:
    if single.is_file():
        if index.exists():
            logger.info(
                "%s: using %s; %s is ignored (ema.safetensors wins when both exist)",
                directory,
                MODEL_FILE,
                INDEX_FILE,
            )
        header = read_header(single, fd=_open(single, fds))
        return CheckpointFiles(directory, "single", (single,), header.tensors, fds)
    if index.is_file():
        return _read_index(directory, fds)
    raise FileNotFoundError(
        f"{single}: not found, and no sharded checkpoint ({index}) either; "
        f"is {directory} a BAGEL checkpoint folder?"
    )


def find_config(checkpoint_dir: str | os.PathLike[str], given: object = None) -> BagelConfig | None:
    """The config to validate a checkpoint folder with.

    ``given`` as is when it is a :class:`BagelConfig`; the config files of ``given`` when it is
    a folder path; otherwise the checkpoint folder's own files if any of the three exists, else
    ``None``. Any other ``given`` object (a training framework's own config, which the reference
    adapter took for log context only) is noted in the log and the folder's files are used.
    """
    if isinstance(given, BagelConfig):
        return given
    if isinstance(given, (str, os.PathLike)):
        return BagelConfig.from_pretrained(given)
    directory = Path(checkpoint_dir)
    if given is not None:
        logger.info(
            "config of type %s is not a BagelConfig; validating with %s's own config files",
            type(given).__name__,
            directory,
        )
    if any((directory / name).exists() for name in CONFIG_FILES):
        return BagelConfig.from_pretrained(directory)
    return None
