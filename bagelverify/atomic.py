"""Atomic file replacement: write a temporary file next to the target, fsync, rename.

A process killed mid-write (SIGKILL, power loss) leaves its temporary file behind, never a
partial file under the final name. Temporary files are named ``.<name>.<random>.tmp`` and are
locked (``flock``) by their writer for as long as it writes; the next :func:`atomic_open` of the
same target removes the ones whose writer is gone (unlocked) and that have not been modified for
:data:`STALE_AFTER_SECONDS`, so crash-and-retry loops do not fill the disk. Without ``fcntl``
(Windows) nothing is locked and stale files are left for the user to delete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"
STALE_AFTER_SECONDS = 60.0
"""An unlocked temporary file untouched for this long belongs to a dead writer. (The writer
locks its file right after creating it and unlocks it just before the rename; the age guards
those two instants.)"""


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files that :func:`atomic_open` writes for ``path``."""
    return f".{path.name}."


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_durably(path: Path) -> None:
    """Delete ``path`` if it exists and fsync its folder, so the removal survives a crash."""
    if path.exists():
        path.unlink()
        _fsync_directory(path.parent)


def _is_abandoned(candidate: Path) -> bool:
    """Whether no live writer holds ``candidate`` and it has been idle for a while."""
    if fcntl is None or time.time() - candidate.stat().st_mtime < STALE_AFTER_SECONDS:
        return False
    fd = os.open(candidate, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a writer is still at work
    finally:
        os.close(fd)  # releases our lock, if we got it
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of dead writers of ``path`` (see the module docstring).

    Best effort: a file that cannot be checked or removed is skipped. Returns what was removed.
    """
    path = Path(path)
    prefix = temporary_prefix(path)
    removed: list[Path] = []
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        candidate = path.parent / name
        if not name.endswith(TEMPORARY_SUFFIX):
            continue
        try:
            if _is_abandoned(candidate):
                candidate.unlink()
                removed.append(candidate)
                logger.info("removed %s, left by an interrupted write of %s", candidate, path)
        except OSError as error:
            logger.debug("could not check or remove %s: %s", candidate, error)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for writing; on success make it ``path``.

    The file is flushed, fsync'ed and renamed over ``path`` (then the folder is fsync'ed), so
    readers see either the old file or the complete new one. If the block raises, the temporary
    file is removed and an existing ``path`` is left untouched; an ``OSError`` (disk full, ...)
    is re-raised with the same errno and a message naming ``path``. Abandoned temporary files
    of earlier, killed writes of ``path`` are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    fd, temp_name = tempfile.mkstemp(
        prefix=temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=path.parent
    )
    handle = os.fdopen(fd, "wb")
    try:
        with handle:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            # mkstemp creates 0600; keep an existing file's mode, else the usual 0644
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except OSError as error:
        Path(temp_name).unlink(missing_ok=True)
        if error.errno is None:
            raise
        raise OSError(
            error.errno,
            f"{error.strerror or error} while writing {path}; the partial temporary file was "
            f"removed and {path} was not changed",
        ) from error
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
