"""Argument checks shared by the commands: folders given as files, sizes, writable outputs."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint import INDEX_FILE, MODEL_WEIGHTS_FILE, WEIGHTS_CHOICES, parse_size
from ..cli import UsageError
from ..config import CONFIG_FILES
from ..manifest import MODEL_FILE

WEIGHT_FILES: dict[str, str] = {MODEL_FILE: "ema", MODEL_WEIGHTS_FILE: "model", INDEX_FILE: "model"}
"""The weight files a checkpoint folder holds, by name, and the ``--weights`` choice each means."""

DCP_METADATA = ".metadata"
"""The file that marks a torch.distributed.checkpoint folder."""

KNOWN_FILES = (INDEX_FILE, DCP_METADATA)
"""Checkpoint files that are not ``.safetensors`` files: the shard index, DCP's metadata."""

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
"""errnos of a folder that cannot be written: permissions, an immutable folder, a read-only
file system."""


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights ema|model``: which weights file of a training output folder to read."""
    parser.add_argument(
        "--weights",
        choices=WEIGHTS_CHOICES,
        help="ema: ema.safetensors; model: model.safetensors or its index (default: "
        "ema.safetensors when present, else the model weights)",
    )


def add_strip_prefix_argument(parser: argparse.ArgumentParser) -> None:
    """``--strip-prefix PREFIX``: remove a wrapper's prefix (``module.``) from every key."""
    parser.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="remove PREFIX (e.g. module. from DDP, _orig_mod. from torch.compile) from the "
        "keys that start with it",
    )


def checkpoint_folder(path: str | Path, what: str) -> tuple[Path, str | None]:
    """The checkpoint folder that ``path`` names, and the ``--weights`` choice it implies.

    A folder (or a path that does not exist, for the caller to report) is itself, with no
    choice. One of the folder's weight files (``ema.safetensors``, ``model.safetensors``, the
    shard index) means its folder and that file's weights; a DCP ``.metadata`` file, its folder.
    Any other file is a :class:`~bagelverify.cli.UsageError` saying that ``what`` needs a folder.
    """
    path = Path(path)
    if not path.is_file():
        return path, None
    if path.name in WEIGHT_FILES:
        return path.parent, WEIGHT_FILES[path.name]
    if path.name == DCP_METADATA:
        return path.parent, None
    raise UsageError(
        f"{what} {path} is a file; {what} is a checkpoint folder (the folder holding "
        f"{MODEL_FILE} or {INDEX_FILE} and its shards): pass its folder instead"
    )


def checkpoint_path(path: str, what: str) -> str:
    """``path`` where a command takes a checkpoint folder or one ``.safetensors`` file (or the
    folder's index or DCP ``.metadata``); any other file is a
    :class:`~bagelverify.cli.UsageError` saying what is needed."""
    given = Path(path)
    if given.is_file() and given.suffix != ".safetensors" and given.name not in KNOWN_FILES:
        raise UsageError(
            f"{what} {path} is not a checkpoint file; {what} is a checkpoint folder (holding "
            f"{MODEL_FILE} or {INDEX_FILE}) or one .safetensors file"
        )
    return path


def config_folder(path: str | Path | None) -> Path | None:
    """The folder of ``--config``: a config file (``config.json``, ...) means its folder; any
    other file is a :class:`~bagelverify.cli.UsageError`."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return path
    if path.name in CONFIG_FILES:
        return path.parent
    raise UsageError(
        f"--config {path} is a file; --config is the folder holding {', '.join(CONFIG_FILES)}"
    )


def shard_size(text: str) -> int:
    """``--max-shard-size``: a byte count or a size such as ``5GB`` or ``500MiB``."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a positive byte count or a size such as 5GB or 500MiB"
        ) from None


def not_writable(folder: Path, error: OSError, elsewhere: str) -> PermissionError:
    """The error for an output ``folder`` that cannot be written: which folder, what the file
    system said, and what to do by its errno (``elsewhere``: where else to write). A read-only
    file system cannot be fixed with permissions, so only ``elsewhere`` is offered for it."""
    if error.errno == errno.EROFS:
        fix = f"The file system is read-only: {elsewhere} on a writable file system."
    elif error.errno == errno.EPERM:
        fix = f"The folder may be immutable (lsattr; chattr -i {folder}), or {elsewhere}."
    else:
        fix = f"Make it writable (e.g. chmod u+w {folder}), or {elsewhere}."
    return PermissionError(
        error.errno,
        f"cannot write in {folder} ({error.strerror or error}); nothing was written. {fix}",
    )


@contextlib.contextmanager
def naming_unwritable(target: Path, elsewhere: str) -> Iterator[None]:
    """Turn a write refused at, above or inside ``target`` (permissions, a read-only file
    system) into :func:`not_writable` naming the nearest existing folder of the refused path:
    a folder the user knows, never a staging name. Other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in NOT_WRITABLE or (
            isinstance(error, PermissionError) and (str(error).startswith("cannot write in"))
        ):
            raise
        where = Path(os.fsdecode(error.filename)) if error.filename else target
        while not where.is_dir() and where != where.parent:
            where = where.parent
        if not (where == target or where in target.parents or target in where.parents):
            raise  # not the output: a source that cannot be read
        raise not_writable(where, error, elsewhere) from error
