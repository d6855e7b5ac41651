"""The files of a checkpoint folder: which safetensors file(s) hold its tensors, and the config.

Folder layouts: ``ema.safetensors`` (the release), or ``model.safetensors.index.json`` plus the
shards it names. When both exist ``ema.safetensors`` wins: the released folder ships an index
that does not describe ``ema.safetensors``, so the index is only used without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import CONFIG_FILES, BagelConfig
from ..errors import CorruptCheckpointError, format_examples
from ..manifest import MODEL_FILE
from ..safetensors_io import TensorInfo, read_header
from ..strict_json import parse_json, short_repr

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
"""Index of a sharded checkpoint: ``{"metadata": {...}, "weight_map": {key: shard file}}``."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The tensors of a checkpoint folder, from its header(s) only."""

    directory: Path
    layout: Literal["single", "sharded"]
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    """Checkpoint key -> where its bytes are, in file order."""

    @property
    def source(self) -> str:
        """The file the tensors were listed from: ``ema.safetensors`` or the index."""
        return str(self.directory / (MODEL_FILE if self.layout == "single" else INDEX_FILE))


def require_directory(directory: Path, expected: str) -> None:
    """Raise ``FileNotFoundError`` naming ``directory / expected`` unless the folder exists."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist (expected {directory / expected})"
        )


def _shard_path(directory: Path, index_path: Path, key: str, shard: object) -> Path:
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in ("..", "."):
        raise CorruptCheckpointError(
            f"{index_path}: weight_map[{key!r}] = {short_repr(shard)} is not a file name in the "
            "folder; an index may only name shards next to it. Fix the index."
        )
    return directory / shard


def _read_index(directory: Path) -> CheckpointFiles:
    index_path = directory / INDEX_FILE
    document = parse_json(
        index_path.read_bytes(),
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
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(_shard_path(directory, index_path, key, shard), []).append(key)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard_path, indexed in shards.items():
        if not shard_path.is_file():
            raise FileNotFoundError(
                f"{shard_path}: shard named by {index_path} for {len(indexed)} tensors "
                f"(e.g. {indexed[0]!r}) does not exist"
            )
        header = read_header(shard_path)
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
    if problems:
        raise CorruptCheckpointError(
            f"{index_path} disagrees with its shards: " + "; ".join(problems) + ". Re-save the "
            "checkpoint or fix the index."
        )
    return CheckpointFiles(directory, "sharded", tuple(shards), tensors)


def open_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointFiles:
    """List a checkpoint folder's tensors from its header(s), reading no tensor data.

    Raises ``FileNotFoundError`` naming the expected file,
    :class:`~bagelverify.errors.CorruptCheckpointError` for a bad header or an index that
    disagrees with its shards (every index entry must be in its shard's header and every shard
    tensor in the index).
    """
    directory = Path(checkpoint_dir)
    require_directory(directory, MODEL_FILE)
    single, index = directory / MODEL_FILE, directory / INDEX_FILE
    if single.is_file():
        if index.exists():
            logger.info(
                "%s: using %s; %s is ignored (ema.safetensors wins when both exist)",
                directory,
                MODEL_FILE,
                INDEX_FILE,
            )
        header = read_header(single)
        return CheckpointFiles(directory, "single", (single,), header.tensors)
    if index.is_file():
        return _read_index(directory)
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
