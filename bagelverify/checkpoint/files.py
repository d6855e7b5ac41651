"""The files of a checkpoint folder: which safetensors file(s) hold its tensors, and the config.

Folder layouts: ``ema.safetensors`` (the release: the EMA weights), ``model.safetensors`` (the
non-EMA weights that upstream training writes beside it), or ``model.safetensors.index.json``
plus the shards it names. ``weights="ema"|"model"`` picks one; by default ``ema.safetensors``
wins when it exists (the released folder ships an index that does not describe it), then
``model.safetensors``, then the index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import CONFIG_FILES, BagelConfig
from ..errors import (
    ArgumentError,
    CorruptCheckpointError,
    ReadError,
    agree,
    counted,
    format_examples,
)
from ..manifest import MODEL_FILE
from ..publish import recover
from ..safetensors_io import TensorInfo, open_regular, read_header
from ..strict_json import MAX_INDEX_BYTES, parse_json, short_repr

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
"""Index of a sharded checkpoint: ``{"metadata": {...}, "weight_map": {key: shard file}}``."""

MODEL_WEIGHTS_FILE = "model.safetensors"
"""The non-EMA weights of an upstream training output folder (one file)."""

Weights = Literal["ema", "model"]
"""``"ema"``: ``ema.safetensors``; ``"model"``: ``model.safetensors`` or the sharded index."""
WEIGHTS_CHOICES: tuple[Weights, ...] = ("ema", "model")

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
    weights: str = "the default"
    """Which weights file was read and why, e.g. ``model.safetensors (no ema.safetensors in the
    folder)``."""

    @property
    def source(self) -> str:
        """The file the tensors were listed from: the one weights file, or the index."""
        return str(self.files[0] if self.layout == "single" else self.directory / INDEX_FILE)

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


def require_directory(directory: Path, expected: str, what: str = "checkpoint folder") -> None:
    """The one wording of a folder that is not there: ``NotADirectoryError`` for a file given
    where ``what`` (a folder holding ``expected``) is needed, saying which folder to pass, and
    ``FileNotFoundError`` naming ``directory / expected`` for a path that does not exist."""
    if directory.is_dir():
        return
    if directory.exists():
        folder = directory.parent
        hint = f"pass its folder {folder}" if (folder / expected).is_file() else "pass a folder"
        article = "an" if what[0] in "aeiou" else "a"
        raise NotADirectoryError(
            f"{directory} is a file, not {article} {what}: {article} {what} holds {expected}; "
            f"{hint}"
        )
    raise FileNotFoundError(f"{what} {directory} does not exist (expected {directory / expected})")


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


def _read_index(directory: Path, fds: dict[Path, int], why: str) -> CheckpointFiles:
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
                f"{shard_path}: shard named by {index_path} for {counted(len(indexed), 'tensor')} "
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
                f"{counted(len(absent), 'tensor')} the index places in {shard_path.name} "
                f"{agree(len(absent), 'is', 'are')} not in its header: {format_examples(absent)}"
            )
        unindexed = [key for key in header.tensors if weight_map.get(key) != shard_path.name]
        if unindexed:
            problems.append(
                f"{counted(len(unindexed), 'tensor')} of {shard_path.name} "
                f"{agree(len(unindexed), 'is', 'are')} not indexed to it: "
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
    return CheckpointFiles(directory, "sharded", tuple(shards), tensors, fds, why)


OPEN_ATTEMPTS = 3
"""How often :func:`open_checkpoint` re-opens a sharded folder that changed while it was being
opened (another process saving into it) before it gives up."""


def check_weights(weights: object) -> Weights | None:
    """``weights`` as given when it is ``"ema"``, ``"model"`` or ``None``; else
    :class:`~bagelverify.errors.ArgumentError` (a ``ValueError``)."""
    if weights is None or weights in WEIGHTS_CHOICES:
        return weights
    raise ArgumentError(
        f"weights must be 'ema' (ema.safetensors), 'model' (model.safetensors or its shard "
        f"index) or None (ema.safetensors when present), got {weights!r}"
    )


def choose_weights(directory: Path, weights: Weights | None = None) -> tuple[Path, str]:
    """The weights file of a folder, from file names alone, and why it was chosen.

    ``weights=None``: ``ema.safetensors`` when present, else ``model.safetensors``, else the
    shard index; ``"ema"`` requires ``ema.safetensors``; ``"model"`` takes
    ``model.safetensors``, else the index. ``FileNotFoundError`` names what was looked for and
    what the folder holds.
    """
    wanted = check_weights(weights)
    candidates = {
        None: (MODEL_FILE, MODEL_WEIGHTS_FILE, INDEX_FILE),
        "ema": (MODEL_FILE,),
        "model": (MODEL_WEIGHTS_FILE, INDEX_FILE),
    }[wanted]
    for name in candidates:
        if (directory / name).is_file():
            if wanted is not None:
                why = f"weights={wanted!r}"
            elif name == MODEL_FILE:
                why = "the default"
            else:
                why = f"no {MODEL_FILE} in the folder"
            return directory / name, f"{name} ({why})"
    held = sorted(
        path.name for path in directory.glob("*.safetensors*") if not path.name.startswith(".")
    )
    holds = (
        f"it holds {format_examples(held, show=str)}" if held else "it holds no safetensors file"
    )
    if wanted is None:
        raise FileNotFoundError(
            f"{directory / MODEL_FILE}: not found, and no {MODEL_WEIGHTS_FILE} and no sharded "
            f"checkpoint ({directory / INDEX_FILE}) either; {holds}. Is {directory} a BAGEL "
            "checkpoint folder?"
        )
    other = "model" if wanted == "ema" else "ema"
    advice = f": pass weights={other!r} (--weights {other}) or leave it out" if held else ""
    raise FileNotFoundError(
        f"{directory}: no {' or '.join(candidates)} (weights={wanted!r}); {holds}{advice}."
    )


def open_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    keep_open: bool = False,
    weights: Weights | None = None,
) -> CheckpointFiles:
    """List a checkpoint folder's tensors from its header(s), reading no tensor data.

    ``weights`` picks the weights file (see :func:`choose_weights`); the result's
    :attr:`~CheckpointFiles.weights` says which was read and why.

    Every header is read through one descriptor per file; with ``keep_open`` those stay open in
    :attr:`CheckpointFiles.fds` for the data reads (close them with ``close()`` or a ``with``
    block). A sharded folder whose index or shards are replaced while they are opened is opened
    again (up to :data:`OPEN_ATTEMPTS` times), so the files listed are those of one save.

    Raises ``FileNotFoundError`` naming the expected file,
    :class:`~bagelverify.errors.CorruptCheckpointError` for a bad header, a file that is not a
    regular file, or an index that disagrees with its shards (every index entry must be in its
    shard's header and every shard tensor in the index; shards of another save), and
    :class:`~bagelverify.errors.ReadError` when the folder kept changing.

    A write of the folder that was killed part way is first finished or undone
    (:func:`bagelverify.publish.recover`, best effort, never waiting for a live writer).
    """
    directory = Path(checkpoint_dir)
    check_weights(weights)
    recover(directory)  # a killed write of the folder is finished or undone first
    require_directory(directory, MODEL_FILE)
    what = ""
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        fds: dict[Path, int] = {}
        try:
            files = _open_folder(directory, weights, fds)
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


def open_weights(
    path: str | os.PathLike[str], weights: Weights | None = None, *, keep_open: bool = False
) -> CheckpointFiles:
    """:func:`open_checkpoint` of a folder, or the header of one ``.safetensors`` file given
    directly (``weights`` must then be ``None``: it only selects within a folder)."""
    path = Path(path)
    if not path.is_file():
        return open_checkpoint(path, keep_open=keep_open, weights=weights)
    if check_weights(weights) is not None:
        raise ArgumentError(f"{path} is a file; weights={weights!r} only selects within a folder")
    fds: dict[Path, int] = {}
    try:
        header = read_header(path, fd=_open(path, fds))
    except BaseException:
        _close_all(fds)
        raise
    files = CheckpointFiles(
        path.parent, "single", (path,), header.tensors, fds, f"{path.name} (given)"
    )
    if not keep_open:
        files.close()
    return files


def _open_folder(directory: Path, weights: Weights | None, fds: dict[Path, int]) -> CheckpointFiles:
    path, why = choose_weights(directory, weights)
    others = [
        name
        for name in (MODEL_FILE, MODEL_WEIGHTS_FILE, INDEX_FILE)
        if name != path.name and (directory / name).is_file()
    ]
    ignored = f"; {', '.join(others)} ignored (weights= chooses)" if others else ""
    logger.info("%s: reading %s%s", directory, why, ignored)
    if path.name == INDEX_FILE:
        return _read_index(directory, fds, why)
    header = read_header(path, fd=_open(path, fds))
    return CheckpointFiles(directory, "single", (path,), header.tensors, fds, why)


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
